//! Properties of the partnership aggregate over random histories of purchases, refunds, term
//! amendments and redeliveries:
//! - per currency the ledger sums to zero, and what it owes equals accrued minus reversed;
//! - no purchase ever has a negative net commission, or more reversed than accrued;
//! - replaying the events gives the live state; deciding the same commands again gives the same
//!   events; redelivering any command decides nothing new.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use tandem_domain::commission::{decide, Attribution, Command, Event, Partnership};
use tandem_domain::ids::{MerchantId, PurchaseId, ReferralId, RefundId};
use tandem_domain::ledger::Account;
use tandem_domain::money::{Currency, Money};
use tandem_domain::partnership::{CommissionRule, Terms, Tier};

#[derive(Debug, Clone)]
enum Op {
    Purchase {
        customer: usize,
        amount_minor: i64,
        after_hours: i64,
        foreign: bool,
    },
    Refund {
        purchase: usize,
        share_bps: i64,
    },
    Amend {
        rate_bps: u32,
    },
    Redeliver {
        command: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..4, 1i64..=200_000, 0i64..=96, proptest::bool::weighted(0.1)).prop_map(|(customer, amount_minor, after_hours, foreign)| Op::Purchase { customer, amount_minor, after_hours, foreign }),
        3 => (0usize..64, 1i64..=10_000).prop_map(|(purchase, share_bps)| Op::Refund { purchase, share_bps }),
        1 => (1u32..=10_000).prop_map(|rate_bps| Op::Amend { rate_bps }),
        1 => (0usize..64).prop_map(|command| Op::Redeliver { command }),
    ]
}

fn terms() -> impl Strategy<Value = Terms> {
    let rule = prop_oneof![
        (1u32..=10_000).prop_map(|rate_bps| CommissionRule::Percentage { rate_bps }),
        (1i64..=5_000).prop_map(|amount_minor| CommissionRule::FlatPerPurchase { amount_minor }),
        (1i64..=5_000)
            .prop_map(|amount_minor| CommissionRule::FlatPerFirstPurchase { amount_minor }),
        (0u32..=2_000, 1i64..=100_000, 0u32..=3_000).prop_map(|(low, edge, high)| {
            CommissionRule::MarginalTiers {
                tiers: vec![
                    Tier {
                        from_minor: 0,
                        rate_bps: low,
                    },
                    Tier {
                        from_minor: edge,
                        rate_bps: high,
                    },
                ],
            }
        }),
    ];
    (
        rule,
        proptest::option::of(1i64..=50_000),
        proptest::option::of(1i64..=100_000),
        0u32..=30,
    )
        .prop_map(
            |(rule, cap_per_customer_minor, cap_per_period_minor, holding_period_days)| Terms {
                rule,
                cap_per_customer_minor,
                cap_per_period_minor,
                holding_period_days,
                ..Terms::percentage(Currency::parse("c", "EUR").unwrap(), 100, 30).unwrap()
            },
        )
}

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().unwrap()
}

/// Turns random operations into concrete commands, deciding each against the live state.
fn run(
    initial: Terms,
    ops: &[Op],
) -> (
    Partnership,
    Vec<Event>,
    Vec<Command>,
    MerchantId,
    MerchantId,
) {
    let referrer = MerchantId::generate();
    let acceptor = MerchantId::generate();
    let customers: Vec<ReferralId> = (0..4).map(|_| ReferralId::generate()).collect();
    let mut now = start();
    let mut commands = vec![
        Command::Propose {
            referrer: referrer.clone(),
            acceptor: acceptor.clone(),
            proposed_by: referrer.clone(),
            terms: initial.clone(),
            effective_from: now,
            now,
        },
        Command::Accept {
            version: 1,
            accepted_by: acceptor.clone(),
            now,
        },
    ];
    let mut state = Partnership::default();
    let mut events = Vec::new();
    for command in &commands {
        for event in decide(&state, command.clone()).unwrap() {
            state = state.apply(&event);
            events.push(event);
        }
    }
    let mut purchases: Vec<(PurchaseId, i64, bool)> = Vec::new();
    let mut version = 1;
    for op in ops {
        let command = match op {
            Op::Purchase {
                customer,
                amount_minor,
                after_hours,
                foreign,
            } => {
                now += Duration::hours(*after_hours);
                let purchase_id = PurchaseId::generate();
                purchases.push((purchase_id.clone(), *amount_minor, *foreign));
                // Now and then a purchase in another currency, which earns nothing.
                let currency = if *foreign {
                    Currency::parse("c", "USD").unwrap()
                } else {
                    initial.currency
                };
                Command::AttributePurchase(Attribution {
                    purchase_id,
                    referral_id: customers[*customer].clone(),
                    amount: Money::new(*amount_minor, currency),
                    purchased_at: now,
                    referred_at: start(),
                    previous_purchase_at: None,
                })
            }
            Op::Refund {
                purchase,
                share_bps,
            } => {
                let Some((purchase_id, amount_minor, foreign)) =
                    purchases.get(purchase % purchases.len().max(1)).cloned()
                else {
                    continue;
                };
                let currency = if foreign {
                    Currency::parse("c", "USD").unwrap()
                } else {
                    initial.currency
                };
                let refunded = state.purchase(&purchase_id).map_or(0, |p| p.refunded_minor);
                let remaining = amount_minor - refunded;
                if remaining <= 0 {
                    continue;
                }
                let refund_minor = (remaining * share_bps / 10_000).max(1);
                Command::RecordRefund {
                    refund_id: RefundId::generate(),
                    purchase_id,
                    refund: Money::new(refund_minor, currency),
                    refunded_at: now,
                }
            }
            Op::Amend { rate_bps } => {
                let proposal = Command::Propose {
                    referrer: referrer.clone(),
                    acceptor: acceptor.clone(),
                    proposed_by: acceptor.clone(),
                    terms: Terms {
                        rule: CommissionRule::Percentage {
                            rate_bps: *rate_bps,
                        },
                        ..initial.clone()
                    },
                    effective_from: now + Duration::hours(1),
                    now,
                };
                for event in decide(&state, proposal.clone()).unwrap() {
                    state = state.apply(&event);
                    events.push(event);
                }
                commands.push(proposal);
                version += 1;
                Command::Accept {
                    version,
                    accepted_by: referrer.clone(),
                    now,
                }
            }
            Op::Redeliver { command } => {
                let command = commands[command % commands.len()].clone();
                // A proposal is a new version each time by design; the service deduplicates the
                // message that carries it. Everything else must be idempotent here too.
                if matches!(command, Command::Propose { .. }) {
                    continue;
                }
                command
            }
        };
        let decided =
            decide(&state, command.clone()).unwrap_or_else(|e| panic!("{command:?} refused: {e}"));
        if let Op::Redeliver { .. } = op {
            assert!(
                decided.is_empty(),
                "redelivered {command:?} decided {decided:?}"
            );
            continue;
        }
        for event in decided {
            state = state.apply(&event);
            events.push(event);
        }
        commands.push(command);
    }
    (state, events, commands, referrer, acceptor)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_book_balances_and_replays(initial in terms(), ops in proptest::collection::vec(op(), 1..60)) {
        let (state, events, commands, referrer, acceptor) = run(initial, &ops);

        // Ledger: every entry balances, so the whole ledger sums to zero; receivable equals
        // accrued minus reversed.
        let mut ledger_sum: std::collections::BTreeMap<String, i64> = std::collections::BTreeMap::new();
        let mut receivable = 0i64;
        let mut replayed = Partnership::default();
        for event in &events {
            if let Some(entry) = replayed.ledger_entry(event).unwrap() {
                for posting in entry.postings() {
                    *ledger_sum.entry(entry.currency().to_string()).or_default() += posting.amount_minor;
                    if posting.account == Account::CommissionReceivable {
                        prop_assert_eq!(&posting.merchant, &referrer);
                        receivable += posting.amount_minor;
                    } else {
                        prop_assert_eq!(&posting.merchant, &acceptor);
                    }
                }
            }
            replayed = replayed.apply(event);
        }
        prop_assert!(ledger_sum.values().all(|sum| *sum == 0), "per currency the ledger sums to zero: {:?}", ledger_sum);
        let accrued: i64 = events.iter().map(|e| match e { Event::CommissionAccrued { commission, .. } => commission.amount_minor, _ => 0 }).sum();
        let reversed: i64 = events.iter().map(|e| match e { Event::RefundApplied { reversal, .. } => reversal.amount_minor, _ => 0 }).sum();
        prop_assert_eq!(receivable, accrued - reversed);

        // Per purchase: never negative, never more reversed than accrued, never more refunded
        // than bought.
        for event in &events {
            if let Event::CommissionAccrued { purchase_id, commission, .. } = event {
                prop_assert!(commission.amount_minor >= 0);
                let record = state.purchase(purchase_id).unwrap();
                prop_assert!(record.reversed_minor >= 0 && record.reversed_minor <= record.commission_minor);
                prop_assert!(record.refunded_minor <= record.amount.amount_minor);
                if record.refunded_minor == record.amount.amount_minor {
                    prop_assert_eq!(record.reversed_minor, record.commission_minor);
                }
            }
        }

        // Replay gives the live state, every time.
        prop_assert_eq!(&replayed, &state);
        prop_assert_eq!(&Partnership::replay(&events), &state);

        // Deciding the same commands again, from nothing, gives the same events.
        let mut again = Partnership::default();
        let mut again_events = Vec::new();
        for command in commands {
            for event in decide(&again, command).unwrap() {
                again = again.apply(&event);
                again_events.push(event);
            }
        }
        prop_assert_eq!(again_events, events);
        prop_assert_eq!(again, state);
    }
}
