//! `restart-storm`: one instance holding N users; the broker is killed and started again
//! without persistence (every session and subscription is gone), and the instance must
//! subscribe all N again. Measured per N: time from the broker listening again to `/readyz`
//! 200, and to a message sent then reaching its recipient.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::{connect_all, user_names, Setup};
use crate::client;
use crate::env::{self, Res};
use crate::report::{r3, RestartRow, RestartStorm};
use crate::Opts;

pub async fn restart_storm(opts: &Opts, sizes: &[usize]) -> Res<RestartStorm> {
    let mut rows = Vec::new();
    for &n in sizes {
        let n = n.max(2);
        let mut setup = Setup::start(opts, &format!("restart-n{n}"), 1).await?;
        let port = setup.instances[0].port;
        let users = user_names("s", n);
        let srcs = env::source_addrs(opts.sources);
        let (mut wss, _) = connect_all(opts, &users, &[port], &srcs, &format!("restart-storm: {n} users")).await?;
        setup.broker.restart(&opts.mosquitto)?;
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
        let receiver = &mut wss[n - 1];
        let got = tokio::time::timeout(Duration::from_secs(30), async {
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
            return Err(format!("restart-storm: {n} users: the message after the storm never arrived"));
        }
        let delivered = t0.elapsed();
        let row = RestartRow {
            users: n,
            ready_ms: r3(ready.as_secs_f64() * 1e3),
            delivered_ms: r3(delivered.as_secs_f64() * 1e3),
            resubscribed_per_sec: r3(n as f64 / ready.as_secs_f64()),
        };
        println!(
            "restart-storm: {n} users on one instance: ready {:.0} ms after the broker was back ({:.0} subscriptions/s), a message through {:.0} ms after",
            row.ready_ms, row.resubscribed_per_sec, row.delivered_ms
        );
        rows.push(row);
        drop(wss);
    }
    Ok(RestartStorm { rows })
}
