//! `idle`: N idle authenticated connections to one instance; RSS per connection and connect
//! rate; then connect/close cycles for memory kept per closed connection.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::{bar, connect_all, user_names, Meter, Setup};
use crate::client;
use crate::env::{self, Res};
use crate::report::{r3, Idle};
use crate::Opts;

/// Waits (at most 20 s) until the instance on `port` reports no connections.
async fn until_no_connections(port: u16) {
    let until = Instant::now() + Duration::from_secs(20);
    while env::scrape(port, "fanout_connections", "").await.unwrap_or(0.0) > 0.0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `count` connect/close cycles against `port`, at most 64 at a time; returns the failures.
async fn cycles(opts: &Opts, port: u16, count: usize, seed: usize, label: &str) -> Res<u64> {
    let srcs = env::source_addrs(opts.sources);
    let users = user_names(&format!("cyc{seed}-"), count);
    let toks = client::tokens(&opts.jwt_secret, &users)?;
    let pb = bar(count as u64, label);
    let failures = AtomicU64::new(0);
    futures_util::stream::iter(toks.into_iter().enumerate())
        .for_each_concurrent(opts.concurrency.min(64), |(i, tok)| {
            let src = srcs[i % srcs.len()];
            let pb = pb.clone();
            let failures = &failures;
            async move {
                match client::connect(src, env::ws_addr(port), &tok, Duration::from_secs(30)).await {
                    Ok(mut ws) => {
                        let _ = ws.close(None).await;
                        let _ = tokio::time::timeout(Duration::from_secs(5), async {
                            while let Some(Ok(_)) = ws.next().await {}
                        })
                        .await;
                    }
                    Err(_) => {
                        failures.fetch_add(1, Relaxed);
                    }
                }
                pb.inc(1);
            }
        })
        .await;
    pb.finish_and_clear();
    Ok(failures.load(Relaxed))
}

pub async fn idle(opts: &Opts) -> Res<Idle> {
    let setup = Setup::start(opts, &format!("idle-n{}", opts.connections), 1).await?;
    let procs = setup.procs();
    let pid = procs.instances[0];
    let port = setup.instances[0].port;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = env::rss_kib(pid);
    let users = user_names("i", opts.connections);
    let srcs = env::source_addrs(opts.sources);
    let meter = Meter::start(&procs);
    let (wss, cps) = connect_all(opts, &users, &[port], &srcs, "idle: connecting").await?;
    let cpu = meter.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let full = env::rss_kib(pid);
    let conns_metric = env::scrape(port, "fanout_connections", "").await.unwrap_or(-1.0);
    let per_conn = (full.saturating_sub(base)) as f64 * 1024.0 / opts.connections as f64;
    println!(
        "\nidle: {} connections to one instance: RSS {base} KiB empty → {full} KiB; {:.2} KiB per connection; \
         {cps:.0} connections/s (counted at `connected`); instance reports {conns_metric} connections",
        opts.connections,
        per_conn / 1024.0
    );
    drop(wss);
    // Wait until the instance has let go of all of them.
    until_no_connections(port).await;
    let after_close = env::rss_kib(pid);
    let conns_after_close = env::scrape(port, "fanout_connections", "").await.unwrap_or(-1.0);
    setup.stop();

    // Connect/close cycles on a fresh instance (after the N-connection phase the allocator
    // holds enough freed memory to hide a leak): warm-up, then the measured cycles.
    let setup = Setup::start(opts, &format!("idle-cycles-{}", opts.cycles), 1).await?;
    let pid = setup.instances[0].proc.pid();
    let port = setup.instances[0].port;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fresh = env::rss_kib(pid);
    let warm = (opts.cycles / 10).max(1);
    cycles(opts, port, warm, 0, "idle: warm-up connect/close cycles").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = env::rss_kib(pid);
    let fails = cycles(opts, port, opts.cycles, 1, "idle: connect/close cycles").await?;
    until_no_connections(port).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = env::rss_kib(pid);
    let subs_left = env::scrape(port, "fanout_subscriptions", "").await.unwrap_or(-1.0);
    let conns_after_cycles = env::scrape(port, "fanout_connections", "").await.unwrap_or(-1.0);
    let kept = (after as f64 - before as f64) * 1024.0 / opts.cycles as f64;
    println!(
        "idle: {} connect/close cycles on a fresh instance ({fails} failed): RSS {fresh} KiB fresh, {before} KiB after \
         {warm} warm-up cycles → {after} KiB; {kept:.1} bytes kept per closed connection; {subs_left} subscriptions \
         left (1 = the broadcast topic)",
        opts.cycles
    );
    setup.stop();
    Ok(Idle {
        connections: opts.connections,
        rss_empty_kib: base,
        rss_full_kib: full,
        rss_per_connection_kib: r3(per_conn / 1024.0),
        connect_rate_per_s: r3(cps),
        connect_cpu: cpu,
        instance_connections_metric: conns_metric,
        rss_after_close_kib: after_close,
        instance_connections_after_close: conns_after_close,
        cycles: opts.cycles,
        cycle_failures: fails,
        rss_fresh_cycles_instance_kib: fresh,
        warmup_cycles: warm,
        rss_before_cycles_kib: before,
        rss_after_cycles_kib: after,
        bytes_kept_per_closed_connection: r3(kept),
        subscriptions_left_incl_broadcast: subs_left,
        instance_connections_after_cycles: conns_after_cycles,
    })
}
