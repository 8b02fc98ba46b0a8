//! The embedded development broker (rumqttd), so `fanout` runs with no setup.
//!
//! It runs on its own OS threads (rumqttd has no shutdown API and blocks), listens on
//! `--embedded-mqtt-listen`, and fanout talks to it over loopback with the same rumqttc code
//! path as to an external broker. rumqttd keeps an in-memory log for every topic filter ever
//! subscribed, so its segments are kept tiny; it is for development, not production.

use std::collections::HashMap;
use std::net::SocketAddr;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Starts the broker on `addr` for payloads up to `max_payload` bytes and returns once it
/// accepts connections, so the bus's first connect succeeds (no "connection refused" on the
/// first screen). Fails at once (with a clear message) when the address cannot be bound.
pub async fn start(addr: SocketAddr, max_payload: usize) -> Result<(), String> {
    // rumqttd binds in a background thread and only logs a failure; probe first so a busy
    // port is a clear start-up error.
    std::net::TcpListener::bind(addr).map_err(|e| {
        format!("cannot listen on --embedded-mqtt-listen {addr}: {e} (another broker running? pass --mqtt-url to use it, or choose another address)")
    })?;
    let connections = ConnectionSettings {
        connection_timeout_ms: 5000,
        max_payload_size: max_payload,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "fanout-embedded".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 100_000,
            max_outgoing_packet_count: 1000,
            max_segment_size: (max_payload * 2).max(128 * 1024),
            max_segment_count: 1,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("v4".to_string(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("embedded-mqtt".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| format!("cannot start the embedded broker thread: {e}"))?;
    let target = if addr.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], addr.port())) } else { addr };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while tokio::net::TcpStream::connect(target).await.is_err() {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("the embedded broker did not start listening on {addr} within 5 s"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    Ok(())
}
