//! `wire::decode` on arbitrary UTF-8 and `wire::envelope_id` on arbitrary bytes, checked by
//! the oracle in `fuzz/oracles/frame_decode.rs` (which `cargo test` also runs on every seed).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../oracles/frame_decode.rs"]
mod oracle;
#[path = "../oracles/topic.rs"]
mod topic;

fuzz_target!(|data: &[u8]| oracle::check(data));
