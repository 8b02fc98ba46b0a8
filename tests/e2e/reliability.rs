//! Reliability (issue 4, made strict by issue 15): broker-link cuts, stalls and broker
//! restarts while traffic flows, instance restarts without orphans, bounded publishes toward a
//! dead broker, graceful shutdown under load, slow consumers, connection limits, lost
//! unsubscribes. Every test runs against a real Mosquitto.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::json;

use crate::peer::*;
use crate::proxy::{FaultProxy, FaultSetup, PAD, QUEUE_OF_16};
use crate::support::*;

/// Sends from `p` to each of `to` in turn, one round every `every`, until `stop` is set.
async fn traffic(p: &mut Peer, to: &[&str], prefix: &str, every: Duration, stop: &AtomicBool) {
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        for t in to {
            p.send_to(t, &format!("{prefix}{t}-{i:05}")).await;
        }
        i += 1;
        tokio::time::sleep(every).await;
    }
}

/// Waits until every message `p` sent was answered (ack or error), then asserts none was
/// refused: with the link cut or stalled, sends are queued and acked (docs/behaviour.md).
async fn all_acked(p: &Peer) {
    let n = p.sent.len();
    wait_until(&format!("{} answers for {}", n, p.name), Duration::from_secs(30), || {
        p.events("ack").len() + p.events("error").len() >= n
    })
    .await;
    let errors = p.events("error");
    assert!(errors.is_empty(), "{}: {} of {n} sends refused, e.g. {:?}", p.name, errors.len(), errors.first());
    assert_eq!(p.acks().len(), n, "{}: one ack per send", p.name);
}

/// The messages `from` sent with `prefix` arrived at `to` exactly once each and in the order
/// sent (client message ids are numbered in sending order).
fn all_once_in_order(from: &Peer, to: &Peer, prefix: &str) -> usize {
    let want: Vec<String> = from.sent.iter().map(|(c, _)| c.clone()).filter(|c| c.starts_with(prefix)).collect();
    let got: Vec<String> = to.received_cmids().into_iter().filter(|c| c.starts_with(prefix)).collect();
    assert_eq!(got.len(), want.len(), "{prefix}: {} sent, {} received by {}", want.len(), got.len(), to.name);
    assert!(got == want, "{prefix}: {} received the messages out of order or changed", to.name);
    want.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_link_cut_for_5s_loses_no_acked_message_and_duplicates_none() {
    let FaultSetup { proxy, a, mut alice, mut bob, m: _m, b: _b } = FaultSetup::start(unlimited, unlimited).await;
    let carol = Peer::connect(&a, "carol").await;

    let stop = AtomicBool::new(false);
    let every = Duration::from_millis(25);
    let (alice_close, carol_close) = (alice.close.clone(), carol.close.clone());
    let chaos = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cut_at = Instant::now();
        proxy.cut();
        let to_503 = a.wait_readyz(503, Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(readyz(&a).await, 503, "readyz during the cut");
        assert_eq!(*alice_close.lock(), None, "alice (on the cut instance) was disconnected");
        assert_eq!(*carol_close.lock(), None, "carol (on the cut instance) was disconnected");
        let heal_at = Instant::now();
        proxy.heal();
        let to_200 = a.wait_readyz(200, Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        (cut_at, heal_at, to_503, to_200)
    };
    let (_, _, (cut_at, heal_at, to_503, to_200)) = tokio::join!(
        traffic(&mut alice, &["bob", "carol"], "a-", every, &stop),
        traffic(&mut bob, &["carol"], "b-", every, &stop),
        chaos
    );

    // Every send was acked — the ones made during the cut too — and none refused.
    all_acked(&alice).await;
    all_acked(&bob).await;
    let during_cut = alice.sent.iter().filter(|(_, at)| (cut_at..heal_at).contains(at)).count();
    assert!(during_cut >= 100, "only {during_cut} messages were sent during the 5 s cut");
    // Each reached its recipient exactly once, in order.
    let expected_carol = alice.sent.iter().filter(|(c, _)| c.starts_with("a-carol")).count() + bob.sent.len();
    let expected_bob = alice.sent.iter().filter(|(c, _)| c.starts_with("a-bob")).count();
    wait_until("every acked message delivered", Duration::from_secs(20), || {
        carol.received_ids().len() >= expected_carol && bob.received_ids().len() >= expected_bob
    })
    .await;
    let n1 = all_once_in_order(&alice, &bob, "a-bob");
    let n2 = all_once_in_order(&alice, &carol, "a-carol");
    let n3 = all_once_in_order(&bob, &carol, "b-");
    for p in [&alice, &bob, &carol] {
        assert_no_duplicates(p);
        assert_eq!(p.closed(), None, "{} was disconnected", p.name);
    }
    assert!(to_200 <= Duration::from_secs(3), "readyz took {to_200:?} to return after the link came back");
    assert!(a.metric_or_zero("fanout_mqtt_reconnects_total").await >= 1.0);
    eprintln!(
        "link cut: {} sent and acked ({during_cut} during the cut), delivered once in order (a→bob {n1}, a→carol {n2}, b→carol {n3}), 0 errors; readyz 503 after {to_503:?}, 200 {to_200:?} after the heal",
        alice.sent.len() + bob.sent.len(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_broker_link_is_noticed_and_every_acked_message_arrives_once_in_order() {
    let FaultSetup { proxy, a, b, mut alice, bob, m: _m } = FaultSetup::start(unlimited, unlimited).await;
    let stop = AtomicBool::new(false);
    let chaos = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A black hole: the TCP connection stays open, nothing is forwarded either way.
        proxy.stall();
        // MQTT keep-alive (10 s): the ping that finds the last one unanswered ends the link.
        let noticed = a.wait_readyz(503, Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        proxy.heal();
        let back = a.wait_readyz(200, Duration::from_secs(15)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Relaxed);
        (noticed, back)
    };
    let (_, (noticed, back)) =
        tokio::join!(traffic(&mut alice, &["bob"], "s-", Duration::from_millis(50), &stop), chaos);
    all_acked(&alice).await;
    let n = alice.sent.len();
    wait_until("every acked message delivered", Duration::from_secs(20), || bob.received_ids().len() >= n).await;
    all_once_in_order(&alice, &bob, "s-");
    assert_eq!((alice.closed(), bob.closed()), (None, None), "a client was disconnected");
    assert!(
        noticed <= Duration::from_secs(25),
        "the stall was noticed only after {noticed:?} (keep-alive 10 s: 10-20 s)"
    );
    let dropped = b.metric_or_zero("fanout_dropped_total{reason=\"duplicate\"}").await;
    eprintln!(
        "stalled link: noticed after {noticed:?}, ready {back:?} after the heal; {n} sent, acked, delivered once in order ({dropped} re-sent copies dropped)"
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
    a.wait_readyz(503, Duration::from_secs(10)).await;
    m.restart();
    a.wait_readyz(200, Duration::from_secs(20)).await;
    b.wait_readyz(200, Duration::from_secs(20)).await;
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

/// `$SYS/broker/#` as the broker publishes it, read by one MQTT client for the whole test.
/// Mosquitto publishes a changed value at its next `$SYS` tick (every second here), and the
/// uptime at every tick, so a value read two ticks after an event reflects the event.
struct SysWatch {
    values: Arc<Mutex<HashMap<String, String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SysWatch {
    async fn start(m: &Mosquitto) -> SysWatch {
        use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
        let (client, mut el) = AsyncClient::new(MqttOptions::new(unique("sys-"), "127.0.0.1", m.port()), 10);
        client.subscribe("$SYS/broker/#", QoS::AtMostOnce).await.unwrap();
        let values = Arc::new(Mutex::new(HashMap::new()));
        let v = values.clone();
        let task = tokio::spawn(async move {
            let _client = client;
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        v.lock().insert(p.topic.clone(), String::from_utf8_lossy(&p.payload).into_owned());
                    }
                    Ok(_) => {}
                    Err(e) => panic!("$SYS watcher lost the broker: {e}"),
                }
            }
        });
        let w = SysWatch { values, task };
        wait_until("the first $SYS values", Duration::from_secs(5), || w.get("uptime").is_some()).await;
        w
    }

    fn get(&self, name: &str) -> Option<String> {
        self.values.lock().get(&format!("$SYS/broker/{name}")).cloned()
    }

    fn uptime(&self) -> u64 {
        let u = self.get("uptime").expect("$SYS/broker/uptime");
        u.trim_end_matches(" seconds").parse().unwrap_or_else(|_| panic!("uptime {u:?}"))
    }

    /// Returns once the broker has published `$SYS` twice after this call.
    async fn settle(&self) {
        let now = self.uptime();
        wait_until("two $SYS ticks", Duration::from_secs(5), || self.uptime() >= now + 2).await;
    }

    /// Subscriptions, connected clients, disconnected persistent sessions — as of the last
    /// tick; a value the broker never published fails the test.
    fn counts(&self) -> [u64; 3] {
        ["subscriptions/count", "clients/connected", "clients/disconnected"].map(|n| {
            let v = self.get(n).unwrap_or_else(|| panic!("the broker never published $SYS/broker/{n}"));
            v.parse().unwrap_or_else(|_| panic!("$SYS/broker/{n} = {v:?}"))
        })
    }
}

impl Drop for SysWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_an_instance_ten_times_leaves_no_sessions_or_subscriptions() {
    let m = Mosquitto::start();
    let sys = SysWatch::start(&m).await;
    sys.settle().await;
    // Only the watcher: its `$SYS/broker/#` subscription and itself.
    let baseline = sys.counts();
    assert_eq!(baseline, [1, 1, 0], "subscriptions, connected, disconnected sessions before any instance");
    let stable_id = unique("stable-");
    let mut stopped = Vec::new();
    let mut crashed = Vec::new();
    let mut after_crash = None;
    for i in 0..10 {
        // Alternate random ids and one stable id; every second stable one crashes.
        let stable = i % 2 == 1;
        let mut opts = InstanceOpts::broker(&m);
        if stable {
            opts.instance_id = Some(stable_id.clone());
        }
        let mut inst = Instance::start(opts).await;
        if stable && after_crash.take().is_some() {
            // Its start wiped the session its crashed predecessor left (with msg/user<i-2> in
            // it): only its own broadcast subscription exists now.
            sys.settle().await;
            let [subs, _, disconnected] = sys.counts();
            assert_eq!((subs, disconnected), (baseline[0] + 1, 0), "the crashed session's leftovers at restart {i}");
        }
        let user = format!("user{i}");
        let c = inst.connect(&user).await;
        if stable && i % 4 == 3 {
            drop(c);
            drop(inst); // SIGKILL: a crash; the next start with the same id wipes its session
            crashed.push((stable_id.clone(), user));
            after_crash = Some(i);
            continue;
        }
        let st = inst.terminate(Duration::from_secs(15)).await.expect("instance did not exit after SIGTERM");
        assert!(st.success(), "exit status after SIGTERM: {st:?}");
        stopped.push((inst.client_id(), user));
        drop(c);
    }
    sys.settle().await;
    let end = sys.counts();
    assert_eq!(end, baseline, "subscriptions, connected clients, disconnected sessions after 10 restarts");
    // Each stopped instance unsubscribed its user before it left; a crashed one could not.
    for (cid, user) in &stopped {
        assert_eq!(m.unsubscribe_count(cid, &format!("msg/{user}")), 1, "{cid} did not unsubscribe msg/{user}");
    }
    for (cid, user) in &crashed {
        assert_eq!(m.unsubscribe_count(cid, &format!("msg/{user}")), 0, "{cid} unsubscribed msg/{user}");
    }
    eprintln!(
        "after 10 restarts ({} stopped, {} crashed): subscriptions {}, connected {}, disconnected sessions {} — the baseline (the $SYS watcher)",
        stopped.len(),
        crashed.len(),
        end[0],
        end[1],
        end[2]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_toward_a_dead_broker_fails_with_unavailable_in_bounded_time() {
    let FaultSetup { proxy, a, mut alice, bob, m: _m, b: _b } =
        FaultSetup::start(|o| unlimited(o).args(QUEUE_OF_16), |o| o).await;
    proxy.cut();
    a.wait_readyz(503, Duration::from_secs(5)).await;
    let pad = "p".repeat(PAD);
    let t0 = Instant::now();
    for i in 0..24 {
        alice
            .send_json(json!({"event": "send_chat_message_to_participant",
                "data": {"participantId": "bob", "message": {"seq": i, "pad": pad}, "clientMessageId": format!("dead-{i:02}")}}))
            .await;
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
    alice
        .send_json(json!({"event": "send_chat_message_to_many_participants",
            "data": {"participantIds": many, "message": "to many", "clientMessageId": "many"}}))
        .await;
    wait_until("the group send is answered", Duration::from_secs(10), || alice.events("error").len() == 9).await;
    let group_wait = t1.elapsed();
    let group = &alice.events("error")[8];
    assert_eq!((&group["clientMessageId"], &group["code"]), (&json!("many"), &json!("unavailable")), "{group}");
    assert!(
        group_wait >= Duration::from_secs(1) && group_wait < Duration::from_millis(1_500),
        "a 50-recipient send was refused after {group_wait:?} (one --broker-timeout is 1 s)"
    );
    // The connection is still usable.
    alice.send_json(json!({"event": "ping"})).await;
    wait_until("pong", Duration::from_secs(5), || !alice.events("pong").is_empty()).await;
    // When the link returns, the acked messages go out, in order; the refused ones never do —
    // checked once a sentinel sent after the heal has arrived behind them.
    proxy.heal();
    a.wait_readyz(200, Duration::from_secs(10)).await;
    alice.send_to("bob", "sentinel").await;
    wait_until("the sentinel reaches bob", Duration::from_secs(10), || {
        bob.received_cmids().iter().any(|c| c == "sentinel")
    })
    .await;
    let mut want = acked.clone();
    want.push("sentinel".into());
    assert_eq!(bob.received_cmids(), want, "bob received exactly the acked messages, in order, then the sentinel");
    eprintln!(
        "dead broker: 16 acked, 8 refused in {answered_in:?}, a 50-recipient send refused in {group_wait:?}; after the heal bob got the 16 in order"
    );
}

/// Sends from `p` to `to` every `every` while `go(p)` holds and the socket takes frames.
async fn send_while(mut p: Peer, to: &str, prefix: &str, every: Duration, go: impl Fn(&Peer) -> bool) -> Peer {
    let mut i = 0;
    while go(&p) && p.send_to(to, &format!("{prefix}{i:05}")).await {
        i += 1;
        tokio::time::sleep(every).await;
    }
    p
}

/// One answer the shutting-down instance gave: when the request started, which, status.
type Probe = (Instant, &'static str, u16);

/// Asks `port` for `/readyz`, a WebSocket upgrade with a valid token and an API publish, over
/// and over until `stop`; requests that got no answer (the process is gone) are left out.
async fn probe(port: u16, token: String, api_key: &'static str, stop: Arc<AtomicBool>) -> Vec<Probe> {
    let auth = format!("Bearer {api_key}");
    let upgrade = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Protocol", token.as_str()),
    ];
    let publish = [("Authorization", auth.as_str())];
    let mut seen = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let at = Instant::now();
        let statuses = [
            ("readyz", get(port, "/readyz").await),
            ("upgrade", http(port, "GET", "/entrypoint", &upgrade, b"").await),
            ("publish", http(port, "POST", "/api/publish", &publish, br#"{"to":"probe","message":1}"#).await),
        ];
        for (what, r) in statuses {
            if let Ok(r) = r {
                seen.push((at, what, r.status));
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    seen
}

/// Probes `a` (see [`probe`]) from now on, sends it SIGTERM `lead` later and waits for its
/// exit: the exit status, when SIGTERM went, how long the exit took, and every answer.
async fn sigterm_while_probing(
    a: &mut Instance,
    key: &'static str,
    lead: Duration,
) -> (std::process::ExitStatus, Instant, Duration, Vec<Probe>) {
    let stop = Arc::new(AtomicBool::new(false));
    let prober = tokio::spawn(probe(a.port, a.token("late-comer"), key, stop.clone()));
    tokio::time::sleep(lead).await;
    let t0 = Instant::now();
    a.sigterm();
    let status = a.wait_exit(Duration::from_secs(15)).await.expect("no exit within 15 s of SIGTERM");
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    (status, t0, took, prober.await.unwrap())
}

/// Every answer to a request made from `since` on was a refusal (503) — at least `at_least`
/// of each kind; how many there were.
fn all_refused_since(probes: &[Probe], since: Instant, at_least: usize) -> usize {
    let after: Vec<&Probe> = probes.iter().filter(|(at, _, _)| *at >= since).collect();
    for what in ["readyz", "upgrade", "publish"] {
        let statuses: Vec<u16> = after.iter().filter(|p| p.1 == what).map(|p| p.2).collect();
        assert!(statuses.len() >= at_least, "only {} {what} answers during the shutdown", statuses.len());
        assert!(statuses.iter().all(|s| *s == 503), "{what} during shutdown answered {statuses:?}");
    }
    after.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_closes_with_1001_and_loses_no_acked_message() {
    const KEY: &str = "api-key-for-the-shutdown-test";
    let FaultSetup { m, proxy, mut a, b, alice, bob } =
        FaultSetup::start(|o| unlimited(o).args(["--api-key", KEY]), unlimited).await;
    let a_cid = a.client_id();
    // Both keep sending, each from its own task: alice until her connection is closed, bob (on
    // the other instance) until A has exited.
    let every = Duration::from_millis(10);
    let stop = Arc::new(AtomicBool::new(false));
    let a_gone = stop.clone();
    let alice_traffic = tokio::spawn(send_while(alice, "bob", "a-", every, |p| p.closed().is_none()));
    let bob_traffic = tokio::spawn(send_while(bob, "alice", "b-", every, move |_| !a_gone.load(Ordering::Relaxed)));
    tokio::time::sleep(Duration::from_millis(500)).await;

    // From now on the broker answers A a second late: at SIGTERM, PUBACKs for what alice sent
    // meanwhile are on their way, and shutdown waits for them (and for the broker's answers
    // while it ends the session) — long enough to watch it from outside.
    proxy.delay_answers(Duration::from_secs(1));
    let (status, t0, took, probes) = sigterm_while_probing(&mut a, KEY, Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let alice = alice_traffic.await.unwrap();
    let mut bob = bob_traffic.await.unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(12), "shutdown took {took:?} (bound: 5 s + 5 s + DISCONNECT waits)");
    assert_eq!(alice.closed(), Some(1001), "alice's close code when {a_cid} shut down");
    let sent_after = alice.sent.iter().filter(|(_, at)| *at >= t0).count();

    // Once alice had her 1001, every answer until the exit was a refusal: not ready, no new
    // WebSocket, no API publish.
    let closed_at = alice.closed_at().unwrap();
    let refusals = all_refused_since(&probes, closed_at, 1);
    // The broker saw A unsubscribe alice, then end its session: a clean connect and DISCONNECT.
    let log = m.log_lines();
    let unsub = log.iter().position(|l| *l == format!("{a_cid} msg/alice")).expect("no UNSUBSCRIBE msg/alice");
    let needle = format!(" as {a_cid} (");
    let last_connect = log.iter().rposition(|l| l.starts_with("New client connected") && l.contains(&needle)).unwrap();
    assert!(unsub < last_connect, "UNSUBSCRIBE msg/alice after the session-ending connect");
    assert!(log[last_connect].contains(" c1,"), "the last connect of {a_cid} is not clean: {}", log[last_connect]);
    assert!(
        log[last_connect..].iter().any(|l| *l == format!("Client {a_cid} disconnected.")),
        "{a_cid} did not DISCONNECT after its clean connect"
    );

    // Everything instance A acked before it went reached bob (on B), once.
    let acked_by_a = alice.acks().len();
    wait_until("acked messages delivered to bob", Duration::from_secs(10), || {
        bob.received_cmids().iter().filter(|c| c.starts_with("a-")).count() >= acked_by_a
    })
    .await;
    let n = assert_acked_delivered_once(&alice, &bob, "a-");
    assert_no_duplicates(&bob);
    // alice reconnects (as through the load balancer) to B and chats on.
    let mut alice2 = Peer::connect(&b, "alice").await;
    alice2.send_to("bob", "resumed").await;
    bob.send_json(
        json!({"event":"send_chat_message_to_participant","data":{"participantId":"alice","message":"welcome back"}}),
    )
    .await;
    wait_until("chat resumes both ways", Duration::from_secs(10), || {
        bob.received_cmids().iter().any(|c| c == "resumed")
            && alice2.events("chat_message").iter().any(|d| d["message"] == json!("welcome back"))
    })
    .await;
    eprintln!(
        "sigterm under load: alice sent {} ({sent_after} after SIGTERM), {n} acked and all delivered once; exit 0 after {took:?}; {refusals} refusals (503) watched after the 1001",
        alice.sent.len(),
    );
}

/// Resident memory of a process in KiB (VmRSS).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_with_4008_and_memory_stays_bounded() {
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    const SEND_QUEUE: f64 = 65536.0;
    let m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m).arg("--send-queue").arg(SEND_QUEUE.to_string())).await;
    // The slow client never reads; bob reads everything.
    let mut slow = inst.connect("slow").await;
    let bob = Peer::connect(&inst, "bob").await;
    let rss_before = rss_kib(inst.pid());

    let mut opts = MqttOptions::new(unique("flood-"), "127.0.0.1", m.port());
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(opts, 1024);
    let poller = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let payload = format!(r#"{{"event":"chat_message","data":{{"from":"flood","message":"{}"}}}}"#, "x".repeat(150));
    const TOTAL: usize = 100_000;
    // Below Mosquitto's max_queued_messages (1,000 by default) plus its 20 in flight: however
    // slow the instance is (a busy CI machine), the broker never has to drop part of a batch.
    const BATCH: usize = 500;
    let (mut to_bob, mut peak_rss, mut fullest) = (0, rss_before, 0.0f64);
    for _ in 0..TOTAL / BATCH {
        for i in 0..BATCH {
            // One in 100 to bob, the last of each batch among them.
            let to = if i % 100 == 99 { "bob" } else { "slow" };
            if to == "bob" {
                to_bob += 1;
            }
            client.publish(format!("msg/{to}"), QoS::AtLeastOnce, false, payload.clone()).await.unwrap();
        }
        // The instance has taken the whole batch once bob has its last message (one session,
        // delivered in order). Paced by bob, not by the instance's message count: once the
        // slow client is closed with 4008 its topic is unsubscribed, and how soon that happens
        // depends on how fast this machine floods. Meanwhile, sample memory and the fullest outbox.
        wait_until("bob receives the last message of the batch", Duration::from_secs(30), || {
            bob.events("chat_message").len() == to_bob
        })
        .await;
        peak_rss = peak_rss.max(rss_kib(inst.pid()));
        fullest = fullest.max(inst.metric_or_zero("fanout_outbox_max_queued_bytes").await);
    }
    let _ = client.disconnect().await;
    poller.abort();
    let taken = inst.metric_or_zero("fanout_messages_in_total{source=\"mqtt\"}").await as usize;
    assert_eq!(inst.wait_metric("fanout_slow_consumers_total", |v| v == 1.0, Duration::from_secs(15)).await, 1.0);
    // No outbox ever held more than --send-queue (plus the one ~200-byte frame a check may
    // race with); the flood to the slow client was ~20 MB.
    assert!(fullest > 0.0 && fullest <= SEND_QUEUE + 256.0, "the fullest outbox held {fullest} bytes");
    let growth = peak_rss.saturating_sub(rss_before);
    assert!(growth < 6 * 1024, "RSS grew {growth} KiB at its peak while flooding a slow consumer");
    // bob, on the same instance, got every message meant for him meanwhile (checked after each
    // batch), and only those.
    assert_eq!(bob.events("chat_message").len(), to_bob);
    assert_eq!(bob.closed(), None);
    // The slow client, once it reads again, finds the 4008 close after what was buffered.
    assert_eq!(slow.recv_close(Duration::from_secs(30)).await, Some(4008), "slow consumer close code");
    eprintln!(
        "slow consumer: {TOTAL} messages ({taken} reached the instance before the slow client's topic was dropped), RSS {rss_before} KiB → peak {peak_rss} KiB (+{growth} KiB), fullest outbox {fullest} bytes, bob got {to_bob}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_refuse_before_upgrade_and_free_slots_on_close() {
    let m = Mosquitto::start();
    let inst = Instance::start(
        InstanceOpts::broker(&m).arg("--max-connections").arg("3").arg("--max-connections-per-user").arg("2"),
    )
    .await;
    let refused = |user: &str| {
        let token = inst.token(user);
        async move { upgrade_attempt(inst.port, "/entrypoint", &[("Sec-WebSocket-Protocol", &token)]).await }
    };
    let a1 = inst.connect("alice").await;
    let _a2 = inst.connect("alice").await;
    let r = refused("alice").await;
    assert_eq!((r.status, r.json()["error"].clone()), (429, json!("too_many_connections")), "{r:?}");
    let b = inst.connect("bob").await;
    let r = refused("carol").await;
    assert_eq!((r.status, r.json()["error"].clone()), (503, json!("unavailable")), "{r:?}");
    // Closing frees alice's own slot (and one of the instance's): she connects again.
    a1.close().await;
    let again = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match Client::connect(&inst, Auth::Subprotocol(&inst.token("alice"))).await {
                Ok(c) => return c.connected().await,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("alice's slot was not freed when her connection closed");
    assert_eq!(again.connected["userId"], json!("alice"));
    // The instance is full again; bob leaving makes room for carol.
    assert_eq!(refused("carol").await.status, 503);
    b.close().await;
    inst.wait_metric("fanout_connections", |v| v == 2.0, Duration::from_secs(5)).await;
    let _c = inst.connect("carol").await;
}

/// alice and bob on one instance that reaches its broker through a fault proxy.
async fn alice_and_bob_behind_a_proxy() -> (Mosquitto, FaultProxy, Instance, Client, Client) {
    let m = Mosquitto::start();
    let proxy = FaultProxy::start(m.port()).await;
    let a = Instance::start(InstanceOpts::url(&proxy.url())).await;
    let (alice, bob) = (a.connect("alice").await, a.connect("bob").await);
    (m, proxy, a, alice, bob)
}

/// The broker's log shows `cid` unsubscribing msg/bob (once) within 5 s; else fails with `why`.
async fn assert_unsubscribes_bob(m: &Mosquitto, cid: &str, why: &str) {
    assert!(m.wait_for_log(|m| m.unsubscribe_count(cid, "msg/bob") == 1, Duration::from_secs(5)).await, "{why}");
}

/// Publishes a message for bob, then a sentinel for alice, and waits for the sentinel (so the
/// one for bob was handled before it): A's counts of messages from the broker and of those
/// dropped for want of a local user.
async fn after_a_message_for_bob(m: &Mosquitto, a: &Instance, alice: &mut Client) -> (f64, f64) {
    m.publish_text("msg/bob", "for nobody");
    m.publish_text("msg/alice", "sentinel");
    assert_eq!(alice.recv_text().await, "sentinel");
    let came = a.metric_or_zero("fanout_messages_in_total{source=\"mqtt\"}").await;
    (came, a.metric_or_zero("fanout_dropped_total{reason=\"no_local_user\"}").await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribes_lost_with_the_link_are_sent_again_after_the_reconnect() {
    let (m, proxy, a, mut alice, bob) = alice_and_bob_behind_a_proxy().await;
    let cid = a.client_id();
    proxy.cut();
    a.wait_readyz(503, Duration::from_secs(5)).await;
    // bob leaves while the link is down: his UNSUBSCRIBE cannot go out now.
    bob.close().await;
    a.wait_metric("fanout_users", |v| v == 1.0, Duration::from_secs(5)).await;
    proxy.heal();
    a.wait_readyz(200, Duration::from_secs(10)).await;
    // The broker kept the persistent session (and msg/bob in it): the UNSUBSCRIBE is sent with
    // the reconnect, before any message for bob could arrive.
    assert_unsubscribes_bob(&m, &cid, "no UNSUBSCRIBE msg/bob after the reconnect").await;
    let (came, dropped) = after_a_message_for_bob(&m, &a, &mut alice).await;
    assert_eq!((came, dropped), (1.0, 0.0), "only the sentinel came to A");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_unsubscribe_heals_itself_when_a_message_comes_for_the_gone_user() {
    let (m, proxy, a, mut alice, bob) = alice_and_bob_behind_a_proxy().await;
    let cid = a.client_id();
    // The UNSUBSCRIBE is written into a stalled link, then the link is cut: it never reaches
    // the broker, and the instance believes it was sent.
    proxy.stall();
    bob.close().await;
    a.wait_metric("fanout_users", |v| v == 1.0, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.cut();
    a.wait_readyz(503, Duration::from_secs(5)).await;
    proxy.heal();
    a.wait_readyz(200, Duration::from_secs(10)).await;
    assert_eq!(m.unsubscribe_count(&cid, "msg/bob"), 0, "the UNSUBSCRIBE was not lost; the test proves nothing");
    // A message for bob still comes to A, which holds nobody for it: A unsubscribes again.
    m.publish_text("msg/bob", "for nobody");
    assert_unsubscribes_bob(&m, &cid, "A did not unsubscribe msg/bob when a message came for it").await;
    let (came, dropped) = after_a_message_for_bob(&m, &a, &mut alice).await;
    assert_eq!((came, dropped), (2.0, 1.0), "the first message for bob and the sentinel came to A");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_new_work_all_along_while_a_stuck_socket_holds_it_up() {
    const KEY: &str = "api-key-for-the-stuck-shutdown-test";
    let m = Mosquitto::start();
    let mut a = Instance::start(InstanceOpts::broker(&m).args(["--api-key", KEY, "--send-queue", "67108864"])).await;
    let alice = Peer::connect(&a, "alice").await;
    // A client that stopped reading, with megabytes waiting for it: its session is stuck in a
    // socket write (deadline 10 s) and holds the shutdown for its 5 s grace.
    let _stuck = raw_websocket(&a, "stuck").await;
    a.wait_metric("fanout_users", |v| v == 2.0, Duration::from_secs(5)).await;
    let big = "x".repeat(1 << 20);
    for _ in 0..12 {
        m.publish_text("msg/stuck", &big);
    }
    let queued = a.wait_metric("fanout_outbox_max_queued_bytes", |v| v > 0.0, Duration::from_secs(10)).await;
    assert!(queued > 0.0, "the socket never filled up");

    let (status, t0, took, probes) = sigterm_while_probing(&mut a, KEY, Duration::ZERO).await;
    assert!(status.success(), "exit status {status:?}");
    // alice was closed at once; the stuck session held the instance for the 5 s grace.
    wait_until("alice's close", Duration::from_secs(1), || alice.closed().is_some()).await;
    assert_eq!(alice.closed(), Some(1001));
    let closed_after = alice.closed_at().unwrap() - t0;
    assert!(closed_after < Duration::from_secs(1), "alice was closed {closed_after:?} after SIGTERM");
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(12),
        "exit {took:?} after SIGTERM (5 s grace for sockets, then the broker session)"
    );
    // All along — while the broker link was still up and nothing had been handed over to it
    // yet — the instance refused: not ready, no new WebSocket, no API publish.
    let refusals = all_refused_since(&probes, alice.closed_at().unwrap(), 10);
    eprintln!(
        "stuck shutdown: exit 0 after {took:?}, alice closed after {closed_after:?}, {refusals} refusals watched"
    );
}
