//! A RabbitMQ cluster on loopback (scripts/rabbitmq.sh), MQTT plugin on every node, persistent
//! MQTT sessions on quorum queues. Stopped on drop.

use std::path::PathBuf;

use crate::support::mosquitto::mosquitto_pub;
use crate::support::{owned_command, unique};

pub struct RabbitCluster {
    dir: tempfile::TempDir,
    name: String,
    /// MQTT port of node i (0-based).
    pub mqtt_ports: Vec<u16>,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/rabbitmq.sh")
}

impl RabbitCluster {
    /// Starts `n` nodes and waits until they form one cluster (tens of seconds).
    pub fn start(n: usize) -> RabbitCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let name = unique("r").replace('-', "") + "-";
        let out = owned_command("bash")
            .arg(script())
            .args(["up", &n.to_string()])
            .env("RMQ_DIR", dir.path())
            .env("RMQ_NAME", &name)
            .env("RMQ_OWNER_PID", std::process::id().to_string())
            .output()
            .expect("run scripts/rabbitmq.sh");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        // Built before the checks, so a failed start still stops what did start.
        let mut c = RabbitCluster { dir, name, mqtt_ports: Vec::new() };
        assert!(
            out.status.success(),
            "rabbitmq cluster did not start: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let ports = stdout
            .lines()
            .filter_map(|l| l.split_whitespace().collect::<Vec<_>>().get(4).and_then(|p| p.parse().ok()))
            .collect::<Vec<u16>>();
        assert_eq!(ports.len(), n, "{stdout}");
        eprintln!("{}", String::from_utf8_lossy(&out.stderr).trim());
        c.mqtt_ports = ports;
        c
    }

    pub fn url(&self, i: usize) -> String {
        format!("mqtt://127.0.0.1:{}", self.mqtt_ports[i])
    }

    /// Every node's URL, starting with node `first` (what an instance attached there is given).
    pub fn urls_from(&self, first: usize) -> String {
        let n = self.mqtt_ports.len();
        (0..n).map(|k| self.url((first + k) % n)).collect::<Vec<_>>().join(",")
    }

    /// Crashes node `i` (SIGKILL of its process group).
    pub fn kill(&self, i: usize) {
        self.script(&["kill", &(i + 1).to_string()]);
    }

    /// `mosquitto_pub -q 1` to node `i`.
    pub fn publish_text(&self, i: usize, topic: &str, text: &str) {
        mosquitto_pub(self.mqtt_ports[i], topic, text.as_bytes());
    }

    fn script(&self, args: &[&str]) {
        let st = owned_command("bash")
            .arg(script())
            .args(args)
            .env("RMQ_DIR", self.dir.path())
            .env("RMQ_NAME", &self.name)
            .status()
            .expect("run scripts/rabbitmq.sh");
        assert!(st.success(), "scripts/rabbitmq.sh {args:?}: {st}");
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        let _ = owned_command("bash")
            .arg(script())
            .arg("down")
            .env("RMQ_DIR", self.dir.path())
            .env("RMQ_NAME", &self.name)
            .status();
    }
}
