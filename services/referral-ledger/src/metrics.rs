//! The ledger's money counters, per currency in minor units, counted from the ledger events a
//! transaction announced, once it committed: `tandem.commission.accrued` (the commission of
//! every attributed purchase) and `tandem.commission.reversed` (what refunds took back). With
//! settlement's `tandem.commission.settled` a dashboard follows money from accrual to settlement;
//! accrued − reversed is what the ledger's balances say merchants earned.
//!
//! `tandem.ledger.imbalance` (gauge, `{minor_unit}`, per currency): the sum of every posting of
//! the double-entry ledger, measured every minute; anything but 0 is a bug an alert must raise.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use opentelemetry::metrics::Counter;
use opentelemetry::KeyValue;
use prost::Message as _;
use tandem_proto::v1 as pb;
use tandem_store::OutboxMessage;

struct Money {
    accrued: Counter<u64>,
    reversed: Counter<u64>,
}

fn money() -> &'static Money {
    static MONEY: OnceLock<Money> = OnceLock::new();
    MONEY.get_or_init(|| {
        let meter = tandem_telemetry::meter();
        Money {
            accrued: meter
                .u64_counter("tandem.commission.accrued")
                .with_unit("{minor_unit}")
                .with_description(
                    "Commission of attributed purchases, in minor units, per currency.",
                )
                .build(),
            reversed: meter
                .u64_counter("tandem.commission.reversed")
                .with_unit("{minor_unit}")
                .with_description("Commission taken back by refunds, in minor units, per currency.")
                .build(),
        }
    })
}

/// Counts the money in the ledger events of `messages` (call it after their transaction
/// committed).
pub(crate) fn count_committed(messages: &[OutboxMessage]) {
    let ledger = tandem_bus::Topic::Ledger.logical_name();
    let mut accrued: BTreeMap<String, u64> = BTreeMap::new();
    let mut reversed: BTreeMap<String, u64> = BTreeMap::new();
    for message in messages.iter().filter(|m| m.topic == ledger) {
        let Ok(event) = pb::LedgerEvent::decode(message.payload.as_slice()) else {
            continue;
        };
        let (into, amount) = match &event.event {
            Some(pb::ledger_event::Event::PurchaseAttributed(attributed)) => {
                (&mut accrued, attributed.commission.as_ref())
            }
            Some(pb::ledger_event::Event::CommissionReversed(reversal)) => {
                (&mut reversed, reversal.reversal.as_ref())
            }
            _ => continue,
        };
        if let Some(amount) = amount {
            *into.entry(amount.currency.clone()).or_default() += amount.amount_minor.unsigned_abs();
        }
    }
    for (counter, totals) in [(&money().accrued, accrued), (&money().reversed, reversed)] {
        for (currency, minor) in totals {
            counter.add(minor, &[KeyValue::new("currency", currency)]);
        }
    }
}

/// Measures `tandem.ledger.imbalance` every minute until `shutdown` (a full pass over the
/// postings: about a second per ten million rows).
pub async fn run_balance_check(pool: sqlx::PgPool, shutdown: tokio_util::sync::CancellationToken) {
    let gauge = tandem_telemetry::meter()
        .i64_gauge("tandem.ledger.imbalance")
        .with_unit("{minor_unit}")
        .with_description(
            "Sum of every ledger posting per currency: 0 when the double-entry ledger balances.",
        )
        .build();
    loop {
        let sums: Result<Vec<(String, i64)>, sqlx::Error> = sqlx::query_as(
            "SELECT currency, coalesce(sum(amount_minor), 0)::bigint FROM ledger_postings GROUP BY currency",
        )
        .fetch_all(&pool)
        .await;
        match sums {
            Ok(sums) => {
                for (currency, sum) in sums {
                    if sum != 0 {
                        tracing::error!(%currency, imbalance_minor = sum, "the ledger does not balance");
                    }
                    gauge.record(sum, &[KeyValue::new("currency", currency)]);
                }
            }
            Err(error) => tracing::warn!(error = %error, "could not measure the ledger's balance"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
        }
    }
}
