//! fanout against the no-tier floor: ratios fanout ÷ no-tier per run of one invocation, and
//! their median and spread over the runs.

use serde::Serialize;

use crate::report::{r3, Cpu, IdleMemory, Side, StepReport, Sweep};

#[derive(Serialize)]
pub struct Comparison {
    pub note: &'static str,
    pub runs: Vec<RunComparison>,
    /// the highest offered rate both sides sustained (p99 < 50 ms, ≥ 99.9 % delivered) in
    /// every run: CPU per message is compared there too
    pub highest_common_ok_rate: Option<f64>,
    pub summary: Vec<Row>,
}

#[derive(Serialize)]
pub struct RunComparison {
    pub run: u32,
    pub fanout_max_ok_rate: Option<f64>,
    pub no_tier_max_ok_rate: Option<f64>,
    pub max_ok_rate_ratio: Option<f64>,
    /// set when a side passed every offered rate (its maximum is then only a lower bound), or
    /// when the step a side failed at was generator-bound
    pub bound_note: Option<String>,
    pub per_rate: Vec<AtRate>,
    pub memory: Option<Memory>,
}

/// One offered rate, both sides.
#[derive(Serialize)]
pub struct AtRate {
    pub offered_rate: f64,
    pub fanout_ok: bool,
    pub no_tier_ok: bool,
    pub fanout_p50_ms: Option<f64>,
    pub no_tier_p50_ms: Option<f64>,
    pub fanout_p99_ms: Option<f64>,
    pub no_tier_p99_ms: Option<f64>,
    pub p99_ratio: Option<f64>,
    /// CPU per message, µs: fanout's instances, fanout's broker, their sum; no-tier's broker
    pub fanout_instances_us: f64,
    pub fanout_broker_us: f64,
    pub fanout_server_us: f64,
    pub no_tier_broker_us: f64,
    /// fanout_server_us ÷ no_tier_broker_us
    pub server_cpu_ratio: Option<f64>,
    /// the same above what the processes use with the connections open and no traffic
    /// (`idle_cpu` of the sweep): the cost each message adds
    pub fanout_server_above_idle_us: f64,
    pub no_tier_broker_above_idle_us: f64,
    pub server_above_idle_ratio: Option<f64>,
    pub fanout_generator_us: f64,
    pub no_tier_generator_us: f64,
    pub fanout_generator_bound: bool,
    pub no_tier_generator_bound: bool,
}

/// Memory per idle connection, KiB.
#[derive(Serialize)]
pub struct Memory {
    pub connections: usize,
    pub fanout_instance_kib: f64,
    pub fanout_broker_kib: f64,
    pub no_tier_broker_kib: f64,
    /// instance ÷ no-tier broker
    pub instance_ratio: Option<f64>,
    /// (instance + broker) ÷ no-tier broker
    pub total_ratio: Option<f64>,
}

/// One measure over the runs: fanout, no-tier and their ratio.
#[derive(Serialize)]
pub struct Row {
    pub measure: String,
    pub unit: &'static str,
    pub fanout: Option<Spread>,
    pub no_tier: Option<Spread>,
    pub ratio: Option<Spread>,
}

#[derive(Serialize, Clone)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub values: Vec<f64>,
}

impl Spread {
    fn of(values: Vec<f64>) -> Option<Spread> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Some(Spread { median: r3(median), min: v[0], max: v[n - 1], values })
    }

    fn show(s: &Option<Spread>) -> String {
        match s {
            None => "–".into(),
            Some(s) if s.values.len() == 1 => fmt(s.median),
            Some(s) => format!("{} ({}–{})", fmt(s.median), fmt(s.min), fmt(s.max)),
        }
    }
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(r3(a / b)),
        _ => None,
    }
}

/// µs per message of `cores` above `idle_cores` over the step.
fn above_idle(st: &StepReport, cores: f64, idle_cores: f64) -> f64 {
    r3((cores - idle_cores).max(0.0) * st.cpu.wall_secs * 1e6 / st.sent.max(1) as f64)
}

fn at_rate(f: &StepReport, n: &StepReport, fi: &Cpu, ni: &Cpu) -> AtRate {
    let (fc, nc) = (f.cpu_per_message, n.cpu_per_message);
    let server = r3(fc.instances_us + fc.broker_us);
    let f_above = above_idle(f, f.cpu.instances_cores + f.cpu.broker_cores, fi.instances_cores + fi.broker_cores);
    let n_above = above_idle(n, n.cpu.broker_cores, ni.broker_cores);
    AtRate {
        offered_rate: f.offered_rate,
        fanout_ok: f.ok,
        no_tier_ok: n.ok,
        fanout_p50_ms: f.latency.p50_ms,
        no_tier_p50_ms: n.latency.p50_ms,
        fanout_p99_ms: f.latency.p99_ms,
        no_tier_p99_ms: n.latency.p99_ms,
        p99_ratio: ratio(f.latency.p99_ms, n.latency.p99_ms),
        fanout_instances_us: fc.instances_us,
        fanout_broker_us: fc.broker_us,
        fanout_server_us: server,
        no_tier_broker_us: nc.broker_us,
        server_cpu_ratio: ratio(Some(server), Some(nc.broker_us)),
        fanout_server_above_idle_us: f_above,
        no_tier_broker_above_idle_us: n_above,
        server_above_idle_ratio: ratio(Some(f_above), Some(n_above)),
        fanout_generator_us: fc.generator_us,
        no_tier_generator_us: nc.generator_us,
        fanout_generator_bound: f.generator_bound,
        no_tier_generator_bound: n.generator_bound,
    }
}

fn bound_note(name: &str, s: &Sweep) -> Option<String> {
    let last = s.steps.last()?;
    if last.ok {
        Some(format!("{name} passed every offered rate: its maximum is a lower bound"))
    } else if last.generator_bound {
        Some(format!(
            "{name} failed at {} msg/s in a generator-bound step (send rate {:.0}, scheduler lag {} ms, generator \
             {} cores, machine busy {})",
            last.offered_rate,
            last.achieved_send_rate,
            last.generator_max_lag_ms,
            last.cpu.generator_cores,
            last.cpu.machine_busy
        ))
    } else {
        None
    }
}

/// Pairs the `direct` and `no-tier` sweeps (and idle-memory phases) of each run.
pub fn compare(fanout: &[&Sweep], no_tier: &[&Sweep], memory: &[&IdleMemory], compare_at: &[f64]) -> Comparison {
    let mut runs = Vec::new();
    for f in fanout {
        let Some(n) = no_tier.iter().find(|n| n.run == f.run) else { continue };
        let per_rate = f
            .steps
            .iter()
            .filter_map(|fs| Some(at_rate(fs, n.step_at(fs.offered_rate)?, &f.idle_cpu, &n.idle_cpu)))
            .collect();
        let mem = |side| memory.iter().find(|m| m.run == f.run && m.side == side);
        let memory = match (mem(Side::Fanout), mem(Side::NoTier)) {
            (Some(fm), Some(nm)) => {
                let inst = fm.instance_kib_per_connection.unwrap_or(0.0);
                Some(Memory {
                    connections: fm.connections,
                    fanout_instance_kib: inst,
                    fanout_broker_kib: fm.broker_kib_per_connection,
                    no_tier_broker_kib: nm.broker_kib_per_connection,
                    instance_ratio: ratio(Some(inst), Some(nm.broker_kib_per_connection)),
                    total_ratio: ratio(Some(inst + fm.broker_kib_per_connection), Some(nm.broker_kib_per_connection)),
                })
            }
            _ => None,
        };
        let notes: Vec<String> = [bound_note("fanout", f), bound_note("no-tier", n)].into_iter().flatten().collect();
        runs.push(RunComparison {
            run: f.run,
            fanout_max_ok_rate: f.max_ok_rate,
            no_tier_max_ok_rate: n.max_ok_rate,
            max_ok_rate_ratio: ratio(f.max_ok_rate, n.max_ok_rate),
            bound_note: (!notes.is_empty()).then(|| notes.join("; ")),
            per_rate,
            memory,
        });
    }
    // The highest rate both sides sustained in every run.
    let highest = runs
        .iter()
        .map(|r| r.per_rate.iter().take_while(|a| a.fanout_ok && a.no_tier_ok).map(|a| a.offered_rate).last())
        .try_fold(f64::INFINITY, |acc, r| r.map(|r| acc.min(r)))
        .filter(|r| r.is_finite());
    let mut summary = Vec::new();
    let col = |pick: &dyn Fn(&RunComparison) -> Option<f64>| Spread::of(runs.iter().filter_map(pick).collect());
    summary.push(Row {
        measure: "max rate with p99 < 50 ms".into(),
        unit: "msg/s",
        fanout: col(&|r| r.fanout_max_ok_rate),
        no_tier: col(&|r| r.no_tier_max_ok_rate),
        ratio: col(&|r| r.max_ok_rate_ratio),
    });
    fn at(r: &RunComparison, rate: f64) -> Option<&AtRate> {
        r.per_rate.iter().find(|a| a.offered_rate == rate)
    }
    for &rate in compare_at {
        summary.push(Row {
            measure: format!("p99 at {rate} msg/s"),
            unit: "ms",
            fanout: col(&|r| at(r, rate)?.fanout_p99_ms),
            no_tier: col(&|r| at(r, rate)?.no_tier_p99_ms),
            ratio: col(&|r| at(r, rate)?.p99_ratio),
        });
    }
    let mut cpu_rates: Vec<f64> = compare_at.to_vec();
    if let Some(h) = highest {
        if !cpu_rates.contains(&h) {
            cpu_rates.push(h);
        }
    }
    for rate in cpu_rates {
        summary.push(Row {
            measure: format!("CPU per message at {rate} msg/s: instances + broker (no-tier: broker)"),
            unit: "µs",
            fanout: col(&|r| Some(at(r, rate)?.fanout_server_us)),
            no_tier: col(&|r| Some(at(r, rate)?.no_tier_broker_us)),
            ratio: col(&|r| at(r, rate)?.server_cpu_ratio),
        });
        summary.push(Row {
            measure: format!("  the same above idle CPU at {rate} msg/s"),
            unit: "µs",
            fanout: col(&|r| Some(at(r, rate)?.fanout_server_above_idle_us)),
            no_tier: col(&|r| Some(at(r, rate)?.no_tier_broker_above_idle_us)),
            ratio: col(&|r| at(r, rate)?.server_above_idle_ratio),
        });
        summary.push(Row {
            measure: format!("  of which instances at {rate} msg/s"),
            unit: "µs",
            fanout: col(&|r| Some(at(r, rate)?.fanout_instances_us)),
            no_tier: None,
            ratio: None,
        });
        summary.push(Row {
            measure: format!("  of which broker at {rate} msg/s"),
            unit: "µs",
            fanout: col(&|r| Some(at(r, rate)?.fanout_broker_us)),
            no_tier: col(&|r| Some(at(r, rate)?.no_tier_broker_us)),
            ratio: col(&|r| {
                let a = at(r, rate)?;
                ratio(Some(a.fanout_broker_us), Some(a.no_tier_broker_us))
            }),
        });
        summary.push(Row {
            measure: format!("  generator at {rate} msg/s (not the system under test)"),
            unit: "µs",
            fanout: col(&|r| Some(at(r, rate)?.fanout_generator_us)),
            no_tier: col(&|r| Some(at(r, rate)?.no_tier_generator_us)),
            ratio: col(&|r| {
                let a = at(r, rate)?;
                ratio(Some(a.fanout_generator_us), Some(a.no_tier_generator_us))
            }),
        });
    }
    summary.push(Row {
        measure: "memory per idle connection: instance (no-tier: broker)".into(),
        unit: "KiB",
        fanout: col(&|r| Some(r.memory.as_ref()?.fanout_instance_kib)),
        no_tier: col(&|r| Some(r.memory.as_ref()?.no_tier_broker_kib)),
        ratio: col(&|r| r.memory.as_ref()?.instance_ratio),
    });
    summary.push(Row {
        measure: "memory per idle connection: instance + broker (no-tier: broker)".into(),
        unit: "KiB",
        fanout: col(&|r| {
            let m = r.memory.as_ref()?;
            Some(r3(m.fanout_instance_kib + m.fanout_broker_kib))
        }),
        no_tier: col(&|r| Some(r.memory.as_ref()?.no_tier_broker_kib)),
        ratio: col(&|r| r.memory.as_ref()?.total_ratio),
    });
    Comparison {
        note: "ratio = fanout ÷ no-tier (below 1 is better for fanout for latency, CPU and memory; above 1 for \
               the max rate); medians over the runs with (min–max)",
        runs,
        highest_common_ok_rate: highest,
        summary,
    }
}

pub fn print(c: &Comparison) {
    println!("\nfanout vs no-tier (Mosquitto's websockets listener), {} run(s) in this invocation:", c.runs.len());
    for r in &c.runs {
        if let Some(n) = &r.bound_note {
            println!("  run {}: {n}", r.run);
        }
    }
    println!("  {:<68} {:>5} {:>22} {:>22} {:>22}", "measure", "unit", "fanout", "no-tier", "fanout ÷ no-tier");
    for row in &c.summary {
        println!(
            "  {:<68} {:>5} {:>22} {:>22} {:>22}",
            row.measure,
            row.unit,
            Spread::show(&row.fanout),
            Spread::show(&row.no_tier),
            Spread::show(&row.ratio)
        );
    }
}
