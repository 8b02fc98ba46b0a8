//! `POST /api/publish` against real instances and a real Mosquitto: one, many and everyone
//! across instances with the WebSocket envelope, every refusal (401, 400, 404, 503), and the
//! OpenAPI document compared with the routes the server answers.

use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};

const KEY: &str = "api-key-for-integration-tests";

async fn publish(inst: &Instance, body: &str) -> HttpResponse {
    let auth = format!("Bearer {KEY}");
    inst.http(
        "POST",
        "/api/publish",
        &[("Authorization", &auth), ("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_reaches_one_many_and_everyone_with_the_websocket_envelope() {
    let m = Mosquitto::start();
    let a = Instance::start(InstanceOpts::broker(&m).arg("--api-key").arg(KEY)).await;
    let b = Instance::start(InstanceOpts::broker(&m)).await;
    let (alice, bob, carol, dave) = (unique("alice-"), unique("bob-"), unique("carol-"), unique("dave-"));
    let mut ca = a.connect(&alice).await;
    let mut cb = b.connect(&bob).await;
    let mut cc = a.connect(&carol).await;
    let mut cd = b.connect(&dave).await;

    // The reference: the same kind of message sent from a WebSocket.
    ca.chat_acked(&bob, json!("from a socket"), "c-1").await;
    let ws_env = cb.expect_event("chat_message").await;

    // One recipient, on the other instance.
    let r = publish(&a, &json!({"to": bob, "message": {"text": "hi bob"}}).to_string()).await;
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let id = r.json()["id"].as_str().expect("202 carries the id").to_string();
    let got = cb.expect_event("chat_message").await;
    assert_eq!(got["id"], json!(id), "{got}");
    assert_eq!(got["from"], json!("system"), "default from: {got}");
    assert_eq!(got["to"], json!(bob), "{got}");
    assert_eq!(got["message"], json!({"text": "hi bob"}), "{got}");
    assert!(got["sentAt"].as_u64().is_some_and(|t| t.abs_diff(now_millis()) < 60_000), "{got}");
    // Same fields as the socket's envelope, except the clientMessageId only a socket can give.
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().filter(|k| *k != "clientMessageId").cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&got), keys(&ws_env), "API envelope {got} vs WebSocket envelope {ws_env}");

    // A list (duplicates folded, order kept) with a custom sender, across both instances.
    let r =
        publish(&a, &json!({"to": [bob, carol, bob], "message": "invoice ready", "from": "billing"}).to_string()).await;
    assert_eq!(r.status, 202, "{r:?}");
    let id = r.json()["id"].clone();
    for c in [&mut cb, &mut cc] {
        let got = c.expect_event("chat_message").await;
        assert_eq!((&got["id"], &got["from"], &got["to"]), (&id, &json!("billing"), &json!([bob, carol])), "{got}");
    }

    // Everyone, on every instance.
    let r = publish(&a, &json!({"broadcast": true, "message": "maintenance at 5"}).to_string()).await;
    assert_eq!(r.status, 202, "{r:?}");
    let id = r.json()["id"].clone();
    for c in [&mut ca, &mut cb, &mut cc, &mut cd] {
        let got = c.expect_event("chat_message").await;
        assert_eq!((&got["id"], &got["to"], &got["message"]), (&id, &Value::Null, &json!("maintenance at 5")), "{got}");
    }
    // Each exactly once.
    for (who, c) in [("alice", &mut ca), ("bob", &mut cb), ("carol", &mut cc), ("dave", &mut cd)] {
        c.expect_silence(Duration::from_millis(300), who).await;
    }
    assert_eq!(a.metric("fanout_api_publish_requests_total{result=\"accepted\"}").await, Some(3.0));
    assert_eq!(a.metric("fanout_messages_in_total{source=\"api\"}").await, Some(3.0));
    // 1 (socket) + 3 (API) messages, each waited for room in the publish queue once.
    assert_eq!(a.metric("fanout_publish_wait_seconds_count").await, Some(4.0));
    // Every frame that came through the broker and was written counts in the latency histogram.
    let delivered = b.wait_metric("fanout_delivery_latency_seconds_count", |v| v >= 5.0, Duration::from_secs(5)).await;
    assert_eq!(delivered, 5.0, "bob: 4 + dave: 1 frames written on instance b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_401_400_and_404_never_reach_the_broker() {
    let m = Mosquitto::start();
    let a = Instance::start(InstanceOpts::broker(&m).arg("--api-key").arg(KEY).arg("--max-message-bytes").arg("4096"))
        .await;
    let body = json!({"to": "bob", "message": "x"}).to_string();

    for (what, auth) in [
        ("no header", None),
        ("wrong key", Some("Bearer api-key-for-integration-tesTS".to_string())),
        ("shorter key", Some(format!("Bearer {}", &KEY[..KEY.len() - 1]))),
        ("longer key", Some(format!("Bearer {KEY}x"))),
        ("Basic scheme", Some(format!("Basic {KEY}"))),
        ("key without scheme", Some(KEY.to_string())),
    ] {
        let h: Vec<(&str, &str)> = auth.as_deref().map(|v| vec![("Authorization", v)]).unwrap_or_default();
        let r = a.http("POST", "/api/publish", &h, body.as_bytes()).await;
        assert_eq!(r.status, 401, "{what}: {r:?}");
        assert_eq!(r.json()["error"], json!("unauthorized"), "{what}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{what}");
    }

    let many: Vec<String> = (0..101).map(|i| format!("u{i}")).collect();
    let big = json!({"to": "bob", "message": "x".repeat(5000)}).to_string();
    for (body, says) in [
        ("not json".to_string(), "not a JSON object"),
        ("{\"to\":".to_string(), "invalid JSON"),
        (json!({"to": "bob"}).to_string(), "\"message\" is required"),
        (json!({"to": 7, "message": "x"}).to_string(), "must be a string"),
        (json!({"to": "a/b", "message": "x"}).to_string(), "invalid user id"),
        (json!({"to": ["ok", "#"], "message": "x"}).to_string(), "invalid user id in \"to\"[1]"),
        (json!({"to": many, "message": "x"}).to_string(), "more than 100"),
        (json!({"to": "bob", "broadcast": true, "message": "x"}).to_string(), "not both"),
        (json!({"message": "x"}).to_string(), "say who gets"),
        (json!({"to": "bob", "message": "x", "from": "a+b"}).to_string(), "invalid user id in \"from\""),
        (big.clone(), "larger than 4096 bytes"),
    ] {
        let r = publish(&a, &body).await;
        assert_eq!(r.status, 400, "{body:.80}: {r:?}");
        let v = r.json();
        assert_eq!(v["error"], json!("bad_request"), "{v}");
        assert!(v["message"].as_str().unwrap().contains(says), "{body:.80}: expected {says:?} in {v}");
    }
    // Too large without a Content-Length: the cap holds while reading.
    let auth = format!("Bearer {KEY}");
    let chunked = [("Authorization", auth.as_str()), ("Transfer-Encoding", "chunked")];
    let r = a.http("POST", "/api/publish", &chunked, big.as_bytes()).await;
    assert_eq!(r.status, 400, "chunked: {r:?}");
    assert!(r.body.contains("larger than 4096 bytes"), "{r:?}");
    // A chunked body under the cap is fine.
    let r = a.http("POST", "/api/publish", &chunked, body.as_bytes()).await;
    assert_eq!(r.status, 202, "small chunked body: {r:?}");

    // Every request was answered; once the publish queue is empty, everything accepted has its
    // PUBACK and counts as published.
    a.wait_metric("fanout_publish_queue_messages", |v| v == 0.0, Duration::from_secs(5)).await;
    assert_eq!(a.metric("fanout_messages_published_total").await, Some(1.0), "only the last request was published");
    assert_eq!(a.metric("fanout_api_publish_requests_total{result=\"unauthorized\"}").await, Some(6.0));
    assert_eq!(a.metric("fanout_api_publish_requests_total{result=\"bad_request\"}").await, Some(12.0));

    // Without --api-key the route does not exist.
    let off = Instance::start(InstanceOpts::broker(&m)).await;
    let r = off.http("POST", "/api/publish", &[("Authorization", &auth)], body.as_bytes()).await;
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.body.contains("--api-key"), "says how to turn it on: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_answers_503_while_the_broker_link_is_down() {
    let mut m = Mosquitto::start();
    let a = Instance::start(InstanceOpts::broker(&m).arg("--api-key").arg(KEY)).await;
    let bob = unique("bob-");
    let body = json!({"to": bob, "message": "x"}).to_string();
    m.stop();
    assert_eq!(a.wait_metric("fanout_mqtt_connected", |v| v == 0.0, Duration::from_secs(10)).await, 0.0);
    let r = publish(&a, &body).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json()["error"], json!("unavailable"));
    assert_eq!(a.metric("fanout_api_publish_requests_total{result=\"unavailable\"}").await, Some(1.0));
    m.restart();
    assert_eq!(a.wait_metric("fanout_ready", |v| v == 1.0, Duration::from_secs(15)).await, 1.0);
    let mut cb = a.connect(&bob).await;
    let r = publish(&a, &body).await;
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(cb.expect_event("chat_message").await["id"], r.json()["id"]);
}

/// `(METHOD, path)` pairs of docs/openapi.json.
fn documented_routes(doc: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().unwrap().keys() {
            out.push((method.to_ascii_uppercase(), path.clone()));
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_paths_are_exactly_the_routes_the_server_answers() {
    let repo_doc = include_str!("../../docs/openapi.json");
    let doc: Value = serde_json::from_str(repo_doc).expect("docs/openapi.json is JSON");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "OpenAPI 3");
    let documented = documented_routes(&doc);

    // Every route exists on a development instance with --api-key (the dev token route only
    // exists there).
    let m = Mosquitto::start();
    let d = Instance::start(InstanceOpts::broker(&m).dev_secret().args(["--api-key", KEY])).await;
    let served = get(d.port, "/api/openapi.json").await.unwrap();
    assert_eq!(served.status, 200);
    assert_eq!(served.body, repo_doc, "the server serves the repository's file as is");

    let auth = format!("Bearer {KEY}");
    let methods = ["GET", "POST", "PUT", "DELETE"];
    let paths: std::collections::BTreeSet<&String> = documented.iter().map(|(_, p)| p).collect();
    for path in &paths {
        for method in methods {
            let query = if path.as_str() == "/dev/token" { "?user=alice" } else { "" };
            let body: &[u8] = if path.as_str() == "/api/publish" { br#"{"to":"bob","message":"x"}"# } else { b"" };
            let r = d.http(method, &format!("{path}{query}"), &[("Authorization", &auth)], body).await;
            let is_doc = documented.contains(&(method.to_string(), path.to_string()));
            if is_doc {
                assert!(
                    ![404, 405].contains(&r.status),
                    "{method} {path} is documented but answers {}: {}",
                    r.status,
                    r.body
                );
                let declared = doc["paths"][path.as_str()][method.to_ascii_lowercase()]["responses"]
                    .as_object()
                    .unwrap()
                    .contains_key(&r.status.to_string());
                assert!(declared, "{method} {path} answered {} which the document does not list", r.status);
            } else {
                assert_eq!(r.status, 405, "{method} {path} is not documented, so it should be 405: {}", r.body);
            }
        }
    }
    // Paths nobody documented are not served, whatever the method; the README's HTTP table
    // lists the same routes.
    for path in ["/nope", "/api", "/api/publish/x", "/dev", "/index.html"] {
        for method in methods {
            let r = d.http(method, path, &[("Authorization", &auth)], b"").await;
            assert_eq!(r.status, 404, "{method} {path}: {r:?}");
        }
    }
    let readme = include_str!("../../README.md");
    let mut in_readme: Vec<(String, String)> = readme
        .split("## HTTP")
        .nth(1)
        .expect("README has an HTTP section")
        .split("\n## ")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`').map(|(route, _)| route.to_string()))
        .filter_map(|r| r.split_once(' ').map(|(m, p)| (m.to_string(), p.to_string())))
        .collect();
    in_readme.sort();
    assert_eq!(in_readme, documented, "README's HTTP table and docs/openapi.json list different routes");

    // With a real secret the dev token route does not exist.
    let a = Instance::start(InstanceOpts::broker(&m)).await;
    let r = a.http("POST", "/dev/token?user=alice", &[], b"").await;
    assert_eq!(r.status, 404, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_token_route_mints_tokens_the_instance_accepts() {
    let m = Mosquitto::start();
    let d = Instance::start(InstanceOpts::broker(&m).dev_secret()).await;
    let user = unique("u-");
    let r = d.http("POST", &format!("/dev/token?user={user}&scope=broadcast&ttl=10m"), &[], b"").await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["userId"], json!(user));
    let exp = v["expiresAt"].as_u64().unwrap();
    assert!(exp.abs_diff(now_secs() + 600) <= 2, "{v}");
    let tok = v["token"].as_str().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["check-token", tok])
        .env_remove("FANOUT_JWT_SECRET")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("broadcast scope: yes"), "{said}");
    for (q, says) in [("", "?user="), ("?user=a%2Fb", "invalid user id"), ("?user=a&ttl=forever", "ttl")] {
        let r = d.http("POST", &format!("/dev/token{q}"), &[], b"").await;
        assert_eq!(r.status, 400, "{q}: {r:?}");
        assert!(r.body.contains(says), "{q}: {r:?}");
    }
}
