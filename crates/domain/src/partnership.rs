//! Partnership terms: what a referrer earns on purchases at the acceptor, and for how long after
//! a referral. Terms are versioned; every commission records the version it used.

use chrono::Duration;

use crate::ids::MerchantId;
use crate::ValidationError;

/// The longest attribution window Tandem accepts.
pub const MAX_ATTRIBUTION_WINDOW_DAYS: u32 = 365;

/// Validated terms of one version of a partnership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    /// Commission in basis points of the purchase amount, 1..=10 000.
    pub commission_rate_bps: u32,
    pub attribution_window: AttributionWindow,
}

impl Terms {
    pub fn parse(
        commission_rate_bps: u32,
        attribution_window_days: u32,
    ) -> Result<Self, ValidationError> {
        if !(1..=10_000).contains(&commission_rate_bps) {
            return Err(ValidationError::new(
                "commission_rate_bps",
                format!(
                    "must be 1 to 10000 basis points (0.01% to 100%), got {commission_rate_bps}"
                ),
            ));
        }
        Ok(Self {
            commission_rate_bps,
            attribution_window: AttributionWindow::from_days(
                "attribution_window_days",
                attribution_window_days,
            )?,
        })
    }
}

/// How long after a referral a purchase is attributed to it. The window is half-open:
/// `[referred_at, referred_at + length)`. A purchase at exactly the end is outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttributionWindow {
    days: u32,
}

impl AttributionWindow {
    pub fn from_days(field: &str, days: u32) -> Result<Self, ValidationError> {
        if !(1..=MAX_ATTRIBUTION_WINDOW_DAYS).contains(&days) {
            return Err(ValidationError::new(
                field,
                format!("must be 1 to {MAX_ATTRIBUTION_WINDOW_DAYS} days, got {days}"),
            ));
        }
        Ok(Self { days })
    }

    pub fn days(&self) -> u32 {
        self.days
    }

    pub fn length(&self) -> Duration {
        Duration::days(i64::from(self.days))
    }
}

/// A referrer and an acceptor must be different merchants: nobody earns commission on their own
/// customers.
pub fn check_not_self_referral(
    referrer: &MerchantId,
    acceptor: &MerchantId,
) -> Result<(), ValidationError> {
    if referrer == acceptor {
        return Err(ValidationError::new(
            "acceptor_merchant_id",
            "must differ from the referrer: a merchant cannot refer customers to itself",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn validates_rate_and_window_naming_the_field() {
        assert!(Terms::parse(1000, 30).is_ok());
        assert_eq!(
            Terms::parse(0, 30).unwrap_err().field,
            "commission_rate_bps"
        );
        assert_eq!(
            Terms::parse(10_001, 30).unwrap_err().field,
            "commission_rate_bps"
        );
        assert_eq!(
            Terms::parse(1000, 0).unwrap_err().field,
            "attribution_window_days"
        );
        assert_eq!(
            Terms::parse(1000, 366).unwrap_err().field,
            "attribution_window_days"
        );
    }

    #[test]
    fn forbids_self_referral() {
        let merchant = MerchantId::generate();
        assert!(check_not_self_referral(&merchant, &merchant).is_err());
        assert!(check_not_self_referral(&merchant, &MerchantId::generate()).is_ok());
    }
}
