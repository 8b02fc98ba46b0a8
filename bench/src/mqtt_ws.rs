//! The no-tier floor's clients: each user speaks MQTT 3.1.1 over a WebSocket straight to
//! Mosquitto's `protocol websockets` listener (subprotocol `mqtt`), the way a browser with an
//! MQTT library would. Packets are encoded and decoded by rumqttc's codec
//! (`rumqttc::mqttbytes::v4`); this module only moves them: CONNECT → CONNACK, SUBSCRIBE to the
//! user's own topic at QoS 1 → SUBACK, then PUBLISH QoS 1 to recipients (their PUBACKs counted
//! as acks) and a PUBACK for every PUBLISH received.
//!
//! Same shape as the fanout client ([`crate::client`]) so that both sides cost the generator
//! alike: a writer task fed by a channel, one WebSocket message per packet, everything already
//! queued written with one flush, and a reader task that timestamps what arrives.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck, Publish, Subscribe, SubscribeReasonCode};
use rumqttc::mqttbytes::{Error as MqttError, QoS};
use rumqttc::ConnectReturnCode;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::WebSocketStream;

use crate::stats::{classify, Inbound, Stats};

pub type Ws = WebSocketStream<TcpStream>;

/// Largest MQTT packet accepted or sent.
const MAX_PACKET: usize = 1 << 20;

fn ws_config() -> WebSocketConfig {
    // As the fanout client: small buffers, the generator holds many sockets.
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0)
}

fn encode(p: &Packet) -> Result<Bytes, String> {
    let mut buf = bytes::BytesMut::with_capacity(p.size() + 5);
    p.write(&mut buf, MAX_PACKET).map_err(|e| format!("encode: {e}"))?;
    Ok(buf.freeze())
}

/// Reads the next MQTT packet, taking WebSocket messages into `buf` as needed (a packet may
/// span messages, a message may hold several packets).
async fn next_packet(ws: &mut Ws, buf: &mut bytes::BytesMut) -> Result<Packet, String> {
    loop {
        match Packet::read(buf, MAX_PACKET) {
            Ok(p) => return Ok(p),
            Err(MqttError::InsufficientBytes(_)) => {}
            Err(e) => return Err(format!("decode: {e}")),
        }
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => buf.extend_from_slice(&b),
            Some(Ok(Message::Close(c))) => return Err(format!("closed: {c:?}")),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("eof".into()),
        }
    }
}

/// Opens one MQTT-over-WebSocket session for `client_id` from `src` to Mosquitto's websockets
/// listener at `dst`, subscribed to `topic` at QoS 1. MQTT keep-alive is off (0): the runs are
/// short, and the generator sends no PINGREQs that fanout's clients would not send either.
pub async fn connect(
    src: IpAddr,
    dst: SocketAddr,
    client_id: &str,
    topic: &str,
    timeout: Duration,
) -> Result<Ws, String> {
    let fut = async {
        let sock = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        sock.bind(SocketAddr::new(src, 0)).map_err(|e| format!("bind {src}: {e}"))?;
        let tcp = sock.connect(dst).await.map_err(|e| format!("connect: {e}"))?;
        tcp.set_nodelay(true).ok();
        let mut req = format!("ws://{dst}/mqtt").into_client_request().map_err(|e| e.to_string())?;
        req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(req, tcp, Some(ws_config()))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let mut connect = Connect::new(client_id);
        connect.keep_alive = 0;
        connect.clean_session = true;
        ws.send(Message::Binary(encode(&Packet::Connect(connect))?)).await.map_err(|e| e.to_string())?;
        let mut buf = bytes::BytesMut::new();
        match next_packet(&mut ws, &mut buf).await? {
            Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => {}
            p => return Err(format!("expected CONNACK success, got {p:?}")),
        }
        let mut sub = Subscribe::new(topic, QoS::AtLeastOnce);
        sub.pkid = 1;
        ws.send(Message::Binary(encode(&Packet::Subscribe(sub))?)).await.map_err(|e| e.to_string())?;
        match next_packet(&mut ws, &mut buf).await? {
            Packet::SubAck(a) if a.return_codes.iter().all(|c| *c != SubscribeReasonCode::Failure) => {}
            p => return Err(format!("expected SUBACK, got {p:?}")),
        }
        if !buf.is_empty() {
            return Err("unexpected bytes after SUBACK".into());
        }
        Ok(ws)
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| "timeout waiting for CONNACK/SUBACK".to_string())?
}

enum Out {
    Publish { topic: String, payload: Vec<u8> },
    PubAck(u16),
}

/// A running session: [`MqttConn::publish`] sends QoS 1; dropping it sends DISCONNECT and
/// closes the WebSocket.
pub struct MqttConn {
    tx: mpsc::UnboundedSender<Out>,
}

impl MqttConn {
    /// Queues a QoS 1 PUBLISH; false when the session is gone.
    pub fn publish(&self, topic: String, payload: Vec<u8>) -> bool {
        self.tx.send(Out::Publish { topic, payload }).is_ok()
    }
}

/// Splits `ws` into a writer task fed by the returned handle and a reader task that reports
/// into `stats` (chat messages received, PUBACKs as acks) and answers every QoS 1 PUBLISH.
pub fn run(ws: Ws, stats: Arc<Stats>) -> MqttConn {
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Out>();
    // The reader holds a weak handle so that dropping the MqttConn still ends the writer.
    let acker = tx.downgrade();
    let writer_stats = stats.clone();
    tokio::spawn(async move {
        // Packet id 1 went to SUBSCRIBE (acknowledged); PUBLISHes use 1..=65535 in turn.
        let mut pkid: u16 = 0;
        let mut packet = |o: Out| -> Result<Message, String> {
            let p = match o {
                Out::Publish { topic, payload } => {
                    pkid = pkid.checked_add(1).unwrap_or(1);
                    let mut p = Publish::new(topic, QoS::AtLeastOnce, payload);
                    p.pkid = pkid;
                    Packet::Publish(p)
                }
                Out::PubAck(id) => Packet::PubAck(PubAck::new(id)),
            };
            Ok(Message::Binary(encode(&p)?))
        };
        while let Some(first) = rx.recv().await {
            let Ok(m) = packet(first) else {
                writer_stats.errors.fetch_add(1, Relaxed);
                continue;
            };
            if sink.feed(m).await.is_err() {
                return;
            }
            // Batch what is already queued into one flush.
            while let Ok(more) = rx.try_recv() {
                let Ok(m) = packet(more) else {
                    writer_stats.errors.fetch_add(1, Relaxed);
                    continue;
                };
                if sink.feed(m).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        if let Ok(bye) = encode(&Packet::Disconnect) {
            let _ = sink.send(Message::Binary(bye)).await;
        }
        let _ = sink.close().await;
    });
    tokio::spawn(async move {
        let mut buf = bytes::BytesMut::new();
        'read: while let Some(m) = stream.next().await {
            match m {
                Ok(Message::Binary(b)) => {
                    buf.extend_from_slice(&b);
                    loop {
                        match Packet::read(&mut buf, MAX_PACKET) {
                            Ok(Packet::Publish(p)) => {
                                if let Ok(t) = std::str::from_utf8(&p.payload) {
                                    if let Inbound::Chat(s) = classify(t) {
                                        stats.record(&s);
                                    }
                                }
                                if p.qos == QoS::AtLeastOnce {
                                    if let Some(tx) = acker.upgrade() {
                                        let _ = tx.send(Out::PubAck(p.pkid));
                                    }
                                }
                            }
                            Ok(Packet::PubAck(_)) => {
                                stats.acks.fetch_add(1, Relaxed);
                            }
                            Ok(_) => {}
                            Err(MqttError::InsufficientBytes(_)) => break,
                            Err(_) => {
                                stats.errors.fetch_add(1, Relaxed);
                                break 'read;
                            }
                        }
                    }
                }
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        stats.closed.fetch_add(1, Relaxed);
    });
    MqttConn { tx }
}
