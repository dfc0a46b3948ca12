//! Typed identifiers. Each is a prefix and a UUID (`mer_…`, `prt_…`), so an id pasted into the
//! wrong field is caught at the edge rather than matching nothing deep inside the ledger.

use std::fmt;

use crate::ValidationError;

macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A new id from a time-ordered UUID.
            pub fn generate() -> Self {
                Self::from_uuid(uuid::Uuid::now_v7())
            }

            pub fn from_uuid(uuid: uuid::Uuid) -> Self {
                Self(format!("{}{}", $prefix, uuid.simple()))
            }

            /// Parses an id sent by a client; `field` names it in the error.
            pub fn parse(field: &str, value: &str) -> Result<Self, ValidationError> {
                let valid = value
                    .strip_prefix($prefix)
                    .is_some_and(|rest| rest.len() == 32 && uuid::Uuid::try_parse(rest).is_ok());
                if valid {
                    Ok(Self(value.to_owned()))
                } else {
                    Err(ValidationError::new(
                        field,
                        format!("must be an id of the form {}<32 hex digits>", $prefix),
                    ))
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

prefixed_id!(
    /// A merchant in the network.
    MerchantId, "mer_"
);
prefixed_id!(
    /// A directed partnership, referrer to acceptor.
    PartnershipId, "prt_"
);
prefixed_id!(
    /// A referral of one customer from a referrer to an acceptor.
    ReferralId, "ref_"
);
prefixed_id!(
    /// A purchase recorded at a merchant.
    PurchaseId, "pur_"
);
prefixed_id!(
    /// A refund or void of (part of) a purchase.
    RefundId, "rfd_"
);
prefixed_id!(
    /// One of a merchant's API keys (its id, never its secret).
    ApiKeyId, "key_"
);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn round_trips_and_rejects_the_wrong_prefix() {
        let id = MerchantId::generate();
        assert_eq!(MerchantId::parse("merchant_id", id.as_str()).unwrap(), id);
        let error = MerchantId::parse("acceptor_merchant_id", PartnershipId::generate().as_str())
            .unwrap_err();
        assert_eq!(error.field, "acceptor_merchant_id");
        assert!(MerchantId::parse("m", "mer_").is_err());
        assert!(MerchantId::parse("m", "mer_zz").is_err());
    }
}
