//! A real browser (headless Debian chromium over the DevTools protocol) runs the seed
//! tutorial's own client code against the service. Browsers abort a handshake whose 101 does
//! not echo the offered subprotocol, so this catches what non-browser clients never notice.

mod common;

use std::time::Duration;

use common::browser::Browser;
use common::*;
use serde_json::json;

/// The tutorial's client: `new WebSocket(url, token)`, every frame kept in `window.frames`.
fn open_socket_js(url: &str, token: &str) -> String {
    format!(
        r#"new Promise((resolve, reject) => {{
            window.frames_in = [];
            const ws = new WebSocket({url}, {token});
            window.ws = ws;
            ws.onmessage = (e) => window.frames_in.push(e.data);
            ws.onopen = () => resolve(ws.protocol);
            ws.onclose = (e) => reject(new Error('closed before open: ' + e.code));
            setTimeout(() => reject(new Error('no open within 10 s')), 10000);
        }})"#,
        url = json!(url),
        token = json!(token),
    )
}

/// The `sub` claim of a JWT (no verification).
fn jwt_sub(token: &str) -> String {
    use base64::Engine;
    let part = token.split('.').nth(1).unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).unwrap_or_default();
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .map(|v| v["sub"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_client_code_in_chromium_chats_between_two_pages() {
    let m = Mosquitto::start();
    let (inst, browser) = tokio::join!(Instance::start(InstanceOpts::broker(&m)), Browser::launch());
    let origin = format!("http://127.0.0.1:{}", inst.port);
    let ws_url = format!("ws://127.0.0.1:{}/entrypoint", inst.port);
    let (alice, bob) = (unique("alice-"), unique("bob-"));

    let mut pa = browser.new_page(&format!("{origin}/healthz")).await;
    let mut pb = browser.new_page(&format!("{origin}/healthz")).await;
    let proto_a = pa.eval(&open_socket_js(&ws_url, &inst.token(&alice))).await;
    let proto_b = pb.eval(&open_socket_js(&ws_url, &inst.token(&bob))).await;
    // `ws.protocol` is what the server echoed; the browser opened the socket only because it
    // is one of the offered values.
    for (who, proto) in [(&alice, &proto_a), (&bob, &proto_b)] {
        let p = proto.as_str().unwrap_or_default();
        assert!(p.split('.').count() == 3 && jwt_sub(p) == *who, "{who}: echoed subprotocol {proto}");
    }

    // Both pages see `connected` (the subscription is confirmed) before anyone sends.
    for p in [&mut pa, &mut pb] {
        assert!(
            p.wait_until("window.frames_in.some(f => JSON.parse(f).event === 'connected')", Duration::from_secs(10))
                .await,
            "no connected frame; console: {:?}",
            p.console
        );
    }
    pa.eval(&format!(
        "ws.send(JSON.stringify({{event: 'send_chat_message_to_participant', data: {{message: 'test', participantId: {}}}}})); true",
        json!(bob)
    ))
    .await;
    assert!(
        pb.wait_until("window.frames_in.some(f => JSON.parse(f).event === 'chat_message')", Duration::from_secs(10))
            .await,
        "bob's page got no chat_message; frames: {}",
        pb.eval("JSON.stringify(window.frames_in)").await
    );
    let got: serde_json::Value = serde_json::from_str(
        pb.eval("window.frames_in.find(f => JSON.parse(f).event === 'chat_message')").await.as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(got["data"]["message"], json!("test"));
    assert_eq!(got["data"]["from"], json!(alice));
    assert_eq!(got["data"]["to"], json!(bob));
    let shot = std::env::temp_dir().join("fanout-e2e-browser.png");
    pb.screenshot(&shot).await;
    assert!(std::fs::metadata(&shot).map(|m| m.len() > 100).unwrap_or(false));
}
