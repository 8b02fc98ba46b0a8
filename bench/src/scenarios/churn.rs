//! `churn`: stable users exchange messages while single-device users connect, receive one
//! message, and disconnect at a fixed rate.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio_tungstenite::tungstenite::Message;

use super::{run_step, user_names, Fleet, Sender, Step};
use crate::client::{self, chat_frame, Conn};
use crate::env::{self, Res};
use crate::report::{r3, r5, Churn};
use crate::stats::{classify, message_json, new_hist, Inbound};
use crate::Opts;

/// What the churned users' tasks share: the stable users' sockets (one of them sends to each
/// churned user), and what they count.
struct Ctx {
    conns: Vec<Conn>,
    epoch: Instant,
    size: usize,
    connected: AtomicU64,
    sent: AtomicU64,
    got: AtomicU64,
    fails: AtomicU64,
    hist: Mutex<Histogram<u64>>,
}

/// One churned user `c-<n>`: connect, have a stable user send it one message, wait for it,
/// close.
async fn one(ctx: Arc<Ctx>, n: usize, token: String, src: IpAddr, dst: SocketAddr) {
    let Ok(mut ws) = client::connect(src, dst, &token, Duration::from_secs(10)).await else {
        ctx.fails.fetch_add(1, Relaxed);
        return;
    };
    ctx.connected.fetch_add(1, Relaxed);
    let t_us = ctx.epoch.elapsed().as_micros() as u64;
    let sender = &ctx.conns[n % ctx.conns.len()];
    if sender.tx.send(chat_frame(&format!("c-{n}"), &message_json(t_us, u64::MAX, n as u64, ctx.size))).is_ok() {
        ctx.sent.fetch_add(1, Relaxed);
    }
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                if let Inbound::Chat(s) = classify(t.as_str()) {
                    return Some(s);
                }
            }
        }
        None
    })
    .await;
    if let Ok(Some(s)) = r {
        ctx.got.fetch_add(1, Relaxed);
        ctx.hist.lock().saturating_record((ctx.epoch.elapsed().as_micros() as u64).saturating_sub(s.t).max(1));
    }
    let _ = ws.close(None).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), async { while let Some(Ok(_)) = ws.next().await {} }).await;
}

pub async fn churn(opts: &Opts) -> Res<Churn> {
    let m = opts.instances.clamp(1, 2);
    let mut fleet =
        Fleet::start(opts, "churn", m, user_names("s", opts.churn_users), "churn: connecting stable users").await?;
    let total = (opts.churn_rate * opts.churn_secs).round() as u64;
    let toks = client::tokens(&opts.jwt_secret, &user_names("c-", total as usize))?;
    let ctx = Arc::new(Ctx {
        conns: std::mem::take(&mut fleet.conns),
        epoch: fleet.stats.epoch,
        size: opts.size,
        connected: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        got: AtomicU64::new(0),
        fails: AtomicU64::new(0),
        hist: Mutex::new(new_hist()),
    });
    let churner = {
        let ctx = ctx.clone();
        let (ports, srcs) = (fleet.ports.clone(), fleet.srcs.clone());
        let rate = opts.churn_rate;
        tokio::spawn(async move {
            let start = Instant::now();
            let mut handles = Vec::new();
            for (n, token) in toks.into_iter().enumerate() {
                let at = start + Duration::from_secs_f64(n as f64 / rate);
                tokio::time::sleep_until(at.into()).await;
                let src = srcs[n % srcs.len()];
                let dst = env::ws_addr(ports[n % ports.len()]);
                handles.push(tokio::spawn(one(ctx.clone(), n, token, src, dst)));
            }
            for h in handles {
                let _ = h.await;
            }
        })
    };
    // Background traffic among the stable users for the same duration.
    let step = Step {
        label: "churn (stable traffic)",
        tag: 1,
        rate: opts.churn_msg_rate,
        secs: opts.churn_secs,
        size: opts.size,
    };
    let step = run_step(&Sender::Fanout(&ctx.conns), &fleet.users, &fleet.stats, &fleet.procs(), &step).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), churner).await;
    // The stable users' `ack`s count both kinds of traffic: wait for all of them.
    let want_acks = step.sent + ctx.sent.load(Relaxed);
    let until = Instant::now() + Duration::from_secs(5);
    while fleet.stats.acks.load(Relaxed) < want_acks && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all_acks = fleet.stats.acks.load(Relaxed);
    // Let the last UNSUBSCRIBEs reach the broker and its log.
    let until = Instant::now() + Duration::from_secs(10);
    let prefix = "msg/c-";
    let log = &fleet.setup.broker.mosquitto_log()?;
    let (mut sub, mut unsub) = env::count_sub_unsub(log, prefix);
    while unsub < sub && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        (sub, unsub) = env::count_sub_unsub(log, prefix);
    }
    let connected = ctx.connected.load(Relaxed);
    let got = ctx.got.load(Relaxed);
    let ctx_sent = ctx.sent.load(Relaxed);
    let fails = ctx.fails.load(Relaxed);
    let per_conn = (sub + unsub) as f64 / connected.max(1) as f64;
    let churn_p99 = {
        let h = ctx.hist.lock();
        (!h.is_empty()).then(|| r3(h.value_at_quantile(0.99) as f64 / 1000.0))
    };
    let mut subs_left = 0.0;
    for p in &fleet.ports {
        subs_left += env::scrape(*p, "fanout_subscriptions", "").await.unwrap_or(0.0);
    }
    drop(ctx);
    fleet.stop(Duration::ZERO).await;
    println!(
        "\nchurn: {m} instances, {} stable users sending {} msg/s; {} connect+disconnect/s for {} s: {connected}/{total} \
         connected ({fails} failed); broker log: {sub} SUBSCRIBE + {unsub} UNSUBSCRIBE for churned users = {per_conn:.3} \
         packets per connection; messages to churned users delivered {got}/{total} (p99 {churn_p99:?} ms); stable \
         traffic delivered {}/{}; {subs_left} subscriptions left (stable users + 1 broadcast per instance = {})",
        opts.churn_users,
        opts.churn_msg_rate,
        opts.churn_rate,
        opts.churn_secs,
        step.delivered,
        step.sent,
        opts.churn_users + m
    );
    Ok(Churn {
        instances: m,
        stable_users: opts.churn_users,
        churn_rate: opts.churn_rate,
        churn_secs: opts.churn_secs,
        churn_connections: total,
        churn_connected: connected,
        churn_failed: fails,
        subscribe_lines: sub,
        unsubscribe_lines: unsub,
        packets_per_connection: r3(per_conn),
        churn_messages_sent: ctx_sent,
        churn_messages_delivered: got,
        churn_delivery_ratio: r5(got as f64 / total.max(1) as f64),
        acks_stable_and_churn: all_acks,
        churn_message_p99_ms: churn_p99,
        subscriptions_left_incl_broadcast: subs_left,
        stable_traffic: step,
    })
}
