//! Settlement's money counter: `tandem.commission.settled` (`{minor_unit}`, per currency), what
//! closed cycles settled in favour of merchants before netting (the receivable totals of the
//! statements a closure issued; a commission is receivable for its referrer, a claw-back for its
//! acceptor), counted once when the closure commits. With the ledger's
//! `tandem.commission.accrued` and `tandem.commission.reversed` a dashboard follows money from
//! accrual to settlement.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use opentelemetry::metrics::Counter;
use opentelemetry::KeyValue;

fn counter() -> &'static Counter<u64> {
    static SETTLED: OnceLock<Counter<u64>> = OnceLock::new();
    SETTLED.get_or_init(|| {
        tandem_telemetry::meter()
            .u64_counter("tandem.commission.settled")
            .with_unit("{minor_unit}")
            .with_description("Receivable totals of the statements closed cycles issued (settled before netting), in minor units, per currency.")
            .build()
    })
}

/// Counts what a committed closure settled.
pub(crate) fn settled(per_currency: &BTreeMap<String, i64>) {
    for (currency, amount) in per_currency {
        if let Ok(amount) = u64::try_from(*amount) {
            counter().add(amount, &[KeyValue::new("currency", currency.clone())]);
        }
    }
}
