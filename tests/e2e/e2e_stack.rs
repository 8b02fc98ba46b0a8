//! End to end through the native stack (scripts/stack.sh: a real nginx from nginx/nginx.conf,
//! Mosquitto from mosquitto/mosquitto.conf, 5 instances): 50 users with 1–3 connections each,
//! every user sends to random others. Every message reaches every connection of its recipient
//! exactly once, and the instances together receive from the broker exactly one copy per
//! (message, instance holding the recipient): no instance gets traffic for users it does not
//! hold.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use crate::stack::Stack;
use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const INSTANCES: usize = 5;
const USERS: usize = 50;
const MESSAGES_PER_USER: usize = 4;
const MQTT_IN: &str = "fanout_messages_in_total{source=\"mqtt\"}";

struct Conn {
    user: usize,
    instance: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_users_through_nginx_each_message_once_per_connection_and_per_holding_instance() {
    let started = std::time::Instant::now();
    let stack = Stack::up(INSTANCES);
    let seed: u64 = std::env::var("E2E_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(now_millis);
    eprintln!("e2e seed {seed} (set E2E_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let user_name = |u: usize| format!("user{u:02}");

    // Connect everyone through nginx: 1–3 sockets per user.
    let mut conns: Vec<Conn> = Vec::new();
    let mut sinks = Vec::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Value)>();
    let mut user_conns: Vec<Vec<usize>> = vec![Vec::new(); USERS];
    for (u, mine) in user_conns.iter_mut().enumerate() {
        let k = rng.random_range(1..=3);
        for _ in 0..k {
            // Every place a token can travel in, through nginx.
            let t = token(SECRET, &user_name(u), 3600, None);
            let places = [Auth::Subprotocol(&t), Auth::BearerSubprotocol(&t), Auth::Query(&t), Auth::Header(&t)];
            let c = stack.connect_with(places[conns.len() % 4]).await;
            assert_eq!(c.connected["userId"], json!(user_name(u)));
            let idx = conns.len();
            conns.push(Conn { user: u, instance: c.connected["instanceId"].as_str().unwrap().to_string() });
            mine.push(idx);
            let (sink, mut stream) = c.ws.split();
            sinks.push(sink);
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(Ok(m)) = stream.next().await {
                    if let Message::Text(t) = m {
                        let v: Value = serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}"));
                        if tx.send((idx, v)).is_err() {
                            break;
                        }
                    }
                }
            });
        }
    }
    drop(tx);
    let mut per_instance: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &conns {
        *per_instance.entry(c.instance.as_str()).or_default() += 1;
    }
    eprintln!("{} connections of {USERS} users; per instance: {per_instance:?}", conns.len());
    assert_eq!(
        per_instance.len(),
        INSTANCES,
        "nginx must spread sockets over all {INSTANCES} instances: {per_instance:?}"
    );
    let users_on_several = (0..USERS)
        .filter(|&u| user_conns[u].iter().map(|&i| &conns[i].instance).collect::<BTreeSet<_>>().len() > 1)
        .count();
    eprintln!("{users_on_several} users have sockets on more than one instance");

    // Every user sends MESSAGES_PER_USER messages to random other users, from a random socket.
    let mut expected: HashMap<String, usize> = HashMap::new(); // clientMessageId -> recipient user
    let mut sender_conn: HashMap<String, usize> = HashMap::new();
    for u in 0..USERS {
        for i in 0..MESSAGES_PER_USER {
            let mut to = rng.random_range(0..USERS - 1);
            if to >= u {
                to += 1;
            }
            let cmid = format!("{}-{i}", user_name(u));
            let from_conn = user_conns[u][rng.random_range(0..user_conns[u].len())];
            let frame = json!({"event": "send_chat_message_to_participant",
                "data": {"participantId": user_name(to), "message": {"n": i, "text": format!("{cmid} to {}", user_name(to))}, "clientMessageId": cmid}});
            sinks[from_conn].send(Message::text(frame.to_string())).await.expect("send");
            expected.insert(cmid.clone(), to);
            sender_conn.insert(cmid, from_conn);
        }
    }
    let total_messages = expected.len();
    let expected_deliveries: usize = expected.values().map(|&to| user_conns[to].len()).sum();
    let expected_pairs: usize = expected
        .values()
        .map(|&to| user_conns[to].iter().map(|&i| &conns[i].instance).collect::<BTreeSet<_>>().len())
        .sum();

    // Collect until every delivery and every ack arrived.
    let mut got: Vec<Vec<String>> = vec![Vec::new(); conns.len()];
    let mut acks: HashMap<String, (usize, String)> = HashMap::new();
    let mut ids: HashMap<String, String> = HashMap::new(); // cmid -> message id seen by recipients
    let (mut deliveries, deadline) = (0usize, tokio::time::Instant::now() + Duration::from_secs(60));
    while deliveries < expected_deliveries || acks.len() < total_messages {
        let Ok(Some((idx, v))) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            panic!("stalled: {deliveries}/{expected_deliveries} deliveries, {}/{total_messages} acks", acks.len());
        };
        let data = &v["data"];
        match v["event"].as_str() {
            Some("chat_message") => {
                let cmid = data["clientMessageId"].as_str().unwrap_or_else(|| panic!("no clientMessageId: {v}"));
                let to = *expected.get(cmid).unwrap_or_else(|| panic!("unknown message {v}"));
                assert_eq!(
                    conns[idx].user,
                    to,
                    "connection of {} got a message for {}: {v}",
                    user_name(conns[idx].user),
                    user_name(to)
                );
                assert_eq!(data["to"], json!(user_name(to)), "{v}");
                assert_eq!(data["from"].as_str(), cmid.rsplit_once('-').map(|(f, _)| f), "{v}");
                let id = data["id"].as_str().unwrap().to_string();
                let prev = ids.entry(cmid.to_string()).or_insert_with(|| id.clone());
                assert_eq!(*prev, id, "one message, one id: {v}");
                got[idx].push(cmid.to_string());
                deliveries += 1;
            }
            Some("ack") => {
                let cmid = data["clientMessageId"].as_str().unwrap().to_string();
                assert_eq!(sender_conn.get(&cmid), Some(&idx), "ack on the wrong socket: {v}");
                assert!(
                    acks.insert(cmid, (idx, data["id"].as_str().unwrap().to_string())).is_none(),
                    "second ack: {v}"
                );
            }
            _ => panic!("unexpected frame on connection {idx}: {v}"),
        }
    }
    eprintln!(
        "{total_messages} messages, {deliveries} deliveries, {expected_pairs} (message, holding instance) pairs, after {:?}",
        started.elapsed()
    );

    // The broker side: exactly one MQTT message per (message, instance holding the recipient).
    let mqtt_in =
        stack.wait_metrics(MQTT_IN, |v| v.iter().sum::<f64>() >= expected_pairs as f64, Duration::from_secs(10)).await;
    let ws_in = stack.metric_per_instance("fanout_messages_in_total{source=\"ws\"}").await;
    eprintln!("{MQTT_IN} per instance: {mqtt_in:?}; ws in: {ws_in:?}");

    // Nothing more arrives: no duplicate, no stray message (a bounded look for absence).
    if let Ok(Some((idx, v))) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        panic!("extra frame on connection {idx} after everything arrived: {v}");
    }
    for (idx, list) in got.iter().enumerate() {
        let mut want: Vec<String> =
            expected.iter().filter(|(_, &to)| to == conns[idx].user).map(|(c, _)| c.clone()).collect();
        let mut have = list.clone();
        want.sort();
        have.sort();
        assert_eq!(have, want, "connection {idx} of {} on {}", user_name(conns[idx].user), conns[idx].instance);
    }
    for (cmid, (_, id)) in &acks {
        assert_eq!(Some(id), ids.get(cmid), "ack id of {cmid} must be the delivered message id");
    }
    let mqtt_after = stack.metric_per_instance(MQTT_IN).await;
    assert_eq!(
        mqtt_after.iter().sum::<f64>(),
        expected_pairs as f64,
        "sum of {MQTT_IN} over instances {mqtt_after:?} must equal the (message, recipient instance) pairs"
    );
    // Per instance, too: each instance received exactly the messages for users it holds.
    for (i, (id, _)) in stack.instances.iter().enumerate() {
        let want = expected.values().filter(|&&to| user_conns[to].iter().any(|&c| conns[c].instance == *id)).count();
        assert_eq!(mqtt_after[i], want as f64, "instance {id}: {MQTT_IN}");
    }
    assert_eq!(ws_in.iter().sum::<f64>(), total_messages as f64, "ws in over instances");
    eprintln!("done in {:?}", started.elapsed());
}

/// An idle socket through nginx outlives nginx's 75 s proxy timeouts and fanout's 60 s idle
/// timeout: the service's 20 s pings (answered by the client) keep both sides busy. Takes
/// ~80 s, so it is not part of the default run: `cargo test --release --test e2e_stack -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "takes ~80 s; run with --ignored"]
async fn idle_socket_through_nginx_survives_past_proxy_and_idle_timeouts() {
    let stack = Stack::up(1);
    let mut alice = stack.connect(&token(SECRET, "alice", 3600, None)).await;
    // Reading answers the server's pings (tungstenite replies automatically); no data frame
    // and no close may arrive meanwhile.
    if let Some(m) = alice.recv_timeout(Duration::from_secs(80)).await {
        panic!("idle socket got {m:?} before 80 s");
    }
    let mut bob = stack.connect(&token(SECRET, "bob", 3600, None)).await;
    bob.chat_acked("alice", json!("still there?"), "idle-1").await;
    assert_eq!(alice.expect_event("chat_message").await["message"], json!("still there?"));
}

/// nginx's passive health and `proxy_next_upstream`: with one instance dead (SIGKILL), every
/// new socket through nginx still connects — the refused connect is retried on another
/// instance inside the same client handshake — and none is attributed to the dead one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instance_is_skipped_by_nginx_without_failing_any_handshake() {
    let stack = Stack::up(3);
    let pid = std::fs::read_to_string(stack.dir().join("fanout-n2.pid")).expect("pid of n2").trim().to_string();
    assert!(pid.parse::<u32>().is_ok_and(|p| p > 1), "pid file: {pid:?}");
    let st = std::process::Command::new("kill").args(["-KILL", "--", &pid]).status().expect("kill");
    assert!(st.success());
    // Wait until n2's port refuses connections (the process is gone).
    let n2_port = stack.instances[1].1;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", n2_port)).is_ok() {
        assert!(std::time::Instant::now() < deadline, "n2 still accepts connections");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut clients = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..12 {
        let c = stack.connect(&token(SECRET, &format!("u{i}"), 3600, None)).await;
        *seen.entry(c.connected["instanceId"].as_str().unwrap().to_string()).or_default() += 1;
        clients.push(c);
    }
    assert!(!seen.contains_key("n2"), "a socket was attributed to the dead instance: {seen:?}");
    assert_eq!(seen.values().sum::<usize>(), 12, "{seen:?}");
    assert_eq!(seen.len(), 2, "the two live instances share the sockets: {seen:?}");
    // nginx did try the dead instance and moved on (the retry path was exercised).
    let errors = std::fs::read_to_string(stack.dir().join("nginx-error.log")).unwrap_or_default();
    assert!(
        errors.lines().any(|l| l.contains("Connection refused") && l.contains(&format!("127.0.0.1:{n2_port}"))),
        "nginx never tried the dead instance; error log:\n{errors}"
    );
    // And they chat across the live instances.
    let (first, rest) = clients.split_at_mut(1);
    first[0].chat_acked("u11", json!("after a crash"), "dead-1").await;
    assert_eq!(rest[10].expect_event("chat_message").await["message"], json!("after a crash"));
}

/// Spec §7 / issue 4 through the load balancer: SIGTERM an instance while its user is sending;
/// the socket is closed with 1001, every message that instance acked reaches the recipient on
/// the other instance, and the user reconnecting through nginx lands on the live instance and
/// chats on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_through_nginx_closes_1001_loses_no_acked_message_and_clients_resume() {
    let stack = Stack::up(2);
    let mut alice = stack.connect(&token(SECRET, "alice", 3600, None)).await;
    let a_inst = alice.connected["instanceId"].as_str().unwrap().to_string();
    // bob must be on the other instance (nginx balances by least connections).
    let mut bob = loop {
        let c = stack.connect(&token(SECRET, "bob", 3600, None)).await;
        if c.connected["instanceId"].as_str() != Some(a_inst.as_str()) {
            break c;
        }
        drop(c);
    };
    let pid = std::fs::read_to_string(stack.dir().join(format!("fanout-{a_inst}.pid"))).expect("pid file");
    let pid = pid.trim().to_string();
    assert!(pid.parse::<u32>().is_ok_and(|p| p > 1), "pid file: {pid:?}");

    // 30 messages back to back (within the default burst of 100); SIGTERM after the 15th.
    for i in 0..30 {
        let f = json!({"event": "send_chat_message_to_participant",
            "data": {"participantId": "bob", "message": i, "clientMessageId": format!("m{i}")}});
        if alice.ws.send(Message::text(f.to_string())).await.is_err() {
            break;
        }
        if i == 15 {
            let st = std::process::Command::new("kill").args(["-TERM", "--", &pid]).status().expect("kill");
            assert!(st.success());
        }
    }
    // alice sees acks (and perhaps errors) and then the 1001 close.
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let close = loop {
        match tokio::time::timeout(RECV_TIMEOUT, alice.ws.next()).await.expect("no close after SIGTERM") {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["event"] == json!("ack") {
                    acked.insert(v["data"]["clientMessageId"].as_str().unwrap().to_string());
                }
            }
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("socket error before the close frame: {e}"),
            None => panic!("stream ended without a close frame"),
        }
    };
    assert_eq!(close, Some(1001), "close code when the instance shuts down");
    assert!(!acked.is_empty(), "nothing was acked before the shutdown");
    // The process exits within the bound (5 s for sessions + 5 s for the broker session).
    let gone = std::time::Instant::now() + Duration::from_secs(12);
    while std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z")
    {
        assert!(std::time::Instant::now() < gone, "instance {a_inst} still running 12 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every acked message reached bob, once.
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    while got.keys().filter(|k| acked.contains(*k)).count() < acked.len() {
        let d = bob.expect_event("chat_message").await;
        *got.entry(d["clientMessageId"].as_str().unwrap().to_string()).or_default() += 1;
    }
    assert!(got.values().all(|&n| n == 1), "a message reached bob twice: {got:?}");
    // alice reconnects through nginx: she lands on the live instance and chats on.
    let mut alice2 = stack.connect(&token(SECRET, "alice", 3600, None)).await;
    assert_ne!(alice2.connected["instanceId"].as_str(), Some(a_inst.as_str()));
    alice2.chat_acked("bob", json!("back"), "back-1").await;
    loop {
        let d = bob.expect_event("chat_message").await;
        if d["clientMessageId"] == json!("back-1") {
            break;
        }
    }
    bob.chat_acked("alice", json!("welcome back"), "wb-1").await;
    assert_eq!(alice2.expect_event("chat_message").await["message"], json!("welcome back"));
}
