//! The gateway's request parsing and validation, from the bytes a till could send: no panic;
//! an accepted purchase has an amount within bounds and a transaction id and idempotency key
//! that pass the free-text guard; an accepted referral names a well-formed acceptor.
#![no_main]

use libfuzzer_sys::fuzz_target;
use merchant_gateway::commands::{parse_create_referral, parse_record_purchase};
use prost::Message;
use tandem_domain::money::MAX_AMOUNT_MINOR;
use tandem_domain::text::reject_personal_data;
use tandem_proto::v1 as pb;

fuzz_target!(|data: &[u8]| {
    let now = chrono::DateTime::from_timestamp(1_796_000_000, 0).unwrap();
    if let Ok(request) = pb::RecordPurchaseRequest::decode(data) {
        if let Ok(parsed) = parse_record_purchase(&request, Vec::new(), now) {
            let amount = parsed.command.amount.amount_minor;
            assert!(amount != 0 && amount.abs() <= MAX_AMOUNT_MINOR, "{amount}");
            assert!(reject_personal_data("", &parsed.command.transaction_id).is_ok());
            assert!(reject_personal_data("", &parsed.idempotency_key).is_ok());
            assert!(parsed.command.purchased_at <= now + chrono::Duration::minutes(5));
            assert_eq!(parsed.fingerprint.len(), 32);
        }
    }
    if let Ok(request) = pb::CreateReferralRequest::decode(data) {
        if let Ok(parsed) = parse_create_referral(&request, Vec::new(), now) {
            assert!(parsed.command.acceptor.as_str().starts_with("mer_"));
            assert!(reject_personal_data("", &parsed.command.referrer_reference).is_ok());
            assert!(reject_personal_data("", &parsed.idempotency_key).is_ok());
        }
    }
});
