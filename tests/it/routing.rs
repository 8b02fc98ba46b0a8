//! Message routing between instances over one Mosquitto: per-user topics, event names of both
//! tutorial generations, many-recipient and broadcast sends, ping.

use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};

fn assert_uuid(v: &Value, what: &str) {
    let s = v.as_str().unwrap_or_else(|| panic!("{what} is not a string: {v}"));
    uuid::Uuid::parse_str(s).unwrap_or_else(|e| panic!("{what} is not a UUID ({e}): {s}"));
}

fn assert_recent_millis(v: &Value) {
    let t = v.as_u64().unwrap_or_else(|| panic!("sentAt is not an integer: {v}"));
    let now = now_millis();
    assert!(t > now - 60_000 && t <= now + 1_000, "sentAt {t} is not Unix milliseconds near now ({now})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_reaches_recipient_on_other_instance_and_idle_instance_gets_nothing() {
    let m = Mosquitto::start();
    let (a, b, c) = tokio::join!(
        Instance::start(InstanceOpts::broker(&m)),
        Instance::start(InstanceOpts::broker(&m)),
        Instance::start(InstanceOpts::broker(&m)),
    );
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    assert_eq!(alice.connected["userId"], json!("alice"));
    assert_eq!(alice.connected["instanceId"], json!(a.id));
    assert_eq!(bob.connected["instanceId"], json!(b.id));

    let message = json!({"text": "hi bob", "n": [1, 2.5, null, true]});
    alice
        .emit(
            "send_chat_message_to_participant",
            json!({"participantId": "bob", "message": message, "clientMessageId": "c-17"}),
        )
        .await;

    let got = bob.expect_event("chat_message").await;
    assert_eq!(got["from"], json!("alice"), "chat_message: {got}");
    assert_eq!(got["to"], json!("bob"), "chat_message: {got}");
    assert_eq!(got["message"], message, "chat_message: {got}");
    assert_eq!(got["clientMessageId"], json!("c-17"), "chat_message: {got}");
    assert_uuid(&got["id"], "chat_message id");
    assert_recent_millis(&got["sentAt"]);

    let ack = alice.expect_event("ack").await;
    assert_eq!(ack["id"], got["id"], "ack id must be the message id; ack: {ack}");
    assert_eq!(ack["clientMessageId"], json!("c-17"), "ack: {ack}");

    // Only B holds bob: B received one MQTT message, A and C none.
    let b_in = b.wait_metric("fanout_messages_in_total{source=\"mqtt\"}", |v| v >= 1.0, Duration::from_secs(5)).await;
    assert_eq!(b_in, 1.0, "B fanout_messages_in_total{{source=\"mqtt\"}}");
    assert_eq!(
        c.metric_or_zero("fanout_messages_in_total{source=\"mqtt\"}").await,
        0.0,
        "idle instance C received MQTT messages:\n{}",
        c.metrics().await
    );
    assert_eq!(a.metric_or_zero("fanout_messages_in_total{source=\"mqtt\"}").await, 0.0, "A (sender only)");
    assert_eq!(a.metric_or_zero("fanout_messages_in_total{source=\"ws\"}").await, 1.0, "A in{{ws}}");
    assert!(a.metric_or_zero("fanout_messages_published_total").await >= 1.0, "A published_total");
    assert!(b.metric_or_zero("fanout_messages_delivered_total").await >= 1.0, "B delivered_total");

    // The broker saw no wildcard subscription from anyone, and C subscribed to no user topic.
    for inst in [&a, &b, &c] {
        for f in m.subscriptions_of(&inst.client_id()) {
            assert!(!f.contains('#') && !f.contains('+'), "{} subscribed with a wildcard: {f}", inst.client_id());
        }
    }
    let c_subs = m.subscriptions_of(&c.client_id());
    assert!(c_subs.iter().all(|f| !f.starts_with("msg/")), "C subscribed to user topics: {c_subs:?}");
    assert_eq!(m.subscribe_count(&a.client_id(), "msg/alice"), 1);
    assert_eq!(m.subscribe_count(&b.client_id(), "msg/bob"), 1);
    assert_eq!(m.subscribe_count(&a.client_id(), "msg/bob"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_one_participant_event_name_works_and_omits_absent_client_message_id() {
    let m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m)).await;
    let mut alice = inst.connect("alice").await;
    let mut bob = inst.connect("bob").await;

    alice.emit("send_chat_message_to_one_participant", json!({"participantId": "bob", "message": "old client"})).await;
    let got = bob.expect_event("chat_message").await;
    assert_eq!(got["from"], json!("alice"));
    assert_eq!(got["to"], json!("bob"));
    assert_eq!(got["message"], json!("old client"));
    assert!(got.get("clientMessageId").is_none(), "clientMessageId must be absent when not given: {got}");
    let ack = alice.expect_event("ack").await;
    assert_eq!(ack["id"], got["id"]);
    assert!(
        ack.get("clientMessageId").is_none_or(|v| v.is_null()),
        "ack has a clientMessageId although none was given: {ack}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_participants_dedups_keeps_order_and_lists_recipients() {
    let m = Mosquitto::start();
    let (a, b) = tokio::join!(Instance::start(InstanceOpts::broker(&m)), Instance::start(InstanceOpts::broker(&m)));
    let mut alice = a.connect("alice").await;
    let mut bob = a.connect("bob").await;
    let mut carol = b.connect("carol").await;

    alice
        .emit(
            "send_chat_message_to_many_participants",
            json!({"participantIds": ["carol", "bob", "carol", "dave", "bob"], "message": {"k": "v"}, "clientMessageId": "m-1"}),
        )
        .await;
    let ack = alice.expect_event("ack").await;
    assert_eq!(ack["clientMessageId"], json!("m-1"));
    let expected_to = json!(["carol", "bob", "dave"]);
    let for_bob = bob.expect_event("chat_message").await;
    let for_carol = carol.expect_event("chat_message").await;
    for got in [&for_bob, &for_carol] {
        assert_eq!(got["to"], expected_to, "to must be the de-duplicated list in first-given order: {got}");
        assert_eq!(got["from"], json!("alice"));
        assert_eq!(got["message"], json!({"k": "v"}));
        assert_eq!(got["clientMessageId"], json!("m-1"));
        assert_eq!(got["id"], ack["id"]);
    }

    // No duplicate: the next frame each recipient sees is the follow-up message.
    alice.chat_acked("bob", json!("second"), "m-2").await;
    alice.chat_acked("carol", json!("second"), "m-3").await;
    assert_eq!(bob.expect_event("chat_message").await["message"], json!("second"), "bob got a duplicate");
    assert_eq!(carol.expect_event("chat_message").await["message"], json!("second"), "carol got a duplicate");
    // One ack per send: alice's next frame answers her next request.
    alice.emit("ping", json!({})).await;
    alice.expect_event("pong").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_needs_scope_and_reaches_every_instance() {
    let m = Mosquitto::start();
    let (a, b) = tokio::join!(Instance::start(InstanceOpts::broker(&m)), Instance::start(InstanceOpts::broker(&m)));
    // Every instance subscribes to the broadcast topic.
    for inst in [&a, &b] {
        assert!(
            m.wait_for_log(|m| m.subscribe_count(&inst.client_id(), "broadcast") >= 1, Duration::from_secs(5)).await,
            "{} never subscribed to `broadcast`",
            inst.client_id()
        );
    }
    // The broadcaster is alone on its instance: only the broadcast brings it its own message.
    let mut admin = Client::connect_ok(&a, Auth::Subprotocol(&a.broadcast_token("admin"))).await;
    let mut plain = b.connect("plain").await;
    let mut bob = b.connect("bob").await;

    // Without the scope: forbidden, nothing sent.
    plain.emit("send_chat_message_to_all_participants", json!({"message": "nope", "clientMessageId": "f-1"})).await;
    let err = plain.expect_event("error").await;
    assert_eq!(err["code"], json!("forbidden"), "error: {err}");
    assert_eq!(err["clientMessageId"], json!("f-1"), "error: {err}");

    admin
        .emit("send_chat_message_to_all_participants", json!({"message": "all hands", "clientMessageId": "b-1"}))
        .await;
    // The sender gets its ack and, like everyone (docs/behaviour.md), the broadcast itself.
    let ack = admin.expect_event("ack").await;
    assert_eq!(ack["clientMessageId"], json!("b-1"));
    for c in [&mut admin, &mut plain, &mut bob] {
        let got = c.expect_event("chat_message").await;
        assert_eq!(got["message"], json!("all hands"), "{got}");
        assert_eq!(got["from"], json!("admin"), "{got}");
        assert!(got.get("to").is_some() && got["to"].is_null(), "to must be null for a broadcast: {got}");
        assert_eq!(got["id"], ack["id"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_gets_pong() {
    let m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m)).await;
    let mut c = inst.connect("pinger").await;
    c.emit("ping", json!({})).await;
    let v = c.recv_json().await;
    assert_eq!(v, json!({"event": "pong", "data": {}}));
    c.send_json(&json!({"event": "ping"})).await;
    let v = c.recv_json().await;
    assert_eq!(v, json!({"event": "pong", "data": {}}));
}

/// A client whose ack was lost resends with the same `clientMessageId` (here after
/// reconnecting through another instance): the envelope id is derived from (sender,
/// clientMessageId), so both sends carry one id and the recipient's instance drops the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resend_with_the_same_client_message_id_is_delivered_once() {
    let m = Mosquitto::start();
    let (a, b) = tokio::join!(Instance::start(InstanceOpts::broker(&m)), Instance::start(InstanceOpts::broker(&m)));
    let (alice_id, bob_id) = (unique("alice-"), unique("bob-"));
    let mut bob = b.connect(&bob_id).await;
    let mut alice = a.connect(&alice_id).await;
    let first = alice.chat_acked(&bob_id, json!("hi"), "c-1").await;
    let got = bob.expect_event("chat_message").await;
    assert_eq!(got["id"], first["id"]);
    alice.close().await;

    let mut alice = b.connect(&alice_id).await;
    let second = alice.chat_acked(&bob_id, json!("hi"), "c-1").await;
    assert_eq!(second["id"], first["id"], "a resend must carry the first send's id");
    // Another sender's c-1 is a different message.
    let mut carol = a.connect(&unique("carol-")).await;
    let other = carol.chat_acked(&bob_id, json!("hello"), "c-1").await;
    assert_ne!(other["id"], first["id"]);
    let got = bob.expect_event("chat_message").await;
    assert_eq!(got["id"], other["id"], "the resent copy reached bob again: {got}");
    // Messages from alice to bob arrive in order, so a copy would have come before this one.
    alice.chat_acked(&bob_id, json!("next"), "c-2").await;
    let got = bob.expect_event("chat_message").await;
    assert_eq!(got["clientMessageId"], json!("c-2"), "expected c-2, got {got}");
    assert_eq!(
        b.metric_or_zero("fanout_dropped_total{reason=\"duplicate\"}").await,
        1.0,
        "the instance holding bob dropped exactly the one copy"
    );
}
