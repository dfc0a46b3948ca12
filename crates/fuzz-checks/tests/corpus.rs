//! Every input of the committed fuzz corpus (`fuzz/corpus/<target>/`) through its target's
//! invariants: what fuzzing found once (a crash input is added to the corpus when its bug is
//! fixed) is checked on every run, without nightly or libFuzzer.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let directory = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut inputs: Vec<(String, Vec<u8>)> = std::fs::read_dir(&directory)
        .unwrap_or_else(|error| panic!("read {}: {error}", directory.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&path).unwrap(),
            )
        })
        .collect();
    inputs.sort();
    assert!(
        inputs.len() >= 10,
        "the corpus of {target} has only {} inputs",
        inputs.len()
    );
    inputs
}

/// As libFuzzer's `&str` targets do: inputs that are not UTF-8 are skipped.
fn replay_text(target: &str, check: fn(&str)) {
    let mut checked = 0;
    for (name, bytes) in corpus(target) {
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let outcome = std::panic::catch_unwind(|| check(text));
            assert!(outcome.is_ok(), "{target} fails on corpus input {name}");
            checked += 1;
        }
    }
    assert!(checked > 0, "no UTF-8 input in the corpus of {target}");
}

fn replay_bytes(target: &str, check: fn(&[u8])) {
    for (name, bytes) in corpus(target) {
        let outcome = std::panic::catch_unwind(|| check(&bytes));
        assert!(outcome.is_ok(), "{target} fails on corpus input {name}");
    }
}

#[test]
fn free_text() {
    replay_text("free_text", tandem_fuzz_checks::free_text::check);
}

#[test]
fn identifiers() {
    replay_text("identifiers", tandem_fuzz_checks::identifiers::check);
}

#[test]
fn gateway_requests() {
    replay_bytes(
        "gateway_requests",
        tandem_fuzz_checks::gateway_requests::check,
    );
}

#[test]
fn terms() {
    replay_bytes("terms", tandem_fuzz_checks::terms::check);
}

#[test]
fn events() {
    replay_bytes("events", tandem_fuzz_checks::events::check);
}
