//! The hub: user id → local connections, and each connection's bounded outbox.
//!
//! No I/O and no `.await` under its lock. `add` says whether a connection is the user's
//! first on this instance (subscribe), `remove` whether it was the last (unsubscribe).
//! Fan-out never blocks: a frame is pushed into each outbox with a byte bound, and a
//! connection whose outbox would overflow is flagged as a slow consumer for its session to
//! close with 4008.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

/// How many recent message ids each user remembers to drop redeliveries. A duplicate can
/// arrive after everything the broker queued during a link outage (a publish retransmitted
/// by the sending instance after its own reconnect), so the window is wide; it is allocated
/// only for users that receive messages, 8 bytes an id.
const RECENT_IDS: usize = 1024;

/// Result of [`Hub::add`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// The user's first connection here: subscribe to its topic.
    First,
    /// The user already had a connection here: no broker traffic.
    Again,
}

/// Result of [`Hub::remove`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// That was the user's last connection here: unsubscribe.
    Last,
    /// Other connections of the user remain.
    Remaining,
    /// Not registered (already removed).
    Unknown,
}

/// The sending side of one connection's outbound queue, bounded in bytes.
///
/// A plain deque under a lock rather than a channel: tokio's channels allocate their first
/// block of 32 slots (~2.6 KiB here) when created, which every idle connection carried; an
/// empty deque owns no memory, and one that grew for a burst is freed when drained.
#[derive(Debug)]
pub struct Outbox {
    /// Each frame carries when it was queued (for `fanout_delivery_latency_seconds`).
    queue: Mutex<Queue>,
    /// Wakes the session's writer when a frame was queued.
    ready: Notify,
    queued: AtomicUsize,
    limit: usize,
    overflowed: AtomicBool,
    /// Wakes the session when the outbox overflowed.
    pub overflow: Notify,
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<(Message, Instant)>,
    /// The receiving side was dropped: pushes fail with [`Push::Closed`].
    closed: bool,
}

/// Frames a drained outbox may keep room for (the deque's first allocation); a larger one
/// is freed when it empties, so a burst does not stay resident on an idle connection.
const KEEP_SLOTS: usize = 4;
/// A deque that is not empty is shrunk only above this many slots (4.5 KiB), so bursts of up
/// to this size cost no more reallocations than growing (they are freed once drained).
const SHRINK_ABOVE: usize = 64;

/// The receiving side, owned by the session's writer.
#[derive(Debug)]
pub struct OutboxRx {
    outbox: Arc<Outbox>,
}

impl Drop for OutboxRx {
    fn drop(&mut self) {
        let mut q = self.outbox.queue.lock();
        q.closed = true;
        let dropped: usize = q.frames.drain(..).map(|(m, _)| m.len()).sum();
        q.frames = VecDeque::new();
        drop(q);
        self.outbox.queued.fetch_sub(dropped, Ordering::AcqRel);
    }
}

/// Result of pushing into an outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// The byte bound was hit: the frame was not queued and the connection must close (4008).
    Overflow,
    /// The session is gone.
    Closed,
}

impl Outbox {
    pub fn new(limit: usize) -> (Arc<Outbox>, OutboxRx) {
        let ob = Arc::new(Outbox {
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            queued: AtomicUsize::new(0),
            limit,
            overflowed: AtomicBool::new(false),
            overflow: Notify::new(),
        });
        (ob.clone(), OutboxRx { outbox: ob })
    }

    /// Queues `msg`, stamped with `at` (one clock read per fan-out, not per socket).
    pub fn push_at(&self, msg: Message, at: Instant) -> Push {
        if self.overflowed.load(Ordering::Relaxed) {
            return Push::Overflow;
        }
        let len = msg.len();
        let before = self.queued.fetch_add(len, Ordering::AcqRel);
        if before + len > self.limit && before > 0 {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            self.overflowed.store(true, Ordering::Relaxed);
            self.overflow.notify_one();
            return Push::Overflow;
        }
        let mut q = self.queue.lock();
        if q.closed {
            drop(q);
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return Push::Closed;
        }
        q.frames.push_back((msg, at));
        drop(q);
        // Stores a permit when the writer is not waiting: it finds the frame on its next look.
        self.ready.notify_one();
        Push::Queued
    }

    pub fn is_overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Relaxed)
    }

    /// Call after taking a frame out of the queue.
    pub fn taken(&self, msg: &Message) {
        self.queued.fetch_sub(msg.len(), Ordering::AcqRel);
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    fn pop(&self) -> Option<(Message, Instant)> {
        let mut q = self.queue.lock();
        let m = q.frames.pop_front();
        let (len, cap) = (q.frames.len(), q.frames.capacity());
        if cap > KEEP_SLOTS {
            if len == 0 {
                q.frames = VecDeque::new();
            } else if cap > SHRINK_ABOVE && len * 4 < cap {
                // A reader that never quite drains would otherwise keep the peak of a burst
                // (72 bytes a slot, up to ~8k slots under the 1 MiB bound) for as long as it
                // stays one frame behind. Halving at a quarter full is amortised O(1) per frame.
                q.frames.shrink_to(len * 2);
            }
        }
        m
    }
}

impl OutboxRx {
    /// The next frame and when it was queued. Never `None` while the session holds its
    /// outbox; cancel-safe (a frame is only taken when it is returned).
    pub async fn recv_stamped(&mut self) -> Option<(Message, Instant)> {
        loop {
            if let Some(m) = self.outbox.pop() {
                return Some(m);
            }
            self.outbox.ready.notified().await;
        }
    }

    /// The next queued frame if there is one, without waiting.
    pub fn try_recv_stamped(&mut self) -> Option<(Message, Instant)> {
        self.outbox.pop()
    }
}

/// One registered connection.
#[derive(Debug, Clone)]
pub struct ConnRef {
    pub id: u128,
    pub outbox: Arc<Outbox>,
}

#[derive(Debug, Default)]
struct UserEntry {
    conns: Vec<ConnRef>,
    recent: VecDeque<u64>,
}

/// Counts of one fan-out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fanned {
    pub delivered: usize,
    pub overflowed: usize,
    pub duplicate: bool,
}

#[derive(Debug, Default)]
struct Inner {
    users: HashMap<String, UserEntry>,
    connections: usize,
    broadcast_recent: VecDeque<u64>,
}

/// User id → local connections.
#[derive(Debug, Default)]
pub struct Hub {
    inner: Mutex<Inner>,
}

fn seen(recent: &mut VecDeque<u64>, id: Option<u128>) -> bool {
    // The low 64 bits of a v4 uuid hold 62 random bits: plenty to tell 1024 ids apart.
    let Some(id) = id.map(|id| id as u64) else { return false };
    if recent.contains(&id) {
        return true;
    }
    if recent.len() == RECENT_IDS {
        recent.pop_front();
    }
    recent.push_back(id);
    false
}

fn fan(conns: &[ConnRef], msg: &Message, out: &mut Fanned) {
    let now = Instant::now();
    for c in conns {
        match c.outbox.push_at(msg.clone(), now) {
            Push::Queued => out.delivered += 1,
            Push::Overflow => out.overflowed += 1,
            Push::Closed => {}
        }
    }
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    /// `f` runs under the hub lock when the removal makes the user's last connection go, so
    /// a concurrent `add` of the same user cannot slip between the decision and its effect.
    pub fn remove_with(&self, user: &str, conn_id: u128, on_last: impl FnOnce()) -> Removed {
        let mut g = self.inner.lock();
        let Some(e) = g.users.get_mut(user) else { return Removed::Unknown };
        let Some(pos) = e.conns.iter().position(|c| c.id == conn_id) else { return Removed::Unknown };
        e.conns.swap_remove(pos);
        let last = e.conns.is_empty();
        g.connections -= 1;
        if last {
            g.users.remove(user);
            on_last();
            Removed::Last
        } else {
            Removed::Remaining
        }
    }

    /// Like [`Hub::add`], with `on_first` run under the lock when it is the first.
    pub fn add_with(&self, user: &str, conn: ConnRef, on_first: impl FnOnce()) -> Added {
        let mut g = self.inner.lock();
        g.connections += 1;
        if let Some(e) = g.users.get_mut(user) {
            e.conns.push(conn);
            return Added::Again;
        }
        g.users.insert(user.to_string(), UserEntry { conns: vec![conn], recent: VecDeque::new() });
        on_first();
        Added::First
    }

    /// Writes `msg` into every local connection of `user`. A message whose id (see
    /// [`crate::wire::envelope_id`]) this user already received is not written again.
    pub fn deliver(&self, user: &str, id: Option<u128>, msg: &Message) -> Option<Fanned> {
        let mut g = self.inner.lock();
        let e = g.users.get_mut(user)?;
        let mut out = Fanned::default();
        if seen(&mut e.recent, id) {
            out.duplicate = true;
            return Some(out);
        }
        fan(&e.conns, msg, &mut out);
        Some(out)
    }

    /// Writes `msg` into every local connection.
    pub fn broadcast(&self, id: Option<u128>, msg: &Message) -> Fanned {
        let mut g = self.inner.lock();
        let mut out = Fanned::default();
        if seen(&mut g.broadcast_recent, id) {
            out.duplicate = true;
            return out;
        }
        for e in g.users.values() {
            fan(&e.conns, msg, &mut out);
        }
        out
    }

    pub fn users(&self) -> usize {
        self.inner.lock().users.len()
    }

    pub fn connections(&self) -> usize {
        self.inner.lock().connections
    }

    /// Outbox depth for `/metrics`: bytes queued in all outboxes, and in the fullest one.
    pub fn outbox_stats(&self) -> (usize, usize) {
        let g = self.inner.lock();
        g.users
            .values()
            .flat_map(|e| e.conns.iter())
            .map(|c| c.outbox.queued_bytes())
            .fold((0, 0), |(sum, max), q| (sum + q, max.max(q)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    impl Hub {
        fn add(&self, user: &str, conn: ConnRef) -> Added {
            self.add_with(user, conn, || {})
        }

        fn remove(&self, user: &str, conn_id: u128) -> Removed {
            self.remove_with(user, conn_id, || {})
        }
    }

    impl Outbox {
        fn push(&self, msg: Message) -> Push {
            self.push_at(msg, Instant::now())
        }
    }

    fn conn(id: u128, limit: usize) -> (ConnRef, OutboxRx) {
        let (outbox, rx) = Outbox::new(limit);
        (ConnRef { id, outbox }, rx)
    }

    #[test]
    fn first_and_last_are_per_user() {
        let hub = Hub::new();
        let (a, _ra) = conn(1, 1000);
        let (b, _rb) = conn(2, 1000);
        assert_eq!(hub.add("bob", a), Added::First);
        assert_eq!(hub.add("bob", b), Added::Again);
        assert_eq!(hub.users(), 1);
        assert_eq!(hub.connections(), 2);
        assert_eq!(hub.remove("bob", 1), Removed::Remaining);
        assert_eq!(hub.remove("bob", 1), Removed::Unknown);
        assert_eq!(hub.remove("bob", 2), Removed::Last);
        assert_eq!(hub.users(), 0);
        assert_eq!(hub.connections(), 0);
        let (c, _rc) = conn(3, 1000);
        assert_eq!(hub.add("bob", c), Added::First);
    }

    #[tokio::test]
    async fn deliver_reaches_every_device_once_per_id() {
        let hub = Hub::new();
        let (a, mut ra) = conn(1, 1000);
        let (b, mut rb) = conn(2, 1000);
        hub.add("bob", a);
        hub.add("bob", b);
        let m = Message::text("hi");
        assert_eq!(hub.deliver("bob", Some(7), &m).unwrap().delivered, 2);
        assert!(hub.deliver("bob", Some(7), &m).unwrap().duplicate);
        assert_eq!(hub.deliver("bob", None, &m).unwrap().delivered, 2);
        assert!(hub.deliver("alice", None, &m).is_none());
        assert_eq!(ra.recv_stamped().await.unwrap().0, m);
        assert_eq!(rb.recv_stamped().await.unwrap().0, m);
        assert_eq!(hub.broadcast(Some(1), &m).delivered, 2);
        assert!(hub.broadcast(Some(1), &m).duplicate);
    }

    #[tokio::test]
    async fn duplicate_after_an_outage_backlog_is_still_dropped() {
        let hub = Hub::new();
        let (a, _ra) = conn(1, usize::MAX);
        hub.add("carol", a);
        let m = Message::text("x");
        assert!(!hub.deliver("carol", Some(u128::MAX), &m).unwrap().duplicate);
        for i in 0..1000u128 {
            hub.deliver("carol", Some(i), &m);
        }
        assert!(hub.deliver("carol", Some(u128::MAX), &m).unwrap().duplicate);
    }

    #[test]
    fn the_duplicate_filter_forgets_an_id_after_1024_newer_ones() {
        let hub = Hub::new();
        let (a, _ra) = conn(1, usize::MAX);
        hub.add("dave", a);
        let m = Message::text("x");
        // The filter keeps the low 64 bits of an id: this one differs from 0..1023 there.
        let first = 1u128 << 63 | 12_345;
        assert!(!hub.deliver("dave", Some(first), &m).unwrap().duplicate);
        // The window docs/behaviour.md promises (1,024 ids), not the code's constant.
        for i in 0..1023 {
            assert!(!hub.deliver("dave", Some(i), &m).unwrap().duplicate);
        }
        // 1,024 ids remembered: the first is still a duplicate...
        assert!(hub.deliver("dave", Some(first), &m).unwrap().duplicate);
        // ...until one more new id pushes it out.
        assert!(!hub.deliver("dave", Some(5_000), &m).unwrap().duplicate);
        assert!(!hub.deliver("dave", Some(first), &m).unwrap().duplicate, "an evicted id is delivered again");
        // The filter is per user and goes with the user's last connection.
        hub.remove("dave", 1);
        let (b, _rb) = conn(2, usize::MAX);
        hub.add("dave", b);
        assert!(!hub.deliver("dave", Some(5_000), &m).unwrap().duplicate);
    }

    #[test]
    #[ignore = "a measurement, not a check: cargo test --release --lib dedupe_cost -- --ignored --nocapture"]
    fn dedupe_cost() {
        let mut recent = VecDeque::new();
        for i in 0..RECENT_IDS as u128 {
            seen(&mut recent, Some(i));
        }
        let n = 1_000_000u128;
        let t = std::time::Instant::now();
        let mut dups = 0;
        for i in 0..n {
            dups += seen(&mut recent, Some(i + 10_000)) as usize;
        }
        let per = t.elapsed() / n as u32;
        eprintln!("seen() with a full {RECENT_IDS}-id window: {per:?} per message ({dups} dups)");
    }

    #[tokio::test]
    async fn an_outbox_owns_no_buffer_while_idle_and_gives_a_burst_back_when_drained() {
        let (ob, mut rx) = Outbox::new(usize::MAX);
        assert_eq!(ob.queue.lock().frames.capacity(), 0, "an idle outbox owns no buffer");
        for _ in 0..100 {
            assert_eq!(ob.push(Message::text("x")), Push::Queued);
        }
        assert!(ob.queue.lock().frames.capacity() >= 100);
        for _ in 0..100 {
            let (m, _) = rx.recv_stamped().await.unwrap();
            ob.taken(&m);
        }
        assert_eq!(ob.queued_bytes(), 0);
        assert!(ob.queue.lock().frames.capacity() <= KEEP_SLOTS, "the burst's buffer is freed");
        drop(rx);
        assert_eq!(ob.push(Message::text("x")), Push::Closed);
        assert_eq!(ob.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn a_waiting_writer_wakes_on_push() {
        let (ob, mut rx) = Outbox::new(1000);
        let waiter = tokio::spawn(async move { rx.recv_stamped().await.map(|(m, _)| m) });
        tokio::task::yield_now().await;
        assert_eq!(ob.push(Message::text("hi")), Push::Queued);
        assert_eq!(waiter.await.unwrap(), Some(Message::text("hi")));
    }

    #[test]
    fn outbox_overflow_is_by_bytes_and_sticky() {
        let (ob, _rx) = Outbox::new(10);
        assert_eq!(ob.push(Message::text("123456")), Push::Queued);
        assert_eq!(ob.push(Message::text("123456")), Push::Overflow);
        assert!(ob.is_overflowed());
        assert_eq!(ob.push(Message::text("1")), Push::Overflow);
        // A single frame larger than the bound still goes into an empty queue.
        let (ob, _rx) = Outbox::new(4);
        assert_eq!(ob.push(Message::text("123456")), Push::Queued);
    }

    /// A writer whose `recv_stamped` is dropped and re-created every loop turn (the session's
    /// `select!`), racing pushers on other threads: every frame arrives, none waits for a later
    /// push (each pusher stops and waits for its frames before pushing again), and the byte
    /// count ends at zero.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_frame_is_stuck_when_the_writer_is_cancelled_every_turn_under_concurrent_pushes() {
        const THREADS: usize = 4;
        const ROUNDS: usize = 300;
        let (ob, mut rx) = Outbox::new(usize::MAX);
        let delivered: Arc<Vec<AtomicUsize>> = Arc::new((0..THREADS).map(|_| AtomicUsize::new(0)).collect());
        let pushers: Vec<_> = (0..THREADS)
            .map(|t| {
                let ob = ob.clone();
                let delivered = delivered.clone();
                std::thread::spawn(move || {
                    for r in 0..ROUNDS {
                        assert_eq!(ob.push(Message::binary(vec![t as u8; 1 + r % 7])), Push::Queued);
                        // This thread pushes nothing more until its frame was seen: a frame
                        // that waits for the next push would hold it up (and time out below).
                        while delivered[t].load(Ordering::Acquire) <= r {
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        let mut got = 0;
        let mut cancelled = 0u64;
        let tick = tokio::sync::Notify::new();
        while got < THREADS * ROUNDS {
            tick.notify_one();
            let step = tokio::time::timeout(Duration::from_secs(5), async {
                tokio::select! {
                    m = rx.recv_stamped() => m,
                    // Ready on some turns only: the receive is dropped half-registered.
                    _ = tick.notified(), if got % 3 == 0 => None,
                }
            })
            .await
            .expect("a queued frame was never handed to the writer");
            match step {
                Some((m, _)) => {
                    ob.taken(&m);
                    got += 1;
                    delivered[m.into_data()[0] as usize].fetch_add(1, Ordering::AcqRel);
                }
                None => cancelled += 1,
            }
            if got % 2 == 1 {
                tokio::task::yield_now().await;
            }
        }
        for p in pushers {
            p.join().unwrap();
        }
        assert!(cancelled > 0);
        assert_eq!(ob.queued_bytes(), 0);
        assert!(rx.try_recv_stamped().is_none());
    }

    /// The window `recv_stamped` leaves open: a push after `pop` found nothing and before the
    /// writer waits. The push's notification must be kept for the wait (a permit), or the
    /// frame would sit until the next push.
    #[tokio::test]
    async fn a_push_between_an_empty_pop_and_the_wait_is_not_lost() {
        use futures_util::FutureExt;
        let (ob, _rx) = Outbox::new(1000);
        assert!(ob.pop().is_none());
        assert_eq!(ob.push(Message::text("a")), Push::Queued);
        assert!(ob.ready.notified().now_or_never().is_some(), "the writer's wait ends at once");
        assert!(ob.pop().is_some());
    }

    /// A hostile reader that takes frames as fast as they come but never lets the queue
    /// empty after a burst: the burst's buffer must not stay resident.
    #[test]
    fn a_reader_that_stays_one_frame_behind_does_not_keep_a_bursts_buffer() {
        let (ob, mut rx) = Outbox::new(usize::MAX);
        for _ in 0..8000 {
            ob.push(Message::text("x"));
        }
        let peak = ob.queue.lock().frames.capacity();
        assert!(peak >= 8000);
        for _ in 0..7999 {
            let (m, _) = rx.try_recv_stamped().unwrap();
            ob.taken(&m);
        }
        for _ in 0..100 {
            ob.push(Message::text("x"));
            let (m, _) = rx.try_recv_stamped().unwrap();
            ob.taken(&m);
        }
        let cap = ob.queue.lock().frames.capacity();
        assert!(cap <= SHRINK_ABOVE, "{cap} slots kept of a {peak}-slot burst with one frame queued");
        assert_eq!(ob.queued_bytes(), 1);
        // Steady one-in-one-out traffic keeps its small buffer rather than reallocating.
        let before = ob.queue.lock().frames.capacity();
        for _ in 0..100 {
            ob.push(Message::text("x"));
            let (m, _) = rx.try_recv_stamped().unwrap();
            ob.taken(&m);
        }
        assert_eq!(ob.queue.lock().frames.capacity(), before);
    }

    /// A push that lands while the writer's waiter is registered, with that waiter dropped
    /// before it runs (select picked another branch): the next receive still finds the frame,
    /// and a stale permit (frames taken by `try_recv_stamped`) makes it wait, not end.
    #[tokio::test]
    async fn a_notification_given_to_a_dropped_receive_is_not_lost() {
        use futures_util::FutureExt;
        let (ob, mut rx) = Outbox::new(1000);
        {
            let mut f = Box::pin(rx.recv_stamped());
            assert!(futures_util::poll!(&mut f).is_pending(), "registered as a waiter");
            assert_eq!(ob.push(Message::text("a")), Push::Queued);
            // Dropped without being polled again: the notification it was given goes with it.
        }
        let (m, _) = rx.recv_stamped().now_or_never().expect("the frame is found at once").unwrap();
        ob.taken(&m);
        for _ in 0..3 {
            ob.push(Message::text("b"));
        }
        while let Some((m, _)) = rx.try_recv_stamped() {
            ob.taken(&m);
        }
        // The permit of those pushes is still stored: the receive consumes it and waits.
        let mut f = Box::pin(rx.recv_stamped());
        assert!(futures_util::poll!(&mut f).is_pending());
        ob.push(Message::text("c"));
        assert_eq!(f.now_or_never().unwrap().unwrap().0, Message::text("c"));
        assert_eq!(ob.queued_bytes(), 1, "only the frame just received is still counted");
    }

    /// Many threads push against a small bound while the writer takes frames and then goes
    /// away mid-flood: the count never exceeds what the deque holds, overflow is reported only
    /// with bytes queued, and after the drop the count is zero and every push is refused.
    #[test]
    fn byte_count_survives_concurrent_pushes_overflow_and_drop() {
        for round in 0..50 {
            let (ob, mut rx) = Outbox::new(4096);
            let stop = Arc::new(AtomicBool::new(false));
            let pushers: Vec<_> = (0..4)
                .map(|t| {
                    let ob = ob.clone();
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        let mut i = 0usize;
                        let mut outcomes = [0usize; 3];
                        while !stop.load(Ordering::Relaxed) {
                            let p = ob.push(Message::binary(vec![0u8; 1 + (i * 31 + t) % 300]));
                            outcomes[p as usize] += 1;
                            i += 1;
                        }
                        outcomes
                    })
                })
                .collect();
            let mut taken = 0;
            while taken < 200 && !ob.is_overflowed() {
                if let Some((m, _)) = rx.try_recv_stamped() {
                    ob.taken(&m);
                    taken += 1;
                }
                let in_deque: usize = ob.queue.lock().frames.iter().map(|(m, _)| m.len()).sum();
                // Pushers add before they queue: the count may lead the deque, never trail it.
                assert!(ob.queued_bytes() >= in_deque, "round {round}");
            }
            if round % 2 == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
            drop(rx);
            std::thread::sleep(Duration::from_millis(1));
            stop.store(true, Ordering::Relaxed);
            for p in pushers {
                p.join().unwrap();
            }
            assert_eq!(ob.queued_bytes(), 0, "round {round}: nothing is counted once the writer is gone");
            assert!(ob.queue.lock().frames.is_empty());
            assert_eq!(ob.queue.lock().frames.capacity(), 0);
            let p = ob.push(Message::text("x"));
            assert!(p == Push::Closed || p == Push::Overflow, "round {round}: {p:?}");
        }
    }
}
