//! The partnership aggregate: a partnership's versioned terms and its commission book.
//!
//! It is a pure pair: [`decide`] turns a command into events (or refuses it), [`Partnership::apply`]
//! folds an event into the state. Nothing here reads a clock or a database; the caller passes
//! every instant. Replaying the same events always gives the same state, and a command that was
//! already applied (same purchase id, same refund id) decides no new events, so redelivery is
//! harmless.
//!
//! Rules (see also `partnership`):
//! - Both parties must agree: one proposes a terms version, the other accepts it. A version takes
//!   effect at the later of its proposed effective time and its acceptance, never earlier.
//! - A purchase uses the latest accepted version in effect at the purchase instant.
//! - After termination, purchases earn nothing; commissions accrued before are kept.
//! - The period's attributed spend (for tiers) counts purchases that accrued a commission, net
//!   of their refunds.
//! - A refund reverses `round_half_even(commission × refunded / amount)` cumulatively, so that a
//!   full refund reverses exactly the commission. Refunds never exceed the purchase. A refund for
//!   a purchase not attributed yet is parked and applied when the purchase arrives.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};

use crate::ids::{MerchantId, PurchaseId, ReferralId, RefundId};
use crate::ledger::{commission_accrual, commission_reversal, Entry, UnbalancedEntry};
use crate::money::{divide_half_even, Money, BPS_PER_WHOLE};
use crate::partnership::{check_not_self_referral, CommissionDuration, CommissionRule, Terms};

/// What can be asked of a partnership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Proposes a terms version; on a new partnership this also creates it.
    Propose {
        referrer: MerchantId,
        acceptor: MerchantId,
        proposed_by: MerchantId,
        terms: Terms,
        effective_from: DateTime<Utc>,
        now: DateTime<Utc>,
    },
    /// An operator records an agreement both parties already made outside Tandem, possibly in
    /// force since before today (a partnership migrated from another system). Only for a new
    /// partnership.
    Import {
        referrer: MerchantId,
        acceptor: MerchantId,
        terms: Terms,
        effective_from: DateTime<Utc>,
    },
    /// The other party accepts a proposed version.
    Accept {
        version: u32,
        accepted_by: MerchantId,
        now: DateTime<Utc>,
    },
    /// Either party ends the partnership from `at` on.
    Terminate { by: MerchantId, at: DateTime<Utc> },
    /// A purchase at the acceptor was attributed to a referral under this partnership.
    AttributePurchase(Attribution),
    /// A purchase was refunded or voided, in part or in full.
    RecordRefund {
        refund_id: RefundId,
        purchase_id: PurchaseId,
        refund: Money,
        refunded_at: DateTime<Utc>,
    },
}

/// The facts of an attributed purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribution {
    pub purchase_id: PurchaseId,
    pub referral_id: ReferralId,
    pub amount: Money,
    pub purchased_at: DateTime<Utc>,
    pub referred_at: DateTime<Utc>,
    /// The customer's latest purchase at the acceptor before the referral, if any (for the
    /// new-customers-only rule).
    pub previous_purchase_at: Option<DateTime<Utc>>,
}

/// What happened to a partnership. Past tense; stored in the event table in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    TermsProposed {
        version: u32,
        referrer: MerchantId,
        acceptor: MerchantId,
        proposed_by: MerchantId,
        terms: Terms,
        effective_from: DateTime<Utc>,
    },
    TermsAccepted {
        version: u32,
        accepted_by: MerchantId,
        effective_from: DateTime<Utc>,
    },
    Terminated {
        by: MerchantId,
        at: DateTime<Utc>,
    },
    CommissionAccrued {
        purchase_id: PurchaseId,
        referral_id: ReferralId,
        terms_version: u32,
        amount: Money,
        commission: Money,
        calculation: Calculation,
        purchased_at: DateTime<Utc>,
        period_start: DateTime<Utc>,
        payable_at: DateTime<Utc>,
    },
    CommissionNotEarned {
        purchase_id: PurchaseId,
        referral_id: ReferralId,
        terms_version: Option<u32>,
        amount: Money,
        purchased_at: DateTime<Utc>,
        reason: NotEarned,
    },
    RefundApplied {
        refund_id: RefundId,
        purchase_id: PurchaseId,
        refund: Money,
        /// Commission clawed back by this refund (zero if the purchase earned none).
        reversal: Money,
        refunded_at: DateTime<Utc>,
        /// True if the refund came inside the holding period, before the commission was payable.
        within_holding_period: bool,
    },
    RefundParked {
        refund_id: RefundId,
        purchase_id: PurchaseId,
        refund: Money,
        refunded_at: DateTime<Utc>,
    },
}

/// Why an attributed purchase earned no commission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotEarned {
    NoTermsInForce,
    Terminated,
    CurrencyMismatch { terms_currency: String },
    ReturningCustomer { previous_purchase_at: DateTime<Utc> },
    BelowMinimum { min_purchase_minor: i64 },
    AboveMaximum { max_purchase_minor: i64 },
    NotFirstPurchase,
    DurationOver,
}

/// How a commission was computed: enough to answer "why this amount?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Calculation {
    pub rule: &'static str,
    /// The rule's result before caps.
    pub gross_minor: i64,
    /// For marginal tiers: the bands the purchase fell into.
    pub bands: Vec<Band>,
    pub capped_by: Option<Cap>,
}

/// The part of a purchase that fell into one tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Band {
    pub from_minor: i64,
    pub portion_minor: i64,
    pub rate_bps: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    PerCustomer {
        cap_minor: i64,
        earned_before_minor: i64,
    },
    PerPeriod {
        cap_minor: i64,
        earned_before_minor: i64,
    },
}

/// Commands a partnership refuses, each saying what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartnershipError {
    #[error("the partnership does not exist yet: propose terms first")]
    NotCreated,
    #[error("{0} is not a party to this partnership")]
    NotAParty(MerchantId),
    #[error("the referrer and acceptor of a partnership cannot change")]
    PartiesChanged,
    #[error("invalid terms: {0}")]
    InvalidTerms(#[from] crate::ValidationError),
    #[error("effective_from {effective_from} is in the past; terms never apply retroactively")]
    Retroactive { effective_from: DateTime<Utc> },
    #[error("terms version {0} does not exist")]
    UnknownVersion(u32),
    #[error("terms version {0} was already accepted")]
    AlreadyAccepted(u32),
    #[error("terms version {0} was superseded by a later proposal")]
    Superseded(u32),
    #[error("a proposal must be accepted by the other party")]
    OwnProposal,
    #[error("the partnership was terminated at {0}")]
    Terminated(DateTime<Utc>),
    #[error("refund {refund_minor} in {currency} would bring refunds of purchase {purchase_id} to more than its amount {amount_minor}")]
    RefundExceedsPurchase {
        purchase_id: PurchaseId,
        amount_minor: i64,
        refund_minor: i64,
        currency: String,
    },
    #[error("refund currency {refund} differs from the purchase currency {purchase}")]
    RefundCurrency { refund: String, purchase: String },
    #[error("refund amount must be positive")]
    NonPositiveRefund,
}

/// One proposed version of the terms and whether it was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TermsVersion {
    pub version: u32,
    pub proposed_by: MerchantId,
    pub terms: Terms,
    /// The proposed effective time, or once accepted, the time it is in force from.
    pub effective_from: DateTime<Utc>,
    pub accepted_by: Option<MerchantId>,
}

/// What the book knows of one referred customer (one referral): enough for durations and the
/// per-customer cap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CustomerTally {
    pub purchases: u32,
    pub first_purchase_at: Option<DateTime<Utc>>,
    pub commission_minor: i64,
}

/// What the book knows of one settlement period: enough for tiers and the per-period cap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeriodTally {
    pub spend_minor: i64,
    pub commission_minor: i64,
}

/// What the book remembers of one attributed purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurchaseRecord {
    pub referral_id: ReferralId,
    pub amount: Money,
    pub commission_minor: i64,
    pub refunded_minor: i64,
    pub reversed_minor: i64,
    /// `None` if the purchase earned nothing.
    pub period_start: Option<DateTime<Utc>>,
    pub payable_at: DateTime<Utc>,
}

/// A refund that arrived before its purchase was attributed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedRefund {
    pub refund_id: RefundId,
    pub refund: Money,
    pub refunded_at: DateTime<Utc>,
}

/// The keyed part of a partnership's state: each entry is needed only by commands that name its
/// key, so a store keeps them in tables and loads, for a batch of commands, just the entries
/// [`record_keys`] and [`Partnership::tally_keys`] name. The rest of the state (parties, terms
/// versions, termination) is small and kept whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    pub customers: BTreeMap<ReferralId, CustomerTally>,
    pub periods: BTreeMap<DateTime<Utc>, PeriodTally>,
    pub purchases: BTreeMap<PurchaseId, PurchaseRecord>,
    pub refunds: BTreeSet<RefundId>,
    pub parked: BTreeMap<PurchaseId, Vec<ParkedRefund>>,
}

/// The state of one partnership, folded from its events: the core (parties, terms versions,
/// termination) and the [`Facts`] that were loaded, which may be all of them (a full replay) or
/// only those a batch of commands needs (the ledger's engine).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Partnership {
    parties: Option<(MerchantId, MerchantId)>,
    versions: Vec<TermsVersion>,
    terminated_at: Option<DateTime<Utc>>,
    facts: Facts,
}

/// Purchase ids and refund ids a batch of commands or events reads: load these records first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordKeys {
    pub purchases: BTreeSet<PurchaseId>,
    pub refunds: BTreeSet<RefundId>,
}

/// Customers (referrals) and periods a batch reads: load these tallies once the records are in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TallyKeys {
    pub customers: BTreeSet<ReferralId>,
    pub periods: BTreeSet<DateTime<Utc>>,
}

/// The records `commands` read, whatever the state.
pub fn record_keys<'a>(commands: impl IntoIterator<Item = &'a Command>) -> RecordKeys {
    let mut keys = RecordKeys::default();
    for command in commands {
        match command {
            Command::AttributePurchase(attribution) => {
                keys.purchases.insert(attribution.purchase_id.clone());
            }
            Command::RecordRefund {
                refund_id,
                purchase_id,
                ..
            } => {
                keys.purchases.insert(purchase_id.clone());
                keys.refunds.insert(refund_id.clone());
            }
            _ => {}
        }
    }
    keys
}

/// The records `events` touch when folded.
pub fn record_keys_of_events<'a>(events: impl IntoIterator<Item = &'a Event>) -> RecordKeys {
    let mut keys = RecordKeys::default();
    for event in events {
        match event {
            Event::CommissionAccrued { purchase_id, .. }
            | Event::CommissionNotEarned { purchase_id, .. } => {
                keys.purchases.insert(purchase_id.clone());
            }
            Event::RefundApplied {
                refund_id,
                purchase_id,
                ..
            }
            | Event::RefundParked {
                refund_id,
                purchase_id,
                ..
            } => {
                keys.purchases.insert(purchase_id.clone());
                keys.refunds.insert(refund_id.clone());
            }
            _ => {}
        }
    }
    keys
}

impl Partnership {
    /// The state after `events`, from nothing.
    pub fn replay<'a>(events: impl IntoIterator<Item = &'a Event>) -> Self {
        events.into_iter().fold(Self::default(), Self::apply)
    }

    /// `(referrer, acceptor)`, once the partnership exists.
    pub fn parties(&self) -> Option<(&MerchantId, &MerchantId)> {
        self.parties.as_ref().map(|(r, a)| (r, a))
    }

    pub fn versions(&self) -> &[TermsVersion] {
        &self.versions
    }

    pub fn terminated_at(&self) -> Option<DateTime<Utc>> {
        self.terminated_at
    }

    pub fn purchase(&self, purchase_id: &PurchaseId) -> Option<&PurchaseRecord> {
        self.facts.purchases.get(purchase_id)
    }

    /// The loaded keyed state.
    pub fn facts(&self) -> &Facts {
        &self.facts
    }

    /// The keyed state, taking it out.
    pub fn into_facts(self) -> Facts {
        self.facts
    }

    /// The same partnership with only its core: parties, terms versions, termination.
    #[must_use]
    pub fn core(&self) -> Self {
        Self {
            parties: self.parties.clone(),
            versions: self.versions.clone(),
            terminated_at: self.terminated_at,
            facts: Facts::default(),
        }
    }

    /// This core with `facts` loaded.
    #[must_use]
    pub fn with_facts(mut self, facts: Facts) -> Self {
        self.facts = facts;
        self
    }

    /// True if `event` changes the core (and nothing else).
    pub fn changes_core(event: &Event) -> bool {
        matches!(
            event,
            Event::TermsProposed { .. } | Event::TermsAccepted { .. } | Event::Terminated { .. }
        )
    }

    /// The tallies `commands` read, given the records they read (`records`, as loaded). Computed
    /// from the core: a purchase's period comes from the terms in force at its instant.
    pub fn tally_keys<'a>(
        &self,
        commands: impl IntoIterator<Item = &'a Command>,
        records: &BTreeMap<PurchaseId, PurchaseRecord>,
    ) -> TallyKeys {
        let mut keys = TallyKeys::default();
        for command in commands {
            match command {
                Command::AttributePurchase(attribution) => {
                    keys.customers.insert(attribution.referral_id.clone());
                    if let Some((_, terms)) = self.terms_at(attribution.purchased_at) {
                        keys.periods.insert(
                            terms
                                .settlement_cycle
                                .period_start(attribution.purchased_at),
                        );
                    }
                }
                Command::RecordRefund { purchase_id, .. } => {
                    if let Some(record) = records.get(purchase_id) {
                        keys.customers.insert(record.referral_id.clone());
                        keys.periods.extend(record.period_start);
                    }
                }
                _ => {}
            }
        }
        keys
    }

    /// The tallies `events` touch when folded, given the records they touch (as loaded).
    pub fn tally_keys_of_events<'a>(
        events: impl IntoIterator<Item = &'a Event>,
        records: &BTreeMap<PurchaseId, PurchaseRecord>,
    ) -> TallyKeys {
        let mut keys = TallyKeys::default();
        for event in events {
            match event {
                Event::CommissionAccrued {
                    referral_id,
                    period_start,
                    ..
                } => {
                    keys.customers.insert(referral_id.clone());
                    keys.periods.insert(*period_start);
                }
                Event::CommissionNotEarned { referral_id, .. } => {
                    keys.customers.insert(referral_id.clone());
                }
                Event::RefundApplied { purchase_id, .. } => {
                    if let Some(record) = records.get(purchase_id) {
                        keys.customers.insert(record.referral_id.clone());
                        keys.periods.extend(record.period_start);
                    }
                }
                _ => {}
            }
        }
        keys
    }

    /// The accepted version in effect at `instant`, if any.
    pub fn terms_at(&self, instant: DateTime<Utc>) -> Option<(u32, &Terms)> {
        self.versions
            .iter()
            .filter(|v| v.accepted_by.is_some() && v.effective_from <= instant)
            .max_by_key(|v| v.version)
            .map(|v| (v.version, &v.terms))
    }

    /// Folds one event into the state.
    #[must_use]
    pub fn apply(mut self, event: &Event) -> Self {
        match event {
            Event::TermsProposed {
                version,
                referrer,
                acceptor,
                proposed_by,
                terms,
                effective_from,
            } => {
                self.parties
                    .get_or_insert_with(|| (referrer.clone(), acceptor.clone()));
                self.versions.push(TermsVersion {
                    version: *version,
                    proposed_by: proposed_by.clone(),
                    terms: terms.clone(),
                    effective_from: *effective_from,
                    accepted_by: None,
                });
            }
            Event::TermsAccepted {
                version,
                accepted_by,
                effective_from,
            } => {
                if let Some(v) = self.versions.iter_mut().find(|v| v.version == *version) {
                    v.accepted_by = Some(accepted_by.clone());
                    v.effective_from = *effective_from;
                }
            }
            Event::Terminated { at, .. } => self.terminated_at = Some(*at),
            Event::CommissionAccrued {
                purchase_id,
                referral_id,
                amount,
                commission,
                purchased_at,
                period_start,
                payable_at,
                ..
            } => {
                let customer = self.facts.customers.entry(referral_id.clone()).or_default();
                customer.purchases = customer.purchases.saturating_add(1);
                customer.first_purchase_at.get_or_insert(*purchased_at);
                customer.commission_minor = customer
                    .commission_minor
                    .saturating_add(commission.amount_minor);
                let period = self.facts.periods.entry(*period_start).or_default();
                period.spend_minor = period.spend_minor.saturating_add(amount.amount_minor);
                period.commission_minor = period
                    .commission_minor
                    .saturating_add(commission.amount_minor);
                self.facts.purchases.insert(
                    purchase_id.clone(),
                    PurchaseRecord {
                        referral_id: referral_id.clone(),
                        amount: *amount,
                        commission_minor: commission.amount_minor,
                        refunded_minor: 0,
                        reversed_minor: 0,
                        period_start: Some(*period_start),
                        payable_at: *payable_at,
                    },
                );
            }
            Event::CommissionNotEarned {
                purchase_id,
                referral_id,
                amount,
                purchased_at,
                ..
            } => {
                let customer = self.facts.customers.entry(referral_id.clone()).or_default();
                customer.purchases = customer.purchases.saturating_add(1);
                customer.first_purchase_at.get_or_insert(*purchased_at);
                self.facts.purchases.insert(
                    purchase_id.clone(),
                    PurchaseRecord {
                        referral_id: referral_id.clone(),
                        amount: *amount,
                        commission_minor: 0,
                        refunded_minor: 0,
                        reversed_minor: 0,
                        period_start: None,
                        payable_at: *purchased_at,
                    },
                );
            }
            Event::RefundApplied {
                refund_id,
                purchase_id,
                refund,
                reversal,
                ..
            } => {
                self.facts.refunds.insert(refund_id.clone());
                if let Some(parked) = self.facts.parked.get_mut(purchase_id) {
                    parked.retain(|p| p.refund_id != *refund_id);
                    if parked.is_empty() {
                        self.facts.parked.remove(purchase_id);
                    }
                }
                if let Some(record) = self.facts.purchases.get_mut(purchase_id) {
                    record.refunded_minor =
                        record.refunded_minor.saturating_add(refund.amount_minor);
                    record.reversed_minor =
                        record.reversed_minor.saturating_add(reversal.amount_minor);
                    {
                        let customer = self
                            .facts
                            .customers
                            .entry(record.referral_id.clone())
                            .or_default();
                        customer.commission_minor = customer
                            .commission_minor
                            .saturating_sub(reversal.amount_minor);
                    }
                    if let Some(period) = record
                        .period_start
                        .map(|start| self.facts.periods.entry(start).or_default())
                    {
                        period.spend_minor = period.spend_minor.saturating_sub(refund.amount_minor);
                        period.commission_minor = period
                            .commission_minor
                            .saturating_sub(reversal.amount_minor);
                    }
                }
            }
            Event::RefundParked {
                refund_id,
                purchase_id,
                refund,
                refunded_at,
            } => {
                self.facts.refunds.insert(refund_id.clone());
                self.facts
                    .parked
                    .entry(purchase_id.clone())
                    .or_default()
                    .push(ParkedRefund {
                        refund_id: refund_id.clone(),
                        refund: *refund,
                        refunded_at: *refunded_at,
                    });
            }
        }
        self
    }

    /// The balanced ledger entry an event posts, if it moves money.
    pub fn ledger_entry(&self, event: &Event) -> Result<Option<Entry>, UnbalancedEntry> {
        let Some((referrer, acceptor)) = self.parties() else {
            return Ok(None);
        };
        match event {
            Event::CommissionAccrued { commission, .. } if commission.amount_minor > 0 => {
                commission_accrual(referrer, acceptor, *commission).map(Some)
            }
            Event::RefundApplied { reversal, .. } if reversal.amount_minor > 0 => {
                commission_reversal(referrer, acceptor, *reversal).map(Some)
            }
            _ => Ok(None),
        }
    }
}

/// Decides what a command does to a partnership in state `state`.
pub fn decide(state: &Partnership, command: Command) -> Result<Vec<Event>, PartnershipError> {
    match command {
        Command::Propose {
            referrer,
            acceptor,
            proposed_by,
            terms,
            effective_from,
            now,
        } => {
            check_not_self_referral(&referrer, &acceptor)?;
            if let Some((known_referrer, known_acceptor)) = state.parties() {
                if *known_referrer != referrer || *known_acceptor != acceptor {
                    return Err(PartnershipError::PartiesChanged);
                }
            }
            if proposed_by != referrer && proposed_by != acceptor {
                return Err(PartnershipError::NotAParty(proposed_by));
            }
            if let Some(at) = state.terminated_at {
                return Err(PartnershipError::Terminated(at));
            }
            if effective_from < now {
                return Err(PartnershipError::Retroactive { effective_from });
            }
            let terms = terms.validated()?;
            let version = state.versions.last().map_or(1, |v| v.version + 1);
            Ok(vec![Event::TermsProposed {
                version,
                referrer,
                acceptor,
                proposed_by,
                terms,
                effective_from,
            }])
        }
        Command::Import {
            referrer,
            acceptor,
            terms,
            effective_from,
        } => {
            check_not_self_referral(&referrer, &acceptor)?;
            if state.parties().is_some() {
                return Err(PartnershipError::PartiesChanged);
            }
            let terms = terms.validated()?;
            Ok(vec![
                Event::TermsProposed {
                    version: 1,
                    referrer: referrer.clone(),
                    acceptor: acceptor.clone(),
                    proposed_by: referrer,
                    terms,
                    effective_from,
                },
                Event::TermsAccepted {
                    version: 1,
                    accepted_by: acceptor,
                    effective_from,
                },
            ])
        }
        Command::Accept {
            version,
            accepted_by,
            now,
        } => {
            let (referrer, acceptor) = state.parties().ok_or(PartnershipError::NotCreated)?;
            if accepted_by != *referrer && accepted_by != *acceptor {
                return Err(PartnershipError::NotAParty(accepted_by));
            }
            if let Some(at) = state.terminated_at {
                return Err(PartnershipError::Terminated(at));
            }
            let proposal = state
                .versions
                .iter()
                .find(|v| v.version == version)
                .ok_or(PartnershipError::UnknownVersion(version))?;
            match &proposal.accepted_by {
                // The same acceptance delivered again changes nothing.
                Some(previous) if *previous == accepted_by => return Ok(Vec::new()),
                Some(_) => return Err(PartnershipError::AlreadyAccepted(version)),
                None => {}
            }
            if state
                .versions
                .last()
                .is_some_and(|latest| latest.version != version)
            {
                return Err(PartnershipError::Superseded(version));
            }
            if proposal.proposed_by == accepted_by {
                return Err(PartnershipError::OwnProposal);
            }
            Ok(vec![Event::TermsAccepted {
                version,
                accepted_by,
                effective_from: proposal.effective_from.max(now),
            }])
        }
        Command::Terminate { by, at } => {
            let (referrer, acceptor) = state.parties().ok_or(PartnershipError::NotCreated)?;
            if by != *referrer && by != *acceptor {
                return Err(PartnershipError::NotAParty(by));
            }
            match state.terminated_at {
                // The same termination delivered again changes nothing.
                Some(previous) if previous == at => Ok(Vec::new()),
                Some(previous) => Err(PartnershipError::Terminated(previous)),
                None => Ok(vec![Event::Terminated { by, at }]),
            }
        }
        Command::AttributePurchase(attribution) => decide_attribution(state, attribution),
        Command::RecordRefund {
            refund_id,
            purchase_id,
            refund,
            refunded_at,
        } => {
            if state.facts.refunds.contains(&refund_id) {
                return Ok(Vec::new());
            }
            if refund.amount_minor <= 0 {
                return Err(PartnershipError::NonPositiveRefund);
            }
            match state.facts.purchases.get(&purchase_id) {
                None => Ok(vec![Event::RefundParked {
                    refund_id,
                    purchase_id,
                    refund,
                    refunded_at,
                }]),
                Some(record) => Ok(vec![refund_event(
                    &purchase_id,
                    record,
                    refund_id,
                    refund,
                    refunded_at,
                )?]),
            }
        }
    }
}

fn decide_attribution(
    state: &Partnership,
    attribution: Attribution,
) -> Result<Vec<Event>, PartnershipError> {
    state.parties().ok_or(PartnershipError::NotCreated)?;
    if state.facts.purchases.contains_key(&attribution.purchase_id) {
        return Ok(Vec::new());
    }
    let Attribution {
        purchase_id,
        referral_id,
        amount,
        purchased_at,
        referred_at,
        previous_purchase_at,
    } = attribution;
    let not_earned = |terms_version: Option<u32>, reason: NotEarned| Event::CommissionNotEarned {
        purchase_id: purchase_id.clone(),
        referral_id: referral_id.clone(),
        terms_version,
        amount,
        purchased_at,
        reason,
    };
    let mut events = Vec::new();
    let outcome = match (state.terminated_at, state.terms_at(purchased_at)) {
        (Some(at), _) if at <= purchased_at => not_earned(None, NotEarned::Terminated),
        (_, None) => not_earned(None, NotEarned::NoTermsInForce),
        (_, Some((version, terms))) => {
            match eligibility(
                state,
                terms,
                &referral_id,
                amount,
                purchased_at,
                referred_at,
                previous_purchase_at,
            ) {
                Err(reason) => not_earned(Some(version), reason),
                Ok(()) => {
                    let period_start = terms.settlement_cycle.period_start(purchased_at);
                    let calculation = calculate(state, terms, &referral_id, amount, period_start);
                    let commission_minor =
                        calculation
                            .capped_by
                            .map_or(calculation.gross_minor, |cap| match cap {
                                Cap::PerCustomer {
                                    cap_minor,
                                    earned_before_minor,
                                }
                                | Cap::PerPeriod {
                                    cap_minor,
                                    earned_before_minor,
                                } => cap_minor
                                    .saturating_sub(earned_before_minor)
                                    .clamp(0, calculation.gross_minor),
                            });
                    Event::CommissionAccrued {
                        purchase_id: purchase_id.clone(),
                        referral_id: referral_id.clone(),
                        terms_version: version,
                        amount,
                        commission: Money::new(commission_minor, terms.currency),
                        calculation,
                        purchased_at,
                        period_start,
                        payable_at: purchased_at
                            + Duration::days(i64::from(terms.holding_period_days)),
                    }
                }
            }
        }
    };
    // Refunds that arrived before the purchase are applied right after it.
    let mut after = state.clone().apply(&outcome);
    events.push(outcome);
    if let Some(parked) = state.facts.parked.get(&purchase_id) {
        for ParkedRefund {
            refund_id,
            refund,
            refunded_at,
        } in parked
        {
            let Some(record) = after.facts.purchases.get(&purchase_id) else {
                break;
            };
            // A purchase cannot be refused, so a waiting refund larger than what is left is cut
            // down to it: refunds never exceed the purchase.
            let remaining = record
                .amount
                .amount_minor
                .saturating_sub(record.refunded_minor);
            let capped = Money::new(refund.amount_minor.min(remaining).max(0), refund.currency);
            let event = refund_event(
                &purchase_id,
                record,
                refund_id.clone(),
                capped,
                *refunded_at,
            )?;
            after = after.apply(&event);
            events.push(event);
        }
    }
    Ok(events)
}

fn eligibility(
    state: &Partnership,
    terms: &Terms,
    referral_id: &ReferralId,
    amount: Money,
    purchased_at: DateTime<Utc>,
    referred_at: DateTime<Utc>,
    previous_purchase_at: Option<DateTime<Utc>>,
) -> Result<(), NotEarned> {
    if amount.currency != terms.currency {
        return Err(NotEarned::CurrencyMismatch {
            terms_currency: terms.currency.to_string(),
        });
    }
    if let (Some(days), Some(previous)) = (terms.new_customer_look_back_days, previous_purchase_at)
    {
        if previous < referred_at && previous >= referred_at - Duration::days(i64::from(days)) {
            return Err(NotEarned::ReturningCustomer {
                previous_purchase_at: previous,
            });
        }
    }
    if let Some(min) = terms
        .min_purchase_minor
        .filter(|min| amount.amount_minor < *min)
    {
        return Err(NotEarned::BelowMinimum {
            min_purchase_minor: min,
        });
    }
    if let Some(max) = terms
        .max_purchase_minor
        .filter(|max| amount.amount_minor > *max)
    {
        return Err(NotEarned::AboveMaximum {
            max_purchase_minor: max,
        });
    }
    let customer = state
        .facts
        .customers
        .get(referral_id)
        .cloned()
        .unwrap_or_default();
    match terms.duration {
        CommissionDuration::FirstPurchases(n) if customer.purchases >= n => {
            return Err(NotEarned::DurationOver)
        }
        CommissionDuration::DaysAfterFirstPurchase(days)
            if customer
                .first_purchase_at
                .is_some_and(|first| purchased_at >= first + Duration::days(i64::from(days))) =>
        {
            return Err(NotEarned::DurationOver)
        }
        _ => {}
    }
    if matches!(terms.rule, CommissionRule::FlatPerFirstPurchase { .. }) && customer.purchases > 0 {
        return Err(NotEarned::NotFirstPurchase);
    }
    Ok(())
}

fn calculate(
    state: &Partnership,
    terms: &Terms,
    referral_id: &ReferralId,
    amount: Money,
    period_start: DateTime<Utc>,
) -> Calculation {
    let period = state
        .facts
        .periods
        .get(&period_start)
        .cloned()
        .unwrap_or_default();
    let mut bands = Vec::new();
    let gross_minor = match &terms.rule {
        CommissionRule::Percentage { rate_bps } => amount.times_bps(*rate_bps).amount_minor,
        CommissionRule::FlatPerFirstPurchase { amount_minor }
        | CommissionRule::FlatPerPurchase { amount_minor } => *amount_minor,
        CommissionRule::MarginalTiers { tiers } => {
            let start = i128::from(period.spend_minor.max(0));
            let end = start + i128::from(amount.amount_minor);
            let mut numerator: i128 = 0;
            for (index, tier) in tiers.iter().enumerate() {
                let band_start = i128::from(tier.from_minor);
                let band_end = tiers
                    .get(index + 1)
                    .map_or(i128::MAX, |next| i128::from(next.from_minor));
                let portion = end.min(band_end) - start.max(band_start);
                if portion > 0 {
                    numerator += portion * i128::from(tier.rate_bps);
                    bands.push(Band {
                        from_minor: tier.from_minor,
                        portion_minor: i64::try_from(portion).unwrap_or(i64::MAX),
                        rate_bps: tier.rate_bps,
                    });
                }
            }
            i64::try_from(divide_half_even(numerator, i128::from(BPS_PER_WHOLE)))
                .unwrap_or(i64::MAX)
        }
    };
    let customer_earned = state
        .facts
        .customers
        .get(referral_id)
        .map_or(0, |c| c.commission_minor);
    let customer_cap = terms
        .cap_per_customer_minor
        .map(|cap_minor| Cap::PerCustomer {
            cap_minor,
            earned_before_minor: customer_earned,
        });
    let period_cap = terms.cap_per_period_minor.map(|cap_minor| Cap::PerPeriod {
        cap_minor,
        earned_before_minor: period.commission_minor,
    });
    let room = |cap: &Cap| match cap {
        Cap::PerCustomer {
            cap_minor,
            earned_before_minor,
        }
        | Cap::PerPeriod {
            cap_minor,
            earned_before_minor,
        } => cap_minor.saturating_sub(*earned_before_minor),
    };
    // The tightest cap that actually cuts the commission.
    let capped_by = [customer_cap, period_cap]
        .into_iter()
        .flatten()
        .filter(|cap| room(cap) < gross_minor)
        .min_by_key(room);
    Calculation {
        rule: terms.rule.name(),
        gross_minor,
        bands,
        capped_by,
    }
}

fn refund_event(
    purchase_id: &PurchaseId,
    record: &PurchaseRecord,
    refund_id: RefundId,
    refund: Money,
    refunded_at: DateTime<Utc>,
) -> Result<Event, PartnershipError> {
    if refund.currency != record.amount.currency {
        return Err(PartnershipError::RefundCurrency {
            refund: refund.currency.to_string(),
            purchase: record.amount.currency.to_string(),
        });
    }
    let refunded_total = record.refunded_minor.checked_add(refund.amount_minor);
    let Some(refunded_total) = refunded_total.filter(|total| *total <= record.amount.amount_minor)
    else {
        return Err(PartnershipError::RefundExceedsPurchase {
            purchase_id: purchase_id.clone(),
            amount_minor: record.amount.amount_minor,
            refund_minor: refund.amount_minor,
            currency: refund.currency.to_string(),
        });
    };
    let target_reversed = divide_half_even(
        i128::from(record.commission_minor) * i128::from(refunded_total),
        i128::from(record.amount.amount_minor),
    );
    let reversal_minor = i64::try_from(target_reversed).unwrap_or(i64::MAX) - record.reversed_minor;
    // A commission is only ever earned in the purchase's currency (a mismatch earns nothing).
    let currency = record.amount.currency;
    Ok(Event::RefundApplied {
        refund_id,
        purchase_id: purchase_id.clone(),
        refund,
        reversal: Money::new(reversal_minor, currency),
        refunded_at,
        within_holding_period: refunded_at < record.payable_at,
    })
}

/// What is needed to explain one commission line in words.
#[derive(Debug, Clone)]
pub struct CommissionLine<'a> {
    pub amount: Money,
    pub terms_version: Option<u32>,
    pub terms: Option<&'a Terms>,
    pub commission: Money,
    pub calculation: Option<&'a Calculation>,
    pub not_earned: Option<&'a NotEarned>,
    pub refunded_minor: i64,
    pub reversed_minor: i64,
    pub payable_at: DateTime<Utc>,
}

fn percent(rate_bps: u32) -> String {
    format!("{}.{:02}%", rate_bps / 100, rate_bps % 100)
}

/// The line in words: which terms, which rule, how the amount came about, caps and refunds.
pub fn explain(line: &CommissionLine<'_>) -> String {
    let money = |minor: i64| Money::new(minor, line.amount.currency).to_string();
    let mut text = format!("Purchase of {}", line.amount);
    match line.terms_version {
        Some(version) => text.push_str(&format!(", under terms version {version}: ")),
        None => text.push_str(": "),
    }
    if let Some(reason) = line.not_earned {
        let why = match reason {
            NotEarned::NoTermsInForce => {
                "no accepted terms were in force at the time of the purchase".to_owned()
            }
            NotEarned::Terminated => {
                "the partnership had been terminated before the purchase".to_owned()
            }
            NotEarned::CurrencyMismatch { terms_currency } => {
                format!("the terms pay commission on purchases in {terms_currency} only")
            }
            NotEarned::ReturningCustomer {
                previous_purchase_at,
            } => {
                format!("the terms pay for new customers only, and this customer had bought at the acceptor on {previous_purchase_at}, within the look-back before the referral")
            }
            NotEarned::BelowMinimum { min_purchase_minor } => format!(
                "the purchase is below the minimum of {}",
                money(*min_purchase_minor)
            ),
            NotEarned::AboveMaximum { max_purchase_minor } => format!(
                "the purchase is above the maximum of {}",
                money(*max_purchase_minor)
            ),
            NotEarned::NotFirstPurchase => {
                "the terms pay on the customer's first purchase only, and this was not it"
                    .to_owned()
            }
            NotEarned::DurationOver => "the terms' duration for this customer was over".to_owned(),
        };
        text.push_str(&format!("no commission, because {why}."));
        return text;
    }
    if let (Some(terms), Some(calculation)) = (line.terms, line.calculation) {
        match &terms.rule {
            CommissionRule::Percentage { rate_bps } => text.push_str(&format!(
                "{} of {} = {} (rounded half to even to the cent)",
                percent(*rate_bps),
                line.amount,
                money(calculation.gross_minor)
            )),
            CommissionRule::FlatPerFirstPurchase { .. } => {
                text.push_str(&format!(
                    "a flat {} on the customer's first purchase",
                    money(calculation.gross_minor)
                ));
            }
            CommissionRule::FlatPerPurchase { .. } => {
                text.push_str(&format!(
                    "a flat {} per purchase",
                    money(calculation.gross_minor)
                ));
            }
            CommissionRule::MarginalTiers { .. } => {
                let bands: Vec<String> = calculation
                    .bands
                    .iter()
                    .map(|band| {
                        format!(
                            "{} at {} (tier from {})",
                            money(band.portion_minor),
                            percent(band.rate_bps),
                            money(band.from_minor)
                        )
                    })
                    .collect();
                text.push_str(&format!(
                    "marginal tiers on the period's attributed spend: {} = {} (rounded half to even)",
                    bands.join(" + "),
                    money(calculation.gross_minor)
                ));
            }
        }
        match calculation.capped_by {
            Some(Cap::PerCustomer {
                cap_minor,
                earned_before_minor,
            }) => text.push_str(&format!(
                "; capped by the per-customer cap of {} ({} earned before) to {}",
                money(cap_minor),
                money(earned_before_minor),
                line.commission
            )),
            Some(Cap::PerPeriod {
                cap_minor,
                earned_before_minor,
            }) => text.push_str(&format!(
                "; capped by the per-period cap of {} ({} earned before in the period) to {}",
                money(cap_minor),
                money(earned_before_minor),
                line.commission
            )),
            None => {}
        }
        text.push('.');
    }
    if line.refunded_minor > 0 {
        text.push_str(&format!(
            " Refunds of {} clawed back {}, leaving {}.",
            money(line.refunded_minor),
            money(line.reversed_minor),
            money(line.commission.amount_minor - line.reversed_minor)
        ));
    }
    text.push_str(&format!(
        " Payable from {}.",
        line.payable_at.format("%Y-%m-%d %H:%M UTC")
    ));
    text
}
