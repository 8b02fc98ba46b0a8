//! A fault-injecting TCP proxy for tests: sits between a fanout instance and its broker and
//! can cut the link (close every connection and refuse new ones), stall it (keep sockets
//! open but forward nothing), delay the broker's answers, then heal.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::peer::Peer;
use crate::support::{Instance, InstanceOpts, Mosquitto};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    /// Every connection is closed; new ones are accepted and closed at once.
    Cut,
    /// Connections stay open; no byte is forwarded either way.
    Stall,
}

pub struct FaultProxy {
    pub port: u16,
    mode: Arc<watch::Sender<Mode>>,
    /// Added to every chunk the broker sends (CONNACK, SUBACK, PUBACK, PUBLISH), in order.
    delay: Arc<watch::Sender<std::time::Duration>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:target`.
    pub async fn start(target: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let (tx, _) = watch::channel(Mode::Pass);
        let mode = Arc::new(tx);
        let m = mode.clone();
        let (dtx, _) = watch::channel(std::time::Duration::ZERO);
        let delay = Arc::new(dtx);
        let d = delay.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, from)) = listener.accept().await else { continue };
                // Every connection in the test's output (printed when it fails), with the time
                // to match against the instance's log.
                let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
                if *m.borrow() == Mode::Cut {
                    eprintln!("proxy :{port} {now} refused {from} (cut)");
                    drop(client);
                    continue;
                }
                eprintln!("proxy :{port} {now} accepted {from}");
                let rx = m.subscribe();
                let delay = d.subscribe();
                tokio::spawn(async move {
                    let Ok(upstream) = TcpStream::connect(("127.0.0.1", target)).await else { return };
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (ur, uw) = upstream.into_split();
                    tokio::join!(pump(cr, uw, rx.clone(), None), pump(ur, cw, rx, Some(delay)));
                });
            }
        });
        FaultProxy { port, mode, delay, task }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn cut(&self) {
        eprintln!("proxy :{} {} cut", self.port, humantime::format_rfc3339_millis(std::time::SystemTime::now()));
        self.mode.send_replace(Mode::Cut);
    }

    pub fn stall(&self) {
        eprintln!("proxy :{} {} stall", self.port, humantime::format_rfc3339_millis(std::time::SystemTime::now()));
        self.mode.send_replace(Mode::Stall);
    }

    pub fn heal(&self) {
        eprintln!("proxy :{} {} heal", self.port, humantime::format_rfc3339_millis(std::time::SystemTime::now()));
        self.mode.send_replace(Mode::Pass);
    }

    /// Every byte the broker sends reaches the instance `d` later (order kept).
    pub fn delay_answers(&self, d: std::time::Duration) {
        self.delay.send_replace(d);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.mode.send_replace(Mode::Cut);
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    delay: Option<watch::Receiver<std::time::Duration>>,
) {
    // Chunks go to a writer task with the time they are due, so a delay holds them back
    // without holding back the reading (and without reordering).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        let mut to = to;
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let m = *mode.borrow_and_update();
        match m {
            Mode::Cut => break,
            Mode::Stall => {
                if mode.changed().await.is_err() {
                    break;
                }
                continue;
            }
            Mode::Pass => {}
        }
        tokio::select! {
            biased;
            c = mode.changed() => if c.is_err() { break },
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    // The mode may have changed while this read was pending (a busy machine
                    // runs this task late): bytes read after a stall wait for the heal, bytes
                    // read after a cut are dropped.
                    loop {
                        let m = *mode.borrow_and_update();
                        match m {
                            Mode::Pass => break,
                            Mode::Cut => return finish(tx, writer, true).await,
                            Mode::Stall => {}
                        }
                        if mode.changed().await.is_err() {
                            return finish(tx, writer, true).await;
                        }
                    }
                    let d = delay.as_ref().map(|d| *d.borrow()).unwrap_or_default();
                    if tx.send((tokio::time::Instant::now() + d, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            },
        }
    }
    let cut = *mode.borrow() == Mode::Cut;
    finish(tx, writer, cut).await;
}

/// Ends one direction: on a cut at once; when the peer closed, after what was read went out
/// (late, if delayed).
async fn finish(
    tx: tokio::sync::mpsc::UnboundedSender<(tokio::time::Instant, Vec<u8>)>,
    writer: tokio::task::JoinHandle<()>,
    cut: bool,
) {
    if cut {
        writer.abort();
    } else {
        drop(tx);
        let _ = writer.await;
    }
}

/// The setting of the broker-fault tests: one Mosquitto; instance `a` reaches it through a
/// fault proxy, instance `b` directly; alice is connected to `a`, bob to `b`.
///
/// Bind every field when taking it apart (`m: _m` for one a test does not use): a field left
/// to `..` is dropped at once, and with it the broker or the instance.
pub struct FaultSetup {
    pub m: Mosquitto,
    pub proxy: FaultProxy,
    pub a: Instance,
    pub b: Instance,
    pub alice: Peer,
    pub bob: Peer,
}

impl FaultSetup {
    /// `a` and `b` get the options `a_opts` and `b_opts` make of their broker URLs.
    pub async fn start(
        a_opts: impl FnOnce(InstanceOpts) -> InstanceOpts,
        b_opts: impl FnOnce(InstanceOpts) -> InstanceOpts,
    ) -> FaultSetup {
        let m = Mosquitto::start();
        let proxy = FaultProxy::start(m.port()).await;
        let a = Instance::start(a_opts(InstanceOpts::url(&proxy.url()))).await;
        let b = Instance::start(b_opts(InstanceOpts::broker(&m))).await;
        let alice = Peer::connect(&a, "alice").await;
        let bob = Peer::connect(&b, "bob").await;
        FaultSetup { m, proxy, a, b, alice, bob }
    }
}

/// Flags for a publish queue that holds exactly 16 messages padded with [`PAD`] bytes (each
/// costs 4,200-4,300 queue bytes: topic + envelope + 64 bytes of bookkeeping) and refuses
/// after waiting 1 s for room.
pub const QUEUE_OF_16: [&str; 6] =
    ["--publish-queue-bytes", "68800", "--max-message-bytes", "8192", "--broker-timeout", "1s"];
pub const PAD: usize = 4_000;
