//! What both test binaries share: a private Mosquitto per test ([`mosquitto`]), fanout
//! instances spawned from the real binary ([`instance`]), one raw HTTP/1.1 client ([`http`]),
//! a small WebSocket client ([`ws`]) and token minting. `tests/it` holds the fast tests (run in
//! parallel), `tests/e2e` the heavy or timing-sensitive ones (run one at a time by
//! scripts/test.sh). Nothing here depends on fanout's internal APIs.

pub mod http;
pub mod instance;
pub mod mosquitto;
pub mod ws;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

pub use http::{get, http, upgrade_attempt, HttpResponse};
pub use instance::{Instance, InstanceOpts};
pub use mosquitto::Mosquitto;
pub use ws::{Auth, Client};

/// How long a single expected frame may take to arrive.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);
pub const SECRET: &str = "integration-test-secret";

/// A port that was free a moment ago (bind :0, read it, drop the listener). Whoever binds it
/// next may lose a race: every launcher retries with a new port.
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

/// The first of `names` found in `$PATH` or the usual system directories.
pub fn find_program(names: &[&str]) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin", "/sbin", "/bin"].map(PathBuf::from));
    for name in names {
        if let Some(p) = dirs.iter().map(|d| d.join(name)).find(|p| p.exists()) {
            return p;
        }
    }
    panic!("none of {names:?} found: scripts/test.sh installs what the tests need");
}

/// A command for a process the test owns: it gets SIGKILL when the test thread that started
/// it goes away, so an interrupted or killed test run leaves nothing behind.
pub fn owned_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(program);
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent's.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

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

/// Finds `series` (name plus exact label text, e.g. `x_total{source="ws"}`) in Prometheus text.
pub fn parse_metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.split_whitespace().next()?.parse().ok())
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
