//! Identifier normalisation: no panic on any input; a normalised identifier normalises to
//! itself (one customer, one key); a card fingerprint never holds a card number; the customer
//! key of anything accepted parses back as a customer key and never contains the raw value.
//! The invariants live in `tandem_fuzz_checks::identifiers`, which CI also runs over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| tandem_fuzz_checks::identifiers::check(input));
