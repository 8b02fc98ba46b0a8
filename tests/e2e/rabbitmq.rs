//! fanout on a 3-node RabbitMQ cluster (scripts/rabbitmq.sh; MQTT plugin, persistent sessions
//! on quorum queues): every routing case across nodes, and the loss of the node an instance
//! uses while traffic flows. Each test starts its own cluster (~30 s on the 2-core machine).

use std::time::{Duration, Instant};

use crate::peer::*;
use crate::rabbit::RabbitCluster;
use crate::support::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

fn on(cluster: &RabbitCluster, node: usize) -> InstanceOpts {
    unlimited(InstanceOpts::url(&cluster.urls_from(node)))
}

fn node_of(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body).unwrap()["broker"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_routing_case_works_across_the_nodes_of_a_rabbitmq_cluster() {
    let cluster = RabbitCluster::start(3);
    let (a, b, c) = tokio::join!(
        Instance::start(on(&cluster, 0)),
        Instance::start(on(&cluster, 1)),
        Instance::start(on(&cluster, 2))
    );
    for (inst, node) in [(&a, 0), (&b, 1), (&c, 2)] {
        let body = get(inst.port, "/readyz").await.unwrap().body;
        assert_eq!(node_of(&body), format!("127.0.0.1:{}", cluster.mqtt_ports[node]), "{body}");
    }
    let mut alice = Peer::connect(&a, "alice").await;
    let mut bob = Peer::connect(&b, "bob").await;
    let carol = Peer::connect(&c, "carol").await;
    // One user's devices on the three nodes.
    let dave = [Peer::connect(&a, "dave").await, Peer::connect(&b, "dave").await, Peer::connect(&c, "dave").await];
    let mut admin =
        Peer::from_client(Client::connect_ok(&c, Auth::Subprotocol(&c.broadcast_token("admin"))).await, "admin");

    // One to one, node 1 → node 2.
    alice.send_to("bob", "one").await;
    wait_until("bob gets one", Duration::from_secs(10), || bob.events("chat_message").len() == 1).await;
    // To many, node 2 → nodes 1, 3 and all three of dave's.
    let many = json!({"event": "send_chat_message_to_many_participants",
        "data": {"participantIds": ["alice", "carol", "dave"], "message": "many", "clientMessageId": "many"}});
    bob.sink.send(Message::text(many.to_string())).await.unwrap();
    // A broadcast from node 3 reaches every connection on every node.
    let all =
        json!({"event": "send_chat_message_to_all_participants", "data": {"message": "all", "clientMessageId": "all"}});
    admin.sink.send(Message::text(all.to_string())).await.unwrap();
    // Injected on a node other than the recipient's instance's.
    cluster.publish_text(1, "msg/alice", r#"{"event":"chat_message","data":{"from":"ops","message":"injected"}}"#);
    cluster.publish_text(0, "msg/dave", r#"{"event":"chat_message","data":{"from":"ops","message":"injected"}}"#);

    let messages = |p: &Peer| -> Vec<String> {
        let mut v: Vec<String> =
            // A text message, or the `seq` of Peer::send_to's object message.
            p.events("chat_message").iter().map(|d| d["message"].as_str().or(d["message"]["seq"].as_str()).unwrap_or("").to_string()).collect();
        v.sort();
        v
    };
    wait_until("every delivery", Duration::from_secs(15), || {
        messages(&alice).len() == 3 && messages(&carol).len() == 2 && dave.iter().all(|d| messages(d).len() == 3)
    })
    .await;
    assert_eq!(messages(&alice), ["all", "injected", "many"]);
    assert_eq!(messages(&bob), ["all", "one"]);
    assert_eq!(messages(&carol), ["all", "many"]);
    for d in &dave {
        assert_eq!(messages(d), ["all", "injected", "many"], "one of dave's devices");
    }
    assert_eq!(messages(&admin), ["all"]);
    for p in [&alice, &bob, &carol, &admin] {
        assert_no_duplicates(p);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_node_an_instance_uses_moves_it_to_another_and_loses_no_acked_message() {
    let cluster = RabbitCluster::start(3);
    let a = Instance::start(on(&cluster, 0)).await;
    let b = Instance::start(on(&cluster, 1)).await;
    let mut alice = Peer::connect(&a, "alice").await;
    let mut bob = Peer::connect(&b, "bob").await;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (alice_close, bob_close) = (alice.close.clone(), bob.close.clone());
    let chaos = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.kill(0);
        let t0 = Instant::now();
        let down = a.wait_readyz(503, Duration::from_secs(10)).await;
        let back = a.wait_readyz(200, Duration::from_secs(60)).await;
        let moved = node_of(&get(a.port, "/readyz").await.unwrap().body);
        // Keep chatting a while on the new node.
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (down, back, t0.elapsed(), moved)
    };
    let every = Duration::from_millis(20);
    let (sent_a, sent_b, (down, back, _, moved)) = tokio::join!(
        traffic(&mut alice, "bob", "a-", every, &stop),
        traffic(&mut bob, "alice", "b-", every, &stop),
        chaos
    );
    assert_ne!(moved, format!("127.0.0.1:{}", cluster.mqtt_ports[0]), "still on the dead node");
    wait_until("every message answered", Duration::from_secs(30), || {
        alice.events("ack").len() + alice.events("error").len() == sent_a
            && bob.events("ack").len() + bob.events("error").len() == sent_b
    })
    .await;
    let (acked_a, acked_b) = (alice.acks().len(), bob.acks().len());
    wait_until("every acked message delivered", Duration::from_secs(30), || {
        bob.received_ids().len() >= acked_a && alice.received_ids().len() >= acked_b
    })
    .await;
    let n1 = assert_acked_delivered_once(&alice, &bob, "a-");
    let n2 = assert_acked_delivered_once(&bob, &alice, "b-");
    assert_no_duplicates(&alice);
    assert_no_duplicates(&bob);
    assert_eq!(*alice_close.lock(), None, "alice was disconnected");
    assert_eq!(*bob_close.lock(), None, "bob was disconnected");
    let errors = alice.events("error").len() + bob.events("error").len();
    eprintln!(
        "node loss: instance a 503 after {down:?}, ready again on {moved} {back:?} later; {n1} + {n2} acked messages delivered once, {errors} errors"
    );
}

/// Sends to `to` every `every` until `stop`; returns how many were sent.
async fn traffic(p: &mut Peer, to: &str, prefix: &str, every: Duration, stop: &std::sync::atomic::AtomicBool) -> usize {
    let mut i = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        p.send_to(to, &format!("{prefix}{i:05}")).await;
        i += 1;
        tokio::time::sleep(every).await;
    }
    i
}
