//! The broker engine a scenario runs against: the bench's own Mosquitto (default), or a
//! RabbitMQ cluster of 1 or N nodes on loopback started with `scripts/rabbitmq.sh` (MQTT plugin,
//! persistent MQTT sessions on quorum queues). A RabbitMQ cluster is taken down when dropped,
//! and the script's watchdog (`RMQ_OWNER_PID` = this process) takes it down if the bench dies.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::Instant;

use crate::env::{self, Broker, Res};

/// Which broker: `mosquitto`, `rabbitmq-1`, `rabbitmq-3` (any node count).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum EngineKind {
    Mosquitto,
    Rabbit(usize),
}

impl FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "mosquitto" {
            return Ok(EngineKind::Mosquitto);
        }
        match s.strip_prefix("rabbitmq-").map(str::parse::<usize>) {
            Some(Ok(n)) if (1..=9).contains(&n) => Ok(EngineKind::Rabbit(n)),
            _ => Err(format!("unknown engine {s:?}: mosquitto, rabbitmq-1, rabbitmq-3 (rabbitmq-N, N ≤ 9)")),
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineKind::Mosquitto => write!(f, "mosquitto"),
            EngineKind::Rabbit(n) => write!(f, "rabbitmq-{n}"),
        }
    }
}

/// A RabbitMQ cluster started by `scripts/rabbitmq.sh up N`.
pub struct Rabbit {
    script: PathBuf,
    dir: PathBuf,
    name: String,
    /// MQTT port of node i (0-based)
    pub ports: Vec<u16>,
    /// the `beam.smp` process of each node
    pub pids: Vec<u32>,
    pub start_secs: f64,
    /// nodes may be running: `down` when dropped
    up: bool,
}

fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/rabbitmq.sh")
}

impl Rabbit {
    /// Starts an N-node cluster; on failure (the script picks free ports with bind(:0), and on
    /// a busy host one may be taken before the node binds it) every node of the attempt is
    /// taken down and it tries again with fresh ports, three attempts in all.
    pub fn start(nodes: usize, dir: &Path) -> Res<Rabbit> {
        let mut last = String::new();
        for attempt in 1..=3 {
            match Rabbit::try_start(nodes, &dir.join(format!("rabbitmq-{attempt}"))) {
                Ok(r) => return Ok(r),
                Err(e) => {
                    eprintln!("rabbitmq: attempt {attempt} of 3 failed: {e}");
                    last = e;
                }
            }
        }
        Err(last)
    }

    fn try_start(nodes: usize, dir: &Path) -> Res<Rabbit> {
        let script = script_path();
        let dir = dir.to_path_buf();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // The script keeps ports it finds in n<i>/ports. Its own choice (bind(:0) in Python)
        // is an ephemeral port, which after a run of thousands of connections often has a
        // connection in TIME_WAIT, and RabbitMQ's distribution listener (no SO_REUSEADDR) then
        // fails with `dist_port_already_used`. Ours are below the ephemeral range and checked.
        for i in 1..=nodes {
            let d = dir.join(format!("n{i}"));
            std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
            let ports = format!("{} {} {}\n", env::free_port(), env::free_port(), env::free_port());
            std::fs::write(d.join("ports"), ports).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        // Unique node names: other test runs may have clusters of their own on this host.
        let name = format!("fb{}x{}", std::process::id(), rand::random_range(0..1_000_000u32));
        let t0 = Instant::now();
        let out = Command::new("bash")
            .arg(&script)
            .args(["up", &nodes.to_string()])
            .env("RMQ_DIR", &dir)
            .env("RMQ_NAME", &name)
            .env("RMQ_OWNER_PID", std::process::id().to_string())
            // A node that fails to start writes a crash dump into its working directory.
            .env("ERL_CRASH_DUMP", dir.join("erl_crash.dump"))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run {}: {e}", script.display()))?;
        let mut rabbit = Rabbit { script, dir, name, ports: Vec::new(), pids: Vec::new(), start_secs: 0.0, up: true };
        if !out.status.success() {
            // Nodes of this attempt that did start would otherwise run until the bench exits.
            rabbit.down();
            return Err(format!(
                "scripts/rabbitmq.sh up {nodes} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        rabbit.start_secs = t0.elapsed().as_secs_f64();
        // "node <i> <name> mqtt <port>"
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let ["node", _, _, "mqtt", port] = f.as_slice() {
                rabbit.ports.push(port.parse().map_err(|_| format!("bad port in {line:?}"))?);
            }
        }
        if rabbit.ports.len() != nodes {
            rabbit.down();
            return Err(format!("scripts/rabbitmq.sh printed {} MQTT ports for {nodes} nodes", rabbit.ports.len()));
        }
        for i in 1..=nodes {
            let pg = std::fs::read_to_string(rabbit.dir.join(format!("n{i}/pgid"))).unwrap_or_default();
            let beams = pg.trim().parse::<i64>().map(beam_pids).unwrap_or_default();
            if beams.len() != 1 {
                rabbit.down();
                return Err(format!("node {i}: {} beam.smp processes in session {pg}", beams.len()));
            }
            rabbit.pids.extend(beams);
        }
        Ok(rabbit)
    }

    pub fn down(&mut self) {
        let _ = Command::new("bash")
            .arg(&self.script)
            .arg("down")
            .env("RMQ_DIR", &self.dir)
            .env("RMQ_NAME", &self.name)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        self.pids.clear();
        self.up = false;
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        if self.up {
            self.down();
        }
    }
}

/// `beam.smp` processes whose session id is `sid` (each node runs in its own session).
fn beam_pids(sid: i64) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        if !head.ends_with("(beam.smp") {
            continue;
        }
        // after ")": state ppid pgrp session
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.get(3).and_then(|s| s.parse::<i64>().ok()) == Some(sid) {
            out.push(pid);
        }
    }
    out
}

/// A running broker of either kind.
pub enum Engine {
    Mosquitto(Broker),
    Rabbit(Rabbit),
}

impl Engine {
    pub fn start(kind: EngineKind, mosquitto: &Path, dir: &Path) -> Res<Engine> {
        Ok(match kind {
            EngineKind::Mosquitto => Engine::Mosquitto(env::start_mosquitto(mosquitto, dir, false)?),
            EngineKind::Rabbit(n) => Engine::Rabbit(Rabbit::start(n, dir)?),
        })
    }

    /// MQTT port of each node (one for Mosquitto).
    pub fn ports(&self) -> Vec<u16> {
        match self {
            Engine::Mosquitto(b) => vec![b.port],
            Engine::Rabbit(r) => r.ports.clone(),
        }
    }

    /// The broker's processes (CPU and RSS are summed over them).
    pub fn pids(&self) -> Vec<u32> {
        match self {
            Engine::Mosquitto(b) => vec![b.proc.pid()],
            Engine::Rabbit(r) => r.pids.clone(),
        }
    }

    pub fn mosquitto(&mut self) -> Res<&mut Broker> {
        match self {
            Engine::Mosquitto(b) => Ok(b),
            Engine::Rabbit(_) => Err("this scenario needs Mosquitto (--engine mosquitto)".into()),
        }
    }

    /// Mosquitto's log (SUBSCRIBE/UNSUBSCRIBE lines).
    pub fn mosquitto_log(&self) -> Res<PathBuf> {
        match self {
            Engine::Mosquitto(b) => Ok(b.log.clone()),
            Engine::Rabbit(_) => Err("this scenario reads Mosquitto's log (--engine mosquitto)".into()),
        }
    }

    pub fn stop(&mut self) {
        match self {
            Engine::Mosquitto(b) => b.proc.stop(),
            Engine::Rabbit(r) => r.down(),
        }
    }
}
