//! Reading issued statements back, and their exports. A statement is rebuilt from its lines
//! (settled in its cycle, or carried forward from it) and checked against the hash recorded when
//! it was issued before anything is shown: a statement that would not reproduce is an error,
//! never a different answer.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tandem_domain::ids::MerchantId;
use tandem_domain::statement::{LineStatus, Statement, COLUMNS};
use tandem_proto::time::timestamp;
use tandem_proto::v1 as pb;

use crate::close::{totals_from_json, Closure};
use crate::SettlementError;

/// A statement's header as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Header {
    pub merchant_id: String,
    pub number: i32,
    pub cycle: String,
    pub cut_off: DateTime<Utc>,
    pub issued_at: DateTime<Utc>,
    pub corrects_number: Option<i32>,
    pub content_hash: String,
    pub line_count: i32,
    pub totals: serde_json::Value,
    /// The correction that issued it, for a correction statement.
    pub correction: Option<i64>,
}

const HEADER_COLUMNS: &str =
    "merchant_id, number, cycle, cut_off, issued_at, corrects_number, content_hash, \
    line_count, totals, correction";

pub(crate) fn header_to_proto(header: &Header) -> pb::Statement {
    pb::Statement {
        merchant_id: header.merchant_id.clone(),
        number: u32::try_from(header.number).unwrap_or(0),
        cycle: header.cycle.clone(),
        cut_off: Some(timestamp(header.cut_off)),
        issued_at: Some(timestamp(header.issued_at)),
        corrects_statement_number: header
            .corrects_number
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
        content_hash: header.content_hash.clone(),
        line_count: u32::try_from(header.line_count).unwrap_or(0),
        totals: totals_from_json(header.totals.clone()),
        lines: Vec::new(),
    }
}

/// A merchant's statements, newest first, after statement number `before` (0: from the newest).
pub(crate) async fn list(
    pool: &PgPool,
    merchant: &str,
    before: i32,
    limit: i64,
) -> Result<Vec<Header>, SettlementError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {HEADER_COLUMNS} FROM statements WHERE merchant_id = $1 AND ($2 = 0 OR number < $2) \
         ORDER BY number DESC LIMIT $3"
    ))
    .bind(merchant)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

pub(crate) async fn header(
    pool: &PgPool,
    merchant: &str,
    number: i32,
) -> Result<Option<Header>, SettlementError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {HEADER_COLUMNS} FROM statements WHERE merchant_id = $1 AND number = $2"
    ))
    .bind(merchant)
    .bind(number)
    .fetch_optional(pool)
    .await?)
}

/// The issued statement, rebuilt from its closure's lines and checked against its recorded
/// hash.
pub(crate) async fn load(pool: &PgPool, header: &Header) -> Result<Statement, SettlementError> {
    let mut connection = pool.acquire().await?;
    if let Some(correction) = header.correction {
        let line_id: String =
            sqlx::query_scalar("SELECT line_id FROM corrections WHERE closure = $1")
                .bind(correction)
                .fetch_one(&mut *connection)
                .await?;
        let line =
            crate::corrections::adjustment_line(&mut connection, &line_id, &header.merchant_id)
                .await?;
        return checked(header, vec![line]);
    }
    let closure: Closure = sqlx::query_as("SELECT * FROM cycle_closures WHERE cycle = $1")
        .bind(&header.cycle)
        .fetch_one(&mut *connection)
        .await?;
    let terms =
        crate::lines::group_terms(&mut connection, &closure.kind, &closure.time_zone).await?;
    let carried_before =
        crate::close::carried_in(&mut connection, closure.previous_cycle.as_deref()).await?;
    let carried_here: std::collections::HashSet<String> =
        crate::close::carried_in(&mut connection, Some(&closure.cycle))
            .await?
            .into_iter()
            .collect();
    let data = crate::lines::read(
        vec![connection],
        terms,
        &crate::lines::Selection {
            closure: &closure,
            carried_before: &carried_before,
            merchant: Some(&header.merchant_id),
        },
    )
    .await?;
    let merchant = data
        .merchants
        .iter()
        .position(|m| m.as_str() == header.merchant_id)
        .and_then(|i| u32::try_from(i).ok())
        .unwrap_or(u32::MAX);
    let lines = data
        .rows
        .iter()
        .map(|row| {
            let status = if carried_here.contains(&*row.line_id) {
                LineStatus::CarriedForward
            } else {
                LineStatus::Settled
            };
            data.statement_line(row, merchant, status)
        })
        .collect();
    checked(header, lines)
}

/// The statement of `header` with `lines`, if it reproduces the recorded hash.
fn checked(
    header: &Header,
    lines: Vec<tandem_domain::statement::StatementLine>,
) -> Result<Statement, SettlementError> {
    let statement = Statement {
        merchant_id: MerchantId::parse("merchant_id", &header.merchant_id)?,
        number: u32::try_from(header.number).unwrap_or(0),
        cycle: header.cycle.clone(),
        cut_off: header.cut_off,
        issued_at: header.issued_at,
        corrects: header.corrects_number.and_then(|n| u32::try_from(n).ok()),
        lines,
    };
    let hash = statement.content_hash();
    if hash != header.content_hash {
        tracing::error!(
            merchant_id = %header.merchant_id,
            number = header.number,
            recorded = %header.content_hash,
            rebuilt = %hash,
            "a statement no longer reproduces its recorded hash"
        );
        return Err(SettlementError::Invariant(
            "an issued statement does not reproduce its recorded hash",
        ));
    }
    Ok(statement)
}

pub(crate) fn statement_to_proto(header: &Header, statement: &Statement) -> pb::Statement {
    let mut proto = header_to_proto(header);
    proto.lines = statement
        .lines
        .iter()
        .enumerate()
        .map(|(index, line)| pb::StatementLine {
            line_number: u32::try_from(index + 1).unwrap_or(u32::MAX),
            kind: crate::lines::kind_to_proto(line.kind),
            status: match line.status {
                LineStatus::Settled => pb::StatementLineStatus::Settled as i32,
                LineStatus::CarriedForward => pb::StatementLineStatus::CarriedForward as i32,
            },
            counterparty_merchant_id: line.counterparty.to_string(),
            partnership_id: line.partnership_id.to_string(),
            terms_version: line.terms_version,
            rule: line.rule.clone(),
            purchase_id: line.purchase_id.clone(),
            refund_id: line.refund_id.clone().unwrap_or_default(),
            transaction_id: line.transaction_id.clone(),
            referral_id: line.referral_id.clone(),
            referrer_reference: line.referrer_reference.clone(),
            payable_at: Some(timestamp(line.payable_at)),
            currency: line.currency.to_string(),
            purchase_amount_minor: line.purchase_amount_minor,
            amount_minor: line.amount_minor,
        })
        .collect();
    proto
}

/// The JSON export: the canonical CSV's rows as objects, every value the exact text of its CSV
/// field, so that writing `rows` back as CSV (columns in `columns` order, RFC 4180 quoting)
/// gives the canonical bytes whose SHA-256 is `content_hash`.
#[derive(Debug, Serialize, Deserialize)]
pub struct JsonExport {
    pub format: String,
    pub content_hash: String,
    pub columns: Vec<String>,
    pub rows: Vec<serde_json::Map<String, serde_json::Value>>,
}

pub const JSON_FORMAT: &str = "tandem.statement.v1";

pub fn to_json(statement: &Statement) -> Result<Vec<u8>, SettlementError> {
    let rows = statement
        .canonical_rows()
        .into_iter()
        .skip(1)
        .map(|fields| {
            COLUMNS
                .iter()
                .zip(fields)
                .map(|(column, value)| ((*column).to_owned(), serde_json::Value::String(value)))
                .collect()
        })
        .collect();
    let export = JsonExport {
        format: JSON_FORMAT.to_owned(),
        content_hash: statement.content_hash(),
        columns: COLUMNS.iter().map(|c| (*c).to_owned()).collect(),
        rows,
    };
    serde_json::to_vec_pretty(&export)
        .map_err(|_| SettlementError::Invariant("statement JSON unserialisable"))
}

/// The canonical CSV written back from a JSON export; `Err` says what is wrong with it.
pub fn canonical_from_json(bytes: &[u8]) -> Result<String, String> {
    let export: JsonExport = serde_json::from_slice(bytes)
        .map_err(|error| format!("not a statement export: {error}"))?;
    if export.format != JSON_FORMAT {
        return Err(format!(
            "format is {:?}; this verifies {JSON_FORMAT}",
            export.format
        ));
    }
    let mut rows = Vec::with_capacity(export.rows.len() + 1);
    rows.push(export.columns.clone());
    for (index, row) in export.rows.iter().enumerate() {
        let mut fields = Vec::with_capacity(export.columns.len());
        for column in &export.columns {
            match row.get(column) {
                Some(serde_json::Value::String(text)) => fields.push(text.clone()),
                _ => return Err(format!("row {index} has no text field {column:?}")),
            }
        }
        rows.push(fields);
    }
    Ok(tandem_domain::statement::encode_rows(&rows))
}

pub(crate) fn file_name(statement: &Statement, extension: &str) -> String {
    format!(
        "statement-{}-{}.{extension}",
        statement.merchant_id, statement.number
    )
}

/// A merchant's issued statement by number, rebuilt and checked against its recorded hash.
pub async fn issued(
    pool: &PgPool,
    merchant: &str,
    number: u32,
) -> Result<Option<Statement>, SettlementError> {
    let Ok(number) = i32::try_from(number) else {
        return Ok(None);
    };
    match header(pool, merchant, number).await? {
        Some(header) => Ok(Some(load(pool, &header).await?)),
        None => Ok(None),
    }
}

/// Every statement of a merchant, oldest first.
pub async fn all_of(pool: &PgPool, merchant: &str) -> Result<Vec<Statement>, SettlementError> {
    let mut headers = list(pool, merchant, 0, i64::MAX).await?;
    headers.reverse();
    let mut statements = Vec::with_capacity(headers.len());
    for header in &headers {
        statements.push(load(pool, header).await?);
    }
    Ok(statements)
}

#[derive(sqlx::FromRow)]
struct UnsettledRow {
    kind: String,
    referrer_merchant_id: String,
    acceptor_merchant_id: String,
    partnership_id: String,
    terms_version: i32,
    rule: String,
    purchase_id: String,
    refund_id: Option<String>,
    transaction_id: String,
    referral_id: String,
    referrer_reference: String,
    payable_at: DateTime<Utc>,
    currency: String,
    base_amount_minor: i64,
    amount_minor: i64,
    note: Option<String>,
    cycle_kind: String,
    time_zone: String,
    latest_first_day: Option<chrono::NaiveDate>,
    carried: bool,
}

/// A merchant's lines no closed cycle has settled yet, oldest first, from `offset`.
pub(crate) async fn unsettled(
    pool: &PgPool,
    merchant: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<pb::UnsettledLine>, SettlementError> {
    let rows: Vec<UnsettledRow> = sqlx::query_as(
        "WITH latest AS (SELECT DISTINCT ON (kind, time_zone) kind, time_zone, cycle, first_day, cut_off, line_watermark \
           FROM cycle_closures ORDER BY kind, time_zone, closure DESC) \
         SELECT l.kind, l.referrer_merchant_id, l.acceptor_merchant_id, l.partnership_id, l.terms_version, t.rule, \
           l.purchase_id, l.refund_id, l.transaction_id, l.referral_id, l.referrer_reference, l.payable_at, l.currency, \
           l.base_amount_minor, l.amount_minor, l.note, t.cycle_kind, m.time_zone, c.first_day AS latest_first_day, \
           (x.line_id IS NOT NULL) AS carried \
         FROM lines l JOIN partnership_terms t USING (partnership_id, terms_version) \
           JOIN merchants m ON m.merchant_id = l.acceptor_merchant_id \
           LEFT JOIN latest c ON c.kind = t.cycle_kind AND c.time_zone = m.time_zone \
           LEFT JOIN carried_lines x ON x.cycle = c.cycle AND x.line_id = l.line_id \
         WHERE (l.referrer_merchant_id = $1 OR l.acceptor_merchant_id = $1) \
           AND (c.cycle IS NULL OR l.payable_at >= c.cut_off OR l.seq > c.line_watermark OR x.line_id IS NOT NULL) \
         ORDER BY l.payable_at, l.line_id OFFSET $2 LIMIT $3",
    )
    .bind(merchant)
    .bind(offset)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|row| {
            let kind = tandem_domain::settlement::CycleKind::parse("cycle_kind", &row.cycle_kind)?;
            let zone = tandem_domain::settlement::parse_time_zone("time_zone", &row.time_zone)?;
            let mut cycle =
                tandem_domain::settlement::Cycle::containing(kind, zone, row.payable_at);
            if let Some(latest) = row.latest_first_day {
                while cycle.first_day <= latest {
                    cycle = cycle.next();
                }
            }
            let as_referrer = row.referrer_merchant_id == merchant;
            Ok(pb::UnsettledLine {
                line: Some(pb::StatementLine {
                    line_number: 0,
                    kind: crate::lines::kind_to_proto(crate::lines::line_kind(&row.kind)),
                    status: pb::StatementLineStatus::Unspecified as i32,
                    counterparty_merchant_id: if as_referrer {
                        row.acceptor_merchant_id
                    } else {
                        row.referrer_merchant_id
                    },
                    partnership_id: row.partnership_id,
                    terms_version: u32::try_from(row.terms_version).unwrap_or(0),
                    rule: row.note.unwrap_or(row.rule),
                    purchase_id: row.purchase_id,
                    refund_id: row.refund_id.unwrap_or_default(),
                    transaction_id: row.transaction_id,
                    referral_id: row.referral_id,
                    referrer_reference: row.referrer_reference,
                    payable_at: Some(timestamp(row.payable_at)),
                    currency: row.currency,
                    purchase_amount_minor: row.base_amount_minor,
                    amount_minor: if as_referrer {
                        row.amount_minor
                    } else {
                        -row.amount_minor
                    },
                }),
                expected_cycle: cycle.key(),
                carried_forward: row.carried,
            })
        })
        .collect()
}
