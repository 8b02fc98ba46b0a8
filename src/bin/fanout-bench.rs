//! `fanout-bench`: load generator and benchmark suite for fanout.
//!
//! It starts its own Mosquitto (`/usr/sbin/mosquitto`, generated config, free port) and M
//! `fanout` instances (the binary next to this one), drives them over loopback WebSockets,
//! and reports a text table, `report.json` and `latency.svg` in `--out`.
//!
//! Scenarios: `direct` (+ `broker-floor` in the same invocation, direct as a ratio to it),
//! `broker-floor`, `idle`, `fanout-amplification`, `churn`, or `all`. `--smoke` shrinks
//! everything so a full pass takes well under 20 s.

#[path = "fanout_bench/client.rs"]
mod client;
#[path = "fanout_bench/env.rs"]
mod env;
#[path = "fanout_bench/plot.rs"]
mod plot;
#[path = "fanout_bench/scenarios.rs"]
mod scenarios;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use serde_json::{json, Value};

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
    /// fanout binary under test (default: `fanout` next to this executable)
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
    pub fanout: Option<PathBuf>,
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
            eprintln!("fanout-bench: smoke checks failed (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("fanout-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn machine(nofile: u64) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model =
        cpuinfo.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, m)| m.trim());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo.lines().find(|l| l.starts_with("MemTotal")).map(|l| l.split_whitespace().nth(1).unwrap_or(""));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "nproc": scenarios::ncpu(),
        "cpu_model": model,
        "mem_total_kib": mem.and_then(|m| m.parse::<u64>().ok()),
        "kernel": kernel.trim(),
        "nofile_limit": nofile,
    })
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
        fanout: cli.fanout.clone(),
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
        "fanout-bench: {} cores ({}), RLIMIT_NOFILE {nofile}; scenarios {list:?}; out {}",
        machine["nproc"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        opts.out.display()
    );
    let started = std::time::Instant::now();
    let mut sections = Vec::new();
    let (mut direct, mut floor) = (None, None);
    for s in &list {
        let v = match s {
            Scenario::Direct => scenarios::direct(&opts, &rates).await?,
            Scenario::BrokerFloor => scenarios::broker_floor(&opts, &rates).await?,
            Scenario::Idle => scenarios::idle(&opts).await?,
            Scenario::FanoutAmplification => scenarios::amplification(&opts).await?,
            Scenario::Churn => scenarios::churn(&opts).await?,
            Scenario::All => continue,
        };
        match s {
            Scenario::Direct => direct = Some(v.clone()),
            Scenario::BrokerFloor => floor = Some(v.clone()),
            _ => {}
        }
        sections.push(v);
    }
    let ratios = match (&direct, &floor) {
        (Some(d), Some(f)) => Some(ratio_section(d, f)),
        _ => None,
    };
    if let Some(r) = &ratios {
        println!("\ndirect vs broker-floor (same invocation, same rates and sizes):");
        for (k, v) in r.as_object().into_iter().flatten() {
            println!("  {k:<44} {v}");
        }
    }
    if let Some(d) = &direct {
        let svg = opts.out.join("latency.svg");
        match scenarios::plot(&svg, d, floor.as_ref()) {
            Ok(()) => println!("plot: {}", svg.display()),
            Err(e) => eprintln!("plot failed: {e}"),
        }
    }
    let report = json!({
        "tool": "fanout-bench",
        "args": std::env::args().skip(1).collect::<Vec<_>>(),
        "machine": machine,
        "wall_secs": scenarios::r3(started.elapsed().as_secs_f64()),
        "scenarios": sections,
        "direct_vs_floor": ratios,
    });
    let path = opts.out.join("report.json");
    env::write_file(&path, &serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?)?;
    println!("report: {} ({:.1} s)", path.display(), started.elapsed().as_secs_f64());
    Ok(if cli.smoke { smoke_checks(&report) } else { true })
}

fn ratio_section(d: &Value, f: &Value) -> Value {
    let mut per_rate = Vec::new();
    for ds in d["steps"].as_array().into_iter().flatten() {
        let rate = ds["offered_rate"].as_f64();
        let fs = f["steps"].as_array().into_iter().flatten().find(|s| s["offered_rate"].as_f64() == rate);
        if let Some(fs) = fs {
            let diff = |k: &str| Some(scenarios::r3(ds[k].as_f64()? - fs[k].as_f64()?));
            let ratio = |k: &str| Some(scenarios::r3(ds[k].as_f64()? / fs[k].as_f64()?.max(0.001)));
            per_rate.push(json!({
                "offered_rate": rate,
                "p50_minus_floor_ms": diff("p50_ms"),
                "p99_minus_floor_ms": diff("p99_ms"),
                "p99_ratio": ratio("p99_ms"),
            }));
        }
    }
    let dmax = d["max_ok_rate"].as_f64();
    let fmax = f["max_ok_rate"].as_f64();
    json!({
        "direct_max_ok_rate": dmax,
        "floor_max_ok_rate": fmax,
        "direct_share_of_floor_throughput": match (dmax, fmax) {
            (Some(a), Some(b)) if b > 0.0 => Some(scenarios::r3(a / b)),
            _ => None,
        },
        "note": if f["steps"].as_array().and_then(|s| s.last()).and_then(|s| s["ok"].as_bool()) == Some(true) {
            "broker-floor passed every offered rate: its max is a lower bound; the share is an upper bound"
        } else {
            "both sweeps stopped at their first failing rate"
        },
        "per_rate": per_rate,
    })
}

/// What a smoke run must show for the tool (and the service) to count as working.
fn smoke_checks(report: &Value) -> bool {
    let mut ok = true;
    let mut check = |cond: bool, what: &str| {
        if !cond {
            eprintln!("smoke: FAILED: {what}");
            ok = false;
        }
    };
    for s in report["scenarios"].as_array().into_iter().flatten() {
        match s["scenario"].as_str() {
            Some("direct") | Some("broker-floor") => {
                for st in s["steps"].as_array().into_iter().flatten() {
                    check(
                        st["delivered_ratio"].as_f64() == Some(1.0),
                        &format!("{} delivered every message", s["scenario"]),
                    );
                }
            }
            Some("idle") => {
                check(
                    s["rss_per_connection_kib"].as_f64().is_some_and(|v| v > 0.0),
                    "idle RSS per connection measured",
                );
                check(s["cycle_failures"].as_u64() == Some(0), "idle connect/close cycles all succeeded");
            }
            Some("fanout-amplification") => {
                check(s["amplification"].as_f64().is_some_and(|a| (a - 1.0).abs() < 0.01), "amplification is 1.00");
            }
            Some("churn") => {
                check(s["churn_delivery_ratio"].as_f64() == Some(1.0), "churned users got their message");
                check(s["packets_per_connection"].as_f64().is_some_and(|p| p > 0.0), "broker log counted");
            }
            _ => {}
        }
    }
    ok
}
