//! fanout instances spawned from the real binary, one launcher for every mode the tests need:
//! an external broker or the embedded one, `--jwt-secret` or the development secret, any
//! extra flags. A test fails when an instance it ran printed "panicked".

use std::fs;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tempfile::TempDir;

use super::{
    free_port, get, http, owned_command, parse_metric, token, unique, Client, HttpResponse, Mosquitto, SECRET,
};

/// How long an instance may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// fanout's public development secret (used when no `--jwt-secret` is given).
pub const DEV_SECRET: &str = "fanout-dev-secret-do-not-use-in-production";

#[derive(Default, Clone)]
pub struct InstanceOpts {
    /// External broker; `None` means the embedded broker on `embedded_mqtt_port`.
    pub mqtt_url: Option<String>,
    /// Port for `--embedded-mqtt-listen` (only without `mqtt_url`); a free one when `None`.
    pub embedded_mqtt_port: Option<u16>,
    pub instance_id: Option<String>,
    /// No `--jwt-secret`: the instance runs on the built-in development secret.
    pub dev_secret: bool,
    /// Extra flags, e.g. `["--rate-limit", "1"]`.
    pub args: Vec<String>,
    /// `RUST_LOG` for this instance (else `FANOUT_TEST_RUST_LOG`, else `info`): its output is
    /// printed when the test fails.
    pub log: Option<String>,
}

impl InstanceOpts {
    pub fn broker(m: &Mosquitto) -> InstanceOpts {
        InstanceOpts::url(&m.url())
    }

    pub fn url(mqtt_url: &str) -> InstanceOpts {
        InstanceOpts { mqtt_url: Some(mqtt_url.to_string()), ..Default::default() }
    }

    pub fn dev_secret(mut self) -> Self {
        self.dev_secret = true;
        self
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
/// panicked, and the test fails if the output says a thread panicked.
pub struct Instance {
    child: Child,
    dir: TempDir,
    pub port: u16,
    pub id: String,
    pub secret: String,
}

impl Instance {
    /// Starts the instance on a free port (another one if that was taken meanwhile) and waits
    /// until its own `/readyz` (with its instance id) answers 200.
    pub async fn start(opts: InstanceOpts) -> Instance {
        let id = opts.instance_id.clone().unwrap_or_else(|| unique("t-"));
        let secret = if opts.dev_secret { DEV_SECRET } else { SECRET };
        let mut last_output = String::new();
        for _attempt in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let port = free_port();
            let out = fs::File::create(dir.path().join("fanout.log")).unwrap();
            let err = out.try_clone().unwrap();
            let mut cmd = owned_command(env!("CARGO_BIN_EXE_fanout"));
            cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--instance-id", &id]);
            if !opts.dev_secret {
                cmd.args(["--jwt-secret", SECRET]);
            }
            match &opts.mqtt_url {
                Some(url) => cmd.args(["--mqtt-url", url]),
                None => {
                    let p = opts.embedded_mqtt_port.unwrap_or_else(free_port);
                    cmd.args(["--embedded-mqtt-listen", &format!("127.0.0.1:{p}")])
                }
            };
            cmd.args(&opts.args);
            // Keep the environment from leaking settings into the test.
            for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("FANOUT_")) {
                cmd.env_remove(k);
            }
            let log = opts.log.clone().or_else(|| std::env::var("FANOUT_TEST_RUST_LOG").ok());
            cmd.env("RUST_LOG", log.unwrap_or_else(|| "info".into()));
            let child = cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn().expect("spawn fanout");
            let mut inst = Instance { child, dir, port, id: id.clone(), secret: secret.to_string() };
            let deadline = Instant::now() + READY_TIMEOUT;
            let mut exited = false;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = inst.child.try_wait() {
                    exited = true;
                    break;
                }
                // Ours, not whoever else may answer on this port.
                if let Ok(r) = get(port, "/readyz").await {
                    if r.status == 200 && r.json()["instanceId"] == json!(id) {
                        return inst;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            last_output = inst.output();
            let clash = exited && last_output.to_lowercase().contains("in use");
            drop(inst);
            if !clash {
                break;
            }
        }
        panic!("fanout instance {id} exited or did not become ready within {READY_TIMEOUT:?}; output:\n{last_output}");
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        fs::read_to_string(self.dir.path().join("fanout.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (a graceful shutdown) and returns at once.
    pub fn sigterm(&self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
    }

    /// Waits (at most `timeout`) for the process to exit; `None` if it is still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    }

    /// SIGTERM, then the exit status (`None` if it did not exit within `timeout`).
    pub async fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.sigterm();
        self.wait_exit(timeout).await
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
        Client::connect_ok(self, super::Auth::Subprotocol(&self.token(user))).await
    }

    /// Waits until `/readyz` answers `status`; how long that took.
    pub async fn wait_readyz(&self, status: u16, timeout: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            let now = get(self.port, "/readyz").await.map(|r| r.status).unwrap_or(0);
            if now == status {
                return t0.elapsed();
            }
            assert!(t0.elapsed() < timeout, "/readyz of {} still {now}, not {status}, after {timeout:?}", self.id);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One HTTP request to this instance (see [`super::http`]).
    pub async fn http(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
        http(self.port, method, path, headers, body).await.unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    pub async fn metrics(&self) -> String {
        let r = self.http("GET", "/metrics", &[], b"").await;
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
        let output = self.output();
        if std::thread::panicking() {
            eprintln!("---- fanout instance {} (port {}) output ----\n{output}", self.id, self.port);
        } else if output.contains("panicked") {
            panic!("fanout instance {} panicked; output:\n{output}", self.id);
        }
    }
}
