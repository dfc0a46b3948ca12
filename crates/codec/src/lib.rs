//! Conversions between `tandem.v1` protobuf messages and domain types, shared by the services
//! that exchange them: partnership terms (an API input and an event field) and partnership
//! events (on the admin topic and in the ledger's event table). Parsing validates: a message
//! that breaks the contract becomes a `ValidationError` naming the field.

mod events;
pub mod identifiers;
mod terms;

pub use events::{
    admin_payload, calculation_from_proto, calculation_to_proto, event_from_proto, event_to_proto,
    partnership_event_from_payload, reason_to_proto,
};
pub use terms::{settlement_cycle_from_proto, terms_from_proto, terms_to_proto};

use chrono::{DateTime, Utc};
use tandem_domain::money::Money;
use tandem_domain::ValidationError;
use tandem_proto::v1 as pb;

pub(crate) fn instant(
    field: &str,
    timestamp: Option<&prost_types::Timestamp>,
) -> Result<DateTime<Utc>, ValidationError> {
    timestamp
        .and_then(tandem_proto::time::datetime)
        .ok_or_else(|| ValidationError::new(field, "is missing or out of range"))
}

pub(crate) fn money(field: &str, money: Option<&pb::Money>) -> Result<Money, ValidationError> {
    let money = money.ok_or_else(|| ValidationError::new(field, "is missing"))?;
    let currency =
        tandem_domain::money::Currency::parse(&format!("{field}.currency"), &money.currency)?;
    Ok(Money::new(money.amount_minor, currency))
}

pub fn money_to_proto(money: Money) -> pb::Money {
    pb::Money {
        amount_minor: money.amount_minor,
        currency: money.currency.to_string(),
    }
}
