//! A private Mosquitto per test, on a free loopback port, logging everything (subscribe and
//! unsubscribe lines included) to a file the test reads. Killed on drop.

use std::fs;
use std::io::Write;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{find_program, free_port, owned_command};

/// The tests' broker: anonymous, no persistence, `$SYS` every second.
/// The config of [`Mosquitto::start`]; append lines for a variant.
pub const TEST_CONFIG: &str = "allow_anonymous true\nsys_interval 1\npersistence false\n";

pub struct Mosquitto {
    child: Option<Child>,
    dir: TempDir,
    port: u16,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Mosquitto::with_config(TEST_CONFIG)
    }

    /// A broker from `conf` (e.g. the project's mosquitto/mosquitto.conf): its `listener` lines
    /// are replaced by one on a free loopback port (a new one if that is taken meanwhile), and
    /// logging of everything to the test's log file is added.
    pub fn with_config(conf: &str) -> Mosquitto {
        let body: String = conf.lines().filter(|l| !l.starts_with("listener ")).map(|l| format!("{l}\n")).collect();
        let mut m = Mosquitto { child: None, dir: tempfile::tempdir().expect("tempdir"), port: 0 };
        for _attempt in 0..5 {
            m.port = free_port();
            let log = m.dir.path().join("mosquitto.log");
            fs::write(
                m.dir.path().join("mosquitto.conf"),
                format!(
                    "listener {} 127.0.0.1\n{body}\n\
                     user root\nlog_dest file {}\nlog_type all\nconnection_messages true\nlog_timestamp true\n",
                    m.port,
                    log.display()
                ),
            )
            .unwrap();
            if m.spawn() {
                return m;
            }
        }
        panic!("mosquitto did not start on five free ports:\n{}", m.log());
    }

    /// Starts mosquitto with the config in its directory and waits for the log line saying it
    /// runs (after its listener was bound). False if it exited (its port was taken).
    fn spawn(&mut self) -> bool {
        let running = |m: &Mosquitto| m.log().matches(" running").count();
        let before = running(self);
        let stderr = fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("stderr")).unwrap();
        let mut child = owned_command(find_program(&["mosquitto"]))
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn mosquitto");
        let deadline = Instant::now() + Duration::from_secs(10);
        while running(self) == before {
            if child.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = Some(child);
        true
    }

    /// Kills the broker (an abrupt outage for every client).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the broker again on the same port (its clients know no other), retrying for
    /// 10 s while something else holds the port. The log is appended to.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn() {
            assert!(Instant::now() < deadline, "mosquitto did not restart on port {}", self.port);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port())
    }

    /// The whole log file so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Log lines without their timestamp (`<timestamp>: `, in any `log_timestamp_format`).
    pub fn log_lines(&self) -> Vec<String> {
        self.log()
            .lines()
            .map(|l| match l.split_once(": ") {
                Some((ts, rest)) if !ts.contains(' ') => rest.to_string(),
                _ => l.to_string(),
            })
            .collect()
    }

    /// `SUBSCRIBE` log lines (`<client-id> <qos> <topic>`) for `topic` by `client_id`.
    pub fn subscribe_count(&self, client_id: &str, topic: &str) -> usize {
        self.subscriptions_of(client_id).iter().filter(|t| *t == topic).count()
    }

    /// `UNSUBSCRIBE` log lines (`<client-id> <topic>`) for `topic` by `client_id`.
    pub fn unsubscribe_count(&self, client_id: &str, topic: &str) -> usize {
        let line = format!("{client_id} {topic}");
        self.log_lines().iter().filter(|l| **l == line).count()
    }

    /// Every topic filter that `client_id` subscribed to (with repetitions).
    pub fn subscriptions_of(&self, client_id: &str) -> Vec<String> {
        self.log_lines()
            .iter()
            .filter_map(|l| match l.split(' ').collect::<Vec<_>>()[..] {
                [c, qos, topic] if c == client_id && qos.len() == 1 => Some(topic.to_string()),
                _ => None,
            })
            .collect()
    }

    /// How many times a client with this id connected (`New client connected … as <id> (`).
    pub fn connect_count(&self, client_id: &str) -> usize {
        let needle = format!(" as {client_id} (");
        self.log_lines().iter().filter(|l| l.starts_with("New client connected") && l.contains(&needle)).count()
    }

    /// Polls the log until `pred` holds; whether it did within `timeout`.
    pub async fn wait_for_log(&self, pred: impl Fn(&Mosquitto) -> bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !pred(self) {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        true
    }

    /// `mosquitto_pub -q 1` of a text payload.
    pub fn publish_text(&self, topic: &str, text: &str) {
        self.publish_bytes(topic, text.as_bytes());
    }

    /// `mosquitto_pub -q 1` of arbitrary bytes.
    pub fn publish_bytes(&self, topic: &str, bytes: &[u8]) {
        mosquitto_pub(self.port, topic, bytes);
    }
}

/// `mosquitto_pub -q 1 -f <file>` of arbitrary bytes to any broker on `127.0.0.1:port`.
pub fn mosquitto_pub(port: u16, topic: &str, bytes: &[u8]) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    let out = owned_command(find_program(&["mosquitto_pub"]))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", topic, "-f"])
        .arg(f.path())
        .output()
        .expect("run mosquitto_pub");
    assert!(out.status.success(), "mosquitto_pub failed: {}", String::from_utf8_lossy(&out.stderr));
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- mosquitto log (port {}) ----\n{}", self.port, self.log());
        }
        self.stop();
    }
}
