//! The chat page at `/` in headless Chromium: two pages on two instances chat with each other
//! through the page's own controls (paste token, connect, send), see who they are, acks, errors
//! and why a connection closed; the dev-only mint button works only with the development
//! secret; behind nginx the page's client (`/fanout-client.js`, clients/js) reconnects by itself
//! when its instance shuts down. A screenshot is saved as a test artifact:
//! target/artifacts/chat.png.

use std::path::PathBuf;
use std::time::Duration;

use crate::browser::{Browser, Page};
use crate::stack::Stack;
use crate::support::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn wait(p: &mut Page, js: &str, what: &str) {
    if !p.wait_until(js, WAIT).await {
        let log = p.eval("document.getElementById('log').innerText").await;
        panic!("{what}: `{js}` never held; page log:\n{}\nconsole: {:?}", log.as_str().unwrap_or(""), p.console);
    }
}

/// Pastes `token` and presses Connect.
async fn connect(p: &mut Page, token: &str) {
    p.eval(&format!(
        "document.getElementById('token').value = {}; document.getElementById('connect').click(); true",
        json!(token)
    ))
    .await;
}

/// Connects as `user` with a token of the tests' secret and waits until the page says who it is.
async fn sign_in(p: &mut Page, user: &str) {
    connect(p, &token(SECRET, user, 3600, None)).await;
    let me = format!("document.getElementById('me-user')?.textContent === {}", json!(user));
    wait(p, &me, &format!("{user} connected")).await;
}

/// Types a message to `to` and presses Send.
async fn send(p: &mut Page, to: &str, text: &str) {
    p.eval(&format!(
        "document.getElementById('to').value = {}; document.getElementById('message').value = {}; \
         document.getElementById('send').click(); true",
        json!(to),
        json!(text)
    ))
    .await;
}

fn last_text(class: &str) -> String {
    format!("(() => {{ const e = [...document.querySelectorAll('#log .{class}')].pop(); return e ? e.innerText : null; }})()")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_chat_pages_on_two_instances_talk_to_each_other() {
    let m = Mosquitto::start();
    let (a, b, browser) = tokio::join!(
        Instance::start(InstanceOpts::broker(&m)),
        Instance::start(InstanceOpts::broker(&m)),
        Browser::launch()
    );
    let (alice, bob) = (unique("alice-"), unique("bob-"));
    let mut pa = browser.new_page(&format!("http://127.0.0.1:{}/", a.port)).await;
    let mut pb = browser.new_page(&format!("http://127.0.0.1:{}/", b.port)).await;
    assert_eq!(pa.eval("document.title").await, json!("fanout chat"));
    // Not the development secret: no mint button, and the page says how to get a token.
    assert_eq!(pa.eval("document.getElementById('mint-box').hidden").await, json!(true));
    assert_eq!(pa.eval("document.getElementById('prod-note').hidden").await, json!(false));

    // A refused handshake (401 before the upgrade) is 1006 in a browser: the page says why.
    connect(&mut pa, &token("not-the-secret", &alice, 3600, None)).await;
    wait(&mut pa, "!!document.querySelector('#log .close[data-code=\"1006\"]')", "rejected token").await;
    let said = pa.eval(&last_text("close")).await;
    assert!(said.as_str().unwrap().contains("rejected — token invalid or expired?"), "{said}");

    // Paste good tokens, connect, and see who we are.
    sign_in(&mut pa, &alice).await;
    sign_in(&mut pb, &bob).await;
    let me = pb.eval("document.getElementById('me').innerText").await;
    assert!(me.as_str().unwrap().contains(&b.id), "bob's page shows his instance {}: {me}", b.id);
    assert!(pb.eval("document.getElementById('status').textContent").await.as_str().unwrap().contains("connected as"));

    // alice → bob, acked on alice's page, shown with sender and time on bob's.
    send(&mut pa, &bob, "hi bob, this is alice").await;
    wait(&mut pa, "!!document.querySelector('#log .msg-out.acked')", "alice's ack").await;
    wait(&mut pb, &format!("!!document.querySelector('#log .msg-in[data-from={}]')", json!(alice)), "bob receives")
        .await;
    let got = pb.eval(&last_text("msg-in")).await;
    let got = got.as_str().unwrap();
    assert!(got.contains("hi bob, this is alice") && got.contains(&alice), "{got}");
    assert!(got.contains(':'), "shows a time: {got}");
    // and back.
    send(&mut pb, &alice, "hello alice, bob here").await;
    wait(&mut pa, &format!("!!document.querySelector('#log .msg-in[data-from={}]')", json!(bob)), "alice receives")
        .await;
    wait(&mut pb, "!!document.querySelector('#log .msg-out.acked')", "bob's ack").await;
    send(&mut pa, &bob, "see you at five").await;
    wait(&mut pb, "document.querySelectorAll('#log .msg-in').length === 2", "bob's second message").await;
    wait(&mut pa, "document.querySelectorAll('#log .msg-out.acked').length === 2", "alice's second ack").await;

    // An error frame is shown, and the failed message is marked.
    send(&mut pb, "not/valid", "x").await;
    wait(&mut pb, "!!document.querySelector('#log .error[data-code=\"invalid_participant\"]')", "error frame").await;
    wait(&mut pb, "!!document.querySelector('#log .msg-out.failed')", "failed mark").await;

    // An injected (operator) message shows too.
    m.publish_text(
        &format!("msg/{bob}"),
        r#"{"event":"chat_message","data":{"from":"ops","message":"maintenance at 5"}}"#,
    );
    wait(&mut pb, "!!document.querySelector('#log .msg-in[data-from=\"ops\"]')", "injected message").await;

    let dir = artifacts();
    pa.screenshot(dir.join("chat-alice.png")).await;
    let shot = dir.join("chat.png");
    pb.screenshot(&shot).await;
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "screenshot {} is only {size} bytes", shot.display());
    eprintln!("screenshots: {} and chat-alice.png", shot.display());

    // Instance b shuts down: bob's page says what 1001 means.
    let mut b = b;
    assert!(b.terminate(Duration::from_secs(15)).await.is_some_and(|s| s.success()));
    wait(&mut pb, "!!document.querySelector('#log .close[data-code=\"1001\"]')", "1001 on shutdown").await;
    let said = pb.eval("document.querySelector('#log .close[data-code=\"1001\"]').innerText").await;
    assert!(said.as_str().unwrap().contains("instance shutting down"), "{said}");
    assert_eq!(pa.console.iter().filter(|l| l.starts_with("exception")).count(), 0, "{:?}", pa.console);
    assert_eq!(pb.console.iter().filter(|l| l.starts_with("exception")).count(), 0, "{:?}", pb.console);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mint_button_works_only_with_the_development_secret_and_expiry_shows_4001() {
    let m = Mosquitto::start();
    let (d, browser) = tokio::join!(Instance::start(InstanceOpts::broker(&m).dev_secret()), Browser::launch());
    let mut p = browser.new_page(&format!("http://127.0.0.1:{}/", d.port)).await;
    assert_eq!(p.eval("document.getElementById('mint-box').hidden").await, json!(false));
    let note = p.eval("document.getElementById('dev-note').innerText").await;
    assert!(note.as_str().unwrap().contains("development secret"), "{note}");

    let user = unique("carol-");
    p.eval(&format!(
        "document.getElementById('mint-user').value = {}; document.getElementById('mint').click(); true",
        json!(user)
    ))
    .await;
    wait(&mut p, "document.getElementById('token').value.split('.').length === 3", "minted token").await;
    p.eval("document.getElementById('connect').click(); true").await;
    wait(&mut p, &format!("document.getElementById('me-user')?.textContent === {}", json!(user)), "connected").await;
    // Talk to yourself: every connection of yours receives it.
    send(&mut p, &user, "note to self").await;
    wait(&mut p, "!!document.querySelector('#log .msg-in') && !!document.querySelector('#log .msg-out.acked')", "self")
        .await;

    // A token that expires while connected: 4001 with its meaning.
    let tok = p.eval(&format!(
        "fetch('/dev/token?user=' + encodeURIComponent({}) + '&ttl=2s', {{method: 'POST'}}).then(r => r.json()).then(j => j.token)",
        json!(user)
    ))
    .await;
    connect(&mut p, tok.as_str().unwrap()).await;
    wait(&mut p, "document.querySelectorAll('#log .info').length >= 3", "second connect").await;
    let expired = "!!document.querySelector('#log .close[data-code=\"4001\"]')";
    assert!(
        p.wait_until(expired, Duration::from_secs(15)).await,
        "no 4001: {:?}",
        p.eval("document.getElementById('log').innerText").await
    );
    let said = p.eval("document.querySelector('#log .close[data-code=\"4001\"]').innerText").await;
    assert!(said.as_str().unwrap().contains("token expired"), "{said}");
    // The client reconnects at once with a fresh token from getToken; the page's getToken has
    // only the pasted one, sees it expired, and the page stops and says so.
    wait(&mut p, "document.getElementById('status').textContent === 'token expired'", "stopped on the expired token")
        .await;
    let said = p.eval(&last_text("close")).await;
    assert!(said.as_str().unwrap().contains("mint or paste a new one"), "{said}");
    let v: Value = p.eval("window.chat.client.state").await;
    assert_eq!(v, json!("disconnected"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx_the_page_reconnects_by_itself_when_its_instance_shuts_down() {
    let (stack, browser) = tokio::join!(async { Stack::up(2) }, Browser::launch());
    // The page comes through nginx, so its WebSocket does too.
    let origin = format!("http://127.0.0.1:{}/", stack.port);
    let (alice, bob) = (unique("alice-"), unique("bob-"));
    let mut pa = browser.new_page(&origin).await;
    let mut pb = browser.new_page(&origin).await;
    let js = pa.eval("fetch('/fanout-client.js').then(r => r.headers.get('content-type'))").await;
    assert_eq!(js, json!("text/javascript; charset=utf-8"));
    sign_in(&mut pa, &alice).await;
    sign_in(&mut pb, &bob).await;
    let first = pb.eval("window.chat.client.info.instanceId").await.as_str().unwrap().to_string();
    send(&mut pa, &bob, "before the shutdown").await;
    wait(&mut pb, "document.querySelectorAll('#log .msg-in').length === 1", "bob gets the first message").await;

    // Bob's instance drains (SIGTERM): every socket is closed with 1001.
    let pid = std::fs::read_to_string(stack.dir().join(format!("fanout-{first}.pid"))).unwrap();
    let killed = std::process::Command::new("kill").arg("-TERM").arg(pid.trim()).status().unwrap();
    assert!(killed.success());
    wait(&mut pb, "!!document.querySelector('#log .close[data-code=\"1001\"]')", "1001 on shutdown").await;
    let said = pb.eval("document.querySelector('#log .close[data-code=\"1001\"]').innerText").await;
    assert!(said.as_str().unwrap().contains("reconnecting in"), "{said}");
    // Typed while the client reconnects: it waits, and goes out once connected again.
    send(&mut pb, &alice, "typed during the reconnect").await;
    let moved =
        format!("window.chat.client.state === 'connected' && window.chat.client.info.instanceId !== {}", json!(first));
    wait(&mut pb, &moved, "bob's page reconnected to the other instance").await;
    wait(&mut pb, "document.querySelectorAll('#log .msg-out.acked').length === 1", "bob's queued message acked").await;
    assert_eq!(pb.eval("document.querySelectorAll('#log .msg-out.failed').length").await, json!(0));
    wait(
        &mut pa,
        &format!("[...document.querySelectorAll('#log .msg-in')].some(e => e.dataset.from === {} && e.innerText.includes('typed during the reconnect'))", json!(bob)),
        "alice gets what bob typed during the reconnect",
    )
    .await;
    let status = pb.eval("document.getElementById('status').textContent").await;
    assert!(status.as_str().unwrap().starts_with("connected as"), "{status}");
    // And the chat goes on: alice reaches bob on his new instance.
    send(&mut pa, &bob, "after the shutdown").await;
    wait(&mut pb, "document.querySelectorAll('#log .msg-in').length === 2", "bob gets the next message").await;
    pb.screenshot(artifacts().join("chat-reconnected.png")).await;
    assert_eq!(pa.console.iter().filter(|l| l.starts_with("exception")).count(), 0, "{:?}", pa.console);
    assert_eq!(pb.console.iter().filter(|l| l.starts_with("exception")).count(), 0, "{:?}", pb.console);
}
