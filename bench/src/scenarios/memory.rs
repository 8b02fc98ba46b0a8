//! `idle-memory`: memory per idle connection on both sides of the no-tier comparison, each on
//! fresh processes: N idle authenticated fanout sockets on one instance (instance RSS and the
//! broker's, per socket), and N idle MQTT-over-WebSocket sessions, each subscribed to its own
//! topic, on Mosquitto's websockets listener (broker RSS per client).

use std::time::Duration;

use super::no_tier as nt;
use super::{connect_all, user_names, Meter, Procs, Setup};
use crate::env::{self, Res};
use crate::report::{r3, IdleMemory, Side};
use crate::Opts;

fn per_conn_kib(before: u64, after: u64, n: usize) -> f64 {
    r3((after as f64 - before as f64) / n.max(1) as f64)
}

/// `n` idle fanout connections to one instance.
pub async fn fanout(opts: &Opts, n: usize, settle: Duration, run: u32) -> Res<IdleMemory> {
    let setup = Setup::start(opts, &format!("idle-memory-fanout-n{n}-run{run}"), 1).await?;
    let procs = setup.procs();
    let (pid, port) = (procs.instances[0], setup.instances[0].port);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (inst0, brk0) = (env::rss_kib(pid), env::rss_kib_sum(&procs.brokers));
    let users = user_names("m", n);
    let srcs = env::source_addrs(opts.sources);
    let meter = Meter::start(&procs);
    let (wss, cps) = connect_all(opts, &users, &[port], &srcs, "idle-memory (fanout): connecting").await?;
    let cpu = meter.stop();
    tokio::time::sleep(settle).await;
    let (inst1, brk1) = (env::rss_kib(pid), env::rss_kib_sum(&procs.brokers));
    let held = env::scrape(port, "fanout_connections", "").await.unwrap_or(-1.0);
    drop(wss);
    setup.stop();
    let r = IdleMemory {
        run,
        side: Side::Fanout,
        connections: n,
        connected: held,
        instance_rss_empty_kib: Some(inst0),
        instance_rss_full_kib: Some(inst1),
        instance_kib_per_connection: Some(per_conn_kib(inst0, inst1, n)),
        broker_rss_empty_kib: brk0,
        broker_rss_full_kib: brk1,
        broker_kib_per_connection: per_conn_kib(brk0, brk1, n),
        connect_rate_per_s: r3(cps),
        connect_cpu: cpu,
    };
    println!(
        "\nidle-memory (run {run}), fanout: {n} idle connections to one instance: instance RSS {inst0} → {inst1} KiB = \
         {:.2} KiB per connection, broker RSS {brk0} → {brk1} KiB = {:.2} KiB per connection; instance reports {held}",
        r.instance_kib_per_connection.unwrap_or(0.0),
        r.broker_kib_per_connection
    );
    Ok(r)
}

/// `n` idle MQTT-over-WebSocket sessions on Mosquitto, each subscribed to its own topic.
pub async fn no_tier(opts: &Opts, n: usize, settle: Duration, run: u32) -> Res<IdleMemory> {
    let broker = nt::start_broker(opts, &format!("idle-memory-no-tier-n{n}-run{run}"))?;
    let ws_port = broker.ws_port.ok_or("no websockets listener")?;
    let procs = Procs { instances: Vec::new(), brokers: vec![broker.proc.pid()] };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let brk0 = env::rss_kib_sum(&procs.brokers);
    let users = user_names("m", n);
    let srcs = env::source_addrs(opts.sources);
    let meter = Meter::start(&procs);
    let (wss, cps) = nt::connect_all(opts, &users, ws_port, &srcs, "idle-memory (no-tier): connecting").await?;
    let cpu = meter.stop();
    tokio::time::sleep(settle).await;
    let brk1 = env::rss_kib_sum(&procs.brokers);
    let held = wss.len() as f64;
    drop(wss);
    drop(broker);
    let r = IdleMemory {
        run,
        side: Side::NoTier,
        connections: n,
        connected: held,
        instance_rss_empty_kib: None,
        instance_rss_full_kib: None,
        instance_kib_per_connection: None,
        broker_rss_empty_kib: brk0,
        broker_rss_full_kib: brk1,
        broker_kib_per_connection: per_conn_kib(brk0, brk1, n),
        connect_rate_per_s: r3(cps),
        connect_cpu: cpu,
    };
    println!(
        "\nidle-memory (run {run}), no-tier: {n} idle MQTT-over-WebSocket sessions: broker RSS {brk0} → {brk1} KiB = \
         {:.2} KiB per client",
        r.broker_kib_per_connection
    );
    Ok(r)
}
