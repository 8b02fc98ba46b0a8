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

/// Initial read buffer of a socket; it grows for larger frames.
const READ_BUFFER: usize = 4096;
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
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(ws_config(&sh.cfg))).await;
        run(ws, id, conn_id, sh).await
    }
    .instrument(span)
    .await
}

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

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
async fn run(ws: Socket, id: Identity, conn_id: uuid::Uuid, sh: Arc<Node>) {
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
    let mut last_heard = Instant::now();
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
                last_heard = Instant::now();
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
