//! What operators see: `--log-format json` lines (one object per line, connection fields from
//! the span, connect/disconnect at info and nothing per message), configuration errors (exit 2,
//! one line naming the flag), and the start-up summary.

use std::process::Command;
use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_connection_fields_and_nothing_per_message_at_info() {
    let m = Mosquitto::start();
    let mut a = Instance::start(InstanceOpts::broker(&m).arg("--log-format").arg("json")).await;
    let (alice, bob) = (unique("alice-"), unique("bob-"));
    let mut ca = a.connect(&alice).await;
    let mut cb = a.connect(&bob).await;
    let conn_a = ca.connected["connectionId"].clone();
    for i in 0..5 {
        ca.chat_acked(&bob, json!(format!("m{i}")), &format!("c{i}")).await;
        cb.expect_event("chat_message").await;
    }
    ca.close().await;
    drop(cb); // gone without a close frame
    wait_until("two disconnect lines", Duration::from_secs(10), || a.output().matches("\"disconnected\"").count() >= 2)
        .await;
    // A clean shutdown exits 0 (docs/protocol.md §10.4) and says so, in JSON too.
    let status = a.terminate(Duration::from_secs(12)).await.expect("no exit within 12 s of SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status:?}");

    let out = a.output();
    let lines: Vec<Value> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {l}")))
        .collect();
    assert!(lines.iter().all(|v| v.is_object() && v["level"].is_string() && v["timestamp"].is_string()));
    assert!(lines.iter().any(|v| v["message"].as_str().is_some_and(|m| m.contains("starting"))), "start-up summary");
    assert_eq!(lines.last().unwrap()["message"], json!("stopped"), "the last line after SIGTERM");

    let of = |user: &str, msg: &str| -> Vec<&Value> {
        lines.iter().filter(|v| v["span"]["user_id"] == json!(user) && v["message"] == json!(msg)).collect()
    };
    for user in [&alice, &bob] {
        let connected = of(user, "connected");
        assert_eq!(connected.len(), 1, "{user}: one connect line\n{out}");
        let c = connected[0];
        assert_eq!(c["level"], json!("INFO"));
        assert_eq!(c["span"]["instance_id"], json!(a.id), "{c}");
        assert!(c["span"]["conn_id"].as_str().is_some_and(|s| s.len() == 36), "{c}");
        let gone = of(user, "disconnected");
        assert_eq!(gone.len(), 1, "{user}: one disconnect line\n{out}");
        let d = gone[0];
        assert_eq!(d["level"], json!("INFO"));
        assert_eq!(d["span"]["conn_id"], c["span"]["conn_id"], "same connection");
        assert!(d["close_code"].as_u64().is_some(), "disconnect has the close code: {d}");
        assert!(d["duration_ms"].as_u64().is_some(), "disconnect has the duration: {d}");
    }
    assert_eq!(of(&alice, "connected")[0]["span"]["conn_id"], conn_a);
    // Ten chat frames in and out: no info line per message, from any target.
    let info_after_start: Vec<&Value> = lines
        .iter()
        .filter(|v| v["level"] == json!("INFO") && v["span"]["user_id"].is_string())
        .filter(|v| !["connected", "disconnected"].contains(&v["message"].as_str().unwrap_or("")))
        .collect();
    assert!(info_after_start.is_empty(), "per-connection info lines besides connect/disconnect: {info_after_start:?}");
}

fn run(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fanout"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("FANOUT_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run fanout")
}

#[test]
fn configuration_errors_exit_2_with_one_line_naming_the_flag() {
    for (args, env, names) in [
        (&["--mqtt-url", "http://broker:1883"][..], &[][..], "--mqtt-url"),
        (&[][..], &[("FANOUT_MQTT_URL", "not a url")][..], "FANOUT_MQTT_URL"),
        (&["--listen", "nowhere"][..], &[][..], "--listen"),
        (&["--jwt-public-key", "/nonexistent/key.pem"][..], &[][..], "--jwt-public-key"),
        (&["--api-key", "short"][..], &[][..], "--api-key"),
        (&["--broker-timeout", "0s"][..], &[][..], "--broker-timeout"),
        (&["serve", "--send-queue", "10"][..], &[][..], "--send-queue"),
        (&["--worker-threads", "5000"][..], &[][..], "--worker-threads"),
        // The public development secret never serves beyond loopback (the Docker image listens
        // on 0.0.0.0: without a secret it must not start).
        (&["--listen", "0.0.0.0:0"][..], &[][..], "--jwt-secret"),
        (&[][..], &[("FANOUT_LISTEN", "0.0.0.0:0")][..], "--jwt-secret"),
        (&["--topic-prefix", ""][..], &[][..], "--topic-prefix"),
        (&["--publish-queue-bytes", "12"][..], &[][..], "--publish-queue-bytes"),
        (&["--publish-queue-bytes", "lots"][..], &[][..], "--publish-queue-bytes"),
    ] {
        let out = run(args, env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line, got {err:?}");
        assert!(lines[0].contains(names), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // `token` and `check-token` validate the same settings.
    let out = run(&["token", "alice", "--jwt-public-key", "/nonexistent/key.pem"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&["check-token", "a.b.c", "--jwt-secret", ""], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

fn threads_of(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let line = status.lines().find(|l| l.starts_with("Threads:")).expect("Threads line");
    line["Threads:".len()..].trim().parse().expect("thread count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_sets_the_runtime_size_and_one_thread_serves_chat() {
    let m = Mosquitto::start();
    let (one, six) = tokio::join!(
        Instance::start(InstanceOpts::broker(&m).arg("--worker-threads").arg("1")),
        Instance::start(InstanceOpts::broker(&m).arg("--worker-threads").arg("6")),
    );
    // Worker threads are started with the runtime; blocking-pool threads come and go.
    let (t1, t6) = (threads_of(one.pid()), threads_of(six.pid()));
    assert!(t6 >= t1 + 5, "--worker-threads 6 has {t6} threads, --worker-threads 1 has {t1}");
    let mut alice = one.connect("alice").await;
    let mut bob = six.connect("bob").await;
    let mut carol = one.connect("carol").await;
    alice.chat_acked("bob", json!("to six"), "w-1").await;
    assert_eq!(bob.expect_event("chat_message").await["message"], json!("to six"));
    bob.chat_acked("carol", json!("to one"), "w-2").await;
    assert_eq!(carol.expect_event("chat_message").await["message"], json!("to one"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_exits_1_with_a_clear_line() {
    let m = Mosquitto::start();
    let a = Instance::start(InstanceOpts::broker(&m)).await;
    let out = run(&["--listen", &format!("127.0.0.1:{}", a.port), "--mqtt-url", &m.url(), "--jwt-secret", "s"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line, not {}: {err}", lines.len());
    assert!(lines[0].starts_with("fanout: cannot listen on --listen") && lines[0].contains("in use"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn check_token_explains_expiry_and_a_foreign_secret() {
    // tests/auth.rs covers accept/reject exit codes; here: the reasons are specific.
    let expired = token(SECRET, "alice", -3600, None);
    let out = run(&["check-token", &expired, "--jwt-secret", SECRET], &[]);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(said.contains("rejected") && said.contains("expired"), "{said}");
    let foreign = token("another-secret", "alice", 600, None);
    let out = run(&["check-token", &foreign, "--jwt-secret", SECRET], &[]);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(said.contains("signature"), "{said}");
    // The development secret (no flags) accepts what `fanout token` minted with it.
    let minted = run(&["token", "dev-user", "--ttl", "5m"], &[]);
    assert_eq!(minted.status.code(), Some(0));
    let t = String::from_utf8_lossy(&minted.stdout).trim().to_string();
    let out = run(&["check-token", &t], &[]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("\"dev-user\"") && said.contains("broadcast scope: no"), "{said}");
}

/// Metric family names (`# TYPE <name> <type>`) in OpenMetrics text; counters get `_total`.
fn families(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, ty)| if ty == "counter" { format!("{name}_total") } else { name.to_string() })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_doc_and_dashboard_match_the_served_metrics() {
    let m = Mosquitto::start();
    let a = Instance::start(InstanceOpts::broker(&m)).await;
    let text = a.metrics().await;
    let served = families(&text);
    assert!(served.len() >= 20, "{served:?}");
    let doc = include_str!("../../docs/operations.md");
    for f in &served {
        assert!(doc.contains(&format!("`{f}")), "docs/operations.md does not describe {f}");
    }
    for reason in ["slow_consumer", "rate_limited", "unavailable", "duplicate", "no_local_user", "unknown_topic"] {
        assert!(text.contains(&format!("fanout_dropped_total{{reason=\"{reason}\"}}")), "{reason} not served");
        assert!(doc.contains(&format!("| `{reason}` |")), "docs/operations.md does not explain reason {reason}");
    }
    // Every series a dashboard query uses is served (histograms by their _bucket series).
    let dash: Value = serde_json::from_str(include_str!("../../dashboards/fanout.json")).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                if let Some(Value::String(e)) = o.get("expr") {
                    out.push(e.clone());
                }
                o.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&dash, &mut exprs);
    assert!(exprs.len() >= 20, "{exprs:?}");
    let mut used = std::collections::BTreeSet::new();
    for e in &exprs {
        let mut rest = e.as_str();
        while let Some(i) = rest.find("fanout_") {
            let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            rest = &rest[i + name.len()..];
            used.insert(name);
        }
    }
    for name in &used {
        let family = name.trim_end_matches("_bucket");
        let ok = served.iter().any(|f| f == name || f == family);
        assert!(ok, "dashboard uses {name}, which /metrics does not serve");
    }
    for f in &served {
        assert!(used.iter().any(|u| u.starts_with(f.as_str())), "dashboard does not show {f}");
    }
}
