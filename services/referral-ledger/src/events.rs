//! Decoding messages from the topics into the ledger's own event types. A message that does not
//! decode, or breaks the event contract, is rejected here with a reason.

use chrono::{DateTime, Utc};
use prost::Message;
use tandem_bus::Delivery;
use tandem_domain::commission::Event;
use tandem_domain::customer::CustomerKey;
use tandem_domain::ids::{MerchantId, PartnershipId, PurchaseId, ReferralId, RefundId};
use tandem_domain::money::Money;
use tandem_domain::ValidationError;
use tandem_proto::v1::{event_envelope::Payload, EventEnvelope};

/// An event the ledger applies, with the id it is deduplicated by.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// `event_id` for admin events, `event_id/customer_key` for customer-activity copies.
    pub message_id: String,
    pub recorded_at: DateTime<Utc>,
    pub event: LedgerEvent,
}

#[derive(Debug, Clone)]
pub enum LedgerEvent {
    /// A merchant registered or changed its payout account: nothing the ledger keeps.
    MerchantChanged,
    /// A terms event of a partnership, decided by the gateway; `event_id` is the gateway's.
    Partnership {
        partnership_id: PartnershipId,
        event_id: uuid::Uuid,
        event: Event,
    },
    CustomerReferred(Referral),
    PurchaseRecorded(Purchase),
    ReferralCancelled {
        referral_id: ReferralId,
        cancelled_at: DateTime<Utc>,
    },
    RefundRecorded(Refund),
}

/// One refund, from whichever customer key's copy arrives first.
#[derive(Debug, Clone)]
pub struct Refund {
    pub refund_id: RefundId,
    pub merchant: MerchantId,
    pub transaction_id: String,
    pub amount: Money,
    pub refunded_at: DateTime<Utc>,
}

/// One customer key's copy of a referral.
#[derive(Debug, Clone)]
pub struct Referral {
    pub referral_id: ReferralId,
    pub partnership_id: PartnershipId,
    pub terms_version: i32,
    pub referrer: MerchantId,
    pub acceptor: MerchantId,
    pub customer_key: CustomerKey,
    pub referrer_reference: String,
    pub referred_at: DateTime<Utc>,
    pub attribution_ends_at: DateTime<Utc>,
}

/// One customer key's copy of a purchase.
#[derive(Debug, Clone)]
pub struct Purchase {
    pub purchase_id: PurchaseId,
    pub merchant: MerchantId,
    pub transaction_id: String,
    pub customer_key: CustomerKey,
    pub amount: Money,
    pub purchased_at: DateTime<Utc>,
}

/// Decodes one message, or says why it cannot be applied. The admin sequence is returned either
/// way when the envelope itself is readable, so that progress is kept even past a bad event.
pub fn decode(delivery: &Delivery) -> (u64, Result<Incoming, String>) {
    let envelope = match EventEnvelope::decode(delivery.payload.as_slice()) {
        Ok(envelope) => envelope,
        Err(error) => return (0, Err(format!("not an EventEnvelope: {error}"))),
    };
    let admin_sequence = envelope.admin_sequence;
    (
        admin_sequence,
        parse(envelope).map_err(|error| format!("event contract violated: {error}")),
    )
}

fn parse(envelope: EventEnvelope) -> Result<Incoming, ValidationError> {
    let recorded_at = instant("recorded_at", envelope.recorded_at.as_ref())?;
    let routing_key = envelope.customer_key;
    let (message_id, event) = match envelope.payload {
        None => return Err(ValidationError::new("payload", "is missing")),
        // Nothing the ledger keeps; it still advances the admin position activity waits on.
        Some(Payload::MerchantRegistered(_) | Payload::PayoutAccountRegistered(_)) => {
            (envelope.event_id, LedgerEvent::MerchantChanged)
        }
        Some(
            payload @ (Payload::PartnershipTermsProposed(_)
            | Payload::PartnershipTermsAccepted(_)
            | Payload::PartnershipTerminated(_)),
        ) => {
            let event_id = uuid::Uuid::try_parse(&envelope.event_id)
                .map_err(|_| ValidationError::new("event_id", "is not a UUID"))?;
            let (partnership_id, event) = tandem_codec::partnership_event_from_payload(&payload)
                .ok_or_else(|| {
                ValidationError::new("payload", "is not a partnership event")
            })??;
            (
                envelope.event_id,
                LedgerEvent::Partnership {
                    partnership_id,
                    event_id,
                    event,
                },
            )
        }
        Some(Payload::ReferralCancelled(event)) => {
            let customer_key = routing(&routing_key, &event.customer_keys)?;
            (
                format!("{}/{}", envelope.event_id, customer_key),
                LedgerEvent::ReferralCancelled {
                    referral_id: ReferralId::parse("referral_id", &event.referral_id)?,
                    cancelled_at: instant("cancelled_at", event.cancelled_at.as_ref())?,
                },
            )
        }
        Some(Payload::RefundRecorded(event)) => {
            let customer_key = routing(&routing_key, &event.customer_keys)?;
            let amount = event
                .amount
                .ok_or_else(|| ValidationError::new("amount", "is missing"))?;
            (
                format!("{}/{}", envelope.event_id, customer_key),
                LedgerEvent::RefundRecorded(Refund {
                    refund_id: RefundId::parse("refund_id", &event.refund_id)?,
                    merchant: MerchantId::parse("merchant_id", &event.merchant_id)?,
                    transaction_id: event.transaction_id,
                    amount: Money::parse_positive("amount", amount.amount_minor, &amount.currency)?,
                    refunded_at: instant("refunded_at", event.refunded_at.as_ref())?,
                }),
            )
        }
        Some(Payload::CustomerReferred(event)) => {
            let customer_key = routing(&routing_key, &event.customer_keys)?;
            (
                format!("{}/{}", envelope.event_id, customer_key),
                LedgerEvent::CustomerReferred(Referral {
                    referral_id: ReferralId::parse("referral_id", &event.referral_id)?,
                    partnership_id: PartnershipId::parse("partnership_id", &event.partnership_id)?,
                    terms_version: version(event.terms_version)?,
                    referrer: MerchantId::parse(
                        "referrer_merchant_id",
                        &event.referrer_merchant_id,
                    )?,
                    acceptor: MerchantId::parse(
                        "acceptor_merchant_id",
                        &event.acceptor_merchant_id,
                    )?,
                    customer_key,
                    referrer_reference: event.referrer_reference,
                    referred_at: instant("referred_at", event.referred_at.as_ref())?,
                    attribution_ends_at: instant(
                        "attribution_ends_at",
                        event.attribution_ends_at.as_ref(),
                    )?,
                }),
            )
        }
        Some(Payload::PurchaseRecorded(event)) => {
            let customer_key = routing(&routing_key, &event.customer_keys)?;
            let amount = event
                .amount
                .ok_or_else(|| ValidationError::new("amount", "is missing"))?;
            (
                format!("{}/{}", envelope.event_id, customer_key),
                LedgerEvent::PurchaseRecorded(Purchase {
                    purchase_id: PurchaseId::parse("purchase_id", &event.purchase_id)?,
                    merchant: MerchantId::parse("merchant_id", &event.merchant_id)?,
                    transaction_id: event.transaction_id,
                    customer_key,
                    amount: Money::parse_positive("amount", amount.amount_minor, &amount.currency)?,
                    purchased_at: instant("purchased_at", event.purchased_at.as_ref())?,
                }),
            )
        }
    };
    Ok(Incoming {
        message_id,
        recorded_at,
        event,
    })
}

/// The customer key a customer-activity copy is published under; it must be one of the event's.
fn routing(routing_key: &str, all_keys: &[String]) -> Result<CustomerKey, ValidationError> {
    let key = CustomerKey::parse("customer_key", routing_key)?;
    if !all_keys.iter().any(|k| k == routing_key) {
        return Err(ValidationError::new(
            "customer_key",
            "is not one of the event's customer_keys",
        ));
    }
    Ok(key)
}

fn instant(
    field: &str,
    timestamp: Option<&prost_types::Timestamp>,
) -> Result<DateTime<Utc>, ValidationError> {
    timestamp
        .and_then(tandem_proto::time::datetime)
        .ok_or_else(|| ValidationError::new(field, "is missing or out of range"))
}

fn version(terms_version: u32) -> Result<i32, ValidationError> {
    i32::try_from(terms_version)
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| ValidationError::new("terms_version", "must be at least 1"))
}
