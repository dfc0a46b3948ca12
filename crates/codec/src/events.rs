//! `tandem.v1.PartnershipEvent` <-> `commission::Event`. The round trip is exact, so a replay
//! from stored events reproduces the state that produced them.

use chrono::{DateTime, Utc};
use tandem_domain::commission::{Band, Calculation, Cap, Event, NotEarned};
use tandem_domain::ids::{MerchantId, PartnershipId, PurchaseId, ReferralId, RefundId};
use tandem_domain::ValidationError;
use tandem_proto::time::timestamp;
use tandem_proto::v1 as pb;
use tandem_proto::v1::partnership_event::Event as Pe;

use crate::{instant, money, money_to_proto, terms_from_proto, terms_to_proto};

pub fn event_to_proto(partnership_id: &PartnershipId, event: &Event) -> pb::PartnershipEvent {
    let partnership_id = partnership_id.to_string();
    let event = match event {
        Event::TermsProposed {
            version,
            referrer,
            acceptor,
            proposed_by,
            terms,
            effective_from,
        } => Pe::TermsProposed(pb::PartnershipTermsProposed {
            partnership_id,
            version: *version,
            referrer_merchant_id: referrer.to_string(),
            acceptor_merchant_id: acceptor.to_string(),
            proposed_by: proposed_by.to_string(),
            terms: Some(terms_to_proto(terms)),
            effective_from: Some(timestamp(*effective_from)),
        }),
        Event::TermsAccepted {
            version,
            accepted_by,
            effective_from,
        } => Pe::TermsAccepted(pb::PartnershipTermsAccepted {
            partnership_id,
            version: *version,
            accepted_by: accepted_by.to_string(),
            effective_from: Some(timestamp(*effective_from)),
        }),
        Event::Terminated { by, at } => Pe::Terminated(pb::PartnershipTerminated {
            partnership_id,
            terminated_by: by.to_string(),
            terminated_at: Some(timestamp(*at)),
        }),
        Event::CommissionAccrued {
            purchase_id,
            referral_id,
            terms_version,
            amount,
            commission,
            calculation,
            purchased_at,
            period_start,
            payable_at,
        } => Pe::CommissionAccrued(pb::CommissionAccrued {
            purchase_id: purchase_id.to_string(),
            referral_id: referral_id.to_string(),
            terms_version: *terms_version,
            amount: Some(money_to_proto(*amount)),
            commission: Some(money_to_proto(*commission)),
            calculation: Some(calculation_to_proto(calculation)),
            purchased_at: Some(timestamp(*purchased_at)),
            period_start: Some(timestamp(*period_start)),
            payable_at: Some(timestamp(*payable_at)),
        }),
        Event::CommissionNotEarned {
            purchase_id,
            referral_id,
            terms_version,
            amount,
            purchased_at,
            reason,
        } => {
            let (reason, reason_detail) = reason_to_proto(reason);
            Pe::CommissionNotEarned(pb::CommissionNotEarned {
                purchase_id: purchase_id.to_string(),
                referral_id: referral_id.to_string(),
                terms_version: terms_version.unwrap_or(0),
                amount: Some(money_to_proto(*amount)),
                purchased_at: Some(timestamp(*purchased_at)),
                reason: reason.to_owned(),
                reason_detail,
            })
        }
        Event::RefundApplied {
            refund_id,
            purchase_id,
            refund,
            reversal,
            refunded_at,
            within_holding_period,
        } => Pe::RefundApplied(pb::RefundApplied {
            refund_id: refund_id.to_string(),
            purchase_id: purchase_id.to_string(),
            refund: Some(money_to_proto(*refund)),
            reversal: Some(money_to_proto(*reversal)),
            refunded_at: Some(timestamp(*refunded_at)),
            within_holding_period: *within_holding_period,
        }),
        Event::RefundParked {
            refund_id,
            purchase_id,
            refund,
            refunded_at,
        } => Pe::RefundParked(pb::RefundParked {
            refund_id: refund_id.to_string(),
            purchase_id: purchase_id.to_string(),
            refund: Some(money_to_proto(*refund)),
            refunded_at: Some(timestamp(*refunded_at)),
        }),
    };
    pb::PartnershipEvent { event: Some(event) }
}

pub fn event_from_proto(event: &pb::PartnershipEvent) -> Result<Event, ValidationError> {
    Ok(
        match event
            .event
            .as_ref()
            .ok_or_else(|| ValidationError::new("event", "is missing"))?
        {
            Pe::TermsProposed(e) => Event::TermsProposed {
                version: e.version,
                referrer: MerchantId::parse("referrer_merchant_id", &e.referrer_merchant_id)?,
                acceptor: MerchantId::parse("acceptor_merchant_id", &e.acceptor_merchant_id)?,
                proposed_by: MerchantId::parse("proposed_by", &e.proposed_by)?,
                terms: terms_from_proto(
                    e.terms
                        .as_ref()
                        .ok_or_else(|| ValidationError::new("terms", "is missing"))?,
                )?,
                effective_from: instant("effective_from", e.effective_from.as_ref())?,
            },
            Pe::TermsAccepted(e) => Event::TermsAccepted {
                version: e.version,
                accepted_by: MerchantId::parse("accepted_by", &e.accepted_by)?,
                effective_from: instant("effective_from", e.effective_from.as_ref())?,
            },
            Pe::Terminated(e) => Event::Terminated {
                by: MerchantId::parse("terminated_by", &e.terminated_by)?,
                at: instant("terminated_at", e.terminated_at.as_ref())?,
            },
            Pe::CommissionAccrued(e) => Event::CommissionAccrued {
                purchase_id: PurchaseId::parse("purchase_id", &e.purchase_id)?,
                referral_id: ReferralId::parse("referral_id", &e.referral_id)?,
                terms_version: e.terms_version,
                amount: money("amount", e.amount.as_ref())?,
                commission: money("commission", e.commission.as_ref())?,
                calculation: calculation_from_proto(
                    e.calculation
                        .as_ref()
                        .ok_or_else(|| ValidationError::new("calculation", "is missing"))?,
                )?,
                purchased_at: instant("purchased_at", e.purchased_at.as_ref())?,
                period_start: instant("period_start", e.period_start.as_ref())?,
                payable_at: instant("payable_at", e.payable_at.as_ref())?,
            },
            Pe::CommissionNotEarned(e) => Event::CommissionNotEarned {
                purchase_id: PurchaseId::parse("purchase_id", &e.purchase_id)?,
                referral_id: ReferralId::parse("referral_id", &e.referral_id)?,
                terms_version: (e.terms_version > 0).then_some(e.terms_version),
                amount: money("amount", e.amount.as_ref())?,
                purchased_at: instant("purchased_at", e.purchased_at.as_ref())?,
                reason: reason_from_proto(&e.reason, &e.reason_detail)?,
            },
            Pe::RefundApplied(e) => Event::RefundApplied {
                refund_id: RefundId::parse("refund_id", &e.refund_id)?,
                purchase_id: PurchaseId::parse("purchase_id", &e.purchase_id)?,
                refund: money("refund", e.refund.as_ref())?,
                reversal: money("reversal", e.reversal.as_ref())?,
                refunded_at: instant("refunded_at", e.refunded_at.as_ref())?,
                within_holding_period: e.within_holding_period,
            },
            Pe::RefundParked(e) => Event::RefundParked {
                refund_id: RefundId::parse("refund_id", &e.refund_id)?,
                purchase_id: PurchaseId::parse("purchase_id", &e.purchase_id)?,
                refund: money("refund", e.refund.as_ref())?,
                refunded_at: instant("refunded_at", e.refunded_at.as_ref())?,
            },
        },
    )
}

pub fn calculation_to_proto(calculation: &Calculation) -> pb::Calculation {
    pb::Calculation {
        rule: calculation.rule.to_owned(),
        gross_minor: calculation.gross_minor,
        bands: calculation
            .bands
            .iter()
            .map(|b| pb::Band {
                from_minor: b.from_minor,
                portion_minor: b.portion_minor,
                rate_bps: b.rate_bps,
            })
            .collect(),
        capped_by: calculation.capped_by.map(|cap| match cap {
            Cap::PerCustomer {
                cap_minor,
                earned_before_minor,
            } => pb::calculation::CappedBy::PerCustomerCap(pb::CapApplied {
                cap_minor,
                earned_before_minor,
            }),
            Cap::PerPeriod {
                cap_minor,
                earned_before_minor,
            } => pb::calculation::CappedBy::PerPeriodCap(pb::CapApplied {
                cap_minor,
                earned_before_minor,
            }),
        }),
    }
}

pub fn calculation_from_proto(
    calculation: &pb::Calculation,
) -> Result<Calculation, ValidationError> {
    let rule = [
        "percentage",
        "flat_per_first_purchase",
        "flat_per_purchase",
        "marginal_tiers",
    ]
    .into_iter()
    .find(|name| *name == calculation.rule)
    .ok_or_else(|| ValidationError::new("calculation.rule", "is not a known rule"))?;
    Ok(Calculation {
        rule,
        gross_minor: calculation.gross_minor,
        bands: calculation
            .bands
            .iter()
            .map(|b| Band {
                from_minor: b.from_minor,
                portion_minor: b.portion_minor,
                rate_bps: b.rate_bps,
            })
            .collect(),
        capped_by: calculation.capped_by.as_ref().map(|cap| match cap {
            pb::calculation::CappedBy::PerCustomerCap(c) => Cap::PerCustomer {
                cap_minor: c.cap_minor,
                earned_before_minor: c.earned_before_minor,
            },
            pb::calculation::CappedBy::PerPeriodCap(c) => Cap::PerPeriod {
                cap_minor: c.cap_minor,
                earned_before_minor: c.earned_before_minor,
            },
        }),
    })
}

/// `(reason, detail)`: the detail is what the reason refers to, written so it parses back.
pub fn reason_to_proto(reason: &NotEarned) -> (&'static str, String) {
    match reason {
        NotEarned::NoTermsInForce => ("no_terms_in_force", String::new()),
        NotEarned::Terminated => ("terminated", String::new()),
        NotEarned::CurrencyMismatch { terms_currency } => {
            ("currency_mismatch", terms_currency.clone())
        }
        NotEarned::ReturningCustomer {
            previous_purchase_at,
        } => (
            "returning_customer",
            previous_purchase_at.timestamp_micros().to_string(),
        ),
        NotEarned::BelowMinimum { min_purchase_minor } => {
            ("below_minimum", min_purchase_minor.to_string())
        }
        NotEarned::AboveMaximum { max_purchase_minor } => {
            ("above_maximum", max_purchase_minor.to_string())
        }
        NotEarned::NotFirstPurchase => ("not_first_purchase", String::new()),
        NotEarned::DurationOver => ("duration_over", String::new()),
    }
}

fn reason_from_proto(reason: &str, detail: &str) -> Result<NotEarned, ValidationError> {
    let number = || {
        detail
            .parse::<i64>()
            .map_err(|_| ValidationError::new("reason_detail", "is not a number"))
    };
    Ok(match reason {
        "no_terms_in_force" => NotEarned::NoTermsInForce,
        "terminated" => NotEarned::Terminated,
        "currency_mismatch" => NotEarned::CurrencyMismatch {
            terms_currency: detail.to_owned(),
        },
        "returning_customer" => NotEarned::ReturningCustomer {
            previous_purchase_at: DateTime::<Utc>::from_timestamp_micros(number()?)
                .ok_or_else(|| ValidationError::new("reason_detail", "is out of range"))?,
        },
        "below_minimum" => NotEarned::BelowMinimum {
            min_purchase_minor: number()?,
        },
        "above_maximum" => NotEarned::AboveMaximum {
            max_purchase_minor: number()?,
        },
        "not_first_purchase" => NotEarned::NotFirstPurchase,
        "duration_over" => NotEarned::DurationOver,
        other => {
            return Err(ValidationError::new(
                "reason",
                format!("{other:?} is not a known reason"),
            ))
        }
    })
}

/// The admin-topic payload for a terms event (proposed, accepted, terminated); `None` for the
/// ledger's own commission events, which are not published there.
pub fn admin_payload(
    partnership_id: &PartnershipId,
    event: &Event,
) -> Option<pb::event_envelope::Payload> {
    use pb::event_envelope::Payload;
    match event_to_proto(partnership_id, event).event? {
        Pe::TermsProposed(e) => Some(Payload::PartnershipTermsProposed(e)),
        Pe::TermsAccepted(e) => Some(Payload::PartnershipTermsAccepted(e)),
        Pe::Terminated(e) => Some(Payload::PartnershipTerminated(e)),
        _ => None,
    }
}

/// The partnership and terms event an admin-topic payload carries, if it is one.
pub fn partnership_event_from_payload(
    payload: &pb::event_envelope::Payload,
) -> Option<Result<(PartnershipId, Event), ValidationError>> {
    use pb::event_envelope::Payload;
    let (partnership_id, event) = match payload {
        Payload::PartnershipTermsProposed(e) => (&e.partnership_id, Pe::TermsProposed(e.clone())),
        Payload::PartnershipTermsAccepted(e) => (&e.partnership_id, Pe::TermsAccepted(e.clone())),
        Payload::PartnershipTerminated(e) => (&e.partnership_id, Pe::Terminated(e.clone())),
        _ => return None,
    };
    Some(
        PartnershipId::parse("partnership_id", partnership_id).and_then(|id| {
            event_from_proto(&pb::PartnershipEvent { event: Some(event) }).map(|event| (id, event))
        }),
    )
}
