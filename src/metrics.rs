//! Every metric of the instance in one struct, with verb methods, rendered as Prometheus
//! (OpenMetrics) text by `prometheus-client`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BrokerLabel {
    broker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Outcome of one `POST /api/publish` (label `result` of `fanout_api_publish_requests_total`).
#[derive(Debug, Clone, Copy)]
pub enum ApiResult {
    /// 202: handed to the broker connection.
    Accepted,
    /// 400: malformed body.
    BadRequest,
    /// 401: missing or wrong API key.
    Unauthorized,
    /// 503: broker link down, shutting down, or no room in time.
    Unavailable,
}

impl ApiResult {
    pub const ALL: [ApiResult; 4] =
        [ApiResult::Accepted, ApiResult::BadRequest, ApiResult::Unauthorized, ApiResult::Unavailable];

    fn label(self) -> &'static str {
        match self {
            ApiResult::Accepted => "accepted",
            ApiResult::BadRequest => "bad_request",
            ApiResult::Unauthorized => "unauthorized",
            ApiResult::Unavailable => "unavailable",
        }
    }
}

/// Buckets of `fanout_delivery_latency_seconds`: 20 µs to 10 s (on an idle loopback most
/// frames take under 100 µs).
const DELIVERY_BUCKETS: [f64; 18] = [
    0.00002, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];
/// Buckets of `fanout_publish_wait_seconds`: 1 µs (room at once) to 10 s (beyond any
/// sensible --broker-timeout).
const PUBLISH_WAIT_BUCKETS: [f64; 16] =
    [0.000001, 0.000005, 0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    version: String,
    instance_id: String,
}

/// Why a message or frame was dropped (label `reason` of `fanout_dropped_total`).
#[derive(Debug, Clone, Copy)]
pub enum DropReason {
    /// Broker delivered a message for a user with no local connection.
    NoLocalUser,
    /// A connection's outbox overflowed; it was closed with 4008.
    SlowConsumer,
    /// A redelivered message id was not written twice.
    Duplicate,
    /// Publish could not be handed to the broker connection in time.
    Unavailable,
    /// Sender exceeded its rate limit.
    RateLimited,
    /// Inbound broker message on a topic fanout does not serve.
    UnknownTopic,
    /// An accepted publish the broker dropped the link over every time it was written (5
    /// times): set aside so the messages behind it go on.
    BrokerRefused,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::NoLocalUser,
        DropReason::SlowConsumer,
        DropReason::Duplicate,
        DropReason::Unavailable,
        DropReason::RateLimited,
        DropReason::UnknownTopic,
        DropReason::BrokerRefused,
    ];

    fn label(self) -> &'static str {
        match self {
            DropReason::NoLocalUser => "no_local_user",
            DropReason::SlowConsumer => "slow_consumer",
            DropReason::Duplicate => "duplicate",
            DropReason::Unavailable => "unavailable",
            DropReason::RateLimited => "rate_limited",
            DropReason::UnknownTopic => "unknown_topic",
            DropReason::BrokerRefused => "broker_refused",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    connections: Gauge,
    users: Gauge,
    subscriptions: Gauge,
    messages_in: Family<SourceLabel, Counter>,
    delivered: Counter,
    published: Counter,
    dropped: Family<ReasonLabel, Counter>,
    client_errors: Family<CodeLabel, Counter>,
    mqtt_connected: Gauge,
    mqtt_reconnects: Counter,
    mqtt_broker: Family<BrokerLabel, Gauge>,
    connects: Counter,
    slow_consumers: Counter,
    auth_failures: Counter,
    ready: Gauge<i64, std::sync::atomic::AtomicI64>,
    delivery_latency: Histogram,
    publish_wait: Histogram,
    outbox_queued: Gauge,
    outbox_max_queued: Gauge,
    publish_queue_bytes: Gauge,
    publish_queue_messages: Gauge,
    api_publish: Family<ResultLabel, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new(instance_id: &str) -> Self {
        let mut r = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            connections: Gauge::default(),
            users: Gauge::default(),
            subscriptions: Gauge::default(),
            messages_in: Family::default(),
            delivered: Counter::default(),
            published: Counter::default(),
            dropped: Family::default(),
            client_errors: Family::default(),
            mqtt_connected: Gauge::default(),
            mqtt_reconnects: Counter::default(),
            mqtt_broker: Family::default(),
            connects: Counter::default(),
            slow_consumers: Counter::default(),
            auth_failures: Counter::default(),
            ready: Gauge::default(),
            delivery_latency: Histogram::new(DELIVERY_BUCKETS),
            publish_wait: Histogram::new(PUBLISH_WAIT_BUCKETS),
            outbox_queued: Gauge::default(),
            outbox_max_queued: Gauge::default(),
            publish_queue_bytes: Gauge::default(),
            publish_queue_messages: Gauge::default(),
            api_publish: Family::default(),
        };
        r.register("fanout_connections", "Open WebSocket connections on this instance", m.connections.clone());
        r.register("fanout_users", "Distinct users with at least one connection on this instance", m.users.clone());
        r.register(
            "fanout_subscriptions",
            "MQTT topics this instance wants subscribed (user topics + broadcast)",
            m.subscriptions.clone(),
        );
        r.register("fanout_messages_in", "Messages received, by source: ws (client frames that were chat messages) or mqtt (publishes from the broker)", m.messages_in.clone());
        r.register(
            "fanout_messages_delivered",
            "Frames written into local connections' outboxes from the broker",
            m.delivered.clone(),
        );
        r.register(
            "fanout_messages_published",
            "MQTT publishes the broker acknowledged (PUBACK), one per recipient topic",
            m.published.clone(),
        );
        r.register("fanout_dropped", "Messages not delivered or not published, by reason", m.dropped.clone());
        r.register("fanout_client_errors", "error frames sent to clients, by code", m.client_errors.clone());
        r.register("fanout_mqtt_connected", "1 while the broker link is up", m.mqtt_connected.clone());
        r.register(
            "fanout_mqtt_reconnects",
            "Broker link re-establishments after the first connect",
            m.mqtt_reconnects.clone(),
        );
        r.register(
            "fanout_mqtt_broker",
            "1 for the broker node (host:port) the link is up to; no sample while it is down",
            m.mqtt_broker.clone(),
        );
        r.register("fanout_connects", "WebSocket connections accepted (connected frame sent)", m.connects.clone());
        r.register(
            "fanout_slow_consumers",
            "Connections closed with 4008 because their outbound queue overflowed",
            m.slow_consumers.clone(),
        );
        r.register("fanout_auth_failures", "Upgrade requests refused with 401", m.auth_failures.clone());
        r.register("fanout_ready", "1 while /readyz answers 200", m.ready.clone());
        r.register(
            "fanout_delivery_latency_seconds",
            "Time from a broker message's fan-out into a connection's outbox (right after it was read from MQTT) to the end of its socket write",
            m.delivery_latency.clone(),
        );
        r.register(
            "fanout_publish_wait_seconds",
            "Time a message waited for room in the publish queue (--publish-queue-bytes), refusals included",
            m.publish_wait.clone(),
        );
        r.register(
            "fanout_outbox_queued_bytes",
            "Bytes of frames waiting in all connections' outboxes (sampled at scrape)",
            m.outbox_queued.clone(),
        );
        r.register(
            "fanout_outbox_max_queued_bytes",
            "Bytes waiting in the fullest single outbox (sampled at scrape); 4008 comes at --send-queue",
            m.outbox_max_queued.clone(),
        );
        r.register(
            "fanout_publish_queue_bytes",
            "Bytes of accepted (acked) publishes the broker has not acknowledged yet (sampled at scrape); senders get `unavailable` at --publish-queue-bytes",
            m.publish_queue_bytes.clone(),
        );
        r.register(
            "fanout_publish_queue_messages",
            "Accepted publishes the broker has not acknowledged yet, one per recipient topic (sampled at scrape)",
            m.publish_queue_messages.clone(),
        );
        r.register(
            "fanout_api_publish_requests",
            "POST /api/publish requests, by result: accepted, bad_request, unauthorized, unavailable",
            m.api_publish.clone(),
        );
        let info: Family<InfoLabels, Gauge> = Family::default();
        info.get_or_create(&InfoLabels {
            version: env!("CARGO_PKG_VERSION").to_string(),
            instance_id: instance_id.to_string(),
        })
        .set(1);
        r.register("fanout_build_info", "Build and instance information", info);
        // Every labelled series exists from the start, at 0, so dashboards and tests see it.
        for s in ["ws", "mqtt", "api"] {
            let _ = m.messages_in.get_or_create(&SourceLabel { source: s });
        }
        for d in DropReason::ALL {
            let _ = m.dropped.get_or_create(&ReasonLabel { reason: d.label() });
        }
        for c in crate::wire::ErrorCode::ALL {
            let _ = m.client_errors.get_or_create(&CodeLabel { code: c.as_str() });
        }
        for a in ApiResult::ALL {
            let _ = m.api_publish.get_or_create(&ResultLabel { result: a.label() });
        }
        Metrics { registry: r, ..m }
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn connection_opened(&self) {
        self.connections.inc();
        self.connects.inc();
    }
    pub fn connection_closed(&self) {
        self.connections.dec();
    }
    pub fn set_users(&self, n: usize) {
        self.users.set(n as i64);
    }
    pub fn set_subscriptions(&self, n: usize) {
        self.subscriptions.set(n as i64);
    }
    pub fn ws_message_in(&self) {
        self.messages_in.get_or_create(&SourceLabel { source: "ws" }).inc();
    }
    pub fn mqtt_message_in(&self) {
        self.messages_in.get_or_create(&SourceLabel { source: "mqtt" }).inc();
    }
    pub fn delivered(&self, n: usize) {
        self.delivered.inc_by(n as u64);
    }
    pub fn published(&self, n: usize) {
        self.published.inc_by(n as u64);
    }
    pub fn dropped(&self, why: DropReason) {
        self.dropped.get_or_create(&ReasonLabel { reason: why.label() }).inc();
    }
    pub fn client_error(&self, code: crate::wire::ErrorCode) {
        self.client_errors.get_or_create(&CodeLabel { code: code.as_str() }).inc();
    }
    /// The broker link is up, to node `broker` (`host:port`).
    pub fn mqtt_up(&self, reconnect: bool, broker: &str) {
        self.mqtt_connected.set(1);
        if reconnect {
            self.mqtt_reconnects.inc();
        }
        self.mqtt_broker.clear();
        self.mqtt_broker.get_or_create(&BrokerLabel { broker: broker.to_string() }).set(1);
    }
    pub fn mqtt_down(&self) {
        self.mqtt_connected.set(0);
        self.mqtt_broker.clear();
    }
    pub fn slow_consumer(&self) {
        self.slow_consumers.inc();
    }
    pub fn auth_failed(&self) {
        self.auth_failures.inc();
    }
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(ready as i64);
    }
    /// A frame that came from the broker was written to a socket; `since` is when it was
    /// put into the connection's outbox.
    pub fn delivery_latency(&self, since: std::time::Instant) {
        self.delivery_latency.observe(since.elapsed().as_secs_f64());
    }
    /// How long one `Bus::publish` waited for room toward the broker.
    pub fn publish_wait(&self, waited: std::time::Duration) {
        self.publish_wait.observe(waited.as_secs_f64());
    }
    /// Publish queue depth sampled at scrape.
    pub fn set_publish_queue(&self, bytes: usize, messages: usize) {
        self.publish_queue_bytes.set(bytes as i64);
        self.publish_queue_messages.set(messages as i64);
    }
    /// Outbox depth sampled at scrape: total bytes queued, and the largest single outbox.
    pub fn set_outbox(&self, total: usize, max: usize) {
        self.outbox_queued.set(total as i64);
        self.outbox_max_queued.set(max as i64);
    }
    pub fn api_message_in(&self) {
        self.messages_in.get_or_create(&SourceLabel { source: "api" }).inc();
    }
    pub fn api_publish(&self, r: ApiResult) {
        self.api_publish.get_or_create(&ResultLabel { result: r.label() }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spec_series_is_rendered_from_the_start() {
        let m = Metrics::new("i1");
        let text = m.render();
        for s in [
            "fanout_connections ",
            "fanout_users ",
            "fanout_subscriptions ",
            "fanout_messages_in_total{source=\"ws\"} 0",
            "fanout_messages_in_total{source=\"mqtt\"} 0",
            "fanout_messages_delivered_total 0",
            "fanout_messages_published_total 0",
            "fanout_dropped_total{reason=\"slow_consumer\"} 0",
            "fanout_mqtt_connected 0",
            "fanout_mqtt_reconnects_total 0",
            "fanout_dropped_total{reason=\"rate_limited\"} 0",
            "fanout_slow_consumers_total 0",
            "fanout_delivery_latency_seconds_count 0",
            "fanout_publish_wait_seconds_count 0",
            "fanout_outbox_queued_bytes 0",
            "fanout_api_publish_requests_total{result=\"accepted\"} 0",
            "fanout_build_info{",
            "fanout_client_errors_total{code=\"bad_json\"} 0",
        ] {
            assert!(text.contains(s), "missing {s} in\n{text}");
        }
    }
}
