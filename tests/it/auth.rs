//! Authentication at the WebSocket upgrade: the three token locations, subprotocol echo, every
//! refusal of docs/protocol.md §2 as a 401 without upgrade, the `fanout token` command, and `from` spoofing.

use std::process::Command;

use crate::support::*;
use serde_json::{json, Value};

/// Every token of docs/protocol.md §2.3 that must be refused, with a name for the failure message.
fn bad_tokens() -> Vec<(&'static str, Option<String>)> {
    let now = now_secs() as i64;
    let ok = |sub: &str| json!({"sub": sub, "iat": now, "exp": now + 3600});
    let mut no_sub = ok("x");
    no_sub.as_object_mut().unwrap().remove("sub");
    let mut no_exp = ok("alice");
    no_exp.as_object_mut().unwrap().remove("exp");
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &ok("alice"),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap();
    vec![
        ("missing token", None),
        ("garbage", Some("not-a-jwt".to_string())),
        ("bad signature", Some(sign("some-other-secret", &ok("alice")))),
        ("alg none", Some(unsigned_token(&ok("alice")))),
        ("alg HS512", Some(hs512)),
        ("expired", Some(sign(SECRET, &json!({"sub": "alice", "iat": now - 600, "exp": now - 60})))),
        ("no exp", Some(sign(SECRET, &no_exp))),
        ("no sub", Some(sign(SECRET, &no_sub))),
        ("sub #", Some(sign(SECRET, &ok("#")))),
        ("sub +", Some(sign(SECRET, &ok("+")))),
        ("sub a/b", Some(sign(SECRET, &ok("a/b")))),
        ("sub empty", Some(sign(SECRET, &ok("")))),
        ("sub control char", Some(sign(SECRET, &ok("a\u{7}b")))),
        ("sub 257 bytes", Some(sign(SECRET, &ok(&"x".repeat(257))))),
        ("sub not a string", Some(sign(SECRET, &json!({"sub": 42, "iat": now, "exp": now + 3600})))),
        (
            "nbf in the future",
            Some(sign(SECRET, &json!({"sub": "alice", "iat": now, "nbf": now + 120, "exp": now + 3600}))),
        ),
    ]
}

/// An unsigned `alg: none` token.
pub fn unsigned_token(claims: &Value) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64.encode(serde_json::to_vec(claims).unwrap());
    format!("{header}.{payload}.")
}

fn assert_unauthorized(r: &HttpResponse, what: &str) {
    assert_eq!(r.status, 401, "{what}: expected 401, got {} {:?} body {}", r.status, r.headers, r.body);
    assert!(r.header("sec-websocket-accept").is_none(), "{what}: refusal carries an upgrade header");
    let v: Value =
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{what}: 401 body is not JSON ({e}): {:?}", r.body));
    assert_eq!(v["error"], json!("unauthorized"), "{what}: body {v}");
    assert!(v["message"].as_str().is_some_and(|s| !s.is_empty()), "{what}: body must say why in `message`: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_token_is_refused_with_401_in_every_location() {
    let m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m)).await;
    for (what, tok) in bad_tokens() {
        match tok {
            None => {
                let r = upgrade_attempt(inst.port, "/entrypoint", &[]).await;
                assert_unauthorized(&r, what);
            }
            Some(t) => {
                let sub = upgrade_attempt(inst.port, "/entrypoint", &[("Sec-WebSocket-Protocol", &t)]).await;
                assert_unauthorized(&sub, &format!("{what} (subprotocol)"));
                let bearer_sub =
                    upgrade_attempt(inst.port, "/entrypoint", &[("Sec-WebSocket-Protocol", &format!("bearer, {t}"))])
                        .await;
                assert_unauthorized(&bearer_sub, &format!("{what} (bearer subprotocol)"));
                let q = upgrade_attempt(inst.port, &format!("/entrypoint?token={t}"), &[]).await;
                assert_unauthorized(&q, &format!("{what} (query)"));
                let h = upgrade_attempt(inst.port, "/entrypoint", &[("Authorization", &format!("Bearer {t}"))]).await;
                assert_unauthorized(&h, &format!("{what} (Authorization header)"));
            }
        }
    }
    // Nothing was accepted and nothing subscribed for the refused users.
    assert_eq!(inst.metric_or_zero("fanout_connections").await, 0.0);
    let subs = m.subscriptions_of(&inst.client_id());
    assert!(subs.iter().all(|f| !f.starts_with("msg/")), "refused tokens caused subscriptions: {subs:?}");
    // The tungstenite client sees a refusal too.
    assert!(Client::connect(&inst, Auth::Query("not-a-jwt")).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_accepted_in_each_location_and_subprotocol_is_echoed() {
    let m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m)).await;
    let exp = now_secs() + 3600;
    let t = sign(SECRET, &json!({"sub": "alice", "iat": now_secs(), "exp": exp}));

    // Raw handshake: exactly the offered token comes back, once.
    let r = upgrade_attempt(inst.port, "/entrypoint", &[("Sec-WebSocket-Protocol", &t)]).await;
    assert_eq!(r.status, 101, "raw upgrade with subprotocol token: {r:?}");
    let echoed: Vec<&str> =
        r.headers.iter().filter(|(k, _)| k == "sec-websocket-protocol").map(|(_, v)| v.as_str()).collect();
    assert_eq!(echoed, vec![t.as_str()], "101 must echo exactly the token");
    let r = upgrade_attempt(inst.port, "/entrypoint", &[("Sec-WebSocket-Protocol", &format!("bearer, {t}"))]).await;
    assert_eq!(r.status, 101, "raw upgrade with bearer subprotocol: {r:?}");
    let echoed: Vec<&str> =
        r.headers.iter().filter(|(k, _)| k == "sec-websocket-protocol").map(|(_, v)| v.as_str()).collect();
    assert_eq!(echoed, vec!["bearer"], "101 must echo only `bearer`");

    let c = Client::connect_ok(&inst, Auth::Subprotocol(&t)).await;
    assert_eq!(c.protocol.as_deref(), Some(t.as_str()));
    let d = &c.connected;
    assert_eq!(d["userId"], json!("alice"), "connected: {d}");
    assert_eq!(d["instanceId"], json!(inst.id), "connected: {d}");
    assert_eq!(d["expiresAt"], json!(exp), "connected: {d}");
    uuid::Uuid::parse_str(d["connectionId"].as_str().unwrap_or_default())
        .unwrap_or_else(|e| panic!("connectionId is not a UUID ({e}): {d}"));

    let c2 = Client::connect_ok(&inst, Auth::BearerSubprotocol(&t)).await;
    assert_eq!(c2.protocol.as_deref(), Some("bearer"));
    assert_ne!(c2.connected["connectionId"], c.connected["connectionId"], "each connection gets its own id");

    let c3 = Client::connect_ok(&inst, Auth::Query(&t)).await;
    assert_eq!(c3.connected["userId"], json!("alice"));
    assert!(c3.protocol.is_none(), "no subprotocol offered, none may be echoed");
    let c4 = Client::connect_ok(&inst, Auth::Header(&t)).await;
    assert_eq!(c4.connected["userId"], json!("alice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_login_token_with_email_claim_is_accepted() {
    let m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m)).await;
    let now = now_secs();
    let t = sign(SECRET, &json!({"sub": "42", "email": "a@example.com", "iat": now, "exp": now + 600}));
    let c = Client::connect_ok(&inst, Auth::Query(&t)).await;
    assert_eq!(c.connected["userId"], json!("42"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_command_mints_a_usable_broadcast_token() {
    let m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m)).await;
    let out = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["token", "carol", "--ttl", "1h", "--scope", "broadcast"])
        .env("FANOUT_JWT_SECRET", SECRET)
        .output()
        .expect("run fanout token");
    assert!(out.status.success(), "fanout token failed: {}", String::from_utf8_lossy(&out.stderr));
    let t = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(t.split('.').count(), 3, "stdout is not a JWT: {t:?}");

    let mut carol = Client::connect_ok(&inst, Auth::Subprotocol(&t)).await;
    assert_eq!(carol.connected["userId"], json!("carol"));
    let exp = carol.connected["expiresAt"].as_u64().expect("expiresAt");
    let now = now_secs();
    assert!(exp > now + 3500 && exp <= now + 3601, "--ttl 1h gave expiresAt {exp} (now {now})");
    carol.emit("send_chat_message_to_all_participants", json!({"message": "hello all", "clientMessageId": "x"})).await;
    // Allowed to broadcast: acked, and (docs/behaviour.md) the broadcast reaches the sender too.
    let (first, second) = (carol.recv_json().await, carol.recv_json().await);
    let mut events = [first["event"].as_str().unwrap_or("?"), second["event"].as_str().unwrap_or("?")];
    events.sort();
    assert_eq!(events, ["ack", "chat_message"], "{first} {second}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_from_is_ignored() {
    let m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m)).await;
    let mut alice = inst.connect("alice").await;
    let mut bob = inst.connect("bob").await;
    alice
        .send_json(&json!({
            "event": "send_chat_message_to_participant",
            "from": "mallory",
            "data": {"participantId": "bob", "message": "trust me", "from": "mallory", "userId": "mallory"}
        }))
        .await;
    let got = bob.expect_event("chat_message").await;
    assert_eq!(got["from"], json!("alice"), "from must be the verified sender: {got}");
    alice.expect_event("ack").await;
}

#[test]
fn check_token_command_accepts_and_rejects() {
    let run = |t: &str| {
        Command::new(env!("CARGO_BIN_EXE_fanout"))
            .args(["check-token", t])
            .env("FANOUT_JWT_SECRET", SECRET)
            .output()
            .expect("run fanout check-token")
    };
    let good = run(&token(SECRET, "alice", 600, None));
    assert_eq!(good.status.code(), Some(0), "valid token: {}", String::from_utf8_lossy(&good.stdout));
    for (what, t) in bad_tokens() {
        let Some(t) = t else { continue };
        let out = run(&t);
        assert_eq!(out.status.code(), Some(1), "{what}: check-token must exit 1");
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!said.trim().is_empty(), "{what}: check-token must say why");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_without_an_upgrade_gets_426_and_an_invalid_one_401() {
    let m = Mosquitto::start();
    let inst = Instance::start(InstanceOpts::broker(&m)).await;
    let t = inst.token("alice");
    let bearer = format!("Bearer {t}");
    // Plain GETs (the probe of docs/protocol.md §2.5), and an upgrade that lacks its key.
    let not_upgrades: [(&str, Vec<(&str, &str)>); 4] = [
        ("/entrypoint", vec![("Authorization", bearer.as_str())]),
        ("/entrypoint", vec![("Sec-WebSocket-Protocol", t.as_str())]),
        (&format!("/entrypoint?token={t}"), vec![]),
        (
            "/entrypoint",
            vec![
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Version", "13"),
                ("Authorization", &bearer),
            ],
        ),
    ];
    for (path, headers) in &not_upgrades {
        let r = inst.http("GET", path, headers, b"").await;
        assert_eq!(r.status, 426, "{headers:?}: {r:?}");
        assert_eq!(r.json(), json!({"error": "upgrade_required", "message": "this endpoint speaks WebSocket only"}));
    }
    // Authentication comes first: a bad token without an upgrade is 401, not 426.
    let r = inst.http("GET", "/entrypoint", &[("Authorization", "Bearer not.a.token")], b"").await;
    assert_unauthorized(&r, "bad token, no upgrade");
    assert_eq!(inst.metric_or_zero("fanout_connections").await, 0.0);
}
