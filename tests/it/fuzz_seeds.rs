//! The fuzz targets' committed seeds (`fuzz/seeds/<target>/`, with the `regress_*` inputs of
//! bugs found earlier) run through the targets' own oracles on every `cargo test`, so a fixed
//! bug that comes back fails here without a fuzzing run.

#[path = "../../fuzz/oracles/frame_decode.rs"]
mod frame_decode;
#[path = "../../fuzz/oracles/token_verify.rs"]
mod token_verify;
#[path = "../../fuzz/oracles/topic.rs"]
mod topic;

use std::path::PathBuf;

/// Runs `check` on every seed of `target`; fails naming each seed that broke the oracle.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").join(target);
    let mut seeds: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    seeds.sort();
    let regressions = seeds.iter().filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("regress_")).count();
    assert!(regressions >= 2, "{}: only {regressions} regress_* seeds", dir.display());
    let failed: Vec<String> = seeds
        .iter()
        .filter(|p| {
            let data = std::fs::read(p).unwrap();
            std::panic::catch_unwind(|| check(&data)).is_err()
        })
        .map(|p| p.display().to_string())
        .collect();
    assert!(failed.is_empty(), "seeds that break the {target} oracle: {failed:?}");
}

#[test]
fn frame_decode_seeds_hold_the_oracle() {
    replay("frame_decode", frame_decode::check);
}

#[test]
fn token_verify_seeds_hold_the_oracle() {
    replay("token_verify", token_verify::check);
}
