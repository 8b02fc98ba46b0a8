//! `fanout-bench`: load generator and benchmark suite for fanout.
//!
//! It starts its own Mosquitto (`/usr/sbin/mosquitto`, generated config, free port) and M
//! `fanout` instances (the repository's `target/release/fanout`, or `--fanout PATH`) as
//! subprocesses, drives them over loopback WebSockets, and reports a text table, `report.json`
//! and `latency.svg` in `--out`. Its own crate (`bench/`, a separate workspace like `fuzz/`):
//! the service does not link the generator's dependencies.
//!
//! Scenarios: `direct` (+ `broker-floor` in the same invocation, direct as a ratio to it),
//! `broker-floor`, `idle`, `fanout-amplification`, `churn`, or `all`. `--smoke` shrinks
//! everything so a full pass takes well under 20 s.

mod client;
mod env;
mod plot;
mod report;
mod scenarios;
mod smoke;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};

use report::{r3, Failure, FloorRatios, Machine, Report, Section};

#[derive(Copy, Clone, PartialEq, Eq, Debug, ValueEnum)]
enum Scenario {
    /// N users over M instances at a sweep of rates (also runs broker-floor unless --no-floor)
    Direct,
    /// the same rates and sizes straight through Mosquitto with rumqttc
    BrokerFloor,
    /// N idle connections to one instance: RSS per connection, connections/s, memory kept
    Idle,
    /// K instances: MQTT messages in over all instances per message delivered
    FanoutAmplification,
    /// connect/disconnect at a fixed rate with messages flowing
    Churn,
    /// every scenario
    All,
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::Direct => "direct",
            Scenario::BrokerFloor => "broker-floor",
            Scenario::Idle => "idle",
            Scenario::FanoutAmplification => "fanout-amplification",
            Scenario::Churn => "churn",
            Scenario::All => "all",
        }
    }
}

#[derive(Parser, Debug)]
#[command(name = "fanout-bench", about = "Load generator and benchmarks for fanout (loopback only)")]
struct Cli {
    /// Scenarios to run, in order
    #[arg(value_enum, default_values_t = vec![Scenario::All])]
    scenarios: Vec<Scenario>,
    /// Tiny sizes: every scenario in well under 20 s (CI)
    #[arg(long)]
    smoke: bool,
    /// fanout instances (direct, churn uses at most 2)
    #[arg(long, default_value_t = 5)]
    instances: usize,
    /// users, one connection each (direct, fanout-amplification, broker-floor)
    #[arg(long, default_value_t = 500)]
    users: usize,
    /// offered total rates, messages/s, comma-separated (direct, broker-floor)
    #[arg(long, value_delimiter = ',', default_value = "1000,2000,4000,8000,12000,16000,20000,24000")]
    rates: Vec<f64>,
    /// seconds per rate step
    #[arg(long, default_value_t = 5.0)]
    step_secs: f64,
    /// bytes of the chat `message` JSON (timestamp + padding)
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// keep sweeping after a step misses p99 < 50 ms or loses messages
    #[arg(long)]
    no_stop_on_fail: bool,
    /// skip broker-floor when running direct
    #[arg(long)]
    no_floor: bool,
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
    pub jwt_secret: String,
    pub mosquitto: PathBuf,
    pub fanout: PathBuf,
    pub instance_threads: Option<usize>,
    pub out: PathBuf,
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

async fn run(cli: Cli, nofile: u64) -> Result<bool, String> {
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
        jwt_secret: cli.jwt_secret.clone().unwrap_or_else(|| format!("bench-{}", uuid::Uuid::new_v4().simple())),
        mosquitto: cli.mosquitto.clone(),
        fanout: env::fanout_binary(cli.fanout.as_deref())?,
        instance_threads: cli.instance_threads,
        out: cli.out.clone(),
    };
    let mut rates = cli.rates.clone();
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
        rates = vec![200.0, 400.0];
    }
    std::fs::create_dir_all(&opts.out).map_err(|e| format!("{}: {e}", opts.out.display()))?;
    let mut list: Vec<Scenario> = Vec::new();
    for s in &cli.scenarios {
        if *s == Scenario::All {
            list.extend([Scenario::Direct, Scenario::Idle, Scenario::FanoutAmplification, Scenario::Churn]);
        } else if !list.contains(s) {
            list.push(*s);
        }
    }
    if list.contains(&Scenario::Direct) && !cli.no_floor && !list.contains(&Scenario::BrokerFloor) {
        let at = list.iter().position(|s| *s == Scenario::Direct).unwrap_or(0);
        list.insert(at + 1, Scenario::BrokerFloor);
    }
    let machine = machine(nofile);
    println!(
        "fanout-bench: {} cores ({}), RLIMIT_NOFILE {nofile}; scenarios {list:?}; fanout {}; out {}",
        machine.nproc,
        machine.cpu_model.as_deref().unwrap_or("?"),
        opts.fanout.display(),
        opts.out.display()
    );
    let started = std::time::Instant::now();
    let mut sections = Vec::new();
    let mut failures = Vec::new();
    for s in &list {
        let r = match s {
            Scenario::Direct => scenarios::direct(&opts, &rates).await.map(Section::Direct),
            Scenario::BrokerFloor => scenarios::broker_floor(&opts, &rates).await.map(Section::BrokerFloor),
            Scenario::Idle => scenarios::idle(&opts).await.map(Section::Idle),
            Scenario::FanoutAmplification => scenarios::amplification(&opts).await.map(Section::FanoutAmplification),
            Scenario::Churn => scenarios::churn(&opts).await.map(Section::Churn),
            Scenario::All => continue,
        };
        match r {
            Ok(section) => sections.push(section),
            Err(error) => {
                eprintln!("fanout-bench: {} failed: {error}", s.name());
                failures.push(Failure { scenario: s.name().to_string(), error });
            }
        }
    }
    let direct = sections.iter().find_map(|s| if let Section::Direct(d) = s { Some(d) } else { None });
    let floor = sections.iter().find_map(|s| if let Section::BrokerFloor(f) = s { Some(f) } else { None });
    let ratios = match (direct, floor) {
        (Some(d), Some(f)) => Some(FloorRatios::new(d, f)),
        _ => None,
    };
    if let Some(r) = &ratios {
        println!("\ndirect vs broker-floor (same invocation, same rates and sizes):");
        let v = serde_json::to_value(r).map_err(|e| e.to_string())?;
        for (k, v) in v.as_object().into_iter().flatten() {
            println!("  {k:<44} {v}");
        }
    }
    if let Some(d) = direct {
        let svg = opts.out.join("latency.svg");
        match plot::latency_svg(&svg, d, floor) {
            Ok(()) => println!("plot: {}", svg.display()),
            Err(e) => eprintln!("plot failed: {e}"),
        }
    }
    let report = Report {
        tool: "fanout-bench",
        args: std::env::args().skip(1).collect(),
        machine,
        wall_secs: r3(started.elapsed().as_secs_f64()),
        scenarios: sections,
        failures,
        direct_vs_floor: ratios,
    };
    let path = opts.out.join("report.json");
    env::write_file(&path, &serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?)?;
    println!("report: {} ({:.1} s)", path.display(), started.elapsed().as_secs_f64());
    if !report.failures.is_empty() {
        return Ok(false);
    }
    if cli.smoke {
        let expected: Vec<&str> = list.iter().map(|s| s.name()).collect();
        let failed = smoke::failures(&report, &expected);
        for f in &failed {
            eprintln!("smoke: FAILED: {f}");
        }
        if failed.is_empty() {
            println!("smoke: every check passed ({} scenarios)", expected.len());
        }
        return Ok(failed.is_empty());
    }
    Ok(true)
}
