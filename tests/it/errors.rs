//! Bad input from a client: every error code of docs/protocol.md §4.3, none of which closes the connection or
//! disturbs the broker link; rate limiting; the 1009 close for oversized frames.

use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// How many times the broker saw `client_id` go away (DISCONNECT, socket error, protocol
/// error, kicked by a takeover).
fn disconnects(m: &Mosquitto, client_id: &str) -> usize {
    let (gone, error) = (format!("Client {client_id} "), format!("Socket error on client {client_id},"));
    m.log_lines().iter().filter(|l| l.starts_with(&gone) || l.starts_with(&error)).count()
}

async fn expect_error(c: &mut Client, code: &str, cmid: Option<&str>, what: &str) {
    let v = c.recv_json().await;
    assert_eq!(v["event"], json!("error"), "{what}: expected an error event, got {v}");
    let d = &v["data"];
    assert_eq!(d["code"], json!(code), "{what}: {v}");
    assert!(d["message"].as_str().is_some_and(|s| !s.is_empty()), "{what}: error needs a human message: {v}");
    if let Some(id) = cmid {
        assert_eq!(d["clientMessageId"], json!(id), "{what}: clientMessageId must be echoed: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_code_leaves_connection_and_broker_link_intact() {
    let m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m)).await;
    let mut alice = inst.connect("alice").await;
    let mut bob = inst.connect("bob").await;
    let send = "send_chat_message_to_participant";
    let cid = inst.client_id();
    let (connects_before, disconnects_before) = (m.connect_count(&cid), disconnects(&m, &cid));
    assert!(connects_before >= 1, "{cid} is not connected to the broker");

    // bad_json
    alice.send(Message::text("{not json")).await;
    expect_error(&mut alice, "bad_json", None, "invalid JSON").await;
    alice.send(Message::binary(vec![0x7bu8, 0x7d])).await;
    expect_error(&mut alice, "bad_json", None, "binary frame").await;
    for non_object in ["[1,2]", "\"str\"", "42", "null"] {
        alice.send(Message::text(non_object)).await;
        expect_error(&mut alice, "bad_json", None, &format!("non-object {non_object}")).await;
    }
    alice.emit(send, json!({"participantId": "bob", "clientMessageId": "c-missing"})).await;
    expect_error(&mut alice, "bad_json", Some("c-missing"), "missing message").await;

    // unknown_event
    alice.emit("send_chat_message_to_everybody_please", json!({"message": "x", "clientMessageId": "c-unk"})).await;
    expect_error(&mut alice, "unknown_event", Some("c-unk"), "unknown event").await;

    // invalid_participant, including ids that are MQTT wildcards or would add topic levels
    let long = "x".repeat(300);
    for (i, bad) in ["#", "+", "a/b", "", long.as_str(), "a\u{1}b", "bob/#", "a\nb"].iter().enumerate() {
        let cmid = format!("c-inv-{i}");
        alice.emit(send, json!({"participantId": bad, "message": "x", "clientMessageId": cmid})).await;
        expect_error(&mut alice, "invalid_participant", Some(&cmid), &format!("participantId {bad:?}")).await;
    }
    alice
        .emit(
            "send_chat_message_to_many_participants",
            json!({"participantIds": ["bob", "#"], "message": "x", "clientMessageId": "c-inv-many"}),
        )
        .await;
    expect_error(&mut alice, "invalid_participant", Some("c-inv-many"), "participantIds [bob, #]").await;

    // too_many_recipients
    let ids: Vec<String> = (0..101).map(|i| format!("user{i}")).collect();
    alice
        .emit(
            "send_chat_message_to_many_participants",
            json!({"participantIds": ids, "message": "x", "clientMessageId": "c-many"}),
        )
        .await;
    expect_error(&mut alice, "too_many_recipients", Some("c-many"), "101 recipients").await;

    // forbidden
    alice.emit("send_chat_message_to_all_participants", json!({"message": "x", "clientMessageId": "c-all"})).await;
    expect_error(&mut alice, "forbidden", Some("c-all"), "broadcast without scope").await;

    // The same connection still chats, and nothing of the rejected input reached bob: the
    // first frame bob sees is this message.
    let ack = alice.chat_acked("bob", json!("still here"), "c-ok").await;
    let got = bob.expect_event("chat_message").await;
    assert_eq!(got["message"], json!("still here"), "bob saw something from rejected input first: {got}");
    assert_eq!(got["id"], ack["id"]);
    // ... and the reverse direction too.
    bob.chat_acked("alice", json!("pong"), "c-back").await;
    assert_eq!(alice.expect_event("chat_message").await["from"], json!("bob"));

    // The broker link never dropped.
    assert_eq!(inst.metric("fanout_mqtt_reconnects_total").await, Some(0.0), "reconnects");
    assert_eq!(inst.metric("fanout_mqtt_connected").await, Some(1.0), "mqtt connected");
    assert_eq!(m.connect_count(&cid), connects_before, "{cid} reconnected to the broker");
    assert_eq!(disconnects(&m, &cid), disconnects_before, "the broker link of {cid} dropped");
    assert_eq!(m.subscribe_count(&cid, "msg/alice"), 1, "alice subscribed once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_rejects_excess_and_connection_recovers() {
    let m = Mosquitto::start();
    let inst =
        Instance::start(InstanceOpts::broker(&m).arg("--rate-limit").arg("20").arg("--rate-burst").arg("40")).await;
    let mut alice = inst.connect("alice").await;
    let mut bob = inst.connect("bob").await;

    let n = 100;
    let start = Instant::now();
    for i in 0..n {
        alice
            .emit(
                "send_chat_message_to_participant",
                json!({"participantId": "bob", "message": i, "clientMessageId": format!("r-{i}")}),
            )
            .await;
    }
    let mut acked = Vec::new();
    let mut limited = Vec::new();
    for _ in 0..n {
        let v = alice.recv_json().await;
        let d = &v["data"];
        let cmid = d["clientMessageId"].as_str().unwrap_or_else(|| panic!("reply without clientMessageId: {v}"));
        let i: usize = cmid.trim_start_matches("r-").parse().unwrap();
        match v["event"].as_str() {
            Some("ack") => acked.push(i),
            Some("error") => {
                assert_eq!(d["code"], json!("rate_limited"), "{v}");
                limited.push(i);
            }
            _ => panic!("unexpected reply {v}"),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let max_ok = 40 + (elapsed * 20.0).ceil() as usize + 1;
    assert!(
        acked.len() >= 40 && acked.len() <= max_ok,
        "with burst 40 and 20/s over {elapsed:.2}s, expected 40..={max_ok} acks, got {}",
        acked.len()
    );
    assert!(!limited.is_empty(), "100 messages at once must hit the rate limit");
    assert_eq!(acked.len() + limited.len(), n);

    // Bob gets exactly the acked ones, in order.
    let mut received = Vec::new();
    for _ in 0..acked.len() {
        let got = bob.expect_event("chat_message").await;
        received.push(got["message"].as_u64().unwrap() as usize);
    }
    acked.sort();
    assert_eq!(received, acked, "bob must get exactly the acked messages, in send order");

    // Once tokens refill, the same connection chats again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        alice
            .emit(
                "send_chat_message_to_participant",
                json!({"participantId": "bob", "message": "later", "clientMessageId": "late"}),
            )
            .await;
        let v = alice.recv_json().await;
        if v["event"] == json!("ack") {
            break;
        }
        assert_eq!(v["data"]["code"], json!("rate_limited"), "{v}");
        assert!(Instant::now() < deadline, "rate limit never refilled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(bob.expect_event("chat_message").await["message"], json!("later"));
    assert_eq!(inst.metric("fanout_mqtt_reconnects_total").await, Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_closes_with_1009() {
    let m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m).arg("--max-message-bytes").arg("1024")).await;
    let mut alice = inst.connect("alice").await;
    let mut bob = inst.connect("bob").await;

    // Just under the limit is fine.
    let fits = json!({"event": "send_chat_message_to_participant", "data": {"participantId": "bob", "message": "y".repeat(900)}});
    assert!(fits.to_string().len() <= 1024);
    alice.send_json(&fits).await;
    alice.expect_event("ack").await;
    assert_eq!(bob.expect_event("chat_message").await["message"], json!("y".repeat(900)));

    let big = json!({"event": "send_chat_message_to_participant", "data": {"participantId": "bob", "message": "z".repeat(2000)}});
    alice.send_json(&big).await;
    assert_eq!(alice.recv_close(RECV_TIMEOUT).await, Some(1009), "oversized frame must close with 1009");
    // Bob is unaffected and got nothing of it.
    bob.emit("ping", json!({})).await;
    assert_eq!(bob.recv_json().await["event"], json!("pong"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_without_client_message_id_has_none() {
    let m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m)).await;
    let mut alice = inst.connect("alice").await;
    alice.emit("no_such_event", json!({})).await;
    let v: Value = alice.recv_json().await;
    assert_eq!(v["data"]["code"], json!("unknown_event"), "{v}");
    assert!(v["data"].get("clientMessageId").is_none_or(|x| x.is_null()), "{v}");
}
