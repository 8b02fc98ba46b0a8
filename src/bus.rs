//! The MQTT side: one rumqttc connection per instance.
//!
//! * **Subscriptions.** The bus keeps the set of topics it wants (user topics of local
//!   connections + the broadcast topic). rumqttc remembers none of them across a session-less
//!   reconnect, so on every ConnAck the bus subscribes to all of them again, ahead of anything
//!   else. A topic is *confirmed* when the SUBACK of a SUBSCRIBE sent for its current
//!   generation arrives; sessions wait for that before sending `connected`, and `/readyz` is
//!   200 only while every wanted topic is confirmed.
//! * **Matching SUBACKs.** rumqttc gives no per-request future. Subscribe requests are sent
//!   under the bus lock and recorded in `requested` in channel order; the event loop reports
//!   `Outgoing::Subscribe(pkid)` in the same order, which moves the entry to `inflight[pkid]`,
//!   and the SUBACK with that pkid confirms it. When the link drops, requests that never got
//!   out are taken back out of rumqttc's `pending` list and their entries dropped, so the two
//!   orders never drift apart.
//! * **Persistent session.** The client id is `fanout-<instance-id>`. The first connect is
//!   clean (it wipes a session left by an earlier process with the same id), then the bus
//!   reconnects with `clean_session = false`, so during a broker-link outage the broker
//!   queues what arrives for this instance's users. On shutdown the session is ended by a
//!   clean reconnect, so no session of a stopped instance stays on the broker.
//! * **Nothing acked is dropped.** Publishes that were in flight or queued when the link
//!   dropped are retransmitted after reconnect, also when the broker lost the session
//!   (rumqttc would otherwise discard them).
//! * **Never blocks the loop.** The event loop task never awaits the client; other tasks
//!   publish with a bounded wait and get [`BusError::Unavailable`] after it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use rumqttc::{
    AsyncClient, ConnectionError, Disconnect, Event, EventLoop, Incoming, MqttOptions, NetworkOptions, Outgoing,
    Packet, Publish, QoS, Request, Subscribe, SubscribeFilter, SubscribeReasonCode, Unsubscribe,
};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{BrokerTarget, Config};
use crate::hub::Hub;
use crate::metrics::{Drop, Metrics};
use crate::wire;

/// Topics per SUBSCRIBE when resubscribing (keeps each packet far below packet limits).
const RESUBSCRIBE_CHUNK: usize = 64;
/// Room for the envelope around the client's frame in a publish.
pub const ENVELOPE_SLACK: usize = 8 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("the broker did not accept the message in time")]
    Unavailable,
}

#[derive(Debug)]
struct TopicState {
    generation: u64,
    confirmed: bool,
    waiters: Vec<oneshot::Sender<bool>>,
}

#[derive(Debug, Default)]
struct Subs {
    wanted: HashMap<String, TopicState>,
    unconfirmed: usize,
    next_generation: u64,
    /// Subscribe requests handed to rumqttc, not yet written, in channel order.
    requested: VecDeque<Vec<(String, u64)>>,
    /// Written subscribe requests waiting for their SUBACK, by packet id.
    inflight: HashMap<u16, VecDeque<Vec<(String, u64)>>>,
    /// Unsubscribes that were lost with the link; re-sent if the broker kept our session.
    lost_unsubs: HashSet<String>,
    /// Topics we unsubscribed from because a message arrived for a user not held here.
    healing: HashSet<String>,
}

impl Subs {
    fn set_confirmed(&mut self, topic: &str, generation: u64, ok: bool) {
        let Some(t) = self.wanted.get_mut(topic) else { return };
        if t.generation != generation || t.confirmed {
            return;
        }
        if ok {
            t.confirmed = true;
            self.unconfirmed -= 1;
        }
        for w in t.waiters.drain(..) {
            let _ = w.send(ok);
        }
    }

    fn unconfirm_all(&mut self) {
        for t in self.wanted.values_mut() {
            t.confirmed = false;
        }
        self.unconfirmed = self.wanted.len();
    }
}

/// The instance's MQTT connection.
pub struct Bus {
    client: AsyncClient,
    subs: Mutex<Subs>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    prefix: String,
    broadcast_topic: String,
    connected: AtomicBool,
    broker_wait: Duration,
    max_publish_bytes: usize,
    stopping: AtomicBool,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("connected", &self.connected).finish()
    }
}

/// Builds the rumqttc options for `cfg` (first connect is clean; see module docs).
pub fn mqtt_options(cfg: &Config) -> MqttOptions {
    let BrokerTarget { host, port, username, password, .. } = &cfg.broker;
    let mut o = MqttOptions::new(format!("fanout-{}", cfg.instance_id), host.clone(), *port);
    o.set_keep_alive(Duration::from_secs(10));
    o.set_clean_session(true);
    let max_out = cfg.max_message_bytes + ENVELOPE_SLACK;
    // Incoming may be larger than what we publish (operators inject with mosquitto_pub); a
    // too-large incoming packet would otherwise cost a reconnect loop.
    o.set_max_packet_size(max_out.max(1 << 20) * 2, max_out);
    o.set_inflight(200);
    if let Some(u) = username {
        o.set_credentials(u.clone(), password.clone().unwrap_or_default());
    }
    o
}

impl Bus {
    /// Creates the bus and its event loop; run the loop with [`Bus::run`].
    pub fn new(cfg: &Config, hub: Arc<Hub>, metrics: Arc<Metrics>) -> (Arc<Bus>, EventLoop) {
        let (client, mut eventloop) = AsyncClient::new(mqtt_options(cfg), cfg.publish_queue);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(5);
        eventloop.set_network_options(net);
        (Bus::with_client(client, cfg, hub, metrics), eventloop)
    }

    /// A bus over any client handle (unit tests pass one made by `AsyncClient::from_senders`).
    pub fn with_client(client: AsyncClient, cfg: &Config, hub: Arc<Hub>, metrics: Arc<Metrics>) -> Arc<Bus> {
        let bus = Arc::new(Bus {
            client,
            subs: Mutex::new(Subs::default()),
            hub,
            metrics,
            prefix: cfg.topic_prefix.clone(),
            broadcast_topic: cfg.broadcast_topic.clone(),
            connected: AtomicBool::new(false),
            broker_wait: cfg.broker_wait,
            max_publish_bytes: cfg.max_message_bytes + ENVELOPE_SLACK,
            stopping: AtomicBool::new(false),
        });
        // The broadcast topic is wanted for the whole life of the instance.
        let bt = bus.broadcast_topic.clone();
        drop(bus.want(bt));
        bus
    }

    pub fn user_topic(&self, user: &str) -> String {
        format!("{}{}", self.prefix, user)
    }

    /// True while the link is up and every wanted topic is confirmed.
    pub fn ready(&self) -> bool {
        self.connected.load(Ordering::Acquire) && self.subs.lock().unconfirmed == 0
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Number of wanted topics (user topics + broadcast).
    pub fn subscriptions(&self) -> usize {
        self.subs.lock().wanted.len()
    }

    /// Starts wanting `topic` (a user's first local connection): SUBSCRIBE now if the link is
    /// up, or on the next ConnAck. The receiver says `true` once the broker confirmed it.
    fn want(&self, topic: String) -> oneshot::Receiver<bool> {
        let (tx, rx) = oneshot::channel();
        let mut s = self.subs.lock();
        s.healing.remove(&topic);
        s.lost_unsubs.remove(&topic);
        s.next_generation += 1;
        let generation = s.next_generation;
        if let Some(t) = s.wanted.get_mut(&topic) {
            // Wanted already (cannot happen for user topics: the hub says First once).
            t.waiters.push(tx);
            return rx;
        }
        s.wanted.insert(topic.clone(), TopicState { generation, confirmed: false, waiters: vec![tx] });
        s.unconfirmed += 1;
        self.metrics.set_subscriptions(s.wanted.len());
        // Sent under the lock so that `requested` stays in channel order. A full channel
        // (broker down for long) is fine: the ConnAck resubscribe covers every wanted topic.
        if self.client.try_subscribe(topic.clone(), QoS::AtLeastOnce).is_ok() {
            s.requested.push_back(vec![(topic, generation)]);
        }
        rx
    }

    /// Call under the hub lock on a user's first local connection.
    pub fn subscribe_user(&self, user: &str) -> oneshot::Receiver<bool> {
        self.want(self.user_topic(user))
    }

    /// A receiver that says `true` once `user`'s topic is confirmed (at once if it is).
    pub fn wait_user(&self, user: &str) -> oneshot::Receiver<bool> {
        let (tx, rx) = oneshot::channel();
        let mut s = self.subs.lock();
        match s.wanted.get_mut(&self.user_topic(user)) {
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

    /// Call under the hub lock when a user's last local connection went.
    pub fn unsubscribe_user(&self, user: &str) {
        let topic = self.user_topic(user);
        let mut s = self.subs.lock();
        if let Some(t) = s.wanted.remove(&topic) {
            if !t.confirmed {
                s.unconfirmed -= 1;
            }
        }
        self.metrics.set_subscriptions(s.wanted.len());
        if self.client.try_unsubscribe(topic.clone()).is_err() {
            s.lost_unsubs.insert(topic);
        }
    }

    /// Hands a publish to the broker connection (QoS 1), waiting at most `broker_wait` for
    /// room in the request queue.
    pub async fn publish(&self, topic: String, payload: Bytes) -> Result<(), BusError> {
        if payload.len() > self.max_publish_bytes || self.stopping.load(Ordering::Acquire) {
            return Err(BusError::Unavailable);
        }
        let started = std::time::Instant::now();
        let handed =
            tokio::time::timeout(self.broker_wait, self.client.publish_bytes(topic, QoS::AtLeastOnce, false, payload))
                .await;
        self.metrics.publish_wait(started.elapsed());
        match handed {
            Ok(Ok(())) => {
                self.metrics.published(1);
                Ok(())
            }
            _ => {
                self.metrics.dropped(Drop::Unavailable);
                Err(BusError::Unavailable)
            }
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
                    self.metrics.dropped(Drop::NoLocalUser);
                    self.heal(&p.topic);
                    return;
                }
            }
        } else {
            self.metrics.dropped(Drop::UnknownTopic);
            return;
        };
        self.metrics.delivered(fanned.delivered);
        if fanned.duplicate {
            self.metrics.dropped(Drop::Duplicate);
        }
        for _ in 0..fanned.overflowed {
            self.metrics.dropped(Drop::SlowConsumer);
        }
    }

    /// A message arrived on a user topic nobody here holds: an unsubscribe got lost (for
    /// example with the link, while the broker kept our session). Unsubscribe once more.
    fn heal(&self, topic: &str) {
        let mut s = self.subs.lock();
        if s.wanted.contains_key(topic) || s.healing.contains(topic) {
            return;
        }
        if self.client.try_unsubscribe(topic.to_string()).is_ok() {
            debug!(topic, "unsubscribing a topic with no local user");
            s.healing.insert(topic.to_string());
        }
    }

    fn on_outgoing_subscribe(&self, pkid: u16) {
        let mut s = self.subs.lock();
        if let Some(batch) = s.requested.pop_front() {
            s.inflight.entry(pkid).or_default().push_back(batch);
        }
    }

    fn on_suback(&self, pkid: u16, codes: &[SubscribeReasonCode]) {
        let mut s = self.subs.lock();
        let Some(q) = s.inflight.get_mut(&pkid) else { return };
        let Some(batch) = q.pop_front() else { return };
        if q.is_empty() {
            s.inflight.remove(&pkid);
        }
        for (i, (topic, generation)) in batch.iter().enumerate() {
            let ok = matches!(codes.get(i), Some(SubscribeReasonCode::Success(_)));
            if !ok {
                warn!(topic, "broker refused the subscription");
            }
            s.set_confirmed(topic, *generation, ok);
        }
        self.metrics.set_ready(self.connected() && s.unconfirmed == 0);
    }

    /// The link dropped (rumqttc already moved unsent requests into `pending`): account for
    /// what was lost and keep the publishes to send after reconnect.
    fn link_lost(&self, el: &mut EventLoop, stash: &mut Vec<Request>) {
        self.connected.store(false, Ordering::Release);
        self.metrics.mqtt_down();
        self.metrics.set_ready(false);
        // Events produced before the failure still count (incoming publishes were read).
        while let Some(ev) = el.state.events.pop_front() {
            self.on_event(ev);
        }
        let mut s = self.subs.lock();
        s.inflight.clear();
        for req in el.pending.drain(..) {
            match req {
                Request::Subscribe(_) => {
                    s.requested.pop_front();
                }
                Request::Unsubscribe(u) => s.lost_unsubs.extend(u.topics),
                Request::Publish(_) => stash.push(req),
                _ => {}
            }
        }
        s.unconfirm_all();
    }

    /// Link is (back) up: resubscribe everything wanted, re-send lost unsubscribes if the
    /// broker kept our session, then the publishes that were not acknowledged.
    fn link_up(&self, el: &mut EventLoop, session_present: bool, stash: &mut Vec<Request>) {
        let mut s = self.subs.lock();
        s.inflight.clear();
        s.healing.clear();
        s.unconfirm_all();
        let topics: Vec<(String, u64)> = s.wanted.iter().map(|(t, st)| (t.clone(), st.generation)).collect();
        let batches: Vec<Vec<(String, u64)>> = topics.chunks(RESUBSCRIBE_CHUNK).map(|c| c.to_vec()).collect();
        let mut front: Vec<Request> = Vec::with_capacity(batches.len() + stash.len() + 1);
        for b in batches.iter() {
            let filters = b.iter().map(|(t, _)| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce)).collect::<Vec<_>>();
            front.push(Request::Subscribe(Subscribe::new_many(filters)));
        }
        for b in batches.into_iter().rev() {
            s.requested.push_front(b);
        }
        let lost_all = std::mem::take(&mut s.lost_unsubs);
        let lost: Vec<String> = lost_all.into_iter().filter(|t| !s.wanted.contains_key(t)).collect();
        if session_present && !lost.is_empty() {
            for chunk in lost.chunks(RESUBSCRIBE_CHUNK) {
                front.push(Request::Unsubscribe(Unsubscribe { pkid: 0, topics: chunk.to_vec() }));
            }
        }
        front.append(stash);
        for r in front.into_iter().rev() {
            el.pending.push_front(r);
        }
        self.connected.store(true, Ordering::Release);
        self.metrics.set_ready(s.unconfirmed == 0);
    }

    fn on_event(&self, ev: Event) {
        match ev {
            Event::Incoming(Incoming::Publish(p)) => self.route(p),
            Event::Incoming(Incoming::SubAck(a)) => self.on_suback(a.pkid, &a.return_codes),
            Event::Outgoing(Outgoing::Subscribe(pkid)) => self.on_outgoing_subscribe(pkid),
            _ => {}
        }
    }

    /// Runs the event loop until [`Bus::stop`] has ended the session or `shutdown` fires
    /// while the link is down.
    pub async fn run(self: Arc<Self>, mut el: EventLoop, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        let mut stash: Vec<Request> = Vec::new();
        let mut wiping = true;
        let mut ever_up = false;
        let mut down_since: Option<std::time::Instant> = None;
        // After we wrote a DISCONNECT: wait (bounded) for the broker to close the connection
        // before dropping it. Closing at once made Mosquitto 2.0 fail its PUBACK writes for
        // publishes still in its read buffer and drop them ("disconnected due to out of
        // memory", mosquitto#2627/#3253) — acked messages lost at shutdown.
        let mut closing: Option<(tokio::time::Instant, AfterClose)> = None;
        loop {
            let polled = match closing {
                Some((deadline, _)) => {
                    tokio::time::timeout_at(deadline, el.poll()).await.unwrap_or(Err(ConnectionError::NetworkTimeout))
                }
                None => el.poll().await,
            };
            if let Some((_, next)) = closing {
                match polled {
                    Ok(ev) => self.on_event(ev),
                    Err(_) => {
                        closing = None;
                        el.network = None;
                        el.clean();
                        match next {
                            AfterClose::Persist => self.link_lost(&mut el, &mut stash),
                            AfterClose::EndSession => {
                                // End the persistent session with a clean reconnect.
                                el.mqtt_options.set_clean_session(true);
                                el.pending.clear();
                            }
                            AfterClose::Exit => {
                                info!("broker session ended");
                                break;
                            }
                        }
                    }
                }
                continue;
            }
            match polled {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff.reset();
                    if wiping {
                        // Clean connect done: any stale session with our id is gone. Now
                        // leave and come back with a persistent session.
                        el.mqtt_options.set_clean_session(false);
                        el.pending.push_front(Request::Disconnect(Disconnect));
                        continue;
                    }
                    if self.stopping.load(Ordering::Acquire) {
                        // Clean reconnect that ended our session: now leave for good.
                        el.pending.push_front(Request::Disconnect(Disconnect));
                        continue;
                    }
                    self.link_up(&mut el, ack.session_present, &mut stash);
                    self.metrics.mqtt_up(ever_up);
                    match down_since.take() {
                        Some(t) => info!(
                            session_present = ack.session_present,
                            down_ms = t.elapsed().as_millis() as u64,
                            "broker link restored"
                        ),
                        None => info!("broker link up"),
                    }
                    ever_up = true;
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    let next = if wiping {
                        wiping = false;
                        AfterClose::Persist
                    } else if self.stopping.load(Ordering::Acquire) && !el.mqtt_options.clean_session() {
                        AfterClose::EndSession
                    } else {
                        AfterClose::Exit
                    };
                    closing = Some((tokio::time::Instant::now() + CLOSE_WAIT, next));
                }
                Ok(ev) => self.on_event(ev),
                Err(e) => {
                    let was_up = self.connected();
                    self.link_lost(&mut el, &mut stash);
                    if was_up || down_since.is_none() {
                        warn!(error = %e, "broker link down; reconnecting with backoff");
                        down_since.get_or_insert_with(std::time::Instant::now);
                    } else {
                        debug!(error = %e, "broker still unreachable");
                    }
                    if shutdown.is_cancelled()
                        && (self.stopping.load(Ordering::Acquire) || matches!(e, ConnectionError::RequestsDone))
                    {
                        warn!("stopping while the broker link is down: the broker may keep this instance's session until it expires");
                        break;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next()) => {}
                        _ = shutdown.cancelled(), if self.stopping.load(Ordering::Acquire) => {
                            warn!("stopping while the broker link is down: the broker may keep this instance's session until it expires");
                            break;
                        }
                    }
                }
            }
        }
        self.connected.store(false, Ordering::Release);
        self.metrics.mqtt_down();
    }

    /// Ends the broker session: everything already handed over is sent first (MQTT keeps
    /// order), then the persistent session is removed. Returns at once; await the task
    /// running [`Bus::run`] to know it finished.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        if tokio::time::timeout(self.broker_wait, self.client.disconnect()).await.is_err() {
            warn!("could not queue the broker DISCONNECT in time");
        }
    }
}

/// What to do once the broker closed the connection after our DISCONNECT.
#[derive(Debug, Clone, Copy)]
enum AfterClose {
    /// The start-up wipe is done: connect again with a persistent session.
    Persist,
    /// Shutdown, first DISCONNECT (everything before it was processed, in order): remove the
    /// persistent session with a clean reconnect.
    EndSession,
    /// Shutdown, session removed: stop.
    Exit,
}

/// Longest wait for the broker to close the connection after our DISCONNECT.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Capped, jittered exponential backoff for reconnects (rumqttc has none).
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Duration::from_millis(100) }
    }
}

impl Backoff {
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

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: crate::config::ServeArgs,
    }

    fn fake() -> (Arc<Bus>, Arc<Hub>, flume::Receiver<Request>) {
        let cfg = Cli::parse_from(["fanout", "--mqtt-url", "mqtt://127.0.0.1:1"]).serve.validate().unwrap();
        let (tx, rx) = flume::bounded(100);
        let hub = Arc::new(Hub::new());
        let bus = Bus::with_client(AsyncClient::from_senders(tx), &cfg, hub.clone(), Arc::new(Metrics::new("t")));
        (bus, hub, rx)
    }

    fn subscribe_topics(r: &Request) -> Vec<String> {
        match r {
            Request::Subscribe(s) => s.filters.iter().map(|f| f.path.clone()).collect(),
            other => panic!("expected SUBSCRIBE, got {other:?}"),
        }
    }

    fn connect(bus: &Bus, hub: &Hub, user: &str, id: u128) -> oneshot::Receiver<bool> {
        let (outbox, _rx) = Outbox::new(1 << 16);
        let mut first = None;
        hub.add_with(user, ConnRef { id, outbox }, || first = Some(bus.subscribe_user(user)));
        first.unwrap_or_else(|| bus.wait_user(user))
    }

    fn disconnect(bus: &Bus, hub: &Hub, user: &str, id: u128) {
        hub.remove_with(user, id, || bus.unsubscribe_user(user));
    }

    #[test]
    fn second_device_on_same_instance_does_not_resubscribe() {
        let (bus, hub, rx) = fake();
        assert_eq!(subscribe_topics(&rx.try_recv().unwrap()), ["broadcast"]);
        let _a = connect(&bus, &hub, "bob", 1);
        assert_eq!(subscribe_topics(&rx.try_recv().unwrap()), ["msg/bob"]);
        let _b = connect(&bus, &hub, "bob", 2);
        assert!(rx.try_recv().is_err(), "second device caused broker traffic");
        disconnect(&bus, &hub, "bob", 1);
        assert!(rx.try_recv().is_err(), "closing one of two devices unsubscribed");
        disconnect(&bus, &hub, "bob", 2);
        match rx.try_recv().unwrap() {
            Request::Unsubscribe(u) => assert_eq!(u.topics, ["msg/bob"]),
            other => panic!("expected UNSUBSCRIBE, got {other:?}"),
        }
        assert_eq!(bus.subscriptions(), 1);
    }

    #[tokio::test]
    async fn suback_confirms_in_request_order_and_readiness_follows() {
        let (bus, hub, _rx) = fake();
        bus.connected.store(true, Ordering::Release);
        let alice = connect(&bus, &hub, "alice", 1);
        let bob = connect(&bus, &hub, "bob", 2);
        let bob2 = connect(&bus, &hub, "bob", 3);
        assert!(!bus.ready());
        // broadcast, alice, bob were written with packet ids 1, 2, 3.
        for pkid in 1..=3 {
            bus.on_event(Event::Outgoing(Outgoing::Subscribe(pkid)));
        }
        let ok = [SubscribeReasonCode::Success(QoS::AtLeastOnce)];
        bus.on_suback(1, &ok);
        bus.on_suback(3, &[SubscribeReasonCode::Failure]);
        assert!(!bob.await.unwrap());
        assert!(!bob2.await.unwrap());
        bus.on_suback(2, &ok);
        assert!(alice.await.unwrap());
        assert!(!bus.ready(), "bob's refused topic is still wanted and unconfirmed");
        disconnect(&bus, &hub, "bob", 2);
        disconnect(&bus, &hub, "bob", 3);
        assert!(bus.ready());
    }

    #[tokio::test]
    async fn link_loss_keeps_publishes_and_resubscribes_first() {
        let (bus, hub, _rx) = fake();
        let mut el = EventLoop::new(MqttOptions::new("t", "127.0.0.1", 1), 10);
        // broadcast was written and is in flight; alice's SUBSCRIBE and a publish were still
        // queued when the link dropped (rumqttc moved them into `pending`).
        bus.on_event(Event::Outgoing(Outgoing::Subscribe(1)));
        let _alice = connect(&bus, &hub, "alice", 1);
        el.pending.push_back(Request::Subscribe(Subscribe::new("msg/alice", QoS::AtLeastOnce)));
        el.pending.push_back(Request::Publish(Publish::new("msg/bob", QoS::AtLeastOnce, "acked")));
        el.pending.push_back(Request::Unsubscribe(Unsubscribe::new("msg/gone")));
        let mut stash = Vec::new();
        bus.link_lost(&mut el, &mut stash);
        assert!(el.pending.is_empty());
        assert_eq!(stash.len(), 1);
        assert!(bus.subs.lock().requested.is_empty());
        bus.link_up(&mut el, true, &mut stash);
        let kinds: Vec<&str> = el
            .pending
            .iter()
            .map(|r| match r {
                Request::Subscribe(_) => "sub",
                Request::Unsubscribe(_) => "unsub",
                Request::Publish(_) => "pub",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["sub", "unsub", "pub"]);
        let mut topics = subscribe_topics(&el.pending[0]);
        topics.sort();
        assert_eq!(topics, ["broadcast", "msg/alice"]);
        // Its SUBACK confirms both, and only then is the instance ready.
        assert!(!bus.ready());
        bus.on_event(Event::Outgoing(Outgoing::Subscribe(7)));
        bus.on_suback(7, &[SubscribeReasonCode::Success(QoS::AtLeastOnce); 2]);
        assert!(bus.ready());
    }

    #[test]
    fn backoff_grows_to_a_cap_and_resets() {
        let mut b = Backoff::default();
        let first = b.next();
        assert!(first <= Duration::from_millis(120));
        for _ in 0..20 {
            assert!(b.next() <= Backoff::MAX.mul_f64(1.2));
        }
        b.reset();
        assert!(b.next() <= Duration::from_millis(120));
    }
}
