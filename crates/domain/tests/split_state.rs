//! The ledger's engine never holds a whole partnership: it keeps the core (parties, terms
//! versions, termination) and, for each batch of commands, loads only the keyed facts the batch
//! names (`record_keys`, then `tally_keys`), decides, and writes those facts back. These
//! properties check, over random histories delivered in random orders and cut into random
//! batches, that this split state decides exactly what the whole aggregate decides (the oracle),
//! and that a snapshot of the core plus the tail of the stream, projected key by key, equals a
//! full replay.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use tandem_domain::commission::{
    decide, record_keys, record_keys_of_events, Attribution, Command, Event, Facts, Partnership,
    PartnershipError, TallyKeys,
};
use tandem_domain::ids::{MerchantId, PurchaseId, ReferralId, RefundId};
use tandem_domain::money::{Currency, Money};
use tandem_domain::partnership::{
    CommissionDuration, CommissionRule, SettlementCycle, Terms, Tier,
};

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().unwrap()
}

fn eur() -> Currency {
    Currency::parse("c", "EUR").unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    Purchase {
        customer: usize,
        amount_minor: i64,
        after_hours: i64,
    },
    /// A refund of `share_bps` of a purchase; may arrive before the purchase once shuffled.
    Refund {
        purchase: usize,
        share_bps: i64,
    },
    Amend {
        rate_bps: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..6, 1i64..=200_000, 0i64..=240).prop_map(|(customer, amount_minor, after_hours)| Op::Purchase { customer, amount_minor, after_hours }),
        3 => (0usize..64, 1i64..=12_000).prop_map(|(purchase, share_bps)| Op::Refund { purchase, share_bps }),
        1 => (1u32..=10_000).prop_map(|rate_bps| Op::Amend { rate_bps }),
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
    let cycle = prop_oneof![
        Just(SettlementCycle::Daily),
        Just(SettlementCycle::Weekly),
        Just(SettlementCycle::Monthly),
    ];
    let duration = prop_oneof![
        Just(CommissionDuration::Unlimited),
        (1u32..=4).prop_map(CommissionDuration::FirstPurchases),
        (1u32..=20).prop_map(CommissionDuration::DaysAfterFirstPurchase),
    ];
    (
        rule,
        proptest::option::of(1i64..=50_000),
        proptest::option::of(1i64..=100_000),
        0u32..=30,
        cycle,
        duration,
    )
        .prop_map(
            |(
                rule,
                cap_per_customer_minor,
                cap_per_period_minor,
                holding_period_days,
                cycle,
                duration,
            )| Terms {
                rule,
                cap_per_customer_minor,
                cap_per_period_minor,
                holding_period_days,
                settlement_cycle: cycle,
                duration,
                ..Terms::percentage(eur(), 100, 30).unwrap()
            },
        )
}

/// The commands of a random history, terms first. Amendments are a proposal and its acceptance.
fn commands(initial: &Terms, ops: &[Op]) -> Vec<Command> {
    let referrer = MerchantId::generate();
    let acceptor = MerchantId::generate();
    let customers: Vec<ReferralId> = (0..6).map(|_| ReferralId::generate()).collect();
    let mut now = start();
    let mut commands = vec![Command::Import {
        referrer: referrer.clone(),
        acceptor: acceptor.clone(),
        terms: initial.clone(),
        effective_from: now - Duration::days(1),
    }];
    let mut purchases: Vec<(PurchaseId, i64)> = Vec::new();
    let mut version = 1;
    for op in ops {
        match op {
            Op::Purchase {
                customer,
                amount_minor,
                after_hours,
            } => {
                now += Duration::hours(*after_hours);
                let purchase_id = PurchaseId::generate();
                purchases.push((purchase_id.clone(), *amount_minor));
                commands.push(Command::AttributePurchase(Attribution {
                    purchase_id,
                    referral_id: customers[*customer].clone(),
                    amount: Money::new(*amount_minor, eur()),
                    purchased_at: now,
                    referred_at: start(),
                    previous_purchase_at: None,
                }));
            }
            Op::Refund {
                purchase,
                share_bps,
            } => {
                let Some((purchase_id, amount_minor)) =
                    purchases.get(purchase % purchases.len().max(1)).cloned()
                else {
                    continue;
                };
                // Up to 120 %: some refunds exceed what is left, and are refused or capped.
                commands.push(Command::RecordRefund {
                    refund_id: RefundId::generate(),
                    purchase_id,
                    refund: Money::new((amount_minor * share_bps / 10_000).max(1), eur()),
                    refunded_at: now,
                });
            }
            Op::Amend { rate_bps } => {
                version += 1;
                commands.push(Command::Propose {
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
                });
                commands.push(Command::Accept {
                    version,
                    accepted_by: referrer.clone(),
                    now,
                });
            }
        }
    }
    commands
}

/// Moves purchases and refunds around (terms commands keep their places): arrival order on the
/// partnership's partition is whatever attribution on many customer partitions produced.
fn shuffled(commands: &[Command], swaps: &[(usize, usize)]) -> Vec<Command> {
    let mut commands = commands.to_vec();
    let movable: Vec<usize> = commands
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            matches!(
                c,
                Command::AttributePurchase(_) | Command::RecordRefund { .. }
            )
        })
        .map(|(i, _)| i)
        .collect();
    if movable.len() > 1 {
        for (a, b) in swaps {
            let (a, b) = (movable[a % movable.len()], movable[b % movable.len()]);
            commands.swap(a, b);
        }
    }
    commands
}

type Decided = Vec<Result<Vec<Event>, PartnershipError>>;

/// The oracle: the whole aggregate, every command in order.
fn oracle(commands: &[Command]) -> (Partnership, Decided) {
    let mut state = Partnership::default();
    let mut decided = Vec::new();
    for command in commands {
        let result = decide(&state, command.clone());
        if let Ok(events) = &result {
            for event in events {
                state = state.apply(event);
            }
        }
        decided.push(result);
    }
    (state, decided)
}

/// The store as the engine sees it: a core and keyed facts, read and written by key.
#[derive(Default)]
struct Store {
    core: Partnership,
    facts: Facts,
}

impl Store {
    /// Loads what `keys` name, then the tallies the records point to.
    fn load(
        &self,
        records: &tandem_domain::commission::RecordKeys,
        tallies: impl FnOnce(
            &Partnership,
            &BTreeMap<PurchaseId, tandem_domain::commission::PurchaseRecord>,
        ) -> TallyKeys,
    ) -> Facts {
        let mut facts = Facts::default();
        for id in &records.purchases {
            if let Some(record) = self.facts.purchases.get(id) {
                facts.purchases.insert(id.clone(), record.clone());
            }
            if let Some(parked) = self.facts.parked.get(id) {
                facts.parked.insert(id.clone(), parked.clone());
            }
        }
        facts.refunds = records
            .refunds
            .iter()
            .filter(|id| self.facts.refunds.contains(*id))
            .cloned()
            .collect();
        let keys = tallies(&self.core, &facts.purchases);
        for id in &keys.customers {
            if let Some(tally) = self.facts.customers.get(id) {
                facts.customers.insert(id.clone(), tally.clone());
            }
        }
        for start in &keys.periods {
            if let Some(tally) = self.facts.periods.get(start) {
                facts.periods.insert(*start, tally.clone());
            }
        }
        facts
    }

    /// Writes back every key that was loaded or created: the engine's upserts and deletes.
    fn write_back(
        &mut self,
        loaded: &Facts,
        working: Facts,
        records: &tandem_domain::commission::RecordKeys,
    ) {
        fn merge<K: Ord + Clone, V: Clone>(
            store: &mut BTreeMap<K, V>,
            loaded: &BTreeMap<K, V>,
            working: BTreeMap<K, V>,
        ) {
            for key in loaded.keys() {
                if !working.contains_key(key) {
                    store.remove(key);
                }
            }
            store.extend(working);
        }
        merge(
            &mut self.facts.customers,
            &loaded.customers,
            working.customers,
        );
        merge(&mut self.facts.periods, &loaded.periods, working.periods);
        merge(
            &mut self.facts.purchases,
            &loaded.purchases,
            working.purchases,
        );
        // Parked refunds are rewritten for every purchase the batch named.
        for id in &records.purchases {
            self.facts.parked.remove(id);
        }
        self.facts.parked.extend(working.parked);
        self.facts.refunds.extend(working.refunds);
    }
}

/// The engine: batches of `sizes`, each loading only what it names.
fn split(commands: &[Command], sizes: &[usize]) -> (Store, Decided) {
    let mut store = Store::default();
    let mut decided = Vec::new();
    let mut rest = commands;
    let mut sizes = sizes.iter().cycle();
    while !rest.is_empty() {
        let size = (*sizes.next().unwrap()).clamp(1, rest.len());
        let (batch, tail) = rest.split_at(size);
        rest = tail;
        let records = record_keys(batch);
        let loaded = store.load(&records, |core, purchases| {
            core.tally_keys(batch, purchases)
        });
        // Fewer facts than the whole: never more than the batch names.
        assert!(loaded.purchases.len() <= batch.len() && loaded.refunds.len() <= batch.len());
        let mut state = store.core.clone().with_facts(loaded.clone());
        for command in batch {
            let result = decide(&state, command.clone());
            if let Ok(events) = &result {
                for event in events {
                    state = state.apply(event);
                }
            }
            decided.push(result);
        }
        store.core = state.core();
        store.write_back(&loaded, state.into_facts(), &records);
    }
    (store, decided)
}

/// Projects `events` key by key onto a store holding a snapshot of the core.
fn project(store: &mut Store, events: &[Event], sizes: &[usize]) {
    let mut rest = events;
    let mut sizes = sizes.iter().cycle();
    while !rest.is_empty() {
        let size = (*sizes.next().unwrap()).clamp(1, rest.len());
        let (batch, tail) = rest.split_at(size);
        rest = tail;
        let records = record_keys_of_events(batch);
        let loaded = store.load(&records, |_, purchases| {
            Partnership::tally_keys_of_events(batch, purchases)
        });
        let mut state = store.core.clone().with_facts(loaded.clone());
        for event in batch {
            state = state.apply(event);
        }
        store.core = state.core();
        store.write_back(&loaded, state.into_facts(), &records);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn split_state_decides_what_the_whole_aggregate_decides(
        initial in terms(),
        ops in proptest::collection::vec(op(), 1..80),
        swaps in proptest::collection::vec((0usize..200, 0usize..200), 0..40),
        sizes in proptest::collection::vec(1usize..12, 1..6),
    ) {
        let commands = shuffled(&commands(&initial, &ops), &swaps);
        let (whole, expected) = oracle(&commands);
        let (store, decided) = split(&commands, &sizes);
        prop_assert_eq!(&decided, &expected);
        prop_assert_eq!(&store.core, &whole.core());
        // Nothing is lost between batches: the store holds exactly the whole aggregate's facts.
        prop_assert_eq!(&store.facts, whole.facts());
        let parked: BTreeSet<_> = store.facts.parked.keys().collect();
        prop_assert!(parked.iter().all(|id| !store.facts.purchases.contains_key(*id)), "a parked refund outlived its purchase");
    }

    #[test]
    fn snapshot_and_tail_equal_a_full_replay(
        initial in terms(),
        ops in proptest::collection::vec(op(), 1..80),
        cut in 0usize..400,
        sizes in proptest::collection::vec(1usize..12, 1..6),
    ) {
        let commands = commands(&initial, &ops);
        let (whole, decided) = oracle(&commands);
        let events: Vec<Event> = decided.into_iter().filter_map(Result::ok).flatten().collect();
        let cut = cut % (events.len() + 1);
        // The snapshot: the core after the first `cut` events, and their facts as projected.
        let mut store = Store::default();
        project(&mut store, &events[..cut], &sizes);
        prop_assert_eq!(&store.core, &Partnership::replay(&events[..cut]).core());
        // The tail, from the snapshot on.
        project(&mut store, &events[cut..], &sizes);
        prop_assert_eq!(&store.core, &whole.core());
        prop_assert_eq!(&store.facts, whole.facts());
    }
}
