//! The partnership aggregate, rule by rule: given these events, when this command, then these
//! events (or this refusal).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use chrono::{DateTime, Duration, TimeZone, Utc};
use tandem_domain::commission::{
    decide, Attribution, Cap, Command, Event, NotEarned, Partnership, PartnershipError,
};
use tandem_domain::ids::{MerchantId, PurchaseId, ReferralId, RefundId};
use tandem_domain::money::{Currency, Money};
use tandem_domain::partnership::{CommissionDuration, CommissionRule, Terms, Tier};

fn eur(amount_minor: i64) -> Money {
    Money::new(amount_minor, Currency::parse("c", "EUR").unwrap())
}

fn day(n: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).single().unwrap() + Duration::days(n)
}

fn percentage(rate_bps: u32) -> Terms {
    Terms::percentage(Currency::parse("c", "EUR").unwrap(), rate_bps, 30).unwrap()
}

struct World {
    referrer: MerchantId,
    acceptor: MerchantId,
    history: Vec<Event>,
}

impl World {
    /// A partnership whose version 1 (`terms`) the acceptor accepted on day 0.
    fn with_terms(terms: Terms) -> World {
        let mut world = World {
            referrer: MerchantId::generate(),
            acceptor: MerchantId::generate(),
            history: Vec::new(),
        };
        world.then_ok(Command::Propose {
            referrer: world.referrer.clone(),
            acceptor: world.acceptor.clone(),
            proposed_by: world.referrer.clone(),
            terms,
            effective_from: day(0),
            now: day(0),
        });
        world.then_ok(Command::Accept {
            version: 1,
            accepted_by: world.acceptor.clone(),
            now: day(0),
        });
        world
    }

    fn state(&self) -> Partnership {
        Partnership::replay(&self.history)
    }

    fn when(&self, command: Command) -> Result<Vec<Event>, PartnershipError> {
        decide(&self.state(), command)
    }

    /// Decides and appends; returns the new events.
    fn then_ok(&mut self, command: Command) -> Vec<Event> {
        let events = self.when(command).expect("command accepted");
        self.history.extend(events.clone());
        events
    }

    fn purchase(
        &mut self,
        referral: &ReferralId,
        amount_minor: i64,
        at: DateTime<Utc>,
    ) -> (PurchaseId, Vec<Event>) {
        let purchase_id = PurchaseId::generate();
        let events = self.then_ok(Command::AttributePurchase(Attribution {
            purchase_id: purchase_id.clone(),
            referral_id: referral.clone(),
            amount: eur(amount_minor),
            purchased_at: at,
            referred_at: day(0),
            previous_purchase_at: None,
        }));
        (purchase_id, events)
    }

    fn refund(
        &mut self,
        purchase_id: &PurchaseId,
        amount_minor: i64,
        at: DateTime<Utc>,
    ) -> Result<Vec<Event>, PartnershipError> {
        let events = self.when(Command::RecordRefund {
            refund_id: RefundId::generate(),
            purchase_id: purchase_id.clone(),
            refund: eur(amount_minor),
            refunded_at: at,
        })?;
        self.history.extend(events.clone());
        Ok(events)
    }
}

fn commission_of(events: &[Event]) -> i64 {
    match &events[0] {
        Event::CommissionAccrued { commission, .. } => commission.amount_minor,
        Event::CommissionNotEarned { reason, .. } => panic!("not earned: {reason:?}"),
        other => panic!("unexpected {other:?}"),
    }
}

fn not_earned(events: &[Event]) -> NotEarned {
    match &events[0] {
        Event::CommissionNotEarned { reason, .. } => reason.clone(),
        other => panic!("expected no commission, got {other:?}"),
    }
}

fn reversal_of(events: &[Event]) -> i64 {
    match events.last().unwrap() {
        Event::RefundApplied { reversal, .. } => reversal.amount_minor,
        other => panic!("unexpected {other:?}"),
    }
}

// ---- Agreement ------------------------------------------------------------------------------

#[test]
fn terms_take_effect_only_when_the_other_party_accepts() {
    let referrer = MerchantId::generate();
    let acceptor = MerchantId::generate();
    let propose = |by: &MerchantId, effective_from, now| Command::Propose {
        referrer: referrer.clone(),
        acceptor: acceptor.clone(),
        proposed_by: by.clone(),
        terms: percentage(500),
        effective_from,
        now,
    };
    // A stranger cannot propose; terms cannot start in the past.
    assert!(matches!(
        decide(
            &Partnership::default(),
            propose(&MerchantId::generate(), day(1), day(0))
        ),
        Err(PartnershipError::NotAParty(_))
    ));
    assert!(matches!(
        decide(&Partnership::default(), propose(&referrer, day(0), day(1))),
        Err(PartnershipError::Retroactive { .. })
    ));
    let proposed = decide(&Partnership::default(), propose(&referrer, day(2), day(0))).unwrap();
    let state = Partnership::replay(&proposed);
    assert_eq!(
        state.terms_at(day(3)),
        None,
        "proposed terms are not in force"
    );
    // The proposer cannot accept its own proposal; the other party can.
    assert_eq!(
        decide(
            &state,
            Command::Accept {
                version: 1,
                accepted_by: referrer.clone(),
                now: day(1)
            }
        ),
        Err(PartnershipError::OwnProposal)
    );
    let accepted = decide(
        &state,
        Command::Accept {
            version: 1,
            accepted_by: acceptor.clone(),
            now: day(5),
        },
    )
    .unwrap();
    // Accepted on day 5, after the proposed day 2: in force from day 5, never retroactively.
    assert!(
        matches!(&accepted[0], Event::TermsAccepted { effective_from, .. } if *effective_from == day(5))
    );
    let state = state.apply(&accepted[0]);
    assert_eq!(state.terms_at(day(4)), None);
    assert_eq!(state.terms_at(day(5)).map(|(v, _)| v), Some(1));
    // The same acceptance again changes nothing; the proposer cannot accept it either.
    let accept = |by: &MerchantId| Command::Accept {
        version: 1,
        accepted_by: by.clone(),
        now: day(6),
    };
    assert_eq!(decide(&state, accept(&acceptor)), Ok(vec![]));
    assert_eq!(
        decide(&state, accept(&referrer)),
        Err(PartnershipError::AlreadyAccepted(1))
    );
}

#[test]
fn invalid_terms_are_refused_naming_the_field() {
    let referrer = MerchantId::generate();
    let error = decide(
        &Partnership::default(),
        Command::Propose {
            referrer: referrer.clone(),
            acceptor: MerchantId::generate(),
            proposed_by: referrer,
            terms: Terms {
                cap_per_period_minor: Some(0),
                ..percentage(500)
            },
            effective_from: day(0),
            now: day(0),
        },
    )
    .unwrap_err();
    assert!(
        error.to_string().contains("cap_per_period_minor"),
        "{error}"
    );
}

#[test]
fn an_amendment_applies_from_its_effective_time_and_never_before() {
    let mut world = World::with_terms(percentage(1000));
    let referral = ReferralId::generate();
    world.then_ok(Command::Propose {
        referrer: world.referrer.clone(),
        acceptor: world.acceptor.clone(),
        proposed_by: world.acceptor.clone(),
        terms: percentage(500),
        effective_from: day(10),
        now: day(3),
    });
    world.then_ok(Command::Accept {
        version: 2,
        accepted_by: world.referrer.clone(),
        now: day(4),
    });
    let (_, before) = world.purchase(&referral, 10_000, day(10) - Duration::seconds(1));
    let (_, after) = world.purchase(&referral, 10_000, day(10));
    assert_eq!(commission_of(&before), 1000);
    assert!(matches!(
        &before[0],
        Event::CommissionAccrued {
            terms_version: 1,
            ..
        }
    ));
    assert_eq!(commission_of(&after), 500);
    assert!(matches!(
        &after[0],
        Event::CommissionAccrued {
            terms_version: 2,
            ..
        }
    ));
}

#[test]
fn termination_stops_new_commissions_and_keeps_accrued_ones() {
    let mut world = World::with_terms(percentage(1000));
    let referral = ReferralId::generate();
    let (first, _) = world.purchase(&referral, 10_000, day(1));
    world.then_ok(Command::Terminate {
        by: world.acceptor.clone(),
        at: day(2),
    });
    let (_, after) = world.purchase(&referral, 10_000, day(3));
    assert_eq!(not_earned(&after), NotEarned::Terminated);
    assert_eq!(
        world.state().purchase(&first).unwrap().commission_minor,
        1000
    );
}

// ---- Commission rules ---------------------------------------------------------------------------

#[test]
fn percentage_rounds_half_to_even_and_no_terms_means_no_commission() {
    let mut world = World::with_terms(percentage(750));
    let referral = ReferralId::generate();
    assert_eq!(
        commission_of(&world.purchase(&referral, 4_555, day(1)).1),
        342
    );
    assert_eq!(commission_of(&world.purchase(&referral, 20, day(1)).1), 2); // 1.5 → 2
    assert_eq!(commission_of(&world.purchase(&referral, 60, day(1)).1), 4); // 4.5 → 4
    assert_eq!(
        not_earned(
            &world
                .purchase(&referral, 1_000, day(0) - Duration::seconds(1))
                .1
        ),
        NotEarned::NoTermsInForce
    );
}

#[test]
fn flat_per_first_purchase_pays_once_per_customer() {
    let mut world = World::with_terms(Terms {
        rule: CommissionRule::FlatPerFirstPurchase { amount_minor: 500 },
        ..percentage(1)
    });
    let (ana, bob) = (ReferralId::generate(), ReferralId::generate());
    assert_eq!(commission_of(&world.purchase(&ana, 3_000, day(1)).1), 500);
    assert_eq!(
        not_earned(&world.purchase(&ana, 3_000, day(2)).1),
        NotEarned::NotFirstPurchase
    );
    assert_eq!(commission_of(&world.purchase(&bob, 100, day(2)).1), 500);
}

#[test]
fn flat_per_purchase_pays_every_purchase() {
    let mut world = World::with_terms(Terms {
        rule: CommissionRule::FlatPerPurchase { amount_minor: 250 },
        ..percentage(1)
    });
    let ana = ReferralId::generate();
    assert_eq!(commission_of(&world.purchase(&ana, 3_000, day(1)).1), 250);
    assert_eq!(commission_of(&world.purchase(&ana, 9_000, day(2)).1), 250);
}

#[test]
fn marginal_tiers_pay_each_band_at_its_rate() {
    // 5% on the period's first EUR 100.00, 10% from EUR 100.00, 12% from EUR 500.00.
    let tiers = vec![
        Tier {
            from_minor: 0,
            rate_bps: 500,
        },
        Tier {
            from_minor: 10_000,
            rate_bps: 1_000,
        },
        Tier {
            from_minor: 50_000,
            rate_bps: 1_200,
        },
    ];
    let mut world = World::with_terms(Terms {
        rule: CommissionRule::MarginalTiers { tiers },
        ..percentage(1)
    });
    let referral = ReferralId::generate();
    // 80.00 all in the first band: 4.00.
    assert_eq!(
        commission_of(&world.purchase(&referral, 8_000, day(1)).1),
        400
    );
    // 40.00 crossing at 100.00: 20.00 × 5% + 20.00 × 10% = 3.00.
    let (_, crossing) = world.purchase(&referral, 4_000, day(2));
    assert_eq!(commission_of(&crossing), 300);
    let Event::CommissionAccrued { calculation, .. } = &crossing[0] else {
        panic!()
    };
    assert_eq!(
        calculation
            .bands
            .iter()
            .map(|b| (b.portion_minor, b.rate_bps))
            .collect::<Vec<_>>(),
        vec![(2_000, 500), (2_000, 1_000)]
    );
    // Spend is now exactly 120.00; 380.00 fills the 10% band to its edge at 500.00: 38.00.
    assert_eq!(
        commission_of(&world.purchase(&referral, 38_000, day(3)).1),
        3_800
    );
    // Exactly at the boundary: the next cent is at 12%. 0.01 × 12% = 0.0012 → 0.00; 100.00 → 12.00.
    assert_eq!(
        commission_of(&world.purchase(&referral, 10_000, day(4)).1),
        1_200
    );
    // A new month starts a new period at the first band again.
    assert_eq!(
        commission_of(&world.purchase(&referral, 10_000, day(31)).1),
        500
    );
}

#[test]
fn caps_per_customer_and_per_period_cut_the_commission() {
    let terms = Terms {
        cap_per_customer_minor: Some(1_500),
        cap_per_period_minor: Some(2_500),
        ..percentage(1000)
    };
    let mut world = World::with_terms(terms);
    let (ana, bob) = (ReferralId::generate(), ReferralId::generate());
    assert_eq!(
        commission_of(&world.purchase(&ana, 10_000, day(1)).1),
        1_000
    );
    let (_, capped) = world.purchase(&ana, 10_000, day(2));
    assert_eq!(
        commission_of(&capped),
        500,
        "customer cap 15.00 leaves 5.00"
    );
    let Event::CommissionAccrued { calculation, .. } = &capped[0] else {
        panic!()
    };
    assert_eq!(
        calculation.capped_by,
        Some(Cap::PerCustomer {
            cap_minor: 1_500,
            earned_before_minor: 1_000
        })
    );
    assert_eq!(
        commission_of(&world.purchase(&ana, 10_000, day(3)).1),
        0,
        "customer cap reached"
    );
    assert_eq!(
        commission_of(&world.purchase(&bob, 20_000, day(3)).1),
        1_000,
        "period cap 25.00 leaves 10.00"
    );
    assert_eq!(
        commission_of(&world.purchase(&bob, 1_000, day(4)).1),
        0,
        "period cap reached"
    );
    assert_eq!(
        commission_of(&world.purchase(&bob, 1_000, day(31)).1),
        100,
        "a new period has room again"
    );
}

#[test]
fn duration_limits_by_purchase_count_and_by_days() {
    let mut world = World::with_terms(Terms {
        duration: CommissionDuration::FirstPurchases(2),
        ..percentage(1000)
    });
    let ana = ReferralId::generate();
    world.purchase(&ana, 1_000, day(1));
    world.purchase(&ana, 1_000, day(2));
    assert_eq!(
        not_earned(&world.purchase(&ana, 1_000, day(3)).1),
        NotEarned::DurationOver
    );

    let mut world = World::with_terms(Terms {
        duration: CommissionDuration::DaysAfterFirstPurchase(10),
        ..percentage(1000)
    });
    world.purchase(&ana, 1_000, day(1));
    assert_eq!(
        commission_of(
            &world
                .purchase(&ana, 1_000, day(11) - Duration::seconds(1))
                .1
        ),
        100
    );
    assert_eq!(
        not_earned(&world.purchase(&ana, 1_000, day(11)).1),
        NotEarned::DurationOver
    );
}

#[test]
fn new_customers_only_excludes_recent_buyers_and_purchase_bounds_apply() {
    let terms = Terms {
        new_customer_look_back_days: Some(90),
        min_purchase_minor: Some(1_000),
        max_purchase_minor: Some(50_000),
        ..percentage(1000)
    };
    let mut world = World::with_terms(terms);
    let attribution = |previous: Option<DateTime<Utc>>, amount_minor| {
        Command::AttributePurchase(Attribution {
            purchase_id: PurchaseId::generate(),
            referral_id: ReferralId::generate(),
            amount: eur(amount_minor),
            purchased_at: day(20),
            referred_at: day(10),
            previous_purchase_at: previous,
        })
    };
    let bought_recently = world
        .when(attribution(Some(day(10) - Duration::days(89)), 5_000))
        .unwrap();
    assert!(matches!(
        not_earned(&bought_recently),
        NotEarned::ReturningCustomer { .. }
    ));
    let bought_long_ago = world
        .when(attribution(Some(day(10) - Duration::days(91)), 5_000))
        .unwrap();
    assert_eq!(commission_of(&bought_long_ago), 500);
    assert_eq!(
        not_earned(&world.when(attribution(None, 999)).unwrap()),
        NotEarned::BelowMinimum {
            min_purchase_minor: 1_000
        }
    );
    assert_eq!(
        commission_of(&world.when(attribution(None, 1_000)).unwrap()),
        100
    );
    assert_eq!(
        commission_of(&world.when(attribution(None, 50_000)).unwrap()),
        5_000
    );
    assert_eq!(
        not_earned(&world.when(attribution(None, 50_001)).unwrap()),
        NotEarned::AboveMaximum {
            max_purchase_minor: 50_000
        }
    );
    let _ = &mut world;
}

// ---- Refunds ------------------------------------------------------------------------------------

#[test]
fn partial_refunds_claw_back_in_proportion_and_a_full_refund_reverses_exactly() {
    let mut world = World::with_terms(Terms {
        holding_period_days: 14,
        ..percentage(750)
    });
    let referral = ReferralId::generate();
    let (purchase, accrued) = world.purchase(&referral, 4_555, day(1));
    assert_eq!(commission_of(&accrued), 342);
    // A third refunded: 342 × 1518/4555 = 113.97… → 114.
    let first = world.refund(&purchase, 1_518, day(3)).unwrap();
    assert_eq!(reversal_of(&first), 114);
    assert!(matches!(
        first[0],
        Event::RefundApplied {
            within_holding_period: true,
            ..
        }
    ));
    // The rest, after the holding period: the reversals add up to the commission exactly.
    let rest = world.refund(&purchase, 4_555 - 1_518, day(20)).unwrap();
    assert_eq!(reversal_of(&rest), 342 - 114);
    assert!(matches!(
        rest[0],
        Event::RefundApplied {
            within_holding_period: false,
            ..
        }
    ));
    // Nothing more can be refunded.
    assert!(matches!(
        world.refund(&purchase, 1, day(21)),
        Err(PartnershipError::RefundExceedsPurchase { .. })
    ));
}

#[test]
fn a_refund_before_its_purchase_waits_for_it() {
    let mut world = World::with_terms(percentage(1000));
    let referral = ReferralId::generate();
    let purchase_id = PurchaseId::generate();
    let parked = world.refund(&purchase_id, 2_000, day(1)).unwrap();
    assert!(matches!(parked[0], Event::RefundParked { .. }));
    let events = world.then_ok(Command::AttributePurchase(Attribution {
        purchase_id: purchase_id.clone(),
        referral_id: referral,
        amount: eur(10_000),
        purchased_at: day(1) - Duration::hours(1),
        referred_at: day(0),
        previous_purchase_at: None,
    }));
    assert_eq!(
        events.len(),
        2,
        "the purchase, then the refund that waited: {events:?}"
    );
    assert_eq!(commission_of(&events), 1_000);
    assert_eq!(reversal_of(&events), 200);
    let record = world.state().purchase(&purchase_id).cloned().unwrap();
    assert_eq!((record.refunded_minor, record.reversed_minor), (2_000, 200));
}

#[test]
fn redelivered_commands_change_nothing() {
    let mut world = World::with_terms(percentage(1000));
    let referral = ReferralId::generate();
    let attribution = Attribution {
        purchase_id: PurchaseId::generate(),
        referral_id: referral,
        amount: eur(10_000),
        purchased_at: day(1),
        referred_at: day(0),
        previous_purchase_at: None,
    };
    world.then_ok(Command::AttributePurchase(attribution.clone()));
    assert_eq!(
        world
            .when(Command::AttributePurchase(attribution.clone()))
            .unwrap(),
        vec![]
    );
    let refund = Command::RecordRefund {
        refund_id: RefundId::generate(),
        purchase_id: attribution.purchase_id,
        refund: eur(100),
        refunded_at: day(2),
    };
    assert_eq!(world.then_ok(refund.clone()).len(), 1);
    assert_eq!(world.when(refund).unwrap(), vec![]);
}

#[test]
fn every_money_movement_posts_a_balanced_entry() {
    let mut world = World::with_terms(percentage(1000));
    let referral = ReferralId::generate();
    let (purchase, _) = world.purchase(&referral, 10_000, day(1));
    world.refund(&purchase, 2_500, day(2)).unwrap();
    let mut state = Partnership::default();
    let mut posted = 0;
    for event in &world.history {
        if let Some(entry) = state.ledger_entry(event).unwrap() {
            assert_eq!(
                entry.postings().iter().map(|p| p.amount_minor).sum::<i64>(),
                0
            );
            posted += 1;
        }
        state = state.apply(event);
    }
    assert_eq!(posted, 2, "one accrual, one reversal");
}
