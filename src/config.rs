//! Settings for `fanout serve`: parsed from flags and their environment twins by clap,
//! then validated once into [`Config`]. Tests build a [`Config`] directly (or parse an
//! argument vector with [`ServeArgs`]), so nothing here reads the process environment
//! except clap's `env` fallback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

pub use crate::auth::AuthMode;

/// The development secret used when no `--jwt-secret` is given. It is public (it is in the
/// README), so any token signed with it is forgeable: fanout warns loudly when it is in use.
pub const DEV_SECRET: &str = "fanout-dev-secret-do-not-use-in-production";

/// Flags of `fanout serve` (each has an environment twin; the flag wins).
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// HTTP + WebSocket listen address.
    #[arg(long, env = "FANOUT_LISTEN", default_value = "127.0.0.1:3000")]
    pub listen: String,

    /// Path of the WebSocket endpoint.
    #[arg(long, env = "FANOUT_WS_PATH", default_value = "/entrypoint")]
    pub ws_path: String,

    /// External MQTT broker, mqtt://[user:pass@]host:port. Several nodes of one cluster are
    /// given comma-separated (or by repeating the flag): on link loss the instance moves to the
    /// next. When unset, fanout starts its embedded development broker on
    /// --embedded-mqtt-listen.
    #[arg(long, env = "FANOUT_MQTT_URL", value_delimiter = ',', num_args = 1..)]
    pub mqtt_url: Vec<String>,

    /// Where the embedded development broker listens (only without --mqtt-url), so that
    /// mosquitto_pub and other instances can reach it.
    #[arg(long, env = "FANOUT_EMBEDDED_MQTT_LISTEN", default_value = "127.0.0.1:1883")]
    pub embedded_mqtt_listen: String,

    /// User topic = prefix + user id.
    #[arg(long, env = "FANOUT_TOPIC_PREFIX", default_value = "msg/")]
    pub topic_prefix: String,

    /// Topic every instance subscribes to, for messages to all connected users.
    #[arg(long, env = "FANOUT_BROADCAST_TOPIC", default_value = "broadcast")]
    pub broadcast_topic: String,

    /// HS256 secret for verifying (and minting) tokens. Default: the public development
    /// secret, with a loud warning.
    #[arg(long, env = "FANOUT_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM file with an RSA or EC public key: verify RS256/ES256 tokens instead of HS256.
    #[arg(long, env = "FANOUT_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// Instance id, used in logs, metrics and the MQTT client id fanout-<id>. Default: random.
    #[arg(long, env = "FANOUT_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// Largest inbound WebSocket message in bytes; bigger ones close the socket with 1009.
    #[arg(long, env = "FANOUT_MAX_MESSAGE_BYTES", default_value_t = 65536)]
    pub max_message_bytes: usize,

    /// Per-connection outbound queue bound, in bytes of queued frames. A connection whose
    /// queue would exceed it is closed with 4008 (slow consumer).
    #[arg(long, env = "FANOUT_SEND_QUEUE", default_value_t = 1 << 20)]
    pub send_queue: usize,

    /// Chat messages per second per connection, sustained (each recipient counts).
    #[arg(long, env = "FANOUT_RATE_LIMIT", default_value_t = 20.0)]
    pub rate_limit: f64,

    /// Token-bucket capacity: at most this many messages at once, refilled at --rate-limit per
    /// second. Each recipient of a frame costs one token (a broadcast costs one); a frame that
    /// costs more than the tokens left is refused whole.
    #[arg(long, env = "FANOUT_RATE_BURST", default_value_t = 100)]
    pub rate_burst: u32,

    /// Most simultaneous WebSocket connections on this instance; beyond it upgrades get 503.
    #[arg(long, env = "FANOUT_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Most simultaneous connections of one user on this instance; beyond it upgrades get 429.
    #[arg(long, env = "FANOUT_MAX_CONNECTIONS_PER_USER", default_value_t = 32)]
    pub max_connections_per_user: usize,

    /// How long a chat message may wait for room toward the broker before the sender gets
    /// `unavailable`, and how long a new connection waits for its subscription before 1013.
    #[arg(long, env = "FANOUT_BROKER_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub broker_timeout: Duration,

    /// Bytes of accepted messages that may wait for the broker (e.g. while it is unreachable),
    /// counted until the broker acknowledges them. When full, a sender waits --broker-timeout
    /// for room, then gets `unavailable` (never an ack). Units: 64MiB, 512KiB, 1GB or bytes.
    #[arg(long, env = "FANOUT_PUBLISH_QUEUE_BYTES", default_value = "64MiB", value_parser = parse_bytes)]
    pub publish_queue_bytes: u64,

    /// At shutdown, how long accepted messages still waiting for the broker may take to be
    /// delivered (for example while the broker link comes back) before they are given up;
    /// then the broker session ends. Give the orchestrator's grace period 5 s more than this.
    #[arg(long, env = "FANOUT_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Threads that run connections; 0 = one per CPU core. Several instances sharing a host
    /// do best with cores / instances each (fewer threads to wake per message).
    #[arg(long, env = "FANOUT_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,

    /// Enables POST /api/publish with this bearer key.
    #[arg(long, env = "FANOUT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Log format; levels come from RUST_LOG (default info).
    #[arg(long, env = "FANOUT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A broker (or one node of a broker cluster) fanout talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerTarget {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl BrokerTarget {
    /// `host:port`, as logs, `/readyz` and metrics name the node in use.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Validated settings of one instance.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub ws_path: String,
    /// The broker, or the nodes of one broker cluster in the order they are tried (never empty).
    pub brokers: Vec<BrokerTarget>,
    /// `Some(addr)` when the embedded development broker must be started on `addr`.
    pub embedded_broker: Option<SocketAddr>,
    pub topic_prefix: String,
    pub broadcast_topic: String,
    pub auth: AuthMode,
    pub instance_id: String,
    pub max_message_bytes: usize,
    pub send_queue_bytes: usize,
    pub rate_limit: f64,
    pub rate_burst: u32,
    pub api_key: Option<String>,
    pub log_format: LogFormat,
    pub max_connections: usize,
    pub max_connections_per_user: usize,
    /// Bytes of accepted publishes that may wait for the broker's acknowledgement.
    pub publish_queue_bytes: usize,
    /// Runtime worker threads; 0 = one per core.
    pub worker_threads: usize,
    /// How long accepted messages may take to reach the broker at shutdown.
    pub shutdown_grace: Duration,
    /// Server ping interval; a peer silent for `idle_timeout` is dropped.
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    /// How long a new connection waits for the broker to confirm its subscription (then 1013),
    /// and how long a publish waits for room toward the broker (then `unavailable`).
    pub broker_wait: Duration,
}

/// A configuration error: names the flag / variable and says what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn bad(flag: &str, env: &str, what: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("invalid {flag} (env {env}): {what}"))
}

impl ServeArgs {
    /// Validate into a [`Config`]. Reads the public key file, nothing else.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let listen = parse_addr(&self.listen)
            .map_err(|e| bad("--listen", "FANOUT_LISTEN", format!("{e}; expected host:port like 127.0.0.1:3000")))?;
        if !self.ws_path.starts_with('/') {
            return Err(bad("--ws-path", "FANOUT_WS_PATH", "must start with '/', e.g. /entrypoint"));
        }
        let urls: Vec<&str> = self.mqtt_url.iter().map(|u| u.trim()).filter(|u| !u.is_empty()).collect();
        let (brokers, embedded_broker) = match urls.as_slice() {
            [_, ..] => {
                let mut brokers = Vec::with_capacity(urls.len());
                for url in &urls {
                    let b = parse_mqtt_url(url).map_err(|e| bad("--mqtt-url", "FANOUT_MQTT_URL", e))?;
                    if brokers.contains(&b) {
                        return Err(bad("--mqtt-url", "FANOUT_MQTT_URL", format!("'{url}' is given twice")));
                    }
                    brokers.push(b);
                }
                (brokers, None)
            }
            [] => {
                let addr = parse_addr(&self.embedded_mqtt_listen).map_err(|e| {
                    bad(
                        "--embedded-mqtt-listen",
                        "FANOUT_EMBEDDED_MQTT_LISTEN",
                        format!("{e}; expected host:port like 127.0.0.1:1883"),
                    )
                })?;
                if !addr.ip().is_loopback() {
                    return Err(bad(
                        "--embedded-mqtt-listen",
                        "FANOUT_EMBEDDED_MQTT_LISTEN",
                        format!("{addr} is not a loopback address, and the embedded development broker has no authentication (anyone could read and forge messages): keep it on 127.0.0.1, or run Mosquitto and pass --mqtt-url"),
                    ));
                }
                if !cfg!(feature = "embedded-broker") {
                    return Err(ConfigError(
                        "no --mqtt-url (env FANOUT_MQTT_URL) given and this build has no embedded broker: pass --mqtt-url mqtt://host:1883".into(),
                    ));
                }
                let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
                (vec![BrokerTarget { host, port: addr.port(), username: None, password: None }], Some(addr))
            }
        };
        check_topic_part(&self.topic_prefix).map_err(|e| bad("--topic-prefix", "FANOUT_TOPIC_PREFIX", e))?;
        check_topic_part(&self.broadcast_topic).map_err(|e| bad("--broadcast-topic", "FANOUT_BROADCAST_TOPIC", e))?;
        if self.broadcast_topic.starts_with(&self.topic_prefix) {
            return Err(bad(
                "--broadcast-topic",
                "FANOUT_BROADCAST_TOPIC",
                "must not start with --topic-prefix (it would be a user topic)",
            ));
        }
        let auth = match (&self.jwt_public_key, &self.jwt_secret) {
            (Some(path), _) => {
                let pem = std::fs::read(path).map_err(|e| {
                    bad("--jwt-public-key", "FANOUT_JWT_PUBLIC_KEY", format!("cannot read {}: {e}", path.display()))
                })?;
                crate::auth::Verifier::from_public_pem(&pem).map_err(|e| {
                    bad("--jwt-public-key", "FANOUT_JWT_PUBLIC_KEY", format!("{}: {e}", path.display()))
                })?;
                AuthMode::PublicKey { pem, path: path.clone() }
            }
            (None, Some(s)) if s.is_empty() => {
                return Err(bad("--jwt-secret", "FANOUT_JWT_SECRET", "must not be empty"));
            }
            (None, Some(s)) => AuthMode::Secret { secret: s.clone(), dev: s == DEV_SECRET },
            (None, None) => AuthMode::Secret { secret: DEV_SECRET.to_string(), dev: true },
        };
        if matches!(auth, AuthMode::Secret { dev: true, .. }) && !listen.ip().is_loopback() {
            return Err(bad(
                "--jwt-secret",
                "FANOUT_JWT_SECRET",
                format!(
                    "the built-in development secret is public and --listen {listen} is not a loopback address: set --jwt-secret (or --jwt-public-key), or listen on 127.0.0.1"
                ),
            ));
        }
        let instance_id = match self.instance_id {
            Some(id) => {
                if id.is_empty()
                    || id.len() > 64
                    || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
                {
                    return Err(bad("--instance-id", "FANOUT_INSTANCE_ID", "use 1-64 characters of [A-Za-z0-9._-]"));
                }
                id
            }
            None => uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
        };
        if self.max_message_bytes < 64 || self.max_message_bytes > 16 << 20 {
            return Err(bad("--max-message-bytes", "FANOUT_MAX_MESSAGE_BYTES", "must be between 64 and 16777216"));
        }
        if self.send_queue < 1024 {
            return Err(bad("--send-queue", "FANOUT_SEND_QUEUE", "must be at least 1024 (bytes)"));
        }
        if !(self.rate_limit > 0.0 && self.rate_limit.is_finite()) {
            return Err(bad("--rate-limit", "FANOUT_RATE_LIMIT", "must be a positive number of messages per second"));
        }
        if self.rate_burst == 0 {
            return Err(bad("--rate-burst", "FANOUT_RATE_BURST", "must be at least 1"));
        }
        if self.max_connections == 0 {
            return Err(bad("--max-connections", "FANOUT_MAX_CONNECTIONS", "must be at least 1"));
        }
        if self.max_connections_per_user == 0 {
            return Err(bad("--max-connections-per-user", "FANOUT_MAX_CONNECTIONS_PER_USER", "must be at least 1"));
        }
        if self.broker_timeout.is_zero() || self.broker_timeout > Duration::from_secs(300) {
            return Err(bad("--broker-timeout", "FANOUT_BROKER_TIMEOUT", "must be between 1ms and 5m, e.g. 5s"));
        }
        // The queue is a semaphore of u32 permits; it must hold at least one largest publish.
        let one = crate::bus::cost(&format!("{}{}", self.topic_prefix, "u".repeat(256)), &[])
            + self.max_message_bytes
            + crate::bus::ENVELOPE_SLACK;
        if self.publish_queue_bytes < one as u64 || self.publish_queue_bytes > u64::from(u32::MAX) {
            return Err(bad(
                "--publish-queue-bytes",
                "FANOUT_PUBLISH_QUEUE_BYTES",
                format!("must be at least {one} bytes (one largest message) and below 4GiB, e.g. 64MiB"),
            ));
        }
        if self.shutdown_grace.is_zero() || self.shutdown_grace > Duration::from_secs(600) {
            return Err(bad("--shutdown-grace", "FANOUT_SHUTDOWN_GRACE", "must be between 1ms and 10m, e.g. 10s"));
        }
        if self.worker_threads > 1024 {
            return Err(bad("--worker-threads", "FANOUT_WORKER_THREADS", "must be between 0 (one per core) and 1024"));
        }
        if matches!(&self.api_key, Some(k) if k.len() < 16) {
            return Err(bad("--api-key", "FANOUT_API_KEY", "must be at least 16 characters"));
        }
        Ok(Config {
            listen,
            ws_path: self.ws_path,
            brokers,
            embedded_broker,
            topic_prefix: self.topic_prefix,
            broadcast_topic: self.broadcast_topic,
            auth,
            instance_id,
            max_message_bytes: self.max_message_bytes,
            send_queue_bytes: self.send_queue,
            rate_limit: self.rate_limit,
            rate_burst: self.rate_burst,
            api_key: self.api_key,
            log_format: self.log_format,
            max_connections: self.max_connections,
            max_connections_per_user: self.max_connections_per_user,
            publish_queue_bytes: self.publish_queue_bytes as usize,
            worker_threads: self.worker_threads,
            shutdown_grace: self.shutdown_grace,
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            broker_wait: self.broker_timeout,
        })
    }
}

/// A byte size: `64MiB`, `512 KiB`, `1GB` or a plain number of bytes.
fn parse_bytes(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("'{s}' is not a size ({e}); e.g. 64MiB, 512KiB or 1048576"))
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.to_socket_addrs()
        .map_err(|e| format!("'{s}': {e}"))?
        .next()
        .ok_or_else(|| format!("'{s}' resolves to no address"))
}

/// `mqtt://[user:pass@]host[:port]` or `mqtts://…`; also `tcp://` as an alias of `mqtt://`.
pub fn parse_mqtt_url(s: &str) -> Result<BrokerTarget, String> {
    let url = url::Url::parse(s).map_err(|e| format!("'{s}' is not a URL ({e}); expected mqtt://host:1883"))?;
    let tls = match url.scheme() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" => true,
        other => return Err(format!("scheme '{other}' is not supported; use mqtt:// or mqtts://")),
    };
    if tls {
        return Err("mqtts:// needs TLS support, which this build does not include; use mqtt:// (or terminate TLS in front of the broker)".into());
    }
    let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| format!("'{s}' has no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    if url.path() != "" && url.path() != "/" {
        return Err(format!("'{s}' has a path; expected mqtt://host:port"));
    }
    let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
    // Userinfo is percent-decoded per RFC 3986 (`+` stays `+`, `&` is an ordinary character);
    // form decoding would turn `+` into a space and cut at `&`.
    let decode = |what: &str, v: &str| {
        percent_encoding::percent_decode_str(v)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| format!("the {what} in '{s}' is not UTF-8 once percent-decoded"))
    };
    let username = if url.username().is_empty() { None } else { Some(decode("user name", url.username())?) };
    let password = url.password().map(|p| decode("password", p)).transpose()?;
    Ok(BrokerTarget { host, port, username, password })
}

/// A topic prefix or the broadcast topic. Neither may be empty: with an empty prefix a user
/// id would be a whole topic (a user named like the broadcast topic could broadcast, or
/// unsubscribe it when leaving).
fn check_topic_part(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.contains(['+', '#', '\0']) {
        return Err("must not contain the MQTT wildcards + or # (or NUL)".into());
    }
    if s.starts_with('$') {
        return Err("must not start with $ (reserved for the broker)".into());
    }
    // Mosquitto disconnects a client that publishes to such a topic: every publish would
    // then cost a reconnect.
    if s.chars().any(|c| c.is_control() || crate::auth::is_noncharacter(c)) {
        return Err("must not contain control characters or Unicode noncharacters".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut v = vec!["fanout"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map_err(|e| ConfigError(e.to_string()))?.serve.validate()
    }

    #[test]
    fn defaults_use_embedded_broker_and_dev_secret() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:3000");
        assert_eq!(c.embedded_broker.unwrap().to_string(), "127.0.0.1:1883");
        assert!(matches!(c.auth, AuthMode::Secret { dev: true, .. }));
        assert_eq!(c.topic_prefix, "msg/");
        assert_eq!(c.broadcast_topic, "broadcast");
        assert_eq!(c.instance_id.len(), 12);
    }

    #[test]
    fn mqtt_url_with_credentials() {
        let t = parse_mqtt_url("mqtt://u%40x:p%3Aw@broker.example:1884").unwrap();
        assert_eq!(t.host, "broker.example");
        assert_eq!(t.port, 1884);
        assert_eq!(t.username.as_deref(), Some("u@x"));
        assert_eq!(t.password.as_deref(), Some("p:w"));
        assert_eq!(parse_mqtt_url("mqtt://h").unwrap().port, 1883);
        // RFC 3986 userinfo: `+` and `&` are themselves, %2B is `+` too.
        let t = parse_mqtt_url("mqtt://u:a+b&c@host").unwrap();
        assert_eq!(t.password.as_deref(), Some("a+b&c"));
        let t = parse_mqtt_url("mqtt://us%20er:a%2Bb%26c%3D@host").unwrap();
        assert_eq!((t.username.as_deref(), t.password.as_deref()), (Some("us er"), Some("a+b&c=")));
        assert!(parse_mqtt_url("mqtt://u:%FF@host").unwrap_err().contains("password"));
    }

    #[test]
    fn publish_queue_bytes_takes_units_and_must_hold_one_message() {
        assert_eq!(parse(&[]).unwrap().publish_queue_bytes, 64 << 20);
        assert_eq!(parse(&["--publish-queue-bytes", "512KiB"]).unwrap().publish_queue_bytes, 512 << 10);
        assert_eq!(parse(&["--publish-queue-bytes", "1000000"]).unwrap().publish_queue_bytes, 1_000_000);
        for bad in ["10", "5GiB", "lots"] {
            let e = parse(&["--publish-queue-bytes", bad]).unwrap_err().to_string();
            assert!(e.contains("--publish-queue-bytes") || e.contains("not a size"), "{bad}: {e}");
        }
        assert_eq!(parse(&[]).unwrap().rate_burst, 100);
    }

    #[test]
    fn the_embedded_broker_only_listens_on_loopback() {
        assert!(parse(&["--embedded-mqtt-listen", "127.0.0.1:0"]).is_ok());
        let e = parse(&["--embedded-mqtt-listen", "0.0.0.0:1883"]).unwrap_err().to_string();
        assert!(e.contains("--embedded-mqtt-listen") && e.contains("authentication"), "{e}");
        // With an external broker the embedded listen address is not used.
        assert!(parse(&["--embedded-mqtt-listen", "0.0.0.0:1883", "--mqtt-url", "mqtt://b"]).is_ok());
    }

    #[test]
    fn the_development_secret_only_serves_loopback() {
        assert!(parse(&["--listen", "127.0.0.1:0"]).is_ok());
        assert!(parse(&["--listen", "[::1]:0"]).is_ok());
        let e = parse(&["--listen", "0.0.0.0:3000"]).unwrap_err().to_string();
        assert!(e.contains("--jwt-secret") && e.contains("loopback"), "{e}");
        assert!(parse(&["--listen", "0.0.0.0:3000", "--jwt-secret", "s3cret-s3cret"]).is_ok());
        // Passing the public development secret by hand is the same hole.
        assert!(parse(&["--listen", "0.0.0.0:3000", "--jwt-secret", DEV_SECRET]).is_err());
    }

    #[test]
    fn several_mqtt_urls_are_the_nodes_of_one_cluster() {
        let c = parse(&["--mqtt-url", "mqtt://a:1883,mqtt://u:p@b:1884", "--mqtt-url", "mqtt://c"]).unwrap();
        let nodes: Vec<String> = c.brokers.iter().map(BrokerTarget::address).collect();
        assert_eq!(nodes, ["a:1883", "b:1884", "c:1883"]);
        assert_eq!(c.brokers[1].password.as_deref(), Some("p"));
        assert!(c.embedded_broker.is_none());
        let e = parse(&["--mqtt-url", "mqtt://a:1883,mqtt://a:1883"]).unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");
        let e = parse(&["--mqtt-url", "mqtt://a:1883,http://b"]).unwrap_err().to_string();
        assert!(e.contains("--mqtt-url"), "{e}");
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (args, flag) in [
            (&["--mqtt-url", "http://x"][..], "--mqtt-url"),
            (&["--mqtt-url", "not a url"][..], "--mqtt-url"),
            (&["--listen", "nope"][..], "--listen"),
            (&["--ws-path", "x"][..], "--ws-path"),
            (&["--jwt-public-key", "/nonexistent.pem"][..], "--jwt-public-key"),
            (&["--jwt-secret", ""][..], "--jwt-secret"),
            (&["--topic-prefix", "a/#/"][..], "--topic-prefix"),
            (&["--instance-id", "a b"][..], "--instance-id"),
            (&["--topic-prefix", "m\u{7}/"][..], "--topic-prefix"),
            (&["--broadcast-topic", "all\u{FFFF}"][..], "--broadcast-topic"),
            (&["--rate-limit", "0"][..], "--rate-limit"),
            (&["--topic-prefix", ""][..], "--topic-prefix"),
            (&["--broadcast-topic", ""][..], "--broadcast-topic"),
            (&["--topic-prefix", "m/", "--broadcast-topic", "m/all"][..], "--broadcast-topic"),
        ] {
            let e = parse(args).unwrap_err().to_string();
            assert!(e.contains(flag), "{args:?}: {e}");
        }
    }
}
