//! Wires hub, bus, sessions and routes together, serves until SIGINT/SIGTERM, then shuts
//! down in the order of spec §7: readiness 503 and no new upgrades → every socket closed
//! with 1001 → user topics unsubscribed → everything acked handed to the broker → broker
//! session ended → exit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::auth::Verifier;
use crate::bus::Bus;
use crate::config::{AuthMode, Config};
use crate::gateway::Gateway;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::session::Shared;

/// Longest wait for sessions to close, and for the broker session to end, at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Resolves on SIGINT or SIGTERM.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn summary(cfg: &Config, verifier: &Verifier) {
    let broker = match cfg.embedded_broker {
        Some(a) => format!("embedded (development only) on mqtt://{a}"),
        None => format!("mqtt://{}:{}", cfg.broker.host, cfg.broker.port),
    };
    let auth = match &cfg.auth {
        AuthMode::Secret { dev: true, .. } => "HS256 with the PUBLIC DEVELOPMENT SECRET".to_string(),
        AuthMode::Secret { .. } => "HS256 with --jwt-secret".to_string(),
        AuthMode::PublicKey { path, .. } => format!("{} with public key {}", verifier.algorithm(), path.display()),
    };
    info!(
        listen = %cfg.listen,
        ws_path = %cfg.ws_path,
        broker = %broker,
        topics = %format!("{}<user_id>, {}", cfg.topic_prefix, cfg.broadcast_topic),
        auth = %auth,
        max_message_bytes = cfg.max_message_bytes,
        send_queue_bytes = cfg.send_queue_bytes,
        rate = %format!("{}/s burst {}", cfg.rate_limit, cfg.rate_burst),
        limits = %format!("{} connections, {} per user", cfg.max_connections, cfg.max_connections_per_user),
        publish_api = if cfg.api_key.is_some() { "POST /api/publish (--api-key set)" } else { "off (no --api-key)" },
        chat_page = %format!("http://{}/", cfg.listen),
        "fanout {} starting",
        env!("CARGO_PKG_VERSION")
    );
    if matches!(cfg.auth, AuthMode::Secret { dev: true, .. }) {
        warn!("using the built-in development JWT secret: anyone can mint tokens. Set --jwt-secret (FANOUT_JWT_SECRET) or --jwt-public-key in production");
    }
    if cfg.embedded_broker.is_some() {
        warn!("using the embedded MQTT broker: for development only. In production point --mqtt-url (FANOUT_MQTT_URL) at Mosquitto, EMQX or VerneMQ");
    }
}

/// Length of the accept queue: `TcpListener::bind` uses 128, which made the kernel drop
/// connection attempts (each costing the client a 1 s SYN retry) when a few hundred clients
/// connect at once (measured by fanout-bench: 1,300 vs 6,200 connections/s).
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    // Inherited by accepted sockets on Linux: small frames go out without Nagle's delay.
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Runs one instance until `stop` resolves (normally [`signal`]).
pub async fn serve(cfg: Config, stop: impl std::future::Future<Output = ()>) -> Result<(), String> {
    let verifier = Verifier::new(&cfg.auth)?;
    #[cfg(feature = "embedded-broker")]
    if let Some(addr) = cfg.embedded_broker {
        crate::broker::start(addr, cfg.max_message_bytes + crate::bus::ENVELOPE_SLACK)?;
    }
    let listener = listen(cfg.listen).map_err(|e| format!("cannot listen on --listen {}: {e}", cfg.listen))?;
    let cfg = Arc::new(cfg);
    summary(&cfg, &verifier);

    let metrics = Arc::new(Metrics::new(&cfg.instance_id));
    let hub = Arc::new(Hub::new());
    let (bus, eventloop) = Bus::new(&cfg, hub.clone(), metrics.clone());
    let bus_stop = CancellationToken::new();
    let bus_task = tokio::spawn(bus.clone().run(eventloop, bus_stop.clone()));

    let shutdown = CancellationToken::new();
    let shared =
        Arc::new(Shared { cfg: cfg.clone(), hub: hub.clone(), bus: bus.clone(), metrics, shutdown: shutdown.clone() });
    let gw = Arc::new(Gateway {
        shared,
        verifier,
        sessions: TaskTracker::new(),
        draining: AtomicBool::new(false),
        limits: crate::limits::ConnLimiter::new(cfg.max_connections, cfg.max_connections_per_user),
    });
    let http_stop = CancellationToken::new();
    let server = tokio::spawn(
        warp::serve(gw.clone().routes()).incoming(listener).graceful(http_stop.clone().cancelled_owned()).run(),
    );
    info!(listen = %cfg.listen, instance_id = %cfg.instance_id, "listening");

    stop.await;
    info!(connections = hub.connections(), "shutting down: closing every WebSocket with 1001");
    gw.draining.store(true, Ordering::Release);
    shutdown.cancel();
    gw.sessions.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, gw.sessions.wait()).await.is_err() {
        warn!(remaining = gw.sessions.len(), "sessions did not close within the grace period");
    }
    bus.stop().await;
    bus_stop.cancel();
    match tokio::time::timeout(SHUTDOWN_GRACE, bus_task).await {
        Ok(_) => {}
        Err(_) => warn!("broker session did not end within the grace period"),
    }
    http_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    info!("stopped");
    Ok(())
}
