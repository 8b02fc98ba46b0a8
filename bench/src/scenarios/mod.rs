//! The scenarios. Each starts its own Mosquitto (and fanout instances), measures, stops them,
//! and returns its typed section of the report. This module holds what they share: the
//! processes under test ([`Setup`]), users connected to them ([`Fleet`]), and one measurement
//! step at a fixed rate ([`Step`], [`run_step`], [`sweep`]).

mod amplification;
mod churn;
mod direct;
mod floor;
mod idle;
pub mod memory;
mod no_tier;
mod restart;
mod subscale;
pub mod synth;

pub use amplification::amplification;
pub use churn::churn;
pub use direct::direct;
pub use floor::broker_floor;
pub use idle::idle;
pub use no_tier::no_tier;
pub use restart::restart_storm;
pub use subscale::sub_scale;

use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rumqttc::{AsyncClient, QoS};

use crate::client::{self, chat_frame, Conn};
use crate::engine::{Engine, EngineKind};
use crate::env::{self, Instance, Res};
use crate::mqtt_ws::MqttConn;
use crate::report::{r3, r5, Cpu, StepReport};
use crate::stats::{envelope, message_json, Stats};
use crate::Opts;

/// Per-message p99 limit for "sustained" rates, and the delivered share a step must reach.
pub const P99_LIMIT_MS: f64 = 50.0;
pub const MIN_COMPLETE: f64 = 0.999;
/// A scheduler more than this far behind its intended send times was itself starved of CPU.
pub const GENERATOR_LAG_LIMIT_US: u64 = 20_000;

pub fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg:<44} [{elapsed_precise}] {wide_bar} {pos}/{len}")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

pub fn ncpu() -> f64 {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64
}

pub fn user_names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// The processes under test: a broker (`--engine`, Mosquitto by default) and `count` fanout
/// instances (attached round-robin to the broker's nodes), logging to `--out/<name>`.
pub struct Setup {
    pub broker: Engine,
    pub instances: Vec<Instance>,
}

impl Setup {
    pub async fn start(opts: &Opts, name: &str, count: usize) -> Res<Setup> {
        Setup::start_on(opts, opts.engine, name, count).await
    }

    pub async fn start_on(opts: &Opts, kind: EngineKind, name: &str, count: usize) -> Res<Setup> {
        let dir = opts.out.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let broker = tokio::task::block_in_place(|| Engine::start(kind, &opts.mosquitto, &dir))?;
        let args = env::InstanceArgs {
            bin: &opts.fanout,
            dir: &dir,
            broker_ports: broker.ports(),
            secret: &opts.jwt_secret,
            threads: opts.instance_threads,
        };
        let instances = env::start_instances(&args, count).await?;
        Ok(Setup { broker, instances })
    }

    pub fn ports(&self) -> Vec<u16> {
        self.instances.iter().map(|i| i.port).collect()
    }

    pub fn procs(&self) -> Procs {
        Procs { instances: self.instances.iter().map(|i| i.proc.pid()).collect(), brokers: self.broker.pids() }
    }

    pub fn stop(mut self) {
        for i in &mut self.instances {
            i.proc.stop();
        }
        self.broker.stop();
    }
}

/// Pids whose CPU a step meters.
pub struct Procs {
    pub instances: Vec<u32>,
    /// the broker's processes: Mosquitto, or every RabbitMQ node's `beam.smp`
    pub brokers: Vec<u32>,
}

/// A [`Setup`] with `users[i]` connected to instance `i % M`, every socket's reader reporting
/// into `stats`.
pub struct Fleet {
    pub setup: Setup,
    pub users: Vec<String>,
    pub ports: Vec<u16>,
    pub srcs: Vec<IpAddr>,
    pub stats: Arc<Stats>,
    pub conns: Vec<Conn>,
    /// connections per second while connecting the users
    pub connect_rate: f64,
}

impl Fleet {
    pub async fn start(opts: &Opts, name: &str, instances: usize, users: Vec<String>, what: &str) -> Res<Fleet> {
        Fleet::start_on(opts, opts.engine, name, instances, users, what).await
    }

    pub async fn start_on(
        opts: &Opts,
        kind: EngineKind,
        name: &str,
        instances: usize,
        users: Vec<String>,
        what: &str,
    ) -> Res<Fleet> {
        let setup = Setup::start_on(opts, kind, name, instances).await?;
        let ports = setup.ports();
        let srcs = env::source_addrs(opts.sources);
        let stats = Stats::new(Instant::now());
        let (wss, connect_rate) = connect_all(opts, &users, &ports, &srcs, what).await?;
        let conns = wss.into_iter().map(|ws| client::run(ws, stats.clone())).collect();
        Ok(Fleet { setup, users, ports, srcs, stats, conns, connect_rate })
    }

    pub fn procs(&self) -> Procs {
        self.setup.procs()
    }

    /// Closes the sockets, waits `grace`, stops the processes.
    pub async fn stop(self, grace: Duration) {
        drop(self.conns);
        if !grace.is_zero() {
            tokio::time::sleep(grace).await;
        }
        self.setup.stop();
    }
}

/// Connects `users[i]` to instance `i % M` from source address `i % S`, `concurrency` at a
/// time. Returns the sockets in order and the connect rate (per second, counted at `connected`).
pub async fn connect_all(
    opts: &Opts,
    users: &[String],
    ports: &[u16],
    srcs: &[IpAddr],
    what: &str,
) -> Res<(Vec<client::Ws>, f64)> {
    let toks = client::tokens(&opts.jwt_secret, users)?;
    let pb = bar(users.len() as u64, what);
    let t0 = Instant::now();
    let pbc = pb.clone();
    let res: Vec<Res<client::Ws>> = futures_util::stream::iter(toks.into_iter().enumerate())
        .map(|(i, tok)| {
            let src = srcs[i % srcs.len()];
            let dst = env::ws_addr(ports[i % ports.len()]);
            let pb = pbc.clone();
            async move {
                let r = client::connect(src, dst, &tok, Duration::from_secs(30)).await;
                pb.inc(1);
                r
            }
        })
        .buffered(opts.concurrency)
        .collect()
        .await;
    let secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let failed = res.iter().filter(|r| r.is_err()).count();
    let mut out = Vec::with_capacity(res.len());
    for (i, r) in res.into_iter().enumerate() {
        out.push(r.map_err(|e| {
            format!("{failed} of {} connections failed; connection {i} ({}): {e}", users.len(), users[i])
        })?);
    }
    Ok((out, users.len() as f64 / secs))
}

/// CPU meters over one step.
pub struct Meter {
    t0: Instant,
    gen0: f64,
    pids: Vec<u32>,
    inst0: f64,
    brokers: Vec<u32>,
    broker0: f64,
    mach0: (f64, f64),
}

impl Meter {
    pub fn start(procs: &Procs) -> Meter {
        Meter {
            t0: Instant::now(),
            gen0: env::self_cpu_secs(),
            pids: procs.instances.clone(),
            inst0: procs.instances.iter().map(|p| env::cpu_secs(*p)).sum(),
            brokers: procs.brokers.clone(),
            broker0: env::cpu_secs_sum(&procs.brokers),
            mach0: env::machine_jiffies(),
        }
    }

    /// Cores used (CPU seconds per wall second) by generator, instances, broker, and the
    /// machine's busy share.
    pub fn stop(&self) -> Cpu {
        let wall = self.t0.elapsed().as_secs_f64().max(1e-6);
        let gen = (env::self_cpu_secs() - self.gen0) / wall;
        let inst = (self.pids.iter().map(|p| env::cpu_secs(*p)).sum::<f64>() - self.inst0) / wall;
        let brk = (env::cpu_secs_sum(&self.brokers) - self.broker0) / wall;
        let m = env::machine_jiffies();
        let busy = (m.0 - self.mach0.0) / (m.1 - self.mach0.1).max(1.0);
        Cpu {
            generator_cores: r3(gen),
            instances_cores: r3(inst),
            broker_cores: r3(brk),
            machine_busy: r3(busy),
            wall_secs: r3(wall),
        }
    }
}

/// How messages leave the generator in a step.
pub enum Sender<'a> {
    /// Through fanout WebSocket connections (`conns[i]` belongs to `users[i]`).
    Fanout(&'a [Conn]),
    /// Straight to the broker through rumqttc publishers (broker-floor).
    Floor(&'a [AsyncClient]),
    /// Each user's own MQTT-over-WebSocket session with the broker (no-tier).
    NoTier(&'a [MqttConn]),
}

/// One measurement step: `rate` messages/s for `secs`, messages tagged `tag`.
pub struct Step<'a> {
    pub label: &'a str,
    pub tag: u64,
    pub rate: f64,
    pub secs: f64,
    pub size: usize,
}

/// Runs one step: a random sender → a random other user, at a fixed offered rate. Latency is
/// measured from the moment the generator hands the frame to the socket's writer (or to
/// rumqttc); the generator's lag behind the intended schedule is reported separately.
pub async fn run_step(
    sender: &Sender<'_>,
    users: &[String],
    stats: &Arc<Stats>,
    procs: &Procs,
    step: &Step<'_>,
) -> StepReport {
    let Step { label, tag, rate, secs, size } = *step;
    stats.reset(tag);
    let n = users.len();
    let total = (rate * secs).round() as u64;
    let pb = bar(total, &format!("{label} {rate:.0} msg/s"));
    let mut rng = StdRng::seed_from_u64(tag);
    let meter = Meter::start(procs);
    let start = Instant::now();
    let start_us = stats.now_us();
    let mut sent = 0u64;
    let mut send_errors = 0u64;
    let mut max_lag_us = 0u64;
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate) as u64).min(total);
        while sent < due {
            // Stamp the moment the frame leaves the scheduler; how far that is behind the
            // intended time is the generator's own lag, reported separately.
            let t_us = stats.now_us();
            let intended = start_us + (sent as f64 * 1e6 / rate) as u64;
            max_lag_us = max_lag_us.max(t_us.saturating_sub(intended));
            let from = rng.random_range(0..n);
            let mut to = rng.random_range(0..n - 1);
            if to >= from {
                to += 1;
            }
            let msg = message_json(t_us, tag, sent, size);
            let ok = match sender {
                Sender::Fanout(conns) => conns[from].tx.send(chat_frame(&users[to], &msg)).is_ok(),
                Sender::Floor(pubs) => {
                    let env = envelope(&users[from], &users[to], &msg);
                    let c = &pubs[from % pubs.len()];
                    c.publish(format!("bf/{}", users[to]), QoS::AtLeastOnce, false, env).await.is_ok()
                }
                Sender::NoTier(conns) => {
                    conns[from].publish(no_tier::topic(&users[to]), envelope(&users[from], &users[to], &msg))
                }
            };
            if !ok {
                send_errors += 1;
            }
            sent += 1;
        }
        pb.set_position(sent);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let send_secs = start.elapsed().as_secs_f64();
    // Drain: wait until everything arrived and was acknowledged, at most 5 s.
    let until = Instant::now() + Duration::from_secs(5);
    while (stats.delivered.load(Relaxed) < total || stats.acks.load(Relaxed) < total) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu = meter.stop();
    pb.finish_and_clear();
    let delivered = stats.delivered.load(Relaxed);
    let achieved = total as f64 / send_secs;
    let latency = stats.quantiles();
    let p99 = latency.p99_ms.unwrap_or(f64::INFINITY);
    StepReport {
        offered_rate: rate,
        achieved_send_rate: r3(achieved),
        sent: total,
        delivered,
        delivered_ratio: r5(delivered as f64 / total.max(1) as f64),
        duplicates: stats.duplicates.load(Relaxed),
        acks: stats.acks.load(Relaxed),
        errors: stats.errors.load(Relaxed) + send_errors,
        late_from_earlier_step: stats.stale.load(Relaxed),
        connections_closed: stats.closed.load(Relaxed),
        generator_max_lag_ms: r3(max_lag_us as f64 / 1000.0),
        cpu,
        cpu_per_message: cpu.per_message(total),
        latency,
        generator_bound: achieved < 0.98 * rate
            || max_lag_us > GENERATOR_LAG_LIMIT_US
            || (cpu.machine_busy > 0.9 && cpu.generator_cores > 0.4 * ncpu()),
        ok: p99 < P99_LIMIT_MS && delivered as f64 >= MIN_COMPLETE * total as f64,
    }
}

/// First the CPU the processes use with every connection open and no traffic (`opts.idle_secs`),
/// then a step per rate (tags 1, 2, …), 300 ms apart; stops after the first step that is not
/// ok unless `--no-stop-on-fail`.
pub async fn sweep(
    sender: &Sender<'_>,
    users: &[String],
    stats: &Arc<Stats>,
    procs: &Procs,
    opts: &Opts,
    rates: &[f64],
    label: &str,
) -> (Cpu, Vec<StepReport>) {
    let meter = Meter::start(procs);
    tokio::time::sleep(opts.idle_secs).await;
    let idle = meter.stop();
    let mut steps = Vec::new();
    for (k, &rate) in rates.iter().enumerate() {
        let step = Step { label, tag: k as u64 + 1, rate, secs: opts.step_secs, size: opts.size };
        let s = run_step(sender, users, stats, procs, &step).await;
        let ok = s.ok;
        steps.push(s);
        if !ok && opts.stop_on_fail {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    (idle, steps)
}

pub fn print_steps(title: &str, idle: &Cpu, steps: &[StepReport]) {
    println!("\n{title}");
    println!(
        "  idle (connections open, no traffic): cores generator {:.3}, instances {:.3}, broker {:.3}",
        idle.generator_cores, idle.instances_cores, idle.broker_cores
    );
    println!(
        "{:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>6} {:>6} {:>6} {:>5} {:>7} {:>5}",
        "offered",
        "achieved",
        "deliv%",
        "p50ms",
        "p90ms",
        "p99ms",
        "p99.9ms",
        "max_ms",
        "errors",
        "gen",
        "inst",
        "brkr",
        "busy",
        "lagms",
        "ok"
    );
    for s in steps {
        let f = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        let q = &s.latency;
        println!(
            "{:>9.1} {:>9.0} {:>8.3} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>6.2} {:>6.2} {:>6.2} {:>5.2} {:>7.1} {:>5}",
            s.offered_rate,
            s.achieved_send_rate,
            s.delivered_ratio * 100.0,
            f(q.p50_ms),
            f(q.p90_ms),
            f(q.p99_ms),
            f(q.p999_ms),
            f(q.max_ms),
            s.errors,
            s.cpu.generator_cores,
            s.cpu.instances_cores,
            s.cpu.broker_cores,
            s.cpu.machine_busy,
            s.generator_max_lag_ms,
            if s.ok { "yes" } else { "NO" }
        );
        if s.generator_bound {
            println!(
                "          ^ generator-bound: its send rate fell behind, its scheduler lagged > 20 ms, or it used \
                 much of a saturated machine"
            );
        }
    }
}
