//! The free-text guard and the id filter for spans: no panic on any input; what is accepted as
//! a token holds nothing shaped like a customer identifier and is trimmed printable ASCII;
//! what the span filter lets through is id-shaped.
//! The invariants live in `tandem_fuzz_checks::free_text`, which CI also runs over the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| tandem_fuzz_checks::free_text::check(input));
