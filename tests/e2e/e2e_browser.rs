//! A real browser (headless Debian chromium over the DevTools protocol) runs the seed
//! tutorial's own client code against the service. Browsers abort a handshake whose 101 does
//! not echo the offered subprotocol, so this catches what non-browser clients never notice.

use std::time::Duration;

use crate::browser::Browser;
use crate::stack::Stack;
use crate::support::*;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_client_code_in_chromium_chats_between_two_pages_through_nginx() {
    let (stack, browser) = tokio::join!(async { Stack::up(2) }, Browser::launch());
    // Pages of the service's origin, served through nginx like the WebSocket itself.
    let origin = format!("http://127.0.0.1:{}", stack.port);
    let ws_url = stack.ws_url();
    let (alice, bob) = (unique("alice-"), unique("bob-"));
    let (ta, tb) = (token(SECRET, &alice, 3600, None), token(SECRET, &bob, 3600, None));

    let mut pa = browser.new_page(&format!("{origin}/healthz")).await;
    let mut pb = browser.new_page(&format!("{origin}/healthz")).await;
    let proto_a = pa.eval(&open_socket_js(&ws_url, &ta)).await;
    let proto_b = pb.eval(&open_socket_js(&ws_url, &tb)).await;
    // `ws.protocol` is what the server echoed; the browser opened the socket only because it
    // is the offered value.
    assert_eq!(proto_a, json!(ta), "alice's echoed subprotocol");
    assert_eq!(proto_b, json!(tb), "bob's echoed subprotocol");

    // Both pages see `connected` (the subscription is confirmed) before anyone sends.
    for p in [&mut pa, &mut pb] {
        assert!(
            p.wait_until("window.frames_in.some(f => JSON.parse(f).event === 'connected')", Duration::from_secs(10))
                .await,
            "no connected frame; console: {:?}",
            p.console
        );
    }
    // The seed tutorial's send, verbatim apart from the recipient.
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
    assert_eq!(got["data"]["message"], json!("test"), "{got}");
    assert_eq!(got["data"]["from"], json!(alice), "{got}");
    assert_eq!(got["data"]["to"], json!(bob), "{got}");
    assert!(
        pa.wait_until("window.frames_in.some(f => JSON.parse(f).event === 'ack')", Duration::from_secs(10)).await,
        "alice's page got no ack: {}",
        pa.eval("JSON.stringify(window.frames_in)").await
    );
    let shot = stack.dir().join("bob-page.png");
    pb.screenshot(&shot).await;
    assert!(std::fs::metadata(&shot).map(|m| m.len() > 100).unwrap_or(false));

    // Control: the browser really enforces the echo. Offer a subprotocol the server does not
    // take (the token travels in ?token= instead): the server upgrades without echoing one,
    // and Chromium must abort the handshake, which a non-browser client would not notice.
    let mut pc = browser.new_page(&format!("{origin}/healthz")).await;
    let outcome = pc
        .eval(&format!(
            r#"new Promise((resolve) => {{
                const ws = new WebSocket({url} + '?token=' + {tok}, 'chat');
                ws.onopen = () => resolve('open');
                ws.onclose = (e) => resolve('closed ' + e.code);
                setTimeout(() => resolve('timeout'), 10000);
            }})"#,
            url = json!(ws_url),
            tok = json!(ta)
        ))
        .await;
    assert_eq!(outcome, json!("closed 1006"), "a 101 without the offered subprotocol must fail in a browser");
}
