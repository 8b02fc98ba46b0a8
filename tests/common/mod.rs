//! Shared helpers for the integration tests: a private Mosquitto per test, fanout instances
//! spawned from the real binary, a small WebSocket client, a raw HTTP/1.1 client, and token
//! minting. Nothing here depends on fanout's internal APIs.
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream as StdTcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a single expected frame may take to arrive.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an instance may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
pub const SECRET: &str = "integration-test-secret";

/// A port that was free a moment ago (bind :0, read it, drop the listener).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

pub fn now_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A short unique suffix for instance ids and user ids, so parallel tests never collide.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

fn find_program(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin", "/sbin", "/bin"] {
        let p = PathBuf::from(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.exists() {
                return p;
            }
        }
    }
    panic!("`{name}` not found: install mosquitto and mosquitto-clients (scripts/test.sh does it)");
}

// ---------------------------------------------------------------------------------------------
// Mosquitto
// ---------------------------------------------------------------------------------------------

/// A private Mosquitto broker on a free loopback port, logging everything (subscribe and
/// unsubscribe lines included) to a file the test can read. Killed on drop.
pub struct Mosquitto {
    child: Option<Child>,
    dir: TempDir,
    port: u16,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Mosquitto::start_with("")
    }

    /// Like [`Mosquitto::start`], with extra lines appended to the config (e.g.
    /// `max_packet_size 20000`).
    pub fn start_with(extra: &str) -> Mosquitto {
        let dir = tempfile::tempdir().expect("tempdir");
        // A free port can be taken by someone else between the probe and mosquitto's bind;
        // retry a few times with a new port.
        for _attempt in 0..5 {
            let port = free_port();
            let log = dir.path().join("mosquitto.log");
            let _ = fs::remove_file(&log);
            fs::write(
                dir.path().join("mosquitto.conf"),
                format!(
                    "listener {port} 127.0.0.1\n\
                     allow_anonymous true\n\
                     user root\n\
                     log_dest file {}\n\
                     log_type all\n\
                     connection_messages true\n\
                     log_timestamp true\n\
                     sys_interval 1\n\
                     persistence false\n\
                     {extra}\n",
                    log.display()
                ),
            )
            .unwrap();
            if let Some(child) = spawn_mosquitto(dir.path(), port) {
                return Mosquitto { child: Some(child), dir, port };
            }
        }
        panic!("mosquitto did not start; see {}", dir.path().display());
    }

    /// Kills the broker (an abrupt outage for every client).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the broker again on the same port with the same config (log is appended to).
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(c) = spawn_mosquitto(self.dir.path(), self.port) {
                self.child = Some(c);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("mosquitto did not restart on port {}", self.port);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The whole log file so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Log lines with the `<timestamp>: ` prefix removed.
    pub fn log_lines(&self) -> Vec<String> {
        self.log()
            .lines()
            .map(|l| match l.split_once(": ") {
                Some((ts, rest)) if ts.chars().all(|c| c.is_ascii_digit()) => rest.to_string(),
                _ => l.to_string(),
            })
            .collect()
    }

    /// `SUBSCRIBE` log lines (`<client-id> <qos> <topic>`) for `topic` by `client_id`.
    pub fn subscribe_count(&self, client_id: &str, topic: &str) -> usize {
        self.log_lines()
            .iter()
            .filter(|l| {
                let p: Vec<&str> = l.split(' ').collect();
                p.len() == 3 && p[0] == client_id && p[1].len() == 1 && p[2] == topic
            })
            .count()
    }

    /// `UNSUBSCRIBE` log lines (`<client-id> <topic>`) for `topic` by `client_id`.
    pub fn unsubscribe_count(&self, client_id: &str, topic: &str) -> usize {
        self.log_lines()
            .iter()
            .filter(|l| {
                let p: Vec<&str> = l.split(' ').collect();
                p.len() == 2 && p[0] == client_id && p[1] == topic
            })
            .count()
    }

    /// How many times a client with this id connected (`New client connected ... as <id> (`).
    pub fn connect_count(&self, client_id: &str) -> usize {
        let needle = format!(" as {client_id} (");
        self.log_lines().iter().filter(|l| l.starts_with("New client connected") && l.contains(&needle)).count()
    }

    /// How many times a client with this id went away (DISCONNECT, socket error, protocol
    /// error, kicked by a takeover).
    pub fn disconnect_count(&self, client_id: &str) -> usize {
        self.log_lines()
            .iter()
            .filter(|l| {
                l.starts_with(&format!("Client {client_id} "))
                    || l.starts_with(&format!("Socket error on client {client_id},"))
            })
            .count()
    }

    /// Every topic filter that `client_id` subscribed to (with repetitions).
    pub fn subscriptions_of(&self, client_id: &str) -> Vec<String> {
        self.log_lines()
            .iter()
            .filter_map(|l| {
                let p: Vec<&str> = l.split(' ').collect();
                (p.len() == 3 && p[0] == client_id && p[1].len() == 1).then(|| p[2].to_string())
            })
            .collect()
    }

    /// Polls the log until `pred(log)` holds; returns whether it did within `timeout`.
    pub async fn wait_for_log(&self, pred: impl Fn(&Mosquitto) -> bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(self) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `mosquitto_pub -q 1 -m <text>`.
    /// Reads one `$SYS` value (e.g. `broker/subscriptions/count`), waiting up to 3 s for it.
    pub fn sys_value(&self, path: &str) -> Option<f64> {
        let out = Command::new(find_program("mosquitto_sub"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-C", "1", "-W", "3", "-t"])
            .arg(format!("$SYS/{path}"))
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    pub fn publish_text(&self, topic: &str, text: &str) {
        mosquitto_pub(self.port, topic, PubPayload::Text(text));
    }

    /// `mosquitto_pub -q 1 -f <file>` for arbitrary bytes.
    pub fn publish_bytes(&self, topic: &str, bytes: &[u8]) {
        mosquitto_pub(self.port, topic, PubPayload::Bytes(bytes));
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- mosquitto log (port {}) ----\n{}", self.port, self.log());
        }
        self.stop();
    }
}

/// Starts mosquitto with `<dir>/mosquitto.conf` and waits until `port` accepts connections;
/// `None` if it exited (port taken) or never listened.
fn spawn_mosquitto(dir: &std::path::Path, port: u16) -> Option<Child> {
    let bin = find_program("mosquitto");
    let stderr = fs::OpenOptions::new().create(true).append(true).open(dir.join("mosquitto.stderr")).unwrap();
    let mut child = Command::new(bin)
        .arg("-c")
        .arg(dir.join("mosquitto.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn mosquitto");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(_status)) = child.try_wait() {
            return None;
        }
        if StdTcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub enum PubPayload<'a> {
    Text(&'a str),
    Bytes(&'a [u8]),
}

pub fn mosquitto_pub(port: u16, topic: &str, payload: PubPayload<'_>) {
    let bin = find_program("mosquitto_pub");
    let mut cmd = Command::new(bin);
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", topic]);
    let _tmp;
    match payload {
        PubPayload::Text(t) => {
            cmd.arg("-m").arg(t);
        }
        PubPayload::Bytes(b) => {
            let mut f = tempfile::NamedTempFile::new().unwrap();
            f.write_all(b).unwrap();
            f.flush().unwrap();
            cmd.arg("-f").arg(f.path());
            _tmp = f;
        }
    }
    let out = cmd.output().expect("run mosquitto_pub");
    assert!(out.status.success(), "mosquitto_pub failed: {}", String::from_utf8_lossy(&out.stderr));
}

// ---------------------------------------------------------------------------------------------
// fanout instances
// ---------------------------------------------------------------------------------------------

#[derive(Default, Clone)]
pub struct InstanceOpts {
    /// External broker; `None` means the embedded broker on `embedded_mqtt_port`.
    pub mqtt_url: Option<String>,
    /// Port for `--embedded-mqtt-listen` (only used when `mqtt_url` is `None`); chosen freely
    /// when `None`.
    pub embedded_mqtt_port: Option<u16>,
    pub instance_id: Option<String>,
    /// Extra flags, e.g. `["--rate-limit", "1"]`.
    pub args: Vec<String>,
}

impl InstanceOpts {
    pub fn broker(m: &Mosquitto) -> InstanceOpts {
        InstanceOpts { mqtt_url: Some(m.url()), ..Default::default() }
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<S: Into<String>>(mut self, a: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }
}

/// A running `fanout serve` subprocess. Killed on drop; its output is printed if the test
/// panicked.
pub struct Instance {
    child: Child,
    dir: TempDir,
    pub port: u16,
    pub id: String,
    pub secret: String,
    /// Port of the embedded broker when there is one.
    pub embedded_mqtt_port: Option<u16>,
}

impl Instance {
    pub async fn start(opts: InstanceOpts) -> Instance {
        let id = opts.instance_id.clone().unwrap_or_else(|| unique("t-"));
        let mut last_output = String::new();
        for _attempt in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let port = free_port();
            let out_path = dir.path().join("fanout.log");
            let out = fs::File::create(&out_path).unwrap();
            let err = out.try_clone().unwrap();
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_fanout"));
            cmd.arg("serve")
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--instance-id")
                .arg(&id)
                .arg("--jwt-secret")
                .arg(SECRET);
            let mut embedded = None;
            match &opts.mqtt_url {
                Some(url) => {
                    cmd.arg("--mqtt-url").arg(url);
                }
                None => {
                    let p = opts.embedded_mqtt_port.unwrap_or_else(free_port);
                    embedded = Some(p);
                    cmd.arg("--embedded-mqtt-listen").arg(format!("127.0.0.1:{p}"));
                }
            }
            cmd.args(&opts.args);
            // Keep the environment from leaking settings into the test.
            for (k, _) in std::env::vars() {
                if k.starts_with("FANOUT_") {
                    cmd.env_remove(k);
                }
            }
            cmd.env("RUST_LOG", std::env::var("FANOUT_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()));
            let child = cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn().expect("spawn fanout");
            let mut inst =
                Instance { child, dir, port, id: id.clone(), secret: SECRET.to_string(), embedded_mqtt_port: embedded };
            let deadline = Instant::now() + READY_TIMEOUT;
            let mut exited = false;
            loop {
                if let Ok(Some(_)) = inst.child.try_wait() {
                    exited = true;
                    break;
                }
                if let Ok(r) = http_get(port, "/readyz").await {
                    if r.status == 200 {
                        return inst;
                    }
                }
                if Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            last_output = inst.output();
            let port_clash = exited && last_output.to_lowercase().contains("in use");
            drop(inst); // kills the process; prints nothing since we are not panicking yet
            if !port_clash {
                break;
            }
        }
        panic!("fanout instance {id} did not become ready within {READY_TIMEOUT:?}; output:\n{last_output}");
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        fs::read_to_string(self.dir.path().join("fanout.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the process in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Sends SIGTERM and waits (at most `timeout`) for the exit status; `None` on timeout.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// The MQTT client id this instance uses.
    pub fn client_id(&self) -> String {
        format!("fanout-{}", self.id)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/entrypoint", self.port)
    }

    pub fn token(&self, user: &str) -> String {
        token(&self.secret, user, 3600, None)
    }

    pub fn broadcast_token(&self, user: &str) -> String {
        token(&self.secret, user, 3600, Some("broadcast"))
    }

    /// Connects `user` with a fresh token (subprotocol form) and waits for `connected`.
    pub async fn connect(&self, user: &str) -> Client {
        Client::connect_ok(self, Auth::Subprotocol(&self.token(user))).await
    }

    pub async fn metrics(&self) -> String {
        let r = http_get(self.port, "/metrics").await.expect("GET /metrics");
        assert_eq!(r.status, 200, "GET /metrics status; body: {}", r.body);
        r.body
    }

    /// The value of one sample, e.g. `fanout_messages_in_total{source="mqtt"}`; `None` when
    /// the series has no sample.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        parse_metric(&self.metrics().await, series)
    }

    /// Like [`Instance::metric`] but a missing sample counts as 0 (a labelled counter that was
    /// never incremented has no sample line).
    pub async fn metric_or_zero(&self, series: &str) -> f64 {
        self.metric(series).await.unwrap_or(0.0)
    }

    /// Polls `/metrics` until `pred(value)` holds for `series`; returns the last value.
    pub async fn wait_metric(&self, series: &str, pred: impl Fn(f64) -> bool, timeout: Duration) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.metric_or_zero(series).await;
            if pred(v) || Instant::now() > deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- fanout instance {} (port {}) output ----\n{}", self.id, self.port, self.output());
        }
    }
}

/// Finds `series` (name plus exact label text, e.g. `x_total{source="ws"}`) in Prometheus text.
pub fn parse_metric(text: &str, series: &str) -> Option<f64> {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix(series) {
            if let Some(v) = rest.strip_prefix(' ') {
                let v = v.split_whitespace().next()?;
                return v.parse().ok();
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// tokens
// ---------------------------------------------------------------------------------------------

/// HS256 token with `sub`, `iat`, `exp = now + ttl` and an optional `scope`.
pub fn token(secret: &str, sub: &str, ttl_secs: i64, scope: Option<&str>) -> String {
    let now = now_secs() as i64;
    let mut claims = json!({"sub": sub, "iat": now, "exp": now + ttl_secs});
    if let Some(s) = scope {
        claims["scope"] = json!(s);
    }
    sign(secret, &claims)
}

/// HS256-signs arbitrary claims.
pub fn sign(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()).expect("hmac key"),
    )
    .expect("encode token")
}

/// An unsigned `alg: none` token.
pub fn unsigned_token(claims: &Value) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64.encode(serde_json::to_vec(claims).unwrap());
    format!("{header}.{payload}.")
}

// ---------------------------------------------------------------------------------------------
// raw HTTP/1.1
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header lines, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }
}

/// `GET path` with `Connection: close`.
pub async fn http_get(port: u16, path: &str) -> std::io::Result<HttpResponse> {
    http_request(port, path, &[("Connection", "close")]).await
}

/// A WebSocket upgrade attempt by hand, so a refusal can be inspected: returns the response
/// (status 101 means the server upgraded).
pub async fn upgrade_attempt(port: u16, path_and_query: &str, extra: &[(&str, &str)]) -> HttpResponse {
    let mut headers = vec![
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    headers.extend_from_slice(extra);
    http_request(port, path_and_query, &headers).await.expect("upgrade attempt")
}

/// Sends one GET request and reads one response (Content-Length, chunked, or to EOF; a 101
/// response has no body). Times out after 5 s.
pub async fn http_request(port: u16, path: &str, headers: &[(&str, &str)]) -> std::io::Result<HttpResponse> {
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i;
            }
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no response head"));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, status_line.to_string()))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut body = buf[head_end + 4..].to_vec();
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        if status == 101 || status == 204 || status == 304 {
            body.clear();
        } else if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            while body.len() < len {
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        } else if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            loop {
                if let Some(decoded) = dechunk(&body) {
                    body = decoded;
                    break;
                }
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    body = dechunk(&body).unwrap_or(body);
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else {
            s.read_to_end(&mut body).await?;
        }
        Ok(HttpResponse { status, headers, body: String::from_utf8_lossy(&body).to_string() })
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "HTTP request timed out"))?
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Decodes a complete chunked body; `None` while the terminating chunk has not arrived.
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(data, b"\r\n")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if data.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket client
// ---------------------------------------------------------------------------------------------

/// Where the client puts its token.
#[derive(Clone, Copy, Debug)]
pub enum Auth<'a> {
    /// `Sec-WebSocket-Protocol: <token>` (browser `new WebSocket(url, token)`).
    Subprotocol(&'a str),
    /// `Sec-WebSocket-Protocol: bearer, <token>`.
    BearerSubprotocol(&'a str),
    /// `?token=<token>`.
    Query(&'a str),
    /// `Authorization: Bearer <token>`.
    Header(&'a str),
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Client {
    pub ws: Ws,
    /// The `Sec-WebSocket-Protocol` header of the 101 response.
    pub protocol: Option<String>,
    /// `data` of the `connected` event (set by `connect_ok`).
    pub connected: Value,
}

impl Client {
    /// Opens the WebSocket; returns the tungstenite error on refusal.
    pub async fn connect(inst: &Instance, auth: Auth<'_>) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let url = match auth {
            Auth::Query(t) => format!("{}?token={t}", inst.ws_url()),
            _ => inst.ws_url(),
        };
        let mut req = url.into_client_request()?;
        let h = req.headers_mut();
        match auth {
            Auth::Subprotocol(t) => {
                h.insert("Sec-WebSocket-Protocol", HeaderValue::from_str(t).unwrap());
            }
            Auth::BearerSubprotocol(t) => {
                h.insert("Sec-WebSocket-Protocol", HeaderValue::from_str(&format!("bearer, {t}")).unwrap());
            }
            Auth::Header(t) => {
                h.insert("Authorization", HeaderValue::from_str(&format!("Bearer {t}")).unwrap());
            }
            Auth::Query(_) => {}
        }
        let (ws, resp) =
            tokio::time::timeout(RECV_TIMEOUT, tokio_tungstenite::connect_async(req)).await.map_err(|_| {
                tokio_tungstenite::tungstenite::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "WebSocket handshake timed out",
                ))
            })??;
        let protocol = resp.headers().get("sec-websocket-protocol").map(|v| v.to_str().unwrap_or_default().to_string());
        Ok(Client { ws, protocol, connected: Value::Null })
    }

    /// Connects and waits for the `connected` event (the subscription is then confirmed).
    pub async fn connect_ok(inst: &Instance, auth: Auth<'_>) -> Client {
        let mut c = Client::connect(inst, auth).await.unwrap_or_else(|e| panic!("connect with {auth:?} failed: {e}"));
        c.connected = c.expect_event("connected").await;
        c
    }

    pub fn connection_id(&self) -> String {
        self.connected["connectionId"].as_str().unwrap_or_default().to_string()
    }

    /// Next data frame (text, binary or close), skipping ping/pong; `None` on timeout or when
    /// the stream ended without a close frame.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Option<Message> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next()).await.ok()??;
            match m {
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) | Ok(Message::Frame(_)) => continue,
                Ok(m) => return Some(m),
                Err(_) => return None,
            }
        }
    }

    pub async fn recv(&mut self) -> Message {
        match self.recv_timeout(RECV_TIMEOUT).await {
            Some(m) => m,
            None => panic!("no frame within {RECV_TIMEOUT:?}"),
        }
    }

    /// Next frame as text (panics on anything else).
    pub async fn recv_text(&mut self) -> String {
        match self.recv().await {
            Message::Text(t) => t.to_string(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    pub async fn recv_json(&mut self) -> Value {
        let t = self.recv_text().await;
        serde_json::from_str(&t).unwrap_or_else(|e| panic!("frame is not JSON ({e}): {t}"))
    }

    /// Next frame must be `{"event": event, ...}`; returns its `data`.
    pub async fn expect_event(&mut self, event: &str) -> Value {
        let v = self.recv_json().await;
        assert_eq!(v["event"], json!(event), "expected event {event:?}, got {v}");
        v["data"].clone()
    }

    /// Asserts that no data frame arrives within `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        if let Some(m) = self.recv_timeout(d).await {
            panic!("expected no frame, got {m:?}");
        }
    }

    pub async fn send_json(&mut self, v: &Value) {
        self.send(Message::text(v.to_string())).await;
    }

    pub async fn send(&mut self, m: Message) {
        self.ws.send(m).await.expect("send frame");
    }

    /// Sends `{"event": event, "data": data}`.
    pub async fn emit(&mut self, event: &str, data: Value) {
        self.send_json(&json!({"event": event, "data": data})).await;
    }

    /// Sends one chat message to `to` with a client message id and returns the ack's `data`.
    pub async fn chat_acked(&mut self, to: &str, message: Value, cmid: &str) -> Value {
        self.emit(
            "send_chat_message_to_participant",
            json!({"participantId": to, "message": message, "clientMessageId": cmid}),
        )
        .await;
        let ack = self.expect_event("ack").await;
        assert_eq!(ack["clientMessageId"], json!(cmid), "ack: {ack}");
        ack
    }

    /// Waits for a close frame and returns its code (`None` if the stream ended without one).
    pub async fn recv_close(&mut self, timeout: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next()).await.ok()??;
            match m {
                Ok(Message::Close(Some(f))) => return Some(u16::from(f.code)),
                Ok(Message::Close(None)) => return Some(1005),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Closes from the client side (code 1000) and drains until the server's close arrives.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(RECV_TIMEOUT, async { while let Some(Ok(_)) = self.ws.next().await {} }).await;
    }
}

/// Reads a `Read` to a string (for child outputs).
pub fn read_all(mut r: impl Read) -> String {
    let mut s = String::new();
    let _ = r.read_to_string(&mut s);
    s
}

/// Headless Chromium over the DevTools protocol (real-browser tests).
pub mod browser;
/// Clients read in the background, for tests where sending and receiving overlap.
pub mod peer;
pub mod proxy;
/// A RabbitMQ cluster on loopback, for the cluster tests.
pub mod rabbitmq;
/// The native stack (scripts/stack.sh) on free ports, for end-to-end tests.
pub mod stack;
