//! Subscription lifecycle, token expiry, health endpoints and metrics, broker restarts.

use std::time::Duration;

use crate::support::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_socket_closing_unsubscribes_and_restores_subscription_count() {
    let m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m)).await;
    let cid = inst.client_id();
    let base_subs = inst.metric("fanout_subscriptions").await.expect("fanout_subscriptions sample");
    let base_users = inst.metric_or_zero("fanout_users").await;

    let bob1 = inst.connect("bob").await;
    // `connected` comes only after the broker confirmed the subscription: the broker logs the
    // SUBSCRIBE before it sends the SUBACK.
    assert_eq!(m.subscribe_count(&cid, "msg/bob"), 1, "`connected` arrived before the broker saw SUBSCRIBE msg/bob");
    let bob2 = inst.connect("bob").await;
    assert_eq!(inst.metric("fanout_subscriptions").await, Some(base_subs + 1.0));
    assert_eq!(inst.metric("fanout_users").await, Some(base_users + 1.0));
    assert_eq!(inst.metric("fanout_connections").await, Some(2.0));

    bob1.close().await;
    assert_eq!(inst.wait_metric("fanout_connections", |v| v == 1.0, Duration::from_secs(5)).await, 1.0);
    assert_eq!(m.unsubscribe_count(&cid, "msg/bob"), 0, "unsubscribed while a socket remained");
    bob2.close().await;

    assert!(
        m.wait_for_log(|m| m.unsubscribe_count(&cid, "msg/bob") == 1, Duration::from_secs(5)).await,
        "no UNSUBSCRIBE msg/bob from {cid} after bob's last socket closed"
    );
    assert_eq!(
        inst.wait_metric("fanout_subscriptions", |v| v == base_subs, Duration::from_secs(5)).await,
        base_subs,
        "fanout_subscriptions did not return to its base value"
    );
    assert_eq!(inst.metric_or_zero("fanout_users").await, base_users);
    assert_eq!(inst.metric_or_zero("fanout_connections").await, 0.0);

    // Coming back subscribes again and receives again.
    let mut bob3 = inst.connect("bob").await;
    assert_eq!(m.subscribe_count(&cid, "msg/bob"), 2);
    m.publish_text("msg/bob", "welcome back");
    assert_eq!(bob3.recv_text().await, "welcome back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_and_every_metric_series() {
    let m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m)).await;
    assert_eq!(get(inst.port, "/healthz").await.unwrap().status, 200);
    assert_eq!(get(inst.port, "/readyz").await.unwrap().status, 200);

    // Some traffic so that labelled counters have samples.
    let mut alice = inst.connect("alice").await;
    let mut bob = inst.connect("bob").await;
    alice.chat_acked("bob", json!("hi"), "h-1").await;
    bob.expect_event("chat_message").await;
    m.publish_text("msg/alice", "injected");
    assert_eq!(alice.recv_text().await, "injected");

    let text = inst.metrics().await;
    let has_sample = |name: &str| {
        text.lines()
            .any(|l| !l.starts_with('#') && (l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{"))))
    };
    for name in [
        "fanout_connections",
        "fanout_users",
        "fanout_subscriptions",
        "fanout_messages_delivered_total",
        "fanout_messages_published_total",
        "fanout_mqtt_connected",
        "fanout_mqtt_reconnects_total",
    ] {
        assert!(has_sample(name), "/metrics lacks {name}:\n{text}");
    }
    for series in ["fanout_messages_in_total{source=\"ws\"}", "fanout_messages_in_total{source=\"mqtt\"}"] {
        let v = parse_metric(&text, series).unwrap_or_else(|| panic!("/metrics lacks {series}:\n{text}"));
        assert!(v >= 1.0, "{series} = {v}");
    }
    // Nothing was dropped yet, so fanout_dropped_total may have no sample; it must be declared.
    assert!(
        has_sample("fanout_dropped_total")
            || text
                .lines()
                .any(|l| l.starts_with("# TYPE fanout_dropped_total ") || l.starts_with("# TYPE fanout_dropped ")),
        "/metrics lacks fanout_dropped_total:\n{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("fanout_dropped_total{") && l.contains("reason="))
            || !has_sample("fanout_dropped_total"),
        "fanout_dropped_total must carry a reason label:\n{text}"
    );
    assert_eq!(parse_metric(&text, "fanout_mqtt_connected"), Some(1.0));
    assert_eq!(parse_metric(&text, "fanout_connections"), Some(2.0));
    assert_eq!(parse_metric(&text, "fanout_users"), Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_turns_readyz_503_refuses_with_1013_and_loses_nothing() {
    let mut m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m)).await;
    let mut alice = inst.connect("alice").await;
    let mut bob = inst.connect("bob").await;
    let subs_before = m.subscribe_count(&inst.client_id(), "msg/bob");
    assert_eq!(subs_before, 1);

    m.stop();
    inst.wait_readyz(503, Duration::from_secs(10)).await;
    assert_eq!(get(inst.port, "/healthz").await.unwrap().status, 200, "healthz while broker down");

    // A message sent while the broker is away is queued and acked at once (docs/behaviour.md:
    // the publish queue has room), and delivered once the broker is back.
    let ack = alice.chat_acked("bob", json!("during outage"), "out-1").await;

    // A new connection cannot get its subscription confirmed: closed with 1013, no `connected`.
    let mut carol = Client::connect(&inst, Auth::Subprotocol(&inst.token("carol")))
        .await
        .expect("upgrade while the broker is down (spec: close 1013 afterwards, not a refusal)");
    match carol.recv_timeout(Duration::from_secs(15)).await {
        Some(tokio_tungstenite::tungstenite::Message::Close(Some(f))) => {
            assert_eq!(u16::from(f.code), 1013, "close code while the broker is down")
        }
        other => panic!("expected close 1013 while the broker is down, got {other:?}"),
    }

    m.restart();
    inst.wait_readyz(200, Duration::from_secs(20)).await;
    // Ready means every needed subscription is confirmed again: the new broker saw msg/bob.
    assert!(
        m.subscribe_count(&inst.client_id(), "msg/bob") > subs_before,
        "msg/bob not resubscribed on the restarted broker before /readyz 200"
    );
    // The acked message arrives once (the next frame is the one published after it).
    let got = bob.expect_event("chat_message").await;
    assert_eq!((&got["id"], &got["message"]), (&ack["id"], &json!("during outage")), "{got}");
    m.publish_text("msg/bob", "after restart");
    assert_eq!(bob.recv_text().await, "after restart", "bob's socket must survive the broker restart");
    assert!(inst.metric_or_zero("fanout_mqtt_reconnects_total").await >= 1.0);
}

/// A client that closes gets the server's close frame back (the closing handshake), not a
/// dropped socket that a browser would report as 1006.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_close_is_answered_with_a_close_frame() {
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    let m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m)).await;
    let mut c = inst.connect("leaver").await;
    c.ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() })).await.unwrap();
    assert_eq!(c.recv_close(Duration::from_secs(5)).await, Some(1000), "no close frame came back");
    inst.wait_metric("fanout_connections", |v| v == 0.0, Duration::from_secs(5)).await;
}

/// The test helpers themselves: a connection that dies while a test waits for silence (or a
/// frame) fails the test — "exactly once" must not pass on a dropped connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "while a frame was awaited")]
async fn waiting_for_silence_on_a_connection_that_dies_fails() {
    let m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m)).await;
    let mut c = inst.connect("doomed").await;
    drop(inst); // SIGKILL: the socket closes without a close frame
    c.expect_silence(Duration::from_secs(5), "doomed").await;
}
