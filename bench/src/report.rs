//! The report: one typed section per scenario run, written as `report.json`, plus the ratios
//! computed between sections of the same invocation.

use serde::Serialize;

use crate::stats::Quantiles;

pub fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub fn r5(x: f64) -> f64 {
    (x * 100000.0).round() / 100000.0
}

#[derive(Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub args: Vec<String>,
    pub machine: Machine,
    /// /proc/loadavg (1, 5, 15 minutes) when the invocation started and ended
    pub load_average_before: String,
    pub load_average_after: String,
    pub wall_secs: f64,
    pub scenarios: Vec<Section>,
    /// scenarios that stopped with an error (no section above)
    pub failures: Vec<Failure>,
    /// `direct` against `broker-floor`, per run
    pub direct_vs_floor: Vec<FloorRatios>,
    /// fanout against the no-tier floor (ratios fanout ÷ no-tier), per run and summarised
    pub fanout_vs_no_tier: Option<crate::compare::Comparison>,
}

#[derive(Serialize)]
pub struct Failure {
    pub scenario: String,
    pub error: String,
}

#[derive(Serialize)]
pub struct Machine {
    pub nproc: f64,
    pub cpu_model: Option<String>,
    pub mem_total_kib: Option<u64>,
    pub kernel: String,
    pub nofile_limit: u64,
}

/// One scenario's results; `scenario` names it in the JSON.
#[derive(Serialize)]
#[serde(tag = "scenario", rename_all = "kebab-case")]
pub enum Section {
    Direct(Sweep),
    BrokerFloor(Sweep),
    NoTier(Sweep),
    IdleMemory(IdleMemory),
    Idle(Idle),
    FanoutAmplification(Amplification),
    Churn(Churn),
    RestartStorm(RestartStorm),
    SubScale(SubScale),
}

impl Section {
    /// The scenario's name, as on the command line and in the JSON.
    pub fn name(&self) -> &'static str {
        match self {
            Section::Direct(_) => "direct",
            Section::BrokerFloor(_) => "broker-floor",
            Section::NoTier(_) => "no-tier",
            Section::IdleMemory(_) => "idle-memory",
            Section::Idle(_) => "idle",
            Section::FanoutAmplification(_) => "fanout-amplification",
            Section::Churn(_) => "churn",
            Section::RestartStorm(_) => "restart-storm",
            Section::SubScale(_) => "sub-scale",
        }
    }
}

/// `restart-storm`: the broker restarted under one instance holding N users.
#[derive(Serialize)]
pub struct RestartStorm {
    pub rows: Vec<RestartRow>,
}

#[derive(Serialize)]
pub struct RestartRow {
    pub users: usize,
    /// From the broker listening again to the instance's `/readyz` 200 (every user subscribed).
    pub ready_ms: f64,
    /// From the broker listening again to a message sent then reaching its recipient (None:
    /// not within 60 s of being sent).
    pub delivered_ms: Option<f64>,
    pub resubscribed_per_sec: f64,
    /// subscriptions held by the synthetic subscriber besides the instance's users
    pub synthetic_subscriptions: usize,
    pub synthetic_clients: usize,
    /// From the broker listening again to the last synthetic client having all its topics
    /// confirmed again (None: not within the limit, or no synthetic subscriber).
    pub synthetic_recovered_ms: Option<f64>,
    /// synthetic subscriptions confirmed when the measurement ended
    pub synthetic_confirmed: u64,
    /// all subscriptions (instance's + synthetic) ÷ seconds until the later of the two was done
    pub broker_resubscribed_per_sec: Option<f64>,
    pub broker_rss_kib_after: u64,
    pub load_average: String,
}

/// `sub-scale`: one broker holding S user subscriptions (a few thousand of real users on
/// fanout instances, the rest held by the synthetic subscriber), per engine.
#[derive(Serialize)]
pub struct SubScale {
    pub engines: Vec<SubScaleEngine>,
}

#[derive(Serialize)]
pub struct SubScaleEngine {
    pub engine: String,
    pub nodes: usize,
    pub instances: usize,
    pub real_users: usize,
    pub synthetic_clients: usize,
    pub topics_per_subscribe: usize,
    pub subscribe_window: usize,
    /// broker RSS (all nodes) with the instances and their users connected, before any
    /// synthetic subscription
    pub broker_rss_kib_baseline: u64,
    pub rows: Vec<SubScaleRow>,
    /// why larger S were not attempted
    pub stopped: Option<String>,
}

#[derive(Serialize)]
pub struct SubScaleRow {
    /// the S asked for: user subscriptions on the broker (real users + synthetic)
    pub target_subscriptions: usize,
    /// user subscriptions confirmed on the broker (real users + synthetic)
    pub subscriptions: u64,
    /// synthetic subscriptions added in this row (asked for / confirmed / refused)
    pub added: u64,
    pub added_confirmed: u64,
    pub added_refused: u64,
    pub complete: bool,
    /// from the first CONNECT of this row's synthetic clients to the last SUBACK (or the limit)
    pub subscribe_secs: f64,
    /// confirmed subscriptions per second in this row
    pub subscribe_rate_per_s: f64,
    /// when not complete: seconds the row's S would take at this rate (an extrapolation)
    pub extrapolated_secs_for_target: Option<f64>,
    pub broker_cpu_secs_subscribing: f64,
    pub broker_cpu_us_per_subscription: f64,
    pub broker_rss_kib: u64,
    /// (broker RSS − baseline) ÷ synthetic subscriptions held, bytes
    pub broker_rss_bytes_per_subscription: f64,
    pub synthetic_connection_errors: u64,
    /// chat messages between real users through fanout at this S
    pub chat: StepReport,
    pub load_average: String,
}

/// CPU used during a step, in cores (CPU seconds per wall second), and the machine's busy share.
#[derive(Serialize, Clone, Copy, Default, Debug)]
pub struct Cpu {
    pub generator_cores: f64,
    pub instances_cores: f64,
    pub broker_cores: f64,
    pub machine_busy: f64,
    /// the metered interval: sending plus the drain
    pub wall_secs: f64,
}

impl Cpu {
    /// CPU time per message of the step, in µs.
    pub fn per_message(&self, sent: u64) -> CpuPerMessage {
        let us = |cores: f64| r3(cores * self.wall_secs * 1e6 / sent.max(1) as f64);
        CpuPerMessage {
            generator_us: us(self.generator_cores),
            instances_us: us(self.instances_cores),
            broker_us: us(self.broker_cores),
        }
    }
}

/// CPU time per message sent, by process group (µs; from /proc and getrusage).
#[derive(Serialize, Clone, Copy, Default, Debug)]
pub struct CpuPerMessage {
    pub generator_us: f64,
    pub instances_us: f64,
    pub broker_us: f64,
}

/// One step at a fixed offered rate.
#[derive(Serialize, Clone, Debug)]
pub struct StepReport {
    pub offered_rate: f64,
    pub achieved_send_rate: f64,
    pub sent: u64,
    /// distinct messages received (de-duplicated by sequence number)
    pub delivered: u64,
    pub delivered_ratio: f64,
    /// copies of a message received more than once (not in `delivered`)
    pub duplicates: u64,
    /// `ack` frames (fanout) or PUBACKs (MQTT publishers) received during the step
    pub acks: u64,
    pub errors: u64,
    pub late_from_earlier_step: u64,
    /// connections of this scenario whose reader ended so far (none should before teardown)
    pub connections_closed: u64,
    pub generator_max_lag_ms: f64,
    pub cpu: Cpu,
    pub cpu_per_message: CpuPerMessage,
    #[serde(flatten)]
    pub latency: Quantiles,
    /// The send rate fell > 2 % behind, the scheduler lagged > 20 ms behind its intended send
    /// times, or the generator used > 40 % of a saturated machine.
    pub generator_bound: bool,
    /// p99 < 50 ms and ≥ 99.9 % delivered.
    pub ok: bool,
}

/// A sweep of rates: `direct` (fanout), `broker-floor` or `no-tier`.
#[derive(Serialize)]
pub struct Sweep {
    /// which repetition (`--runs`) of the comparison this is, from 1
    pub run: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances: Option<usize>,
    /// MQTT publishers and subscribers each (broker-floor).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clients: Option<usize>,
    pub users: usize,
    pub message_bytes: usize,
    pub step_secs: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_rate_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_rss_kib_after: Option<Vec<u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_rss_kib_after: Option<u64>,
    /// CPU with every connection open and no traffic, before the first step
    pub idle_cpu: Cpu,
    pub max_ok_rate: Option<f64>,
    pub steps: Vec<StepReport>,
}

impl Sweep {
    pub fn step_at(&self, rate: f64) -> Option<&StepReport> {
        self.steps.iter().find(|s| s.offered_rate == rate)
    }
}

/// The highest offered rate before the first step that is not ok.
pub fn max_ok_rate(steps: &[StepReport]) -> Option<f64> {
    let mut best = None;
    for s in steps {
        if !s.ok {
            break;
        }
        best = Some(s.offered_rate);
    }
    best
}

#[derive(Serialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    Fanout,
    NoTier,
}

/// Memory per idle connection: fanout (one instance, and the broker behind it) or no-tier
/// (Mosquitto's websockets listener).
#[derive(Serialize)]
pub struct IdleMemory {
    pub run: u32,
    pub side: Side,
    pub connections: usize,
    /// connections the server held when RSS was read (fanout: its `fanout_connections`;
    /// no-tier: sessions that got their CONNACK and SUBACK)
    pub connected: f64,
    pub instance_rss_empty_kib: Option<u64>,
    pub instance_rss_full_kib: Option<u64>,
    pub instance_kib_per_connection: Option<f64>,
    pub broker_rss_empty_kib: u64,
    pub broker_rss_full_kib: u64,
    pub broker_kib_per_connection: f64,
    pub connect_rate_per_s: f64,
    pub connect_cpu: Cpu,
}

#[derive(Serialize)]
pub struct Idle {
    pub connections: usize,
    pub rss_empty_kib: u64,
    pub rss_full_kib: u64,
    pub rss_per_connection_kib: f64,
    pub connect_rate_per_s: f64,
    pub connect_cpu: Cpu,
    pub instance_connections_metric: f64,
    pub rss_after_close_kib: u64,
    /// `fanout_connections` once the N connections were closed
    pub instance_connections_after_close: f64,
    pub cycles: usize,
    pub cycle_failures: u64,
    pub rss_fresh_cycles_instance_kib: u64,
    pub warmup_cycles: usize,
    pub rss_before_cycles_kib: u64,
    pub rss_after_cycles_kib: u64,
    pub bytes_kept_per_closed_connection: f64,
    pub subscriptions_left_incl_broadcast: f64,
    pub instance_connections_after_cycles: f64,
}

#[derive(Serialize)]
pub struct Amplification {
    pub instances: usize,
    pub users: usize,
    pub rate: f64,
    pub mqtt_in_total: f64,
    pub delivered_clients: u64,
    pub delivered_metric: f64,
    pub amplification: f64,
    pub broadcast_design_amplification: usize,
    pub step: StepReport,
}

#[derive(Serialize)]
pub struct Churn {
    pub instances: usize,
    pub stable_users: usize,
    pub churn_rate: f64,
    pub churn_secs: f64,
    pub churn_connections: u64,
    pub churn_connected: u64,
    pub churn_failed: u64,
    pub subscribe_lines: u64,
    pub unsubscribe_lines: u64,
    pub packets_per_connection: f64,
    /// messages the stable users were asked to send to churned users (their acks arrive on
    /// the stable sockets, so they are in `stable_traffic.acks` too)
    pub churn_messages_sent: u64,
    pub churn_messages_delivered: u64,
    /// delivered / churn connections attempted
    pub churn_delivery_ratio: f64,
    /// the stable users' `ack`s after the churn ended: stable traffic + churn messages
    pub acks_stable_and_churn: u64,
    pub churn_message_p99_ms: Option<f64>,
    pub subscriptions_left_incl_broadcast: f64,
    pub stable_traffic: StepReport,
}

/// `direct` against `broker-floor` of the same invocation and run.
#[derive(Serialize)]
pub struct FloorRatios {
    pub run: u32,
    pub direct_max_ok_rate: Option<f64>,
    pub floor_max_ok_rate: Option<f64>,
    pub direct_share_of_floor_throughput: Option<f64>,
    pub note: &'static str,
    pub per_rate: Vec<FloorAtRate>,
}

#[derive(Serialize)]
pub struct FloorAtRate {
    pub offered_rate: f64,
    pub p50_minus_floor_ms: Option<f64>,
    pub p99_minus_floor_ms: Option<f64>,
    pub p99_ratio: Option<f64>,
}

impl FloorRatios {
    pub fn new(d: &Sweep, f: &Sweep) -> FloorRatios {
        let per_rate = d
            .steps
            .iter()
            .filter_map(|ds| {
                let fs = f.step_at(ds.offered_rate)?;
                let diff = |a: Option<f64>, b: Option<f64>| Some(r3(a? - b?));
                Some(FloorAtRate {
                    offered_rate: ds.offered_rate,
                    p50_minus_floor_ms: diff(ds.latency.p50_ms, fs.latency.p50_ms),
                    p99_minus_floor_ms: diff(ds.latency.p99_ms, fs.latency.p99_ms),
                    p99_ratio: (|| Some(r3(ds.latency.p99_ms? / fs.latency.p99_ms?.max(0.001))))(),
                })
            })
            .collect();
        FloorRatios {
            run: d.run,
            direct_max_ok_rate: d.max_ok_rate,
            floor_max_ok_rate: f.max_ok_rate,
            direct_share_of_floor_throughput: match (d.max_ok_rate, f.max_ok_rate) {
                (Some(a), Some(b)) if b > 0.0 => Some(r3(a / b)),
                _ => None,
            },
            note: if f.steps.last().is_some_and(|s| s.ok) {
                "broker-floor passed every offered rate: its max is a lower bound; the share is an upper bound"
            } else {
                "both sweeps stopped at their first failing rate"
            },
            per_rate,
        }
    }
}
