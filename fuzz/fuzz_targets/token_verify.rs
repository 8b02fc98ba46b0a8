//! `Verifier::verify` and `gateway::find_token` on arbitrary bytes, checked by the oracle in
//! `fuzz/oracles/token_verify.rs` (which `cargo test` also runs on every seed).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../oracles/token_verify.rs"]
mod oracle;
#[path = "../oracles/topic.rs"]
mod topic;

fuzz_target!(|data: &[u8]| oracle::check(data));
