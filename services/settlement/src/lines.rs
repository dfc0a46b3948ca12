//! Reading the lines a closure covers, compactly and in parallel.
//!
//! A closure of a cycle kind and zone covers the lines whose terms settle on that kind and whose
//! acceptor is in that zone, payable before its cut-off and numbered up to its watermark. Its
//! lines are those it covers that the previous closure of the same kind and zone did not cover,
//! plus those that closure carried forward. The lines are read in `parts` queries at once (split
//! by line number), decoded straight into compact rows (merchants and terms as indices), and
//! sorted by payable instant, then line id: the order of every statement.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres, Row as _};
use tandem_domain::ids::{MerchantId, PartnershipId};
use tandem_domain::money::Currency;
use tandem_domain::statement::{LineKind, LineStatus, StatementLine};

use crate::close::Closure;
use crate::SettlementError;

/// One terms version of the closure's kind and zone.
#[derive(Debug, Clone)]
pub(crate) struct TermsVersion {
    pub partnership_id: PartnershipId,
    pub version: i32,
    pub rule: String,
    pub minimum_payout_minor: i64,
}

/// The terms versions settling on a kind in a zone (by the acceptor's zone).
pub(crate) async fn group_terms(
    connection: &mut PgConnection,
    kind: &str,
    zone: &str,
) -> Result<Vec<TermsVersion>, SettlementError> {
    let rows: Vec<(String, i32, String, i64)> = sqlx::query_as(
        "SELECT t.partnership_id, t.terms_version, t.rule, t.minimum_payout_minor \
         FROM partnership_terms t JOIN merchants m ON m.merchant_id = t.acceptor_merchant_id \
         WHERE t.cycle_kind = $1 AND m.time_zone = $2 ORDER BY 1, 2",
    )
    .bind(kind)
    .bind(zone)
    .fetch_all(&mut *connection)
    .await?;
    rows.into_iter()
        .map(|(partnership_id, version, rule, minimum_payout_minor)| {
            Ok(TermsVersion {
                partnership_id: PartnershipId::parse("partnership_id", &partnership_id)?,
                version,
                rule,
                minimum_payout_minor,
            })
        })
        .collect()
}

/// A line of a closure, compact: merchants and terms are indices into [`ClosureLines`]' tables.
#[derive(Debug)]
pub(crate) struct LineRow {
    pub line_id: Box<str>,
    pub kind: LineKind,
    pub terms: u32,
    pub referrer: u32,
    pub acceptor: u32,
    pub purchase_id: Box<str>,
    pub refund_id: Option<Box<str>>,
    pub transaction_id: Box<str>,
    pub referral_id: Box<str>,
    pub referrer_reference: Box<str>,
    pub payable_at: DateTime<Utc>,
    pub currency: Currency,
    pub base_amount_minor: i64,
    pub amount_minor: i64,
    /// An adjustment's reason, shown in place of the rule.
    pub note: Option<Box<str>>,
}

/// A closure's lines in statement order, with the tables their indices point into.
pub(crate) struct ClosureLines {
    pub terms: Vec<TermsVersion>,
    pub merchants: Vec<MerchantId>,
    pub rows: Vec<LineRow>,
}

impl ClosureLines {
    /// `row` as a line of `merchant`'s statement: positive is owed to the merchant.
    pub fn statement_line(
        &self,
        row: &LineRow,
        merchant: u32,
        status: LineStatus,
    ) -> StatementLine {
        let terms = &self.terms[row.terms as usize];
        let as_referrer = row.referrer == merchant;
        let counterparty = if as_referrer {
            row.acceptor
        } else {
            row.referrer
        };
        StatementLine {
            kind: row.kind,
            status,
            counterparty: self.merchants[counterparty as usize].clone(),
            partnership_id: terms.partnership_id.clone(),
            terms_version: u32::try_from(terms.version).unwrap_or(0),
            rule: row
                .note
                .as_deref()
                .map_or_else(|| terms.rule.clone(), str::to_owned),
            purchase_id: row.purchase_id.to_string(),
            refund_id: row.refund_id.as_ref().map(|r| r.to_string()),
            transaction_id: row.transaction_id.to_string(),
            referral_id: row.referral_id.to_string(),
            referrer_reference: row.referrer_reference.to_string(),
            payable_at: row.payable_at,
            currency: row.currency,
            purchase_amount_minor: row.base_amount_minor,
            amount_minor: if as_referrer {
                row.amount_minor
            } else {
                -row.amount_minor
            },
        }
    }
}

/// Which lines to read.
pub(crate) struct Selection<'a> {
    pub closure: &'a Closure,
    /// Line ids the previous closure of the kind and zone carried forward.
    pub carried_before: &'a [String],
    /// Only the lines of this merchant (for one statement).
    pub merchant: Option<&'a str>,
}

const COLUMNS: &str = "l.line_id, l.kind, l.partnership_id, l.terms_version, l.referrer_merchant_id, \
    l.acceptor_merchant_id, l.purchase_id, l.refund_id, l.transaction_id, l.referral_id, l.referrer_reference, \
    l.payable_at, l.currency, l.base_amount_minor, l.amount_minor, l.note";

/// A line's stored kind.
pub(crate) fn line_kind(kind: &str) -> LineKind {
    match kind {
        "clawback" => LineKind::Clawback,
        "adjustment" => LineKind::Adjustment,
        _ => LineKind::Commission,
    }
}

/// A line kind on the API.
pub(crate) fn kind_to_proto(kind: LineKind) -> i32 {
    use tandem_proto::v1::StatementLineKind as Kind;
    (match kind {
        LineKind::Commission => Kind::Commission,
        LineKind::Clawback => Kind::Clawback,
        LineKind::Adjustment => Kind::Adjustment,
    }) as i32
}

/// The closure's lines (or one merchant's), read by one query on each of `readers` at once.
/// Lines never change, so reading them outside the closing transaction sees what it would.
pub(crate) async fn read(
    readers: Vec<PoolConnection<Postgres>>,
    terms: Vec<TermsVersion>,
    selection: &Selection<'_>,
) -> Result<ClosureLines, SettlementError> {
    let closure = selection.closure;
    let partnership_ids: Vec<&str> = terms.iter().map(|t| t.partnership_id.as_str()).collect();
    let versions: Vec<i32> = terms.iter().map(|t| t.version).collect();
    let mut terms_index: HashMap<String, Vec<(i32, u32)>> = HashMap::new();
    for (index, t) in terms.iter().enumerate() {
        terms_index
            .entry(t.partnership_id.to_string())
            .or_default()
            .push((t.version, u32::try_from(index).unwrap_or(u32::MAX)));
    }
    let terms_index = Arc::new(terms_index);
    let merchant_filter = if selection.merchant.is_some() {
        "AND (l.referrer_merchant_id = $9 OR l.acceptor_merchant_id = $9)"
    } else {
        "AND $9::text IS NULL"
    };
    let sql = format!(
        "SELECT {COLUMNS} FROM lines l \
         WHERE l.payable_at < $1 AND l.seq <= $2 \
           AND (l.partnership_id, l.terms_version) IN (SELECT * FROM UNNEST($3::text[], $4::int[])) \
           AND ($5::timestamptz IS NULL OR l.payable_at >= $5 OR l.seq > $6 OR l.line_id = ANY($7)) \
           AND l.seq % $10 = $8 {merchant_filter}"
    );
    let parts = u32::try_from(readers.len()).unwrap_or(1).max(1);
    let reads = readers
        .into_iter()
        .zip(0..parts)
        .map(|(mut connection, part)| {
            let sql = sql.clone();
            let terms_index = terms_index.clone();
            let partnership_ids: Vec<String> =
                partnership_ids.iter().map(|s| (*s).to_owned()).collect();
            let versions = versions.clone();
            let carried: Vec<String> = selection.carried_before.to_vec();
            let merchant = selection.merchant.map(str::to_owned);
            let (cut_off, watermark) = (closure.cut_off, closure.line_watermark);
            let (previous_cut_off, previous_watermark) = (
                closure.previous_cut_off,
                closure.previous_watermark.unwrap_or(0),
            );
            async move {
                let mut merchants: Vec<String> = Vec::new();
                let mut merchant_index: HashMap<String, u32> = HashMap::new();
                let mut rows = Vec::new();
                let mut stream = sqlx::query(&sql)
                    .bind(cut_off)
                    .bind(watermark)
                    .bind(&partnership_ids)
                    .bind(&versions)
                    .bind(previous_cut_off)
                    .bind(previous_watermark)
                    .bind(&carried)
                    .bind(i64::from(part))
                    .bind(merchant.as_deref())
                    .bind(i64::from(parts))
                    .fetch(&mut *connection);
                let mut intern = |id: &str| -> u32 {
                    if let Some(index) = merchant_index.get(id) {
                        return *index;
                    }
                    let index = u32::try_from(merchants.len()).unwrap_or(u32::MAX);
                    merchants.push(id.to_owned());
                    merchant_index.insert(id.to_owned(), index);
                    index
                };
                while let Some(row) = stream.try_next().await? {
                    let partnership: &str = row.try_get(2)?;
                    let version: i32 = row.try_get(3)?;
                    let terms = terms_index
                        .get(partnership)
                        .and_then(|versions| versions.iter().find(|(v, _)| *v == version))
                        .map(|(_, index)| *index)
                        .ok_or(SettlementError::Invariant(
                            "a line outside its closure's terms",
                        ))?;
                    let kind: &str = row.try_get(1)?;
                    let currency: &str = row.try_get(12)?;
                    rows.push(LineRow {
                        line_id: row.try_get::<&str, _>(0)?.into(),
                        kind: line_kind(kind),
                        terms,
                        referrer: intern(row.try_get(4)?),
                        acceptor: intern(row.try_get(5)?),
                        purchase_id: row.try_get::<&str, _>(6)?.into(),
                        refund_id: row.try_get::<Option<&str>, _>(7)?.map(Into::into),
                        transaction_id: row.try_get::<&str, _>(8)?.into(),
                        referral_id: row.try_get::<&str, _>(9)?.into(),
                        referrer_reference: row.try_get::<&str, _>(10)?.into(),
                        payable_at: row.try_get(11)?,
                        currency: Currency::parse("currency", currency)?,
                        base_amount_minor: row.try_get(13)?,
                        amount_minor: row.try_get(14)?,
                        note: row.try_get::<Option<&str>, _>(15)?.map(Into::into),
                    });
                }
                Ok::<_, SettlementError>((merchants, rows))
            }
        });
    let parts_read = futures::future::try_join_all(reads).await?;

    // One merchant table for every part, in id order (so indices compare like ids).
    let mut all: Vec<String> = parts_read
        .iter()
        .flat_map(|(m, _)| m.iter().cloned())
        .collect();
    all.sort();
    all.dedup();
    let global: HashMap<&str, u32> = all
        .iter()
        .enumerate()
        .map(|(index, id)| (id.as_str(), u32::try_from(index).unwrap_or(u32::MAX)))
        .collect();
    let mut remapped = Vec::with_capacity(parts_read.iter().map(|(_, r)| r.len()).sum());
    for (local, part_rows) in parts_read {
        let remap: Vec<u32> = local.iter().map(|id| global[id.as_str()]).collect();
        for mut row in part_rows {
            row.referrer = remap[row.referrer as usize];
            row.acceptor = remap[row.acceptor as usize];
            remapped.push(row);
        }
    }
    let merchants = all
        .iter()
        .map(|id| MerchantId::parse("merchant_id", id))
        .collect::<Result<Vec<_>, _>>()?;
    remapped.sort_unstable_by(|a, b| {
        a.payable_at
            .cmp(&b.payable_at)
            .then_with(|| a.line_id.cmp(&b.line_id))
    });
    Ok(ClosureLines {
        terms,
        merchants,
        rows: remapped,
    })
}

/// `count` connections for [`read`], taken before a closure takes the intake lock: a closure that
/// holds the lock never waits for the pool.
pub(crate) async fn readers(
    pool: &PgPool,
    count: u32,
) -> Result<Vec<PoolConnection<Postgres>>, SettlementError> {
    let mut readers = Vec::with_capacity(count as usize);
    for _ in 0..count.max(1) {
        readers.push(pool.acquire().await?);
    }
    Ok(readers)
}
