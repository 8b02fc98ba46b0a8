//! One WebSocket connection: waits for the broker to confirm the user's subscription, sends
//! `connected`, then one task serves the socket: client frames in, outbox frames out, server
//! pings, idle and write timeouts, the token's expiry (4001), slow-consumer overflow (4008),
//! and shutdown (1001).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, Instrument};

use crate::auth::Identity;
use crate::clock::unix_millis;
use crate::config::Config;
use crate::hub::{Added, ConnRef, Outbox, OutboxRx};
use crate::limits::RateLimiter;
use crate::metrics::{DropReason, Metrics};
use crate::node::Node;
use crate::wire::{self, close, ClientEvent, Close, ErrorCode, Recipients, WireError};

/// A socket write that takes longer than this drops the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the session loop ended.
enum End {
    Close(Close),
    /// The peer went away or the socket failed: nothing more to send.
    Gone,
    /// The client sent a close frame: tungstenite queued the reply, which goes out before the
    /// socket is dropped (the client sees its own code, not 1006).
    ClientClosed,
}

/// WebSocket settings of every session: small buffers (tungstenite's 128 KiB read buffer
/// per socket would dominate memory per idle connection), inbound size limits, and outbound
/// frames gathered into batches of up to [`WRITE_BUFFER`] bytes, each batch flushed at once.
pub fn ws_config(cfg: &Config) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(Some(cfg.max_message_bytes))
        .max_frame_size(Some(cfg.max_message_bytes))
}

/// tungstenite's read buffer of a socket (it grows for a larger frame). tungstenite fills it
/// with zeros before each read, so all of it is resident for the connection's lifetime: small,
/// because [`SpillRead`] reads the socket in [`READ_CHUNK`]s on the stack and hands it over.
const READ_BUFFER: usize = 512;
/// Bytes read from the socket at once (a stack buffer, only while a read runs).
const READ_CHUNK: usize = 8192;
/// Frames are gathered up to this many bytes before a socket write; every batch is flushed.
const WRITE_BUFFER: usize = 8192;

/// Completes the upgrade, then serves the socket for `id` until it closes.
pub async fn serve(on_upgrade: OnUpgrade, id: Identity, sh: Arc<Node>) {
    let conn_id = uuid::Uuid::new_v4();
    let span =
        tracing::info_span!("conn", user_id = %id.user_id, conn_id = %conn_id, instance_id = %sh.cfg.instance_id);
    async move {
        let upgraded = match tokio::time::timeout(WRITE_TIMEOUT, on_upgrade).await {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => return debug!(error = %e, "upgrade failed"),
            Err(_) => return debug!("upgrade timed out"),
        };
        let io = SpillRead::new(TokioIo::new(upgraded));
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config(&sh.cfg))).await;
        run(ws, id, conn_id, sh).await
    }
    .instrument(span)
    .await
}

/// Reads the socket in [`READ_CHUNK`]s into a stack buffer and copies into the caller's
/// (smaller) buffer; bytes that did not fit wait in an exactly sized heap buffer that is freed
/// once taken. So an idle connection holds no read buffer of its own, and tungstenite's can be
/// small without costing a syscall per [`READ_BUFFER`] bytes.
pub struct SpillRead<T> {
    io: T,
    spill: Option<Box<[u8]>>,
    pos: usize,
}

impl<T> SpillRead<T> {
    pub fn new(io: T) -> Self {
        SpillRead { io, spill: None, pos: 0 }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for SpillRead<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some(spill) = &this.spill {
            let n = (spill.len() - this.pos).min(buf.remaining());
            buf.put_slice(&spill[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == spill.len() {
                this.spill = None;
                this.pos = 0;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        if buf.remaining() >= READ_CHUNK {
            return std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut tmp = tokio::io::ReadBuf::uninit(&mut chunk);
        std::task::ready!(std::pin::Pin::new(&mut this.io).poll_read(cx, &mut tmp))?;
        let got = tmp.filled();
        let n = got.len().min(buf.remaining());
        buf.put_slice(&got[..n]);
        if n < got.len() {
            this.spill = Some(got[n..].into());
            this.pos = 0;
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for SpillRead<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Sends a close frame, best effort: the connection ends whether or not it got out.
async fn send_close<S>(tx: &mut S, c: Close)
where
    S: futures_util::Sink<Message, Error = tungstenite::Error> + Unpin,
{
    let frame = Message::Close(Some(CloseFrame { code: CloseCode::from(c.code), reason: c.reason.into() }));
    let _ = tokio::time::timeout(WRITE_TIMEOUT, tx.send(frame)).await;
}

/// Every socket write, the client-frame handler and the confirmation wait are boxed: a
/// future's size is that of its largest await point, and this one lives as long as the
/// connection, so an idle connection would otherwise carry ~1 KiB of write-path state
/// (2,448 → 1,256 bytes, see `docs/benchmarks.md`). The price is one allocation per write.
///
/// Generic over the byte stream so tests can run a session over `tokio::io::duplex` on paused
/// time; the service always passes the upgraded HTTP connection.
async fn run<S>(ws: WebSocketStream<S>, id: Identity, conn_id: uuid::Uuid, sh: Arc<Node>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let started = Instant::now();
    let (mut tx, mut rx) = ws.split();
    let (outbox, mut outbox_rx) = Outbox::new(sh.cfg.send_queue_bytes);
    let conn = ConnRef { id: conn_id.as_u128(), outbox: outbox.clone() };
    let user = id.user_id.as_str();

    let (added, confirmed) = sh.join(user, conn);
    let ok = tokio::select! {
        r = Box::pin(tokio::time::timeout(sh.cfg.broker_wait, confirmed)) => matches!(r, Ok(Ok(true))),
        _ = sh.shutdown.cancelled() => false,
    };
    if !ok {
        let c = if sh.draining() { close::SHUTTING_DOWN } else { close::BROKER_UNAVAILABLE };
        info!(first = added == Added::First, code = c.code, "refused: subscription not confirmed");
        Box::pin(send_close(&mut tx, c)).await;
        sh.leave(user, conn_id.as_u128());
        return;
    }

    let hello = wire::connected(user, &conn_id.to_string(), &sh.cfg.instance_id, id.expires_at);
    let mut end = match Box::pin(send(&mut tx, Message::text(hello))).await {
        Ok(()) => None,
        Err(()) => Some(End::Gone),
    };
    // Counted as open only once `connected` went out: a client that resets before it is
    // neither opened nor closed in `fanout_connections`.
    let opened = end.is_none();
    if opened {
        sh.metrics.connection_opened();
        info!(first = added == Added::First, "connected");
    }

    let mut limiter = RateLimiter::new(sh.cfg.rate_limit, sh.cfg.rate_burst);
    let now = tokio::time::Instant::now();
    // To the millisecond: `exp` is in seconds, "now" is not.
    let lifetime = Duration::from_millis(id.expires_at.saturating_mul(1000).saturating_sub(unix_millis()));
    // `exp` is capped by auth; a far deadline still must not overflow the timer.
    let expiry = now.checked_add(lifetime).unwrap_or(now + Duration::from_secs(100 * 365 * 24 * 3600));
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + sh.cfg.ping_interval, sh.cfg.ping_interval);
    // On tokio's clock (like the ping interval), so the idle timeout runs on paused time in tests.
    let mut last_heard = tokio::time::Instant::now();
    // Created once, not per loop turn: a fresh timer or waiter list entry per frame would
    // be registered and removed again every time another branch wins.
    let shutdown = sh.shutdown.cancelled();
    let expired = tokio::time::sleep_until(expiry);
    let overflow = outbox.overflow.notified();
    tokio::pin!(shutdown, expired, overflow);

    while end.is_none() {
        let step = tokio::select! {
            biased;
            _ = &mut shutdown => Some(End::Close(close::SHUTTING_DOWN)),
            _ = &mut expired => Some(End::Close(close::TOKEN_EXPIRED)),
            _ = &mut overflow => Some(slow_consumer()),
            m = outbox_rx.recv_stamped() => match m {
                Some((m, queued_at)) => {
                    outbox.taken(&m);
                    // A write blocked on a peer that stopped reading must not hide the
                    // overflow: whatever is half-written stays buffered ahead of the close.
                    // The same waiter as above: a second one would not get `notify_one`.
                    tokio::select! {
                        r = Box::pin(write_batch(&mut tx, (m, queued_at), &mut outbox_rx, &outbox, &sh.metrics)) => {
                            r.err().map(|()| End::Gone)
                        }
                        _ = &mut overflow => Some(slow_consumer()),
                    }
                }
                None => Some(End::Gone),
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > sh.cfg.idle_timeout {
                    Some(End::Close(close::IDLE))
                } else {
                    Box::pin(send(&mut tx, Message::Ping(Bytes::new()))).await.err().map(|()| End::Gone)
                }
            }
            m = rx.next() => {
                last_heard = tokio::time::Instant::now();
                match m {
                    Some(Ok(m)) => Box::pin(on_message(&sh, &id, &mut limiter, &mut tx, m)).await,
                    Some(Err(e)) if is_too_big(&e) => Some(End::Close(close::TOO_BIG)),
                    Some(Err(tungstenite::Error::Utf8(_))) => Some(End::Close(close::INVALID_UTF8)),
                    Some(Err(tungstenite::Error::Protocol(e))) => {
                        debug!(error = %e, "protocol error");
                        Some(End::Close(close::PROTOCOL_ERROR))
                    }
                    Some(Err(e)) => {
                        debug!(error = %e, "socket error");
                        Some(End::Gone)
                    }
                    None => Some(End::Gone),
                }
            }
        };
        end = step;
    }

    let code = match end {
        Some(End::Close(c)) => {
            if c == close::SLOW_CONSUMER {
                sh.metrics.slow_consumer();
            }
            Box::pin(send_close(&mut tx, c)).await;
            c.code
        }
        Some(End::ClientClosed) => {
            let _ = tokio::time::timeout(WRITE_TIMEOUT, Box::pin(tx.flush())).await;
            close::NORMAL
        }
        _ => close::NORMAL,
    };
    sh.leave(user, conn_id.as_u128());
    if opened {
        sh.metrics.connection_closed();
    }
    info!(close_code = code, duration_ms = started.elapsed().as_millis() as u64, "disconnected");
}

fn slow_consumer() -> End {
    End::Close(close::SLOW_CONSUMER)
}

/// Most frames written before one flush.
const MAX_BATCH: usize = 32;

/// Writes `first` and whatever else is already queued (up to [`MAX_BATCH`]) with one flush,
/// so a busy connection costs one socket write per batch rather than per frame.
async fn write_batch<S>(
    tx: &mut S,
    first: (Message, std::time::Instant),
    rx: &mut OutboxRx,
    outbox: &Outbox,
    metrics: &Metrics,
) -> Result<(), ()>
where
    S: futures_util::Sink<Message, Error = tungstenite::Error> + Unpin,
{
    let mut stamps = [first.1; MAX_BATCH];
    let write = async {
        tx.feed(first.0).await?;
        let mut n = 1;
        while n < MAX_BATCH {
            let Some((m, at)) = rx.try_recv_stamped() else { break };
            outbox.taken(&m);
            stamps[n] = at;
            n += 1;
            tx.feed(m).await?;
        }
        tx.flush().await?;
        Ok::<usize, tungstenite::Error>(n)
    };
    let n = with_deadline(write).await?;
    for at in &stamps[..n] {
        metrics.delivery_latency(*at);
    }
    Ok(())
}

/// Runs one socket write with [`WRITE_TIMEOUT`]; a failure or timeout is logged and means
/// the peer is gone.
async fn with_deadline<T>(write: impl std::future::Future<Output = Result<T, tungstenite::Error>>) -> Result<T, ()> {
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            debug!(error = %e, "write failed");
            Err(())
        }
        Err(_) => {
            info!("write timed out");
            Err(())
        }
    }
}

async fn send<S>(tx: &mut S, m: Message) -> Result<(), ()>
where
    S: futures_util::Sink<Message, Error = tungstenite::Error> + Unpin,
{
    with_deadline(tx.send(m)).await
}

fn is_too_big(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Capacity(_))
}

async fn on_message<S>(sh: &Node, id: &Identity, limiter: &mut RateLimiter, tx: &mut S, m: Message) -> Option<End>
where
    S: futures_util::Sink<Message, Error = tungstenite::Error> + Unpin,
{
    let reply = match &m {
        Message::Text(text) => handle_text(sh, id, limiter, text.as_str()).await,
        Message::Binary(_) => {
            reject(sh, WireError::new(ErrorCode::BadJson, "binary frames are not accepted; send JSON text frames"))
        }
        Message::Close(_) => return Some(End::ClientClosed),
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return None,
    };
    send(tx, Message::text(reply)).await.err().map(|()| End::Gone)
}

fn reject(sh: &Node, e: WireError) -> String {
    sh.metrics.client_error(e.code);
    wire::error(&e)
}

/// Handles one text frame and returns the reply frame (`ack`, `error` or `pong`).
async fn handle_text(sh: &Node, id: &Identity, limiter: &mut RateLimiter, text: &str) -> String {
    let (to, message, cmid) = match wire::decode(text, id.broadcast) {
        Ok(ClientEvent::Ping) => return wire::PONG.to_string(),
        Ok(ClientEvent::Chat { to, message, client_message_id }) => (to, message, client_message_id),
        Err(e) => return reject(sh, e),
    };
    // Each recipient costs a token (a broadcast is one publish: one); a frame costing more
    // than what is left is refused whole, so a group send cannot run the bucket into debt. A
    // group larger than the whole bucket (a --rate-burst below 100) costs a full bucket, so
    // it is possible at all.
    let cost = match &to {
        Recipients::Many(v) => v.len().min(sh.cfg.rate_burst as usize),
        Recipients::One(_) | Recipients::All => 1,
    };
    if !limiter.try_take_at(Instant::now(), cost) {
        sh.metrics.dropped(DropReason::RateLimited);
        let mut e = WireError::new(
            ErrorCode::RateLimited,
            format!(
                "more than {} messages per second (each recipient counts; at most {} at once)",
                sh.cfg.rate_limit, sh.cfg.rate_burst
            ),
        );
        e.client_message_id = cmid;
        return reject(sh, e);
    }
    sh.metrics.ws_message_in();
    match sh.publish(&id.user_id, &to, message, cmid.as_deref()).await {
        Ok(msg_id) => wire::ack(&msg_id, cmid.as_deref()),
        Err(_) => {
            let mut e = WireError::new(
                ErrorCode::Unavailable,
                "the broker did not accept the message in time; it was not sent",
            );
            e.client_message_id = cmid;
            reject(sh, e)
        }
    }
}

/// The session's timers and rate accounting on paused time: a session runs over an in-memory
/// pipe against a bus on a fake MQTT link ([`crate::bus::fake`]). The client side is read and
/// written as raw WebSocket frames, so nothing answers the server's Pings unless the test does.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::fake::{config, FakeLink};
    use crate::hub::Hub;
    use serde_json::{json, Value};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::task::JoinHandle;
    use tokio::time::Instant as TokioInstant;
    use tokio_util::sync::CancellationToken;

    const OP_TEXT: u8 = 0x1;
    const OP_CLOSE: u8 = 0x8;
    const OP_PING: u8 = 0x9;
    const OP_PONG: u8 = 0xA;

    /// Reads `r` to its end through `buf` (reads of at most its size), appending to `got`.
    async fn read_to_end_by(r: &mut (impl tokio::io::AsyncRead + Unpin), buf: &mut [u8], got: &mut Vec<u8>) {
        loop {
            let n = r.read(buf).await.unwrap();
            if n == 0 {
                return;
            }
            got.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn spill_read_hands_over_a_large_read_in_small_pieces_and_keeps_nothing_after() {
        let (mut a, b) = tokio::io::duplex(64 * 1024);
        let data: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        a.write_all(&data).await.unwrap();
        drop(a);
        let mut r = SpillRead::new(b);
        let mut got = Vec::new();
        read_to_end_by(&mut r, &mut [0u8; READ_BUFFER], &mut got).await;
        assert_eq!(got, data);
        assert!(r.spill.is_none(), "nothing kept once everything was taken");
    }

    /// A socket as the kernel hands it over: segments of any size, `Pending` between some of
    /// them, then EOF or an error. A segment larger than the reader's buffer is split.
    enum Seg {
        Data(Vec<u8>),
        Pending,
        Fail,
    }

    struct Wire(std::collections::VecDeque<Seg>);

    impl tokio::io::AsyncRead for Wire {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            match self.0.pop_front() {
                None => std::task::Poll::Ready(Ok(())),
                Some(Seg::Pending) => {
                    cx.waker().wake_by_ref();
                    std::task::Poll::Pending
                }
                Some(Seg::Fail) => std::task::Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into())),
                Some(Seg::Data(mut d)) => {
                    let n = d.len().min(buf.remaining());
                    buf.put_slice(&d[..n]);
                    if n < d.len() {
                        self.0.push_front(Seg::Data(d.split_off(n)));
                    }
                    std::task::Poll::Ready(Ok(()))
                }
            }
        }
    }

    impl tokio::io::AsyncWrite for Wire {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            b: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// A client frame, masked with a key that changes the payload.
    fn masked(op: u8, payload: &[u8]) -> Vec<u8> {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![0x80 | op];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65_536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        f
    }

    /// Everything a session reads through [`SpillRead`] with the service's own config, until
    /// the stream ends or fails: the messages, and whether it failed.
    async fn read_all(segs: Vec<Seg>) -> (Vec<Message>, bool, bool) {
        let cfg = config(&[]);
        let io = SpillRead::new(Wire(segs.into()));
        let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config(&cfg))).await;
        let mut got = Vec::new();
        let failed = loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("the read hung") {
                Some(Ok(m)) => got.push(m),
                Some(Err(_)) => break true,
                None => break false,
            }
        };
        (got, failed, ws.get_ref().spill.is_none())
    }

    #[tokio::test]
    async fn spill_read_under_tungstenite_delivers_small_and_max_size_frames_split_anywhere() {
        let max = config(&[]).max_message_bytes;
        let mut want = Vec::new();
        // Many small frames in one TCP segment (more than one READ_CHUNK of them).
        let mut burst = Vec::new();
        for i in 0..3000 {
            let m = format!("m{i}");
            burst.extend(masked(OP_TEXT, m.as_bytes()));
            want.push(Message::text(m));
        }
        assert!(burst.len() > 2 * READ_CHUNK);
        let mut segs = vec![Seg::Data(burst)];
        // Frames of the largest allowed size (and around the chunk sizes), cut at every
        // awkward length, with the socket not ready in between.
        let cuts = [1, 7, 511, 512, 513, 8191, 8192, 8193, 20_000];
        for (k, len) in [max, READ_CHUNK - 1, READ_CHUNK, READ_CHUNK + 1, READ_BUFFER, max - 1].into_iter().enumerate()
        {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 + k) as u8).collect();
            let mut f = masked(0x2, &payload);
            want.push(Message::binary(payload));
            let mut c = 0;
            while !f.is_empty() {
                let n = cuts[c % cuts.len()].min(f.len());
                let rest = f.split_off(n);
                segs.push(Seg::Data(f));
                f = rest;
                if c % 3 == 0 {
                    segs.push(Seg::Pending);
                }
                c += 1;
            }
        }
        // A small frame glued to the end of a large one's last piece, and a close.
        let mut tail = masked(OP_TEXT, b"after");
        want.push(Message::text("after"));
        tail.extend(masked(OP_CLOSE, &1000u16.to_be_bytes()));
        segs.push(Seg::Data(tail));
        let (got, _, clean) = read_all(segs).await;
        assert_eq!(got.len(), want.len() + 1, "every frame and the close");
        assert!(got[..want.len()] == want[..], "payloads intact and in order");
        assert!(matches!(got[want.len()], Message::Close(_)));
        assert!(clean, "nothing kept once read");
    }

    #[tokio::test]
    async fn spill_read_under_tungstenite_ends_on_eof_mid_frame_and_on_a_socket_error() {
        let frame = masked(0x2, &vec![9u8; 40_000]);
        // EOF in the middle of a frame, with a spill pending when it comes.
        let (got, failed, _) =
            read_all(vec![Seg::Data(masked(OP_TEXT, b"x")), Seg::Data(frame[..20_000].to_vec())]).await;
        assert_eq!(got, [Message::text("x")]);
        assert!(failed, "a truncated frame is an error, not a message");
        // A reset after part of a frame.
        let (got, failed, _) = read_all(vec![
            Seg::Data(frame[..9000].to_vec()),
            Seg::Pending,
            Seg::Fail,
            Seg::Data(frame[9000..].to_vec()),
        ])
        .await;
        assert!(got.is_empty());
        assert!(failed);
    }

    #[tokio::test]
    async fn spill_read_hands_a_spill_over_before_reading_on_with_a_large_buffer() {
        let data: Vec<u8> = (0..30_000u32).map(|i| (i % 251) as u8).collect();
        let mut r =
            SpillRead::new(Wire(vec![Seg::Data(data[..10_000].to_vec()), Seg::Data(data[10_000..].to_vec())].into()));
        let mut got = vec![0u8; 100];
        let n = r.read(&mut got).await.unwrap();
        got.truncate(n);
        // Buffers at least READ_CHUNK read the socket directly, but only after the spill.
        read_to_end_by(&mut r, &mut vec![0u8; 3 * READ_CHUNK], &mut got).await;
        assert_eq!(got, data);
        assert!(r.spill.is_none());
    }

    struct Harness {
        node: Arc<Node>,
        link: FakeLink,
    }

    /// The client end of one session: raw frames, timed on tokio's (paused) clock.
    struct Peer {
        io: DuplexStream,
        task: JoinHandle<()>,
    }

    fn harness(args: &[&str]) -> Harness {
        let cfg = Arc::new(config(args));
        let hub = Arc::new(Hub::new());
        let metrics = Arc::new(Metrics::new("t"));
        let shutdown = CancellationToken::new();
        let mut link = FakeLink::new(&cfg, hub.clone(), metrics.clone(), shutdown.clone());
        link.up();
        Harness { node: Arc::new(Node { cfg, hub, bus: link.bus.clone(), metrics, shutdown }), link }
    }

    impl Harness {
        /// Starts a session for `user` (token valid until `exp`, Unix seconds) over a pipe of
        /// `pipe` bytes, confirms its SUBSCRIBE and reads `connected`.
        async fn connect(&mut self, user: &str, exp: u64, pipe: usize) -> Peer {
            let (client, server) = tokio::io::duplex(pipe);
            let ws = WebSocketStream::from_raw_socket(server, Role::Server, Some(ws_config(&self.node.cfg))).await;
            let id = Identity { user_id: user.to_string(), expires_at: exp, broadcast: false };
            let task = tokio::spawn(run(ws, id, uuid::Uuid::new_v4(), self.node.clone()));
            assert_eq!(self.link.confirm_next_subscribe().await, [format!("msg/{user}")]);
            let mut peer = Peer { io: client, task };
            let hello = peer.json().await;
            assert_eq!(hello["event"], json!("connected"), "{hello}");
            peer
        }
    }

    fn in_an_hour() -> u64 {
        crate::clock::unix_now() + 3600
    }

    impl Peer {
        /// The next frame the server wrote: opcode and payload.
        async fn frame(&mut self) -> (u8, Vec<u8>) {
            let mut head = [0u8; 2];
            self.io.read_exact(&mut head).await.expect("the server ended the connection");
            assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
            let len = match head[1] & 0x7f {
                126 => self.io.read_u16().await.unwrap() as usize,
                127 => self.io.read_u64().await.unwrap() as usize,
                n => n as usize,
            };
            let mut payload = vec![0; len];
            self.io.read_exact(&mut payload).await.unwrap();
            (head[0] & 0x0f, payload)
        }

        /// The next frame, which must be a JSON text frame.
        async fn json(&mut self) -> Value {
            let (op, payload) = self.frame().await;
            assert_eq!(op, OP_TEXT, "expected a text frame, got opcode {op}");
            serde_json::from_slice(&payload).unwrap()
        }

        /// The next frame must be a close: its code and reason.
        async fn close(&mut self) -> (u16, String) {
            let (op, payload) = self.frame().await;
            assert_eq!(op, OP_CLOSE, "expected a close frame, got opcode {op}: {payload:?}");
            (u16::from_be_bytes([payload[0], payload[1]]), String::from_utf8_lossy(&payload[2..]).into_owned())
        }

        /// Writes one client frame (masked with a zero key, so the payload goes as is).
        async fn send(&mut self, op: u8, payload: &[u8]) {
            assert!(payload.len() < 126);
            let mut f = vec![0x80 | op, 0x80 | payload.len() as u8, 0, 0, 0, 0];
            f.extend_from_slice(payload);
            self.io.write_all(&f).await.unwrap();
        }

        async fn send_json(&mut self, v: Value) {
            self.send(OP_TEXT, v.to_string().as_bytes()).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pings_every_20s_and_a_silent_peer_is_closed_1001_at_the_first_tick_past_60s() {
        let mut h = harness(&[]);
        let mut peer = h.connect("quiet", in_an_hour(), 64 * 1024).await;
        let t0 = TokioInstant::now();
        for n in 1..=3 {
            assert_eq!(peer.frame().await, (OP_PING, vec![]));
            assert_eq!(t0.elapsed(), Duration::from_secs(20 * n), "ping {n}");
        }
        // Silent for exactly 60 s at the third tick: not more than 60 s yet.
        assert_eq!(peer.close().await, (1001, "idle timeout".to_string()));
        assert_eq!(t0.elapsed(), Duration::from_secs(80));
        peer.task.await.unwrap();
        assert_eq!(h.node.hub.connections(), 0, "the session left the hub");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_answers_pings_stays_and_anything_it_sends_counts_as_life() {
        let mut h = harness(&[]);
        let mut peer = h.connect("chatty", in_an_hour(), 64 * 1024).await;
        let t0 = TokioInstant::now();
        for n in 1..=10 {
            assert_eq!(peer.frame().await, (OP_PING, vec![]));
            assert_eq!(t0.elapsed(), Duration::from_secs(20 * n));
            peer.send(OP_PONG, b"").await;
        }
        // Silent from 200 s on, except for one `ping` event at 230 s.
        assert_eq!(peer.frame().await, (OP_PING, vec![]));
        tokio::time::sleep_until(t0 + Duration::from_secs(230)).await;
        peer.send_json(json!({"event": "ping"})).await;
        assert_eq!(peer.json().await, json!({"event": "pong", "data": {}}));
        for at in [240, 260, 280] {
            assert_eq!(peer.frame().await, (OP_PING, vec![]));
            assert_eq!(t0.elapsed(), Duration::from_secs(at));
        }
        // At 300 s the peer has been silent for 70 s.
        assert_eq!(peer.close().await, (1001, "idle timeout".to_string()));
        assert_eq!(t0.elapsed(), Duration::from_secs(300));
    }

    #[tokio::test(start_paused = true)]
    async fn the_token_expiry_closes_with_4001_at_exp_to_the_millisecond() {
        let mut h = harness(&[]);
        let exp = crate::clock::unix_now() + 30;
        let before = crate::clock::unix_millis();
        let mut peer = h.connect("expiring", exp, 64 * 1024).await;
        let after = crate::clock::unix_millis();
        let t0 = TokioInstant::now();
        assert_eq!(peer.frame().await, (OP_PING, vec![]), "the 20 s ping comes first");
        assert_eq!(peer.close().await, (4001, "token expired".to_string()));
        // The session measured the time left with the wall clock at some moment between
        // `before` and `after`; its timer runs on tokio's clock from then.
        let at = t0.elapsed().as_millis() as u64;
        assert!(
            (exp * 1000 - after..=exp * 1000 - before).contains(&at),
            "closed {at} ms after connecting; exp was {} to {} ms away",
            exp * 1000 - after,
            exp * 1000 - before
        );
        peer.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_does_not_finish_in_10s_drops_the_connection() {
        let mut h = harness(&[]);
        // A 4 KiB pipe the client never reads from again: a 64 KiB frame cannot be written.
        let peer = h.connect("stuck", in_an_hour(), 4096).await;
        assert_eq!(h.node.hub.connections(), 1);
        let t0 = TokioInstant::now();
        let frame = Message::text("x".repeat(64 * 1024));
        h.node.hub.deliver("stuck", None, &frame).expect("stuck is held here");
        peer.task.await.unwrap();
        assert_eq!(t0.elapsed(), Duration::from_secs(10), "the write deadline");
        assert_eq!(h.node.hub.connections(), 0, "the session left the hub");
    }

    #[tokio::test(start_paused = true)]
    async fn pings_and_rejected_frames_cost_no_rate_tokens() {
        // A bucket of 3 that practically never refills.
        let mut h = harness(&["--rate-limit", "0.001", "--rate-burst", "3"]);
        let mut peer = h.connect("alice", in_an_hour(), 64 * 1024).await;
        for i in 0..20 {
            peer.send_json(json!({"event": "ping"})).await;
            assert_eq!(peer.json().await["event"], json!("pong"), "ping {i}");
            peer.send_json(
                json!({"event": "send_chat_message_to_participant", "data": {"participantId": "a/b", "message": 1}}),
            )
            .await;
            assert_eq!(peer.json().await["data"]["code"], json!("invalid_participant"), "bad frame {i}");
            peer.send(OP_PING, b"p").await;
            assert_eq!(peer.frame().await, (OP_PONG, b"p".to_vec()));
        }
        let chat = |c: &str| json!({"event": "send_chat_message_to_participant", "data": {"participantId": "bob", "message": 1, "clientMessageId": c}});
        for c in ["c1", "c2", "c3"] {
            peer.send_json(chat(c)).await;
            let v = peer.json().await;
            assert_eq!((&v["event"], &v["data"]["clientMessageId"]), (&json!("ack"), &json!(c)), "{v}");
        }
        peer.send_json(chat("c4")).await;
        let v = peer.json().await;
        assert_eq!(v["data"]["code"], json!("rate_limited"), "{v}");
        let published = h.link.drain().into_iter().filter(|r| matches!(r, rumqttc::Request::Publish(_))).count();
        assert_eq!(published, 3);
    }
}
