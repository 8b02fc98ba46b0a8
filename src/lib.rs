//! # fanout
//!
//! A horizontally scalable WebSocket fan-out service for chat. Identical instances sit
//! behind a load balancer and share one MQTT broker: an instance subscribes to
//! `msg/<user_id>` only while it holds a socket of that user, and a chat message is
//! published to the recipient's topic, so it reaches only the instances that hold the
//! recipient. The protocol is `docs/protocol.md`; `README.md` says how to run it.
//!
//! ## Layout
//!
//! * [`config`] — flags and env vars, validated once into [`config::Config`].
//! * [`auth`] — JWT verification and minting; user-id rules; how tokens are verified
//!   ([`auth::AuthMode`]). No I/O.
//! * [`clock`] — Unix seconds and milliseconds, as the protocol counts them.
//! * [`wire`] — client and server frames, error and close codes. Pure.
//! * [`hub`] — user id → local connections with bounded outboxes; says first/last. No I/O.
//! * [`bus`] — the MQTT connection: subscriptions, confirmations, reconnects, publishes,
//!   inbound routing into the hub.
//! * [`node`] — what sessions and the publish API share: join, leave, publish; the one
//!   shutdown signal.
//! * [`session`] — one WebSocket: reader, writer, pings, timeouts, rate limit.
//! * [`gateway`] — warp routes: upgrade + auth, health, readiness, metrics, the chat page.
//! * [`api`] — `POST /api/publish` (server-side publish) and the dev-only token route.
//! * [`http`] — the JSON answers and refusals every route shares.
//! * [`limits`] — connection limits per instance and per user; the chat rate per connection.
//! * [`metrics`] — every metric, with verb methods.
//! * [`server`] — binds, wires the parts together, serves HTTP (with a request-head timeout),
//!   and shuts down in order.
//! * `broker` — the embedded development broker (cargo feature `embedded-broker`).
//!
//! ## Data path of one chat message
//!
//! session reads a frame → [`wire::decode`] validates it (the `message` stays raw JSON) →
//! [`node::Node::publish`] builds the envelope once ([`wire::chat_message`]) → [`bus::Bus::publish`]
//! accepts it into the publish queue, one publish per recipient topic → the broker forwards it only to subscribed instances → their
//! bus passes the bytes to [`hub::Hub::deliver`] → each local connection's outbox → its
//! session writes it.

pub mod api;
pub mod auth;
#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod bus;
pub mod clock;
pub mod config;
pub mod gateway;
pub mod http;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod server;
pub mod session;
pub mod wire;
