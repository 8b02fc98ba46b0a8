//! Wires hub, bus, sessions and routes together, serves until SIGINT/SIGTERM, then shuts
//! down in the order of docs/protocol.md §5.8: readiness 503 and no new upgrades → every socket closed
//! with 1001 → user topics unsubscribed → everything acked handed to the broker → broker
//! session ended → exit.

use std::sync::Arc;
use std::time::Duration;

use std::future::Future;
use std::task::Poll;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::{AuthMode, Verifier};
use crate::bus::Bus;
use crate::config::Config;
use crate::gateway::Gateway;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::node::Node;

/// Longest wait for sessions to close at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// A connection that has not sent a complete HTTP request head within this long is closed
/// (docs/protocol.md §8). Without it a client that connects and stays silent, or trickles a large header,
/// holds a socket forever (warp serves hyper without a timer).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP request head (tokens are at most 8 KiB): hyper's default of ~400 KiB per
/// connection let one client hold gigabytes with unfinished heads; beyond this, 431.
const MAX_HEAD_BYTES: usize = 32 * 1024;
/// HTTP connections that have not (yet) upgraded to a WebSocket, at most; more are closed at
/// once. With [`MAX_HEAD_BYTES`] this bounds what unfinished requests can hold (~320 MiB).
const MAX_HTTP_CONNECTIONS: usize = 10_000;
/// A socket write (HTTP answer, or a WebSocket frame) that cannot proceed this long fails: a
/// peer that sends requests but never reads the answers does not hold its socket forever.
const WRITE_DEADLINE: Duration = Duration::from_secs(10);

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
        None => cfg.brokers.iter().map(|b| format!("mqtt://{}", b.address())).collect::<Vec<_>>().join(", "),
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

/// Binds the service's listener (and starts the embedded broker when configured), then runs
/// the instance until `stop` resolves (normally [`signal`]).
pub async fn serve(cfg: Config, stop: impl std::future::Future<Output = ()>) -> Result<(), String> {
    let listener = listen(cfg.listen).map_err(|e| format!("cannot listen on --listen {}: {e}", cfg.listen))?;
    #[cfg(feature = "embedded-broker")]
    if let Some(addr) = cfg.embedded_broker {
        crate::broker::start(addr, cfg.max_message_bytes + crate::bus::ENVELOPE_SLACK).await?;
    }
    run(cfg, listener, stop).await
}

/// Runs one instance on an already bound `listener` until `stop` resolves, then shuts down in
/// order. Tests run instances in-process this way, on port 0.
pub async fn run(
    cfg: Config,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let verifier = Verifier::new(&cfg.auth)?;
    let cfg = Arc::new(cfg);
    summary(&cfg, &verifier);

    let metrics = Arc::new(Metrics::new(&cfg.instance_id));
    let hub = Arc::new(Hub::new());
    let shutdown = CancellationToken::new();
    let (bus, eventloop) = Bus::new(&cfg, hub.clone(), metrics.clone(), shutdown.clone());
    let bus_task = tokio::spawn(bus.clone().run(eventloop));

    let node =
        Arc::new(Node { cfg: cfg.clone(), hub: hub.clone(), bus: bus.clone(), metrics, shutdown: shutdown.clone() });
    let gw = Arc::new(Gateway {
        node,
        verifier,
        sessions: TaskTracker::new(),
        limits: crate::limits::ConnLimiter::new(cfg.max_connections, cfg.max_connections_per_user),
    });
    let http_stop = CancellationToken::new();
    let listen_addr = listener.local_addr().map_err(|e| format!("listener has no address: {e}"))?;
    let server = tokio::spawn(serve_http(listener, warp::service(gw.clone().routes()), http_stop.clone()));
    info!(listen = %listen_addr, instance_id = %cfg.instance_id, "listening");

    stop.await;
    info!(connections = hub.connections(), "shutting down: closing every WebSocket with 1001");
    shutdown.cancel();
    gw.sessions.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, gw.sessions.wait()).await.is_err() {
        warn!(remaining = gw.sessions.len(), "sessions did not close within the grace period");
    }
    // Everything acked is still handed to the broker (also across a link that drops and
    // returns), then the broker session ends; bounded by --shutdown-grace (and the broker's
    // answers to two DISCONNECTs).
    bus.stop(cfg.shutdown_grace);
    let lost = match tokio::time::timeout(cfg.shutdown_grace + Duration::from_secs(5), bus_task).await {
        Ok(Ok(lost)) => lost,
        Ok(Err(_)) => bus.queued().1,
        Err(_) => {
            warn!("broker session did not end within the grace period");
            bus.queued().1
        }
    };
    http_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    info!("stopped");
    if lost > 0 {
        // Not a clean shutdown: acked messages were dropped. Say so in the exit status too.
        return Err(format!(
            "{lost} accepted publishes never reached the broker before --shutdown-grace ({}) ran out",
            humantime::format_duration(cfg.shutdown_grace)
        ));
    }
    Ok(())
}

/// Serves HTTP/1.1 on `listener` until `stop`: each connection gets [`HEADER_TIMEOUT`] for
/// each request head (the first and every keep-alive one) and may upgrade to a WebSocket (the
/// session then runs on its own task). At `stop`, open connections finish the request in
/// progress and close.
async fn serve_http<S>(listener: tokio::net::TcpListener, svc: S, stop: CancellationToken)
where
    S: tower_service::Service<
            http::Request<hyper::body::Incoming>,
            Response = warp::reply::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conns = TaskTracker::new();
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNECTIONS));
    let mut last_accept_error: Option<std::time::Instant> = None;
    let mut last_full: Option<std::time::Instant> = None;
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors (EMFILE) and the like: say so once a second at most,
                    // and let sockets close before trying again.
                    if last_accept_error.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                        warn!(error = %e, "accept failed");
                        last_accept_error = Some(std::time::Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            if last_full.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                warn!(
                    limit = MAX_HTTP_CONNECTIONS,
                    "too many HTTP connections that have not upgraded; closing new ones"
                );
                last_full = Some(std::time::Instant::now());
            }
            drop(stream);
            continue;
        };
        let svc = svc.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            // Held until the connection ends or hands its socket to a WebSocket session.
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let mut s = svc.clone();
                tower_service::Service::call(&mut s, req)
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_header_size(MAX_HEAD_BYTES)
                .max_buf_size(MAX_HEAD_BYTES * 2)
                .serve_connection(TokioIo::new(WriteDeadline::new(stream)), service)
                .with_upgrades();
            tokio::pin!(conn);
            let done = tokio::select! {
                r = conn.as_mut() => Some(r),
                _ = stop.cancelled() => None,
            };
            let r = match done {
                Some(r) => r,
                None => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(Duration::from_secs(1), conn).await.unwrap_or(Ok(()))
                }
            };
            if let Err(e) = r {
                // A header timeout, a reset or a malformed request: the peer's business.
                debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    conns.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), conns.wait()).await;
}

/// A socket whose writes fail with `TimedOut` once one has been pending for
/// [`WRITE_DEADLINE`] (reads are untouched). The timer exists only while a write waits.
struct WriteDeadline<T> {
    io: T,
    waiting: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteDeadline<T> {
    fn new(io: T) -> Self {
        WriteDeadline { io, waiting: None }
    }

    /// `r` is the outcome of a write-side poll: pending too long becomes an error.
    fn check<R>(&mut self, cx: &mut std::task::Context<'_>, r: Poll<std::io::Result<R>>) -> Poll<std::io::Result<R>> {
        if r.is_ready() {
            self.waiting = None;
            return r;
        }
        let t = self.waiting.get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_DEADLINE)));
        match t.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.waiting = None;
                Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "socket write deadline")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, r)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, r)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.io).poll_shutdown(cx);
        self.check(cx, r)
    }
}
