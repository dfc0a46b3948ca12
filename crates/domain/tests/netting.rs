//! Netting, on random cycles: positions sum to zero per currency, every merchant's transfers equal
//! its net position, the transfers stay within (non-zero positions − 1) per currency, nobody is
//! paid below its minimum, and carry-forward never loses a cent (settled and carried lines are
//! exactly the lines given).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use proptest::prelude::*;
use tandem_domain::ids::MerchantId;
use tandem_domain::money::Currency;
use tandem_domain::settlement::{net, Line};

#[derive(Debug, Clone, PartialEq, Eq)]
struct TestLine {
    id: usize,
    payer: MerchantId,
    payee: MerchantId,
    currency: Currency,
    amount: i64,
}

impl Line for TestLine {
    fn payer(&self) -> &MerchantId {
        &self.payer
    }
    fn payee(&self) -> &MerchantId {
        &self.payee
    }
    fn currency(&self) -> Currency {
        self.currency
    }
    fn amount_minor(&self) -> i64 {
        self.amount
    }
}

fn merchant(index: usize) -> MerchantId {
    MerchantId::from_uuid(uuid::Uuid::from_u128(index as u128 + 1))
}

fn cycle() -> impl Strategy<Value = (Vec<TestLine>, Vec<i64>)> {
    let line = (0usize..8, 0usize..8, 0usize..2, -50_000i64..1_000_000);
    (
        proptest::collection::vec(line, 0..60),
        proptest::collection::vec(prop_oneof![Just(0i64), 1i64..500_000], 8),
    )
        .prop_map(|(raw, minimums)| {
            let currencies = [
                Currency::parse("c", "EUR").unwrap(),
                Currency::parse("c", "USD").unwrap(),
            ];
            let lines = raw
                .into_iter()
                .enumerate()
                .filter(|(_, (payer, payee, _, amount))| payer != payee && *amount != 0)
                .map(|(id, (payer, payee, currency, amount))| TestLine {
                    id,
                    payer: merchant(payer),
                    payee: merchant(payee),
                    currency: currencies[currency],
                    amount,
                })
                .collect();
            (lines, minimums)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn netting_clears_every_position_within_the_bound_and_loses_nothing((lines, minimums) in cycle()) {
        let minimum_of = |m: &MerchantId, _c: Currency| {
            let index = (0..8).find(|i| merchant(*i) == *m).unwrap();
            minimums[index]
        };
        let netting = net(lines.clone(), minimum_of);

        // Carry-forward never loses a cent: the settled and carried lines are the lines given.
        let mut back: Vec<TestLine> = netting.settled.clone();
        back.extend(netting.carried.iter().map(|(line, _)| line.clone()));
        back.sort_by_key(|l| l.id);
        prop_assert_eq!(&back, &lines);

        // Positions are those of the settled lines and sum to zero per currency.
        let mut sums: BTreeMap<Currency, i128> = BTreeMap::new();
        for ((currency, _), position) in &netting.positions {
            *sums.entry(*currency).or_default() += position;
        }
        prop_assert!(sums.values().all(|sum| *sum == 0), "{:?}", sums);

        // Nobody is paid less than its minimum.
        for ((currency, merchant), position) in &netting.positions {
            if *position > 0 {
                prop_assert!(*position >= i128::from(minimum_of(merchant, *currency)));
            }
        }

        // Each merchant's transfers equal its net position.
        let mut moved: BTreeMap<(Currency, MerchantId), i128> = BTreeMap::new();
        for transfer in &netting.transfers {
            prop_assert!(transfer.amount_minor > 0);
            prop_assert!(transfer.from != transfer.to);
            *moved.entry((transfer.currency, transfer.to.clone())).or_default() += transfer.amount_minor;
            *moved.entry((transfer.currency, transfer.from.clone())).or_default() -= transfer.amount_minor;
        }
        moved.retain(|_, v| *v != 0);
        prop_assert_eq!(&moved, &netting.positions);

        // At most (non-zero positions − 1) transfers per currency.
        let mut nonzero: BTreeMap<Currency, usize> = BTreeMap::new();
        for (currency, _) in netting.positions.keys() {
            *nonzero.entry(*currency).or_default() += 1;
        }
        let mut count: BTreeMap<Currency, usize> = BTreeMap::new();
        for transfer in &netting.transfers {
            *count.entry(transfer.currency).or_default() += 1;
        }
        for (currency, transfers) in count {
            prop_assert!(transfers < nonzero[&currency], "{} transfers for {} positions", transfers, nonzero[&currency]);
        }

        // Every carried line names a merchant that takes part in it.
        for (line, holder) in &netting.carried {
            prop_assert!(*holder == line.payer || *holder == line.payee);
        }
    }
}
