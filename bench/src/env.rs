//! The system under test: a Mosquitto broker and M fanout instances, started and stopped by
//! the bench; plus process measurements (RSS, CPU) and a tiny HTTP client for /readyz and
//! /metrics.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub type Res<T> = Result<T, String>;

/// A loopback port to listen on: random in 20000..32768, below Linux's ephemeral range
/// (32768–60999), so no outgoing connection of this run holds it, and bindable *without*
/// SO_REUSEADDR. Mosquitto's websockets listener (libwebsockets) binds without it, so a port
/// with a connection in TIME_WAIT on it fails there; after 10,000 idle connections close there
/// are ~20,000 such connections, and an ephemeral port from `bind(:0)` (which std binds with
/// SO_REUSEADDR) was often one of them.
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = rand::random_range(20000..32768u16);
        if bindable(port) {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("no free port")
}

/// Whether 127.0.0.1:`port` can be bound without SO_REUSEADDR right now.
fn bindable(port: u16) -> bool {
    // SAFETY: a socket we create, bind and close; the sockaddr is a plain struct we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return false;
        }
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_port = port.to_be();
        addr.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
        let ok = libc::bind(
            fd,
            &addr as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) == 0;
        libc::close(fd);
        ok
    }
}

/// Kills the child when dropped (SIGTERM, then SIGKILL after a grace period).
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(6);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct Broker {
    pub proc: Proc,
    pub port: u16,
    /// Mosquitto's own `protocol websockets` listener (no-tier), when asked for.
    pub ws_port: Option<u16>,
    pub log: PathBuf,
}

impl Broker {
    /// Kills the broker (an abrupt outage for every client) and starts it again on the same
    /// port with the same config; returns once it listens. Without persistence it comes back
    /// empty: no sessions, no subscriptions.
    pub fn restart(&mut self, bin: &Path) -> Res<()> {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        let conf = self.log.with_file_name("mosquitto.conf");
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let child = Command::new(bin)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
            self.proc = Proc { child };
            while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
                if matches!(self.proc.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                if Instant::now() > until {
                    return Err(format!("mosquitto did not listen again on {}", self.port));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            if matches!(self.proc.child.try_wait(), Ok(None)) {
                return Ok(());
            }
            // The port was still held for a moment: try again.
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Starts Mosquitto on a free loopback port, and with `websockets` a second listener speaking
/// MQTT over WebSocket (Mosquitto 2.0.11 refuses to start with a websockets listener alone).
pub fn start_mosquitto(bin: &Path, dir: &Path, websockets: bool) -> Res<Broker> {
    let mut attempt = 1;
    loop {
        match try_mosquitto(bin, dir, websockets) {
            Ok(b) => return Ok(b),
            // Exited at once: a free port was taken in between by another process.
            Err((true, _)) if attempt < 3 => attempt += 1,
            Err((_, e)) => return Err(e),
        }
    }
}

/// One attempt; the error says whether Mosquitto exited (worth another try on other ports).
fn try_mosquitto(bin: &Path, dir: &Path, websockets: bool) -> Result<Broker, (bool, String)> {
    let port = free_port();
    let ws_port = websockets.then(free_port);
    let log = dir.join("mosquitto.log");
    // Mosquitto appends to its log: a rerun into the same --out would count the previous
    // run's SUBSCRIBE/UNSUBSCRIBE lines too.
    let _ = std::fs::remove_file(&log);
    let conf = dir.join("mosquitto.conf");
    let mut text = format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence false\n\
         set_tcp_nodelay true\nmax_queued_messages 100000\nlog_dest file {}\nlog_type error\n\
         log_type warning\nlog_type notice\nlog_type subscribe\nlog_type unsubscribe\n",
        log.display()
    );
    if let Some(ws) = ws_port {
        text.push_str(&format!("listener {ws} 127.0.0.1\nprotocol websockets\n"));
    }
    std::fs::write(&conf, text).map_err(|e| (false, format!("write {}: {e}", conf.display())))?;
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| (false, format!("cannot start {}: {e} (apt-get install mosquitto)", bin.display())))?;
    let mut proc = Proc { child };
    let until = Instant::now() + Duration::from_secs(5);
    for p in std::iter::once(port).chain(ws_port) {
        while std::net::TcpStream::connect(("127.0.0.1", p)).is_err() {
            let exited = matches!(proc.child.try_wait(), Ok(Some(_)));
            if exited || Instant::now() > until {
                let why = if exited { "exited" } else { "did not listen" };
                return Err((exited, format!("mosquitto {why} on {p}; see {}", log.display())));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(Broker { proc, port, ws_port, log })
}

pub struct Instance {
    pub proc: Proc,
    pub port: u16,
    pub id: String,
}

/// The fanout binary under test: `--fanout PATH`, or the repository's `target/release/fanout`.
pub fn fanout_binary(given: Option<&Path>) -> Res<PathBuf> {
    let p = match given {
        Some(p) => p.to_path_buf(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/fanout"),
    };
    match p.canonicalize() {
        Ok(p) if p.is_file() => Ok(p),
        _ => Err(format!(
            "{} not found: build it (cargo build --release --bin fanout at the repository root) or pass --fanout PATH",
            p.display()
        )),
    }
}

/// How the instances under test are started.
pub struct InstanceArgs<'a> {
    pub bin: &'a Path,
    pub dir: &'a Path,
    /// instance i connects to `broker_ports[i % len]` (the nodes of a cluster, round-robin)
    pub broker_ports: Vec<u16>,
    pub secret: &'a str,
    pub threads: Option<usize>,
}

fn spawn_instance(a: &InstanceArgs, id: &str, broker_port: u16) -> Res<Instance> {
    let port = free_port();
    let log = std::fs::File::create(a.dir.join(format!("{id}.log"))).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(a.bin);
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")]);
    if let Some(t) = a.threads {
        cmd.args(["--worker-threads", &t.to_string()]);
    }
    let child = cmd
        .args(["--mqtt-url", &format!("mqtt://127.0.0.1:{broker_port}")])
        .args(["--instance-id", id, "--jwt-secret", a.secret])
        .args(["--rate-limit", "100000", "--rate-burst", "100000"])
        .args(["--max-connections", "1000000", "--publish-queue-bytes", "1GiB"])
        // FANOUT_BENCH_INSTANCE_LOG=info (say) to trace an instance; warn keeps logs small.
        .env("RUST_LOG", std::env::var("FANOUT_BENCH_INSTANCE_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", a.bin.display()))?;
    Ok(Instance { proc: Proc { child }, port, id: id.to_string() })
}

/// Starts `count` instances and waits until each answers `/readyz` with 200. An instance that
/// exits first (its free port was taken in between by another process on this shared machine)
/// is started again on another port, three times at most.
pub async fn start_instances(a: &InstanceArgs<'_>, count: usize) -> Res<Vec<Instance>> {
    let mut out = Vec::new();
    let port_of = |i: usize| a.broker_ports[i % a.broker_ports.len().max(1)];
    if a.broker_ports.is_empty() {
        return Err("no broker port".into());
    }
    for i in 0..count {
        out.push(spawn_instance(a, &format!("bench-{i}"), port_of(i))?);
    }
    for (i, inst) in out.iter_mut().enumerate() {
        let mut attempts = 1;
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok((200, _)) = http_get(inst.port, "/readyz").await {
                break;
            }
            if let Ok(Some(st)) = inst.proc.child.try_wait() {
                if attempts == 3 {
                    return Err(format!("instance {} exited ({st}); see {}/{}.log", inst.id, a.dir.display(), inst.id));
                }
                attempts += 1;
                *inst = spawn_instance(a, &inst.id, port_of(i))?;
                continue;
            }
            if Instant::now() > until {
                return Err(format!("instance {} not ready after 15 s", inst.id));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    Ok(out)
}

/// `GET path` on 127.0.0.1:port; returns (status, body). Handles chunked bodies crudely
/// (chunk-size lines stay in; callers only look for whole metric lines).
pub async fn http_get(port: u16, path: &str) -> Res<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or("bad HTTP response")?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), fut).await.map_err(|_| "HTTP timeout".to_string())?
}

/// Sum of the samples of `name` whose label set contains `label` (e.g. `source="mqtt"`).
pub fn metric(body: &str, name: &str, label: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn scrape(port: u16, name: &str, label: &str) -> Res<f64> {
    let (st, body) = http_get(port, "/metrics").await?;
    if st != 200 {
        return Err(format!("/metrics answered {st}"));
    }
    Ok(metric(&body, name, label))
}

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

/// VmRSS summed over processes, in KiB.
pub fn rss_kib_sum(pids: &[u32]) -> u64 {
    pids.iter().map(|p| rss_kib(*p)).sum()
}

/// utime + stime summed over processes, in seconds.
pub fn cpu_secs_sum(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_secs(*p)).sum()
}

/// utime + stime of a process, in seconds.
pub fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" of the command name: state is field 3; utime/stime are 14/15.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = clk_tck();
    let ut: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let st: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    (ut + st) / tick
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// This process's own user + system CPU seconds (getrusage).
pub fn self_cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// (busy, total) jiffies of the whole machine from /proc/stat.
pub fn machine_jiffies() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = s.lines().next() else { return (0.0, 0.0) };
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit (children inherit it). Returns the
/// resulting soft limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        let want = 1_048_576.max(r.rlim_max);
        let try_hard = libc::rlimit { rlim_cur: want, rlim_max: want };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &try_hard) == 0 {
            return want;
        }
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur
    }
}

/// 127.0.0.2, 127.0.0.3, … as client source addresses (each has its own ephemeral ports).
pub fn source_addrs(n: usize) -> Vec<IpAddr> {
    (0..n.max(1)).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8))).collect()
}

pub fn ws_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Counts SUBSCRIBE and UNSUBSCRIBE log lines for topics starting with `topic_prefix`
/// (Mosquitto logs `<ts>: <client> <qos> <topic>` and `<ts>: <client> <topic>`).
pub fn count_sub_unsub(log: &Path, topic_prefix: &str) -> (u64, u64) {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let (mut sub, mut unsub) = (0, 0);
    for line in s.lines() {
        let Some((_, rest)) = line.split_once(": ") else { continue };
        let parts: Vec<&str> = rest.split(' ').collect();
        match parts.as_slice() {
            [c, q, t] if c.starts_with("fanout-") && q.len() == 1 && t.starts_with(topic_prefix) => sub += 1,
            [c, t] if c.starts_with("fanout-") && t.starts_with(topic_prefix) => unsub += 1,
            _ => {}
        }
    }
    (sub, unsub)
}

pub fn write_file(path: &Path, text: &str) -> Res<()> {
    let mut f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes()).map_err(|e| e.to_string())
}
