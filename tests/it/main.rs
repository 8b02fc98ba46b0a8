//! The fast integration tests, run in parallel: each starts its own Mosquitto and fanout
//! instances (the real binary) on free ports and talks to them over real sockets. The heavy
//! and timing-sensitive tests are in `tests/e2e` (run one at a time).

#[path = "../support/mod.rs"]
mod support;

mod api;
mod auth;
mod embedded;
mod errors;
mod fuzz_seeds;
mod hostile;
mod injection;
mod lifecycle;
mod multi_device;
mod operations;
mod routing;
