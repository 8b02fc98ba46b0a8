//! One user on several devices across instances: one broker subscription per instance, every
//! device receives every message, closing one device keeps the others subscribed.

use std::time::Duration;

use crate::support::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_receives_and_each_instance_subscribes_once() {
    let m = Mosquitto::start();
    let (a, b) = tokio::join!(Instance::start(InstanceOpts::broker(&m)), Instance::start(InstanceOpts::broker(&m)));
    let mut alice = a.connect("alice").await;
    let mut bob_a = a.connect("bob").await;
    let mut bob_b1 = b.connect("bob").await;
    let mut bob_b2 = b.connect("bob").await;
    assert_eq!(b.wait_metric("fanout_connections", |v| v == 2.0, Duration::from_secs(5)).await, 2.0);
    assert_eq!(b.metric("fanout_users").await, Some(1.0), "B holds one user");

    let ack = alice.chat_acked("bob", json!("to all of bob"), "md-1").await;
    for (name, c) in [("bob on A", &mut bob_a), ("bob on B #1", &mut bob_b1), ("bob on B #2", &mut bob_b2)] {
        let got = c.expect_event("chat_message").await;
        assert_eq!(got["id"], ack["id"], "{name}: {got}");
        assert_eq!(got["message"], json!("to all of bob"), "{name}");
    }

    // One SUBSCRIBE to msg/bob per instance, although B holds two of bob's sockets.
    assert_eq!(m.subscribe_count(&a.client_id(), "msg/bob"), 1, "A subscriptions to msg/bob");
    assert_eq!(m.subscribe_count(&b.client_id(), "msg/bob"), 1, "B subscriptions to msg/bob");

    // Close one of bob's B sockets; wait until B has processed it.
    bob_b2.close().await;
    assert_eq!(
        b.wait_metric("fanout_connections", |v| v == 1.0, Duration::from_secs(5)).await,
        1.0,
        "B never noticed the closed socket"
    );
    assert_eq!(b.metric("fanout_users").await, Some(1.0), "bob is still on B");

    let ack = alice.chat_acked("bob", json!("after one closed"), "md-2").await;
    for (name, c) in [("bob on A", &mut bob_a), ("bob on B #1", &mut bob_b1)] {
        let got = c.expect_event("chat_message").await;
        assert_eq!(got["id"], ack["id"], "{name}: {got}");
    }
    // Injected traffic reaches the remaining devices too.
    m.publish_text("msg/bob", "injected");
    assert_eq!(bob_a.recv_text().await, "injected");
    assert_eq!(bob_b1.recv_text().await, "injected");

    assert_eq!(m.unsubscribe_count(&b.client_id(), "msg/bob"), 0, "B unsubscribed msg/bob while bob is still on B");
    assert_eq!(m.subscribe_count(&b.client_id(), "msg/bob"), 1, "B re-subscribed msg/bob");
    assert_eq!(m.subscribe_count(&a.client_id(), "msg/bob"), 1);
}
