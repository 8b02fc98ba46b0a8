//! A fanout instance on the built-in development secret (no `--jwt-secret`), which
//! `common::Instance` cannot start (it always passes `--jwt-secret`): the chat page's mint
//! button and `POST /dev/token` exist only in that mode. Used by tests/api.rs and tests/page.rs.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{free_port, http_get, unique};

pub struct DevInstance {
    child: Child,
    log: tempfile::NamedTempFile,
    pub port: u16,
}

impl DevInstance {
    /// Starts `fanout serve` against `mqtt_url` without a secret and waits for `/readyz` 200.
    pub async fn start(mqtt_url: &str, extra: &[&str]) -> DevInstance {
        let log = tempfile::NamedTempFile::new().unwrap();
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fanout"));
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--mqtt-url", mqtt_url])
            .args(["--instance-id", &unique("dev-")])
            .args(extra);
        for (k, _) in std::env::vars() {
            if k.starts_with("FANOUT_") {
                cmd.env_remove(k);
            }
        }
        let out = log.reopen().unwrap();
        let err = log.reopen().unwrap();
        let child = cmd.env("RUST_LOG", "info").stdin(Stdio::null()).stdout(out).stderr(err).spawn().unwrap();
        let mut d = DevInstance { child, log, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http_get(port, "/readyz").await {
                if r.status == 200 {
                    return d;
                }
            }
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("dev instance exited ({st}):\n{}", d.output());
            }
            assert!(Instant::now() < deadline, "dev instance not ready:\n{}", d.output());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for DevInstance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- dev instance (port {}) output ----\n{}", self.port, self.output());
        }
    }
}
