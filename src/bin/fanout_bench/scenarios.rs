//! The scenarios. Each starts its own Mosquitto and fanout instances, measures, stops them,
//! and returns a JSON section for the report.

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS, SubscribeFilter};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, chat_frame, message_json, Conn, Inbound, Stats};
use crate::env::{self, Broker, Instance, Res};
use crate::Opts;

/// Per-message p99 limit for "sustained" rates, and the delivered share a step must reach.
pub const P99_LIMIT_MS: f64 = 50.0;
pub const MIN_COMPLETE: f64 = 0.999;

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

pub struct Setup {
    pub broker: Broker,
    pub instances: Vec<Instance>,
}

impl Setup {
    pub async fn start(opts: &Opts, name: &str, count: usize) -> Res<Setup> {
        let dir = opts.out.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let broker = env::start_mosquitto(&opts.mosquitto, &dir)?;
        let bin = match &opts.fanout {
            Some(p) => p.clone(),
            None => env::fanout_binary()?,
        };
        let instances =
            env::start_instances(&bin, &dir, broker.port, count, &opts.jwt_secret, opts.instance_threads).await?;
        Ok(Setup { broker, instances })
    }

    pub fn pids(&self) -> Vec<u32> {
        self.instances.iter().map(|i| i.proc.pid()).collect()
    }

    pub fn stop(mut self) {
        for i in &mut self.instances {
            i.proc.stop();
        }
        self.broker.proc.stop();
    }
}

pub fn tokens(opts: &Opts, users: &[String]) -> Res<Vec<String>> {
    let v = fanout::auth::Verifier::from_secret(opts.jwt_secret.as_bytes())?;
    users.iter().map(|u| v.mint(u, Duration::from_secs(4 * 3600), None)).collect()
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
    let toks = tokens(opts, users)?;
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
    let mut out = Vec::with_capacity(res.len());
    for (i, r) in res.into_iter().enumerate() {
        out.push(r.map_err(|e| format!("connection {i} ({}): {e}", users[i]))?);
    }
    Ok((out, users.len() as f64 / secs))
}

/// CPU meters over one step.
pub struct Meter {
    t0: Instant,
    gen0: f64,
    pids: Vec<u32>,
    inst0: f64,
    broker: u32,
    broker0: f64,
    mach0: (f64, f64),
}

impl Meter {
    pub fn start(pids: &[u32], broker: u32) -> Meter {
        Meter {
            t0: Instant::now(),
            gen0: env::self_cpu_secs(),
            pids: pids.to_vec(),
            inst0: pids.iter().map(|p| env::cpu_secs(*p)).sum(),
            broker,
            broker0: env::cpu_secs(broker),
            mach0: env::machine_jiffies(),
        }
    }

    /// Cores used (CPU seconds per wall second) by generator, instances, broker, and the
    /// machine's busy share.
    pub fn stop(&self) -> Value {
        let wall = self.t0.elapsed().as_secs_f64().max(1e-6);
        let gen = (env::self_cpu_secs() - self.gen0) / wall;
        let inst = (self.pids.iter().map(|p| env::cpu_secs(*p)).sum::<f64>() - self.inst0) / wall;
        let brk = (env::cpu_secs(self.broker) - self.broker0) / wall;
        let m = env::machine_jiffies();
        let busy = (m.0 - self.mach0.0) / (m.1 - self.mach0.1).max(1.0);
        json!({"generator_cores": r3(gen), "instances_cores": r3(inst), "broker_cores": r3(brk), "machine_busy": r3(busy)})
    }
}

pub fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub fn ncpu() -> f64 {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64
}

fn quantiles(stats: &Stats) -> Value {
    let h = stats.hist.lock();
    let ms = |v: u64| r3(v as f64 / 1000.0);
    if h.is_empty() {
        return json!({"p50_ms": null, "p90_ms": null, "p99_ms": null, "p999_ms": null, "max_ms": null});
    }
    json!({
        "p50_ms": ms(h.value_at_quantile(0.5)),
        "p90_ms": ms(h.value_at_quantile(0.9)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
    })
}

/// How messages leave the generator in a step.
pub enum Sender<'a> {
    /// Through WebSocket connections (`conns[i]` belongs to `users[i]`).
    Ws(&'a [Conn]),
    /// Straight to the broker through rumqttc publishers.
    Mqtt(&'a [AsyncClient]),
}

/// One step at a fixed offered `rate` for `secs`: random sender → random other online user.
/// Latency is measured from the moment the generator hands the frame to the socket's writer
/// (or to rumqttc); the generator's lag behind the intended schedule is reported separately.
#[allow(clippy::too_many_arguments)]
pub async fn rate_step(
    sender: &Sender<'_>,
    users: &[String],
    stats: &Arc<Stats>,
    rate: f64,
    secs: f64,
    size: usize,
    step: u64,
    meter_pids: (&[u32], u32),
    label: &str,
) -> Value {
    stats.reset(step);
    let n = users.len();
    let total = (rate * secs).round() as u64;
    let pb = bar(total, &format!("{label} {rate:.0} msg/s"));
    let mut rng = StdRng::seed_from_u64(step);
    let meter = Meter::start(meter_pids.0, meter_pids.1);
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
            let msg = message_json(t_us, step, sent, size);
            match sender {
                Sender::Ws(conns) => {
                    if conns[from].tx.send(chat_frame(&users[to], &msg)).is_err() {
                        send_errors += 1;
                    }
                }
                Sender::Mqtt(pubs) => {
                    let env = floor_envelope(&users[from], &users[to], &msg);
                    let c = &pubs[from % pubs.len()];
                    if c.publish(format!("bf/{}", users[to]), QoS::AtLeastOnce, false, env).await.is_err() {
                        send_errors += 1;
                    }
                }
            }
            sent += 1;
        }
        pb.set_position(sent);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let send_secs = start.elapsed().as_secs_f64();
    // Drain: wait until everything arrived, at most 5 s.
    let until = Instant::now() + Duration::from_secs(5);
    while stats.delivered.load(Relaxed) < total && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu = meter.stop();
    pb.finish_and_clear();
    let delivered = stats.delivered.load(Relaxed);
    let achieved = total as f64 / send_secs;
    let mut v = json!({
        "offered_rate": rate,
        "achieved_send_rate": r3(achieved),
        "sent": total,
        "delivered": delivered,
        "delivered_ratio": r3x(delivered as f64 / total.max(1) as f64),
        "acks": stats.acks.load(Relaxed),
        "errors": stats.errors.load(Relaxed) + send_errors,
        "late_from_earlier_step": stats.stale.load(Relaxed),
        "generator_max_lag_ms": r3(max_lag_us as f64 / 1000.0),
        "cpu": cpu,
    });
    merge(&mut v, quantiles(stats));
    let gen = v["cpu"]["generator_cores"].as_f64().unwrap_or(0.0);
    let busy = v["cpu"]["machine_busy"].as_f64().unwrap_or(0.0);
    let bound = achieved < 0.98 * rate || (busy > 0.9 && gen > 0.4 * ncpu());
    v["generator_bound"] = json!(bound);
    let p99 = v["p99_ms"].as_f64().unwrap_or(f64::INFINITY);
    v["ok"] = json!(p99 < P99_LIMIT_MS && delivered as f64 >= MIN_COMPLETE * total as f64);
    v
}

fn r3x(x: f64) -> f64 {
    (x * 100000.0).round() / 100000.0
}

pub fn merge(a: &mut Value, b: Value) {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
}

fn floor_envelope(from: &str, to: &str, msg: &str) -> Vec<u8> {
    let id = uuid::Uuid::new_v4();
    let ms = fanout::clock::unix_millis();
    format!(
        "{{\"event\":\"chat_message\",\"data\":{{\"id\":\"{id}\",\"from\":\"{from}\",\"to\":\"{to}\",\"message\":{msg},\"sentAt\":{ms}}}}}"
    )
    .into_bytes()
}

pub fn print_steps(title: &str, steps: &[Value]) {
    println!("\n{title}");
    println!(
        "{:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>6} {:>6} {:>6} {:>5}",
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
        "ok"
    );
    for s in steps {
        let f = |k: &str| s[k].as_f64().map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        let c = |k: &str| s["cpu"][k].as_f64().map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        println!(
            "{:>9} {:>9.0} {:>8.3} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>6} {:>6} {:>6} {:>5}",
            s["offered_rate"],
            s["achieved_send_rate"].as_f64().unwrap_or(0.0),
            s["delivered_ratio"].as_f64().unwrap_or(0.0) * 100.0,
            f("p50_ms"),
            f("p90_ms"),
            f("p99_ms"),
            f("p999_ms"),
            f("max_ms"),
            s["errors"],
            c("generator_cores"),
            c("instances_cores"),
            c("broker_cores"),
            if s["ok"].as_bool() == Some(true) { "yes" } else { "NO" }
        );
        if s["generator_bound"].as_bool() == Some(true) {
            println!("          ^ generator may be the bottleneck (send rate fell behind or it used much of a saturated machine)");
        }
    }
}

pub fn max_ok_rate(steps: &[Value]) -> Option<f64> {
    let mut best = None;
    for s in steps {
        if s["ok"].as_bool() == Some(true) {
            best = s["offered_rate"].as_f64();
        } else {
            break;
        }
    }
    best
}

fn user_names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// `direct`: N users over M instances, a sweep of offered rates.
pub async fn direct(opts: &Opts, rates: &[f64]) -> Res<Value> {
    let setup = Setup::start(opts, &format!("direct-m{}-n{}", opts.instances, opts.users), opts.instances).await?;
    let users = user_names("u", opts.users);
    let ports: Vec<u16> = setup.instances.iter().map(|i| i.port).collect();
    let srcs = env::source_addrs(opts.sources);
    let stats = Stats::new(Instant::now());
    let (wss, cps) = connect_all(opts, &users, &ports, &srcs, "direct: connecting").await?;
    let conns: Vec<Conn> = wss.into_iter().map(|ws| client::run(ws, stats.clone())).collect();
    let pids = setup.pids();
    let mut steps = Vec::new();
    for (k, &rate) in rates.iter().enumerate() {
        let s = rate_step(
            &Sender::Ws(&conns),
            &users,
            &stats,
            rate,
            opts.step_secs,
            opts.size,
            k as u64 + 1,
            (&pids, setup.broker.proc.pid()),
            "direct",
        )
        .await;
        let ok = s["ok"].as_bool() == Some(true);
        steps.push(s);
        if !ok && opts.stop_on_fail {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let rss: Vec<u64> = pids.iter().map(|p| env::rss_kib(*p)).collect();
    drop(conns);
    tokio::time::sleep(Duration::from_millis(200)).await;
    setup.stop();
    print_steps(
        &format!("direct: {} instances, {} users, {} B messages", opts.instances, opts.users, opts.size),
        &steps,
    );
    Ok(json!({
        "scenario": "direct",
        "instances": opts.instances,
        "users": opts.users,
        "message_bytes": opts.size,
        "step_secs": opts.step_secs,
        "connect_rate_per_s": r3(cps),
        "instance_rss_kib_after": rss,
        "max_ok_rate": max_ok_rate(&steps),
        "steps": steps,
    }))
}

/// `broker-floor`: the same shape straight through Mosquitto with rumqttc: M publishers (one
/// per would-be instance) and M subscribers holding N/M user topics each, QoS 1.
pub async fn broker_floor(opts: &Opts, rates: &[f64]) -> Res<Value> {
    let dir = opts.out.join("broker-floor");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let broker = env::start_mosquitto(&opts.mosquitto, &dir)?;
    let users = user_names("u", opts.users);
    let stats = Stats::new(Instant::now());
    let m = opts.instances.max(1);
    let mk = |id: String| {
        let mut o = MqttOptions::new(id, "127.0.0.1", broker.port);
        o.set_keep_alive(Duration::from_secs(10));
        o.set_max_packet_size(1 << 20, 1 << 20);
        o.set_inflight(200);
        let (c, mut el) = AsyncClient::new(o, 4096);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        el.set_network_options(net);
        (c, el)
    };
    let subacks = Arc::new(AtomicU64::new(0));
    let mut subs = Vec::new();
    let mut tasks = Vec::new();
    for k in 0..m {
        let (c, mut el) = mk(format!("floor-sub-{k}"));
        let st = stats.clone();
        let sa = subacks.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(t) = std::str::from_utf8(&p.payload) {
                            if let Inbound::Chat(s) = client::classify(t) {
                                st.record(s.t, s.r);
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        sa.fetch_add(1, Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }));
        let mine: Vec<SubscribeFilter> = users
            .iter()
            .enumerate()
            .filter(|(i, _)| i % m == k)
            .map(|(_, u)| SubscribeFilter::new(format!("bf/{u}"), QoS::AtLeastOnce))
            .collect();
        subs.push((c, mine));
    }
    let mut expected = 0;
    for (c, filters) in &subs {
        for chunk in filters.chunks(64) {
            c.subscribe_many(chunk.to_vec()).await.map_err(|e| e.to_string())?;
            expected += 1;
        }
    }
    let until = Instant::now() + Duration::from_secs(30);
    while subacks.load(Relaxed) < expected {
        if Instant::now() > until {
            return Err("broker-floor: subscriptions not confirmed".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut pubs = Vec::new();
    for k in 0..m {
        let (c, mut el) = mk(format!("floor-pub-{k}"));
        tasks.push(tokio::spawn(async move {
            loop {
                if el.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }));
        pubs.push(c);
    }
    let mut steps = Vec::new();
    for (k, &rate) in rates.iter().enumerate() {
        let s = rate_step(
            &Sender::Mqtt(&pubs),
            &users,
            &stats,
            rate,
            opts.step_secs,
            opts.size,
            k as u64 + 1,
            (&[], broker.proc.pid()),
            "broker-floor",
        )
        .await;
        let ok = s["ok"].as_bool() == Some(true);
        steps.push(s);
        if !ok && opts.stop_on_fail {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for t in tasks {
        t.abort();
    }
    drop(broker);
    print_steps(
        &format!("broker-floor: rumqttc, {m} publishers, {m} subscribers, {} user topics, QoS 1", opts.users),
        &steps,
    );
    Ok(json!({
        "scenario": "broker-floor",
        "clients": m,
        "users": opts.users,
        "message_bytes": opts.size,
        "step_secs": opts.step_secs,
        "max_ok_rate": max_ok_rate(&steps),
        "steps": steps,
    }))
}

/// `idle`: N idle authenticated connections to one instance; RSS per connection and
/// connect rate; then connect/close cycles for memory kept per closed connection.
pub async fn idle(opts: &Opts) -> Res<Value> {
    let setup = Setup::start(opts, &format!("idle-n{}", opts.connections), 1).await?;
    let pid = setup.instances[0].proc.pid();
    let port = setup.instances[0].port;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = env::rss_kib(pid);
    let users = user_names("i", opts.connections);
    let srcs = env::source_addrs(opts.sources);
    let meter = Meter::start(&[pid], setup.broker.proc.pid());
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
    let until = Instant::now() + Duration::from_secs(20);
    while env::scrape(port, "fanout_connections", "").await.unwrap_or(0.0) > 0.0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after_close = env::rss_kib(pid);
    setup.stop();

    // Connect/close cycles on a fresh instance (after the N-connection phase the allocator
    // holds enough freed memory to hide a leak): warm-up, then the measured cycles.
    let setup = Setup::start(opts, &format!("idle-cycles-{}", opts.cycles), 1).await?;
    let pid = setup.instances[0].proc.pid();
    let port = setup.instances[0].port;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fresh = env::rss_kib(pid);
    let cycle = |count: usize, seed: usize, label: &'static str| {
        let srcs = srcs.clone();
        async move {
            let users = user_names(&format!("cyc{seed}-"), count);
            let toks = tokens(opts, &users)?;
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
            Ok::<u64, String>(failures.load(Relaxed))
        }
    };
    let warm = (opts.cycles / 10).max(1);
    cycle(warm, 0, "idle: warm-up connect/close cycles").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = env::rss_kib(pid);
    let fails = cycle(opts.cycles, 1, "idle: connect/close cycles").await?;
    let until = Instant::now() + Duration::from_secs(20);
    while env::scrape(port, "fanout_connections", "").await.unwrap_or(0.0) > 0.0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = env::rss_kib(pid);
    let subs_left = env::scrape(port, "fanout_subscriptions", "").await.unwrap_or(-1.0);
    let kept = (after as f64 - before as f64) * 1024.0 / opts.cycles as f64;
    println!(
        "idle: {} connect/close cycles on a fresh instance ({fails} failed): RSS {fresh} KiB fresh, {before} KiB after \
         {warm} warm-up cycles → {after} KiB; {kept:.1} bytes kept per closed connection; {subs_left} subscriptions \
         left (1 = the broadcast topic)",
        opts.cycles
    );
    setup.stop();
    Ok(json!({
        "scenario": "idle",
        "connections": opts.connections,
        "rss_empty_kib": base,
        "rss_full_kib": full,
        "rss_per_connection_kib": r3(per_conn / 1024.0),
        "connect_rate_per_s": r3(cps),
        "connect_cpu": cpu,
        "instance_connections_metric": conns_metric,
        "rss_after_close_kib": after_close,
        "cycles": opts.cycles,
        "cycle_failures": fails,
        "rss_fresh_cycles_instance_kib": fresh,
        "warmup_cycles": warm,
        "rss_before_cycles_kib": before,
        "rss_after_cycles_kib": after,
        "bytes_kept_per_closed_connection": r3(kept),
        "subscriptions_left_incl_broadcast": subs_left,
    }))
}

/// `fanout-amplification`: K instances, messages at a fixed rate; MQTT messages received by
/// all instances per message delivered.
pub async fn amplification(opts: &Opts) -> Res<Value> {
    let k = opts.amp_instances;
    let setup = Setup::start(opts, &format!("amplification-k{k}"), k).await?;
    let users = user_names("a", opts.users);
    let ports: Vec<u16> = setup.instances.iter().map(|i| i.port).collect();
    let srcs = env::source_addrs(opts.sources);
    let stats = Stats::new(Instant::now());
    let (wss, _) = connect_all(opts, &users, &ports, &srcs, "amplification: connecting").await?;
    let conns: Vec<Conn> = wss.into_iter().map(|ws| client::run(ws, stats.clone())).collect();
    let sum = |name: &'static str, label: &'static str| {
        let ports = ports.clone();
        async move {
            let mut t = 0.0;
            for p in ports {
                t += env::scrape(p, name, label).await?;
            }
            Ok::<f64, String>(t)
        }
    };
    let in0 = sum("fanout_messages_in_total", "source=\"mqtt\"").await?;
    let del0 = sum("fanout_messages_delivered_total", "").await?;
    let pids = setup.pids();
    let step = rate_step(
        &Sender::Ws(&conns),
        &users,
        &stats,
        opts.amp_rate,
        opts.step_secs,
        opts.size,
        1,
        (&pids, setup.broker.proc.pid()),
        "amplification",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let in1 = sum("fanout_messages_in_total", "source=\"mqtt\"").await?;
    let del1 = sum("fanout_messages_delivered_total", "").await?;
    let delivered = step["delivered"].as_u64().unwrap_or(0);
    let amp = (in1 - in0) / (delivered.max(1) as f64);
    drop(conns);
    setup.stop();
    println!(
        "\nfanout-amplification: K = {k} instances, {} users, {} msg/s for {} s: {} sent, {delivered} delivered (clients), \
         {} delivered (instances' metric), {} MQTT messages in over all instances → amplification {amp:.3} \
         (a broadcast-to-every-instance design: {k}.00)",
        opts.users,
        opts.amp_rate,
        opts.step_secs,
        step["sent"],
        del1 - del0,
        in1 - in0
    );
    Ok(json!({
        "scenario": "fanout-amplification",
        "instances": k,
        "users": opts.users,
        "rate": opts.amp_rate,
        "mqtt_in_total": in1 - in0,
        "delivered_clients": delivered,
        "delivered_metric": del1 - del0,
        "amplification": r3(amp),
        "broadcast_design_amplification": k,
        "step": step,
    }))
}

/// `churn`: stable users exchange messages while single-device users connect, receive one
/// message, and disconnect at a fixed rate.
pub async fn churn(opts: &Opts) -> Res<Value> {
    let m = opts.instances.clamp(1, 2);
    let setup = Setup::start(opts, "churn", m).await?;
    let users = user_names("s", opts.churn_users);
    let ports: Vec<u16> = setup.instances.iter().map(|i| i.port).collect();
    let srcs = env::source_addrs(opts.sources);
    let stats = Stats::new(Instant::now());
    let (wss, _) = connect_all(opts, &users, &ports, &srcs, "churn: connecting stable users").await?;
    let conns: Vec<Conn> = wss.into_iter().map(|ws| client::run(ws, stats.clone())).collect();
    let conns = Arc::new(conns);
    let pids = setup.pids();
    let total = (opts.churn_rate * opts.churn_secs).round() as u64;
    let toks = Arc::new(tokens(opts, &user_names("c-", total as usize))?);
    let done = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let got = Arc::new(AtomicU64::new(0));
    let fails = Arc::new(AtomicU64::new(0));
    let churn_hist = Arc::new(parking_lot::Mutex::new(client::new_hist()));
    let epoch = stats.epoch;
    let churner = {
        let (conns, toks, done, connected, got, fails, hist) = (
            conns.clone(),
            toks.clone(),
            done.clone(),
            connected.clone(),
            got.clone(),
            fails.clone(),
            churn_hist.clone(),
        );
        let (ports, srcs) = (ports.clone(), srcs.clone());
        let (rate, size) = (opts.churn_rate, opts.size);
        tokio::spawn(async move {
            let start = Instant::now();
            let mut handles = Vec::new();
            for n in 0..total as usize {
                let at = start + Duration::from_secs_f64(n as f64 / rate);
                tokio::time::sleep_until(at.into()).await;
                let (conns, toks, done, connected, got, fails, hist) = (
                    conns.clone(),
                    toks.clone(),
                    done.clone(),
                    connected.clone(),
                    got.clone(),
                    fails.clone(),
                    hist.clone(),
                );
                let src = srcs[n % srcs.len()];
                let dst = env::ws_addr(ports[n % ports.len()]);
                handles.push(tokio::spawn(async move {
                    let Ok(mut ws) = client::connect(src, dst, &toks[n], Duration::from_secs(10)).await else {
                        fails.fetch_add(1, Relaxed);
                        done.fetch_add(1, Relaxed);
                        return;
                    };
                    connected.fetch_add(1, Relaxed);
                    let t_us = epoch.elapsed().as_micros() as u64;
                    let sender = &conns[n % conns.len()];
                    let _ =
                        sender.tx.send(chat_frame(&format!("c-{n}"), &message_json(t_us, u64::MAX, n as u64, size)));
                    let r = tokio::time::timeout(Duration::from_secs(5), async {
                        while let Some(Ok(m)) = ws.next().await {
                            if let Message::Text(t) = m {
                                if let Inbound::Chat(s) = client::classify(t.as_str()) {
                                    return Some(s);
                                }
                            }
                        }
                        None
                    })
                    .await;
                    if let Ok(Some(s)) = r {
                        got.fetch_add(1, Relaxed);
                        hist.lock().saturating_record((epoch.elapsed().as_micros() as u64).saturating_sub(s.t).max(1));
                    }
                    let _ = ws.close(None).await;
                    let _ = tokio::time::timeout(Duration::from_secs(5), async {
                        while let Some(Ok(_)) = ws.next().await {}
                    })
                    .await;
                    done.fetch_add(1, Relaxed);
                }));
            }
            for h in handles {
                let _ = h.await;
            }
        })
    };
    // Background traffic among the stable users for the same duration.
    let step = rate_step(
        &Sender::Ws(&conns),
        &users,
        &stats,
        opts.churn_msg_rate,
        opts.churn_secs,
        opts.size,
        1,
        (&pids, setup.broker.proc.pid()),
        "churn (stable traffic)",
    )
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(30), churner).await;
    // Let the last UNSUBSCRIBEs reach the broker and its log.
    let until = Instant::now() + Duration::from_secs(10);
    let prefix = "msg/c-";
    let (mut sub, mut unsub) = env::count_sub_unsub(&setup.broker.log, prefix);
    while unsub < sub && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        (sub, unsub) = env::count_sub_unsub(&setup.broker.log, prefix);
    }
    let connected = connected.load(Relaxed);
    let got = got.load(Relaxed);
    let per_conn = (sub + unsub) as f64 / connected.max(1) as f64;
    let churn_p99 = {
        let h = churn_hist.lock();
        if h.is_empty() {
            None
        } else {
            Some(r3(h.value_at_quantile(0.99) as f64 / 1000.0))
        }
    };
    let subs_left: f64 = {
        let mut t = 0.0;
        for p in &ports {
            t += env::scrape(*p, "fanout_subscriptions", "").await.unwrap_or(0.0);
        }
        t
    };
    drop(conns);
    setup.stop();
    println!(
        "\nchurn: {m} instances, {} stable users sending {} msg/s; {} connect+disconnect/s for {} s: {connected}/{total} \
         connected ({} failed); broker log: {sub} SUBSCRIBE + {unsub} UNSUBSCRIBE for churned users = {per_conn:.3} \
         packets per connection; messages to churned users delivered {got}/{connected} (p99 {churn_p99:?} ms); stable \
         traffic delivered {}/{}; {subs_left} subscriptions left (stable users + 1 broadcast per instance = {})",
        opts.churn_users,
        opts.churn_msg_rate,
        opts.churn_rate,
        opts.churn_secs,
        fails.load(Relaxed),
        step["delivered"],
        step["sent"],
        opts.churn_users + m
    );
    Ok(json!({
        "scenario": "churn",
        "instances": m,
        "stable_users": opts.churn_users,
        "churn_rate": opts.churn_rate,
        "churn_secs": opts.churn_secs,
        "churn_connections": total,
        "churn_connected": connected,
        "churn_failed": fails.load(Relaxed),
        "subscribe_lines": sub,
        "unsubscribe_lines": unsub,
        "packets_per_connection": r3(per_conn),
        "churn_messages_delivered": got,
        "churn_delivery_ratio": r3x(got as f64 / connected.max(1) as f64),
        "churn_message_p99_ms": churn_p99,
        "subscriptions_left_incl_broadcast": subs_left,
        "stable_traffic": step,
    }))
}

pub fn plot(path: &Path, direct: &Value, floor: Option<&Value>) -> Res<()> {
    crate::plot::latency_svg(path, direct, floor)
}
