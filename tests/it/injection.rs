//! Payloads published straight to the broker reach WebSocket clients byte for byte.

use crate::support::*;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_text_arrives_verbatim() {
    let m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m)).await;
    let mut alice = inst.connect("alice").await;
    let mut alice2 = inst.connect("alice").await;

    // Odd spacing, key order and number formatting would not survive re-serialising.
    let payload = r#"{"event":"chat_message",  "data":{"message":"maintenance at 5","from":"ops","n":1.50}}"#;
    m.publish_text("msg/alice", payload);
    assert_eq!(alice.recv_text().await, payload);
    assert_eq!(alice2.recv_text().await, payload);

    // Not JSON at all, but UTF-8: still a text frame, unchanged.
    let plain = "héllo wörld — not json";
    m.publish_text("msg/alice", plain);
    assert_eq!(alice.recv_text().await, plain);
    assert_eq!(alice2.recv_text().await, plain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_payload_arrives_as_binary_frame() {
    let m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m)).await;
    let mut alice = inst.connect("alice").await;
    let bytes = [0xffu8, 0xfe, 0x00, 0x01];
    m.publish_bytes("msg/alice", &bytes);
    match alice.recv().await {
        Message::Binary(b) => assert_eq!(&b[..], &bytes[..]),
        other => panic!("expected a binary frame, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_broadcast_reaches_users_on_every_instance() {
    let m = Mosquitto::start();
    let (a, b) = tokio::join!(Instance::start(InstanceOpts::broker(&m)), Instance::start(InstanceOpts::broker(&m)));
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    let payload = r#"{"event":"chat_message","data":{"from":"ops","to":null,"message":"all"}}"#;
    m.publish_text("broadcast", payload);
    assert_eq!(alice.recv_text().await, payload);
    assert_eq!(bob.recv_text().await, payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_message_id_reaches_each_connection_once() {
    let m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m)).await;
    let mut alice = inst.connect("alice").await;
    let id = uuid::Uuid::new_v4();
    let payload = format!(
        r#"{{"event":"chat_message","data":{{"id":"{id}","from":"bob","to":"alice","message":"once","sentAt":1767225600123}}}}"#
    );
    // The same message twice, as a broker redelivery would look.
    m.publish_text("msg/alice", &payload);
    m.publish_text("msg/alice", &payload);
    m.publish_text("msg/alice", "sentinel");
    assert_eq!(alice.recv_text().await, payload);
    assert_eq!(alice.recv_text().await, "sentinel", "message id {id} was delivered twice");
}
