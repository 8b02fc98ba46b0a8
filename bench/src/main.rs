//! `fanout-bench`: load generator and benchmark suite for fanout.
//!
//! It starts its own Mosquitto (`/usr/sbin/mosquitto`, generated config, free port) and M
//! `fanout` instances (the repository's `target/release/fanout`, or `--fanout PATH`) as
//! subprocesses, drives them over loopback WebSockets, and reports a text table, `report.json`
//! and `latency.svg` in `--out`. Its own crate (`bench/`, a separate workspace like `fuzz/`):
//! the service does not link the generator's dependencies.
//!
//! Scenarios: `direct` (+ `broker-floor` and `no-tier` in the same invocation, compared with
//! it), `broker-floor`, `no-tier`, `idle`, `fanout-amplification`, `churn`, or `all`.
//! `--runs N` repeats the comparison N times in one invocation (alternating which side goes
//! first) and reports medians and spread. `--smoke` shrinks everything so a full pass takes
//! about 20 s, and fails when any message is lost, duplicated or unacknowledged.

mod client;
mod compare;
mod engine;
mod env;
mod mqtt_ws;
mod plot;
mod report;
mod scenarios;
mod smoke;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use report::{r3, Failure, FloorRatios, IdleMemory, Machine, Report, Section, Side, Sweep};

#[derive(Copy, Clone, PartialEq, Eq, Debug, ValueEnum)]
enum Scenario {
    /// N users over M instances at a sweep of rates (also runs broker-floor and no-tier unless
    /// --no-floor / --skip-no-tier)
    Direct,
    /// broker-only reference: the same rates and sizes straight through Mosquitto with 2×M
    /// rumqttc TCP clients
    BrokerFloor,
    /// no tier at all: every user an MQTT-over-WebSocket client of Mosquitto, QoS 1; with it,
    /// memory per idle connection on both sides (--mem-connections)
    NoTier,
    /// N idle connections to one instance: RSS per connection, connections/s, memory kept
    Idle,
    /// K instances: MQTT messages in over all instances per message delivered
    FanoutAmplification,
    /// connect/disconnect at a fixed rate with messages flowing
    Churn,
    /// the broker killed and restarted under one instance holding N users (--storm-users):
    /// time until the instance is ready and a message flows again
    RestartStorm,
    /// one broker holding S user subscriptions (--scale-subs) per engine (--scale-engines):
    /// a few thousand real users on fanout, the rest a synthetic MQTT subscriber; SUBSCRIBE
    /// rate, broker RSS per subscription, chat p99 at --scale-rate
    SubScale,
    /// every scenario (but restart-storm and sub-scale; --smoke runs a tiny sub-scale too)
    All,
}

/// One thing the invocation runs, in order.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
enum Job {
    Direct(u32),
    BrokerFloor(u32),
    NoTier(u32),
    IdleMemory(Side, u32),
    Idle,
    FanoutAmplification,
    Churn,
    RestartStorm,
    SubScale,
}

impl Job {
    fn name(&self) -> &'static str {
        match self {
            Job::Direct(_) => "direct",
            Job::BrokerFloor(_) => "broker-floor",
            Job::NoTier(_) => "no-tier",
            Job::IdleMemory(..) => "idle-memory",
            Job::Idle => "idle",
            Job::FanoutAmplification => "fanout-amplification",
            Job::Churn => "churn",
            Job::RestartStorm => "restart-storm",
            Job::SubScale => "sub-scale",
        }
    }
}

#[derive(Parser, Debug)]
#[command(name = "fanout-bench", about = "Load generator and benchmarks for fanout (loopback only)")]
struct Cli {
    /// Scenarios to run, in order
    #[arg(value_enum, default_values_t = vec![Scenario::All])]
    scenarios: Vec<Scenario>,
    /// Tiny sizes: every scenario in about 20 s (CI); fails on any lost, duplicated or
    /// unacknowledged message, error or failed connect
    #[arg(long)]
    smoke: bool,
    /// fanout instances (direct, churn uses at most 2)
    #[arg(long, default_value_t = 5)]
    instances: usize,
    /// users, one connection each (direct, fanout-amplification, broker-floor)
    #[arg(long, default_value_t = 500)]
    users: usize,
    /// offered total rates, messages/s, comma-separated (direct, broker-floor, no-tier)
    #[arg(long, value_delimiter = ',', default_value = "1000,2000,4000,5000,8000,12000,16000,20000,24000")]
    rates: Vec<f64>,
    /// repetitions of the comparison (direct, broker-floor, no-tier, idle-memory) in this
    /// invocation; the others run once
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// rates at which p99 and CPU per message are compared with no-tier (besides the highest
    /// rate both sides sustained)
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    compare_at: Vec<f64>,
    /// idle connections for memory per connection, fanout (one instance) vs no-tier (0: skip)
    #[arg(long, default_value_t = 5000)]
    mem_connections: usize,
    /// seconds per rate step
    #[arg(long, default_value_t = 5.0)]
    step_secs: f64,
    /// bytes of the chat `message` JSON (timestamp + padding)
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// keep sweeping after a step misses p99 < 50 ms or loses messages
    #[arg(long)]
    no_stop_on_fail: bool,
    /// users on the one instance for each restart-storm run, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000,19000")]
    storm_users: Vec<usize>,
    /// synthetic subscriptions held on the broker during each restart-storm run besides the
    /// instance's users, comma-separated (each combined with every --storm-users)
    #[arg(long, value_delimiter = ',', default_value = "0")]
    storm_subs: Vec<usize>,
    /// broker of the instances: mosquitto, rabbitmq-1, rabbitmq-3 (rabbitmq-N: an N-node
    /// cluster from scripts/rabbitmq.sh; instances attached round-robin to the nodes)
    #[arg(long, default_value = "mosquitto")]
    engine: engine::EngineKind,
    /// engines of sub-scale, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "mosquitto,rabbitmq-1,rabbitmq-3")]
    scale_engines: Vec<engine::EngineKind>,
    /// user subscriptions S on the broker, reached one after the other (sub-scale)
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    scale_subs: Vec<usize>,
    /// real users on fanout instances (sub-scale)
    #[arg(long, default_value_t = 2000)]
    scale_users: usize,
    /// fanout instances (sub-scale)
    #[arg(long, default_value_t = 2)]
    scale_instances: usize,
    /// chat messages/s between the real users at each S (sub-scale)
    #[arg(long, default_value_t = 1000.0)]
    scale_rate: f64,
    /// give up on an S (and larger ones) not confirmed after this many seconds; also the
    /// synthetic subscriber's limit in restart-storm
    #[arg(long, default_value_t = 300.0)]
    scale_limit_secs: f64,
    /// MQTT connections of the synthetic subscriber (sub-scale, restart-storm)
    #[arg(long, default_value_t = 8)]
    synth_clients: usize,
    /// SUBSCRIBE packets (64 topics each) in flight per synthetic connection
    #[arg(long, default_value_t = 32)]
    synth_window: usize,
    /// skip broker-floor when running direct
    #[arg(long)]
    no_floor: bool,
    /// skip no-tier when running direct
    #[arg(long)]
    skip_no_tier: bool,
    /// idle connections (idle)
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// connect/close cycles for memory kept per closed connection (idle)
    #[arg(long, default_value_t = 10_000)]
    cycles: usize,
    /// instances K (fanout-amplification)
    #[arg(long, default_value_t = 5)]
    amp_instances: usize,
    /// offered rate, messages/s (fanout-amplification)
    #[arg(long, default_value_t = 1000.0)]
    amp_rate: f64,
    /// stable users (churn)
    #[arg(long, default_value_t = 200)]
    churn_users: usize,
    /// connect+disconnect per second (churn)
    #[arg(long, default_value_t = 100.0)]
    churn_rate: f64,
    /// seconds of churn
    #[arg(long, default_value_t = 10.0)]
    churn_secs: f64,
    /// messages/s among the stable users during churn
    #[arg(long, default_value_t = 500.0)]
    churn_msg_rate: f64,
    /// loopback source addresses 127.0.0.2 … for client sockets
    #[arg(long, default_value_t = 4)]
    sources: usize,
    /// connections being opened at once (idle: 32 gave the best rate here; 256 was 5x slower)
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// HS256 secret for the instances and the tokens (default: random)
    #[arg(long)]
    jwt_secret: Option<String>,
    /// --worker-threads of the instances (default: one per core)
    #[arg(long)]
    instance_threads: Option<usize>,
    /// fanout binary under test (default: the repository's target/release/fanout)
    #[arg(long)]
    fanout: Option<PathBuf>,
    /// Mosquitto binary
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto: PathBuf,
    /// only draw `sub-scale.svg` in --out from these report.json files (e.g. runs of sub-scale
    /// on different engines or connection counts in one picture), then exit
    #[arg(long, num_args = 1..)]
    plot_sub_scale: Vec<PathBuf>,
    /// where report.json, latency.svg and the logs go
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

/// Resolved options passed to the scenarios.
pub struct Opts {
    pub instances: usize,
    pub users: usize,
    pub step_secs: f64,
    pub size: usize,
    pub stop_on_fail: bool,
    pub connections: usize,
    pub cycles: usize,
    pub amp_instances: usize,
    pub amp_rate: f64,
    pub churn_users: usize,
    pub churn_rate: f64,
    pub churn_secs: f64,
    pub churn_msg_rate: f64,
    pub sources: usize,
    pub concurrency: usize,
    pub mem_connections: usize,
    /// wait after connecting idle connections before reading RSS
    pub settle: Duration,
    /// CPU metered with no traffic before a sweep
    pub idle_secs: Duration,
    pub jwt_secret: String,
    pub mosquitto: PathBuf,
    pub fanout: PathBuf,
    pub instance_threads: Option<usize>,
    pub out: PathBuf,
    /// users on the instance for each restart-storm run
    pub storm_users: Vec<usize>,
    pub storm_subs: Vec<usize>,
    pub engine: engine::EngineKind,
    pub scale_engines: Vec<engine::EngineKind>,
    pub scale_subs: Vec<usize>,
    pub scale_users: usize,
    pub scale_instances: usize,
    pub scale_rate: f64,
    pub scale_limit: Duration,
    pub synth_clients: usize,
    pub synth_window: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let nofile = env::raise_nofile();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fanout-bench: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli, nofile)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("fanout-bench: a scenario or a smoke check failed (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("fanout-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn machine(nofile: u64) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem =
        meminfo.lines().find(|l| l.starts_with("MemTotal")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Machine {
        nproc: scenarios::ncpu(),
        cpu_model: model,
        mem_total_kib: mem,
        kernel: kernel.trim().to_string(),
        nofile_limit: nofile,
    }
}

/// What to run, in order: the comparison group (`direct`, `broker-floor`, `no-tier`, and with
/// no-tier the idle-memory pair) `runs` times, odd runs fanout first and even runs the
/// references first, so that a drift in the machine's load does not always favour one side;
/// then the other scenarios once.
fn plan(cli: &Cli, mem_connections: usize) -> Vec<Job> {
    let mut list: Vec<Scenario> = Vec::new();
    for s in &cli.scenarios {
        if *s == Scenario::All {
            list.extend([Scenario::Direct, Scenario::Idle, Scenario::FanoutAmplification, Scenario::Churn]);
            if cli.smoke {
                list.push(Scenario::SubScale);
            }
        } else if !list.contains(s) {
            list.push(*s);
        }
    }
    let direct = list.contains(&Scenario::Direct);
    let floor = list.contains(&Scenario::BrokerFloor) || (direct && !cli.no_floor);
    let no_tier = list.contains(&Scenario::NoTier) || (direct && !cli.skip_no_tier);
    let mut jobs = Vec::new();
    for run in 1..=cli.runs.max(1) {
        let mut group = Vec::new();
        if no_tier && mem_connections > 0 {
            group.extend([Job::IdleMemory(Side::Fanout, run), Job::IdleMemory(Side::NoTier, run)]);
        }
        let mut sweeps = Vec::new();
        if direct {
            sweeps.push(Job::Direct(run));
        }
        if floor {
            sweeps.push(Job::BrokerFloor(run));
        }
        if no_tier {
            sweeps.push(Job::NoTier(run));
        }
        group.extend(sweeps);
        if run % 2 == 0 {
            group.reverse();
        }
        jobs.extend(group);
    }
    for s in list {
        match s {
            Scenario::Idle => jobs.push(Job::Idle),
            Scenario::FanoutAmplification => jobs.push(Job::FanoutAmplification),
            Scenario::Churn => jobs.push(Job::Churn),
            Scenario::RestartStorm => jobs.push(Job::RestartStorm),
            Scenario::SubScale => jobs.push(Job::SubScale),
            _ => {}
        }
    }
    jobs
}

async fn run_job(job: Job, opts: &Opts, rates: &[f64]) -> Result<Section, String> {
    Ok(match job {
        Job::Direct(run) => Section::Direct(scenarios::direct(opts, rates, run).await?),
        Job::BrokerFloor(run) => Section::BrokerFloor(scenarios::broker_floor(opts, rates, run).await?),
        Job::NoTier(run) => Section::NoTier(scenarios::no_tier(opts, rates, run).await?),
        Job::IdleMemory(Side::Fanout, run) => {
            Section::IdleMemory(scenarios::memory::fanout(opts, opts.mem_connections, opts.settle, run).await?)
        }
        Job::IdleMemory(Side::NoTier, run) => {
            Section::IdleMemory(scenarios::memory::no_tier(opts, opts.mem_connections, opts.settle, run).await?)
        }
        Job::Idle => Section::Idle(scenarios::idle(opts).await?),
        Job::FanoutAmplification => Section::FanoutAmplification(scenarios::amplification(opts).await?),
        Job::Churn => Section::Churn(scenarios::churn(opts).await?),
        Job::RestartStorm => Section::RestartStorm(scenarios::restart_storm(opts, &opts.storm_users).await?),
        Job::SubScale => Section::SubScale(scenarios::sub_scale(opts).await?),
    })
}

/// The 1-, 5- and 15-minute load averages.
fn loadavg() -> String {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

async fn run(cli: Cli, nofile: u64) -> Result<bool, String> {
    if !cli.plot_sub_scale.is_empty() {
        let mut reports = Vec::new();
        for p in &cli.plot_sub_scale {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            reports.push(serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?);
        }
        std::fs::create_dir_all(&cli.out).map_err(|e| format!("{}: {e}", cli.out.display()))?;
        let svg = cli.out.join("sub-scale.svg");
        plot::sub_scale_svg(&svg, &reports)?;
        println!("plot: {}", svg.display());
        return Ok(true);
    }
    let mut opts = Opts {
        instances: cli.instances.max(1),
        users: cli.users.max(2),
        step_secs: cli.step_secs,
        size: cli.size,
        stop_on_fail: !cli.no_stop_on_fail,
        connections: cli.connections.max(1),
        cycles: cli.cycles.max(1),
        amp_instances: cli.amp_instances.max(1),
        amp_rate: cli.amp_rate,
        churn_users: cli.churn_users.max(2),
        churn_rate: cli.churn_rate,
        churn_secs: cli.churn_secs,
        churn_msg_rate: cli.churn_msg_rate,
        sources: cli.sources.max(1),
        concurrency: cli.concurrency.max(1),
        mem_connections: cli.mem_connections,
        settle: Duration::from_secs(2),
        idle_secs: Duration::from_secs(2),
        jwt_secret: cli.jwt_secret.clone().unwrap_or_else(|| format!("bench-{}", uuid::Uuid::new_v4().simple())),
        mosquitto: cli.mosquitto.clone(),
        fanout: env::fanout_binary(cli.fanout.as_deref())?,
        instance_threads: cli.instance_threads,
        out: cli.out.clone(),
        storm_users: cli.storm_users.clone(),
        storm_subs: cli.storm_subs.clone(),
        engine: cli.engine,
        scale_engines: cli.scale_engines.clone(),
        scale_subs: cli.scale_subs.clone(),
        scale_users: cli.scale_users,
        scale_instances: cli.scale_instances.max(1),
        scale_rate: cli.scale_rate,
        scale_limit: Duration::from_secs_f64(cli.scale_limit_secs.max(1.0)),
        synth_clients: cli.synth_clients.max(1),
        synth_window: cli.synth_window.max(1),
    };
    let mut rates = cli.rates.clone();
    let mut compare_at = cli.compare_at.clone();
    if cli.smoke {
        opts.instances = 2;
        opts.users = 20;
        opts.step_secs = 1.0;
        opts.connections = 200;
        opts.cycles = 200;
        opts.amp_instances = 2;
        opts.amp_rate = 200.0;
        opts.churn_users = 10;
        opts.churn_rate = 20.0;
        opts.churn_secs = 2.0;
        opts.churn_msg_rate = 100.0;
        opts.mem_connections = 200;
        opts.settle = Duration::from_millis(500);
        opts.idle_secs = Duration::from_millis(300);
        rates = vec![200.0, 400.0];
        compare_at = vec![200.0];
        // sub-scale on Mosquitto only: 2,000 subscriptions, 40 of them real users
        opts.scale_engines = vec![engine::EngineKind::Mosquitto];
        opts.scale_subs = vec![2000];
        opts.scale_users = 40;
        opts.scale_rate = 200.0;
        opts.scale_limit = Duration::from_secs(20);
        opts.synth_clients = 2;
    }
    std::fs::create_dir_all(&opts.out).map_err(|e| format!("{}: {e}", opts.out.display()))?;
    let jobs = plan(&cli, opts.mem_connections);
    let machine = machine(nofile);
    let load_before = loadavg();
    println!(
        "fanout-bench: {} cores ({}), load average {load_before}, RLIMIT_NOFILE {nofile}; fanout {}; out {}\nplan: {}",
        machine.nproc,
        machine.cpu_model.as_deref().unwrap_or("?"),
        opts.fanout.display(),
        opts.out.display(),
        jobs.iter().map(|j| format!("{j:?}")).collect::<Vec<_>>().join(", ")
    );
    let started = std::time::Instant::now();
    let mut sections = Vec::new();
    let mut failures = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        println!(
            "\n[{}/{}] {job:?} (at {:.0} s, load average {})",
            i + 1,
            jobs.len(),
            started.elapsed().as_secs_f64(),
            loadavg()
        );
        match run_job(*job, &opts, &rates).await {
            Ok(section) => sections.push(section),
            Err(error) => {
                eprintln!("fanout-bench: {job:?} failed: {error}");
                failures.push(Failure { scenario: job.name().to_string(), error });
            }
        }
    }
    let pick = |f: fn(&Section) -> Option<&Sweep>| sections.iter().filter_map(f).collect::<Vec<_>>();
    let directs = pick(|s| if let Section::Direct(d) = s { Some(d) } else { None });
    let floors = pick(|s| if let Section::BrokerFloor(d) = s { Some(d) } else { None });
    let no_tiers = pick(|s| if let Section::NoTier(d) = s { Some(d) } else { None });
    let memory: Vec<&IdleMemory> =
        sections.iter().filter_map(|s| if let Section::IdleMemory(m) = s { Some(m) } else { None }).collect();
    let floor_ratios: Vec<FloorRatios> =
        directs.iter().filter_map(|d| Some(FloorRatios::new(d, floors.iter().find(|f| f.run == d.run)?))).collect();
    for r in &floor_ratios {
        println!("\ndirect vs broker-floor, run {} (same invocation, same rates and sizes):", r.run);
        let v = serde_json::to_value(r).map_err(|e| e.to_string())?;
        for (k, v) in v.as_object().into_iter().flatten() {
            println!("  {k:<44} {v}");
        }
    }
    let comparison = (!directs.is_empty() && !no_tiers.is_empty())
        .then(|| compare::compare(&directs, &no_tiers, &memory, &compare_at));
    if let Some(c) = &comparison {
        compare::print(c);
    }
    if let Some(d) = directs.first() {
        let svg = opts.out.join("latency.svg");
        match plot::latency_svg(&svg, d, floors.iter().find(|f| f.run == d.run).copied()) {
            Ok(()) => println!("plot: {}", svg.display()),
            Err(e) => eprintln!("plot failed: {e}"),
        }
    }
    if !directs.is_empty() && !no_tiers.is_empty() {
        let svg = opts.out.join("no-tier.svg");
        match plot::no_tier_svg(&svg, &directs, &no_tiers) {
            Ok(()) => println!("plot: {}", svg.display()),
            Err(e) => eprintln!("plot failed: {e}"),
        }
    }
    let load_after = loadavg();
    println!("load average before {load_before}, after {load_after}");
    let report = Report {
        tool: "fanout-bench",
        args: std::env::args().skip(1).collect(),
        machine,
        load_average_before: load_before,
        load_average_after: load_after,
        wall_secs: r3(started.elapsed().as_secs_f64()),
        scenarios: sections,
        failures,
        direct_vs_floor: floor_ratios,
        fanout_vs_no_tier: comparison,
    };
    let path = opts.out.join("report.json");
    env::write_file(&path, &serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?)?;
    println!("report: {} ({:.1} s)", path.display(), started.elapsed().as_secs_f64());
    if report.scenarios.iter().any(|s| matches!(s, Section::SubScale(_))) {
        let svg = opts.out.join("sub-scale.svg");
        match serde_json::to_value(&report).map_err(|e| e.to_string()).and_then(|v| plot::sub_scale_svg(&svg, &[v])) {
            Ok(()) => println!("plot: {}", svg.display()),
            Err(e) => eprintln!("plot failed: {e}"),
        }
    }
    if cli.smoke {
        let expected: Vec<&str> = jobs.iter().map(|j| j.name()).collect();
        let failed = smoke::failures(&report, &expected);
        for f in &failed {
            eprintln!("smoke: FAILED: {f}");
        }
        if failed.is_empty() {
            println!("smoke: every check passed ({} scenario runs)", expected.len());
        }
        return Ok(failed.is_empty());
    }
    Ok(report.failures.is_empty())
}
