//! The node: what every session and the publish API share, and the three things they do with
//! it — a connection joins (the user's first connection here subscribes), leaves (the last
//! one unsubscribes), and a message is published to its recipients. Like centrifuge's `Node`,
//! it is the one place where hub and bus meet.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError};
use crate::clock::unix_millis;
use crate::config::Config;
use crate::hub::{Added, ConnRef, Hub};
use crate::metrics::Metrics;
use crate::wire::{self, Recipients};

/// What every session and route shares.
#[derive(Debug)]
pub struct Node {
    pub cfg: Arc<Config>,
    pub hub: Arc<Hub>,
    pub bus: Arc<Bus>,
    pub metrics: Arc<Metrics>,
    /// The instance's one shutdown signal: `/readyz` turns 503, upgrades and API publishes are
    /// refused, every session closes with 1001, waiting publishes give up.
    pub shutdown: CancellationToken,
}

impl Node {
    /// True once shutdown has begun.
    pub fn draining(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Registers a connection of `user`. The receiver says `true` once the broker has
    /// confirmed the user's subscription (at once when another connection of the user already
    /// waited for it). The hub and the bus decide "first" under the hub lock, so a concurrent
    /// leave of the same user cannot slip between the decision and the SUBSCRIBE.
    pub fn join(&self, user: &str, conn: ConnRef) -> (Added, oneshot::Receiver<bool>) {
        let mut first = None;
        let added = self.hub.add_with(user, conn, || first = Some(self.bus.subscribe_user(user)));
        self.metrics.set_users(self.hub.users());
        let confirmed = first.unwrap_or_else(|| self.bus.wait_user(user));
        (added, confirmed)
    }

    /// Removes a connection; the user's last one here unsubscribes (under the hub lock too).
    pub fn leave(&self, user: &str, conn_id: u128) {
        self.hub.remove_with(user, conn_id, || self.bus.unsubscribe_user(user));
        self.metrics.set_users(self.hub.users());
    }

    /// Publishes `message` from `from` to `to`: one envelope, built once, one publish per
    /// recipient topic, accepted all or nothing. Returns the envelope id (derived from
    /// `client_message_id` when there is one).
    pub async fn publish(
        &self,
        from: &str,
        to: &Recipients,
        message: &RawValue,
        client_message_id: Option<&str>,
    ) -> Result<String, BusError> {
        let id = wire::message_id(from, client_message_id).to_string();
        let payload = Bytes::from(wire::chat_message(&id, from, to, message, unix_millis(), client_message_id));
        self.bus.publish(&self.bus.topics(to), payload).await?;
        Ok(id)
    }
}
