//! Closing a cycle, and projecting a closure into statements and payout instructions.
//!
//! A closure is one transaction. It takes the intake lock exclusively (so every line numbered
//! up to its watermark is committed and visible), records the closure (the cycle, the instant,
//! the highest line number it can see, and the previous closure of the same kind and zone), and
//! projects it. Its lines are those of its kind and zone payable before its cut-off and numbered
//! up to its watermark that the previous closure did not cover, plus those that closure carried
//! forward (`lines`); nothing is written on the lines themselves. They are netted
//! (`tandem_domain::settlement::net`), each merchant taking part gets the next statement number,
//! and the transfers become payout instructions. A crash before the commit leaves nothing;
//! closing a closed cycle answers what the closure did. Cycles of one kind and zone close in
//! order; a line that arrives after its cycle closed is settled by the next one.
//!
//! `rebuild_projections` drops every projection and projects the recorded closures again, in
//! order, with the same code: the statements come out byte for byte the same.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use prost::Message;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder};
use tandem_domain::ids::MerchantId;
use tandem_domain::money::Currency;
use tandem_domain::settlement::{net, Cycle, CycleKind, Line, Tz};
use tandem_domain::statement::{LineStatus, Statement};
use tandem_proto::time::timestamp;
use tandem_proto::v1 as pb;
use tandem_store::OutboxMessage;
use uuid::Uuid;

use crate::intake::INTAKE_LOCK;
use crate::lines;
use crate::SettlementError;

/// What a closure did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosureSummary {
    pub cycle: String,
    pub start: DateTime<Utc>,
    pub cut_off: DateTime<Utc>,
    pub closed_at: DateTime<Utc>,
    pub statements: u32,
    pub settled_lines: u64,
    pub carried_forward_lines: u64,
    pub payout_instructions: u32,
    /// False when the cycle was already closed.
    pub closed_now: bool,
    /// Commission settled by this closure, per currency (the receivable side of its statements;
    /// every settled line is receivable on exactly one). Empty when read back from a closed cycle.
    pub settled_minor: std::collections::BTreeMap<String, i64>,
}

/// Why a cycle cannot be closed now.
#[derive(Debug, thiserror::Error)]
pub enum CloseRefused {
    #[error(
        "cycle {cycle} has not ended: it cuts off at {cut_off}; it can be closed from then on"
    )]
    NotEnded {
        cycle: String,
        cut_off: DateTime<Utc>,
    },
    #[error(
        "cycle {earlier} comes before {cycle} and holds unsettled lines: close {earlier} first"
    )]
    EarlierOpen { cycle: String, earlier: String },
    #[error("cycle {cycle} is not after {latest}, the latest closed cycle of its kind and zone: cycles close in order, and a line that arrives after its cycle closed is settled by the next open one")]
    NotAfterLatest { cycle: String, latest: String },
    #[error("settlement has not yet received the admin events of partnership {partnership_id} terms version {terms_version} (or of its acceptor); it is catching up, try again shortly")]
    AwaitingAdmin {
        partnership_id: String,
        terms_version: i32,
    },
}

/// A recorded closure: everything projecting it needs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Closure {
    pub closure: i64,
    pub cycle: String,
    pub kind: String,
    pub time_zone: String,
    pub first_day: NaiveDate,
    pub start_at: DateTime<Utc>,
    pub cut_off: DateTime<Utc>,
    pub closed_at: DateTime<Utc>,
    pub line_watermark: i64,
    pub account_watermark: i64,
    pub previous_cycle: Option<String>,
    pub previous_cut_off: Option<DateTime<Utc>>,
    pub previous_watermark: Option<i64>,
}

/// The latest closure of a kind in a zone.
pub(crate) async fn latest_closure(
    connection: &mut PgConnection,
    kind: &str,
    zone: &str,
) -> Result<Option<Closure>, SettlementError> {
    Ok(sqlx::query_as(
        "SELECT * FROM cycle_closures WHERE kind = $1 AND time_zone = $2 ORDER BY closure DESC LIMIT 1",
    )
    .bind(kind)
    .bind(zone)
    .fetch_optional(&mut *connection)
    .await?)
}

/// Line ids `cycle`'s closure carried forward.
pub(crate) async fn carried_in(
    connection: &mut PgConnection,
    cycle: Option<&str>,
) -> Result<Vec<String>, SettlementError> {
    let Some(cycle) = cycle else {
        return Ok(Vec::new());
    };
    Ok(
        sqlx::query_scalar("SELECT line_id FROM carried_lines WHERE cycle = $1 ORDER BY line_id")
            .bind(cycle)
            .fetch_all(&mut *connection)
            .await?,
    )
}

/// Parses a cycle name `<kind>:<zone>:<first day>` and checks that the day starts a period.
pub fn parse_cycle(value: &str) -> Result<Cycle, tandem_domain::ValidationError> {
    use tandem_domain::ValidationError;
    let mut parts = value.trim().splitn(3, ':');
    let (Some(kind), Some(zone), Some(day)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(ValidationError::new(
            "cycle",
            format!("{value:?} is not a cycle name; use <daily|weekly|monthly>:<IANA zone>:<first day>, e.g. monthly:Europe/Paris:2026-03-01"),
        ));
    };
    let kind = CycleKind::parse("cycle", kind)?;
    let zone = tandem_domain::settlement::parse_time_zone("cycle", zone)?;
    let day = NaiveDate::parse_from_str(day, "%Y-%m-%d").map_err(|_| {
        ValidationError::new(
            "cycle",
            format!("{day:?} is not a date; use YYYY-MM-DD, e.g. 2026-03-01"),
        )
    })?;
    let cycle = Cycle::starting(kind, zone, day);
    let canonical = Cycle::containing(kind, zone, cycle.start);
    if canonical.first_day != day {
        return Err(ValidationError::new(
            "cycle",
            format!(
                "{day} does not start a {} cycle; the cycle containing it is {}",
                kind.as_str(),
                canonical.key()
            ),
        ));
    }
    Ok(cycle)
}

/// Closes `cycle` at `now`, or answers what its closure did if it is closed already.
pub async fn close_cycle(
    pool: &PgPool,
    cycle: &Cycle,
    now: DateTime<Utc>,
    outbox_written: &tokio::sync::Notify,
) -> Result<Result<ClosureSummary, CloseRefused>, SettlementError> {
    let key = cycle.key();
    if let Some(summary) = summary_of(pool, &key).await? {
        return Ok(Ok(summary));
    }
    if now < cycle.end {
        return Ok(Err(CloseRefused::NotEnded {
            cycle: key,
            cut_off: cycle.end,
        }));
    }
    // One closure at a time in this process, with its reading connections in hand before it
    // takes the lock (intake transactions wait on the lock while holding theirs).
    let _closing = CLOSING.lock().await;
    let readers = lines::readers(pool, READ_PARTS).await?;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(INTAKE_LOCK)
        .execute(&mut *tx)
        .await?;
    // Closed by someone else while this waited for the lock?
    let closed: Option<i64> =
        sqlx::query_scalar("SELECT closure FROM cycle_closures WHERE cycle = $1")
            .bind(&key)
            .fetch_optional(&mut *tx)
            .await?;
    if closed.is_some() {
        tx.rollback().await?;
        let summary = summary_of(pool, &key)
            .await?
            .ok_or(SettlementError::Invariant(
                "a recorded closure without its summary",
            ))?;
        return Ok(Ok(summary));
    }
    let previous = latest_closure(&mut tx, cycle.kind.as_str(), cycle.time_zone.name()).await?;
    if let Some(previous) = &previous {
        if previous.first_day >= cycle.first_day {
            return Ok(Err(CloseRefused::NotAfterLatest {
                cycle: key,
                latest: previous.cycle.clone(),
            }));
        }
    }
    if let Some(missing) = missing_admin(&mut tx, cycle, previous.as_ref()).await? {
        return Ok(Err(missing));
    }
    if let Some(earlier) = first_open_cycle(&mut tx, cycle.kind, cycle.time_zone).await? {
        if earlier.end <= cycle.start {
            return Ok(Err(CloseRefused::EarlierOpen {
                cycle: key,
                earlier: earlier.key(),
            }));
        }
    }
    let watermark: i64 = sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM lines")
        .fetch_one(&mut *tx)
        .await?;
    let account_watermark: i64 =
        sqlx::query_scalar("SELECT coalesce(max(received), 0) FROM payout_accounts")
            .fetch_one(&mut *tx)
            .await?;
    // Closures and corrections share one sequence: a rebuild replays them in this order.
    let number: i64 = sqlx::query_scalar(
        "SELECT greatest((SELECT coalesce(max(closure), 0) FROM cycle_closures), \
                         (SELECT coalesce(max(closure), 0) FROM corrections)) + 1",
    )
    .fetch_one(&mut *tx)
    .await?;
    let closure = Closure {
        closure: number,
        cycle: key.clone(),
        kind: cycle.kind.as_str().to_owned(),
        time_zone: cycle.time_zone.name().to_owned(),
        first_day: cycle.first_day,
        start_at: cycle.start,
        cut_off: cycle.end,
        closed_at: tandem_proto::time::truncate_to_micros(now),
        line_watermark: watermark,
        account_watermark,
        previous_cycle: previous.as_ref().map(|p| p.cycle.clone()),
        previous_cut_off: previous.as_ref().map(|p| p.cut_off),
        previous_watermark: previous.as_ref().map(|p| p.line_watermark),
    };
    sqlx::query(
        "INSERT INTO cycle_closures (closure, cycle, kind, time_zone, first_day, start_at, cut_off, closed_at, line_watermark, \
           account_watermark, previous_cycle, previous_cut_off, previous_watermark) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(closure.closure)
    .bind(&closure.cycle)
    .bind(&closure.kind)
    .bind(&closure.time_zone)
    .bind(closure.first_day)
    .bind(closure.start_at)
    .bind(closure.cut_off)
    .bind(closure.closed_at)
    .bind(closure.line_watermark)
    .bind(closure.account_watermark)
    .bind(&closure.previous_cycle)
    .bind(closure.previous_cut_off)
    .bind(closure.previous_watermark)
    .execute(&mut *tx)
    .await?;
    let started = std::time::Instant::now();
    let summary = project(readers, &mut tx, &closure, true).await?;
    tx.commit().await?;
    outbox_written.notify_one();
    crate::metrics::settled(&summary.settled_minor);
    tracing::info!(
        cycle = %summary.cycle,
        statements = summary.statements,
        settled_lines = summary.settled_lines,
        carried_forward_lines = summary.carried_forward_lines,
        payout_instructions = summary.payout_instructions,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "cycle closed"
    );
    Ok(Ok(summary))
}

/// Drops every projection and projects the recorded closures again, in order. Returns how many
/// closures it replayed. Publishes nothing: the events went out when the cycles closed.
pub async fn rebuild_projections(pool: &PgPool) -> Result<usize, SettlementError> {
    let _closing = CLOSING.lock().await;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(INTAKE_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::query("TRUNCATE cycles, carried_lines, statements, payout_instructions")
        .execute(&mut *tx)
        .await?;
    let closures: Vec<Closure> = sqlx::query_as("SELECT * FROM cycle_closures ORDER BY closure")
        .fetch_all(&mut *tx)
        .await?;
    let corrections: Vec<crate::corrections::Correction> = sqlx::query_as(
        "SELECT closure, cycle, merchant_id, statement_number, line_id, issued_at FROM corrections ORDER BY closure",
    )
    .fetch_all(&mut *tx)
    .await?;
    // Both in the order they happened, so every statement gets its number again.
    let (mut closures_left, mut corrections_left) =
        (closures.iter().peekable(), corrections.iter().peekable());
    loop {
        match (closures_left.peek(), corrections_left.peek()) {
            (Some(closure), Some(correction)) if correction.closure < closure.closure => {
                crate::corrections::project(&mut tx, correction, false).await?;
                corrections_left.next();
            }
            (Some(closure), _) => {
                let readers = lines::readers(pool, READ_PARTS).await?;
                project(readers, &mut tx, closure, false).await?;
                closures_left.next();
            }
            (None, Some(correction)) => {
                crate::corrections::project(&mut tx, correction, false).await?;
                corrections_left.next();
            }
            (None, None) => break,
        }
    }
    tx.commit().await?;
    Ok(closures.len() + corrections.len())
}

/// The summary of a closed cycle.
pub async fn summary_of(
    pool: &PgPool,
    cycle: &str,
) -> Result<Option<ClosureSummary>, SettlementError> {
    let row: Option<SummaryRow> = sqlx::query_as(
        "SELECT k.cycle, k.start_at, k.cut_off, k.closed_at, c.statements, c.settled_lines, c.carried_forward_lines, c.payout_instructions \
         FROM cycle_closures k JOIN cycles c USING (cycle) WHERE k.cycle = $1",
    )
    .bind(cycle)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(summary_from_row))
}

/// A cycle's summary as stored: cycle, start, cut-off, closed at, statements, settled lines,
/// carried-forward lines, payout instructions.
pub(crate) type SummaryRow = (
    String,
    DateTime<Utc>,
    DateTime<Utc>,
    DateTime<Utc>,
    i32,
    i64,
    i64,
    i32,
);

pub(crate) fn summary_from_row(
    (cycle, start, cut_off, closed_at, statements, settled, carried, payouts): SummaryRow,
) -> ClosureSummary {
    ClosureSummary {
        cycle,
        start,
        cut_off,
        closed_at,
        statements: u32::try_from(statements).unwrap_or(0),
        settled_lines: u64::try_from(settled).unwrap_or(0),
        carried_forward_lines: u64::try_from(carried).unwrap_or(0),
        payout_instructions: u32::try_from(payouts).unwrap_or(0),
        closed_now: false,
        settled_minor: Default::default(),
    }
}

/// A line payable before `cut_off` that the previous closure did not cover, whose terms or
/// acceptor settlement has not received yet: its cycle is unknown, so no cycle may close past it
/// before the admin consumer catches up.
async fn missing_admin(
    tx: &mut PgConnection,
    cycle: &Cycle,
    previous: Option<&Closure>,
) -> Result<Option<CloseRefused>, SettlementError> {
    // Only lines that could be of this cycle's kind and zone: what is known of them does not
    // rule it out.
    let row: Option<(String, i32)> = sqlx::query_as(
        "SELECT l.partnership_id, l.terms_version FROM lines l \
           LEFT JOIN partnership_terms t USING (partnership_id, terms_version) \
           LEFT JOIN merchants m ON m.merchant_id = l.acceptor_merchant_id \
         WHERE l.payable_at < $1 AND ($2::timestamptz IS NULL OR l.payable_at >= $2 OR l.seq > $3) \
           AND (t.partnership_id IS NULL OR m.merchant_id IS NULL) \
           AND (t.cycle_kind IS NULL OR t.cycle_kind = $4) AND (m.time_zone IS NULL OR m.time_zone = $5) LIMIT 1",
    )
    .bind(cycle.end)
    .bind(previous.map(|p| p.cut_off))
    .bind(previous.map_or(0, |p| p.line_watermark))
    .bind(cycle.kind.as_str())
    .bind(cycle.time_zone.name())
    .fetch_optional(&mut *tx)
    .await?;
    Ok(row.map(
        |(partnership_id, terms_version)| CloseRefused::AwaitingAdmin {
            partnership_id,
            terms_version,
        },
    ))
}

/// The earliest cycle of `kind` in `zone` that is not closed and holds an unsettled line (one
/// the latest closure did not cover, or carried forward), if any.
pub(crate) async fn first_open_cycle(
    tx: &mut PgConnection,
    kind: CycleKind,
    zone: Tz,
) -> Result<Option<Cycle>, SettlementError> {
    let latest = latest_closure(tx, kind.as_str(), zone.name()).await?;
    let earliest: Option<DateTime<Utc>> = sqlx::query_scalar(
        "WITH terms AS (SELECT t.partnership_id, t.terms_version FROM partnership_terms t \
           JOIN merchants m ON m.merchant_id = t.acceptor_merchant_id WHERE t.cycle_kind = $1 AND m.time_zone = $2) \
         SELECT min(payable_at) FROM ( \
           SELECT min(l.payable_at) AS payable_at FROM lines l JOIN terms USING (partnership_id, terms_version) \
             WHERE $3::timestamptz IS NULL OR l.payable_at >= $3 \
           UNION ALL SELECT min(l.payable_at) FROM lines l JOIN terms USING (partnership_id, terms_version) \
             WHERE $3::timestamptz IS NOT NULL AND l.seq > $4 \
           UNION ALL SELECT min(l.payable_at) FROM lines l JOIN carried_lines c ON c.line_id = l.line_id AND c.cycle = $5 \
         ) unsettled",
    )
    .bind(kind.as_str())
    .bind(zone.name())
    .bind(latest.as_ref().map(|c| c.cut_off))
    .bind(latest.as_ref().map_or(0, |c| c.line_watermark))
    .bind(latest.as_ref().map(|c| c.cycle.clone()))
    .fetch_one(&mut *tx)
    .await?;
    let Some(earliest) = earliest else {
        return Ok(None);
    };
    let mut cycle = Cycle::containing(kind, zone, earliest);
    if let Some(latest) = latest {
        // Cycles close in order: nothing before the latest closed one opens again.
        while cycle.first_day <= latest.first_day {
            cycle = cycle.next();
        }
    }
    Ok(Some(cycle))
}

/// A closure's line as netting sees it: indices into the closure's merchant table.
struct Netted<'a> {
    row: u32,
    payee: &'a MerchantId,
    payer: &'a MerchantId,
    currency: Currency,
    amount_minor: i64,
}

impl Line for Netted<'_> {
    fn payer(&self) -> &MerchantId {
        self.payer
    }
    fn payee(&self) -> &MerchantId {
        self.payee
    }
    fn currency(&self) -> Currency {
        self.currency
    }
    fn amount_minor(&self) -> i64 {
        self.amount_minor
    }
}

/// A stable id for one announcement of one closure.
pub(crate) fn announcement_id(parts: &str) -> Uuid {
    let digest = Sha256::digest(format!("settlement/{parts}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

pub(crate) fn totals_to_proto(statement: &Statement) -> Vec<pb::StatementTotal> {
    statement
        .totals()
        .into_iter()
        .map(|(currency, total)| pb::StatementTotal {
            currency: currency.to_string(),
            receivable_minor: saturate(total.receivable_minor),
            payable_minor: saturate(total.payable_minor),
            net_minor: saturate(total.net_minor),
            carried_forward_minor: saturate(total.carried_forward_minor),
        })
        .collect()
}

pub(crate) fn saturate(value: i128) -> i64 {
    i64::try_from(value).unwrap_or(if value < 0 { i64::MIN } else { i64::MAX })
}

/// How many queries read a closure's lines at once.
pub const READ_PARTS: u32 = 2;

/// Closures in this process, one at a time.
pub(crate) static CLOSING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One statement of a closure, hashed.
struct Issued {
    merchant: u32,
    number: i32,
    hash: String,
    line_count: i32,
    totals: Vec<pb::StatementTotal>,
}

/// Projects `closure`: nets its lines, issues the statements, records the payout instructions
/// and, when `announce`, enqueues the settlement events.
async fn project(
    readers: Vec<sqlx::pool::PoolConnection<Postgres>>,
    tx: &mut PgConnection,
    closure: &Closure,
    announce: bool,
) -> Result<ClosureSummary, SettlementError> {
    let phase = std::time::Instant::now();
    let terms = lines::group_terms(tx, &closure.kind, &closure.time_zone).await?;
    let carried_before = carried_in(tx, closure.previous_cycle.as_deref()).await?;
    let data = lines::read(
        readers,
        terms,
        &lines::Selection {
            closure,
            carried_before: &carried_before,
            merchant: None,
        },
    )
    .await?;
    let read_ms = phase.elapsed().as_millis() as u64;

    // Netting: a merchant's minimum payout in a currency is the highest of the terms under
    // which it earns in this closure.
    let mut minimum: HashMap<(u32, Currency), i64> = HashMap::new();
    let mut index_of: HashMap<&MerchantId, u32> = HashMap::new();
    for (index, merchant) in data.merchants.iter().enumerate() {
        index_of.insert(merchant, u32::try_from(index).unwrap_or(u32::MAX));
    }
    let netted: Vec<Netted<'_>> = data
        .rows
        .iter()
        .enumerate()
        .map(|(index, row)| {
            let entry = minimum.entry((row.referrer, row.currency)).or_default();
            *entry = (*entry).max(data.terms[row.terms as usize].minimum_payout_minor);
            Netted {
                row: u32::try_from(index).unwrap_or(u32::MAX),
                payee: &data.merchants[row.referrer as usize],
                payer: &data.merchants[row.acceptor as usize],
                currency: row.currency,
                amount_minor: row.amount_minor,
            }
        })
        .collect();
    let netting = net(netted, |merchant, currency| {
        index_of
            .get(merchant)
            .and_then(|index| minimum.get(&(*index, currency)))
            .copied()
            .unwrap_or(0)
    });
    // Carried-forward lines, by row, with the merchant that held each back.
    let mut held: Vec<Option<u32>> = vec![None; data.rows.len()];
    for (line, holder) in &netting.carried {
        held[line.row as usize] = index_of.get(holder).copied();
    }
    let settled_lines = netting.settled.len() as u64;
    let carried_lines: Vec<(String, String)> = netting
        .carried
        .iter()
        .map(|(line, holder)| {
            (
                data.rows[line.row as usize].line_id.to_string(),
                holder.to_string(),
            )
        })
        .collect();
    let transfers = netting.transfers;
    let net_ms = phase.elapsed().as_millis() as u64 - read_ms;

    // Each merchant's rows, in the closure's order.
    let mut per_merchant: Vec<Vec<u32>> = vec![Vec::new(); data.merchants.len()];
    for (index, row) in data.rows.iter().enumerate() {
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        per_merchant[row.referrer as usize].push(index);
        per_merchant[row.acceptor as usize].push(index);
    }
    let ids: Vec<&str> = data.merchants.iter().map(MerchantId::as_str).collect();
    let numbers: HashMap<String, i32> = sqlx::query_as::<_, (String, i32)>(
        "SELECT merchant_id, max(number) FROM statements WHERE merchant_id = ANY($1) GROUP BY merchant_id",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let next_numbers: Vec<i32> = data
        .merchants
        .iter()
        .map(|m| numbers.get(m.as_str()).copied().unwrap_or(0) + 1)
        .collect();

    // Hash every statement, on blocking threads (one per core), never holding more than one
    // statement's lines per thread.
    let shared = Arc::new((data, held, per_merchant, next_numbers, closure.clone()));
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    let mut handles = Vec::with_capacity(threads);
    for thread in 0..threads {
        let shared = shared.clone();
        handles.push(tokio::task::spawn_blocking(move || {
            let (data, held, per_merchant, numbers, closure) = &*shared;
            let mut issued = Vec::new();
            for merchant in (thread..per_merchant.len()).step_by(threads) {
                let merchant_index = u32::try_from(merchant).unwrap_or(u32::MAX);
                let lines = per_merchant[merchant]
                    .iter()
                    .map(|row| {
                        let status = if held[*row as usize].is_some() {
                            LineStatus::CarriedForward
                        } else {
                            LineStatus::Settled
                        };
                        data.statement_line(&data.rows[*row as usize], merchant_index, status)
                    })
                    .collect();
                let statement = Statement {
                    merchant_id: data.merchants[merchant].clone(),
                    number: u32::try_from(numbers[merchant]).unwrap_or(0),
                    cycle: closure.cycle.clone(),
                    cut_off: closure.cut_off,
                    issued_at: closure.closed_at,
                    corrects: None,
                    lines,
                };
                issued.push(Issued {
                    merchant: merchant_index,
                    number: numbers[merchant],
                    hash: statement.content_hash(),
                    line_count: i32::try_from(statement.lines.len()).unwrap_or(i32::MAX),
                    totals: totals_to_proto(&statement),
                });
            }
            issued
        }));
    }
    let mut issued = Vec::new();
    for handle in handles {
        issued.extend(
            handle
                .await
                .map_err(|_| SettlementError::Invariant("a statement hashing thread failed"))?,
        );
    }
    issued.sort_by_key(|i| i.merchant);
    let (data, _, _, _, _) = &*shared;
    let hash_ms = phase.elapsed().as_millis() as u64 - read_ms - net_ms;

    let mut outbox = Vec::new();
    for chunk in issued.chunks(1000) {
        let mut query: QueryBuilder<Postgres> = QueryBuilder::new(
            "INSERT INTO statements (merchant_id, number, cycle, cut_off, issued_at, corrects_number, content_hash, line_count, totals) ",
        );
        query.push_values(chunk, |mut row, statement| {
            row.push_bind(data.merchants[statement.merchant as usize].as_str())
                .push_bind(statement.number)
                .push_bind(&closure.cycle)
                .push_bind(closure.cut_off)
                .push_bind(closure.closed_at)
                .push_bind(None::<i32>)
                .push_bind(&statement.hash)
                .push_bind(statement.line_count)
                .push_bind(
                    serde_json::to_value(totals_json(&statement.totals)).unwrap_or_default(),
                );
        });
        query.build().execute(&mut *tx).await?;
    }
    if announce {
        for statement in &issued {
            let merchant = data.merchants[statement.merchant as usize].as_str();
            let event = pb::SettlementEvent {
                event_id: announcement_id(&format!("{}/statement/{merchant}", closure.cycle))
                    .to_string(),
                schema_version: 1,
                merchant_id: merchant.to_owned(),
                recorded_at: Some(timestamp(closure.closed_at)),
                event: Some(pb::settlement_event::Event::StatementIssued(
                    pb::StatementIssued {
                        number: u32::try_from(statement.number).unwrap_or(0),
                        cycle: closure.cycle.clone(),
                        cut_off: Some(timestamp(closure.cut_off)),
                        content_hash: statement.hash.clone(),
                        line_count: u32::try_from(statement.line_count).unwrap_or(0),
                        totals: statement.totals.clone(),
                        corrects_statement_number: 0,
                    },
                )),
            };
            outbox.push(settlement_message(merchant, &event));
        }
    }
    let (carried_ids, holders): (Vec<&str>, Vec<&str>) = carried_lines
        .iter()
        .map(|(line, holder)| (line.as_str(), holder.as_str()))
        .unzip();
    sqlx::query(
        "INSERT INTO carried_lines (cycle, line_id, held_by) SELECT $1, * FROM UNNEST($2::text[], $3::text[])",
    )
    .bind(&closure.cycle)
    .bind(&carried_ids)
    .bind(&holders)
    .execute(&mut *tx)
    .await?;

    let mut sequence_of: HashMap<Currency, i32> = HashMap::new();
    let mut instructions = Vec::with_capacity(transfers.len());
    for transfer in &transfers {
        let sequence = sequence_of.entry(transfer.currency).or_default();
        *sequence += 1;
        let amount = i64::try_from(transfer.amount_minor)
            .map_err(|_| SettlementError::Invariant("a transfer beyond 64-bit minor units"))?;
        let instruction_id = format!("{}/{}/{}", closure.cycle, transfer.currency, sequence);
        if announce {
            let event = pb::SettlementEvent {
                event_id: announcement_id(&format!("{instruction_id}/payout")).to_string(),
                schema_version: 1,
                merchant_id: transfer.from.to_string(),
                recorded_at: Some(timestamp(closure.closed_at)),
                event: Some(pb::settlement_event::Event::PayoutInstructed(
                    pb::PayoutInstructed {
                        instruction_id: instruction_id.clone(),
                        cycle: closure.cycle.clone(),
                        currency: transfer.currency.to_string(),
                        from_merchant_id: transfer.from.to_string(),
                        to_merchant_id: transfer.to.to_string(),
                        amount_minor: amount,
                    },
                )),
            };
            outbox.push(settlement_message(transfer.from.as_str(), &event));
        }
        instructions.push((
            transfer.currency.to_string(),
            *sequence,
            transfer.from.to_string(),
            transfer.to.to_string(),
            amount,
        ));
    }
    for chunk in instructions.chunks(1000) {
        let mut query: QueryBuilder<Postgres> = QueryBuilder::new(
            "INSERT INTO payout_instructions (cycle, currency, sequence, from_merchant_id, to_merchant_id, amount_minor) ",
        );
        query.push_values(chunk, |mut row, (currency, sequence, from, to, amount)| {
            row.push_bind(&closure.cycle)
                .push_bind(currency)
                .push_bind(sequence)
                .push_bind(from)
                .push_bind(to)
                .push_bind(amount);
        });
        query.build().execute(&mut *tx).await?;
    }

    let summary = ClosureSummary {
        cycle: closure.cycle.clone(),
        start: closure.start_at,
        cut_off: closure.cut_off,
        closed_at: closure.closed_at,
        statements: u32::try_from(issued.len()).unwrap_or(u32::MAX),
        settled_lines,
        carried_forward_lines: carried_lines.len() as u64,
        payout_instructions: u32::try_from(instructions.len()).unwrap_or(u32::MAX),
        closed_now: true,
        settled_minor: issued
            .iter()
            .flat_map(|statement| statement.totals.iter())
            .fold(Default::default(), |mut settled, total| {
                *settled.entry(total.currency.clone()).or_default() += total.receivable_minor;
                settled
            }),
    };
    sqlx::query(
        "INSERT INTO cycles (cycle, statements, settled_lines, carried_forward_lines, payout_instructions) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&closure.cycle)
    .bind(i32::try_from(summary.statements).unwrap_or(i32::MAX))
    .bind(i64::try_from(summary.settled_lines).unwrap_or(i64::MAX))
    .bind(i64::try_from(summary.carried_forward_lines).unwrap_or(i64::MAX))
    .bind(i32::try_from(summary.payout_instructions).unwrap_or(i32::MAX))
    .execute(&mut *tx)
    .await?;
    for chunk in outbox.chunks(1000) {
        tandem_store::enqueue_outbox(&mut *tx, chunk).await?;
    }
    tracing::debug!(
        cycle = %closure.cycle,
        read_ms,
        net_ms,
        hash_ms,
        write_ms = phase.elapsed().as_millis() as u64 - read_ms - net_ms - hash_ms,
        "closure projected"
    );
    Ok(summary)
}

pub(crate) fn settlement_message(merchant: &str, event: &pb::SettlementEvent) -> OutboxMessage {
    OutboxMessage {
        topic: tandem_bus::Topic::Settlement.logical_name(),
        partition_key: merchant.as_bytes().to_vec(),
        payload: event.encode_to_vec(),
        headers: tandem_telemetry::current_trace_headers(),
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct TotalJson {
    pub currency: String,
    pub receivable_minor: i64,
    pub payable_minor: i64,
    pub net_minor: i64,
    pub carried_forward_minor: i64,
}

pub(crate) fn totals_json(totals: &[pb::StatementTotal]) -> Vec<TotalJson> {
    totals
        .iter()
        .map(|t| TotalJson {
            currency: t.currency.clone(),
            receivable_minor: t.receivable_minor,
            payable_minor: t.payable_minor,
            net_minor: t.net_minor,
            carried_forward_minor: t.carried_forward_minor,
        })
        .collect()
}

pub(crate) fn totals_from_json(value: serde_json::Value) -> Vec<pb::StatementTotal> {
    serde_json::from_value::<Vec<TotalJson>>(value)
        .unwrap_or_default()
        .into_iter()
        .map(|t| pb::StatementTotal {
            currency: t.currency,
            receivable_minor: t.receivable_minor,
            payable_minor: t.payable_minor,
            net_minor: t.net_minor,
            carried_forward_minor: t.carried_forward_minor,
        })
        .collect()
}

/// Closes every cycle whose cut-off is at least `grace` ago and that holds unsettled lines, in
/// order per kind and zone. Returns how many it closed.
pub async fn close_due_cycles(
    pool: &PgPool,
    now: DateTime<Utc>,
    grace: chrono::Duration,
    outbox_written: &tokio::sync::Notify,
) -> Result<usize, SettlementError> {
    let groups: Vec<(String, String)> = sqlx::query_as(
        "SELECT DISTINCT t.cycle_kind, m.time_zone FROM partnership_terms t \
         JOIN merchants m ON m.merchant_id = t.acceptor_merchant_id ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await?;
    let mut closed = 0;
    // One group's failure (a zone the database does not know, a refused closure, a database
    // error) is logged and never keeps the other groups from closing.
    for (kind, zone) in groups {
        match close_due_in_group(pool, &kind, &zone, now, grace, outbox_written).await {
            Ok(count) => closed += count,
            Err(error) => tracing::warn!(
                kind = %kind,
                zone = %zone,
                error = %tandem_runtime::error_chain(&error),
                "closing this kind and zone's due cycles failed; the schedule tries again"
            ),
        }
    }
    Ok(closed)
}

async fn close_due_in_group(
    pool: &PgPool,
    kind: &str,
    zone: &str,
    now: DateTime<Utc>,
    grace: chrono::Duration,
    outbox_written: &tokio::sync::Notify,
) -> Result<usize, SettlementError> {
    let kind = CycleKind::parse("cycle_kind", kind)?;
    let zone = tandem_domain::settlement::parse_time_zone("time_zone", zone)?;
    let mut closed = 0;
    loop {
        let mut connection = pool.acquire().await?;
        let Some(cycle) = first_open_cycle(&mut connection, kind, zone).await? else {
            break;
        };
        drop(connection);
        if cycle.end + grace > now {
            break;
        }
        match close_cycle(pool, &cycle, now, outbox_written).await? {
            Ok(_) => closed += 1,
            Err(refused) => {
                tracing::warn!(cycle = %cycle.key(), reason = %refused, "a due cycle could not close yet; the schedule tries again");
                break;
            }
        }
    }
    Ok(closed)
}
