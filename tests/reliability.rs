//! Reliability (issue 4): broker-link cuts and broker restarts while traffic flows, instance
//! restarts without orphans, bounded publishes toward a dead broker, graceful shutdown under
//! load, slow consumers, connection limits. Every test runs against a real Mosquitto.

mod common;

use std::time::{Duration, Instant};

use common::peer::*;
use common::proxy::FaultProxy;
use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Sends `n` messages from `p` to each of `to`, one round every `every`, while `stop` is unset.
async fn traffic(
    p: &mut Peer,
    to: &[&str],
    prefix: &str,
    every: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> usize {
    let mut i = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for t in to {
            p.send_to(t, &format!("{prefix}{t}-{i}")).await;
        }
        i += 1;
        tokio::time::sleep(every).await;
    }
    i * to.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_link_cut_for_5s_loses_no_acked_message_and_duplicates_none() {
    let m = Mosquitto::start();
    let proxy = FaultProxy::start(m.port()).await;
    let a = Instance::start(unlimited(InstanceOpts { mqtt_url: Some(proxy.url()), ..Default::default() })).await;
    let b = Instance::start(unlimited(InstanceOpts::broker(&m))).await;
    let mut alice = Peer::connect(&a, "alice").await;
    let carol = Peer::connect(&a, "carol").await;
    let mut bob = Peer::connect(&b, "bob").await;

    let stop = std::sync::atomic::AtomicBool::new(false);
    let every = Duration::from_millis(25);
    let (alice_close, carol_close) = (alice.close.clone(), carol.close.clone());
    let chaos = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        proxy.cut();
        let to_503 = wait_readyz(&a, 503, Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(readyz(&a).await, 503, "readyz during the cut");
        assert_eq!(*alice_close.lock(), None, "alice (on the cut instance) was disconnected");
        assert_eq!(*carol_close.lock(), None, "carol (on the cut instance) was disconnected");
        proxy.heal();
        let to_200 = wait_readyz(&a, 200, Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (to_503, to_200)
    };
    let (sent_a, sent_b, (to_503, to_200)) = tokio::join!(
        traffic(&mut alice, &["bob", "carol"], "a-", every, &stop),
        traffic(&mut bob, &["carol"], "b-", every, &stop),
        chaos
    );

    // Wait for every ack (or error) and then for every acked message.
    wait_until("every message answered", Duration::from_secs(20), || {
        alice.events("ack").len() + alice.events("error").len() == sent_a
            && bob.events("ack").len() + bob.events("error").len() == sent_b
    })
    .await;
    let expected_carol = alice.acks().keys().filter(|c| c.starts_with("a-carol")).count() + bob.acks().len();
    let expected_bob = alice.acks().keys().filter(|c| c.starts_with("a-bob")).count();
    wait_until("every acked message delivered", Duration::from_secs(20), || {
        carol.received_ids().len() >= expected_carol && bob.received_ids().len() >= expected_bob
    })
    .await;
    let n1 = assert_acked_delivered_once(&alice, &bob, "a-bob");
    let n2 = assert_acked_delivered_once(&alice, &carol, "a-carol");
    let n3 = assert_acked_delivered_once(&bob, &carol, "b-");
    for p in [&alice, &bob, &carol] {
        assert_no_duplicates(p);
        assert_eq!(p.closed(), None, "{} was disconnected", p.name);
    }
    let errors: Vec<Value> = alice.events("error").into_iter().chain(bob.events("error")).collect();
    let unexpected: Vec<&Value> = errors.iter().filter(|e| e["code"] != json!("unavailable")).take(3).collect();
    assert!(unexpected.is_empty(), "unexpected errors (first 3): {unexpected:?}");
    assert!(to_200 <= Duration::from_secs(3), "readyz took {to_200:?} to return after the link came back");
    assert!(a.metric_or_zero("fanout_mqtt_reconnects_total").await >= 1.0);
    eprintln!(
        "link cut: sent {} / acked {} (a→bob {n1}, a→carol {n2}, b→carol {n3}), errors {}, readyz 503 after {to_503:?}, 200 after {to_200:?}",
        sent_a + sent_b,
        n1 + n2 + n3,
        errors.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_restart_restores_every_connected_users_subscription() {
    let mut m = Mosquitto::start();
    let a = Instance::start(InstanceOpts::broker(&m)).await;
    let b = Instance::start(InstanceOpts::broker(&m)).await;
    let users = [("u1", &a), ("u2", &a), ("u3", &b), ("u4", &b)];
    let mut peers = Vec::new();
    for (u, inst) in users {
        peers.push(Peer::connect(inst, u).await);
    }
    m.stop();
    wait_readyz(&a, 503, Duration::from_secs(10)).await;
    m.restart();
    wait_readyz(&a, 200, Duration::from_secs(20)).await;
    wait_readyz(&b, 200, Duration::from_secs(20)).await;
    // Injected messages reach every still-connected user: their topics were subscribed again.
    for (u, _) in users {
        m.publish_text(&format!("msg/{u}"), &format!(r#"{{"event":"chat_message","data":{{"to":"{u}"}}}}"#));
    }
    for p in &peers {
        wait_until(&format!("{} receives the injected message", p.name), Duration::from_secs(10), || {
            p.events("chat_message").len() == 1
        })
        .await;
        assert_eq!(p.closed(), None);
    }
    // And users chat across instances after the restart.
    let mut p1 = peers.remove(0);
    p1.send_to("u4", "after-restart").await;
    wait_until("u4 receives u1's message", Duration::from_secs(10), || peers[2].events("chat_message").len() == 2)
        .await;
    assert_acked_delivered_once(&p1, &peers[2], "after-restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_an_instance_ten_times_leaves_no_sessions_or_subscriptions() {
    let m = Mosquitto::start();
    let baseline_subs = m.sys_value("broker/subscriptions/count").unwrap_or(0.0);
    let stable_id = unique("stable-");
    for i in 0..10 {
        // Alternate random ids (default) and one stable id; half the stable restarts crash.
        let stable = i % 2 == 1;
        let mut opts = InstanceOpts::broker(&m);
        if stable {
            opts.instance_id = Some(stable_id.clone());
        }
        let mut inst = Instance::start(opts).await;
        let c = inst.connect(&format!("user{i}")).await;
        if stable && i % 4 == 3 {
            drop(c);
            drop(inst); // SIGKILL: a crash; the next start with the same id wipes the session
            continue;
        }
        let st = inst.terminate(Duration::from_secs(15)).expect("instance did not exit after SIGTERM");
        assert!(st.success(), "exit status after SIGTERM: {st:?}");
        drop(c);
    }
    // Start the stable id once more to take over whatever the last crash left.
    let last = Instance::start(InstanceOpts { instance_id: Some(stable_id), ..InstanceOpts::broker(&m) }).await;
    let client_id = last.client_id();
    drop(last);
    let _ = client_id;
    // Persistent sessions of stopped instances (clients/disconnected) and subscriptions must
    // come back to the baseline.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let subs = m.sys_value("broker/subscriptions/count").unwrap_or(-1.0);
        let disconnected = m.sys_value("broker/clients/disconnected").unwrap_or(0.0);
        let connected = m.sys_value("broker/clients/connected").unwrap_or(-1.0);
        // The killed last instance leaves one crashed session; every other one is gone.
        if subs <= baseline_subs + 2.0 && disconnected <= 1.0 && connected <= 1.0 {
            eprintln!("after 10 restarts: subscriptions {subs} (baseline {baseline_subs}), disconnected sessions {disconnected}, connected {connected}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "orphans after 10 restarts: subscriptions {subs} (baseline {baseline_subs}), disconnected sessions {disconnected}, connected clients {connected}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Padding that makes every message of the dead-broker test cost 4,200-4,300 queue bytes
/// (topic + envelope + 64 bytes of bookkeeping), so a 68,800-byte queue holds exactly 16.
const PAD: usize = 4_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_toward_a_dead_broker_fails_with_unavailable_in_bounded_time() {
    let m = Mosquitto::start();
    let proxy = FaultProxy::start(m.port()).await;
    let a = Instance::start(unlimited(InstanceOpts { mqtt_url: Some(proxy.url()), ..Default::default() }).args([
        "--publish-queue-bytes",
        "68800",
        "--max-message-bytes",
        "8192",
        "--broker-timeout",
        "1s",
    ]))
    .await;
    let b = Instance::start(InstanceOpts::broker(&m)).await;
    let mut alice = Peer::connect(&a, "alice").await;
    let bob = Peer::connect(&b, "bob").await;
    proxy.cut();
    wait_readyz(&a, 503, Duration::from_secs(5)).await;
    let pad = "p".repeat(PAD);
    let t0 = Instant::now();
    for i in 0..24 {
        let f = json!({"event": "send_chat_message_to_participant",
            "data": {"participantId": "bob", "message": {"seq": i, "pad": pad}, "clientMessageId": format!("dead-{i:02}")}});
        alice.sink.send(Message::text(f.to_string())).await.unwrap();
    }
    wait_until("every message answered", Duration::from_secs(30), || {
        alice.events("ack").len() + alice.events("error").len() == 24
    })
    .await;
    let answered_in = t0.elapsed();
    // Exactly the first 16 fit the queue and are acked; each later one waits its full
    // --broker-timeout (1 s) for room, one after the other, and is refused.
    let mut acked: Vec<String> = alice.acks().into_keys().collect();
    acked.sort();
    assert_eq!(acked, (0..16).map(|i| format!("dead-{i:02}")).collect::<Vec<_>>());
    let errors = alice.events("error");
    let refused: Vec<&str> = errors.iter().map(|e| e["clientMessageId"].as_str().unwrap()).collect();
    assert_eq!(refused, (16..24).map(|i| format!("dead-{i:02}")).collect::<Vec<_>>());
    assert!(errors.iter().all(|e| e["code"] == json!("unavailable")), "{errors:?}");
    assert!(
        answered_in >= Duration::from_secs(8) && answered_in < Duration::from_millis(9_500),
        "8 refusals of 1 s each took {answered_in:?}"
    );
    // A message to 50 recipients waits once, as a whole, and is refused as a whole.
    let t1 = Instant::now();
    let many: Vec<String> = (0..50).map(|i| format!("r{i}")).collect();
    let f = json!({"event": "send_chat_message_to_many_participants",
        "data": {"participantIds": many, "message": "to many", "clientMessageId": "many"}});
    alice.sink.send(Message::text(f.to_string())).await.unwrap();
    wait_until("the group send is answered", Duration::from_secs(10), || alice.events("error").len() == 9).await;
    let group_wait = t1.elapsed();
    assert!(group_wait < Duration::from_millis(1_500), "a 50-recipient send blocked its session {group_wait:?}");
    // The connection is still usable.
    alice.sink.send(Message::text(r#"{"event":"ping"}"#)).await.unwrap();
    wait_until("pong", Duration::from_secs(5), || !alice.events("pong").is_empty()).await;
    // When the link returns, the acked messages go out, in order; the refused ones never do —
    // checked once a sentinel sent after the heal has arrived behind them.
    proxy.heal();
    wait_readyz(&a, 200, Duration::from_secs(10)).await;
    alice.send_to("bob", "sentinel").await;
    wait_until("the sentinel reaches bob", Duration::from_secs(10), || {
        bob.events("chat_message").iter().any(|d| d["clientMessageId"] == json!("sentinel"))
    })
    .await;
    let got: Vec<String> =
        bob.events("chat_message").iter().map(|d| d["clientMessageId"].as_str().unwrap().to_string()).collect();
    let mut want = acked.clone();
    want.push("sentinel".into());
    assert_eq!(got, want, "bob received exactly the acked messages, in order, then the sentinel");
    eprintln!(
        "dead broker: 16 acked, 8 refused in {answered_in:?}, a 50-recipient send refused in {group_wait:?}; after the heal bob got the 16 in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_closes_with_1001_and_loses_no_acked_message() {
    let m = Mosquitto::start();
    let mut a = Instance::start(unlimited(InstanceOpts::broker(&m))).await;
    let b = Instance::start(unlimited(InstanceOpts::broker(&m))).await;
    let mut alice = Peer::connect(&a, "alice").await;
    let mut bob = Peer::connect(&b, "bob").await;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let every = Duration::from_millis(10);
    let a_id = a.id.clone();
    let kill = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t0 = Instant::now();
        let st = tokio::task::block_in_place(|| a.terminate(Duration::from_secs(15))).expect("no exit after SIGTERM");
        let took = t0.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (st, took)
    };
    let (_, _, (status, took)) = tokio::join!(
        traffic(&mut alice, &["bob"], "a-", every, &stop),
        traffic(&mut bob, &["alice"], "b-", every, &stop),
        kill
    );
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
    wait_until("alice closed", Duration::from_secs(5), || alice.closed().is_some()).await;
    assert_eq!(alice.closed(), Some(1001), "alice's close code when {a_id} shut down");
    // Everything instance A acked before it went reached bob (on B).
    let acked_by_a = alice.acks().len();
    wait_until("acked messages delivered to bob", Duration::from_secs(10), || bob.received_ids().len() >= acked_by_a)
        .await;
    let n = assert_acked_delivered_once(&alice, &bob, "a-");
    assert_no_duplicates(&bob);
    // alice reconnects (as through the load balancer) to B and chats on.
    let mut alice2 = Peer::connect(&b, "alice").await;
    alice2.send_to("bob", "resumed").await;
    bob.sink.send(Message::text(json!({"event":"send_chat_message_to_participant","data":{"participantId":"alice","message":"welcome back"}}).to_string())).await.unwrap();
    wait_until("chat resumes both ways", Duration::from_secs(10), || {
        bob.events("chat_message").iter().any(|d| d["clientMessageId"] == json!("resumed"))
            && alice2.events("chat_message").iter().any(|d| d["message"] == json!("welcome back"))
    })
    .await;
    eprintln!("sigterm under load: {n} acked messages all delivered; exit 0 after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_with_4008_and_memory_stays_bounded() {
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    let m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m).arg("--send-queue").arg("65536")).await;
    // The slow client never reads; bob reads everything.
    let mut slow = inst.connect("slow").await;
    let bob = Peer::connect(&inst, "bob").await;
    let rss_before = inst.rss_kib();

    let mut opts = MqttOptions::new(unique("flood-"), "127.0.0.1", m.port());
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(opts, 1024);
    let poller = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let payload = format!(r#"{{"event":"chat_message","data":{{"from":"flood","message":"{}"}}}}"#, "x".repeat(150));
    const TOTAL: usize = 100_000;
    const BATCH: usize = 2_000;
    let mut to_bob = 0;
    for batch in 0..TOTAL / BATCH {
        for i in 0..BATCH {
            let to = if i % 100 == 0 { "bob" } else { "slow" };
            if to == "bob" {
                to_bob += 1;
            }
            client.publish(format!("msg/{to}"), QoS::AtLeastOnce, false, payload.clone()).await.unwrap();
        }
        // Let the instance keep up (the broker drops QoS 1 messages beyond max_queued_messages).
        let want = ((batch + 1) * BATCH) as f64;
        inst.wait_metric("fanout_messages_in_total{source=\"mqtt\"}", |v| v >= want, Duration::from_secs(30)).await;
    }
    let _ = client.disconnect().await;
    poller.abort();
    assert_eq!(inst.metric_or_zero("fanout_messages_in_total{source=\"mqtt\"}").await as usize, TOTAL);
    assert_eq!(inst.wait_metric("fanout_slow_consumers_total", |v| v == 1.0, Duration::from_secs(15)).await, 1.0);
    let rss_after = inst.rss_kib();
    // bob, on the same instance, got every message meant for him meanwhile.
    wait_until("bob receives all his messages", Duration::from_secs(15), || bob.events("chat_message").len() == to_bob)
        .await;
    assert_eq!(bob.closed(), None);
    // The slow client, once it reads again, finds the 4008 close after what was buffered.
    assert_eq!(slow.recv_close(Duration::from_secs(30)).await, Some(4008), "slow consumer close code");
    let growth = rss_after.saturating_sub(rss_before);
    assert!(growth < 40 * 1024, "RSS grew {growth} KiB while flooding a slow consumer");
    eprintln!(
        "slow consumer: {TOTAL} messages, RSS {rss_before} KiB → {rss_after} KiB (+{growth} KiB), bob got {to_bob}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_refuse_before_upgrade() {
    let m = Mosquitto::start();
    let inst = Instance::start(
        InstanceOpts::broker(&m).arg("--max-connections").arg("3").arg("--max-connections-per-user").arg("2"),
    )
    .await;
    let a1 = inst.connect("alice").await;
    let _a2 = inst.connect("alice").await;
    let r = upgrade_attempt(inst.port, "/entrypoint", &[("Sec-WebSocket-Protocol", &inst.token("alice"))]).await;
    assert_eq!(r.status, 429, "third connection of one user: {}", r.body);
    assert!(r.body.contains("too_many_connections"), "{}", r.body);
    let _b = inst.connect("bob").await;
    let r = upgrade_attempt(inst.port, "/entrypoint", &[("Sec-WebSocket-Protocol", &inst.token("carol"))]).await;
    assert_eq!(r.status, 503, "connection beyond the instance limit: {}", r.body);
    a1.close().await;
    inst.wait_metric("fanout_connections", |v| v == 2.0, Duration::from_secs(5)).await;
    let _c = inst.connect("carol").await;
}
