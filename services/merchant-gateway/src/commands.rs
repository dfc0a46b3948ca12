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
    let fingerprint = keyed_fingerprint(
        &[
            "create_referral",
            acceptor.as_str(),
            &referrer_reference,
            &instant_as_sent(request.referred_at.as_ref()),
        ],
        &customer_keys,
        2,
    );
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
    let fingerprint = keyed_fingerprint(
        &[
            "record_purchase",
            &transaction_id,
            &amount.amount_minor.to_string(),
            amount.currency.as_str(),
            &instant_as_sent(request.purchased_at.as_ref()),
        ],
        &customer_keys,
        2,
    );
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

/// Marks the entry of a keyed fingerprint that leaves the customer keys out.
const WITHOUT_KEYS: u16 = u16::MAX;
/// Marks the entry computed as fingerprints were before they were keyed (all keys joined at
/// their old place), to recognise a retry of a request recorded before that change.
const LEGACY: u16 = u16::MAX - 1;
const ENTRY: usize = 2 + 32;

/// The fingerprint of a request that carries customer keys, built so that a retry answered by a
/// gateway with other network keys configured (a rotation rolling out) is still recognised: one
/// entry per network-key version among `keys`, the SHA-256 of `parts` and that version's keys;
/// one without keys; and one in the layout of earlier releases, with every key joined at
/// `legacy_at` among the parts. Each entry is the version (2 bytes, big-endian; 65535 for the
/// keyless one, 65534 for the legacy one) and the digest. [`same_request`] compares two.
pub fn keyed_fingerprint(parts: &[&str], keys: &[CustomerKey], legacy_at: usize) -> Vec<u8> {
    let join = |version: Option<u16>| {
        keys.iter()
            .filter(|key| version.is_none() || key.version() == version)
            .map(CustomerKey::as_str)
            .collect::<Vec<_>>()
            .join(",")
    };
    let with = |joined: &str, at: usize| {
        let mut all: Vec<&str> = parts.to_vec();
        all.insert(at.min(all.len()), joined);
        fingerprint(&all)
    };
    let mut versions: Vec<u16> = keys.iter().filter_map(CustomerKey::version).collect();
    versions.sort_unstable();
    versions.dedup();
    let mut entries = Vec::with_capacity((versions.len() + 2) * ENTRY);
    for version in versions {
        entries.extend_from_slice(&version.to_be_bytes());
        entries.extend_from_slice(&with(&join(Some(version)), parts.len()));
    }
    entries.extend_from_slice(&WITHOUT_KEYS.to_be_bytes());
    entries.extend_from_slice(&with("", parts.len()));
    entries.extend_from_slice(&LEGACY.to_be_bytes());
    entries.extend_from_slice(&with(&join(None), legacy_at));
    entries
}

/// Whether two fingerprints are of the same request. Two keyed fingerprints
/// ([`keyed_fingerprint`]) match when the request without its keys is the same and either
/// neither has keys, or they share at least one key version and agree on every version they
/// share (a retry across one step of a rotation). Keys of no common version, or keys on one side
/// only, are another request. A plain SHA-256 (operator calls, and requests recorded before
/// fingerprints were keyed) matches itself, or the legacy entry of a keyed one.
pub fn same_request(stored: &[u8], retried: &[u8]) -> bool {
    type Entries = std::collections::BTreeMap<u16, Vec<u8>>;
    let entries = |fingerprint: &[u8]| -> Option<Entries> {
        if !fingerprint.len().is_multiple_of(ENTRY) || fingerprint.len() < ENTRY {
            return None;
        }
        let entries: Entries = fingerprint
            .chunks(ENTRY)
            .map(|entry| {
                (
                    u16::from_be_bytes([entry[0], entry[1]]),
                    entry[2..].to_vec(),
                )
            })
            .collect();
        entries.contains_key(&WITHOUT_KEYS).then_some(entries)
    };
    let versions = |entries: &Entries| -> std::collections::BTreeSet<u16> {
        entries.keys().copied().filter(|v| *v < LEGACY).collect()
    };
    match (entries(stored), entries(retried)) {
        (Some(stored), Some(retried)) => {
            if stored.get(&WITHOUT_KEYS) != retried.get(&WITHOUT_KEYS) {
                return false;
            }
            let (mine, theirs) = (versions(&stored), versions(&retried));
            if mine.is_empty() && theirs.is_empty() {
                return true;
            }
            let shared: Vec<&u16> = mine.intersection(&theirs).collect();
            !shared.is_empty()
                && shared
                    .iter()
                    .all(|version| stored.get(version) == retried.get(version))
        }
        (None, Some(retried)) => retried.get(&LEGACY).map(Vec::as_slice) == Some(stored),
        (Some(stored), None) => stored.get(&LEGACY).map(Vec::as_slice) == Some(retried),
        (None, None) => stored == retried,
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tandem_domain::customer::{Capture, IdentifierKind};
    use tandem_domain::customer::{Captures, CustomerIdentifiers, NetworkKey, RawCustomer};

    fn keys(versions: &[u16], phone: &str) -> Vec<CustomerKey> {
        let captures = Captures::new(
            "c",
            vec![Capture::new("c", IdentifierKind::Phone, "").unwrap()],
        )
        .unwrap();
        let raw = RawCustomer {
            phone,
            ..Default::default()
        };
        let identifiers = CustomerIdentifiers::parse("customer", &raw, &captures, None).unwrap();
        let network: Vec<NetworkKey> = versions
            .iter()
            .map(|v| NetworkKey::new(*v, vec![*v as u8; 32]).unwrap())
            .collect();
        identifiers.keys_under(&network)
    }

    #[test]
    fn a_retry_across_a_rotation_is_the_same_request_and_another_customer_is_not() {
        let phone = "+44 20 7946 0958";
        let print = |versions: &[u16], phone: &str, amount: &str| {
            keyed_fingerprint(
                &["record_purchase", "T-1", amount],
                &keys(versions, phone),
                3,
            )
        };
        let before = print(&[1], phone, "100");
        let during = print(&[1, 2], phone, "100");
        let after = print(&[2], phone, "100");
        // Each step of a rotation: first try on one side, retry on the other.
        assert!(same_request(&before, &during));
        assert!(same_request(&during, &before));
        assert!(same_request(&during, &after));
        assert!(same_request(&after, &during));
        // No version in common (a rotation without its change-over): not recognised.
        assert!(!same_request(&before, &after));
        // Keys on one side only (a refund retried with its customer added): another request.
        let keyless = keyed_fingerprint(&["record_purchase", "T-1", "100"], &[], 3);
        assert!(same_request(&keyless, &keyless));
        assert!(!same_request(&keyless, &before));
        assert!(!same_request(&before, &keyless));
        // A request recorded before fingerprints were keyed: its plain digest, keys at index 3.
        let keys_v1 = keys(&[1], phone);
        let joined: Vec<&str> = keys_v1.iter().map(CustomerKey::as_str).collect();
        let legacy = fingerprint(&["record_purchase", "T-1", "100", &joined.join(",")]);
        assert!(same_request(&legacy, &print(&[1], phone, "100")));
        assert!(!same_request(&legacy, &print(&[1], phone, "101")));
        // Another customer, or another amount, is another request.
        let other = "+44 20 7946 0959";
        assert!(!same_request(&during, &print(&[1, 2], other, "100")));
        assert!(!same_request(&before, &print(&[1, 2], other, "100")));
        assert!(!same_request(&during, &print(&[2], phone, "101")));
        // A plain digest (operator calls, older records) matches only itself.
        let plain = fingerprint(&["create_merchant", "x"]);
        assert!(same_request(&plain, &plain));
        assert!(!same_request(&plain, &before));
        assert!(!same_request(&before, &plain));
    }
}
