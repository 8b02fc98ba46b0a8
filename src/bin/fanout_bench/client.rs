//! WebSocket clients of the generator: connect from a chosen loopback source address, wait for
//! `connected`, then a writer task (fed by a channel) and a reader task that timestamps every
//! `chat_message` it receives.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

pub fn new_hist() -> Histogram<u64> {
    // Microseconds, 1 µs .. 120 s, 3 significant digits.
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

/// Counters of one measurement step; `step` tags messages so late ones from an earlier step
/// are not counted in this one.
pub struct Stats {
    pub epoch: Instant,
    pub step: AtomicU64,
    pub hist: Mutex<Histogram<u64>>,
    pub delivered: AtomicU64,
    pub stale: AtomicU64,
    pub acks: AtomicU64,
    pub errors: AtomicU64,
    pub closed: AtomicU64,
}

impl Stats {
    pub fn new(epoch: Instant) -> Arc<Stats> {
        Arc::new(Stats {
            epoch,
            step: AtomicU64::new(0),
            hist: Mutex::new(new_hist()),
            delivered: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            closed: AtomicU64::new(0),
        })
    }

    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Starts a new step: clears counters and the histogram.
    pub fn reset(&self, step: u64) {
        self.step.store(step, Relaxed);
        self.hist.lock().reset();
        for c in [&self.delivered, &self.stale, &self.acks, &self.errors] {
            c.store(0, Relaxed);
        }
    }

    /// Records one received message stamped `t_us` (scheduled send time) of step `step`.
    pub fn record(&self, t_us: u64, step: u64) {
        if step != self.step.load(Relaxed) {
            self.stale.fetch_add(1, Relaxed);
            return;
        }
        let lat = self.now_us().saturating_sub(t_us).max(1);
        self.hist.lock().saturating_record(lat);
        self.delivered.fetch_add(1, Relaxed);
    }
}

/// The benchmark's payload inside `message`: scheduled send time (µs since the bench epoch),
/// step and sequence number, padded with `p` to the requested size.
#[derive(Deserialize)]
pub struct Stamp {
    pub t: u64,
    pub r: u64,
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    event: &'a str,
    data: Option<FrameData>,
}

#[derive(Deserialize)]
struct FrameData {
    message: Option<Stamp>,
}

pub enum Inbound {
    Chat(Stamp),
    Ack,
    Error,
    Connected,
    Other,
}

pub fn classify(text: &str) -> Inbound {
    match serde_json::from_str::<Frame>(text) {
        Ok(f) => match f.event {
            "chat_message" => match f.data.and_then(|d| d.message) {
                Some(s) => Inbound::Chat(s),
                None => Inbound::Other,
            },
            "ack" => Inbound::Ack,
            "error" => Inbound::Error,
            "connected" => Inbound::Connected,
            _ => Inbound::Other,
        },
        Err(_) => Inbound::Other,
    }
}

pub fn message_json(t_us: u64, step: u64, seq: u64, size: usize) -> String {
    let head = format!("{{\"t\":{t_us},\"r\":{step},\"s\":{seq},\"p\":\"");
    let pad = size.saturating_sub(head.len() + 2);
    let mut s = String::with_capacity(head.len() + pad + 2);
    s.push_str(&head);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

pub fn chat_frame(to: &str, message: &str) -> String {
    format!("{{\"event\":\"send_chat_message_to_participant\",\"data\":{{\"participantId\":\"{to}\",\"message\":{message}}}}}")
}

fn ws_config() -> WebSocketConfig {
    // Small buffers: the generator holds as many sockets as the instance under test.
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0)
}

/// Opens one authenticated WebSocket from `src` and waits for `connected`.
pub async fn connect(src: IpAddr, dst: SocketAddr, token: &str, timeout: Duration) -> Result<Ws, String> {
    let fut = async {
        let sock = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        sock.bind(SocketAddr::new(src, 0)).map_err(|e| format!("bind {src}: {e}"))?;
        let tcp = sock.connect(dst).await.map_err(|e| format!("connect: {e}"))?;
        tcp.set_nodelay(true).ok();
        let url = format!("ws://{dst}/entrypoint?token={token}");
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(ws_config()))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        while let Some(m) = ws.next().await {
            match m.map_err(|e| format!("before connected: {e}"))? {
                Message::Text(t) => match classify(t.as_str()) {
                    Inbound::Connected => return Ok(ws),
                    _ => return Err(format!("unexpected first frame {}", t.as_str())),
                },
                Message::Close(c) => return Err(format!("closed before connected: {c:?}")),
                _ => {}
            }
        }
        Err("eof before connected".to_string())
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| "timeout waiting for connected".to_string())?
}

/// A running connection: send text frames with `tx`; drop it (or `close`) to close.
pub struct Conn {
    pub tx: mpsc::UnboundedSender<String>,
}

/// Splits `ws` into a writer task fed by the returned channel and a reader task that reports
/// into `stats`.
pub fn run(ws: Ws, stats: Arc<Stats>) -> Conn {
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            if sink.feed(Message::text(first)).await.is_err() {
                return;
            }
            // Batch what is already queued into one flush.
            while let Ok(more) = rx.try_recv() {
                if sink.feed(Message::text(more)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    tokio::spawn(async move {
        while let Some(m) = stream.next().await {
            match m {
                Ok(Message::Text(t)) => match classify(t.as_str()) {
                    Inbound::Chat(s) => stats.record(s.t, s.r),
                    Inbound::Ack => {
                        stats.acks.fetch_add(1, Relaxed);
                    }
                    Inbound::Error => {
                        stats.errors.fetch_add(1, Relaxed);
                    }
                    _ => {}
                },
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        stats.closed.fetch_add(1, Relaxed);
    });
    Conn { tx }
}
