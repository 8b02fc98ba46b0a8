//! A tiny Chrome DevTools Protocol driver for Debian's `chromium`, so integration tests can run
//! real browser code (WebSocket handshakes, pages, screenshots) without Node.js or extra crates.
//!
//! ```ignore
//! let browser = Browser::launch().await;              // headless chromium, killed on drop
//! let mut page = browser.new_page("http://127.0.0.1:3000/").await; // waits for `load`
//! let v = page.eval("1 + 1").await;                   // Runtime.evaluate, awaitPromise
//! assert_eq!(v, serde_json::json!(2));
//! page.screenshot("/tmp/page.png").await;            // Page.captureScreenshot (PNG)
//! ```
//!
//! `eval` returns the value of the expression (promises are awaited) as JSON via
//! `returnByValue`; a thrown exception or rejected promise panics with its description and the
//! page's console output (`try_eval` returns it as `Err` instead). Console output and uncaught
//! exceptions are collected in [`Page::console`].
//!
//! Chromium is found as `$CHROMIUM`, `chromium`, `chromium-browser`, `google-chrome` (in that
//! order); `scripts/test.sh` installs Debian's `chromium`.

use std::collections::VecDeque;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::support::{find_program, owned_command};

/// How long chromium may take to start and write `DevToolsActivePort`.
pub const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Default deadline for one CDP command (an `eval` that awaits a promise included).
pub const CDP_TIMEOUT: Duration = Duration::from_secs(30);

type CdpSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The chromium executable (`$CHROMIUM` first).
pub fn chromium_path() -> PathBuf {
    match std::env::var_os("CHROMIUM") {
        Some(p) => PathBuf::from(p),
        None => find_program(&["chromium", "chromium-browser", "google-chrome"]),
    }
}

/// A headless chromium with its own profile directory. The whole process group is killed on
/// drop.
pub struct Browser {
    child: Option<Child>,
    dir: TempDir,
    /// The DevTools HTTP/WebSocket port (chosen by chromium: `--remote-debugging-port=0`).
    pub port: u16,
    /// Path of the browser-level DevTools WebSocket, `/devtools/browser/<id>`.
    browser_path: String,
}

impl Browser {
    pub async fn launch() -> Browser {
        let dir = tempfile::tempdir().expect("tempdir");
        let profile = dir.path().join("profile");
        fs::create_dir_all(&profile).unwrap();
        let stderr = fs::File::create(dir.path().join("chromium.stderr")).unwrap();
        let mut cmd = owned_command(chromium_path());
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--window-size=1280,800",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
        {
            // Own process group, so drop can end chromium's helper processes too.
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", chromium_path().display()));
        let mut b = Browser { child: Some(child), dir, port: 0, browser_path: String::new() };
        let active = profile.join("DevToolsActivePort");
        let deadline = Instant::now() + LAUNCH_TIMEOUT;
        loop {
            if let Ok(text) = fs::read_to_string(&active) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    if let Ok(port) = port.trim().parse::<u16>() {
                        b.port = port;
                        b.browser_path = path.trim().to_string();
                        return b;
                    }
                }
            }
            if let Some(Ok(Some(status))) = b.child.as_mut().map(|c| c.try_wait()) {
                panic!("chromium exited at start ({status}); stderr:\n{}", b.stderr());
            }
            if Instant::now() > deadline {
                panic!("chromium wrote no DevToolsActivePort within {LAUNCH_TIMEOUT:?}; stderr:\n{}", b.stderr());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// What chromium printed on stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.dir.path().join("chromium.stderr")).unwrap_or_default()
    }

    async fn connect(&self, path: &str) -> CdpSocket {
        let url = format!("ws://127.0.0.1:{}{}", self.port, path);
        let (ws, _) = tokio::time::timeout(CDP_TIMEOUT, tokio_tungstenite::connect_async(url.as_str()))
            .await
            .unwrap_or_else(|_| panic!("DevTools connect to {url} timed out"))
            .unwrap_or_else(|e| panic!("DevTools connect to {url}: {e}"));
        ws
    }

    /// Opens a new tab, attaches to it, and navigates to `url` (waits for its `load` event).
    pub async fn new_page(&self, url: &str) -> Page {
        let mut browser = Cdp::new(self.connect(&self.browser_path).await);
        let created = browser
            .call("Target.createTarget", json!({"url": "about:blank"}), CDP_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("Target.createTarget: {e}"));
        let target_id = created["targetId"].as_str().expect("targetId").to_string();
        let _ = browser.ws.close(None).await;
        let cdp = Cdp::new(self.connect(&format!("/devtools/page/{target_id}")).await);
        let mut page = Page { cdp, console: Vec::new() };
        page.call("Page.enable", json!({})).await.expect("Page.enable");
        page.call("Runtime.enable", json!({})).await.expect("Runtime.enable");
        if url != "about:blank" {
            page.goto(url).await;
        }
        page
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // The child leads its own process group (process_group(0)): end the whole group.
            // `--` is essential: procps `kill -KILL -<pgid>` parses `-<pgid>` as an option and
            // signals -1, i.e. every process of the user.
            let pgid = c.id();
            if pgid > 1 {
                let _ = Command::new("kill").arg("-KILL").arg("--").arg(format!("-{pgid}")).status();
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- chromium stderr ----\n{}", self.stderr());
        }
    }
}

/// One DevTools WebSocket: numbered commands, events kept until asked for.
struct Cdp {
    ws: CdpSocket,
    next_id: u64,
    events: VecDeque<Value>,
}

impl Cdp {
    fn new(ws: CdpSocket) -> Cdp {
        Cdp { ws, next_id: 1, events: VecDeque::new() }
    }

    async fn read(&mut self, deadline: tokio::time::Instant) -> Result<Value, String> {
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| "timed out".to_string())?
                .ok_or_else(|| "DevTools socket closed".to_string())?
                .map_err(|e| format!("DevTools socket: {e}"))?;
            if let Message::Text(t) = m {
                return serde_json::from_str(&t).map_err(|e| format!("DevTools sent non-JSON ({e}): {t}"));
            }
        }
    }

    /// Sends one command and returns its `result` (or the protocol error as `Err`).
    async fn call(&mut self, method: &str, params: Value, timeout: Duration) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"id": id, "method": method, "params": params});
        self.ws.send(Message::text(msg.to_string())).await.map_err(|e| format!("{method}: send: {e}"))?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let v = self.read(deadline).await.map_err(|e| format!("{method}: {e}"))?;
            if v.get("id").and_then(Value::as_u64) == Some(id) {
                if let Some(err) = v.get("error") {
                    return Err(format!("{method}: {err}"));
                }
                return Ok(v.get("result").cloned().unwrap_or(Value::Null));
            }
            if v.get("method").is_some() {
                self.events.push_back(v);
            }
        }
    }

    /// The next event named `method` (earlier ones of other names are kept).
    async fn wait_event(&mut self, method: &str, timeout: Duration) -> Option<Value> {
        if let Some(i) = self.events.iter().position(|e| e["method"] == method) {
            return self.events.remove(i).map(|e| e["params"].clone());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let v = self.read(deadline).await.ok()?;
            if v["method"] == method {
                return Some(v["params"].clone());
            }
            if v.get("method").is_some() {
                self.events.push_back(v);
            }
        }
    }
}

/// One browser tab.
pub struct Page {
    cdp: Cdp,
    /// Console output and uncaught exceptions seen so far (`"<type>: <text>"` lines).
    pub console: Vec<String>,
}

impl Page {
    /// Any CDP command on this page, e.g. `page.call("Page.reload", json!({}))`.
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        let r = self.cdp.call(method, params, CDP_TIMEOUT).await;
        self.collect_console();
        r
    }

    /// Waits for the next event named `method` (e.g. `Page.loadEventFired`); returns `params`.
    pub async fn wait_event(&mut self, method: &str, timeout: Duration) -> Option<Value> {
        let r = self.cdp.wait_event(method, timeout).await;
        self.collect_console();
        r
    }

    fn collect_console(&mut self) {
        let mut keep = VecDeque::new();
        while let Some(e) = self.cdp.events.pop_front() {
            match e["method"].as_str() {
                Some("Runtime.consoleAPICalled") => {
                    let p = &e["params"];
                    let args: Vec<String> = p["args"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|x| match x.get("value") {
                                    Some(Value::String(s)) => s.clone(),
                                    Some(v) => v.to_string(),
                                    None => x["description"].as_str().unwrap_or("?").to_string(),
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    self.console.push(format!("{}: {}", p["type"].as_str().unwrap_or("log"), args.join(" ")));
                }
                Some("Runtime.exceptionThrown") => {
                    let d = &e["params"]["exceptionDetails"];
                    let text = d["exception"]["description"].as_str().or(d["text"].as_str()).unwrap_or("?");
                    self.console.push(format!("exception: {text}"));
                }
                _ => keep.push_back(e),
            }
        }
        self.cdp.events = keep;
    }

    /// Navigates and waits for the `load` event; panics on a network error (e.g. refused).
    pub async fn goto(&mut self, url: &str) {
        self.cdp.events.retain(|e| e["method"] != "Page.loadEventFired");
        let r = self.call("Page.navigate", json!({"url": url})).await.unwrap_or_else(|e| panic!("{e}"));
        if let Some(err) = r.get("errorText").and_then(Value::as_str) {
            panic!("navigating to {url} failed: {err}");
        }
        if self.wait_event("Page.loadEventFired", CDP_TIMEOUT).await.is_none() {
            panic!("{url} did not fire `load` within {CDP_TIMEOUT:?}");
        }
    }

    /// Evaluates `js` in the page (a promise is awaited) and returns its value as JSON.
    /// Panics on an exception or a rejected promise, printing the page's console.
    pub async fn eval(&mut self, js: &str) -> Value {
        match self.try_eval(js).await {
            Ok(v) => v,
            Err(e) => panic!("page eval failed: {e}\nscript:\n{js}\nconsole:\n{}", self.console.join("\n")),
        }
    }

    /// Like [`Page::eval`], but an exception comes back as `Err(description)`.
    pub async fn try_eval(&mut self, js: &str) -> Result<Value, String> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": js, "awaitPromise": true, "returnByValue": true, "userGesture": true}),
            )
            .await?;
        if let Some(d) = r.get("exceptionDetails") {
            let text = d["exception"]["description"]
                .as_str()
                .map(str::to_string)
                .or_else(|| d["exception"]["value"].as_str().map(str::to_string))
                .or_else(|| d["exception"].get("value").map(Value::to_string))
                .unwrap_or_else(|| d["text"].as_str().unwrap_or("exception").to_string());
            return Err(text);
        }
        Ok(r["result"].get("value").cloned().unwrap_or(Value::Null))
    }

    /// Polls `js` (a boolean expression) every 25 ms until it is true; false after `timeout`.
    pub async fn wait_until(&mut self, js: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.eval(js).await == Value::Bool(true) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Writes a PNG screenshot of the viewport to `path`.
    pub async fn screenshot(&mut self, path: impl AsRef<Path>) {
        use base64::Engine;
        let r = self.call("Page.captureScreenshot", json!({"format": "png"})).await.unwrap_or_else(|e| panic!("{e}"));
        let data = r["data"].as_str().expect("screenshot data");
        let png = base64::engine::general_purpose::STANDARD.decode(data).expect("screenshot base64");
        fs::write(path.as_ref(), png).unwrap_or_else(|e| panic!("write {}: {e}", path.as_ref().display()));
    }
}
