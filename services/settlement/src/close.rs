//! Closing a cycle, and projecting a closure into statements and payout instructions.
//!
//! A closure is one transaction. It takes the intake lock exclusively (so every line numbered
//! up to its watermark is committed and visible), records the closure (the cycle, the instant,
//! the highest line number it can see), and projects it: the cycle's lines are the unsettled
//! lines of its kind and zone that became payable before the cut-off and are numbered up to the
//! watermark; they are netted (`tandem_domain::settlement::net`), each merchant taking part gets
//! the next statement number, and the transfers become payout instructions. A crash before the
//! commit leaves nothing; closing a closed cycle answers what the closure did. A line that
//! arrives after its cycle closed is settled by the next cycle of its kind and zone.
//!
//! `rebuild_projections` drops every projection and projects the recorded closures again, in
//! order, with the same code: the statements come out byte for byte the same.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, NaiveDate, Utc};
use prost::Message;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder};
use tandem_domain::ids::{MerchantId, PartnershipId};
use tandem_domain::money::Currency;
use tandem_domain::settlement::{net, Cycle, CycleKind, Line, Tz};
use tandem_domain::statement::{LineKind, LineStatus, Statement, StatementLine};
use tandem_proto::time::timestamp;
use tandem_proto::v1 as pb;
use tandem_store::OutboxMessage;
use uuid::Uuid;

use crate::intake::INTAKE_LOCK;
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
    if let Some(missing) = missing_admin(&mut tx, cycle.end).await? {
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
    let number: i64 =
        sqlx::query_scalar("SELECT coalesce(max(closure), 0) + 1 FROM cycle_closures")
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
    };
    sqlx::query(
        "INSERT INTO cycle_closures (closure, cycle, kind, time_zone, first_day, start_at, cut_off, closed_at, line_watermark) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
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
    .execute(&mut *tx)
    .await?;
    let started = std::time::Instant::now();
    let summary = project(&mut tx, &closure, true).await?;
    tx.commit().await?;
    outbox_written.notify_one();
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
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(INTAKE_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::query("TRUNCATE cycles, carried_lines, statements, payout_instructions")
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE lines SET settled_in = NULL WHERE settled_in IS NOT NULL")
        .execute(&mut *tx)
        .await?;
    let closures: Vec<Closure> = sqlx::query_as("SELECT * FROM cycle_closures ORDER BY closure")
        .fetch_all(&mut *tx)
        .await?;
    for closure in &closures {
        project(&mut tx, closure, false).await?;
    }
    tx.commit().await?;
    Ok(closures.len())
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
    }
}

/// An unsettled line payable before `cut_off` whose terms or acceptor settlement has not
/// received yet: its cycle is unknown, so no cycle may close before the admin consumer catches
/// up.
async fn missing_admin(
    tx: &mut PgConnection,
    cut_off: DateTime<Utc>,
) -> Result<Option<CloseRefused>, SettlementError> {
    let row: Option<(String, i32)> = sqlx::query_as(
        "SELECT l.partnership_id, l.terms_version FROM lines l \
           LEFT JOIN partnership_terms t USING (partnership_id, terms_version) \
           LEFT JOIN merchants m ON m.merchant_id = l.acceptor_merchant_id \
         WHERE l.settled_in IS NULL AND l.payable_at < $1 \
           AND (t.partnership_id IS NULL OR m.merchant_id IS NULL) LIMIT 1",
    )
    .bind(cut_off)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(row.map(
        |(partnership_id, terms_version)| CloseRefused::AwaitingAdmin {
            partnership_id,
            terms_version,
        },
    ))
}

const GROUP_JOIN: &str = "FROM lines l \
    JOIN partnership_terms t USING (partnership_id, terms_version) \
    JOIN merchants m ON m.merchant_id = l.acceptor_merchant_id";

/// The earliest cycle of `kind` in `zone` that is not closed and holds an unsettled line (one
/// payable in it, or carried forward into it), if any.
pub(crate) async fn first_open_cycle(
    tx: &mut PgConnection,
    kind: CycleKind,
    zone: Tz,
) -> Result<Option<Cycle>, SettlementError> {
    let earliest: Option<DateTime<Utc>> = sqlx::query_scalar(&format!(
        "SELECT min(l.payable_at) {GROUP_JOIN} \
         WHERE l.settled_in IS NULL AND t.cycle_kind = $1 AND m.time_zone = $2"
    ))
    .bind(kind.as_str())
    .bind(zone.name())
    .fetch_one(&mut *tx)
    .await?;
    let Some(earliest) = earliest else {
        return Ok(None);
    };
    let closed: std::collections::HashSet<String> = sqlx::query_scalar(
        "SELECT cycle FROM cycle_closures WHERE kind = $1 AND time_zone = $2 AND cut_off > $3",
    )
    .bind(kind.as_str())
    .bind(zone.name())
    .bind(earliest)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let mut cycle = Cycle::containing(kind, zone, earliest);
    while closed.contains(&cycle.key()) {
        cycle = cycle.next();
    }
    Ok(Some(cycle))
}

/// One line of a cycle, with what its statements show.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct CycleLine {
    pub line_id: String,
    pub kind: String,
    pub partnership_id: String,
    pub terms_version: i32,
    pub rule: String,
    pub minimum_payout_minor: i64,
    pub referrer_merchant_id: String,
    pub acceptor_merchant_id: String,
    pub purchase_id: String,
    pub refund_id: Option<String>,
    pub transaction_id: Option<String>,
    pub referral_id: Option<String>,
    pub referrer_reference: Option<String>,
    pub payable_at: DateTime<Utc>,
    pub currency: String,
    pub base_amount_minor: i64,
    pub amount_minor: i64,
}

/// A cycle line parsed for netting.
struct Netted {
    line: CycleLine,
    referrer: MerchantId,
    acceptor: MerchantId,
    currency: Currency,
}

impl Line for Netted {
    fn payer(&self) -> &MerchantId {
        &self.acceptor
    }
    fn payee(&self) -> &MerchantId {
        &self.referrer
    }
    fn currency(&self) -> Currency {
        self.currency
    }
    fn amount_minor(&self) -> i64 {
        self.line.amount_minor
    }
}

pub(crate) const LINE_COLUMNS: &str = "l.line_id, l.kind, l.partnership_id, l.terms_version, t.rule, t.minimum_payout_minor, \
    l.referrer_merchant_id, l.acceptor_merchant_id, l.purchase_id, l.refund_id, a.transaction_id, a.referral_id, \
    a.referrer_reference, l.payable_at, l.currency, l.base_amount_minor, l.amount_minor";

/// Statement lines of `merchant` from `line`: positive is owed to the merchant.
pub(crate) fn statement_line(
    line: &CycleLine,
    merchant: &str,
    status: LineStatus,
) -> Result<StatementLine, SettlementError> {
    let as_referrer = line.referrer_merchant_id == merchant;
    let counterparty = if as_referrer {
        &line.acceptor_merchant_id
    } else {
        &line.referrer_merchant_id
    };
    Ok(StatementLine {
        kind: if line.kind == "clawback" {
            LineKind::Clawback
        } else {
            LineKind::Commission
        },
        status,
        counterparty: MerchantId::parse("counterparty", counterparty)?,
        partnership_id: PartnershipId::parse("partnership_id", &line.partnership_id)?,
        terms_version: u32::try_from(line.terms_version).unwrap_or(0),
        rule: line.rule.clone(),
        purchase_id: line.purchase_id.clone(),
        refund_id: line.refund_id.clone(),
        transaction_id: line.transaction_id.clone().unwrap_or_default(),
        referral_id: line.referral_id.clone().unwrap_or_default(),
        referrer_reference: line.referrer_reference.clone().unwrap_or_default(),
        payable_at: line.payable_at,
        currency: Currency::parse("currency", &line.currency)?,
        purchase_amount_minor: line.base_amount_minor,
        amount_minor: if as_referrer {
            line.amount_minor
        } else {
            -line.amount_minor
        },
    })
}

/// A stable id for one announcement of one closure.
fn announcement_id(parts: &str) -> Uuid {
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

/// Projects `closure`: nets its lines, issues the statements, records the payout instructions
/// and, when `announce`, enqueues the settlement events.
async fn project(
    tx: &mut PgConnection,
    closure: &Closure,
    announce: bool,
) -> Result<ClosureSummary, SettlementError> {
    let lines: Vec<CycleLine> = sqlx::query_as(&format!(
        "SELECT {LINE_COLUMNS} {GROUP_JOIN} LEFT JOIN attributions a ON a.purchase_id = l.purchase_id \
         WHERE l.settled_in IS NULL AND l.payable_at < $1 AND l.seq <= $2 AND t.cycle_kind = $3 AND m.time_zone = $4 \
         ORDER BY l.payable_at, l.line_id"
    ))
    .bind(closure.cut_off)
    .bind(closure.line_watermark)
    .bind(&closure.kind)
    .bind(&closure.time_zone)
    .fetch_all(&mut *tx)
    .await?;
    let mut minimum: HashMap<(MerchantId, Currency), i64> = HashMap::new();
    let mut netted = Vec::with_capacity(lines.len());
    for line in lines {
        let referrer = MerchantId::parse("referrer_merchant_id", &line.referrer_merchant_id)?;
        let acceptor = MerchantId::parse("acceptor_merchant_id", &line.acceptor_merchant_id)?;
        let currency = Currency::parse("currency", &line.currency)?;
        let entry = minimum.entry((referrer.clone(), currency)).or_default();
        *entry = (*entry).max(line.minimum_payout_minor);
        netted.push(Netted {
            line,
            referrer,
            acceptor,
            currency,
        });
    }
    let netting = net(netted, |merchant, currency| {
        minimum
            .get(&(merchant.clone(), currency))
            .copied()
            .unwrap_or(0)
    });

    // Each merchant's lines, in the cycle's order (payable_at, then line id): settled and
    // carried forward interleaved as they were.
    let mut order: Vec<(&CycleLine, Option<&MerchantId>)> = netting
        .settled
        .iter()
        .map(|n| (&n.line, None))
        .chain(
            netting
                .carried
                .iter()
                .map(|(n, holder)| (&n.line, Some(holder))),
        )
        .collect();
    order.sort_by(|a, b| {
        a.0.payable_at
            .cmp(&b.0.payable_at)
            .then_with(|| a.0.line_id.cmp(&b.0.line_id))
    });
    let mut per_merchant: BTreeMap<&str, Vec<StatementLine>> = BTreeMap::new();
    for (line, held) in &order {
        let status = if held.is_some() {
            LineStatus::CarriedForward
        } else {
            LineStatus::Settled
        };
        for merchant in [&line.referrer_merchant_id, &line.acceptor_merchant_id] {
            per_merchant
                .entry(merchant.as_str())
                .or_default()
                .push(statement_line(line, merchant, status)?);
        }
    }
    let merchants: Vec<&str> = per_merchant.keys().copied().collect();
    let numbers: HashMap<String, i32> = sqlx::query_as::<_, (String, i32)>(
        "SELECT merchant_id, max(number) FROM statements WHERE merchant_id = ANY($1) GROUP BY merchant_id",
    )
    .bind(&merchants)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();

    let mut statement_rows = Vec::with_capacity(per_merchant.len());
    let mut outbox = Vec::new();
    for (merchant, lines) in per_merchant {
        let number = numbers.get(merchant).copied().unwrap_or(0) + 1;
        let statement = Statement {
            merchant_id: MerchantId::parse("merchant_id", merchant)?,
            number: u32::try_from(number).unwrap_or(0),
            cycle: closure.cycle.clone(),
            cut_off: closure.cut_off,
            issued_at: closure.closed_at,
            corrects: None,
            lines,
        };
        let hash = statement.content_hash();
        let totals = totals_to_proto(&statement);
        if announce {
            let event = pb::SettlementEvent {
                event_id: announcement_id(&format!("{}/statement/{merchant}", closure.cycle))
                    .to_string(),
                schema_version: 1,
                merchant_id: merchant.to_owned(),
                recorded_at: Some(timestamp(closure.closed_at)),
                event: Some(pb::settlement_event::Event::StatementIssued(
                    pb::StatementIssued {
                        number: statement.number,
                        cycle: closure.cycle.clone(),
                        cut_off: Some(timestamp(closure.cut_off)),
                        content_hash: hash.clone(),
                        line_count: u32::try_from(statement.lines.len()).unwrap_or(u32::MAX),
                        totals: totals.clone(),
                        corrects_statement_number: 0,
                    },
                )),
            };
            outbox.push(settlement_message(merchant, &event));
        }
        statement_rows.push((
            merchant.to_owned(),
            number,
            hash,
            i32::try_from(statement.lines.len()).unwrap_or(i32::MAX),
            serde_json::to_value(totals_json(&totals)).unwrap_or_default(),
        ));
    }
    for chunk in statement_rows.chunks(1000) {
        let mut query: QueryBuilder<Postgres> = QueryBuilder::new(
            "INSERT INTO statements (merchant_id, number, cycle, cut_off, issued_at, corrects_number, content_hash, line_count, totals) ",
        );
        query.push_values(chunk, |mut row, (merchant, number, hash, count, totals)| {
            row.push_bind(merchant)
                .push_bind(number)
                .push_bind(&closure.cycle)
                .push_bind(closure.cut_off)
                .push_bind(closure.closed_at)
                .push_bind(None::<i32>)
                .push_bind(hash)
                .push_bind(count)
                .push_bind(totals);
        });
        query.build().execute(&mut *tx).await?;
    }

    let settled_ids: Vec<&str> = netting
        .settled
        .iter()
        .map(|n| n.line.line_id.as_str())
        .collect();
    sqlx::query("UPDATE lines SET settled_in = $1 WHERE line_id = ANY($2)")
        .bind(&closure.cycle)
        .bind(&settled_ids)
        .execute(&mut *tx)
        .await?;
    let (carried_ids, holders): (Vec<&str>, Vec<&str>) = netting
        .carried
        .iter()
        .map(|(n, holder)| (n.line.line_id.as_str(), holder.as_str()))
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
    let mut instructions = Vec::with_capacity(netting.transfers.len());
    for transfer in &netting.transfers {
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
        statements: u32::try_from(statement_rows.len()).unwrap_or(u32::MAX),
        settled_lines: netting.settled.len() as u64,
        carried_forward_lines: netting.carried.len() as u64,
        payout_instructions: u32::try_from(instructions.len()).unwrap_or(u32::MAX),
        closed_now: true,
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
    Ok(summary)
}

fn settlement_message(merchant: &str, event: &pb::SettlementEvent) -> OutboxMessage {
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

fn totals_json(totals: &[pb::StatementTotal]) -> Vec<TotalJson> {
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
    let groups: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT DISTINCT t.cycle_kind, m.time_zone {GROUP_JOIN} WHERE l.settled_in IS NULL"
    ))
    .fetch_all(pool)
    .await?;
    let mut closed = 0;
    for (kind, zone) in groups {
        let kind = CycleKind::parse("cycle_kind", &kind)?;
        let zone = tandem_domain::settlement::parse_time_zone("time_zone", &zone)?;
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
    }
    Ok(closed)
}
