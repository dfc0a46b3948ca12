//! The invariants the fuzz targets check, as plain functions: `fuzz/` runs them under libFuzzer
//! (coverage-guided, on nightly), and this crate's test replays the committed corpus through
//! them on every CI run, so an input that once failed stays fixed. Each function panics when an
//! invariant does not hold. Targets, commands and findings: docs/SECURITY.md, "Fuzzing".
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

pub mod free_text {
    use tandem_domain::text;

    /// The free-text guard and the id filter for spans: no panic on any input; what is accepted as
    /// a token holds nothing shaped like a customer identifier and is trimmed printable ASCII;
    /// what the span filter lets through is id-shaped.
    pub fn check(input: &str) {
        let guarded = text::reject_personal_data("field", input);
        if let Ok(token) = text::parse_token("field", input, 1, 128) {
            assert!(
                guarded.is_ok(),
                "parse_token accepted what the guard refuses: {input:?}"
            );
            assert_eq!(token, token.trim());
            assert!((1..=128).contains(&token.len()));
            assert!(token.bytes().all(|b| (0x20..0x7f).contains(&b)));
            assert!(!text::contains_card_number(&token));
            assert!(!text::contains_email_address(&token));
            assert!(!text::contains_phone_number(&token));
        }
        if let Ok(name) = text::parse_text("field", input, 200) {
            assert!(text::reject_personal_data("field", &name).is_ok());
            assert!(!name.chars().any(char::is_control));
        }
        let logged = text::loggable_id(input);
        // Passed through means the very input, not an equal placeholder.
        let passed = std::ptr::eq(logged, input);
        assert!(
            passed || logged == "<not an id>" || logged.is_empty(),
            "loggable_id invented {logged:?}"
        );
        if passed && !input.is_empty() {
            assert!(text::reject_personal_data("field", input).is_ok());
            assert!(input
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-:./".contains(&b)));
        }
    }
}

pub mod identifiers {
    use tandem_domain::customer::{NetworkKey, RawIdentifier};

    /// Identifier normalisation: no panic on any input; a normalised identifier normalises to
    /// itself (one customer, one key); a card fingerprint never holds a card number; the customer
    /// key of anything accepted parses back as a customer key and never contains the raw value.
    pub fn check(input: &str) {
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
    }
}

pub mod gateway_requests {
    use merchant_gateway::commands::{parse_create_referral, parse_record_purchase};
    use prost::Message;
    use tandem_domain::money::MAX_AMOUNT_MINOR;
    use tandem_domain::text::reject_personal_data;
    use tandem_proto::v1 as pb;

    /// The gateway's request parsing and validation, from the bytes a till could send: no panic;
    /// an accepted purchase has an amount within bounds and a transaction id and idempotency key
    /// that pass the free-text guard; an accepted referral names a well-formed acceptor.
    pub fn check(data: &[u8]) {
        let now = chrono::DateTime::from_timestamp(1_796_000_000, 0).unwrap();
        if let Ok(request) = pb::RecordPurchaseRequest::decode(data) {
            if let Ok(parsed) = parse_record_purchase(&request, Vec::new(), now) {
                let amount = parsed.command.amount.amount_minor;
                assert!(amount != 0 && amount.abs() <= MAX_AMOUNT_MINOR, "{amount}");
                assert!(reject_personal_data("", &parsed.command.transaction_id).is_ok());
                assert!(reject_personal_data("", &parsed.idempotency_key).is_ok());
                assert!(parsed.command.purchased_at <= now + chrono::Duration::minutes(5));
                assert!(
                    parsed.fingerprint.len() >= 34 && parsed.fingerprint.len().is_multiple_of(34)
                );
                assert!(merchant_gateway::commands::same_request(
                    &parsed.fingerprint,
                    &parsed.fingerprint
                ));
            }
        }
        if let Ok(request) = pb::CreateReferralRequest::decode(data) {
            if let Ok(parsed) = parse_create_referral(&request, Vec::new(), now) {
                assert!(parsed.command.acceptor.as_str().starts_with("mer_"));
                assert!(reject_personal_data("", &parsed.command.referrer_reference).is_ok());
                assert!(reject_personal_data("", &parsed.idempotency_key).is_ok());
            }
        }
    }
}

pub mod terms {
    use prost::Message;
    use tandem_codec::{terms_from_proto, terms_to_proto};
    use tandem_domain::money::{Currency, Money, MAX_AMOUNT_MINOR};
    use tandem_proto::v1 as pb;

    /// Terms validation, from the bytes a partner's ProposeTerms could carry: no panic; accepted
    /// terms survive the round trip through their wire form unchanged; a commission at any rate
    /// the terms allow is never more than the purchase and has its sign.
    pub fn check(data: &[u8]) {
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
    }
}

pub mod events {
    use prost::Message;
    use tandem_codec::{event_from_proto, event_to_proto};
    use tandem_domain::ids::PartnershipId;
    use tandem_proto::v1 as pb;

    /// Event decoding, from the bytes a topic or the event table could hold: no panic; a decoded
    /// partnership event survives the round trip through its wire form unchanged.
    pub fn check(data: &[u8]) {
        if let Ok(wire) = pb::PartnershipEvent::decode(data) {
            if let Ok(event) = event_from_proto(&wire) {
                let partnership = PartnershipId::generate();
                let again = event_from_proto(&event_to_proto(&partnership, &event))
                    .expect("an event written by the codec decodes");
                assert_eq!(again, event, "event changed on the round trip");
            }
        }
        let _ = pb::EventEnvelope::decode(data);
        let _ = pb::LedgerEvent::decode(data);
    }
}
