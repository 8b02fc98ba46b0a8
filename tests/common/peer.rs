//! A WebSocket client whose frames are collected by a background reader (so senders and
//! receivers run concurrently), and the checks built on it: acks, deliveries, order, closes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::{http_get, Client, Instance, InstanceOpts, Ws};

/// A client whose frames are collected by a background reader, so senders and receivers
/// run concurrently.
pub struct Peer {
    pub name: String,
    pub sink: SplitSink<Ws, Message>,
    pub frames: Arc<Mutex<Vec<Value>>>,
    pub close: Arc<Mutex<Option<u16>>>,
}

impl Peer {
    pub async fn connect(inst: &Instance, user: &str) -> Peer {
        let c = inst.connect(user).await;
        Peer::from_client(c, user)
    }

    pub fn from_client(c: Client, user: &str) -> Peer {
        let (sink, stream) = c.ws.split();
        let frames = Arc::new(Mutex::new(Vec::new()));
        let close = Arc::new(Mutex::new(None));
        tokio::spawn(read_all_frames(stream, frames.clone(), close.clone()));
        Peer { name: user.to_string(), sink, frames, close }
    }

    pub async fn send_to(&mut self, to: &str, cmid: &str) {
        let f = json!({"event": "send_chat_message_to_participant",
            "data": {"participantId": to, "message": {"seq": cmid}, "clientMessageId": cmid}});
        self.sink.send(Message::text(f.to_string())).await.expect("send");
    }

    pub fn events(&self, event: &str) -> Vec<Value> {
        self.frames.lock().iter().filter(|v| v["event"] == json!(event)).map(|v| v["data"].clone()).collect()
    }

    /// Ids of acked messages by client message id.
    pub fn acks(&self) -> HashMap<String, String> {
        self.events("ack")
            .into_iter()
            .map(|d| (d["clientMessageId"].as_str().unwrap().to_string(), d["id"].as_str().unwrap().to_string()))
            .collect()
    }

    pub fn received_ids(&self) -> Vec<String> {
        self.events("chat_message").into_iter().filter_map(|d| d["id"].as_str().map(String::from)).collect()
    }

    pub fn closed(&self) -> Option<u16> {
        *self.close.lock()
    }
}

pub async fn read_all_frames(mut s: SplitStream<Ws>, frames: Arc<Mutex<Vec<Value>>>, close: Arc<Mutex<Option<u16>>>) {
    while let Some(m) = s.next().await {
        match m {
            Ok(Message::Text(t)) => {
                if let Ok(v) = serde_json::from_str(&t) {
                    frames.lock().push(v);
                }
            }
            Ok(Message::Close(f)) => {
                *close.lock() = Some(f.map(|f| u16::from(f.code)).unwrap_or(1005));
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    close.lock().get_or_insert(1006);
}

/// No rate limit in the way of test traffic.
pub fn unlimited(o: InstanceOpts) -> InstanceOpts {
    o.arg("--rate-limit").arg("100000").arg("--rate-burst").arg("100000")
}

pub async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn readyz(inst: &Instance) -> u16 {
    http_get(inst.port, "/readyz").await.map(|r| r.status).unwrap_or(0)
}

pub async fn wait_readyz(inst: &Instance, status: u16, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    while readyz(inst).await != status {
        assert!(t0.elapsed() < timeout, "/readyz of {} not {status} within {timeout:?}", inst.id);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t0.elapsed()
}

/// Every acked message of `from` to `to` arrived exactly once at `to`.
pub fn assert_acked_delivered_once(from: &Peer, to: &Peer, prefix: &str) -> usize {
    let acks: Vec<String> = from.acks().into_iter().filter(|(c, _)| c.starts_with(prefix)).map(|(_, id)| id).collect();
    let got = to.received_ids();
    let mut count: HashMap<&str, usize> = HashMap::new();
    for id in &got {
        *count.entry(id).or_default() += 1;
    }
    for id in &acks {
        assert_eq!(
            count.get(id.as_str()).copied().unwrap_or(0),
            1,
            "acked {prefix} message {id} from {} to {}",
            from.name,
            to.name
        );
    }
    acks.len()
}

pub fn assert_no_duplicates(p: &Peer) {
    let ids = p.received_ids();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "{} received a message id twice", p.name);
}

/// Like [`wait_until`] with a condition that has to await (an HTTP request, a metric).
pub async fn wait_until_async<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
