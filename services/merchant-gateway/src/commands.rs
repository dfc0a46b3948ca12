//! Parsing requests into commands: every raw field becomes a domain type here. Raw customer
//! identifiers became customer keys before (`identifiers::customer_keys`); nothing past that sees a
//! raw identifier.

use chrono::{DateTime, Duration, Utc};
use sha2::{Digest, Sha256};
use tandem_domain::customer::CustomerKey;
use tandem_domain::ids::MerchantId;
use tandem_domain::money::Money;
use tandem_domain::text::parse_token;
use tandem_domain::ValidationError;
use tandem_proto::v1;

/// How far in the past a POS may date an event (an offline till catching up).
pub const MAX_BACKDATE: Duration = Duration::days(30);
/// How far in the future a POS clock may be ahead of ours.
pub const MAX_CLOCK_SKEW: Duration = Duration::minutes(5);

/// A command ready to be recorded, and a fingerprint of it for idempotency.
#[derive(Debug)]
pub struct Parsed<C> {
    pub idempotency_key: String,
    pub command: C,
    /// SHA-256 over the pseudonymised request, as the POS sent it (so a retry matches even
    /// when an instant was left for the gateway to fill in).
    pub fingerprint: Vec<u8>,
}

#[derive(Debug)]
pub struct CreateReferral {
    pub acceptor: MerchantId,
    pub customer_keys: Vec<CustomerKey>,
    pub referrer_reference: String,
    pub referred_at: DateTime<Utc>,
}

#[derive(Debug)]
pub struct RecordPurchase {
    pub transaction_id: String,
    pub customer_keys: Vec<CustomerKey>,
    pub amount: Money,
    pub purchased_at: DateTime<Utc>,
}

pub fn parse_create_referral(
    request: &v1::CreateReferralRequest,
    customer_keys: Vec<CustomerKey>,
    now: DateTime<Utc>,
) -> Result<Parsed<CreateReferral>, ValidationError> {
    let idempotency_key = parse_idempotency_key(&request.idempotency_key)?;
    let acceptor = MerchantId::parse("acceptor_merchant_id", &request.acceptor_merchant_id)?;
    let referrer_reference = if request.referrer_reference.trim().is_empty() {
        String::new()
    } else {
        parse_token("referrer_reference", &request.referrer_reference, 1, 128)?
    };
    let referred_at = parse_instant("referred_at", request.referred_at.as_ref(), now)?;
    let fingerprint = fingerprint(&[
        "create_referral",
        acceptor.as_str(),
        &join_keys(&customer_keys),
        &referrer_reference,
        &instant_as_sent(request.referred_at.as_ref()),
    ]);
    Ok(Parsed {
        idempotency_key,
        command: CreateReferral {
            acceptor,
            customer_keys,
            referrer_reference,
            referred_at,
        },
        fingerprint,
    })
}

pub fn parse_record_purchase(
    request: &v1::RecordPurchaseRequest,
    customer_keys: Vec<CustomerKey>,
    now: DateTime<Utc>,
) -> Result<Parsed<RecordPurchase>, ValidationError> {
    let idempotency_key = parse_idempotency_key(&request.idempotency_key)?;
    let transaction_id = parse_token("transaction_id", &request.transaction_id, 1, 128)?;
    let amount = request
        .amount
        .as_ref()
        .ok_or_else(|| ValidationError::new("amount", "is required: amount_minor and currency"))?;
    let amount = Money::parse_bounded("amount", amount.amount_minor, &amount.currency)?;
    let purchased_at = parse_instant("purchased_at", request.purchased_at.as_ref(), now)?;
    let fingerprint = fingerprint(&[
        "record_purchase",
        &transaction_id,
        &join_keys(&customer_keys),
        &amount.amount_minor.to_string(),
        amount.currency.as_str(),
        &instant_as_sent(request.purchased_at.as_ref()),
    ]);
    Ok(Parsed {
        idempotency_key,
        command: RecordPurchase {
            transaction_id,
            customer_keys,
            amount,
            purchased_at,
        },
        fingerprint,
    })
}

fn parse_idempotency_key(value: &str) -> Result<String, ValidationError> {
    parse_token("idempotency_key", value, 1, 128)
}

/// An instant sent by the POS, or `now` if it sent none. Must lie within
/// `[now - MAX_BACKDATE, now + MAX_CLOCK_SKEW]`.
pub fn parse_instant(
    field: &str,
    sent: Option<&prost_types::Timestamp>,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, ValidationError> {
    let now = tandem_proto::time::truncate_to_micros(now);
    let Some(sent) = sent else { return Ok(now) };
    let instant = tandem_proto::time::datetime(sent)
        .ok_or_else(|| ValidationError::new(field, "is not a valid timestamp"))?;
    if instant > now + MAX_CLOCK_SKEW {
        return Err(ValidationError::new(
            field,
            format!("is in the future ({instant}); check the POS clock, which may be ahead of UTC by at most 5 minutes"),
        ));
    }
    if instant < now - MAX_BACKDATE {
        return Err(ValidationError::new(
            field,
            format!("is more than 30 days in the past ({instant}); such events can no longer be recorded"),
        ));
    }
    Ok(instant)
}

fn instant_as_sent(sent: Option<&prost_types::Timestamp>) -> String {
    sent.map_or_else(String::new, |t| format!("{}.{:09}", t.seconds, t.nanos))
}

fn join_keys(keys: &[CustomerKey]) -> String {
    keys.iter()
        .map(CustomerKey::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

/// SHA-256 over the parts, each length-prefixed so that no two different requests collide by
/// concatenation.
fn fingerprint(parts: &[&str]) -> Vec<u8> {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize().to_vec()
}
