//! The heavy and timing-sensitive tests: broker faults and restarts, shutdown under load,
//! floods, the native stack behind nginx, bridged brokers, a real browser, compose. They
//! measure time and memory, so scripts/test.sh runs them one at a time
//! (`cargo test --release --test e2e -- --test-threads=1`); the fast ones are in `tests/it`.

#[path = "../support/mod.rs"]
mod support;

/// Headless Chromium over the DevTools protocol.
mod browser;
/// Clients read in the background, for tests where sending and receiving overlap.
mod peer;
/// A fault-injecting TCP proxy between an instance and its broker.
mod proxy;
/// A RabbitMQ cluster on loopback (scripts/rabbitmq.sh).
mod rabbit;
/// The native stack (scripts/stack.sh) on free ports.
mod stack;

mod e2e_bridge;
mod e2e_browser;
mod e2e_compose;
mod e2e_stack;
mod edges;
mod flapping;
mod hardening;
mod page;
mod rabbitmq;
mod reliability;
