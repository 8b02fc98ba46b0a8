//! The native stack (`scripts/stack.sh`: Mosquitto + nginx + N instances, from the project's
//! own config files) on free loopback ports, for end-to-end tests. `stack.sh down` on drop;
//! if the test process dies first, the stack's watchdog (`STACK_OWNER_PID`) takes it down.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::support::{free_port, get, parse_metric, Auth, Client, SECRET};
use tempfile::TempDir;

pub struct Stack {
    dir: TempDir,
    /// nginx: the address clients use.
    pub port: u16,
    /// (instance id, port) for every instance, in order (`n1`, `n2`, …).
    pub instances: Vec<(String, u16)>,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh")
}

impl Stack {
    /// `scripts/stack.sh up n` with the test binary, the tests' JWT secret and free ports
    /// (retried with new ports if one was taken meanwhile).
    pub fn up(n: usize) -> Stack {
        let mut last = String::new();
        for _attempt in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let port = free_port();
            let mqtt_port = free_port();
            let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
            let list = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(" ");
            let out = Command::new("bash")
                .arg(script())
                .arg("up")
                .arg(n.to_string())
                .env("STACK_DIR", dir.path())
                .env("STACK_PORT", port.to_string())
                .env("STACK_MQTT_PORT", mqtt_port.to_string())
                .env("STACK_INSTANCE_PORTS", &list)
                .env("STACK_JWT_SECRET", SECRET)
                .env("FANOUT_BIN", env!("CARGO_BIN_EXE_fanout"))
                .env("STACK_OWNER_PID", std::process::id().to_string())
                .output()
                .expect("run scripts/stack.sh");
            let instances = (0..n).map(|i| (format!("n{}", i + 1), ports[i])).collect();
            let stack = Stack { dir, port, instances };
            if out.status.success() {
                return stack;
            }
            last = format!(
                "{}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                stack.logs()
            );
            drop(stack);
        }
        panic!("scripts/stack.sh up {n} failed three times; last output:\n{last}");
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Every log file of the stack, concatenated (for failure messages).
    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.path()) {
            let mut files: Vec<_> = rd.flatten().map(|e| e.path()).collect();
            files.sort();
            for p in files.into_iter().filter(|p| p.extension().is_some_and(|e| e == "log")) {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                s.push_str(&format!("---- {} (last {} lines) ----\n", p.display(), tail.len()));
                for l in tail.into_iter().rev() {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
        s
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/entrypoint", self.port)
    }

    /// Connects through nginx with the token as subprotocol and waits for `connected`.
    pub async fn connect(&self, token: &str) -> Client {
        self.connect_with(Auth::Subprotocol(token)).await
    }

    /// Connects through nginx with the token wherever `auth` puts it and waits for `connected`.
    pub async fn connect_with(&self, auth: Auth<'_>) -> Client {
        let c = Client::open(&self.ws_url(), auth)
            .await
            .unwrap_or_else(|e| panic!("handshake through nginx with {auth:?} failed: {e}\n{}", self.logs()));
        let echo = match auth {
            Auth::Subprotocol(t) => Some(t),
            Auth::BearerSubprotocol(_) => Some("bearer"),
            Auth::Query(_) | Auth::Header(_) => None,
        };
        assert_eq!(c.protocol.as_deref(), echo, "nginx/fanout must echo exactly the offered subprotocol");
        c.connected().await
    }

    /// One metric sample from every instance (missing = 0), in instance order.
    pub async fn metric_per_instance(&self, series: &str) -> Vec<f64> {
        let mut v = Vec::new();
        for (id, port) in &self.instances {
            let r = get(*port, "/metrics").await.unwrap_or_else(|e| panic!("GET /metrics of {id}: {e}"));
            v.push(parse_metric(&r.body, series).unwrap_or(0.0));
        }
        v
    }

    /// Polls until the per-instance values of `series` satisfy `pred`; returns the last ones.
    pub async fn wait_metrics(&self, series: &str, pred: impl Fn(&[f64]) -> bool, timeout: Duration) -> Vec<f64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let v = self.metric_per_instance(series).await;
            if pred(&v) || tokio::time::Instant::now() > deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- stack logs ({}) ----\n{}", self.dir.path().display(), self.logs());
        }
        let _ = Command::new("bash")
            .arg(script())
            .arg("down")
            .env("STACK_DIR", self.dir.path())
            .stdout(std::process::Stdio::null())
            .status();
        if !std::thread::panicking() {
            for (id, _) in &self.instances {
                let log = std::fs::read_to_string(self.dir.path().join(format!("fanout-{id}.log"))).unwrap_or_default();
                assert!(!log.contains("panicked"), "stack instance {id} panicked:\n{log}");
            }
        }
    }
}
