//! `no-tier`: what a team would run with no tier at all. The same users, rates and payload
//! sizes as `direct`, but every user is an MQTT-over-WebSocket client of Mosquitto's own
//! websockets listener, subscribed to its own topic `msg/<user>` (QoS 1) and publishing QoS 1
//! to the recipient's topic the envelope fanout would have published for it. Latency, CPU and
//! acks are measured exactly as in `direct` (an ack here is the broker's PUBACK).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::{bar, print_steps, sweep, user_names, Procs, Sender};
use crate::env::{self, Broker, Res};
use crate::mqtt_ws;
use crate::report::{max_ok_rate, r3, Sweep};
use crate::stats::Stats;
use crate::Opts;

/// The topic a no-tier user subscribes to (fanout's default `--topic-prefix`, so the broker
/// handles topics of the same length).
pub fn topic(user: &str) -> String {
    format!("msg/{user}")
}

/// Mosquitto with a websockets listener, logging to `--out/<name>`.
pub fn start_broker(opts: &Opts, name: &str) -> Res<Broker> {
    let dir = opts.out.join(name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    env::start_mosquitto(&opts.mosquitto, &dir, true)
}

/// Connects `users[i]` as an MQTT-over-WebSocket client from source address `i % S`,
/// `concurrency` at a time, each subscribed to its own topic. Returns the sessions in order and
/// the connect rate (per second, counted at SUBACK).
pub async fn connect_all(
    opts: &Opts,
    users: &[String],
    ws_port: u16,
    srcs: &[IpAddr],
    what: &str,
) -> Res<(Vec<mqtt_ws::Ws>, f64)> {
    let pb = bar(users.len() as u64, what);
    let t0 = Instant::now();
    let dst = env::ws_addr(ws_port);
    let res: Vec<Res<mqtt_ws::Ws>> = futures_util::stream::iter(users.iter().enumerate())
        .map(|(i, user)| {
            let src = srcs[i % srcs.len()];
            let pb = pb.clone();
            async move {
                let r = mqtt_ws::connect(src, dst, user, &topic(user), Duration::from_secs(30)).await;
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
        out.push(
            r.map_err(|e| format!("{failed} of {} sessions failed; session {i} ({}): {e}", users.len(), users[i]))?,
        );
    }
    Ok((out, users.len() as f64 / secs))
}

pub async fn no_tier(opts: &Opts, rates: &[f64], run: u32) -> Res<Sweep> {
    let broker = start_broker(opts, &format!("no-tier-n{}-run{run}", opts.users))?;
    let ws_port = broker.ws_port.ok_or("no websockets listener")?;
    let users = user_names("u", opts.users);
    let srcs = env::source_addrs(opts.sources);
    let stats = Stats::new(Instant::now());
    let (wss, cps) = connect_all(opts, &users, ws_port, &srcs, "no-tier: connecting").await?;
    let conns: Vec<mqtt_ws::MqttConn> = wss.into_iter().map(|ws| mqtt_ws::run(ws, Arc::clone(&stats))).collect();
    let procs = Procs { instances: Vec::new(), brokers: vec![broker.proc.pid()] };
    let (idle_cpu, steps) = sweep(&Sender::NoTier(&conns), &users, &stats, &procs, opts, rates, "no-tier").await;
    let broker_rss = env::rss_kib_sum(&procs.brokers);
    drop(conns);
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(broker);
    print_steps(
        &format!(
            "no-tier (run {run}): {} users as MQTT-over-WebSocket clients of Mosquitto, QoS 1, {} B messages",
            opts.users, opts.size
        ),
        &idle_cpu,
        &steps,
    );
    Ok(Sweep {
        run,
        instances: None,
        clients: None,
        users: opts.users,
        message_bytes: opts.size,
        step_secs: opts.step_secs,
        connect_rate_per_s: Some(r3(cps)),
        instance_rss_kib_after: None,
        broker_rss_kib_after: Some(broker_rss),
        idle_cpu,
        max_ok_rate: max_ok_rate(&steps),
        steps,
    })
}
