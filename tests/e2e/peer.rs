//! A WebSocket client whose frames are collected by a background reader (so senders and
//! receivers run concurrently), and the checks built on it: acks, deliveries, order, closes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::support::ws::Ws;
use crate::support::{get, Instance, InstanceOpts};

pub struct Peer {
    pub name: String,
    pub sink: SplitSink<Ws, Message>,
    pub frames: Arc<Mutex<Vec<Value>>>,
    /// The close code and when the connection ended (1006: without a close frame).
    pub close: Arc<Mutex<Option<(u16, Instant)>>>,
    /// Every chat message sent with [`Peer::send_to`]: client message id and when.
    pub sent: Vec<(String, Instant)>,
}

impl Peer {
    pub async fn connect(inst: &Instance, user: &str) -> Peer {
        Peer::from_client(inst.connect(user).await, user)
    }

    /// A peer over a client that is already connected (e.g. with a broadcast token).
    pub fn from_client(c: crate::support::Client, user: &str) -> Peer {
        let (sink, stream) = c.ws.split();
        let frames = Arc::new(Mutex::new(Vec::new()));
        let close = Arc::new(Mutex::new(None));
        tokio::spawn(read_all_frames(stream, frames.clone(), close.clone()));
        Peer { name: user.to_string(), sink, frames, close, sent: Vec::new() }
    }

    /// Sends one chat message to `to` whose client message id is `cmid`; false when the socket
    /// no longer takes frames.
    pub async fn send_to(&mut self, to: &str, cmid: &str) -> bool {
        let f = json!({"event": "send_chat_message_to_participant",
            "data": {"participantId": to, "message": {"seq": cmid}, "clientMessageId": cmid}});
        self.sent.push((cmid.to_string(), Instant::now()));
        self.sink.send(Message::text(f.to_string())).await.is_ok()
    }

    pub async fn send_json(&mut self, v: Value) {
        self.sink.send(Message::text(v.to_string())).await.expect("send");
    }

    pub fn events(&self, event: &str) -> Vec<Value> {
        self.frames.lock().iter().filter(|v| v["event"] == json!(event)).map(|v| v["data"].clone()).collect()
    }

    /// Message ids of acked messages by client message id.
    pub fn acks(&self) -> HashMap<String, String> {
        self.events("ack")
            .into_iter()
            .map(|d| (d["clientMessageId"].as_str().unwrap().to_string(), d["id"].as_str().unwrap().to_string()))
            .collect()
    }

    pub fn received_ids(&self) -> Vec<String> {
        self.events("chat_message").into_iter().filter_map(|d| d["id"].as_str().map(String::from)).collect()
    }

    /// The `clientMessageId`s of the chat messages received, in arrival order.
    pub fn received_cmids(&self) -> Vec<String> {
        self.events("chat_message").iter().filter_map(|d| d["clientMessageId"].as_str().map(String::from)).collect()
    }

    /// The close code, once the connection ended (1006: without a close frame).
    pub fn closed(&self) -> Option<u16> {
        self.close.lock().map(|(code, _)| code)
    }

    /// When the connection ended.
    pub fn closed_at(&self) -> Option<Instant> {
        self.close.lock().map(|(_, at)| at)
    }
}

async fn read_all_frames(
    mut s: SplitStream<Ws>,
    frames: Arc<Mutex<Vec<Value>>>,
    close: Arc<Mutex<Option<(u16, Instant)>>>,
) {
    while let Some(m) = s.next().await {
        match m {
            Ok(Message::Text(t)) => {
                if let Ok(v) = serde_json::from_str(&t) {
                    frames.lock().push(v);
                }
            }
            Ok(Message::Close(f)) => {
                *close.lock() = Some((f.map(|f| u16::from(f.code)).unwrap_or(1005), Instant::now()));
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    close.lock().get_or_insert((1006, Instant::now()));
}

/// No rate limit in the way of test traffic.
pub fn unlimited(o: InstanceOpts) -> InstanceOpts {
    o.args(["--rate-limit", "100000", "--rate-burst", "100000"])
}

pub async fn readyz(inst: &Instance) -> u16 {
    get(inst.port, "/readyz").await.map(|r| r.status).unwrap_or(0)
}

/// Every acked message of `from` whose client message id starts with `prefix` arrived exactly
/// once at `to`; how many there were.
pub fn assert_acked_delivered_once(from: &Peer, to: &Peer, prefix: &str) -> usize {
    let acks: Vec<String> = from.acks().into_iter().filter(|(c, _)| c.starts_with(prefix)).map(|(_, id)| id).collect();
    let mut count: HashMap<String, usize> = HashMap::new();
    for id in to.received_ids() {
        *count.entry(id).or_default() += 1;
    }
    for id in &acks {
        let n = count.get(id).copied().unwrap_or(0);
        assert_eq!(n, 1, "acked {prefix} message {id} from {} reached {} {n} times", from.name, to.name);
    }
    acks.len()
}

pub fn assert_no_duplicates(p: &Peer) {
    let ids = p.received_ids();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "{} received a message id twice", p.name);
}

/// The `n` messages `<prefix>00000`… arrived at `p` exactly once each, in the order sent.
pub fn assert_all_once_in_order(p: &Peer, prefix: &str, n: usize) {
    let got: Vec<String> = p.received_cmids().into_iter().filter(|c| c.starts_with(prefix)).collect();
    let want: Vec<String> = (0..n).map(|i| format!("{prefix}{i:05}")).collect();
    if got != want {
        let unique: HashSet<&String> = got.iter().collect();
        let missing = want.iter().filter(|w| !unique.contains(w)).count();
        let first_disorder = got.windows(2).position(|w| w[0] >= w[1]);
        panic!(
            "{}: got {} messages ({} distinct), {missing} missing, first out of order at {first_disorder:?}",
            p.name,
            got.len(),
            unique.len()
        );
    }
}

/// Opens a WebSocket for `user` by hand (the 101 read byte by byte) and returns the TCP stream:
/// nothing reads from it unless the test does, so frames for the user pile up in the socket
/// buffers and then the session's outbox.
pub async fn raw_websocket(inst: &Instance, user: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", inst.port)).await.unwrap();
    let req = format!(
        "GET /entrypoint HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: {}\r\n\r\n",
        inst.token(user)
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "upgrade response cut short");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

/// Like [`wait_until`] with a condition that has to await (an HTTP request, a metric).
pub async fn wait_until_async<F, Fut>(what: &str, timeout: std::time::Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
