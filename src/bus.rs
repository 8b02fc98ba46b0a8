//! The MQTT side: one rumqttc connection per instance.
//!
//! The bus is two parts. [`state`] is pure: the subscription ledger and the outbound window.
//! This file is the link task, with an explicit [`Phase`], and the API sessions and the publish
//! route call. Under one lock ([`Bus::state`]) the two never disagree.
//!
//! * **Subscriptions.** The bus keeps the set of topics it wants (user topics of local
//!   connections + the broadcast topic). rumqttc remembers none of them across a session-less
//!   reconnect, so on every ConnAck the bus subscribes to all of them again, ahead of anything
//!   else. Sessions wait for a topic's SUBACK before sending `connected`; `/readyz` is 200 while
//!   the link is up and that resubscription is complete (a new user's first SUBSCRIBE does not
//!   count). A SUBSCRIBE or UNSUBSCRIBE that finds the request channel full is retried on the
//!   next event, not only at the next reconnect.
//! * **Publishes are owned by the bus until the broker's PUBACK.** An accepted publish (what an
//!   `ack` promises) waits in the bus's own queue, bounded in bytes (`--publish-queue-bytes`;
//!   a sender waits at most `--broker-timeout` for room, then gets `unavailable`). At most
//!   [`WINDOW`] publishes ([`WINDOW_BYTES`]) are given to rumqttc at once, so its flow control
//!   always holds (pitfall 34) and its copies stay bounded.
//!   When the link drops, the unacknowledged ones go back to the front of the queue in the order
//!   they were accepted and are sent again after the reconnect — across any number of failures,
//!   also when the broker lost the session.
//! * **Persistent session.** The client id is `fanout-<instance-id>`. The first connect is
//!   clean (it wipes a session left by an earlier process with the same id), then the bus
//!   reconnects with `clean_session = false`, so during a broker-link outage the broker queues
//!   what arrives for this instance's users. On shutdown everything accepted is sent first (also
//!   if the link drops and returns meanwhile), then the session is ended by a clean reconnect.
//! * **Never blocks the loop.** The event loop task never awaits the client; every request is
//!   `try_*`, and other tasks wait only on the bounded publish queue.

#[cfg(test)]
pub(crate) mod fake;
mod state;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use rumqttc::{
    AsyncClient, Disconnect, Event, EventLoop, Incoming, MqttOptions, NetworkOptions, Outgoing, Packet, Publish,
    Request, Subscribe, SubscribeFilter, Unsubscribe,
};
use tokio::sync::{oneshot, Notify, Semaphore, TryAcquireError};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

pub use state::{cost, ENTRY_OVERHEAD};
use state::{Outbound, Subs, QOS};

use crate::config::{BrokerTarget, Config};
use crate::hub::Hub;
use crate::metrics::{DropReason, Metrics};
use crate::wire::{self, Recipients};

/// Room for the envelope around the client's frame in a publish.
pub const ENVELOPE_SLACK: usize = 8 * 1024;
/// The largest packet MQTT 3.1.1 can carry (256 MiB of remaining length + fixed header).
const MQTT_MAX_PACKET: usize = 268_435_455 + 5;

/// The largest packet the bus writes: a publish of the largest message with its envelope and
/// topic, and never less than 64 KiB (SUBSCRIBE batches, [`state::CHUNK_BYTES`]).
fn max_outgoing(max_message_bytes: usize) -> usize {
    (max_message_bytes + ENVELOPE_SLACK).max(64 * 1024)
}
/// Most publishes given to rumqttc at once (written or waiting to be, not yet acknowledged).
/// At 16,000 msg/s on loopback a handful are out; across a 100 ms link this allows ~5,000/s.
pub const WINDOW: usize = 512;
/// Most payload bytes given to rumqttc at once: it holds a copy of each publish until its
/// PUBACK, so memory for accepted messages is at most `--publish-queue-bytes` plus this.
pub const WINDOW_BYTES: usize = 4 << 20;
/// rumqttc's in-flight limit, which is also the range its packet ids cycle through. Larger than
/// [`WINDOW`] so SUBSCRIBEs (which take packet ids too) rarely bring a publish's id round again
/// while it is in flight; if one does, rumqttc holds it back until the id is free (no loss).
const RUMQTTC_INFLIGHT: u16 = 4096;
/// Requests written per flush at most (patched rumqttc, `patches/README.md`): only those
/// already in the channel, so a lone publish is never held back.
const REQUEST_BATCH: usize = 64;
/// Capacity of rumqttc's request channel: the window plus subscribe/unsubscribe bursts.
const REQUEST_CHANNEL: usize = WINDOW + 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("the broker did not accept the message in time")]
    Unavailable,
}

/// Everything the lock guards.
#[derive(Debug)]
struct State {
    subs: Subs,
    out: Outbound,
    /// True in [`Phase::Up`]: requests may go into rumqttc's channel.
    up: bool,
    /// [`Bus::stop`] was called: no new publishes; DISCONNECT once `out` is empty.
    stopping: bool,
    stop_deadline: Option<Instant>,
    disconnect_sent: bool,
    /// This link wrote a publish / got a PUBACK: a link that took our subscriptions and every
    /// publish it was given a chance to acknowledge was a working link (see `Bus::run`).
    written_on_link: bool,
    acked_on_link: bool,
}

/// Where the link task is.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// First connect, with a clean session: wipes a session an earlier process with our client
    /// id left behind; then DISCONNECT and connect again with a persistent one.
    Wiping,
    /// Connecting with the persistent session; `since` is when a link that was up went down.
    Down { since: Option<std::time::Instant> },
    /// Link up: requests flow.
    Up,
    /// We wrote DISCONNECT and wait (bounded) for the broker to close the connection, reading
    /// what it still sends, before doing `then`. Closing at once made Mosquitto 2.0 fail its
    /// PUBACK writes for publishes still in its read buffer and drop them ("disconnected due to
    /// out of memory", mosquitto#2627/#3253) — acked messages lost at shutdown.
    Closing { until: Instant, then: AfterClose },
    /// Shutdown: connecting with a clean session to remove our persistent one.
    Ending,
}

/// What follows a [`Phase::Closing`].
#[derive(Debug, Clone, Copy)]
enum AfterClose {
    /// The start-up wipe is done: connect with a persistent session.
    Persist,
    /// Shutdown, everything sent and acknowledged: remove the session (clean reconnect).
    EndSession,
    /// Shutdown, session removed: stop.
    Exit,
}

/// A link that stayed up this long resets the reconnect backoff when it drops.
const STABLE_LINK: Duration = Duration::from_secs(5);

/// Longest wait for the broker to close the connection after our DISCONNECT.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The instance's MQTT connection.
pub struct Bus {
    client: AsyncClient,
    state: Mutex<State>,
    /// Bytes of room in the publish queue; a publish holds its cost until acknowledged.
    room: Semaphore,
    queue_limit: usize,
    /// Wakes the link task when [`Bus::stop`] is called while it waits for a reconnect.
    wake: Notify,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    prefix: String,
    broadcast_topic: String,
    connected: AtomicBool,
    broker_wait: Duration,
    /// The largest packet the MQTT client will write; a bigger publish is refused up front (it
    /// would cost the link).
    max_packet: usize,
    /// The instance's shutdown signal: a publish waiting for room gives up when it fires.
    shutdown: CancellationToken,
    /// The broker, or the nodes of one cluster, tried in turn (see [`Bus::run`]).
    nodes: Vec<BrokerTarget>,
    /// Index in `nodes` of the node the link uses (or tries).
    node: AtomicUsize,
    client_id: String,
    max_message_bytes: usize,
}

/// The MQTT client id of an instance: `fanout-<instance-id>`.
pub fn client_id(cfg: &Config) -> String {
    format!("fanout-{}", cfg.instance_id)
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("connected", &self.connected).finish()
    }
}

/// Builds the rumqttc options for node `target` (first connect is clean; see module docs).
fn mqtt_options(client_id: &str, target: &BrokerTarget, max_message_bytes: usize, clean: bool) -> MqttOptions {
    let BrokerTarget { host, port, username, password } = target;
    let mut o = MqttOptions::new(client_id, host.clone(), *port);
    o.set_keep_alive(Duration::from_secs(10));
    o.set_clean_session(clean);
    // An incoming packet is never refused: with a persistent session the broker would resend
    // it after every reconnect, a loop (an operator may inject anything with mosquitto_pub, and
    // a peer instance may allow larger messages).
    o.set_max_packet_size(MQTT_MAX_PACKET, max_outgoing(max_message_bytes));
    o.set_inflight(RUMQTTC_INFLIGHT);
    // Requests already waiting when the event loop writes one go out in the same write.
    o.set_max_request_batch(REQUEST_BATCH);
    if let Some(u) = username {
        o.set_credentials(u.clone(), password.clone().unwrap_or_default());
    }
    o
}

impl Bus {
    /// Creates the bus and its event loop; run the loop with [`Bus::run`]. `shutdown` is the
    /// instance's shutdown signal.
    pub fn new(
        cfg: &Config,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> (Arc<Bus>, EventLoop) {
        let options = mqtt_options(&client_id(cfg), &cfg.brokers[0], cfg.max_message_bytes, true);
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CHANNEL);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(5);
        eventloop.set_network_options(net);
        (Bus::with_client(client, cfg, hub, metrics, shutdown), eventloop)
    }

    /// A bus over any client handle (unit tests pass one made by `AsyncClient::from_senders`).
    pub fn with_client(
        client: AsyncClient,
        cfg: &Config,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Arc<Bus> {
        let bus = Arc::new(Bus {
            client,
            state: Mutex::new(State {
                subs: Subs::default(),
                out: Outbound::new(WINDOW, WINDOW_BYTES),
                up: false,
                stopping: false,
                stop_deadline: None,
                disconnect_sent: false,
                written_on_link: false,
                acked_on_link: false,
            }),
            room: Semaphore::new(cfg.publish_queue_bytes),
            queue_limit: cfg.publish_queue_bytes,
            wake: Notify::new(),
            hub,
            metrics,
            prefix: cfg.topic_prefix.clone(),
            broadcast_topic: cfg.broadcast_topic.clone(),
            connected: AtomicBool::new(false),
            broker_wait: cfg.broker_wait,
            max_packet: max_outgoing(cfg.max_message_bytes),
            shutdown,
            nodes: cfg.brokers.clone(),
            node: AtomicUsize::new(0),
            client_id: client_id(cfg),
            max_message_bytes: cfg.max_message_bytes,
        });
        // The broadcast topic is wanted for the whole life of the instance.
        let bt = bus.broadcast_topic.clone();
        drop(bus.want(&bt));
        bus
    }

    pub fn user_topic(&self, user: &str) -> String {
        format!("{}{}", self.prefix, user)
    }

    /// The topics a message to `to` is published on: one per recipient, or the broadcast topic.
    pub fn topics(&self, to: &Recipients) -> Vec<String> {
        match to {
            Recipients::One(u) => vec![self.user_topic(u)],
            Recipients::Many(v) => v.iter().map(|u| self.user_topic(u)).collect(),
            Recipients::All => vec![self.broadcast_topic.clone()],
        }
    }

    /// True while the link is up and the resubscription after the last (re)connect is complete.
    pub fn ready(&self) -> bool {
        self.connected() && self.state.lock().subs.ready() && !self.stalled()
    }

    /// True while the link is up but the broker has not answered a publish or SUBSCRIBE for
    /// longer than `--broker-timeout` (a black-holed link: rumqttc's keep-alive notices only
    /// after two missed pings, up to 20 s).
    pub fn stalled(&self) -> bool {
        let st = self.state.lock();
        let oldest = match (st.out.oldest_written(), st.subs.oldest_unanswered()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        oldest.is_some_and(|t| t.elapsed() > self.broker_wait)
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// `host:port` of the broker node the link uses (or is trying).
    pub fn node(&self) -> String {
        self.nodes[self.node.load(Ordering::Relaxed) % self.nodes.len()].address()
    }

    /// Moves the link to the next node of the cluster (with one node: the same again) for the
    /// next connect, keeping the session setting.
    fn next_node(&self, el: &mut EventLoop) {
        let n = self.nodes.len();
        if n < 2 {
            return;
        }
        let next = (self.node.load(Ordering::Relaxed) + 1) % n;
        self.node.store(next, Ordering::Relaxed);
        let clean = el.mqtt_options.clean_session();
        el.mqtt_options = mqtt_options(&self.client_id, &self.nodes[next], self.max_message_bytes, clean);
    }

    /// Number of wanted topics (user topics + broadcast).
    pub fn subscriptions(&self) -> usize {
        self.state.lock().subs.count()
    }

    /// Bytes and publishes accepted and not yet acknowledged by the broker.
    pub fn queued(&self) -> (usize, usize) {
        let st = self.state.lock();
        (st.out.bytes(), st.out.len())
    }

    /// Starts wanting `topic`: SUBSCRIBE now if the link is up, or with the next ConnAck's
    /// resubscription. The receiver says `true` once the broker confirmed it.
    fn want(&self, topic: &str) -> oneshot::Receiver<bool> {
        let mut st = self.state.lock();
        let (rx, new) = st.subs.want(topic);
        if let Some(generation) = new {
            self.metrics.set_subscriptions(st.subs.count());
            if st.up {
                // Sent under the lock so that the ledger's request order is the channel's.
                if self.client.try_subscribe(topic, QOS).is_ok() {
                    st.subs.sent(vec![(topic.to_string(), generation)], std::time::Instant::now());
                } else {
                    st.subs.unsent(topic.to_string(), generation);
                }
            }
        }
        rx
    }

    /// Call under the hub lock on a user's first local connection.
    pub fn subscribe_user(&self, user: &str) -> oneshot::Receiver<bool> {
        self.want(&self.user_topic(user))
    }

    /// A receiver that says `true` once `user`'s topic is confirmed (at once if it is).
    pub fn wait_user(&self, user: &str) -> oneshot::Receiver<bool> {
        self.state.lock().subs.wait(&self.user_topic(user))
    }

    /// Call under the hub lock when a user's last local connection went.
    pub fn unsubscribe_user(&self, user: &str) {
        let topic = self.user_topic(user);
        let mut st = self.state.lock();
        if !st.subs.unwant(&topic) {
            return;
        }
        self.metrics.set_subscriptions(st.subs.count());
        if !st.up || self.client.try_unsubscribe(topic.clone()).is_err() {
            st.subs.lost_unsub(topic);
        }
    }

    /// Accepts one message for `topics` (one QoS 1 publish each, the same payload), all or
    /// nothing. It waits at most `--broker-timeout` (and never past shutdown) for room in the
    /// publish queue; then it is refused and never sent. Once accepted it is sent in order
    /// after everything accepted before it, and survives broker-link failures.
    pub async fn publish(&self, topics: &[String], payload: Bytes) -> Result<(), BusError> {
        // Publish packet: fixed header (≤ 5) + topic length (2) + topic + packet id (2) + payload.
        let too_big = |t: &String| 9 + t.len() + payload.len() > self.max_packet;
        if topics.is_empty() || topics.iter().any(too_big) {
            return Err(self.refused());
        }
        let costs: Vec<usize> = topics.iter().map(|t| cost(t, &payload)).collect();
        // A message larger than the whole queue may still go into an empty one.
        let need = costs.iter().sum::<usize>().min(self.queue_limit);
        let permits = u32::try_from(need).map_err(|_| self.refused())?;
        let started = std::time::Instant::now();
        let permit = match self.room.try_acquire_many(permits) {
            Ok(p) => Some(p),
            Err(TryAcquireError::Closed) => None,
            Err(TryAcquireError::NoPermits) => tokio::select! {
                r = tokio::time::timeout(self.broker_wait, self.room.acquire_many(permits)) => r.ok().and_then(Result::ok),
                _ = self.shutdown.cancelled() => None,
            },
        };
        self.metrics.publish_wait(started.elapsed());
        let Some(permit) = permit else { return Err(self.refused()) };
        let mut st = self.state.lock();
        if st.stopping {
            // The permit goes back when dropped.
            return Err(self.refused());
        }
        permit.forget();
        let mut left = need;
        for (t, c) in topics.iter().zip(costs) {
            let p = c.min(left);
            left -= p;
            st.out.push(t.clone(), payload.clone(), p);
        }
        self.pump(&mut st);
        Ok(())
    }

    fn refused(&self) -> BusError {
        self.metrics.dropped(DropReason::Unavailable);
        BusError::Unavailable
    }

    /// Moves what can move while the link is up: SUBSCRIBEs and UNSUBSCRIBEs that found the
    /// request channel full, publishes into the window, and — when stopping and everything is
    /// acknowledged — the DISCONNECT. Never blocks: a full channel leaves the rest for the next
    /// event (a full channel means events are coming).
    fn pump(&self, st: &mut State) {
        if !st.up {
            return;
        }
        let now = std::time::Instant::now();
        for (topic, generation) in st.subs.due_refused(now) {
            st.subs.unsent(topic, generation);
        }
        while let Some((topic, generation)) = st.subs.next_unsent() {
            if self.client.try_subscribe(topic.clone(), QOS).is_ok() {
                st.subs.sent(vec![(topic, generation)], now);
            } else {
                st.subs.unsent_first(topic, generation);
                break;
            }
        }
        'unsubs: while st.subs.has_lost_unsubs() {
            let mut topics = st.subs.take_lost_unsubs().into_iter();
            while let Some(t) = topics.next() {
                if self.client.try_unsubscribe(t.clone()).is_err() {
                    st.subs.lost_unsub(t);
                    topics.for_each(|t| st.subs.lost_unsub(t));
                    break 'unsubs;
                }
            }
        }
        while let Some((topic, payload)) = st.out.hand() {
            // rumqttc has no non-blocking publish of shared bytes: one copy per publish sent.
            if self.client.try_publish(topic, QOS, false, payload.to_vec()).is_err() {
                st.out.unhand();
                break;
            }
        }
        if st.stopping && !st.disconnect_sent && st.out.is_empty() && self.client.try_disconnect().is_ok() {
            st.disconnect_sent = true;
        }
    }

    /// A message from the broker: hand it to the hub, bytes untouched.
    fn route(&self, p: Publish) {
        self.metrics.mqtt_message_in();
        let id = wire::envelope_id(&p.payload);
        // Forwarded byte for byte: no copy, no re-serialisation.
        let msg = match Utf8Bytes::try_from(p.payload.clone()) {
            Ok(text) => Message::Text(text),
            Err(_) => Message::Binary(p.payload),
        };
        let fanned = if p.topic == self.broadcast_topic {
            self.hub.broadcast(id, &msg)
        } else if let Some(user) = p.topic.strip_prefix(&self.prefix) {
            match self.hub.deliver(user, id, &msg) {
                Some(f) => f,
                None => {
                    self.metrics.dropped(DropReason::NoLocalUser);
                    self.heal(&p.topic);
                    return;
                }
            }
        } else {
            self.metrics.dropped(DropReason::UnknownTopic);
            return;
        };
        self.metrics.delivered(fanned.delivered);
        if fanned.duplicate {
            self.metrics.dropped(DropReason::Duplicate);
        }
        for _ in 0..fanned.overflowed {
            self.metrics.dropped(DropReason::SlowConsumer);
        }
    }

    /// A message arrived on a user topic nobody here holds: an unsubscribe got lost (for
    /// example with the link, while the broker kept our session). Unsubscribe once more.
    fn heal(&self, topic: &str) {
        let mut st = self.state.lock();
        if !st.up || !st.subs.heal(topic, std::time::Instant::now()) {
            return;
        }
        if self.client.try_unsubscribe(topic).is_ok() {
            debug!(topic, "unsubscribing a topic with no local user");
        } else {
            st.subs.heal_failed(topic);
        }
    }

    fn on_event(&self, ev: Event) {
        match ev {
            Event::Incoming(Incoming::Publish(p)) => self.route(p),
            Event::Incoming(Incoming::PubAck(a)) => {
                let mut st = self.state.lock();
                if let Some(permits) = st.out.acked(a.pkid) {
                    self.room.add_permits(permits);
                    self.metrics.published(1);
                    st.acked_on_link = true;
                }
                self.pump(&mut st);
            }
            Event::Incoming(Incoming::SubAck(a)) => {
                let mut st = self.state.lock();
                st.subs.suback(a.pkid, &a.return_codes, std::time::Instant::now());
                self.metrics.set_ready(st.up && st.subs.ready());
                self.pump(&mut st);
            }
            // Every request rumqttc takes out of its channel makes room there: whatever found
            // it full (a publish, a SUBSCRIBE, the DISCONNECT) goes now.
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let mut st = self.state.lock();
                st.out.written(pkid, std::time::Instant::now());
                st.written_on_link = true;
                self.pump(&mut st);
            }
            Event::Outgoing(Outgoing::Subscribe(pkid)) => {
                let mut st = self.state.lock();
                st.subs.written(pkid);
                self.pump(&mut st);
            }
            Event::Outgoing(Outgoing::Unsubscribe(_)) => {
                let mut st = self.state.lock();
                self.pump(&mut st);
            }
            _ => {}
        }
    }

    /// The link dropped: handle what rumqttc had buffered, then take every request back.
    /// Publishes wait in `out` for the next link; subscriptions are all sent again at the next
    /// ConnAck; unsubscribes are remembered.
    /// Returns whether the link that was lost worked: it took our subscriptions and, if it was
    /// given publishes, acknowledged at least one. A link lost before that (a broker refusing
    /// our session or a publish) does not reset the reconnect backoff.
    fn link_lost(&self, el: &mut EventLoop) -> bool {
        {
            let mut st = self.state.lock();
            st.up = false;
            self.connected.store(false, Ordering::Release);
        }
        self.metrics.mqtt_down();
        self.metrics.set_ready(false);
        // Events rumqttc read or made before the error are real (a PUBACK read, a publish
        // written, a message received): handle them before the rest is taken back.
        let stale: Vec<Event> = el.state.events.drain(..).collect();
        for ev in stale {
            self.on_event(ev);
        }
        let mut st = self.state.lock();
        // Under the lock nobody adds to the request channel; `clean` drains it into `pending`.
        el.clean();
        el.state.collision = None;
        for req in el.pending.drain(..) {
            if let Request::Unsubscribe(u) = req {
                for t in u.topics {
                    st.subs.lost_unsub(t);
                }
            }
        }
        let resubscribed = st.subs.ready();
        let worked = resubscribed && (st.acked_on_link || !st.written_on_link);
        st.written_on_link = false;
        st.acked_on_link = false;
        st.subs.link_lost();
        // A DISCONNECT not yet written was taken back too: sent again once all is acknowledged.
        st.disconnect_sent = false;
        // Only a link that took our subscriptions can blame a publish for dropping.
        let loss = st.out.link_lost(std::time::Instant::now(), resubscribed);
        if loss.requeued > 0 {
            debug!(publishes = loss.requeued, "unacknowledged publishes kept for the next link");
        }
        if let Some((topic, bytes, permits)) = loss.poisoned {
            self.room.add_permits(permits);
            self.metrics.dropped(DropReason::BrokerRefused);
            error!(
                topic,
                bytes,
                strikes = state::POISON_STRIKES,
                "the broker dropped the link right after this accepted publish every time it was sent; it is set aside (lost) so the messages behind it go on. Check the broker's max_packet_size and ACL"
            );
        }
        worked
    }

    /// The link is (back) up: resubscribe everything wanted, re-send lost unsubscribes if the
    /// broker kept our session (both ahead of anything else), then the publishes.
    fn link_up(&self, el: &mut EventLoop, session_present: bool) {
        let mut st = self.state.lock();
        let (batches, unsubs) = st.subs.link_up(session_present, std::time::Instant::now());
        let mut front: Vec<Request> = Vec::with_capacity(batches.len() + 1);
        for b in &batches {
            let filters = b.iter().map(|(t, _)| SubscribeFilter::new(t.clone(), QOS)).collect::<Vec<_>>();
            front.push(Request::Subscribe(Subscribe::new_many(filters)));
        }
        for topics in state::chunks(&unsubs) {
            front.push(Request::Unsubscribe(Unsubscribe { pkid: 0, topics }));
        }
        for r in front.into_iter().rev() {
            el.pending.push_front(r);
        }
        st.up = true;
        self.connected.store(true, Ordering::Release);
        self.metrics.set_ready(st.subs.ready());
        self.pump(&mut st);
    }

    /// Runs the link until the session has ended after [`Bus::stop`] (or the stop deadline
    /// passed). Returns how many accepted publishes never reached the broker (0 normally).
    pub async fn run(self: Arc<Self>, mut el: EventLoop) -> usize {
        let mut phase = Phase::Wiping;
        let mut backoff = Backoff::default();
        let mut ever_up = false;
        let mut warned_down = false;
        // Connect failures since the link was last stable, and since when it is up.
        let mut failures = 0usize;
        let mut up_since: Option<std::time::Instant> = None;
        // Links that dropped soon after their ConnAck, in a row.
        let mut quick_drops = 0u32;
        loop {
            let deadline = self.state.lock().stop_deadline;
            let until = match (phase, deadline) {
                (Phase::Closing { until, .. }, Some(d)) => Some(until.min(d)),
                (Phase::Closing { until, .. }, None) => Some(until),
                (_, d) => d,
            };
            // Only a connect attempt (no network yet) may be interrupted by `stop`: once
            // connected, a poll cut short could lose a PUBACK half-written.
            let connecting = el.network.is_none();
            let polled = tokio::select! {
                r = async {
                    match until {
                        Some(u) => tokio::time::timeout_at(u, el.poll()).await.ok(),
                        None => Some(el.poll().await),
                    }
                } => r,
                _ = self.wake.notified(), if connecting => {
                    if self.give_up_while_down(phase) {
                        break;
                    }
                    continue;
                }
            };
            let Some(polled) = polled else {
                // The close wait or the stop deadline ran out.
                if let Phase::Closing { then, .. } = phase {
                    if deadline.is_none_or(|d| Instant::now() < d) {
                        match self.after_close(&mut el, then) {
                            Some(p) => phase = p,
                            None => break,
                        }
                        continue;
                    }
                }
                warn!("shutdown grace period over before the broker session ended");
                break;
            };
            if let Phase::Closing { then, .. } = phase {
                match polled {
                    Ok(ev) => self.on_event(ev),
                    Err(_) => match self.after_close(&mut el, then) {
                        Some(p) => phase = p,
                        None => break,
                    },
                }
                continue;
            }
            match polled {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    up_since = Some(std::time::Instant::now());
                    match phase {
                        Phase::Wiping => {
                            // Clean connect done: any stale session with our id is gone. Now
                            // leave and come back with a persistent session.
                            el.mqtt_options.set_clean_session(false);
                            el.pending.push_front(Request::Disconnect(Disconnect));
                        }
                        Phase::Ending => {
                            // The clean reconnect removed our session: now leave for good.
                            el.pending.push_front(Request::Disconnect(Disconnect));
                        }
                        Phase::Down { since } => {
                            self.link_up(&mut el, ack.session_present);
                            self.metrics.mqtt_up(ever_up, &self.node());
                            match since {
                                Some(t) => info!(
                                    broker = %self.node(),
                                    session_present = ack.session_present,
                                    down_ms = t.elapsed().as_millis() as u64,
                                    "broker link restored"
                                ),
                                None => info!(broker = %self.node(), "broker link up"),
                            }
                            ever_up = true;
                            warned_down = false;
                            phase = Phase::Up;
                        }
                        // A ConnAck comes only after a connect: not while up or closing.
                        Phase::Up | Phase::Closing { .. } => {}
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    let then = match phase {
                        Phase::Wiping => AfterClose::Persist,
                        Phase::Ending => AfterClose::Exit,
                        _ => {
                            let mut st = self.state.lock();
                            st.up = false;
                            self.connected.store(false, Ordering::Release);
                            AfterClose::EndSession
                        }
                    };
                    phase = Phase::Closing { until: Instant::now() + CLOSE_WAIT, then };
                }
                Ok(ev) => self.on_event(ev),
                Err(e) => {
                    let was_up = matches!(phase, Phase::Up);
                    let worked = self.link_lost(&mut el);
                    // The backoff is reset by a link that worked (or lived long): a network
                    // that flaps gets reconnected at once, a broker that drops us right after
                    // every ConnAck is not hit 10 times a second.
                    match up_since.take() {
                        Some(t) if worked || t.elapsed() >= STABLE_LINK => {
                            backoff.reset();
                            failures = 0;
                            quick_drops = 0;
                        }
                        Some(_) => quick_drops += 1,
                        None => {}
                    }
                    if quick_drops == 3 {
                        // Never "fixed" by dropping the persistent session: under a flapping
                        // link that would throw away what the broker holds for our users.
                        warn!(
                            client_id = %self.client_id,
                            "the broker keeps closing the link right after it accepts us: is another instance running with the same --instance-id, or did the node holding our session die (RabbitMQ: use mqtt.durable_queue_type = quorum)?"
                        );
                    }
                    phase = match phase {
                        Phase::Up => Phase::Down { since: Some(std::time::Instant::now()) },
                        p => p,
                    };
                    let lost = self.node();
                    self.next_node(&mut el);
                    failures += 1;
                    // With several nodes, each is tried once at once before backing off.
                    let wait = if failures < self.nodes.len() { Duration::ZERO } else { backoff.next() };
                    if was_up || !warned_down {
                        warn!(error = %e, broker = %lost, next = %self.node(), "broker link down; reconnecting with backoff");
                        warned_down = true;
                    }
                    debug!(error = %e, broker = %lost, retry_in_ms = wait.as_millis() as u64, "broker not reached");
                    if self.give_up_while_down(phase) {
                        break;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.wake.notified() => {
                            if self.give_up_while_down(phase) {
                                break;
                            }
                        }
                    }
                }
            }
        }
        self.connected.store(false, Ordering::Release);
        self.metrics.mqtt_down();
        let (lost, permits) = self.state.lock().out.abandon();
        self.room.add_permits(permits);
        if lost > 0 {
            error!(publishes = lost, "stopped before the broker acknowledged these accepted publishes: they are lost");
        }
        lost
    }

    /// While the link is down and the instance stops: leave at once when nothing accepted is
    /// waiting (the broker may keep our session until it expires); otherwise keep reconnecting
    /// until the stop deadline to deliver it.
    fn give_up_while_down(&self, phase: Phase) -> bool {
        let st = self.state.lock();
        if !st.stopping {
            return false;
        }
        let nothing_waiting = st.out.is_empty();
        let past_deadline = st.stop_deadline.is_some_and(|d| Instant::now() >= d);
        let down = matches!(phase, Phase::Down { .. } | Phase::Wiping);
        if (down && nothing_waiting) || past_deadline {
            warn!(
                "stopping while the broker link is down: the broker may keep this instance's session until it expires"
            );
            return true;
        }
        false
    }

    /// The broker closed the connection after our DISCONNECT (or the wait ran out).
    fn after_close(&self, el: &mut EventLoop, then: AfterClose) -> Option<Phase> {
        el.network = None;
        el.clean();
        el.pending.clear();
        match then {
            AfterClose::Persist => Some(Phase::Down { since: None }),
            AfterClose::EndSession => {
                el.mqtt_options.set_clean_session(true);
                Some(Phase::Ending)
            }
            AfterClose::Exit => {
                info!("broker session ended");
                None
            }
        }
    }

    /// Ends the broker session: every publish already accepted is still sent (also across a
    /// link that drops and returns) until `grace` runs out; then DISCONNECT, and the persistent
    /// session is removed with a clean reconnect. Returns at once; await the task running
    /// [`Bus::run`] to know it finished.
    pub fn stop(&self, grace: Duration) {
        let mut st = self.state.lock();
        st.stopping = true;
        st.stop_deadline = Some(Instant::now() + grace);
        self.pump(&mut st);
        drop(st);
        self.wake.notify_one();
    }
}

/// Capped, jittered exponential backoff for reconnects (rumqttc has none).
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Backoff::MIN }
    }
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(1);

    fn next(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let jitter = rand::random_range(0.8..1.2);
        base.mul_f64(jitter)
    }

    fn reset(&mut self) {
        *self = Backoff::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{ConnRef, Outbox};
    use clap::Parser;
    use rumqttc::{PubAck, SubAck, SubscribeReasonCode};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: crate::config::ServeArgs,
    }

    /// A bus whose requests land in a channel the test reads, with an event loop that is never
    /// connected (only its `pending` list and buffered events are used).
    struct Fake {
        bus: Arc<Bus>,
        hub: Arc<Hub>,
        rx: flume::Receiver<Request>,
        el: EventLoop,
    }

    fn fake_with(args: &[&str], cap: usize) -> Fake {
        let mut v = vec!["fanout", "--mqtt-url", "mqtt://127.0.0.1:1"];
        v.extend_from_slice(args);
        let cfg = Cli::parse_from(v).serve.validate().unwrap();
        let (tx, rx) = flume::bounded(cap);
        let hub = Arc::new(Hub::new());
        let metrics = Arc::new(Metrics::new("t"));
        let bus = Bus::with_client(AsyncClient::from_senders(tx), &cfg, hub.clone(), metrics, CancellationToken::new());
        let el = EventLoop::new(MqttOptions::new("t", "127.0.0.1", 1), 10);
        Fake { bus, hub, rx, el }
    }

    fn fake() -> Fake {
        fake_with(&[], 100)
    }

    /// A queue of 20,000 bytes with a 1 s wait: three 5,000-byte messages fit, a fourth waits.
    fn small_queue() -> Fake {
        fake_with(&["--publish-queue-bytes", "20000", "--max-message-bytes", "6000", "--broker-timeout", "1s"], 100)
    }

    impl Fake {
        fn up(&mut self) {
            self.bus.link_up(&mut self.el, false);
        }

        /// The link drops; rumqttc's request channel is drained as `EventLoop::clean` would.
        fn down(&mut self) {
            self.rx.drain().for_each(drop);
            self.bus.link_lost(&mut self.el);
        }

        fn requests(&self) -> Vec<Request> {
            self.rx.drain().collect()
        }

        fn connect(&self, user: &str, id: u128) -> oneshot::Receiver<bool> {
            let (outbox, _rx) = Outbox::new(1 << 16);
            let mut first = None;
            self.hub.add_with(user, ConnRef { id, outbox }, || first = Some(self.bus.subscribe_user(user)));
            first.unwrap_or_else(|| self.bus.wait_user(user))
        }

        fn disconnect(&self, user: &str, id: u128) {
            self.hub.remove_with(user, id, || self.bus.unsubscribe_user(user));
        }

        async fn send(&self, to: &[&str], payload: &str) -> Result<(), BusError> {
            let topics: Vec<String> = to.iter().map(|u| self.bus.user_topic(u)).collect();
            self.bus.publish(&topics, Bytes::from(payload.to_string())).await
        }

        /// rumqttc wrote the next `n` handed publishes with packet ids `from..`.
        fn written(&self, from: u16, n: u16) {
            for pkid in from..from + n {
                self.bus.on_event(Event::Outgoing(Outgoing::Publish(pkid)));
            }
        }

        fn puback(&self, pkid: u16) {
            self.bus.on_event(Event::Incoming(Incoming::PubAck(PubAck::new(pkid))));
        }
    }

    fn payloads(reqs: &[Request]) -> Vec<String> {
        reqs.iter()
            .filter_map(|r| match r {
                Request::Publish(p) => Some(String::from_utf8(p.payload.to_vec()).unwrap()),
                _ => None,
            })
            .collect()
    }

    fn subscribe_topics(r: &Request) -> Vec<String> {
        match r {
            Request::Subscribe(s) => {
                let mut t: Vec<String> = s.filters.iter().map(|f| f.path.clone()).collect();
                t.sort();
                t
            }
            other => panic!("expected SUBSCRIBE, got {other:?}"),
        }
    }

    #[test]
    fn second_device_on_same_instance_does_not_resubscribe() {
        let mut f = fake();
        f.up();
        assert_eq!(subscribe_topics(&f.el.pending[0]), ["broadcast"]);
        let _a = f.connect("bob", 1);
        assert_eq!(subscribe_topics(&f.rx.try_recv().unwrap()), ["msg/bob"]);
        let _b = f.connect("bob", 2);
        assert!(f.rx.try_recv().is_err(), "second device caused broker traffic");
        f.disconnect("bob", 1);
        assert!(f.rx.try_recv().is_err(), "closing one of two devices unsubscribed");
        f.disconnect("bob", 2);
        match f.rx.try_recv().unwrap() {
            Request::Unsubscribe(u) => assert_eq!(u.topics, ["msg/bob"]),
            other => panic!("expected UNSUBSCRIBE, got {other:?}"),
        }
        assert_eq!(f.bus.subscriptions(), 1);
    }

    #[tokio::test]
    async fn while_down_nothing_is_sent_and_after_connack_subscribes_go_first() {
        let mut f = fake();
        let _alice = f.connect("alice", 1);
        f.send(&["bob"], "m0").await.unwrap();
        f.disconnect("alice", 1);
        let _carol = f.connect("carol", 2);
        assert!(f.requests().is_empty(), "requests sent while the link was down");
        f.up();
        // Subscribes are put in front of rumqttc's queue; publishes follow through the channel.
        assert_eq!(f.el.pending.len(), 1);
        assert_eq!(subscribe_topics(&f.el.pending[0]), ["broadcast", "msg/carol"]);
        assert_eq!(payloads(&f.requests()), ["m0"]);
        assert!(!f.bus.ready(), "ready before the resubscription was confirmed");
        f.bus.on_event(Event::Outgoing(Outgoing::Subscribe(9)));
        let ok = SubscribeReasonCode::Success(QOS);
        f.bus.on_event(Event::Incoming(Incoming::SubAck(SubAck::new(9, vec![ok, ok]))));
        assert!(f.bus.connected());
        // A new user while up does not make the instance unready while its SUBACK is due.
        let _dave = f.connect("dave", 3);
        assert!(f.bus.ready());
    }

    #[tokio::test]
    async fn publishes_replay_in_acceptance_order_across_two_link_failures() {
        let mut f = fake();
        f.up();
        for i in 0..6 {
            f.send(&["bob"], &format!("m{i}")).await.unwrap();
        }
        assert_eq!(payloads(&f.requests()), ["m0", "m1", "m2", "m3", "m4", "m5"]);
        f.written(1, 3);
        f.puback(1);
        f.down();
        // Accepted while down: waits behind the unacknowledged ones.
        f.send(&["bob"], "m6").await.unwrap();
        assert!(f.requests().is_empty());
        f.up();
        assert_eq!(payloads(&f.requests()), ["m1", "m2", "m3", "m4", "m5", "m6"]);
        f.written(1, 2);
        f.down();
        f.up();
        assert_eq!(payloads(&f.requests()), ["m1", "m2", "m3", "m4", "m5", "m6"]);
        f.written(1, 6);
        for pkid in 1..=6 {
            f.puback(pkid);
        }
        f.down();
        f.up();
        assert!(payloads(&f.requests()).is_empty(), "acknowledged publishes were sent again");
        assert_eq!(f.bus.queued(), (0, 0));
    }

    #[tokio::test]
    async fn a_puback_read_just_before_the_link_dropped_still_counts() {
        let mut f = fake();
        f.up();
        f.send(&["bob"], "m0").await.unwrap();
        f.send(&["bob"], "m1").await.unwrap();
        f.requests();
        // rumqttc buffered these events when the read failed; they come before the error.
        f.el.state.events.push_back(Event::Outgoing(Outgoing::Publish(1)));
        f.el.state.events.push_back(Event::Outgoing(Outgoing::Publish(2)));
        f.el.state.events.push_back(Event::Incoming(Incoming::PubAck(PubAck::new(1))));
        f.down();
        f.up();
        assert_eq!(payloads(&f.requests()), ["m1"]);
    }

    #[tokio::test]
    async fn at_most_a_window_is_handed_to_rumqttc() {
        let mut f = fake_with(&[], REQUEST_CHANNEL);
        for i in 0..WINDOW + 100 {
            f.send(&["bob"], &format!("m{i}")).await.unwrap();
        }
        f.up();
        assert_eq!(f.requests().len(), WINDOW);
        f.written(1, 10);
        for pkid in 1..=10 {
            f.puback(pkid);
        }
        assert_eq!(payloads(&f.requests()), (WINDOW..WINDOW + 10).map(|i| format!("m{i}")).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_after_the_broker_timeout_and_the_refused_message_is_never_sent() {
        let mut f = small_queue();
        let big = "x".repeat(5_000);
        for _ in 0..3 {
            f.send(&["bob"], &big).await.unwrap();
        }
        let t0 = Instant::now();
        assert_eq!(f.send(&["bob"], &format!("refused{big}")).await, Err(BusError::Unavailable));
        assert_eq!(t0.elapsed(), Duration::from_secs(1), "the wait is exactly --broker-timeout");
        f.up();
        let sent = payloads(&f.requests());
        assert_eq!(sent.len(), 3);
        assert!(!sent.iter().any(|p| p.starts_with("refused")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_puback_makes_room_for_a_waiting_sender() {
        let mut f = small_queue();
        f.up();
        let big = "x".repeat(5_000);
        for _ in 0..3 {
            f.send(&["bob"], &big).await.unwrap();
        }
        let bus = f.bus.clone();
        let late = Bytes::from(format!("late{big}"));
        let waiting = tokio::spawn(async move { bus.publish(&["msg/bob".to_string()], late).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiting.is_finished());
        f.written(1, 3);
        f.puback(2);
        assert_eq!(waiting.await.unwrap(), Ok(()));
        assert!(payloads(&f.requests()).last().is_some_and(|p| p.starts_with("late")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_to_many_is_accepted_whole_or_refused_whole() {
        let f = small_queue();
        let big = "x".repeat(5_000);
        // Larger than the whole queue (5 × 5,000): accepted into an empty queue.
        f.send(&["a", "b", "c", "d", "e"], &big).await.unwrap();
        assert_eq!(f.bus.queued().1, 5);
        // Nothing fits now: three recipients are refused together, none is queued.
        assert_eq!(f.send(&["x", "y", "z"], "small").await, Err(BusError::Unavailable));
        assert_eq!(f.bus.queued().1, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_waiting_for_room_gives_up_at_shutdown() {
        let mut v = vec!["fanout", "--mqtt-url", "mqtt://127.0.0.1:1"];
        v.extend_from_slice(&[
            "--publish-queue-bytes",
            "20000",
            "--max-message-bytes",
            "6000",
            "--broker-timeout",
            "60s",
        ]);
        let cfg = Cli::parse_from(v).serve.validate().unwrap();
        let (tx, _rx) = flume::bounded(10);
        let stop = CancellationToken::new();
        let bus = Bus::with_client(
            AsyncClient::from_senders(tx),
            &cfg,
            Arc::new(Hub::new()),
            Arc::new(Metrics::new("t")),
            stop.clone(),
        );
        let big = Bytes::from("x".repeat(10_000));
        bus.publish(&["msg/a".into()], big.clone()).await.unwrap();
        let b = bus.clone();
        let waiting = tokio::spawn(async move { b.publish(&["msg/a".into()], big).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.cancel();
        let t0 = Instant::now();
        assert_eq!(waiting.await.unwrap(), Err(BusError::Unavailable));
        assert!(t0.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn stop_disconnects_only_after_every_accepted_publish_is_acknowledged() {
        let mut f = fake();
        f.up();
        f.send(&["bob"], "m0").await.unwrap();
        f.bus.stop(Duration::from_secs(5));
        assert_eq!(f.send(&["bob"], "after stop").await, Err(BusError::Unavailable));
        let reqs = f.requests();
        assert_eq!(payloads(&reqs), ["m0"]);
        assert!(!reqs.iter().any(|r| matches!(r, Request::Disconnect(_))), "DISCONNECT before m0's PUBACK");
        // The link drops and returns before m0 is acknowledged: m0 goes out again first.
        f.written(1, 1);
        f.down();
        f.up();
        assert_eq!(payloads(&f.requests()), ["m0"]);
        f.written(1, 1);
        f.puback(1);
        assert!(matches!(f.requests().as_slice(), [Request::Disconnect(_)]));
        // With nothing waiting, stop sends DISCONNECT at once.
        let mut g = fake();
        g.up();
        g.bus.stop(Duration::from_secs(5));
        assert!(matches!(g.requests().as_slice(), [Request::Disconnect(_)]));
    }

    #[tokio::test]
    async fn requests_that_find_the_channel_full_are_retried_on_the_next_event() {
        let mut f = fake_with(&[], 2);
        f.up();
        let _a = f.connect("a", 1);
        let _b = f.connect("b", 2);
        let _c = f.connect("c", 3);
        f.send(&["a"], "m0").await.unwrap();
        assert_eq!(f.rx.len(), 2, "the channel holds two requests");
        // rumqttc takes both and writes them: there is room again.
        let first = f.requests();
        assert_eq!(first.iter().map(subscribe_topics).collect::<Vec<_>>(), [["msg/a"], ["msg/b"]]);
        f.bus.on_event(Event::Outgoing(Outgoing::Subscribe(1)));
        let next = f.requests();
        assert_eq!(subscribe_topics(&next[0]), ["msg/c"]);
        assert_eq!(payloads(&next), ["m0"]);
        // An UNSUBSCRIBE that finds the channel full is sent once there is room too.
        let _d = f.connect("d", 4);
        let _e = f.connect("e", 5);
        f.disconnect("a", 1);
        f.requests();
        f.bus.on_event(Event::Outgoing(Outgoing::Subscribe(2)));
        match f.requests().as_slice() {
            [Request::Unsubscribe(u)] => assert_eq!(u.topics, ["msg/a"]),
            other => panic!("expected the retried UNSUBSCRIBE, got {other:?}"),
        }
    }

    /// Packets in `buf` (fixed header, one-byte remaining length: the test's are short) and
    /// whether the last one is whole.
    fn packets(buf: &[u8]) -> (Vec<u8>, bool) {
        let (mut kinds, mut at) = (Vec::new(), 0);
        while at + 2 <= buf.len() {
            let len = buf[at + 1] as usize;
            assert!(len < 128, "a test packet is short");
            if at + 2 + len > buf.len() {
                return (kinds, false);
            }
            kinds.push(buf[at] >> 4);
            at += 2 + len;
        }
        (kinds, at == buf.len())
    }

    /// The patched rumqttc (`patches/README.md`): publishes already waiting in the request
    /// channel leave with the first one, so a single poll of the event loop puts every one of
    /// them on the wire. Unpatched, one poll writes one publish and the read below times out.
    #[tokio::test]
    async fn publishes_waiting_in_the_channel_leave_with_the_first_in_one_poll() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = BrokerTarget { host: "127.0.0.1".into(), port, username: None, password: None };
        let (client, mut el) = AsyncClient::new(mqtt_options("batch-test", &target, 1024, true), 100);
        let broker = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            while !packets(&buf).1 || buf.is_empty() {
                s.read_buf(&mut buf).await.unwrap();
            }
            assert_eq!(packets(&buf).0, [1], "CONNECT");
            s.write_all(&[0x20, 2, 0, 0]).await.unwrap();
            s
        });
        let first = tokio::time::timeout(Duration::from_secs(5), el.poll()).await.unwrap().unwrap();
        assert!(matches!(first, Event::Incoming(Packet::ConnAck(_))), "{first:?}");
        let mut s = broker.await.unwrap();

        for i in 0..10 {
            client.try_publish(format!("msg/u{i}"), QOS, false, vec![b'x'; 20]).unwrap();
        }
        let polled = tokio::time::timeout(Duration::from_secs(5), el.poll()).await.unwrap().unwrap();
        assert!(matches!(polled, Event::Outgoing(Outgoing::Publish(1))), "{polled:?}");
        let mut buf = Vec::new();
        while packets(&buf).0.len() < 10 {
            match tokio::time::timeout(Duration::from_secs(2), s.read_buf(&mut buf)).await {
                Ok(r) => assert!(r.unwrap() > 0, "the client closed"),
                Err(_) => break,
            }
        }
        let (kinds, whole) = packets(&buf);
        assert_eq!(kinds, [3; 10], "ten PUBLISHes after one poll");
        assert!(whole);
        // Every request still yields its own event, in order, without touching the network.
        for pkid in 2..=10 {
            let ev = tokio::time::timeout(Duration::from_secs(1), el.poll()).await.unwrap().unwrap();
            assert!(matches!(ev, Event::Outgoing(Outgoing::Publish(p)) if p == pkid), "{ev:?}");
        }
    }

    #[test]
    fn backoff_doubles_from_100ms_to_a_1s_cap_with_jitter_and_resets() {
        let mut b = Backoff::default();
        let within = |d: Duration, base_ms: u64| {
            let base = Duration::from_millis(base_ms);
            assert!(d >= base.mul_f64(0.8) && d <= base.mul_f64(1.2), "{d:?} not within ±20 % of {base:?}");
        };
        for base in [100, 200, 400, 800, 1000, 1000, 1000] {
            within(b.next(), base);
        }
        b.reset();
        within(b.next(), 100);
    }
}
