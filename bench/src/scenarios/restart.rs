//! `restart-storm`: one instance holding N users; the broker is killed and started again
//! without persistence (every session and subscription is gone), and the instance must
//! subscribe all N again. Measured per N: time from the broker listening again to `/readyz`
//! 200, and to a message sent then reaching its recipient. With `--storm-subs S` a synthetic
//! subscriber ([`super::synth`]) holds S more subscriptions on the same broker and resubscribes
//! them too: measured until its last client has all its topics confirmed again.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::subscale::hold;
use super::{bar, connect_all, user_names, Setup};
use crate::client;
use crate::env::{self, Res};
use crate::report::{r3, RestartRow, RestartStorm};
use crate::Opts;

pub async fn restart_storm(opts: &Opts, sizes: &[usize]) -> Res<RestartStorm> {
    let mut rows = Vec::new();
    let subs_list = if opts.storm_subs.is_empty() { vec![0] } else { opts.storm_subs.clone() };
    for &n in sizes {
        for &subs in &subs_list {
            rows.push(one(opts, n, subs).await?);
        }
    }
    Ok(RestartStorm { rows })
}

async fn one(opts: &Opts, n: usize, subs: usize) -> Res<RestartRow> {
    {
        let n = n.max(2);
        let mut setup = Setup::start(opts, &format!("restart-n{n}-s{subs}"), 1).await?;
        let port = setup.instances[0].port;
        let users = user_names("s", n);
        let srcs = env::source_addrs(opts.sources);
        let (mut wss, _) = connect_all(opts, &users, &[port], &srcs, &format!("restart-storm: {n} users")).await?;
        // Every socket but the two the message uses is read (and so answers the instance's
        // pings) until the end: an unread socket is closed by the instance as a silent peer
        // after 60 s, and with a large S the storm starts later than that.
        let idle: Vec<_> = wss.drain(1..n - 1).collect();
        let readers: Vec<tokio::task::JoinHandle<()>> = idle
            .into_iter()
            .map(|mut ws| tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} }))
            .collect();
        let synth =
            if subs > 0 { Some(hold(opts, &setup.broker.ports(), subs, opts.scale_limit).await?) } else { None };
        let before = synth.as_ref().map(|s| s.connacks()).unwrap_or_default();
        setup.broker.mosquitto()?.restart(&opts.mosquitto)?;
        let t0 = Instant::now();
        while !matches!(env::http_get(port, "/readyz").await, Ok((200, _))) {
            if t0.elapsed() > Duration::from_secs(120) {
                return Err(format!("restart-storm: {n} users: not ready 120 s after the broker came back"));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let ready = t0.elapsed();
        // A message from the first user to the last flows again.
        let last = users[n - 1].clone();
        let frame = client::chat_frame(&last, "\"after the storm\"");
        wss[0].send(Message::text(frame)).await.map_err(|e| format!("send: {e}"))?;
        let receiver = &mut wss[1];
        let got = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(Ok(m)) = receiver.next().await {
                if let Message::Text(t) = m {
                    if t.contains("after the storm") {
                        return true;
                    }
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        if !got {
            eprintln!(
                "restart-storm: {n} users + {subs} synthetic: the message after the storm did not arrive within 60 s"
            );
        }
        let delivered = got.then(|| t0.elapsed());
        let mut recovered = None;
        let mut confirmed = 0;
        if let Some(s) = &synth {
            let limit = opts.scale_limit.saturating_sub(t0.elapsed());
            let pb = bar(subs as u64, "restart-storm: synthetic subscriber resubscribing");
            if s.wait(&before, limit, Some(&pb)).await {
                recovered = s.done_at().map(|d| d.saturating_duration_since(t0));
            }
            pb.finish_and_clear();
            confirmed = s.progress().confirmed;
        }
        let all_done = recovered.map_or(if subs > 0 { None } else { Some(ready) }, |r| Some(r.max(ready)));
        let row = RestartRow {
            users: n,
            ready_ms: r3(ready.as_secs_f64() * 1e3),
            delivered_ms: delivered.map(|d| r3(d.as_secs_f64() * 1e3)),
            resubscribed_per_sec: r3(n as f64 / ready.as_secs_f64()),
            synthetic_subscriptions: subs,
            synthetic_clients: if subs > 0 { opts.synth_clients } else { 0 },
            synthetic_recovered_ms: recovered.map(|r| r3(r.as_secs_f64() * 1e3)),
            synthetic_confirmed: confirmed,
            broker_resubscribed_per_sec: all_done.map(|d| r3((n + subs) as f64 / d.as_secs_f64().max(1e-6))),
            broker_rss_kib_after: env::rss_kib_sum(&setup.broker.pids()),
            load_average: std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        };
        println!(
            "restart-storm: {n} users on one instance + {subs} synthetic subscriptions: instance ready {:.0} ms after the \
             broker was back ({:.0} subscriptions/s), a message through {}; synthetic subscriber {} ({confirmed} of \
             {subs} confirmed); load {}",
            row.ready_ms,
            row.resubscribed_per_sec,
            row.delivered_ms.map_or("NEVER (60 s)".to_string(), |v| format!("{v:.0} ms")),
            match (subs, row.synthetic_recovered_ms) {
                (0, _) => "not used".to_string(),
                (_, Some(v)) => format!("recovered in {v:.0} ms"),
                (_, None) => "NOT recovered within the limit".to_string(),
            },
            row.load_average
        );
        drop(wss);
        for r in readers {
            r.abort();
        }
        if let Some(s) = synth {
            s.stop().await;
        }
        setup.stop();
        Ok(row)
    }
}
