//! `broker-floor`: the `direct` shape straight through Mosquitto with rumqttc over TCP: M
//! publishers (one per would-be instance) and M subscribers holding N/M user topics each, QoS 1.
//! A broker-only reference: no WebSocket, and few connections that batch.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS, SubscribeFilter};

use super::{print_steps, sweep, user_names, Procs, Sender};
use crate::env::{self, Res};
use crate::report::{max_ok_rate, Sweep};
use crate::stats::{classify, Inbound, Stats};
use crate::Opts;

pub async fn broker_floor(opts: &Opts, rates: &[f64], run: u32) -> Res<Sweep> {
    let dir = opts.out.join(format!("broker-floor-run{run}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let broker = env::start_mosquitto(&opts.mosquitto, &dir, false)?;
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
                            if let Inbound::Chat(s) = classify(t) {
                                st.record(&s);
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        sa.fetch_add(1, Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        st.errors.fetch_add(1, Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
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
        let st = stats.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        st.acks.fetch_add(1, Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        st.errors.fetch_add(1, Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
        pubs.push(c);
    }
    let procs = Procs { instances: Vec::new(), brokers: vec![broker.proc.pid()] };
    let (idle_cpu, steps) = sweep(&Sender::Floor(&pubs), &users, &stats, &procs, opts, rates, "broker-floor").await;
    let broker_rss = env::rss_kib_sum(&procs.brokers);
    for t in tasks {
        t.abort();
    }
    drop(broker);
    print_steps(
        &format!(
            "broker-floor (run {run}): rumqttc over TCP, {m} publishers, {m} subscribers, {} user topics, QoS 1",
            opts.users
        ),
        &idle_cpu,
        &steps,
    );
    Ok(Sweep {
        run,
        instances: None,
        clients: Some(m),
        users: opts.users,
        message_bytes: opts.size,
        step_secs: opts.step_secs,
        connect_rate_per_s: None,
        instance_rss_kib_after: None,
        broker_rss_kib_after: Some(broker_rss),
        idle_cpu,
        max_ok_rate: max_ok_rate(&steps),
        steps,
    })
}
