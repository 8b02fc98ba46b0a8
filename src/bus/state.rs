//! The bus's pure state — no I/O, no clock of its own, no `.await`: the subscription ledger
//! (what is wanted, what the broker confirmed, which SUBSCRIBE a SUBACK answers) and the
//! outbound window (every publish the bus accepted, kept until the broker's PUBACK, in the
//! order it must go out). [`super::Bus`] holds both under one lock and feeds them rumqttc's
//! events; the tests below drive them by hand, the way rumqttc's own `state.rs` is tested.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::{QoS, SubscribeReasonCode};
use tokio::sync::oneshot;

// ---------------------------------------------------------------------------------------------
// Outbound publishes
// ---------------------------------------------------------------------------------------------

/// Bytes charged to the publish queue per publish on top of its topic and payload (the
/// entry's own bookkeeping), so that many tiny messages are bounded too.
pub const ENTRY_OVERHEAD: usize = 64;

/// What one publish costs in the publish queue (`--publish-queue-bytes`).
pub fn cost(topic: &str, payload: &[u8]) -> usize {
    topic.len() + payload.len() + ENTRY_OVERHEAD
}

/// A publish the link dropped right after writing is suspected of making the broker drop us
/// (one it refuses, e.g. larger than its `max_packet_size`); after this many strikes in a row
/// it is set aside rather than jam everything behind it forever.
pub const POISON_STRIKES: u8 = 8;
/// A link loss this soon after the suspect was written counts as a strike; a later one clears
/// its strikes (strikes must come in a row). A broker that refuses a packet drops the link
/// within a round trip of reading it; a flapping network drops it at random moments, and
/// eight random drops in a row each within 250 ms of the same write are very unlikely.
pub const POISON_WINDOW: Duration = Duration::from_millis(250);

/// One accepted publish.
#[derive(Debug)]
pub struct Entry {
    seq: u64,
    topic: String,
    payload: Bytes,
    cost: usize,
    /// When rumqttc wrote it (this link), and how many links dropped right after that.
    written_at: Option<Instant>,
    strikes: u8,
    /// Queue permits this entry holds (its cost, or less when one message was larger than the
    /// whole queue); given back when the broker acknowledges it.
    permits: usize,
}

/// What a link loss did to the outbound publishes.
#[derive(Debug, PartialEq, Eq)]
pub struct LinkLoss {
    /// Publishes that go out again after the reconnect.
    pub requeued: usize,
    /// A publish set aside after [`POISON_STRIKES`]: topic, payload bytes, permits.
    pub poisoned: Option<(String, usize, usize)>,
}

/// Every publish the bus accepted (and acked to its sender) that the broker has not
/// acknowledged yet, in three stages: `queued` (waiting for room in the window), `handed`
/// (given to rumqttc's request channel, not yet written) and `inflight` (written with a packet
/// id, waiting for its PUBACK). At most `window` are handed or in flight at once, so rumqttc
/// never holds more publishes than its in-flight limit: past it, rumqttc sends retransmissions
/// without flow control and keeps only one "collided" publish, each collision overwriting the
/// last (pitfall 34 — acked messages lost on replay).
///
/// When the link drops, whatever was handed or in flight goes back to the front of the queue
/// in the order it was accepted, so messages from one sender to one recipient keep their order
/// across any number of link failures; a message the broker got but whose PUBACK was lost is
/// sent again (recipients' duplicate filters drop the copy).
#[derive(Debug)]
pub struct Outbound {
    window: usize,
    /// Most payload bytes handed or in flight at once (rumqttc holds a copy of each).
    window_bytes_max: usize,
    window_bytes: usize,
    next_seq: u64,
    queued: VecDeque<Entry>,
    handed: VecDeque<Entry>,
    inflight: HashMap<u16, Entry>,
    bytes: usize,
}

impl Outbound {
    /// At most `window` publishes and `window_bytes` payload bytes are handed or in flight at
    /// once (one publish always may be, however large).
    pub fn new(window: usize, window_bytes: usize) -> Self {
        Outbound {
            window: window.max(1),
            window_bytes_max: window_bytes,
            window_bytes: 0,
            next_seq: 0,
            queued: VecDeque::new(),
            handed: VecDeque::new(),
            inflight: HashMap::new(),
            bytes: 0,
        }
    }

    /// Accepts a publish; it holds `permits` queue permits until acknowledged.
    pub fn push(&mut self, topic: String, payload: Bytes, permits: usize) {
        let cost = cost(&topic, &payload);
        self.bytes += cost;
        self.queued.push_back(Entry {
            seq: self.next_seq,
            topic,
            payload,
            cost,
            written_at: None,
            strikes: 0,
            permits,
        });
        self.next_seq += 1;
    }

    /// Publishes accepted and not yet acknowledged by the broker.
    pub fn len(&self) -> usize {
        self.queued.len() + self.handed.len() + self.inflight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queue bytes held by those publishes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Publishes given to rumqttc and not yet acknowledged.
    pub fn in_window(&self) -> usize {
        self.handed.len() + self.inflight.len()
    }

    /// The next publish to give rumqttc, when the window has room: its topic and payload.
    /// Call [`Outbound::unhand`] if it could not be given.
    pub fn hand(&mut self) -> Option<(&str, &Bytes)> {
        let next = self.queued.front()?;
        let in_window = self.in_window();
        if in_window >= self.window || (in_window > 0 && self.window_bytes + next.payload.len() > self.window_bytes_max)
        {
            return None;
        }
        let e = self.queued.pop_front()?;
        self.window_bytes += e.payload.len();
        self.handed.push_back(e);
        self.handed.back().map(|e| (e.topic.as_str(), &e.payload))
    }

    /// The publish just returned by [`Outbound::hand`] did not reach rumqttc: it waits again,
    /// first in line.
    pub fn unhand(&mut self) {
        if let Some(e) = self.handed.pop_back() {
            self.window_bytes -= e.payload.len();
            self.queued.push_front(e);
        }
    }

    /// rumqttc wrote the oldest handed publish with packet id `pkid` (its
    /// `Outgoing::Publish` events come in request-channel order). False if nothing was handed.
    pub fn written(&mut self, pkid: u16, now: Instant) -> bool {
        let Some(mut e) = self.handed.pop_front() else { return false };
        e.written_at = Some(now);
        if let Some(old) = self.inflight.insert(pkid, e) {
            // rumqttc reported a packet id we still count as in flight: our view is stale. The
            // older publish is sent again rather than forgotten (a copy, never a loss).
            self.window_bytes -= old.payload.len();
            self.requeue(old);
        }
        true
    }

    /// The broker acknowledged `pkid`: the publish is done. Returns its permits.
    pub fn acked(&mut self, pkid: u16) -> Option<usize> {
        let e = self.inflight.remove(&pkid)?;
        self.bytes -= e.cost;
        self.window_bytes -= e.payload.len();
        Some(e.permits)
    }

    /// When the oldest publish still waiting for its PUBACK was written (a broker that stops
    /// answering shows here first).
    pub fn oldest_written(&self) -> Option<Instant> {
        self.inflight.values().filter_map(|e| e.written_at).min()
    }

    /// The link dropped at `now`: everything handed or in flight goes back to the front of the
    /// queue, in the order it was accepted. With `strike` (the link had taken our
    /// subscriptions, so the broker was not refusing the session), the oldest publish in flight
    /// gets a strike if the link dropped within [`POISON_WINDOW`] of writing it; at [`POISON_STRIKES`] it is taken
    /// out and returned (topic, payload bytes, permits) — the caller reports the loss.
    pub fn link_lost(&mut self, now: Instant, strike: bool) -> LinkLoss {
        let mut back: Vec<Entry> = self.inflight.drain().map(|(_, e)| e).chain(self.handed.drain(..)).collect();
        back.sort_by_key(|e| e.seq);
        self.window_bytes = 0;
        let mut poisoned = None;
        if let Some(first) = back.iter_mut().find(|e| e.written_at.is_some()) {
            let soon = first.written_at.is_some_and(|t| now.saturating_duration_since(t) <= POISON_WINDOW);
            if strike && soon {
                first.strikes += 1;
            } else if !soon {
                first.strikes = 0;
            }
        }
        if let Some(i) = back.iter().position(|e| e.strikes >= POISON_STRIKES) {
            let e = back.remove(i);
            self.bytes -= e.cost;
            poisoned = Some((e.topic, e.payload.len(), e.permits));
        }
        let requeued = back.len();
        for mut e in back.into_iter().rev() {
            e.written_at = None;
            self.queued.push_front(e);
        }
        LinkLoss { requeued, poisoned }
    }

    /// Drops everything (the process stops without the broker): returns how many publishes
    /// and permits were lost.
    pub fn abandon(&mut self) -> (usize, usize) {
        let n = self.len();
        let permits =
            self.queued.iter().chain(self.handed.iter()).chain(self.inflight.values()).map(|e| e.permits).sum();
        self.queued.clear();
        self.handed.clear();
        self.inflight.clear();
        self.bytes = 0;
        self.window_bytes = 0;
        (n, permits)
    }

    fn requeue(&mut self, e: Entry) {
        let at = self.queued.partition_point(|q| q.seq < e.seq);
        self.queued.insert(at, e);
    }
}

// ---------------------------------------------------------------------------------------------
// Subscription ledger
// ---------------------------------------------------------------------------------------------

/// Topics per SUBSCRIBE or UNSUBSCRIBE when (re)sending many ...
pub const CHUNK: usize = 64;
/// ... and at most this many bytes of topics, far below the MQTT client's packet limit.
pub const CHUNK_BYTES: usize = 16 * 1024;
/// A topic the broker refused (SUBACK failure) is asked for again after this long.
pub const REFUSED_RETRY: Duration = Duration::from_secs(5);

/// Splits topics into batches of at most [`CHUNK`] topics and [`CHUNK_BYTES`] bytes.
pub fn chunks<T: AsRef<str> + Clone>(topics: &[T]) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut bytes = 0;
    for t in topics {
        let len = t.as_ref().len() + 3;
        match out.last_mut() {
            Some(b) if b.len() < CHUNK && bytes + len <= CHUNK_BYTES => {
                bytes += len;
                b.push(t.clone());
            }
            _ => {
                bytes = len;
                out.push(vec![t.clone()]);
            }
        }
    }
    out
}
/// A topic unsubscribed because a message came for a user not held here is not unsubscribed
/// again for this long (its UNSUBACK is on the way).
pub const HEAL_HOLD: Duration = Duration::from_secs(5);
/// Most topics remembered as being healed; beyond it expired ones are forgotten first.
pub const HEAL_MAX: usize = 4096;

#[derive(Debug)]
struct TopicState {
    generation: u64,
    confirmed: bool,
    /// Part of the (re)subscription after the last ConnAck and not confirmed yet.
    resub: bool,
    waiters: Vec<oneshot::Sender<bool>>,
}

/// A batch of topics sent in one SUBSCRIBE, each with the generation it was wanted in.
pub type Batch = Vec<(String, u64)>;

/// A topic with its generation, measured by the topic's length when batching.
#[derive(Clone)]
struct Topic(String, u64);

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// What the bus wants subscribed, and what the broker has confirmed.
///
/// rumqttc gives no per-request future, so SUBACKs are matched like this: SUBSCRIBE requests
/// are recorded in `requested` in request-channel order; rumqttc reports
/// `Outgoing::Subscribe(pkid)` in the same order, which moves the batch to `inflight[pkid]`,
/// and the SUBACK with that pkid confirms it. A topic is confirmed only by a SUBACK for its
/// current generation (a user who left and came back needs a fresh one).
#[derive(Debug, Default)]
pub struct Subs {
    wanted: HashMap<String, TopicState>,
    /// Topics of the last (re)subscription not confirmed yet; the instance is ready at 0. A
    /// new user's first SUBSCRIBE does not count (a healthy instance stays ready under churn).
    resubscribing: usize,
    next_generation: u64,
    requested: VecDeque<(Batch, Instant)>,
    inflight: HashMap<u16, VecDeque<(Batch, Instant)>>,
    /// Topics the broker refused, with when to ask again.
    refused: Vec<(String, u64, Instant)>,
    /// New topics whose SUBSCRIBE could not be queued (request channel full): retried soon.
    unsent: VecDeque<(String, u64)>,
    /// Topics to unsubscribe whose UNSUBSCRIBE could not be queued or was lost with the link.
    lost_unsubs: HashSet<String>,
    /// Topics unsubscribed because a message came for a user not held here, and when.
    healing: HashMap<String, Instant>,
}

impl Subs {
    /// Starts wanting `topic`. Returns the receiver that says `true` once the broker confirmed
    /// it, and `Some(generation)` when a SUBSCRIBE must be sent (it was not wanted yet).
    pub fn want(&mut self, topic: &str) -> (oneshot::Receiver<bool>, Option<u64>) {
        let (tx, rx) = oneshot::channel();
        self.healing.remove(topic);
        self.lost_unsubs.remove(topic);
        if let Some(t) = self.wanted.get_mut(topic) {
            if t.confirmed {
                let _ = tx.send(true);
            } else {
                t.waiters.push(tx);
            }
            return (rx, None);
        }
        self.next_generation += 1;
        let generation = self.next_generation;
        self.wanted
            .insert(topic.to_string(), TopicState { generation, confirmed: false, resub: false, waiters: vec![tx] });
        (rx, Some(generation))
    }

    /// A receiver that says `true` once `topic` is confirmed (at once if it is), `false` if it
    /// is not wanted.
    pub fn wait(&mut self, topic: &str) -> oneshot::Receiver<bool> {
        let (tx, rx) = oneshot::channel();
        match self.wanted.get_mut(topic) {
            Some(t) if t.confirmed => {
                let _ = tx.send(true);
            }
            Some(t) => t.waiters.push(tx),
            None => {
                let _ = tx.send(false);
            }
        }
        rx
    }

    /// Stops wanting `topic`; true if it was wanted (an UNSUBSCRIBE must be sent).
    pub fn unwant(&mut self, topic: &str) -> bool {
        let Some(t) = self.wanted.remove(topic) else { return false };
        if t.resub && !t.confirmed {
            self.resubscribing -= 1;
        }
        true
    }

    /// Wanted topics.
    pub fn count(&self) -> usize {
        self.wanted.len()
    }

    /// True when the (re)subscription after the last ConnAck is complete.
    pub fn ready(&self) -> bool {
        self.resubscribing == 0
    }

    /// A SUBSCRIBE for `batch` went into the request channel at `now`.
    pub fn sent(&mut self, batch: Batch, now: Instant) {
        self.requested.push_back((batch, now));
    }

    /// When the oldest SUBSCRIBE still waiting for its SUBACK was sent.
    pub fn oldest_unanswered(&self) -> Option<Instant> {
        let requested = self.requested.iter().map(|(_, t)| *t);
        requested.chain(self.inflight.values().flat_map(|q| q.iter().map(|(_, t)| *t))).min()
    }

    /// Refused topics (still wanted, unconfirmed) whose retry is due at `now`.
    pub fn due_refused(&mut self, now: Instant) -> Vec<(String, u64)> {
        let wanted = &self.wanted;
        let mut due = Vec::new();
        self.refused.retain(|(t, g, at)| {
            let live = wanted.get(t).is_some_and(|s| s.generation == *g && !s.confirmed);
            if live && *at <= now {
                due.push((t.clone(), *g));
            }
            live && *at > now
        });
        due
    }

    /// The SUBSCRIBE for a new topic could not be queued: it is retried by [`Subs::next_unsent`].
    pub fn unsent(&mut self, topic: String, generation: u64) {
        self.unsent.push_back((topic, generation));
    }

    /// The next new topic whose SUBSCRIBE still has to be sent (skipping topics no longer
    /// wanted in that generation). Put it back with [`Subs::unsent_first`] if sending fails.
    pub fn next_unsent(&mut self) -> Option<(String, u64)> {
        while let Some((t, g)) = self.unsent.pop_front() {
            if self.wanted.get(&t).is_some_and(|s| s.generation == g && !s.confirmed) {
                return Some((t, g));
            }
        }
        None
    }

    pub fn unsent_first(&mut self, topic: String, generation: u64) {
        self.unsent.push_front((topic, generation));
    }

    /// rumqttc wrote the oldest requested SUBSCRIBE with packet id `pkid`.
    pub fn written(&mut self, pkid: u16) {
        if let Some(batch) = self.requested.pop_front() {
            self.inflight.entry(pkid).or_default().push_back(batch);
        }
    }

    /// The SUBACK for `pkid`: each filter is confirmed or refused in order. A refused topic
    /// no longer holds readiness back (the rest of the instance is fine) and is asked for
    /// again after [`REFUSED_RETRY`].
    pub fn suback(&mut self, pkid: u16, codes: &[SubscribeReasonCode], now: Instant) {
        let batch = match self.inflight.get_mut(&pkid) {
            Some(q) => {
                let b = q.pop_front();
                if q.is_empty() {
                    self.inflight.remove(&pkid);
                }
                b
            }
            None => None,
        };
        let Some((batch, _)) = batch else { return };
        for (i, (topic, generation)) in batch.into_iter().enumerate() {
            let ok = matches!(codes.get(i), Some(SubscribeReasonCode::Success(_)));
            if self.confirm(&topic, generation, ok) && !ok {
                self.refused.push((topic, generation, now + REFUSED_RETRY));
            }
        }
    }

    /// True when this answered the topic's current generation.
    fn confirm(&mut self, topic: &str, generation: u64, ok: bool) -> bool {
        let Some(t) = self.wanted.get_mut(topic) else { return false };
        if t.generation != generation || t.confirmed {
            return false;
        }
        t.confirmed = ok;
        if t.resub {
            t.resub = false;
            self.resubscribing -= 1;
        }
        for w in t.waiters.drain(..) {
            let _ = w.send(ok);
        }
        true
    }

    /// An UNSUBSCRIBE for `topic` could not be queued or was lost with the link.
    pub fn lost_unsub(&mut self, topic: String) {
        if !self.wanted.contains_key(&topic) {
            self.lost_unsubs.insert(topic);
        }
    }

    /// Takes up to [`CHUNK`] lost unsubscribes to send again.
    pub fn take_lost_unsubs(&mut self) -> Vec<String> {
        let take: Vec<String> = self.lost_unsubs.iter().take(CHUNK).cloned().collect();
        for t in &take {
            self.lost_unsubs.remove(t);
        }
        take
    }

    pub fn has_lost_unsubs(&self) -> bool {
        !self.lost_unsubs.is_empty()
    }

    /// A message came for `topic`, which no local user holds. True when it should be
    /// unsubscribed now (not wanted, not already being healed within [`HEAL_HOLD`]).
    pub fn heal(&mut self, topic: &str, now: Instant) -> bool {
        if self.wanted.contains_key(topic) {
            return false;
        }
        if self.healing.get(topic).is_some_and(|t| now.saturating_duration_since(*t) < HEAL_HOLD) {
            return false;
        }
        if self.healing.len() >= HEAL_MAX {
            self.healing.retain(|_, t| now.saturating_duration_since(*t) < HEAL_HOLD);
            if self.healing.len() >= HEAL_MAX {
                // Thousands of distinct strays at once: unsubscribe without remembering; a
                // repeat costs one more UNSUBSCRIBE, nothing grows.
                return true;
            }
        }
        self.healing.insert(topic.to_string(), now);
        true
    }

    /// The heal UNSUBSCRIBE for `topic` could not be queued: the next stray message retries.
    pub fn heal_failed(&mut self, topic: &str) {
        self.healing.remove(topic);
    }

    /// Entries that only grow with traffic: unsent subscribes, lost unsubscribes, heals.
    #[cfg(test)]
    pub fn backlog(&self) -> (usize, usize, usize) {
        (self.unsent.len(), self.lost_unsubs.len(), self.healing.len())
    }

    /// The link dropped: nothing is confirmed any more, and every request not answered is void
    /// (the next ConnAck subscribes to every wanted topic again).
    pub fn link_lost(&mut self) {
        self.requested.clear();
        self.inflight.clear();
        self.unsent.clear();
        self.refused.clear();
        self.healing.clear();
        for t in self.wanted.values_mut() {
            t.confirmed = false;
        }
    }

    /// The link is (back) up: every wanted topic is subscribed again, in batches of [`CHUNK`]
    /// (recorded as requested: send them before anything else), and — if the broker kept our
    /// session — the unsubscribes lost meanwhile are returned to be sent too.
    pub fn link_up(&mut self, session_present: bool, now: Instant) -> (Vec<Batch>, Vec<String>) {
        Subs::link_lost(self);
        for t in self.wanted.values_mut() {
            t.resub = true;
        }
        self.resubscribing = self.wanted.len();
        let all: Vec<Topic> = self.wanted.iter().map(|(t, s)| Topic(t.clone(), s.generation)).collect();
        let batches: Vec<Batch> =
            chunks(&all).into_iter().map(|b| b.into_iter().map(|Topic(t, g)| (t, g)).collect()).collect();
        for b in &batches {
            self.requested.push_back((b.clone(), now));
        }
        let lost: Vec<String> = std::mem::take(&mut self.lost_unsubs).into_iter().collect();
        let unsubs = if session_present {
            lost.into_iter().filter(|t| !self.wanted.contains_key(t)).collect()
        } else {
            Vec::new()
        };
        (batches, unsubs)
    }
}

/// QoS of every SUBSCRIBE and PUBLISH (spec: QoS 1).
pub const QOS: QoS = QoS::AtLeastOnce;

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    fn out_with(n: usize, window: usize) -> Outbound {
        let mut o = Outbound::new(window, usize::MAX);
        for i in 0..n {
            o.push(format!("msg/u{i}"), Bytes::from(format!("m{i}")), 1);
        }
        o
    }

    /// Hands everything the window allows; returns the payloads handed.
    fn hand_all(o: &mut Outbound) -> Vec<String> {
        let mut v = Vec::new();
        while let Some((_, p)) = o.hand() {
            v.push(String::from_utf8(p.to_vec()).unwrap());
        }
        v
    }

    #[test]
    fn never_more_than_the_window_is_handed() {
        let mut o = out_with(2_000, 100);
        assert_eq!(hand_all(&mut o).len(), 100);
        assert_eq!(o.hand(), None, "the window is full");
        for pkid in 1..=100 {
            assert!(o.written(pkid, t0()));
        }
        assert_eq!(o.hand(), None, "written but unacknowledged publishes still fill the window");
        assert_eq!(o.acked(1), Some(1));
        assert_eq!(hand_all(&mut o), ["m100"]);
        assert_eq!(o.len(), 1_999);
    }

    #[test]
    fn a_2000_message_replay_against_a_slow_broker_sends_each_once_in_order() {
        // A broker that answers late: at most a window's worth is out at once, and every
        // message is written exactly once, in order, whatever the ack timing.
        let mut o = out_with(2_000, 64);
        let mut sent = Vec::new();
        let mut pkid = 0u16;
        let mut in_flight = VecDeque::new();
        while !o.is_empty() {
            for p in hand_all(&mut o) {
                pkid = pkid % 4096 + 1;
                assert!(o.written(pkid, t0()));
                sent.push(p);
                in_flight.push_back(pkid);
            }
            assert!(in_flight.len() <= 64);
            // The broker acks a third of what is out, oldest first (MQTT orders PUBACKs).
            for _ in 0..in_flight.len().div_ceil(3) {
                let p = in_flight.pop_front().unwrap();
                assert!(o.acked(p).is_some());
            }
        }
        let want: Vec<String> = (0..2_000).map(|i| format!("m{i}")).collect();
        assert_eq!(sent, want);
        assert_eq!(o.bytes(), 0);
    }

    #[test]
    fn link_loss_requeues_unacknowledged_publishes_in_acceptance_order_twice_in_a_row() {
        let mut o = out_with(10, 4);
        assert_eq!(hand_all(&mut o), ["m0", "m1", "m2", "m3"]);
        // m0, m1 written (pkids 7, 3 — out of numeric order), m2 and m3 still in the channel.
        o.written(7, t0());
        o.written(3, t0());
        assert_eq!(o.acked(7), Some(1));
        assert_eq!(o.link_lost(t0(), true).requeued, 3);
        assert_eq!(o.len(), 9);
        // After the reconnect: m1 first again, then m2...; the link drops a second time
        // while m1 and m2 are out.
        assert_eq!(hand_all(&mut o), ["m1", "m2", "m3", "m4"]);
        o.written(1, t0());
        o.written(2, t0());
        assert_eq!(o.link_lost(t0(), true).requeued, 4);
        assert_eq!(hand_all(&mut o), ["m1", "m2", "m3", "m4"]);
        for pkid in 1..=4 {
            o.written(pkid, t0());
            o.acked(pkid);
        }
        assert_eq!(hand_all(&mut o), ["m5", "m6", "m7", "m8"]);
    }

    #[test]
    fn the_window_is_bounded_in_bytes_too_but_always_takes_one() {
        let mut o = Outbound::new(100, 10);
        o.push("t".into(), Bytes::from_static(b"123456"), 1);
        o.push("t".into(), Bytes::from_static(b"123456"), 1);
        o.push("t".into(), Bytes::from_static(&[b'x'; 50]), 1);
        assert_eq!(hand_all(&mut o), ["123456"], "a second 6-byte payload would pass 10 bytes");
        o.written(1, t0());
        o.acked(1);
        assert_eq!(hand_all(&mut o), ["123456"]);
        o.written(2, t0());
        o.acked(2);
        assert_eq!(hand_all(&mut o).len(), 1, "one publish larger than the cap still goes alone");
        o.unhand();
        assert_eq!(hand_all(&mut o).len(), 1, "unhand gives its bytes back");
    }

    #[test]
    fn a_publish_the_link_keeps_dropping_on_is_set_aside_after_eight_strikes() {
        let mut o = out_with(3, 10);
        let t = Instant::now();
        for strike in 1..=POISON_STRIKES {
            assert_eq!(hand_all(&mut o), ["m0", "m1", "m2"]);
            o.written(1, t);
            o.written(2, t);
            let loss = o.link_lost(t + Duration::from_millis(50), true);
            if strike < POISON_STRIKES {
                assert_eq!(loss, LinkLoss { requeued: 3, poisoned: None }, "strike {strike}");
            } else {
                assert_eq!(loss.requeued, 2);
                let (topic, bytes, permits) = loss.poisoned.expect("set aside");
                assert_eq!((topic.as_str(), bytes, permits), ("msg/u0", 2, 1));
            }
        }
        assert_eq!(hand_all(&mut o), ["m1", "m2"], "what was behind it goes on, in order");
    }

    #[test]
    fn a_link_dropped_before_the_subscriptions_were_through_gives_no_strike() {
        let mut o = out_with(1, 10);
        let t = Instant::now();
        for _ in 0..2 * POISON_STRIKES {
            hand_all(&mut o);
            o.written(1, t);
            // The broker refused the session, not the publish (RabbitMQ, classic queue on a
            // dead node): nothing is set aside.
            assert_eq!(o.link_lost(t, false).poisoned, None);
        }
        assert_eq!(o.len(), 1);
    }

    #[test]
    fn a_link_that_lived_on_after_the_write_gives_no_strike() {
        let mut o = out_with(1, 10);
        let t = Instant::now();
        for _ in 0..2 * POISON_STRIKES {
            hand_all(&mut o);
            o.written(1, t);
            // The broker stayed with us for longer than the poison window: an ordinary outage.
            assert_eq!(o.link_lost(t + POISON_WINDOW * 2, true).poisoned, None);
        }
        assert_eq!(o.len(), 1);
    }

    #[test]
    fn unhand_puts_the_publish_first_in_line() {
        let mut o = out_with(3, 10);
        assert!(o.hand().is_some());
        assert!(o.hand().is_some());
        o.unhand();
        assert_eq!(hand_all(&mut o), ["m1", "m2"]);
    }

    #[test]
    fn a_reused_packet_id_sends_the_older_publish_again_instead_of_losing_it() {
        let mut o = out_with(3, 10);
        hand_all(&mut o);
        o.written(5, t0());
        o.written(5, t0());
        assert_eq!(o.acked(5), Some(1));
        // m0 was displaced: it waits again, in order.
        assert_eq!(hand_all(&mut o), ["m0"]);
    }

    #[test]
    fn bytes_and_permits_are_given_back_on_ack_and_counted_on_abandon() {
        let mut o = Outbound::new(10, usize::MAX);
        o.push("msg/a".into(), Bytes::from_static(b"hello"), 70);
        o.push("msg/b".into(), Bytes::from_static(b"hi"), 5);
        assert_eq!(o.bytes(), cost("msg/a", b"hello") + cost("msg/b", b"hi"));
        hand_all(&mut o);
        o.written(1, t0());
        assert_eq!(o.acked(1), Some(70));
        assert_eq!(o.acked(1), None, "a second PUBACK for the same id gives nothing back");
        assert_eq!(o.bytes(), cost("msg/b", b"hi"));
        assert_eq!(o.abandon(), (1, 5));
        assert!(o.is_empty());
    }

    fn ok() -> SubscribeReasonCode {
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    }

    #[test]
    fn a_new_users_subscribe_does_not_make_the_instance_unready() {
        let mut s = Subs::default();
        let (_b, g) = s.want("broadcast");
        assert!(g.is_some());
        assert!(s.ready(), "before the first ConnAck nothing is being resubscribed");
        let (batches, _) = s.link_up(false, t0());
        assert_eq!(batches.len(), 1);
        assert!(!s.ready(), "the first subscription after a ConnAck counts");
        s.written(1);
        s.suback(1, &[ok()], t0());
        assert!(s.ready());
        // A new user while up: its SUBSCRIBE is in flight, the instance stays ready.
        let (mut alice, g) = s.want("msg/alice");
        s.sent(vec![("msg/alice".into(), g.unwrap())], t0());
        assert!(s.ready());
        s.written(2);
        assert_eq!(alice.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        s.suback(2, &[ok()], t0());
        assert_eq!(alice.try_recv(), Ok(true));
        // After a reconnect every wanted topic counts again until its SUBACK.
        s.link_lost();
        let (batches, _) = s.link_up(true, t0());
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 2);
        assert!(!s.ready());
        // A user who leaves while being resubscribed does not hold readiness back.
        assert!(s.unwant("msg/alice"));
        s.written(3);
        s.suback(3, &[ok(), ok()], t0());
        assert!(s.ready());
    }

    #[test]
    fn suback_confirms_in_request_order_and_a_refusal_is_reported() {
        let mut s = Subs::default();
        let (a, ga) = s.want("msg/a");
        let (b, gb) = s.want("msg/b");
        let (b2, none) = s.want("msg/b");
        assert_eq!(none, None, "a second device sends no SUBSCRIBE");
        s.sent(vec![("msg/a".into(), ga.unwrap())], t0());
        s.sent(vec![("msg/b".into(), gb.unwrap())], t0());
        s.written(4);
        s.written(5);
        s.suback(5, &[SubscribeReasonCode::Failure], t0());
        s.suback(4, &[ok()], t0());
        assert_eq!(a.blocking_recv(), Ok(true));
        assert_eq!(b.blocking_recv(), Ok(false));
        assert_eq!(b2.blocking_recv(), Ok(false));
    }

    #[test]
    fn a_refused_resubscription_stops_holding_readiness_and_is_asked_for_again() {
        let mut s = Subs::default();
        let t = Instant::now();
        let (_a, _) = s.want("msg/a");
        let (_b, _) = s.want("msg/b");
        let (batches, _) = s.link_up(false, t);
        assert!(!s.ready());
        assert_eq!(s.oldest_unanswered(), Some(t));
        s.written(1);
        let codes: Vec<SubscribeReasonCode> = batches[0]
            .iter()
            .map(|(topic, _)| if topic == "msg/b" { SubscribeReasonCode::Failure } else { ok() })
            .collect();
        s.suback(1, &codes, t);
        assert!(s.ready(), "a refused topic does not keep the whole instance unready");
        assert_eq!(s.oldest_unanswered(), None);
        assert!(s.due_refused(t + Duration::from_secs(1)).is_empty(), "not before the retry delay");
        let due = s.due_refused(t + REFUSED_RETRY);
        assert_eq!(due.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(), ["msg/b"]);
        assert!(s.due_refused(t + REFUSED_RETRY * 2).is_empty(), "handed out once");
        // A refused topic whose user left is not asked for again.
        s.sent(due, t);
        s.written(2);
        s.suback(2, &[SubscribeReasonCode::Failure], t);
        s.unwant("msg/b");
        assert!(s.due_refused(t + REFUSED_RETRY * 3).is_empty());
    }

    #[test]
    fn resubscribe_batches_are_bounded_in_topics_and_bytes() {
        let long: Vec<String> = (0..100).map(|i| format!("msg/{i:0>250}")).collect();
        let b = chunks(&long);
        assert!(b.iter().all(|c| c.iter().map(|t| t.len() + 3).sum::<usize>() <= CHUNK_BYTES));
        assert_eq!(b.iter().map(Vec::len).sum::<usize>(), 100);
        assert!(b.len() >= 2);
        let short: Vec<String> = (0..130).map(|i| format!("msg/u{i}")).collect();
        assert_eq!(chunks(&short).iter().map(Vec::len).collect::<Vec<_>>(), [64, 64, 2]);
    }

    #[test]
    fn a_suback_for_an_old_generation_does_not_confirm_a_user_who_came_back() {
        let mut s = Subs::default();
        let (_a, g1) = s.want("msg/a");
        s.sent(vec![("msg/a".into(), g1.unwrap())], t0());
        s.written(1);
        assert!(s.unwant("msg/a"));
        let (mut a2, g2) = s.want("msg/a");
        assert!(g2.is_some());
        s.suback(1, &[ok()], t0());
        assert_eq!(a2.try_recv(), Err(oneshot::error::TryRecvError::Empty));
    }

    #[test]
    fn unsent_subscribes_are_retried_only_while_still_wanted() {
        let mut s = Subs::default();
        let (_a, ga) = s.want("msg/a");
        let (_b, gb) = s.want("msg/b");
        s.unsent("msg/a".into(), ga.unwrap());
        s.unsent("msg/b".into(), gb.unwrap());
        s.unwant("msg/a");
        assert_eq!(s.next_unsent(), Some(("msg/b".into(), gb.unwrap())));
        s.unsent_first("msg/b".into(), gb.unwrap());
        assert_eq!(s.next_unsent().map(|(t, _)| t), Some("msg/b".into()));
        assert_eq!(s.next_unsent(), None);
    }

    #[test]
    fn lost_unsubscribes_are_sent_in_chunks_and_only_for_topics_not_wanted_again() {
        let mut s = Subs::default();
        for i in 0..100 {
            s.lost_unsub(format!("msg/u{i}"));
        }
        let (_r, _) = s.want("msg/u7");
        let first = s.take_lost_unsubs();
        assert_eq!(first.len(), CHUNK);
        assert!(!first.contains(&"msg/u7".to_string()));
        assert_eq!(s.take_lost_unsubs().len(), 99 - CHUNK);
        assert!(!s.has_lost_unsubs());
        // With a reconnect: re-sent only if the broker kept the session.
        s.lost_unsub("msg/x".into());
        assert_eq!(s.link_up(false, t0()).1, Vec::<String>::new());
        s.lost_unsub("msg/x".into());
        assert_eq!(s.link_up(true, t0()).1, ["msg/x"]);
    }

    #[test]
    fn healing_is_held_then_retried_and_stays_bounded() {
        let mut s = Subs::default();
        let t0 = Instant::now();
        assert!(s.heal("msg/gone", t0));
        assert!(!s.heal("msg/gone", t0 + Duration::from_secs(1)), "held while its UNSUBACK is on the way");
        assert!(s.heal("msg/gone", t0 + HEAL_HOLD), "a stray message after the hold unsubscribes again");
        let (_r, _) = s.want("msg/held");
        assert!(!s.heal("msg/held", t0), "a wanted topic is never healed");
        for i in 0..3 * HEAL_MAX {
            s.heal(&format!("msg/s{i}"), t0 + HEAL_HOLD * 2 + Duration::from_millis(i as u64));
        }
        assert!(s.backlog().2 <= HEAL_MAX, "healing grew to {}", s.backlog().2);
    }
}
