//! Event decoding, from the bytes a topic or the event table could hold: no panic; a decoded
//! partnership event survives the round trip through its wire form unchanged.
//! The invariants live in `tandem_fuzz_checks::events`, which CI also runs over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tandem_fuzz_checks::events::check(data));
