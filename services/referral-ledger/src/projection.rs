//! What one partnership-stream event changes in the commission stage's projections: commission
//! lines, the double-entry ledger, payable timers, and (for terms events) the terms projection.
//! Used by the live engine and by [`crate::book::rebuild_projections`] alike, so a rebuild
//! equals the live projections. Rows are collected for a whole batch and written with one
//! statement per table.

// Row and column tuples here mirror the SQL statements' columns one to one.
#![allow(clippy::type_complexity)]

use chrono::{DateTime, Utc};
use prost::Message;
use sqlx::PgConnection;
use tandem_codec::{calculation_to_proto, reason_to_proto, terms_to_proto};
use tandem_domain::commission::{Event, Partnership};
use tandem_domain::ids::PartnershipId;
use tandem_domain::ledger::Entry;

use crate::facts::Statements;
use crate::LedgerError;

/// A new commission line, from `CommissionAccrued` or `CommissionNotEarned`.
#[derive(Debug)]
struct Line {
    purchase_id: String,
    partnership_id: String,
    referral_id: String,
    referrer: String,
    acceptor: String,
    terms_version: i32,
    rule: &'static str,
    amount_minor: i64,
    currency: String,
    commission_minor: i64,
    purchased_at: DateTime<Utc>,
    period_start: Option<DateTime<Utc>>,
    payable_at: DateTime<Utc>,
    not_earned_reason: Option<&'static str>,
    calculation: Option<Vec<u8>>,
    recorded_at: DateTime<Utc>,
    decision_sequence: i32,
}

/// Rows a batch writes to the projections.
#[derive(Debug, Default)]
pub struct Projection {
    lines: Vec<Line>,
    entries: Vec<(
        String,
        String,
        &'static str,
        String,
        String,
        DateTime<Utc>,
        DateTime<Utc>,
    )>,
    postings: Vec<(String, &'static str, String, String, i64)>,
    timers: Vec<(String, String, DateTime<Utc>, Vec<(String, String)>)>,
    terms: Vec<(PartnershipId, Event)>,
}

impl Projection {
    /// Projects `event` (sequence `sequence` of the stream); `before` is the partnership before
    /// it and must hold the purchase record a refund names.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        partnership_id: &PartnershipId,
        before: &Partnership,
        event: &Event,
        sequence: i32,
        recorded_at: DateTime<Utc>,
        headers: &[(String, String)],
    ) -> Result<(), LedgerError> {
        let id = partnership_id.to_string();
        if Partnership::changes_core(event) {
            self.terms.push((partnership_id.clone(), event.clone()));
            return Ok(());
        }
        let entry = before.ledger_entry(event)?;
        let parties = || {
            before
                .parties()
                .map(|(r, a)| (r.to_string(), a.to_string()))
                .ok_or(LedgerError::Invariant(
                    "commission on a partnership without parties",
                ))
        };
        match event {
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
            } => {
                let (referrer, acceptor) = parties()?;
                self.lines.push(Line {
                    purchase_id: purchase_id.to_string(),
                    partnership_id: id.clone(),
                    referral_id: referral_id.to_string(),
                    referrer,
                    acceptor,
                    terms_version: i32::try_from(*terms_version).unwrap_or(i32::MAX),
                    rule: calculation.rule,
                    amount_minor: amount.amount_minor,
                    currency: amount.currency.to_string(),
                    commission_minor: commission.amount_minor,
                    purchased_at: *purchased_at,
                    period_start: Some(*period_start),
                    payable_at: *payable_at,
                    not_earned_reason: None,
                    calculation: Some(calculation_to_proto(calculation).encode_to_vec()),
                    recorded_at,
                    decision_sequence: sequence,
                });
                if let Some(entry) = entry {
                    self.post(
                        &id,
                        format!("accrual/{purchase_id}"),
                        "commission_accrual",
                        purchase_id.to_string(),
                        *payable_at,
                        &entry,
                        recorded_at,
                    );
                    self.timers.push((
                        purchase_id.to_string(),
                        id.clone(),
                        *payable_at,
                        headers.to_vec(),
                    ));
                }
            }
            Event::CommissionNotEarned {
                purchase_id,
                referral_id,
                terms_version,
                amount,
                purchased_at,
                reason,
            } => {
                let (referrer, acceptor) = parties()?;
                let rule = terms_version
                    .and_then(|v| before.versions().iter().find(|t| t.version == v))
                    .map_or("none", |v| v.terms.rule.name());
                self.lines.push(Line {
                    purchase_id: purchase_id.to_string(),
                    partnership_id: id.clone(),
                    referral_id: referral_id.to_string(),
                    referrer,
                    acceptor,
                    terms_version: terms_version
                        .map_or(0, |v| i32::try_from(v).unwrap_or(i32::MAX)),
                    rule,
                    amount_minor: amount.amount_minor,
                    currency: amount.currency.to_string(),
                    commission_minor: 0,
                    purchased_at: *purchased_at,
                    period_start: None,
                    payable_at: *purchased_at,
                    not_earned_reason: Some(reason_to_proto(reason).0),
                    calculation: None,
                    recorded_at,
                    decision_sequence: sequence,
                });
            }
            Event::RefundApplied {
                refund_id,
                purchase_id,
                refunded_at,
                within_holding_period,
                ..
            } => {
                if let Some(entry) = entry {
                    // A reversal inside the holding period reduces what is accrued; after it,
                    // what is payable.
                    let payable_at = before
                        .purchase(purchase_id)
                        .map_or(*refunded_at, |record| record.payable_at);
                    let effective = if *within_holding_period {
                        payable_at
                    } else {
                        *refunded_at
                    };
                    self.post(
                        &id,
                        format!("reversal/{refund_id}"),
                        "commission_reversal",
                        purchase_id.to_string(),
                        effective,
                        &entry,
                        recorded_at,
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn post(
        &mut self,
        partnership_id: &str,
        entry_id: String,
        kind: &'static str,
        purchase_id: String,
        payable_at: DateTime<Utc>,
        entry: &Entry,
        recorded_at: DateTime<Utc>,
    ) {
        let currency = entry.currency().to_string();
        for posting in entry.postings() {
            self.postings.push((
                entry_id.clone(),
                posting.account.as_str(),
                posting.merchant.to_string(),
                currency.clone(),
                posting.amount_minor,
            ));
        }
        self.entries.push((
            entry_id,
            partnership_id.to_owned(),
            kind,
            purchase_id,
            currency,
            payable_at,
            recorded_at,
        ));
    }

    /// Writes the rows: one statement per non-empty table (terms events, rare, one each).
    /// Commission lines go first: the refund updates of the same batch apply to them.
    pub async fn write(
        self,
        connection: &mut PgConnection,
        timers: bool,
        statements: &mut Statements,
    ) -> Result<(), LedgerError> {
        for (partnership_id, event) in &self.terms {
            project_terms(connection, partnership_id, event).await?;
            statements.add();
        }
        if !self.lines.is_empty() {
            let mut c = LineColumns::default();
            for line in self.lines {
                c.push(line);
            }
            sqlx::query(
                "INSERT INTO commissions (purchase_id, partnership_id, referral_id, referrer_merchant_id, acceptor_merchant_id, \
                 terms_version, rule, amount_minor, currency, commission_minor, purchased_at, period_start, payable_at, \
                 not_earned_reason, calculation, recorded_at, decision_sequence) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[], $7::text[], \
                 $8::bigint[], $9::text[], $10::bigint[], $11::timestamptz[], $12::timestamptz[], $13::timestamptz[], \
                 $14::text[], $15::bytea[], $16::timestamptz[], $17::int[])",
            )
            .bind(c.purchase_id)
            .bind(c.partnership_id)
            .bind(c.referral_id)
            .bind(c.referrer)
            .bind(c.acceptor)
            .bind(c.terms_version)
            .bind(c.rule)
            .bind(c.amount_minor)
            .bind(c.currency)
            .bind(c.commission_minor)
            .bind(c.purchased_at)
            .bind(c.period_start)
            .bind(c.payable_at)
            .bind(c.not_earned_reason)
            .bind(c.calculation)
            .bind(c.recorded_at)
            .bind(c.decision_sequence)
            .execute(&mut *connection)
            .await?;
            statements.add();
        }
        if !self.entries.is_empty() {
            let mut c: (
                Vec<String>,
                Vec<String>,
                Vec<&str>,
                Vec<String>,
                Vec<String>,
                Vec<DateTime<Utc>>,
                Vec<DateTime<Utc>>,
            ) = Default::default();
            for (a, b, k, d, e, f, g) in self.entries {
                c.0.push(a);
                c.1.push(b);
                c.2.push(k);
                c.3.push(d);
                c.4.push(e);
                c.5.push(f);
                c.6.push(g);
            }
            sqlx::query(
                "INSERT INTO ledger_entries (entry_id, partnership_id, kind, purchase_id, currency, payable_at, recorded_at) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::timestamptz[])",
            )
            .bind(c.0)
            .bind(c.1)
            .bind(c.2)
            .bind(c.3)
            .bind(c.4)
            .bind(c.5)
            .bind(c.6)
            .execute(&mut *connection)
            .await?;
            statements.add();
            let mut p: (Vec<String>, Vec<&str>, Vec<String>, Vec<String>, Vec<i64>) =
                Default::default();
            for (a, b, m, d, e) in self.postings {
                p.0.push(a);
                p.1.push(b);
                p.2.push(m);
                p.3.push(d);
                p.4.push(e);
            }
            sqlx::query(
                "INSERT INTO ledger_postings (entry_id, account, merchant_id, currency, amount_minor) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])",
            )
            .bind(p.0)
            .bind(p.1)
            .bind(p.2)
            .bind(p.3)
            .bind(p.4)
            .execute(&mut *connection)
            .await?;
            statements.add();
        }
        if timers && !self.timers.is_empty() {
            // Headers travel as one text per timer (`name=value` lines): UNNEST cannot carry
            // arrays of arrays.
            let mut c: (Vec<String>, Vec<String>, Vec<DateTime<Utc>>, Vec<String>) =
                Default::default();
            for (a, b, d, headers) in self.timers {
                c.0.push(a);
                c.1.push(b);
                c.2.push(d);
                c.3.push(
                    headers
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join("\n"),
                );
            }
            sqlx::query(
                "INSERT INTO payable_timers (purchase_id, partnership_id, payable_at, header_names, header_values) \
                 SELECT k.purchase_id, k.partnership_id, k.payable_at, \
                   ARRAY(SELECT split_part(h, '=', 1) FROM unnest(string_to_array(k.headers, E'\\n')) h WHERE h <> ''), \
                   ARRAY(SELECT substr(h, strpos(h, '=') + 1) FROM unnest(string_to_array(k.headers, E'\\n')) h WHERE h <> '') \
                 FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::text[]) AS k(purchase_id, partnership_id, payable_at, headers) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(c.0)
            .bind(c.1)
            .bind(c.2)
            .bind(c.3)
            .execute(&mut *connection)
            .await?;
            statements.add();
        }
        Ok(())
    }
}

#[derive(Default)]
struct LineColumns {
    purchase_id: Vec<String>,
    partnership_id: Vec<String>,
    referral_id: Vec<String>,
    referrer: Vec<String>,
    acceptor: Vec<String>,
    terms_version: Vec<i32>,
    rule: Vec<&'static str>,
    amount_minor: Vec<i64>,
    currency: Vec<String>,
    commission_minor: Vec<i64>,
    purchased_at: Vec<DateTime<Utc>>,
    period_start: Vec<Option<DateTime<Utc>>>,
    payable_at: Vec<DateTime<Utc>>,
    not_earned_reason: Vec<Option<&'static str>>,
    calculation: Vec<Option<Vec<u8>>>,
    recorded_at: Vec<DateTime<Utc>>,
    decision_sequence: Vec<i32>,
}

impl LineColumns {
    fn push(&mut self, line: Line) {
        self.purchase_id.push(line.purchase_id);
        self.partnership_id.push(line.partnership_id);
        self.referral_id.push(line.referral_id);
        self.referrer.push(line.referrer);
        self.acceptor.push(line.acceptor);
        self.terms_version.push(line.terms_version);
        self.rule.push(line.rule);
        self.amount_minor.push(line.amount_minor);
        self.currency.push(line.currency);
        self.commission_minor.push(line.commission_minor);
        self.purchased_at.push(line.purchased_at);
        self.period_start.push(line.period_start);
        self.payable_at.push(line.payable_at);
        self.not_earned_reason.push(line.not_earned_reason);
        self.calculation.push(line.calculation);
        self.recorded_at.push(line.recorded_at);
        self.decision_sequence.push(line.decision_sequence);
    }
}

/// Projects one terms event into `partnerships` and `partnership_versions`. The attribution
/// stage does this as it reads the admin topic; a rebuild does it from the streams.
pub async fn project_terms(
    connection: &mut PgConnection,
    partnership_id: &PartnershipId,
    event: &Event,
) -> Result<(), LedgerError> {
    let id = partnership_id.as_str();
    match event {
        Event::TermsProposed {
            version,
            referrer,
            acceptor,
            proposed_by,
            terms,
            effective_from,
        } => {
            sqlx::query(
                "INSERT INTO partnerships (partnership_id, referrer_merchant_id, acceptor_merchant_id) VALUES ($1, $2, $3) \
                 ON CONFLICT (partnership_id) DO NOTHING",
            )
            .bind(id)
            .bind(referrer.as_str())
            .bind(acceptor.as_str())
            .execute(&mut *connection)
            .await?;
            sqlx::query(
                "INSERT INTO partnership_versions (partnership_id, version, proposed_by, terms, effective_from) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (partnership_id, version) DO NOTHING",
            )
            .bind(id)
            .bind(i32::try_from(*version).unwrap_or(i32::MAX))
            .bind(proposed_by.as_str())
            .bind(terms_to_proto(terms).encode_to_vec())
            .bind(effective_from)
            .execute(&mut *connection)
            .await?;
        }
        Event::TermsAccepted {
            version,
            accepted_by,
            effective_from,
        } => {
            sqlx::query("UPDATE partnership_versions SET accepted_by = $3, effective_from = $4 WHERE partnership_id = $1 AND version = $2")
                .bind(id)
                .bind(i32::try_from(*version).unwrap_or(i32::MAX))
                .bind(accepted_by.as_str())
                .bind(effective_from)
                .execute(&mut *connection)
                .await?;
        }
        Event::Terminated { at, .. } => {
            sqlx::query("UPDATE partnerships SET terminated_at = $2 WHERE partnership_id = $1")
                .bind(id)
                .bind(at)
                .execute(&mut *connection)
                .await?;
        }
        _ => {}
    }
    Ok(())
}
