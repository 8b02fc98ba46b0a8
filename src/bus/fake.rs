//! A bus on a fake MQTT link, for tests of what sits on top of the bus (sessions) on paused
//! time: rumqttc's requests land in a channel the test reads, and the test plays the broker by
//! hand — brings the link up, writes and confirms SUBSCRIBEs. No socket, no clock of its own.

use std::sync::Arc;

use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, Outgoing, Request, SubAck, SubscribeReasonCode};
use tokio_util::sync::CancellationToken;

use super::{Bus, QOS};
use crate::config::{Config, ServeArgs};
use crate::hub::Hub;
use crate::metrics::Metrics;

/// The configuration `fanout serve` would build from these flags (toward an unused broker).
pub fn config(args: &[&str]) -> Config {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }
    let argv = ["fanout", "--mqtt-url", "mqtt://127.0.0.1:1"].iter().chain(args);
    <Cli as clap::Parser>::parse_from(argv).serve.validate().expect("valid test configuration")
}

pub(crate) struct FakeLink {
    pub bus: Arc<Bus>,
    requests: flume::Receiver<Request>,
    el: EventLoop,
    next_pkid: u16,
    /// Requests read from the channel that were not SUBSCRIBEs (publishes, unsubscribes).
    pub others: Vec<Request>,
}

impl FakeLink {
    pub fn new(cfg: &Config, hub: Arc<Hub>, metrics: Arc<Metrics>, shutdown: CancellationToken) -> FakeLink {
        let (tx, requests) = flume::bounded(1 << 16);
        let bus = Bus::with_client(AsyncClient::from_senders(tx), cfg, hub, metrics, shutdown);
        let el = EventLoop::new(MqttOptions::new("fake", "127.0.0.1", 1), 10);
        FakeLink { bus, requests, el, next_pkid: 1, others: Vec::new() }
    }

    /// ConnAck: the resubscription (the broadcast topic) goes out first and is confirmed.
    pub fn up(&mut self) {
        self.bus.link_up(&mut self.el, false);
        let n = self.el.pending.drain(..).filter(|r| matches!(r, Request::Subscribe(_))).count();
        for _ in 0..n {
            self.confirm_written(1);
        }
    }

    /// Waits for the next SUBSCRIBE in the request channel, writes it and confirms it; returns
    /// its topics. Other requests met on the way are kept in [`FakeLink::others`].
    pub async fn confirm_next_subscribe(&mut self) -> Vec<String> {
        loop {
            match self.requests.recv_async().await.expect("the bus holds the sender") {
                Request::Subscribe(s) => {
                    self.confirm_written(s.filters.len());
                    return s.filters.into_iter().map(|f| f.path).collect();
                }
                other => self.others.push(other),
            }
        }
    }

    /// Every request waiting in the channel, without waiting.
    pub fn drain(&mut self) -> Vec<Request> {
        self.requests.drain().collect()
    }

    fn confirm_written(&mut self, filters: usize) {
        let pkid = self.next_pkid;
        self.next_pkid += 1;
        self.bus.on_event(Event::Outgoing(Outgoing::Subscribe(pkid)));
        let codes = vec![SubscribeReasonCode::Success(QOS); filters];
        self.bus.on_event(Event::Incoming(Incoming::SubAck(SubAck::new(pkid, codes))));
    }
}
