//! The gateway's request parsing and validation, from the bytes a till could send: no panic;
//! an accepted purchase has an amount within bounds and a transaction id and idempotency key
//! that pass the free-text guard; an accepted referral names a well-formed acceptor.
//! The invariants live in `tandem_fuzz_checks::gateway_requests`, which CI also runs over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tandem_fuzz_checks::gateway_requests::check(data));
