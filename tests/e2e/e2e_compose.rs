//! compose.yaml is validated without a Docker engine: `docker-compose config` (Debian's
//! docker-compose, installed by scripts/test.sh) parses and checks it against the Compose
//! schema, and the resolved model is checked for what the stack promises. The Dockerfile and
//! the config files it mounts are checked for the facts compose relies on. The image build
//! itself is not run here (no engine).

use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};

use crate::support::find_program;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn compose_config(secret: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(find_program(&["docker-compose"]));
    cmd.current_dir(root()).args(["-f", "compose.yaml", "config"]).env_remove("FANOUT_JWT_SECRET");
    // Never talk to an engine: `config` does not, and no DOCKER_HOST should make it try.
    cmd.env_remove("DOCKER_HOST");
    if let Some(s) = secret {
        cmd.env("FANOUT_JWT_SECRET", s);
    }
    cmd.output().expect("run docker-compose")
}

/// The resolved compose model as JSON (YAML → JSON with python3's yaml, which docker-compose
/// itself depends on).
fn resolved_model() -> Value {
    let out = compose_config(Some("compose-test-secret"));
    assert!(
        out.status.success(),
        "docker-compose config rejected compose.yaml:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut py = Command::new("python3")
        .args(["-c", "import sys, json, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    py.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let json = py.wait_with_output().unwrap();
    assert!(json.status.success(), "python3 yaml → json failed");
    serde_json::from_slice(&json.stdout).expect("json")
}

#[test]
fn compose_yaml_is_valid_and_describes_the_stack() {
    let m = resolved_model();
    let s = &m["services"];
    let names: Vec<&String> = s.as_object().expect("services").keys().collect();
    assert_eq!(names, ["fanout", "mosquitto", "nginx"], "services");

    // fanout: 5 replicas built from the Dockerfile, pointed at the stack's broker.
    let f = &s["fanout"];
    assert_eq!(f["deploy"]["replicas"], json!(5), "fanout replicas");
    assert_eq!(f["build"]["dockerfile"], json!("Dockerfile"));
    assert_eq!(f["environment"]["FANOUT_MQTT_URL"], json!("mqtt://mosquitto:1883"));
    assert_eq!(f["environment"]["FANOUT_LISTEN"], json!("0.0.0.0:3000"));
    assert_eq!(f["environment"]["FANOUT_JWT_SECRET"], json!("compose-test-secret"));
    assert!(f.get("ports").is_none(), "instances are reached through nginx only: {f}");
    assert_eq!(f["healthcheck"]["test"], json!(["CMD", "fanout-healthcheck"]));
    assert_eq!(f["depends_on"]["mosquitto"]["condition"], json!("service_healthy"));

    // nginx: the only published port, 3000, with our config; waits for healthy instances.
    let n = &s["nginx"];
    assert_eq!(n["ports"][0]["published"].as_u64(), Some(3000), "nginx ports: {}", n["ports"]);
    assert_eq!(n["ports"][0]["target"].as_u64(), Some(3000), "nginx ports: {}", n["ports"]);
    assert!(n["volumes"][0].as_str().unwrap_or_default().ends_with("/nginx/nginx.conf:/etc/nginx/nginx.conf:ro"));
    assert_eq!(n["depends_on"]["fanout"]["condition"], json!("service_healthy"));

    // mosquitto: our config, and no port published outside the stack (no anonymous access
    // from outside).
    let q = &s["mosquitto"];
    assert!(q.get("ports").is_none(), "the broker must not be published: {q}");
    assert!(q["volumes"][0]
        .as_str()
        .unwrap_or_default()
        .ends_with("/mosquitto/mosquitto.conf:/mosquitto/config/mosquitto.conf:ro"));

    // The mounted files agree with the model: the broker listens on 1883, nginx proxies to
    // fanout:3000 and listens on 3000.
    let mconf = read("mosquitto/mosquitto.conf");
    assert!(mconf.lines().any(|l| l.trim() == "listener 1883"), "mosquitto listener");
    let nconf = read("nginx/nginx.conf");
    assert!(nconf.contains("server fanout:3000 "), "nginx upstream");
    assert!(nconf.contains("listen 3000;"), "nginx listen");
}

#[test]
fn compose_refuses_to_start_without_a_jwt_secret() {
    let out = compose_config(None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "compose must demand FANOUT_JWT_SECRET");
    assert!(err.contains("FANOUT_JWT_SECRET"), "the error names the variable: {err}");
}

#[test]
fn dockerfile_is_multi_stage_non_root_with_a_readyz_healthcheck() {
    let d = read("Dockerfile");
    let froms: Vec<&str> = d.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    let runtime = &d[d.rfind("\nFROM ").unwrap()..];
    let user = runtime.lines().find_map(|l| l.strip_prefix("USER ")).expect("USER in the runtime stage");
    let uid = user.split(':').next().unwrap().trim();
    assert!(uid != "0" && uid != "root", "runtime user must not be root: {user}");
    assert!(runtime.contains("COPY --from="), "runtime stage copies the binary from the build stage");
    assert!(runtime.contains("/readyz") && runtime.contains("fanout-healthcheck"), "health check script on /readyz");
    assert!(d.contains("--locked"), "build with the lock file");
    let ignore = read(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim_end_matches('/') == "target"), ".dockerignore must skip target/");
}
