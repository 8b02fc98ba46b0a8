//! `sub-scale`: one broker holding S user subscriptions, per engine (`--scale-engines`). Real
//! fanout instances (`--scale-instances`, attached round-robin to the broker's nodes) hold
//! `--scale-users` real users; the synthetic subscriber ([`super::synth`]) holds the rest. The
//! sizes `--scale-subs` are reached one after the other on the same broker: each row adds a
//! new batch of synthetic clients holding the difference. Per row: confirmed subscriptions per
//! second (of that batch), the broker's RSS per subscription (all nodes), its CPU per
//! subscription, and one chat step at `--scale-rate` between the real users through fanout.
//! A row not confirmed within `--scale-limit-secs` is measured where it got to, its rate
//! extrapolated to the S asked for, and larger S are not attempted.

use std::time::Duration;

use super::synth::{self, Synth, TOPICS_PER_PACKET};
use super::{bar, run_step, user_names, Fleet, Sender, Step};
use crate::engine::EngineKind;
use crate::env::{self, Res};
use crate::report::{r3, SubScale, SubScaleEngine, SubScaleRow};
use crate::Opts;

pub async fn sub_scale(opts: &Opts) -> Res<SubScale> {
    let mut engines = Vec::new();
    for &kind in &opts.scale_engines {
        engines.push(one_engine(opts, kind).await?);
    }
    Ok(SubScale { engines })
}

fn loadavg() -> String {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

async fn one_engine(opts: &Opts, kind: EngineKind) -> Res<SubScaleEngine> {
    let m = opts.scale_instances.max(1);
    let users = user_names("r", opts.scale_users.max(2));
    let n_users = users.len();
    let name = format!("sub-scale-{kind}");
    println!("\nsub-scale: {kind}: starting the broker, {m} instance(s) and {n_users} real users");
    let fleet = Fleet::start_on(opts, kind, &name, m, users, &format!("sub-scale {kind}: connecting")).await?;
    let ports = fleet.setup.broker.ports();
    let procs = fleet.procs();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss0 = env::rss_kib_sum(&procs.brokers);
    let mut batches: Vec<Synth> = Vec::new();
    let mut rows = Vec::new();
    let mut stopped = None;
    let mut held = n_users as u64;
    let mut synthetic = 0u64;
    for (b, &target) in opts.scale_subs.iter().enumerate() {
        let add = (target as u64).saturating_sub(held);
        let cpu0 = env::cpu_secs_sum(&procs.brokers);
        let s = Synth::start(&format!("synth-b{b}"), b, &ports, opts.synth_clients, add as usize, opts.synth_window);
        let pb = bar(add, &format!("sub-scale {kind}: S = {target}"));
        let complete = s.wait(&[], opts.scale_limit, Some(&pb)).await;
        pb.finish_and_clear();
        let secs = s.started.elapsed().as_secs_f64();
        let p = s.progress();
        let cpu = env::cpu_secs_sum(&procs.brokers) - cpu0;
        held += p.confirmed;
        synthetic += p.confirmed;
        let rate = p.confirmed as f64 / secs.max(1e-6);
        // Let the broker settle (and free what subscribing allocated temporarily).
        tokio::time::sleep(opts.settle.max(Duration::from_secs(1))).await;
        let rss = env::rss_kib_sum(&procs.brokers);
        let step = Step {
            label: &format!("sub-scale {kind} S={held}"),
            tag: b as u64 + 1,
            rate: opts.scale_rate,
            secs: opts.step_secs,
            size: opts.size,
        };
        let chat = run_step(&Sender::Fanout(&fleet.conns), &fleet.users, &fleet.stats, &procs, &step).await;
        let row = SubScaleRow {
            target_subscriptions: target,
            subscriptions: held,
            added: add,
            added_confirmed: p.confirmed,
            added_refused: p.refused,
            complete,
            subscribe_secs: r3(secs),
            subscribe_rate_per_s: r3(rate),
            extrapolated_secs_for_target: (!complete && rate > 0.0)
                .then(|| r3((target as f64 - (held - p.confirmed) as f64) / rate)),
            broker_cpu_secs_subscribing: r3(cpu),
            broker_cpu_us_per_subscription: r3(cpu * 1e6 / p.confirmed.max(1) as f64),
            broker_rss_kib: rss,
            broker_rss_bytes_per_subscription: r3((rss as f64 - rss0 as f64) * 1024.0 / synthetic.max(1) as f64),
            synthetic_connection_errors: p.errors,
            chat,
            load_average: loadavg(),
        };
        println!(
            "sub-scale {kind}: S = {} ({} added{}) in {:.1} s = {:.0} subscriptions/s, broker CPU {:.1} µs/subscription; \
             broker RSS {} KiB = {:.0} B per synthetic subscription; chat at {:.0} msg/s: p50 {} p99 {} ms, {}/{} delivered; \
             load {}",
            row.subscriptions,
            row.added_confirmed,
            if complete { String::new() } else { format!(" of {add}: NOT COMPLETE within the limit") },
            secs,
            rate,
            row.broker_cpu_us_per_subscription,
            rss,
            row.broker_rss_bytes_per_subscription,
            opts.scale_rate,
            row.chat.latency.p50_ms.map_or("-".into(), |v| format!("{v:.2}")),
            row.chat.latency.p99_ms.map_or("-".into(), |v| format!("{v:.2}")),
            row.chat.delivered,
            row.chat.sent,
            row.load_average
        );
        rows.push(row);
        batches.push(s);
        if !complete {
            stopped = Some(format!(
                "S = {target} not confirmed within {:.0} s ({} of {add} added); larger S not attempted",
                opts.scale_limit.as_secs_f64(),
                p.confirmed
            ));
            break;
        }
    }
    if let Some(why) = &stopped {
        println!("sub-scale {kind}: {why}");
    }
    for s in batches {
        s.stop().await;
    }
    let nodes = ports.len();
    fleet.stop(Duration::from_millis(200)).await;
    Ok(SubScaleEngine {
        engine: kind.to_string(),
        nodes,
        instances: m,
        real_users: n_users,
        synthetic_clients: opts.synth_clients,
        topics_per_subscribe: TOPICS_PER_PACKET,
        subscribe_window: opts.synth_window,
        broker_rss_kib_baseline: rss0,
        rows,
        stopped,
    })
}

/// Starts a synthetic subscriber of `subs` topics on `ports` and waits until it holds them all.
pub async fn hold(opts: &Opts, ports: &[u16], subs: usize, limit: Duration) -> Res<Synth> {
    let s = Synth::start("synth", 0, ports, opts.synth_clients, subs, opts.synth_window);
    synth::connected(&s, Duration::from_secs(30)).await?;
    let pb = bar(subs as u64, "synthetic subscriber: subscribing");
    let ok = s.wait(&[], limit, Some(&pb)).await;
    pb.finish_and_clear();
    if !ok {
        let p = s.progress();
        s.stop().await;
        return Err(format!("synthetic subscriber: {} of {subs} confirmed within {limit:?}", p.confirmed));
    }
    Ok(s)
}
