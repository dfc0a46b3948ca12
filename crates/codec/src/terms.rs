//! `tandem.v1.Terms` <-> `partnership::Terms`.

use tandem_domain::money::Currency;
use tandem_domain::partnership::{
    AttributionWindow, CommissionDuration, CommissionRule, SettlementCycle, Terms, Tier,
    TouchPolicy,
};
use tandem_domain::ValidationError;
use tandem_proto::v1 as pb;

/// Parses and validates terms; errors name the field under `terms.`.
pub fn terms_from_proto(terms: &pb::Terms) -> Result<Terms, ValidationError> {
    parse(terms).map_err(|error| error.within("terms"))
}

fn parse(terms: &pb::Terms) -> Result<Terms, ValidationError> {
    let rule = match &terms.rule {
        None => return Err(ValidationError::new("rule", "is required: one of percentage_bps, flat_per_first_purchase_minor, flat_per_purchase_minor or marginal_tiers")),
        Some(pb::terms::Rule::PercentageBps(rate_bps)) => CommissionRule::Percentage { rate_bps: *rate_bps },
        Some(pb::terms::Rule::FlatPerFirstPurchaseMinor(amount_minor)) => CommissionRule::FlatPerFirstPurchase { amount_minor: *amount_minor },
        Some(pb::terms::Rule::FlatPerPurchaseMinor(amount_minor)) => CommissionRule::FlatPerPurchase { amount_minor: *amount_minor },
        Some(pb::terms::Rule::MarginalTiers(tiers)) => CommissionRule::MarginalTiers {
            tiers: tiers.tiers.iter().map(|t| Tier { from_minor: t.from_minor, rate_bps: t.rate_bps }).collect(),
        },
    };
    let duration = match terms.duration {
        None => CommissionDuration::Unlimited,
        Some(pb::terms::Duration::FirstPurchases(n)) => CommissionDuration::FirstPurchases(n),
        Some(pb::terms::Duration::DaysAfterFirstPurchase(days)) => {
            CommissionDuration::DaysAfterFirstPurchase(days)
        }
    };
    let touch_policy = match pb::TouchPolicy::try_from(terms.touch_policy) {
        Ok(pb::TouchPolicy::Unspecified | pb::TouchPolicy::FirstReferrer) => {
            TouchPolicy::FirstReferrer
        }
        Ok(pb::TouchPolicy::LastReferrer) => TouchPolicy::LastReferrer,
        Err(_) => {
            return Err(ValidationError::new(
                "touch_policy",
                "is not a known touch policy",
            ))
        }
    };
    let settlement_cycle = settlement_cycle_from_proto("settlement_cycle", terms.settlement_cycle)?;
    Terms {
        currency: Currency::parse("currency", &terms.currency)?,
        attribution_window: AttributionWindow::from_days(
            "attribution_window_days",
            terms.attribution_window_days,
        )?,
        touch_policy,
        new_customer_look_back_days: terms.new_customer_look_back_days,
        rule,
        duration,
        cap_per_customer_minor: terms.cap_per_customer_minor,
        cap_per_period_minor: terms.cap_per_period_minor,
        min_purchase_minor: terms.min_purchase_minor,
        max_purchase_minor: terms.max_purchase_minor,
        holding_period_days: terms.holding_period_days,
        settlement_cycle,
        minimum_payout_minor: terms.minimum_payout_minor,
        auto_refer: terms.auto_refer,
        attributing_kinds: crate::identifiers::attributing_kinds_from_proto(
            "attributing_kinds",
            &terms.attributing_kinds,
        )?,
    }
    .validated()
}

pub fn terms_to_proto(terms: &Terms) -> pb::Terms {
    pb::Terms {
        currency: terms.currency.to_string(),
        attribution_window_days: terms.attribution_window.days(),
        touch_policy: match terms.touch_policy {
            TouchPolicy::FirstReferrer => pb::TouchPolicy::FirstReferrer,
            TouchPolicy::LastReferrer => pb::TouchPolicy::LastReferrer,
        } as i32,
        new_customer_look_back_days: terms.new_customer_look_back_days,
        rule: Some(match &terms.rule {
            CommissionRule::Percentage { rate_bps } => pb::terms::Rule::PercentageBps(*rate_bps),
            CommissionRule::FlatPerFirstPurchase { amount_minor } => {
                pb::terms::Rule::FlatPerFirstPurchaseMinor(*amount_minor)
            }
            CommissionRule::FlatPerPurchase { amount_minor } => {
                pb::terms::Rule::FlatPerPurchaseMinor(*amount_minor)
            }
            CommissionRule::MarginalTiers { tiers } => {
                pb::terms::Rule::MarginalTiers(pb::MarginalTiers {
                    tiers: tiers
                        .iter()
                        .map(|t| pb::Tier {
                            from_minor: t.from_minor,
                            rate_bps: t.rate_bps,
                        })
                        .collect(),
                })
            }
        }),
        duration: match terms.duration {
            CommissionDuration::Unlimited => None,
            CommissionDuration::FirstPurchases(n) => Some(pb::terms::Duration::FirstPurchases(n)),
            CommissionDuration::DaysAfterFirstPurchase(days) => {
                Some(pb::terms::Duration::DaysAfterFirstPurchase(days))
            }
        },
        cap_per_customer_minor: terms.cap_per_customer_minor,
        cap_per_period_minor: terms.cap_per_period_minor,
        min_purchase_minor: terms.min_purchase_minor,
        max_purchase_minor: terms.max_purchase_minor,
        holding_period_days: terms.holding_period_days,
        settlement_cycle: match terms.settlement_cycle {
            SettlementCycle::Daily => pb::SettlementCycle::Daily,
            SettlementCycle::Weekly => pb::SettlementCycle::Weekly,
            SettlementCycle::Monthly => pb::SettlementCycle::Monthly,
        } as i32,
        minimum_payout_minor: terms.minimum_payout_minor,
        auto_refer: terms.auto_refer,
        attributing_kinds: crate::identifiers::attributing_kinds_to_proto(&terms.attributing_kinds),
    }
}

/// A `SettlementCycle` enum value; UNSPECIFIED means monthly.
pub fn settlement_cycle_from_proto(
    field: &str,
    value: i32,
) -> Result<SettlementCycle, ValidationError> {
    match pb::SettlementCycle::try_from(value) {
        Ok(pb::SettlementCycle::Unspecified | pb::SettlementCycle::Monthly) => {
            Ok(SettlementCycle::Monthly)
        }
        Ok(pb::SettlementCycle::Daily) => Ok(SettlementCycle::Daily),
        Ok(pb::SettlementCycle::Weekly) => Ok(SettlementCycle::Weekly),
        Err(_) => Err(ValidationError::new(
            field,
            format!("{value} is not a settlement cycle; use DAILY, WEEKLY or MONTHLY"),
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn round_trips_and_names_bad_fields() {
        let mut terms = pb::Terms {
            currency: "EUR".into(),
            attribution_window_days: 30,
            rule: Some(pb::terms::Rule::MarginalTiers(pb::MarginalTiers {
                tiers: vec![
                    pb::Tier {
                        from_minor: 0,
                        rate_bps: 500,
                    },
                    pb::Tier {
                        from_minor: 10_000,
                        rate_bps: 800,
                    },
                ],
            })),
            duration: Some(pb::terms::Duration::FirstPurchases(3)),
            cap_per_customer_minor: Some(5_000),
            holding_period_days: 14,
            settlement_cycle: pb::SettlementCycle::Weekly as i32,
            touch_policy: pb::TouchPolicy::LastReferrer as i32,
            auto_refer: true,
            ..Default::default()
        };
        let parsed = terms_from_proto(&terms).unwrap();
        assert_eq!(terms_to_proto(&parsed), terms);
        terms.rule = Some(pb::terms::Rule::PercentageBps(0));
        assert_eq!(
            terms_from_proto(&terms).unwrap_err().field,
            "terms.percentage_bps"
        );
        terms.rule = None;
        assert_eq!(terms_from_proto(&terms).unwrap_err().field, "terms.rule");
    }
}
