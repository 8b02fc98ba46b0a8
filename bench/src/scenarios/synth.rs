//! The synthetic subscriber: K rumqttc clients that hold S `msg/<user>` subscriptions between
//! them the way an instance's bus would — persistent session (clean_session false, a stable
//! client id), QoS 1, SUBSCRIBE packets of 64 topics, at most `window` packets awaiting their
//! SUBACK per client, and after a ConnAck without a session (a broker restarted without
//! persistence) every topic subscribed again. The event loop of each client is polled by its
//! own task and never awaits the client (rumqttc pitfall 3); a second task per client sends the
//! SUBSCRIBEs. User ids are 36 characters long, like the UUIDs a real deployment uses.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS, SubscribeFilter, SubscribeReasonCode};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::env::Res;

pub const TOPICS_PER_PACKET: usize = 64;

struct State {
    /// topics this client must hold
    target: u64,
    /// topics confirmed (SUBACK success) since the last ConnAck without a session
    confirmed: AtomicU64,
    /// topics refused (SUBACK failure) since then
    refused: AtomicU64,
    connacks: AtomicU64,
    /// connection errors (each followed by a reconnect after a backoff)
    errors: AtomicU64,
    /// permits = SUBSCRIBE packets that may still be sent without a SUBACK; replaced on every
    /// new session (packets in flight on a dropped connection never get theirs)
    window: Mutex<Arc<Semaphore>>,
    /// when `confirmed` reached `target` in the current session
    done_at: Mutex<Option<Instant>>,
}

struct Client {
    st: Arc<State>,
    client: AsyncClient,
    tasks: Vec<JoinHandle<()>>,
}

/// K synthetic clients holding `topics` between them.
pub struct Synth {
    clients: Vec<Client>,
    pub started: Instant,
}

/// The progress of a [`Synth`], summed over its clients.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub confirmed: u64,
    pub refused: u64,
    pub errors: u64,
}

/// 36-character user id number `i` of client `k` of batch `batch`.
pub fn user_id(batch: usize, k: usize, i: usize) -> String {
    format!("{batch:08x}-{k:04x}-4000-8000-{i:012x}")
}

impl Synth {
    /// Starts `k` clients (ids `<prefix>-<j>`) holding `total` topics between them, client j
    /// connected to `ports[j % len]`. Returns at once; see [`Synth::wait`].
    pub fn start(prefix: &str, batch: usize, ports: &[u16], k: usize, total: usize, window: usize) -> Synth {
        let k = k.max(1);
        let started = Instant::now();
        let mut clients = Vec::new();
        for j in 0..k {
            let n = total / k + usize::from(j < total % k);
            let topics: Vec<String> = (0..n).map(|i| format!("msg/{}", user_id(batch, j, i))).collect();
            let port = ports[j % ports.len().max(1)];
            clients.push(Client::start(&format!("{prefix}-{j}"), port, topics, window));
        }
        Synth { clients, started }
    }

    pub fn progress(&self) -> Progress {
        let sum = |f: fn(&State) -> u64| self.clients.iter().map(|c| f(&c.st)).sum();
        Progress {
            confirmed: sum(|s| s.confirmed.load(Relaxed)),
            refused: sum(|s| s.refused.load(Relaxed)),
            errors: sum(|s| s.errors.load(Relaxed)),
        }
    }

    /// When the last client had all its topics confirmed in its current session (None: not
    /// all yet). A client with no topics counts as done at its ConnAck (not tracked: None).
    pub fn done_at(&self) -> Option<Instant> {
        let mut last = None;
        for c in &self.clients {
            if c.st.target == 0 {
                continue;
            }
            let d = (*c.st.done_at.lock())?;
            last = Some(last.map_or(d, |l: Instant| l.max(d)));
        }
        last
    }

    /// ConnAcks per client, in order.
    pub fn connacks(&self) -> Vec<u64> {
        self.clients.iter().map(|c| c.st.connacks.load(Relaxed)).collect()
    }

    /// Waits until every client has a session newer than `after` (ConnAcks per client; empty:
    /// any) and all its topics are confirmed, or `limit` passes. Returns whether it got there.
    pub async fn wait(&self, after: &[u64], limit: Duration, pb: Option<&indicatif::ProgressBar>) -> bool {
        let until = Instant::now() + limit;
        loop {
            let done = self.clients.iter().enumerate().all(|(j, c)| {
                let newer = after.get(j).is_none_or(|a| c.st.connacks.load(Relaxed) > *a);
                newer && c.st.confirmed.load(Relaxed) >= c.st.target
            });
            if let Some(pb) = pb {
                pb.set_position(self.progress().confirmed);
            }
            if done {
                return true;
            }
            if Instant::now() > until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Disconnects (the broker removes nothing: persistent sessions) and stops the tasks.
    pub async fn stop(self) {
        for c in &self.clients {
            let _ = tokio::time::timeout(Duration::from_millis(200), c.client.disconnect()).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        for c in self.clients {
            for t in c.tasks {
                t.abort();
            }
        }
    }
}

impl Client {
    fn start(id: &str, port: u16, topics: Vec<String>, window: usize) -> Client {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        // A long keep-alive: a broker busy with bindings may answer PINGREQ late.
        o.set_keep_alive(Duration::from_secs(120));
        o.set_clean_session(false);
        o.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(o, 64);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(30);
        el.set_network_options(net);
        let window = window.max(1);
        let st = Arc::new(State {
            target: topics.len() as u64,
            confirmed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            connacks: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            window: Mutex::new(Arc::new(Semaphore::new(window))),
            done_at: Mutex::new(None),
        });
        let (gen_tx, mut gen_rx) = watch::channel(0u64);
        let s = st.clone();
        let poll = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(c))) => {
                        backoff = Duration::from_millis(100);
                        if !c.session_present {
                            s.confirmed.store(0, Relaxed);
                            *s.done_at.lock() = None;
                            s.refused.store(0, Relaxed);
                            *s.window.lock() = Arc::new(Semaphore::new(window));
                            gen_tx.send_modify(|g| *g += 1);
                        }
                        s.connacks.fetch_add(1, Relaxed);
                    }
                    Ok(Event::Incoming(Packet::SubAck(a))) => {
                        let ok = a.return_codes.iter().filter(|c| matches!(c, SubscribeReasonCode::Success(_))).count();
                        let now = s.confirmed.fetch_add(ok as u64, Relaxed) + ok as u64;
                        if now >= s.target && ok > 0 {
                            *s.done_at.lock() = Some(Instant::now());
                        }
                        s.refused.fetch_add((a.return_codes.len() - ok) as u64, Relaxed);
                        s.window.lock().add_permits(1);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        s.errors.fetch_add(1, Relaxed);
                        // rumqttc reconnects on the next poll: back off (pitfall 1), with jitter.
                        let jitter = Duration::from_millis(rand::random_range(0..50));
                        tokio::time::sleep(backoff + jitter).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                }
            }
        });
        let c = client.clone();
        let s = st.clone();
        let sub = tokio::spawn(async move {
            // Every new session (generation) subscribes everything again, from the start.
            'session: while gen_rx.changed().await.is_ok() {
                let sem = s.window.lock().clone();
                for chunk in topics.chunks(TOPICS_PER_PACKET) {
                    tokio::select! {
                        p = sem.clone().acquire_owned() => match p {
                            Ok(p) => p.forget(),
                            Err(_) => continue 'session,
                        },
                        _ = gen_rx.changed() => {
                            gen_rx.mark_changed();
                            continue 'session;
                        }
                    }
                    let filters: Vec<SubscribeFilter> =
                        chunk.iter().map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce)).collect();
                    // The request channel is bounded; a broker gone for long fills it.
                    match tokio::time::timeout(Duration::from_secs(30), c.subscribe_many(filters)).await {
                        Ok(Ok(())) => {}
                        _ => {
                            s.errors.fetch_add(1, Relaxed);
                            continue 'session;
                        }
                    }
                }
            }
        });
        Client { st, client, tasks: vec![poll, sub] }
    }
}

/// Waits for every client's first ConnAck, at most `limit`.
pub async fn connected(s: &Synth, limit: Duration) -> Res<()> {
    let until = Instant::now() + limit;
    while s.clients.iter().any(|c| c.st.connacks.load(Relaxed) == 0) {
        if Instant::now() > until {
            return Err(format!("synthetic subscriber: not every client connected within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}
