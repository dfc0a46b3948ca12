//! Terms validation, from the bytes a partner's ProposeTerms could carry: no panic; accepted
//! terms survive the round trip through their wire form unchanged; a commission at any rate
//! the terms allow is never more than the purchase and has its sign.
//! The invariants live in `tandem_fuzz_checks::terms`, which CI also runs over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tandem_fuzz_checks::terms::check(data));
