//! Terms validation, from the bytes a partner's ProposeTerms could carry: no panic; accepted
//! terms survive the round trip through their wire form unchanged; a commission at any rate
//! the terms allow is never more than the purchase and has its sign.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tandem_codec::{terms_from_proto, terms_to_proto};
use tandem_domain::money::{Currency, Money, MAX_AMOUNT_MINOR};
use tandem_proto::v1 as pb;

fuzz_target!(|data: &[u8]| {
    if let Ok(wire) = pb::Terms::decode(data) {
        if let Ok(terms) = terms_from_proto(&wire) {
            let validated = terms.clone().validated().expect("accepted terms are valid");
            assert_eq!(validated, terms);
            let again = terms_from_proto(&terms_to_proto(&terms)).expect("round trip");
            assert_eq!(again, terms, "terms changed on the round trip");
        }
    }
    if data.len() >= 12 {
        let amount = i64::from_le_bytes(data[..8].try_into().unwrap()) % (MAX_AMOUNT_MINOR + 1);
        let bps = u32::from_le_bytes(data[8..12].try_into().unwrap()) % 10_001;
        let eur = Currency::parse("currency", "EUR").unwrap();
        let commission = Money::new(amount, eur).times_bps(bps).amount_minor;
        assert!(
            commission.abs() <= amount.abs(),
            "{amount} at {bps} bps gave {commission}"
        );
        assert!(commission == 0 || (commission > 0) == (amount > 0));
    }
});
