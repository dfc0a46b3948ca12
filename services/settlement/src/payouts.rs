//! Payout instructions: the transfers that clear a closed cycle's net positions, with the payout
//! accounts of the two merchants: the latest each had registered when the cycle closed or, for a
//! merchant that had none then, the first it registered after. Once chosen, an instruction's
//! accounts never change (a later registration applies to later cycles), so its payout file is
//! the same every time it is written.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tandem_proto::time::timestamp;
use tandem_proto::v1 as pb;

use crate::SettlementError;

#[derive(sqlx::FromRow)]
struct Row {
    cycle: String,
    currency: String,
    sequence: i32,
    from_merchant_id: String,
    to_merchant_id: String,
    amount_minor: i64,
    from_iban: Option<String>,
    from_bic: Option<String>,
    from_holder: Option<String>,
    from_registered_at: Option<DateTime<Utc>>,
    to_iban: Option<String>,
    to_bic: Option<String>,
    to_holder: Option<String>,
    to_registered_at: Option<DateTime<Utc>>,
}

/// Instructions of one cycle (or every cycle, newest first), optionally one currency, in
/// currency and sequence order, from `offset`.
pub async fn list(
    pool: &PgPool,
    cycle: Option<&str>,
    currency: Option<&str>,
    offset: i64,
    limit: i64,
) -> Result<Vec<pb::PayoutInstruction>, SettlementError> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT p.cycle, p.currency, p.sequence, p.from_merchant_id, p.to_merchant_id, p.amount_minor, \
           f.iban AS from_iban, f.bic AS from_bic, f.account_holder AS from_holder, f.registered_at AS from_registered_at, \
           t.iban AS to_iban, t.bic AS to_bic, t.account_holder AS to_holder, t.registered_at AS to_registered_at \
         FROM payout_instructions p JOIN cycle_closures k USING (cycle) \
           LEFT JOIN LATERAL (SELECT * FROM payout_accounts a WHERE a.merchant_id = p.from_merchant_id \
             ORDER BY a.received <= k.account_watermark DESC, \
               CASE WHEN a.received <= k.account_watermark THEN -a.received ELSE a.received END LIMIT 1) f ON true \
           LEFT JOIN LATERAL (SELECT * FROM payout_accounts a WHERE a.merchant_id = p.to_merchant_id \
             ORDER BY a.received <= k.account_watermark DESC, \
               CASE WHEN a.received <= k.account_watermark THEN -a.received ELSE a.received END LIMIT 1) t ON true \
         WHERE ($1::text IS NULL OR p.cycle = $1) AND ($2::text IS NULL OR p.currency = $2) \
         ORDER BY k.closure DESC, p.currency, p.sequence OFFSET $3 LIMIT $4",
    )
    .bind(cycle)
    .bind(currency)
    .bind(offset)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let account = |merchant: &str,
                           iban: Option<String>,
                           bic: Option<String>,
                           holder: Option<String>,
                           at: Option<DateTime<Utc>>| {
                iban.map(|iban| pb::PayoutAccount {
                    merchant_id: merchant.to_owned(),
                    iban,
                    bic: bic.unwrap_or_default(),
                    account_holder: holder.unwrap_or_default(),
                    registered_at: at.map(timestamp),
                })
            };
            pb::PayoutInstruction {
                instruction_id: format!("{}/{}/{}", row.cycle, row.currency, row.sequence),
                from_account: account(
                    &row.from_merchant_id,
                    row.from_iban,
                    row.from_bic,
                    row.from_holder,
                    row.from_registered_at,
                ),
                to_account: account(
                    &row.to_merchant_id,
                    row.to_iban,
                    row.to_bic,
                    row.to_holder,
                    row.to_registered_at,
                ),
                cycle: row.cycle,
                currency: row.currency,
                sequence: u32::try_from(row.sequence).unwrap_or(0),
                from_merchant_id: row.from_merchant_id,
                to_merchant_id: row.to_merchant_id,
                amount_minor: row.amount_minor,
            }
        })
        .collect())
}

/// Why a payout file cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum FileRefused {
    #[error("cycle {0} is not closed; ListSettlementCycles shows the closed ones")]
    NotClosed(String),
    #[error("cycle {cycle} has no payout instruction in {currency}: nobody owes anybody in it")]
    Nothing { cycle: String, currency: String },
    #[error("these merchants have not registered a payout account, so the bank file cannot name their accounts: {}; they register one with RegisterPayoutAccount", .0.join(", "))]
    MissingAccounts(Vec<String>),
}

/// The pain.001 file of a closed cycle's instructions in `currency`, to be executed on
/// `execution_date` (default: the day after the cycle closed, UTC).
pub async fn payout_file(
    pool: &PgPool,
    cycle: &str,
    currency: tandem_domain::money::Currency,
    execution_date: Option<chrono::NaiveDate>,
) -> Result<Result<crate::pain001::PayoutFile, FileRefused>, SettlementError> {
    let closed_at: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT closed_at FROM cycle_closures WHERE cycle = $1")
            .bind(cycle)
            .fetch_optional(pool)
            .await?;
    let Some(closed_at) = closed_at else {
        return Ok(Err(FileRefused::NotClosed(cycle.to_owned())));
    };
    let instructions = list(pool, Some(cycle), Some(currency.as_str()), 0, i64::MAX).await?;
    if instructions.is_empty() {
        return Ok(Err(FileRefused::Nothing {
            cycle: cycle.to_owned(),
            currency: currency.to_string(),
        }));
    }
    let date = execution_date.unwrap_or_else(|| {
        closed_at
            .date_naive()
            .succ_opt()
            .unwrap_or(closed_at.date_naive())
    });
    Ok(
        crate::pain001::write(cycle, currency, closed_at, date, &instructions)
            .map_err(|missing| FileRefused::MissingAccounts(missing.0)),
    )
}
