//! fanout's WebSocket clients in the generator: connect from a chosen loopback source address,
//! wait for `connected`, then a writer task (fed by a channel) and a reader task that timestamps
//! every `chat_message` it receives.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::stats::{classify, Inbound, Stats};

pub type Ws = WebSocketStream<TcpStream>;

/// The claims `fanout token` (`Verifier::mint`) signs: user, issued-at, expiry.
#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
}

/// HS256 tokens for `users`, valid for four hours.
pub fn tokens(secret: &str, users: &[String]) -> Result<Vec<String>, String> {
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).map_err(|e| e.to_string())?;
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    users
        .iter()
        .map(|u| {
            let claims = Claims { sub: u, iat: now, exp: now + 4 * 3600 };
            jsonwebtoken::encode(&header, &claims, &key).map_err(|e| e.to_string())
        })
        .collect()
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
                    Inbound::Chat(s) => stats.record(&s),
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
