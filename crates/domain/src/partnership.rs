//! Partnership terms: what a referrer earns on purchases at the acceptor, for how long, within
//! which limits, and when it becomes payable. Terms are versioned; every commission records the
//! version and the rule that produced it.
//!
//! Rules, written once:
//! - The attribution window is half-open: `[referred_at, referred_at + window)`.
//! - A purchase below `min_purchase_minor` or above `max_purchase_minor` earns nothing.
//! - Marginal volume tiers: each tier's rate applies to the part of the purchase that falls in
//!   the tier's band of the period's attributed spend (spend before this purchase, net of
//!   refunds). The sum is rounded once, half to even.
//! - Caps (per customer, i.e. per referral, and per settlement period) cut a commission down to
//!   what is left under the cap; a refund's reversal frees cap room again.
//! - Settlement periods (used by tiers and the period cap) start at 00:00 UTC: each day, each
//!   Monday, or the first of each month.

use chrono::{DateTime, Datelike, Duration, NaiveTime, TimeZone, Utc};

use crate::customer::AttributingKinds;
use crate::ids::MerchantId;
use crate::money::Currency;
use crate::ValidationError;

/// The longest attribution window Tandem accepts.
pub const MAX_ATTRIBUTION_WINDOW_DAYS: u32 = 365;
/// Most volume tiers in one rule.
pub const MAX_TIERS: usize = 20;

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

/// Which referrer earns a purchase when several referred the same customer to the acceptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TouchPolicy {
    /// The earliest open referral wins.
    FirstReferrer,
    /// The latest open referral wins.
    LastReferrer,
}

/// One band of a marginal volume-tier rule: from `from_minor` of period spend upwards (up to the
/// next tier's `from_minor`), the rate is `rate_bps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    pub from_minor: i64,
    pub rate_bps: u32,
}

/// How a commission is computed from an eligible purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommissionRule {
    /// A share of the purchase amount.
    Percentage { rate_bps: u32 },
    /// A fixed amount on the customer's first attributed purchase only.
    FlatPerFirstPurchase { amount_minor: i64 },
    /// A fixed amount on every attributed purchase.
    FlatPerPurchase { amount_minor: i64 },
    /// Marginal rates on the period's attributed spend (the "quantitative rebate").
    MarginalTiers { tiers: Vec<Tier> },
}

impl CommissionRule {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Percentage { .. } => "percentage",
            Self::FlatPerFirstPurchase { .. } => "flat_per_first_purchase",
            Self::FlatPerPurchase { .. } => "flat_per_purchase",
            Self::MarginalTiers { .. } => "marginal_tiers",
        }
    }

    /// The rule in a few words, as statements show it: `percentage 500 bps`,
    /// `flat_per_purchase 250`, `flat_per_first_purchase 1000`,
    /// `marginal_tiers 0:200 bps 100000:300 bps` (tier starts in minor units).
    pub fn describe(&self) -> String {
        match self {
            Self::Percentage { rate_bps } => format!("percentage {rate_bps} bps"),
            Self::FlatPerFirstPurchase { amount_minor }
            | Self::FlatPerPurchase { amount_minor } => {
                format!("{} {amount_minor}", self.name())
            }
            Self::MarginalTiers { tiers } => {
                let mut text = String::from("marginal_tiers");
                for tier in tiers {
                    text.push_str(&format!(" {}:{} bps", tier.from_minor, tier.rate_bps));
                }
                text
            }
        }
    }
}

/// For how long a referred customer earns commissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommissionDuration {
    Unlimited,
    /// Only the customer's first N attributed purchases.
    FirstPurchases(u32),
    /// Only purchases within N days after the customer's first attributed purchase.
    DaysAfterFirstPurchase(u32),
}

/// How often settlement cycles close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettlementCycle {
    Daily,
    Weekly,
    Monthly,
}

impl SettlementCycle {
    /// Start (00:00 UTC) of the period containing `instant`.
    pub fn period_start(self, instant: DateTime<Utc>) -> DateTime<Utc> {
        let date = instant.date_naive();
        let start = match self {
            Self::Daily => date,
            Self::Weekly => date - Duration::days(i64::from(date.weekday().num_days_from_monday())),
            Self::Monthly => date.with_day(1).unwrap_or(date),
        };
        Utc.from_utc_datetime(&start.and_time(NaiveTime::MIN))
    }
}

/// One version of a partnership's terms, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terms {
    pub currency: Currency,
    pub attribution_window: AttributionWindow,
    pub touch_policy: TouchPolicy,
    /// If set, a customer who bought at the acceptor within this many days before the referral
    /// earns nothing.
    pub new_customer_look_back_days: Option<u32>,
    pub rule: CommissionRule,
    pub duration: CommissionDuration,
    pub cap_per_customer_minor: Option<i64>,
    pub cap_per_period_minor: Option<i64>,
    pub min_purchase_minor: Option<i64>,
    pub max_purchase_minor: Option<i64>,
    /// Days after the purchase before a commission becomes payable (the refund window).
    pub holding_period_days: u32,
    pub settlement_cycle: SettlementCycle,
    /// Payouts below this are carried forward to the next cycle.
    pub minimum_payout_minor: i64,
    /// Every purchase at the referrer refers its customer to the acceptor.
    pub auto_refer: bool,
    /// The identifier kinds whose match may attribute a purchase (empty: every kind).
    pub attributing_kinds: AttributingKinds,
}

impl Terms {
    /// The simplest terms: a percentage, a window, defaults for everything else (first referrer
    /// wins, no caps, no holding period, monthly cycles).
    pub fn percentage(
        currency: Currency,
        commission_rate_bps: u32,
        attribution_window_days: u32,
    ) -> Result<Self, ValidationError> {
        Terms {
            currency,
            attribution_window: AttributionWindow::from_days(
                "attribution_window_days",
                attribution_window_days,
            )?,
            touch_policy: TouchPolicy::FirstReferrer,
            new_customer_look_back_days: None,
            rule: CommissionRule::Percentage {
                rate_bps: commission_rate_bps,
            },
            duration: CommissionDuration::Unlimited,
            cap_per_customer_minor: None,
            cap_per_period_minor: None,
            min_purchase_minor: None,
            max_purchase_minor: None,
            holding_period_days: 0,
            settlement_cycle: SettlementCycle::Monthly,
            minimum_payout_minor: 0,
            auto_refer: false,
            attributing_kinds: AttributingKinds::every(),
        }
        .validated()
    }

    /// Checks every field; the error names the first bad one.
    pub fn validated(self) -> Result<Self, ValidationError> {
        let rate = |field: &str, bps: u32, min: u32| parse_rate_bps(field, bps, min).map(|_| ());
        let positive = |field: &str, value: Option<i64>| match value {
            Some(v) if v <= 0 => Err(ValidationError::new(
                field,
                format!("must be positive when set, got {v}"),
            )),
            _ => Ok(()),
        };
        match &self.rule {
            CommissionRule::Percentage { rate_bps } => rate("percentage_bps", *rate_bps, 1)?,
            CommissionRule::FlatPerFirstPurchase { amount_minor }
            | CommissionRule::FlatPerPurchase { amount_minor } => {
                positive(
                    if matches!(self.rule, CommissionRule::FlatPerPurchase { .. }) {
                        "flat_per_purchase_minor"
                    } else {
                        "flat_per_first_purchase_minor"
                    },
                    Some(*amount_minor),
                )?;
            }
            CommissionRule::MarginalTiers { tiers } => {
                if tiers.is_empty() || tiers.len() > MAX_TIERS {
                    return Err(ValidationError::new(
                        "marginal_tiers.tiers",
                        format!("must have 1 to {MAX_TIERS} tiers, got {}", tiers.len()),
                    ));
                }
                if tiers[0].from_minor != 0 {
                    return Err(ValidationError::new(
                        "marginal_tiers.tiers[0].from_minor",
                        "must be 0: the first tier starts at no spend",
                    ));
                }
                for (index, pair) in tiers.windows(2).enumerate() {
                    if pair[1].from_minor <= pair[0].from_minor {
                        return Err(ValidationError::new(
                            format!("marginal_tiers.tiers[{}].from_minor", index + 1),
                            "must be greater than the previous tier's from_minor",
                        ));
                    }
                }
                for (index, tier) in tiers.iter().enumerate() {
                    rate(
                        &format!("marginal_tiers.tiers[{index}].rate_bps"),
                        tier.rate_bps,
                        0,
                    )?;
                }
            }
        }
        match self.duration {
            CommissionDuration::FirstPurchases(0) => {
                return Err(ValidationError::new(
                    "first_purchases",
                    "must be at least 1",
                ))
            }
            CommissionDuration::DaysAfterFirstPurchase(days) if !(1..=3650).contains(&days) => {
                return Err(ValidationError::new(
                    "days_after_first_purchase",
                    "must be 1 to 3650 days",
                ))
            }
            _ => {}
        }
        if let Some(days) = self.new_customer_look_back_days {
            if !(1..=730).contains(&days) {
                return Err(ValidationError::new(
                    "new_customer_look_back_days",
                    format!("must be 1 to 730 days when set, got {days}"),
                ));
            }
        }
        positive("cap_per_customer_minor", self.cap_per_customer_minor)?;
        positive("cap_per_period_minor", self.cap_per_period_minor)?;
        positive("min_purchase_minor", self.min_purchase_minor)?;
        positive("max_purchase_minor", self.max_purchase_minor)?;
        if let (Some(min), Some(max)) = (self.min_purchase_minor, self.max_purchase_minor) {
            if min > max {
                return Err(ValidationError::new(
                    "max_purchase_minor",
                    format!("must be at least min_purchase_minor ({min}), got {max}"),
                ));
            }
        }
        if self.holding_period_days > 365 {
            return Err(ValidationError::new(
                "holding_period_days",
                format!("must be 0 to 365 days, got {}", self.holding_period_days),
            ));
        }
        if self.minimum_payout_minor < 0 {
            return Err(ValidationError::new(
                "minimum_payout_minor",
                "must not be negative",
            ));
        }
        Ok(self)
    }
}

/// A rate in basis points, `min..=10 000` (100%).
pub fn parse_rate_bps(field: &str, bps: u32, min: u32) -> Result<u32, ValidationError> {
    if (min..=10_000).contains(&bps) {
        Ok(bps)
    } else {
        Err(ValidationError::new(
            field,
            format!("must be {min} to 10000 basis points, got {bps}"),
        ))
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

    fn eur() -> Currency {
        Currency::parse("c", "EUR").unwrap()
    }

    #[test]
    fn validates_rate_and_window_naming_the_field() {
        assert!(Terms::percentage(eur(), 1000, 30).is_ok());
        assert_eq!(
            Terms::percentage(eur(), 0, 30).unwrap_err().field,
            "percentage_bps"
        );
        assert_eq!(
            Terms::percentage(eur(), 10_001, 30).unwrap_err().field,
            "percentage_bps"
        );
        assert_eq!(
            Terms::percentage(eur(), 1000, 0).unwrap_err().field,
            "attribution_window_days"
        );
        assert_eq!(
            Terms::percentage(eur(), 1000, 366).unwrap_err().field,
            "attribution_window_days"
        );
    }

    #[test]
    fn validates_every_other_field() {
        let base = Terms::percentage(eur(), 500, 30).unwrap();
        let field = |terms: Terms| terms.validated().unwrap_err().field;
        let tiers = |tiers: Vec<(i64, u32)>| CommissionRule::MarginalTiers {
            tiers: tiers
                .into_iter()
                .map(|(from_minor, rate_bps)| Tier {
                    from_minor,
                    rate_bps,
                })
                .collect(),
        };
        assert_eq!(
            field(Terms {
                rule: tiers(vec![]),
                ..base.clone()
            }),
            "marginal_tiers.tiers"
        );
        assert_eq!(
            field(Terms {
                rule: tiers(vec![(100, 500)]),
                ..base.clone()
            }),
            "marginal_tiers.tiers[0].from_minor"
        );
        assert_eq!(
            field(Terms {
                rule: tiers(vec![(0, 500), (0, 600)]),
                ..base.clone()
            }),
            "marginal_tiers.tiers[1].from_minor"
        );
        assert_eq!(
            field(Terms {
                rule: tiers(vec![(0, 500), (10, 10_001)]),
                ..base.clone()
            }),
            "marginal_tiers.tiers[1].rate_bps"
        );
        assert!(Terms {
            rule: tiers(vec![(0, 0), (100_000, 500)]),
            ..base.clone()
        }
        .validated()
        .is_ok());
        assert_eq!(
            field(Terms {
                rule: CommissionRule::FlatPerPurchase { amount_minor: 0 },
                ..base.clone()
            }),
            "flat_per_purchase_minor"
        );
        assert_eq!(
            field(Terms {
                duration: CommissionDuration::FirstPurchases(0),
                ..base.clone()
            }),
            "first_purchases"
        );
        assert_eq!(
            field(Terms {
                duration: CommissionDuration::DaysAfterFirstPurchase(0),
                ..base.clone()
            }),
            "days_after_first_purchase"
        );
        assert_eq!(
            field(Terms {
                new_customer_look_back_days: Some(0),
                ..base.clone()
            }),
            "new_customer_look_back_days"
        );
        assert_eq!(
            field(Terms {
                cap_per_customer_minor: Some(0),
                ..base.clone()
            }),
            "cap_per_customer_minor"
        );
        assert_eq!(
            field(Terms {
                cap_per_period_minor: Some(-1),
                ..base.clone()
            }),
            "cap_per_period_minor"
        );
        assert_eq!(
            field(Terms {
                min_purchase_minor: Some(500),
                max_purchase_minor: Some(400),
                ..base.clone()
            }),
            "max_purchase_minor"
        );
        assert_eq!(
            field(Terms {
                holding_period_days: 366,
                ..base.clone()
            }),
            "holding_period_days"
        );
        assert_eq!(
            field(Terms {
                minimum_payout_minor: -1,
                ..base
            }),
            "minimum_payout_minor"
        );
    }

    #[test]
    fn periods_start_at_midnight_utc() {
        let instant = Utc
            .with_ymd_and_hms(2026, 11, 26, 15, 30, 0)
            .single()
            .unwrap(); // a Thursday
        let at = |y, m, d| Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).single().unwrap();
        assert_eq!(
            SettlementCycle::Daily.period_start(instant),
            at(2026, 11, 26)
        );
        assert_eq!(
            SettlementCycle::Weekly.period_start(instant),
            at(2026, 11, 23)
        );
        assert_eq!(
            SettlementCycle::Monthly.period_start(instant),
            at(2026, 11, 1)
        );
    }

    #[test]
    fn forbids_self_referral() {
        let merchant = MerchantId::generate();
        assert!(check_not_self_referral(&merchant, &merchant).is_err());
        assert!(check_not_self_referral(&merchant, &MerchantId::generate()).is_ok());
    }
}
