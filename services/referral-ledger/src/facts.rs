//! The keyed part of the partnerships' decision state in Postgres: purchase records (the
//! `commissions` lines), refunds seen, parked refunds, customer and period tallies. A batch loads
//! exactly the keys it names ([`tandem_domain::commission::record_keys`], then
//! [`Partnership::tally_keys`]) for all its partnerships at once, and writes back what changed,
//! with one statement per table whatever the batch's size or the partnerships' history.

// Row and column tuples here mirror the SQL statements' columns one to one.
#![allow(clippy::type_complexity)]

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use tandem_domain::commission::{
    CustomerTally, Facts, ParkedRefund, PeriodTally, PurchaseRecord, RecordKeys, TallyKeys,
};
use tandem_domain::ids::{PartnershipId, PurchaseId, ReferralId, RefundId};
use tandem_domain::money::{Currency, Money};

use crate::LedgerError;

/// Counts the SQL statements a batch sends: the engine's cost, asserted on by the history test.
#[derive(Debug, Default, Clone, Copy)]
pub struct Statements(pub usize);

impl Statements {
    pub fn add(&mut self) {
        self.0 += 1;
    }
}

/// Keys per partnership.
pub type Keyed<K> = HashMap<PartnershipId, K>;

/// Loads the records `keys` name: purchase records, refunds seen, parked refunds.
pub async fn load_records(
    connection: &mut PgConnection,
    keys: &Keyed<RecordKeys>,
    statements: &mut Statements,
) -> Result<Keyed<Facts>, LedgerError> {
    let mut facts: Keyed<Facts> = keys
        .keys()
        .map(|id| (id.clone(), Facts::default()))
        .collect();
    let (mut p_ids, mut purchase_ids) = (Vec::new(), Vec::new());
    let (mut r_ids, mut refund_ids) = (Vec::new(), Vec::new());
    for (partnership, keys) in keys {
        for purchase in &keys.purchases {
            p_ids.push(partnership.as_str());
            purchase_ids.push(purchase.as_str());
        }
        for refund in &keys.refunds {
            r_ids.push(partnership.as_str());
            refund_ids.push(refund.as_str());
        }
    }
    if !purchase_ids.is_empty() {
        type Row = (
            String,
            String,
            String,
            i64,
            String,
            i64,
            i64,
            i64,
            Option<DateTime<Utc>>,
            DateTime<Utc>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT c.partnership_id, c.purchase_id, c.referral_id, c.amount_minor, c.currency, c.commission_minor, \
             c.refunded_minor, c.reversed_minor, c.period_start, c.payable_at \
             FROM commissions c JOIN UNNEST($1::text[], $2::text[]) AS k(partnership_id, purchase_id) \
             ON c.partnership_id = k.partnership_id AND c.purchase_id = k.purchase_id",
        )
        .bind(&p_ids)
        .bind(&purchase_ids)
        .fetch_all(&mut *connection)
        .await?;
        statements.add();
        for (
            partnership,
            purchase,
            referral,
            amount,
            currency,
            commission,
            refunded,
            reversed,
            period_start,
            payable_at,
        ) in rows
        {
            let partnership = PartnershipId::parse("partnership_id", &partnership)?;
            if let Some(facts) = facts.get_mut(&partnership) {
                facts.purchases.insert(
                    PurchaseId::parse("purchase_id", &purchase)?,
                    PurchaseRecord {
                        referral_id: ReferralId::parse("referral_id", &referral)?,
                        amount: Money::new(amount, Currency::parse("currency", &currency)?),
                        commission_minor: commission,
                        refunded_minor: refunded,
                        reversed_minor: reversed,
                        period_start,
                        payable_at,
                    },
                );
            }
        }
        let rows: Vec<(String, String, String, i64, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT r.partnership_id, r.purchase_id, r.refund_id, r.amount_minor, r.currency, r.refunded_at \
             FROM parked_refunds r JOIN UNNEST($1::text[], $2::text[]) AS k(partnership_id, purchase_id) \
             ON r.partnership_id = k.partnership_id AND r.purchase_id = k.purchase_id \
             ORDER BY r.partnership_id, r.purchase_id, r.position",
        )
        .bind(&p_ids)
        .bind(&purchase_ids)
        .fetch_all(&mut *connection)
        .await?;
        statements.add();
        for (partnership, purchase, refund, amount, currency, refunded_at) in rows {
            let partnership = PartnershipId::parse("partnership_id", &partnership)?;
            if let Some(facts) = facts.get_mut(&partnership) {
                facts
                    .parked
                    .entry(PurchaseId::parse("purchase_id", &purchase)?)
                    .or_default()
                    .push(ParkedRefund {
                        refund_id: RefundId::parse("refund_id", &refund)?,
                        refund: Money::new(amount, Currency::parse("currency", &currency)?),
                        refunded_at,
                    });
            }
        }
    }
    if !refund_ids.is_empty() {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT r.partnership_id, r.refund_id FROM partnership_refunds r \
             JOIN UNNEST($1::text[], $2::text[]) AS k(partnership_id, refund_id) \
             ON r.partnership_id = k.partnership_id AND r.refund_id = k.refund_id",
        )
        .bind(&r_ids)
        .bind(&refund_ids)
        .fetch_all(&mut *connection)
        .await?;
        statements.add();
        for (partnership, refund) in rows {
            let partnership = PartnershipId::parse("partnership_id", &partnership)?;
            if let Some(facts) = facts.get_mut(&partnership) {
                facts.refunds.insert(RefundId::parse("refund_id", &refund)?);
            }
        }
    }
    Ok(facts)
}

/// Adds the tallies `keys` name to `facts`.
pub async fn load_tallies(
    connection: &mut PgConnection,
    keys: &Keyed<TallyKeys>,
    facts: &mut Keyed<Facts>,
    statements: &mut Statements,
) -> Result<(), LedgerError> {
    let (mut c_ids, mut referral_ids) = (Vec::new(), Vec::new());
    let (mut p_ids, mut period_starts) = (Vec::new(), Vec::new());
    for (partnership, keys) in keys {
        for referral in &keys.customers {
            c_ids.push(partnership.as_str());
            referral_ids.push(referral.as_str());
        }
        for start in &keys.periods {
            p_ids.push(partnership.as_str());
            period_starts.push(*start);
        }
    }
    if !referral_ids.is_empty() {
        let rows: Vec<(String, String, i32, Option<DateTime<Utc>>, i64)> = sqlx::query_as(
            "SELECT t.partnership_id, t.referral_id, t.purchases, t.first_purchase_at, t.commission_minor \
             FROM customer_tallies t JOIN UNNEST($1::text[], $2::text[]) AS k(partnership_id, referral_id) \
             ON t.partnership_id = k.partnership_id AND t.referral_id = k.referral_id",
        )
        .bind(&c_ids)
        .bind(&referral_ids)
        .fetch_all(&mut *connection)
        .await?;
        statements.add();
        for (partnership, referral, purchases, first_purchase_at, commission_minor) in rows {
            let partnership = PartnershipId::parse("partnership_id", &partnership)?;
            if let Some(facts) = facts.get_mut(&partnership) {
                facts.customers.insert(
                    ReferralId::parse("referral_id", &referral)?,
                    CustomerTally {
                        purchases: u32::try_from(purchases).unwrap_or(0),
                        first_purchase_at,
                        commission_minor,
                    },
                );
            }
        }
    }
    if !period_starts.is_empty() {
        let rows: Vec<(String, DateTime<Utc>, i64, i64)> = sqlx::query_as(
            "SELECT t.partnership_id, t.period_start, t.spend_minor, t.commission_minor \
             FROM period_tallies t JOIN UNNEST($1::text[], $2::timestamptz[]) AS k(partnership_id, period_start) \
             ON t.partnership_id = k.partnership_id AND t.period_start = k.period_start",
        )
        .bind(&p_ids)
        .bind(&period_starts)
        .fetch_all(&mut *connection)
        .await?;
        statements.add();
        for (partnership, start, spend_minor, commission_minor) in rows {
            let partnership = PartnershipId::parse("partnership_id", &partnership)?;
            if let Some(facts) = facts.get_mut(&partnership) {
                facts.periods.insert(
                    start,
                    PeriodTally {
                        spend_minor,
                        commission_minor,
                    },
                );
            }
        }
    }
    Ok(())
}

/// What changed between the facts a batch loaded and the facts after it, as rows to write.
#[derive(Debug, Default)]
pub struct FactWrites {
    customers: Vec<(String, String, i32, Option<DateTime<Utc>>, i64)>,
    periods: Vec<(String, DateTime<Utc>, i64, i64)>,
    refunds: Vec<(String, String)>,
    /// Purchases whose parked refunds are rewritten.
    parked_cleared: Vec<(String, String)>,
    parked: Vec<(String, String, i32, String, i64, String, DateTime<Utc>)>,
    /// Purchase records whose refunded and reversed amounts changed.
    purchases: Vec<(String, i64, i64)>,
}

impl FactWrites {
    /// Adds the difference for one partnership. `named` are the purchases the batch named (their
    /// parked refunds were loaded).
    pub fn diff(
        &mut self,
        partnership: &PartnershipId,
        loaded: &Facts,
        after: &Facts,
        named: &BTreeSet<PurchaseId>,
    ) {
        let id = partnership.as_str();
        for (referral, tally) in &after.customers {
            if loaded.customers.get(referral) != Some(tally) {
                self.customers.push((
                    id.to_owned(),
                    referral.to_string(),
                    i32::try_from(tally.purchases).unwrap_or(i32::MAX),
                    tally.first_purchase_at,
                    tally.commission_minor,
                ));
            }
        }
        for (start, tally) in &after.periods {
            if loaded.periods.get(start) != Some(tally) {
                self.periods.push((
                    id.to_owned(),
                    *start,
                    tally.spend_minor,
                    tally.commission_minor,
                ));
            }
        }
        for refund in after.refunds.difference(&loaded.refunds) {
            self.refunds.push((id.to_owned(), refund.to_string()));
        }
        let parked_of = |facts: &Facts| -> BTreeMap<PurchaseId, Vec<ParkedRefund>> {
            facts
                .parked
                .iter()
                .filter(|(purchase, _)| named.contains(*purchase))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let (before, now) = (parked_of(loaded), parked_of(after));
        for purchase in before.keys().chain(now.keys()) {
            if before.get(purchase) != now.get(purchase) {
                self.parked_cleared
                    .push((id.to_owned(), purchase.to_string()));
                for (position, parked) in now.get(purchase).into_iter().flatten().enumerate() {
                    self.parked.push((
                        id.to_owned(),
                        purchase.to_string(),
                        i32::try_from(position).unwrap_or(i32::MAX),
                        parked.refund_id.to_string(),
                        parked.refund.amount_minor,
                        parked.refund.currency.to_string(),
                        parked.refunded_at,
                    ));
                }
            }
        }
        for (purchase, record) in &after.purchases {
            let changed = loaded.purchases.get(purchase).map_or(
                record.refunded_minor != 0 || record.reversed_minor != 0,
                |before| {
                    before.refunded_minor != record.refunded_minor
                        || before.reversed_minor != record.reversed_minor
                },
            );
            if changed {
                self.purchases.push((
                    purchase.to_string(),
                    record.refunded_minor,
                    record.reversed_minor,
                ));
            }
        }
    }

    /// Writes everything, one statement per non-empty kind. Runs after the new commission lines
    /// are inserted (their refunds update them).
    pub async fn write(
        self,
        connection: &mut PgConnection,
        statements: &mut Statements,
    ) -> Result<(), LedgerError> {
        if !self.customers.is_empty() {
            let (a, b, c, d, e) = unzip5(self.customers);
            sqlx::query(
                "INSERT INTO customer_tallies (partnership_id, referral_id, purchases, first_purchase_at, commission_minor) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::int[], $4::timestamptz[], $5::bigint[]) \
                 ON CONFLICT (partnership_id, referral_id) DO UPDATE SET purchases = EXCLUDED.purchases, \
                 first_purchase_at = EXCLUDED.first_purchase_at, commission_minor = EXCLUDED.commission_minor",
            )
            .bind(a)
            .bind(b)
            .bind(c)
            .bind(d)
            .bind(e)
            .execute(&mut *connection)
            .await?;
            statements.add();
        }
        if !self.periods.is_empty() {
            let (a, b, c, d): (Vec<_>, Vec<_>, Vec<_>, Vec<_>) = self.periods.into_iter().fold(
                Default::default(),
                |(mut a, mut b, mut c, mut d): (Vec<_>, Vec<_>, Vec<_>, Vec<_>), row| {
                    a.push(row.0);
                    b.push(row.1);
                    c.push(row.2);
                    d.push(row.3);
                    (a, b, c, d)
                },
            );
            sqlx::query(
                "INSERT INTO period_tallies (partnership_id, period_start, spend_minor, commission_minor) \
                 SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::bigint[], $4::bigint[]) \
                 ON CONFLICT (partnership_id, period_start) DO UPDATE SET spend_minor = EXCLUDED.spend_minor, \
                 commission_minor = EXCLUDED.commission_minor",
            )
            .bind(a)
            .bind(b)
            .bind(c)
            .bind(d)
            .execute(&mut *connection)
            .await?;
            statements.add();
        }
        if !self.refunds.is_empty() {
            let (a, b): (Vec<_>, Vec<_>) = self.refunds.into_iter().unzip();
            sqlx::query(
                "INSERT INTO partnership_refunds (partnership_id, refund_id) \
                 SELECT * FROM UNNEST($1::text[], $2::text[]) ON CONFLICT DO NOTHING",
            )
            .bind(a)
            .bind(b)
            .execute(&mut *connection)
            .await?;
            statements.add();
        }
        if !self.parked_cleared.is_empty() {
            let (a, b): (Vec<_>, Vec<_>) = self.parked_cleared.into_iter().unzip();
            sqlx::query(
                "DELETE FROM parked_refunds r USING UNNEST($1::text[], $2::text[]) AS k(partnership_id, purchase_id) \
                 WHERE r.partnership_id = k.partnership_id AND r.purchase_id = k.purchase_id",
            )
            .bind(a)
            .bind(b)
            .execute(&mut *connection)
            .await?;
            statements.add();
        }
        if !self.parked.is_empty() {
            let mut columns: (
                Vec<String>,
                Vec<String>,
                Vec<i32>,
                Vec<String>,
                Vec<i64>,
                Vec<String>,
                Vec<DateTime<Utc>>,
            ) = Default::default();
            for (a, b, c, d, e, f, g) in self.parked {
                columns.0.push(a);
                columns.1.push(b);
                columns.2.push(c);
                columns.3.push(d);
                columns.4.push(e);
                columns.5.push(f);
                columns.6.push(g);
            }
            sqlx::query(
                "INSERT INTO parked_refunds (partnership_id, purchase_id, position, refund_id, amount_minor, currency, refunded_at) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::int[], $4::text[], $5::bigint[], $6::text[], $7::timestamptz[])",
            )
            .bind(columns.0)
            .bind(columns.1)
            .bind(columns.2)
            .bind(columns.3)
            .bind(columns.4)
            .bind(columns.5)
            .bind(columns.6)
            .execute(&mut *connection)
            .await?;
            statements.add();
        }
        if !self.purchases.is_empty() {
            let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
            for (purchase, refunded, reversed) in self.purchases {
                a.push(purchase);
                b.push(refunded);
                c.push(reversed);
            }
            sqlx::query(
                "UPDATE commissions c SET refunded_minor = k.refunded, reversed_minor = k.reversed \
                 FROM UNNEST($1::text[], $2::bigint[], $3::bigint[]) AS k(purchase_id, refunded, reversed) \
                 WHERE c.purchase_id = k.purchase_id",
            )
            .bind(a)
            .bind(b)
            .bind(c)
            .execute(&mut *connection)
            .await?;
            statements.add();
        }
        Ok(())
    }
}

type Columns5<A, B, C, D, E> = (Vec<A>, Vec<B>, Vec<C>, Vec<D>, Vec<E>);

fn unzip5<A, B, C, D, E>(rows: Vec<(A, B, C, D, E)>) -> Columns5<A, B, C, D, E> {
    let mut columns: Columns5<A, B, C, D, E> = Default::default();
    for (a, b, c, d, e) in rows {
        columns.0.push(a);
        columns.1.push(b);
        columns.2.push(c);
        columns.3.push(d);
        columns.4.push(e);
    }
    columns
}
