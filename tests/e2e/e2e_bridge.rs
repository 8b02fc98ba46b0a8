//! Two Mosquittos bridged on `msg/#` and `broadcast` (mosquitto/bridge.conf.example, on broker
//! B only), instances split across them: cross-broker delivery both ways, one user's devices
//! on both brokers, a broadcast, an operator injection on the other broker — and no message
//! duplicated by the bridge (checked per instance on `fanout_messages_in_total{source="mqtt"}`,
//! which counts what the broker delivered before fanout's own de-duplication).

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};

const MQTT_IN: &str = "fanout_messages_in_total{source=\"mqtt\"}";

fn repo_file(rel: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// A Mosquitto from the project's mosquitto/mosquitto.conf, optionally with the bridge example
/// (its `address` pointed at broker `bridge_to`) appended.
fn broker(bridge_to: Option<&Mosquitto>) -> Mosquitto {
    let mut conf = repo_file("mosquitto/mosquitto.conf");
    if let Some(core) = bridge_to {
        conf.push('\n');
        for l in repo_file("mosquitto/bridge.conf.example").lines() {
            let l =
                if l.starts_with("address ") { format!("address 127.0.0.1:{}", core.port()) } else { l.to_string() };
            conf.push_str(&l);
            conf.push('\n');
        }
    }
    Mosquitto::with_config(&conf)
}

/// Receives exactly `n` JSON frames (any order of events).
async fn frames(c: &mut Client, n: usize, who: &str) -> Vec<Value> {
    let mut v = Vec::new();
    for i in 0..n {
        match c.recv_timeout(RECV_TIMEOUT).await {
            Some(tokio_tungstenite::tungstenite::Message::Text(t)) => v.push(serde_json::from_str(&t).unwrap()),
            other => panic!("{who}: frame {} of {n}: got {other:?}; so far {v:?}", i + 1),
        }
    }
    v
}

fn chats(v: &[Value]) -> Vec<&Value> {
    v.iter().filter(|f| f["event"] == "chat_message").map(|f| &f["data"]).collect()
}

fn one_chat<'a>(v: &'a [Value], who: &str) -> &'a Value {
    let c = chats(v);
    assert_eq!(c.len(), 1, "{who}: expected one chat_message in {v:?}");
    c[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridged_brokers_deliver_across_once_including_multi_device_and_broadcast() {
    let core = broker(None);
    let edge = broker(Some(&core));
    // The bridge is up when A has seen its subscriptions to msg/# and broadcast.
    let bridged = |m: &Mosquitto| ["msg/#", "broadcast"].iter().all(|t| m.subscribe_count("bridge-b-to-a", t) >= 1);
    assert!(
        core.wait_for_log(bridged, Duration::from_secs(15)).await,
        "bridge did not subscribe on A;\nB:\n{}",
        edge.log()
    );

    let on = InstanceOpts::broker;
    let (a1, a2, b1, b2) = tokio::join!(
        Instance::start(on(&core)),
        Instance::start(on(&core)),
        Instance::start(on(&edge)),
        Instance::start(on(&edge)),
    );
    let mut alice = a1.connect("alice").await;
    let mut bob = b1.connect("bob").await;
    let mut carol_a2 = a2.connect("carol").await;
    let mut carol_b1 = b1.connect("carol").await;
    let mut carol_b2 = b2.connect("carol").await;
    let mut dave = b2.connect("dave").await;
    let mut erin = Client::connect_ok(&b2, Auth::Subprotocol(&b2.broadcast_token("erin"))).await;

    // 1. A -> B: alice on broker A to bob on broker B.
    alice
        .emit(
            "send_chat_message_to_participant",
            json!({"participantId": "bob", "message": "a->b", "clientMessageId": "1"}),
        )
        .await;
    assert_eq!(alice.expect_event("ack").await["clientMessageId"], json!("1"));
    assert_eq!(bob.expect_event("chat_message").await["message"], json!("a->b"));

    // 2. B -> A.
    bob.emit(
        "send_chat_message_to_participant",
        json!({"participantId": "alice", "message": "b->a", "clientMessageId": "2"}),
    )
    .await;
    assert_eq!(bob.expect_event("ack").await["clientMessageId"], json!("2"));
    assert_eq!(alice.expect_event("chat_message").await["message"], json!("b->a"));

    // 3. and 4. carol has devices on both brokers: a sender on B, then one on A.
    for (n, sender, label) in [("3", &mut dave, "from B"), ("4", &mut alice, "from A")] {
        sender
            .emit(
                "send_chat_message_to_participant",
                json!({"participantId": "carol", "message": label, "clientMessageId": n}),
            )
            .await;
        assert_eq!(sender.expect_event("ack").await["clientMessageId"], json!(n));
        for (who, c) in [("carol@a2", &mut carol_a2), ("carol@b1", &mut carol_b1), ("carol@b2", &mut carol_b2)] {
            let got = c.expect_event("chat_message").await;
            assert_eq!(got["message"], json!(label), "{who}: {got}");
        }
    }

    // 5. An operator injects on broker A for dave, who is only on broker B.
    core.publish_text("msg/dave", r#"{"event":"chat_message","data":{"from":"ops","message":"injected on A"}}"#);
    assert_eq!(dave.expect_event("chat_message").await["message"], json!("injected on A"));

    // 6. A broadcast from broker B reaches every connection on both brokers once.
    erin.emit("send_chat_message_to_all_participants", json!({"message": "all", "clientMessageId": "6"})).await;
    let erin_frames = frames(&mut erin, 2, "erin").await;
    assert!(erin_frames.iter().any(|f| f["event"] == "ack"), "{erin_frames:?}");
    let id6 = one_chat(&erin_frames, "erin")["id"].clone();
    let mut everyone = [
        ("alice", &mut alice),
        ("bob", &mut bob),
        ("carol@a2", &mut carol_a2),
        ("carol@b1", &mut carol_b1),
        ("carol@b2", &mut carol_b2),
        ("dave", &mut dave),
        ("erin", &mut erin),
    ];
    for (who, c) in everyone.iter_mut().filter(|(who, _)| *who != "erin") {
        let got = c.expect_event("chat_message").await;
        assert_eq!(got["id"], id6, "{who}: {got}");
        assert_eq!(got["to"], Value::Null, "{who}: {got}");
    }

    // Exactly one copy per (message, instance holding a recipient) came out of the brokers:
    // a1 {2, 6}; a2 {3, 4, 6}; b1 {1, 3, 4, 6}; b2 {3, 4, 5, 6}.
    let want = [("a1", &a1, 2.0), ("a2", &a2, 3.0), ("b1", &b1, 4.0), ("b2", &b2, 4.0)];
    for (name, inst, n) in want {
        let v = inst.wait_metric(MQTT_IN, |v| v >= n, Duration::from_secs(5)).await;
        assert_eq!(v, n, "{name}: {MQTT_IN}");
    }
    // And nothing else arrives anywhere (a bounded look for a late duplicate).
    for (who, c) in everyone.iter_mut() {
        c.expect_silence(Duration::from_millis(300), who).await;
    }
    for (name, inst, n) in want {
        assert_eq!(inst.metric_or_zero(MQTT_IN).await, n, "{name}: {MQTT_IN} after the quiet period");
    }
    // The instances never subscribed with a wildcard; only the bridge did.
    for (b, insts) in [(&core, [&a1, &a2]), (&edge, [&b1, &b2])] {
        for inst in insts {
            let cid = inst.client_id();
            for l in b.log().lines().filter(|l| l.contains(&format!(" {cid} 1 "))) {
                assert!(!l.contains('#') && !l.contains('+'), "{cid} subscribed with a wildcard: {l}");
            }
        }
    }
}
