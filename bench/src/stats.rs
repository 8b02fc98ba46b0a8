//! What the generator's readers count: a latency histogram and counters per measurement step,
//! and the benchmark's payload that makes a received message traceable to its step.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::report::r3;

pub fn new_hist() -> Histogram<u64> {
    // Microseconds, 1 µs .. 120 s, 3 significant digits.
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

/// Counters of one measurement step; `step` tags messages so late ones from an earlier step
/// are not counted in this one, and each message's sequence number is remembered so that a
/// copy is counted as a duplicate, not as a delivery.
pub struct Stats {
    pub epoch: Instant,
    step: AtomicU64,
    window: Mutex<Window>,
    /// distinct messages of this step received
    pub delivered: AtomicU64,
    /// further copies of messages already received in this step
    pub duplicates: AtomicU64,
    pub stale: AtomicU64,
    pub acks: AtomicU64,
    pub errors: AtomicU64,
    /// connections whose reader ended (since they were opened; not reset per step)
    pub closed: AtomicU64,
}

struct Window {
    hist: Histogram<u64>,
    seen: HashSet<u64>,
}

impl Stats {
    pub fn new(epoch: Instant) -> Arc<Stats> {
        Arc::new(Stats {
            epoch,
            step: AtomicU64::new(0),
            window: Mutex::new(Window { hist: new_hist(), seen: HashSet::new() }),
            delivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            closed: AtomicU64::new(0),
        })
    }

    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Starts a new step: clears counters, the histogram and the sequence numbers seen.
    pub fn reset(&self, step: u64) {
        self.step.store(step, Relaxed);
        {
            let mut w = self.window.lock();
            w.hist.reset();
            w.seen.clear();
        }
        for c in [&self.delivered, &self.duplicates, &self.stale, &self.acks, &self.errors] {
            c.store(0, Relaxed);
        }
    }

    /// Records one received message: its latency if it is the first copy of (step, seq).
    pub fn record(&self, s: &Stamp) {
        if s.r != self.step.load(Relaxed) {
            self.stale.fetch_add(1, Relaxed);
            return;
        }
        let lat = self.now_us().saturating_sub(s.t).max(1);
        let mut w = self.window.lock();
        if !w.seen.insert(s.s) {
            drop(w);
            self.duplicates.fetch_add(1, Relaxed);
            return;
        }
        w.hist.saturating_record(lat);
        drop(w);
        self.delivered.fetch_add(1, Relaxed);
    }

    pub fn quantiles(&self) -> Quantiles {
        let w = self.window.lock();
        let h = &w.hist;
        if h.is_empty() {
            return Quantiles::default();
        }
        let ms = |v: u64| Some(r3(v as f64 / 1000.0));
        Quantiles {
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// Latency percentiles of one step (milliseconds; `None` when nothing arrived).
#[derive(Serialize, Default, Clone, Copy, Debug)]
pub struct Quantiles {
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// The benchmark's payload inside `message`: scheduled send time (µs since the bench epoch),
/// step and sequence number, padded with `p` to the requested size.
#[derive(Deserialize)]
pub struct Stamp {
    pub t: u64,
    pub r: u64,
    pub s: u64,
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    event: &'a str,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChatData {
    message: Option<Stamp>,
}

pub enum Inbound {
    Chat(Stamp),
    Ack,
    Error,
    Connected,
    Other,
}

/// Reads a fanout frame, or an envelope as published on a broker topic (the same JSON). `data`
/// is only parsed further for a `chat_message`: an `error` frame's `data.message` is a string,
/// and parsing every frame's `data` as a chat message used to make error frames unreadable,
/// so they were never counted.
pub fn classify(text: &str) -> Inbound {
    let Ok(f) = serde_json::from_str::<Frame>(text) else { return Inbound::Other };
    match f.event {
        "chat_message" => {
            match f.data.and_then(|d| serde_json::from_str::<ChatData>(d.get()).ok()).and_then(|d| d.message) {
                Some(s) => Inbound::Chat(s),
                None => Inbound::Other,
            }
        }
        "ack" => Inbound::Ack,
        "error" => Inbound::Error,
        "connected" => Inbound::Connected,
        _ => Inbound::Other,
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

/// The `chat_message` envelope fanout publishes for a message (a fresh id, `sentAt` now), for
/// the paths that publish to the broker themselves.
pub fn envelope(from: &str, to: &str, msg: &str) -> Vec<u8> {
    let id = uuid::Uuid::new_v4();
    let ms = unix_millis();
    format!(
        "{{\"event\":\"chat_message\",\"data\":{{\"id\":\"{id}\",\"from\":\"{from}\",\"to\":\"{to}\",\"message\":{msg},\"sentAt\":{ms}}}}}"
    )
    .into_bytes()
}

pub fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
