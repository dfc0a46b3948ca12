//! Corrections: an operator corrects an issued statement with an adjustment between the two
//! merchants of one of its partnerships. Issued statements never change. The correction adds one
//! adjustment line (kind `adjustment`, the reason in place of the rule, payable now) that the next
//! closure of the partnership's kind and zone settles like any other line, and issues at once a
//! correction statement that names the corrected one, showing the adjustment carried forward; the
//! counterparty gets one too, naming its own statement of the cycle, if it has one.
//!
//! A correction is numbered with the closures (one sequence), so a rebuild replays both in the
//! order they happened and every statement keeps its number.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder};
use tandem_domain::ids::{MerchantId, PartnershipId};
use tandem_domain::money::Money;
use tandem_domain::statement::{LineKind, LineStatus, Statement, StatementLine};
use tandem_proto::time::timestamp;
use tandem_proto::v1 as pb;

use crate::close::{announcement_id, settlement_message, totals_json, totals_to_proto, CLOSING};
use crate::intake::INTAKE_LOCK;
use crate::SettlementError;

/// A validated correction request.
#[derive(Debug, Clone)]
pub struct CorrectionRequest {
    pub idempotency_key: String,
    pub merchant_id: MerchantId,
    pub statement_number: i32,
    pub partnership_id: PartnershipId,
    pub amount: Money,
    pub reason: String,
}

impl CorrectionRequest {
    fn digest(&self) -> String {
        hex::encode(Sha256::digest(
            format!(
                "{}\n{}\n{}\n{}\n{}\n{}",
                self.merchant_id,
                self.statement_number,
                self.partnership_id,
                self.amount.amount_minor,
                self.amount.currency,
                self.reason
            )
            .as_bytes(),
        ))
    }
}

/// Why a correction cannot be issued.
#[derive(Debug, thiserror::Error)]
pub enum CorrectionRefused {
    #[error("merchant {merchant} has no statement number {number}")]
    NoStatement { merchant: String, number: i32 },
    #[error("settlement knows no partnership {0}")]
    NoPartnership(String),
    #[error("partnership {partnership} is not one of merchant {merchant}'s: the adjustment must be between the statement's merchant and a partner")]
    NotAParty {
        partnership: String,
        merchant: String,
    },
    #[error("amount: partnership {partnership} settles in {expected}, not {given}")]
    Currency {
        partnership: String,
        expected: String,
        given: String,
    },
    #[error("idempotency key {0:?} was used for another correction; send a new key for a new correction")]
    KeyReused(String),
}

/// What a correction issued.
pub struct Corrected {
    pub statements: Vec<(String, i32)>,
    pub created_now: bool,
}

/// A recorded correction: what projecting it needs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Correction {
    pub closure: i64,
    pub cycle: String,
    pub merchant_id: String,
    pub statement_number: i32,
    pub line_id: String,
    pub issued_at: DateTime<Utc>,
}

/// Issues `request` at `now`, or answers what the same request issued before.
pub async fn issue(
    pool: &PgPool,
    request: &CorrectionRequest,
    now: DateTime<Utc>,
    outbox_written: &tokio::sync::Notify,
) -> Result<Result<Corrected, CorrectionRefused>, SettlementError> {
    let _closing = CLOSING.lock().await;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(INTAKE_LOCK)
        .execute(&mut *tx)
        .await?;
    let digest = request.digest();
    let earlier: Option<(i64, String)> = sqlx::query_as(
        "SELECT closure, request_digest FROM corrections WHERE idempotency_key = $1",
    )
    .bind(&request.idempotency_key)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((closure, earlier_digest)) = earlier {
        if earlier_digest != digest {
            return Ok(Err(CorrectionRefused::KeyReused(
                request.idempotency_key.clone(),
            )));
        }
        let statements = issued_by(&mut tx, closure).await?;
        return Ok(Ok(Corrected {
            statements,
            created_now: false,
        }));
    }
    let merchant = request.merchant_id.as_str();
    let cycle: Option<String> =
        sqlx::query_scalar("SELECT cycle FROM statements WHERE merchant_id = $1 AND number = $2")
            .bind(merchant)
            .bind(request.statement_number)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(cycle) = cycle else {
        return Ok(Err(CorrectionRefused::NoStatement {
            merchant: merchant.to_owned(),
            number: request.statement_number,
        }));
    };
    let terms: Option<(i32, String, String, String)> = sqlx::query_as(
        "SELECT terms_version, referrer_merchant_id, acceptor_merchant_id, currency FROM partnership_terms \
         WHERE partnership_id = $1 ORDER BY terms_version DESC LIMIT 1",
    )
    .bind(request.partnership_id.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let Some((terms_version, referrer, acceptor, currency)) = terms else {
        return Ok(Err(CorrectionRefused::NoPartnership(
            request.partnership_id.to_string(),
        )));
    };
    if referrer != merchant && acceptor != merchant {
        return Ok(Err(CorrectionRefused::NotAParty {
            partnership: request.partnership_id.to_string(),
            merchant: merchant.to_owned(),
        }));
    }
    if currency != request.amount.currency.as_str() {
        return Ok(Err(CorrectionRefused::Currency {
            partnership: request.partnership_id.to_string(),
            expected: currency,
            given: request.amount.currency.to_string(),
        }));
    }
    let closure: i64 = sqlx::query_scalar(
        "SELECT greatest((SELECT coalesce(max(closure), 0) FROM cycle_closures), \
                         (SELECT coalesce(max(closure), 0) FROM corrections)) + 1",
    )
    .fetch_one(&mut *tx)
    .await?;
    let issued_at = tandem_proto::time::truncate_to_micros(now);
    let line_id = format!("adjustment:{closure}");
    sqlx::query(
        "INSERT INTO lines (line_id, kind, partnership_id, terms_version, referrer_merchant_id, acceptor_merchant_id, \
           purchase_id, refund_id, transaction_id, referral_id, referrer_reference, base_amount_minor, amount_minor, \
           currency, payable_at, note) \
         VALUES ($1, 'adjustment', $2, $3, $4, $5, '', NULL, '', '', '', 0, $6, $7, $8, $9)",
    )
    .bind(&line_id)
    .bind(request.partnership_id.as_str())
    .bind(terms_version)
    .bind(&referrer)
    .bind(&acceptor)
    .bind(request.amount.amount_minor)
    .bind(request.amount.currency.as_str())
    .bind(issued_at)
    .bind(&request.reason)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO corrections (closure, idempotency_key, request_digest, cycle, merchant_id, statement_number, line_id, issued_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(closure)
    .bind(&request.idempotency_key)
    .bind(&digest)
    .bind(&cycle)
    .bind(merchant)
    .bind(request.statement_number)
    .bind(&line_id)
    .bind(issued_at)
    .execute(&mut *tx)
    .await?;
    let correction = Correction {
        closure,
        cycle,
        merchant_id: merchant.to_owned(),
        statement_number: request.statement_number,
        line_id,
        issued_at,
    };
    let statements = project(&mut tx, &correction, true).await?;
    tx.commit().await?;
    outbox_written.notify_one();
    tracing::info!(
        correction = closure,
        cycle = %correction.cycle,
        statements = statements.len(),
        "statement corrected"
    );
    Ok(Ok(Corrected {
        statements,
        created_now: true,
    }))
}

/// The statements (merchant, number) a correction issued.
async fn issued_by(
    tx: &mut PgConnection,
    closure: i64,
) -> Result<Vec<(String, i32)>, SettlementError> {
    Ok(sqlx::query_as(
        "SELECT merchant_id, number FROM statements WHERE correction = $1 ORDER BY merchant_id",
    )
    .bind(closure)
    .fetch_all(&mut *tx)
    .await?)
}

/// The adjustment line of a correction, from `merchant`'s side, carried forward.
pub(crate) async fn adjustment_line(
    connection: &mut PgConnection,
    line_id: &str,
    merchant: &str,
) -> Result<StatementLine, SettlementError> {
    type Row = (
        String,
        i32,
        String,
        String,
        i64,
        String,
        DateTime<Utc>,
        Option<String>,
    );
    let (partnership, version, referrer, acceptor, amount, currency, payable_at, note): Row =
        sqlx::query_as(
            "SELECT partnership_id, terms_version, referrer_merchant_id, acceptor_merchant_id, amount_minor, currency, \
               payable_at, note FROM lines WHERE line_id = $1",
        )
        .bind(line_id)
        .fetch_one(&mut *connection)
        .await?;
    let as_referrer = referrer == merchant;
    Ok(StatementLine {
        kind: LineKind::Adjustment,
        status: LineStatus::CarriedForward,
        counterparty: MerchantId::parse(
            "counterparty",
            if as_referrer { &acceptor } else { &referrer },
        )?,
        partnership_id: PartnershipId::parse("partnership_id", &partnership)?,
        terms_version: u32::try_from(version).unwrap_or(0),
        rule: note.unwrap_or_default(),
        purchase_id: String::new(),
        refund_id: None,
        transaction_id: String::new(),
        referral_id: String::new(),
        referrer_reference: String::new(),
        payable_at,
        currency: tandem_domain::money::Currency::parse("currency", &currency)?,
        purchase_amount_minor: 0,
        amount_minor: if as_referrer { amount } else { -amount },
    })
}

/// Issues a correction's statements: the corrected merchant's, naming the corrected statement,
/// and the counterparty's, naming its statement of the same cycle, if it has one.
pub(crate) async fn project(
    tx: &mut PgConnection,
    correction: &Correction,
    announce: bool,
) -> Result<Vec<(String, i32)>, SettlementError> {
    let (referrer, acceptor): (String, String) = sqlx::query_as(
        "SELECT referrer_merchant_id, acceptor_merchant_id FROM lines WHERE line_id = $1",
    )
    .bind(&correction.line_id)
    .fetch_one(&mut *tx)
    .await?;
    let counterparty = if referrer == correction.merchant_id {
        acceptor
    } else {
        referrer
    };
    let counterparty_statement: Option<i32> = sqlx::query_scalar(
        "SELECT number FROM statements WHERE cycle = $1 AND merchant_id = $2 AND corrects_number IS NULL",
    )
    .bind(&correction.cycle)
    .bind(&counterparty)
    .fetch_optional(&mut *tx)
    .await?;
    let cut_off: DateTime<Utc> =
        sqlx::query_scalar("SELECT cut_off FROM cycle_closures WHERE cycle = $1")
            .bind(&correction.cycle)
            .fetch_one(&mut *tx)
            .await?;
    let mut targets = vec![(correction.merchant_id.clone(), correction.statement_number)];
    if let Some(number) = counterparty_statement {
        targets.push((counterparty, number));
    }
    let mut issued = Vec::with_capacity(targets.len());
    for (merchant, corrects) in targets {
        let number: i32 = sqlx::query_scalar(
            "SELECT coalesce(max(number), 0) + 1 FROM statements WHERE merchant_id = $1",
        )
        .bind(&merchant)
        .fetch_one(&mut *tx)
        .await?;
        let line = adjustment_line(tx, &correction.line_id, &merchant).await?;
        let statement = Statement {
            merchant_id: MerchantId::parse("merchant_id", &merchant)?,
            number: u32::try_from(number).unwrap_or(0),
            cycle: correction.cycle.clone(),
            cut_off,
            issued_at: correction.issued_at,
            corrects: u32::try_from(corrects).ok(),
            lines: vec![line],
        };
        let hash = statement.content_hash();
        let totals = totals_to_proto(&statement);
        let mut insert: QueryBuilder<Postgres> = QueryBuilder::new(
            "INSERT INTO statements (merchant_id, number, cycle, cut_off, issued_at, corrects_number, content_hash, \
               line_count, totals, correction) ",
        );
        insert.push_values([()], |mut row, ()| {
            row.push_bind(&merchant)
                .push_bind(number)
                .push_bind(&correction.cycle)
                .push_bind(cut_off)
                .push_bind(correction.issued_at)
                .push_bind(corrects)
                .push_bind(&hash)
                .push_bind(1_i32)
                .push_bind(serde_json::to_value(totals_json(&totals)).unwrap_or_default())
                .push_bind(correction.closure);
        });
        insert.build().execute(&mut *tx).await?;
        if announce {
            let event = pb::SettlementEvent {
                event_id: announcement_id(&format!(
                    "correction/{}/statement/{merchant}",
                    correction.closure
                ))
                .to_string(),
                schema_version: 1,
                merchant_id: merchant.clone(),
                recorded_at: Some(timestamp(correction.issued_at)),
                event: Some(pb::settlement_event::Event::StatementIssued(
                    pb::StatementIssued {
                        number: u32::try_from(number).unwrap_or(0),
                        cycle: correction.cycle.clone(),
                        cut_off: Some(timestamp(cut_off)),
                        content_hash: hash.clone(),
                        line_count: 1,
                        totals,
                        corrects_statement_number: u32::try_from(corrects).unwrap_or(0),
                    },
                )),
            };
            tandem_store::enqueue_outbox(&mut *tx, &[settlement_message(&merchant, &event)])
                .await?;
        }
        issued.push((merchant, number));
    }
    Ok(issued)
}
