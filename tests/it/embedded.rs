//! The default run: no --mqtt-url, the embedded broker carries the traffic.

use crate::support::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_delivers_between_users_and_accepts_mosquitto_pub() {
    let mqtt_port = free_port();
    let inst = Instance::start(InstanceOpts { embedded_mqtt_port: Some(mqtt_port), ..Default::default() }).await;
    let mut alice = inst.connect("alice").await;
    let mut bob = inst.connect("bob").await;

    let ack = alice.chat_acked("bob", json!({"text": "via embedded"}), "e-1").await;
    let got = bob.expect_event("chat_message").await;
    assert_eq!(got["from"], json!("alice"));
    assert_eq!(got["message"], json!({"text": "via embedded"}));
    assert_eq!(got["id"], ack["id"]);

    bob.chat_acked("alice", json!("back"), "e-2").await;
    assert_eq!(alice.expect_event("chat_message").await["message"], json!("back"));

    // The embedded broker is reachable by ordinary MQTT clients.
    crate::support::mosquitto::mosquitto_pub(mqtt_port, "msg/alice", b"hi from mosquitto_pub");
    assert_eq!(alice.recv_text().await, "hi from mosquitto_pub");
}
