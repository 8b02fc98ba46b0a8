//! The edges a hostile review of the ack promise found (issue 10, second round): a publish the
//! broker refuses, an oversized injected message, a black-holed link, HTTP clients that send
//! huge heads or never read, acked messages that cannot reach the broker before shutdown ends,
//! and a broker list to fail over through. Real Mosquittos, real sockets.

use std::time::{Duration, Instant};

use crate::peer::*;
use crate::proxy::FaultProxy;
use crate::support::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_broker_refuses_is_set_aside_and_the_messages_behind_it_go_on() {
    // The broker drops any client that sends a packet over 20,000 bytes.
    let m = Mosquitto::with_config(&format!("{}max_packet_size 20000\n", mosquitto::TEST_CONFIG));
    let a = Instance::start(unlimited(InstanceOpts::broker(&m))).await;
    let b = Instance::start(InstanceOpts::broker(&m)).await;
    let mut alice = Peer::connect(&a, "alice").await;
    let bob = Peer::connect(&b, "bob").await;
    let carol = Peer::connect(&b, "carol").await;
    let big = json!({"event": "send_chat_message_to_participant",
        "data": {"participantId": "bob", "message": "x".repeat(30_000), "clientMessageId": "big"}});
    alice.sink.send(Message::text(big.to_string())).await.unwrap();
    for i in 0..5 {
        alice.send_to("carol", &format!("small-{i}")).await;
    }
    wait_until("six acks", Duration::from_secs(10), || alice.events("ack").len() == 6).await;
    // The link drops each time the big one is written; after eight strikes it is set aside and
    // the five behind it arrive, in order.
    wait_until("carol gets the five", Duration::from_secs(30), || carol.events("chat_message").len() == 5).await;
    let got: Vec<String> =
        carol.events("chat_message").iter().map(|d| d["clientMessageId"].as_str().unwrap().to_string()).collect();
    assert_eq!(got, (0..5).map(|i| format!("small-{i}")).collect::<Vec<_>>());
    assert!(bob.events("chat_message").is_empty());
    assert_eq!(a.metric_or_zero("fanout_dropped_total{reason=\"broker_refused\"}").await, 1.0);
    assert!(a.output().contains("set aside"), "{}", a.output());
    a.wait_readyz(200, Duration::from_secs(10)).await;
    // Few reconnects: the backoff was not reset by each short-lived link.
    let connects = m.connect_count(&a.client_id());
    assert!(connects <= 20, "{connects} connects of the instance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_injected_message_does_not_put_the_receiver_in_a_reconnect_loop() {
    let m = Mosquitto::start();
    let a = Instance::start(InstanceOpts::broker(&m)).await;
    let alice = Peer::connect(&a, "alice").await;
    // 3 MB: above anything fanout itself publishes, and above rumqttc's old 2 MiB limit.
    let huge = format!(r#"{{"event":"chat_message","data":{{"from":"ops","message":"{}"}}}}"#, "y".repeat(3 << 20));
    m.publish_bytes("msg/alice", huge.as_bytes());
    m.publish_text("msg/alice", r#"{"event":"chat_message","data":{"from":"ops","message":"after"}}"#);
    wait_until("alice gets both", Duration::from_secs(20), || alice.events("chat_message").len() == 2).await;
    assert_eq!(alice.events("chat_message")[1]["message"], json!("after"));
    assert_eq!(m.connect_count(&a.client_id()), 2, "wipe + persistent connect only: no reconnect loop");
    assert_eq!(readyz(&a).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_link_turns_readyz_503_within_the_broker_timeout() {
    let m = Mosquitto::start();
    let proxy = FaultProxy::start(m.port()).await;
    let a = Instance::start(InstanceOpts::url(&proxy.url()).args(["--broker-timeout", "1s"])).await;
    let mut alice = Peer::connect(&a, "alice").await;
    proxy.stall();
    let t0 = Instant::now();
    // A message in flight that the broker never answers shows the stall (keep-alive would take
    // up to 20 s).
    alice.send_to("bob", "into-the-void").await;
    let took = a.wait_readyz(503, Duration::from_secs(5)).await;
    let body = get(a.port, "/readyz").await.unwrap().body;
    assert!(body.contains("broker not answering"), "{body}");
    assert!(t0.elapsed() < Duration::from_secs(4), "503 after {took:?}");
    proxy.heal();
    a.wait_readyz(200, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_request_heads_are_bounded_in_bytes_and_a_client_that_never_reads_is_cut_off() {
    let m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m)).await;
    // A 40 KB header: refused by hyper with 431 before fanout reads it.
    let r = http(inst.port, "GET", "/healthz", &[("X-Big", &"h".repeat(40_000))], b"").await;
    assert!(matches!(r.as_ref().map(|r| r.status), Ok(431) | Err(_)), "{r:?}");
    // 300 pipelined requests for the chat page (~10 KB each) from a client with a tiny
    // receive buffer that does not read: the server's writes stall, and after the 10 s write
    // deadline the connection is dropped rather than held.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(([127, 0, 0, 1], inst.port).into()).await.unwrap();
    let req = "GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(300);
    s.write_all(req.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(13)).await;
    let mut got = 0usize;
    let mut buf = vec![0u8; 65536];
    let read_all = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read_all).await.expect("connection still open");
    let page = get(inst.port, "/").await.unwrap().body.len();
    assert!(got < 300 * page, "the whole pipeline was answered ({got} bytes): no write deadline");
    assert_eq!(get(inst.port, "/healthz").await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_lost_at_the_end_of_the_shutdown_grace_make_the_exit_status_say_so() {
    let m = Mosquitto::start();
    let proxy = FaultProxy::start(m.port()).await;
    let mut a = Instance::start(unlimited(InstanceOpts::url(&proxy.url())).args(["--shutdown-grace", "1s"])).await;
    let mut alice = Peer::connect(&a, "alice").await;
    proxy.cut();
    a.wait_readyz(503, Duration::from_secs(5)).await;
    for i in 0..5 {
        alice.send_to("bob", &format!("doomed-{i}")).await;
    }
    wait_until("five acks", Duration::from_secs(5), || alice.events("ack").len() == 5).await;
    let t0 = Instant::now();
    let st = a.terminate(Duration::from_secs(15)).await.expect("no exit");
    assert_eq!(st.code(), Some(1), "exit status {st:?}: acked messages were dropped");
    assert!(t0.elapsed() < Duration::from_secs(8), "took {:?}", t0.elapsed());
    let out = a.output();
    assert!(out.contains("5 accepted publishes never reached the broker"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_broker_urls_the_instance_moves_to_the_second_when_the_first_dies() {
    // Two independent Mosquittos stand in for two nodes (a real cluster: tests/rabbitmq.rs).
    let mut first = Mosquitto::start();
    let second = Mosquitto::start();
    let urls = format!("{},{}", first.url(), second.url());
    let a = Instance::start(InstanceOpts::url(&urls)).await;
    let alice = Peer::connect(&a, "alice").await;
    let ready = get(a.port, "/readyz").await.unwrap().body;
    assert!(ready.contains(&format!("\"broker\":\"127.0.0.1:{}\"", first.port())), "{ready}");
    let node = |p: u16| format!("fanout_mqtt_broker{{broker=\"127.0.0.1:{p}\"}}");
    assert_eq!(a.metric(&node(first.port())).await, Some(1.0));
    first.stop();
    let t0 = Instant::now();
    wait_until_async("ready on the second broker", Duration::from_secs(10), || async {
        get(a.port, "/readyz")
            .await
            .is_ok_and(|r| r.status == 200 && r.body.contains(&format!("\"broker\":\"127.0.0.1:{}\"", second.port())))
    })
    .await;
    let took = t0.elapsed();
    assert_eq!(a.metric(&node(second.port())).await, Some(1.0));
    assert_eq!(a.metric(&node(first.port())).await, None);
    // alice stayed connected, and is subscribed on the second broker now.
    assert_eq!(second.subscribe_count(&a.client_id(), "msg/alice"), 1);
    second.publish_text("msg/alice", r#"{"event":"chat_message","data":{"from":"ops","message":"moved"}}"#);
    wait_until("alice hears through the second broker", Duration::from_secs(5), || {
        alice.events("chat_message").len() == 1
    })
    .await;
    assert_eq!(alice.closed(), None);
    assert!(a.output().contains("broker link restored"), "{}", a.output());
    eprintln!("failover to the second broker: ready again {took:?} after the first died");
}
