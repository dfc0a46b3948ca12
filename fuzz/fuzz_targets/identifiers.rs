//! Identifier normalisation: no panic on any input; a normalised identifier normalises to
//! itself (one customer, one key); a card fingerprint never holds a card number; the customer
//! key of anything accepted parses back as a customer key and never contains the raw value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_domain::customer::{NetworkKey, RawIdentifier};

fuzz_target!(|input: &str| {
    let network = NetworkKey::new(1, vec![7; 32]).unwrap();
    let check = |identifier: RawIdentifier, again: &dyn Fn(&str) -> RawIdentifier| {
        let normalised = identifier.normalised().to_owned();
        assert_eq!(
            again(&normalised).normalised(),
            normalised,
            "not idempotent for {input:?}"
        );
        let key = network.customer_key(&identifier);
        assert!(tandem_domain::customer::CustomerKey::parse("key", key.as_str()).is_ok());
        if normalised.len() >= 6 {
            assert!(!key.as_str().contains(&normalised));
        }
    };
    if let Ok(phone) = RawIdentifier::phone("phone", input) {
        assert!(phone.normalised().starts_with('+'));
        check(phone, &|v| {
            RawIdentifier::phone("phone", v).expect("a normalised phone parses")
        });
    }
    if let Ok(email) = RawIdentifier::email("email", input) {
        check(email, &|v| {
            RawIdentifier::email("email", v).expect("a normalised e-mail parses")
        });
    }
    if let Ok(card) = RawIdentifier::card_fingerprint("card_fingerprint", "processor", input) {
        assert!(!tandem_domain::text::contains_card_number(
            card.normalised()
        ));
        check(card, &|v| {
            RawIdentifier::card_fingerprint("card_fingerprint", "processor", v)
                .expect("a normalised fingerprint parses")
        });
    }
    if let Ok(par) = RawIdentifier::payment_account_reference("par", input) {
        check(par, &|v| {
            RawIdentifier::payment_account_reference("par", v).expect("a normalised PAR parses")
        });
    }
});
