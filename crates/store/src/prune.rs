//! Pruning of the bookkeeping tables that grow with traffic (the marks of applied messages, the
//! gateway's idempotency records): rows older than their table's retention are deleted in
//! bounded batches, oldest first, so a prune never holds many locks or one long transaction.
//! The schedule and why it keeps exactly-once are in docs/SECURITY.md, "Bookkeeping retention".

use std::time::Duration;

use sqlx::PgPool;

use crate::StoreError;

/// Rows deleted per statement.
const BATCH: i64 = 5_000;

/// A table whose rows are deleted once `keep_for` has passed since their timestamp column.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Table in the service's schema (a constant of the code, never input).
    pub table: &'static str,
    /// Its `TIMESTAMPTZ` column saying when the row was written; indexed.
    pub written_at: &'static str,
    /// SQL condition that keeps a row whatever its age (`TRUE` prunes every old row).
    pub prunable: &'static str,
    pub keep_for: Duration,
}

impl Retention {
    /// The marks of applied messages (`applied_messages`), kept for `keep_for`.
    pub fn applied_messages(keep_for: Duration) -> Self {
        Self {
            table: "applied_messages",
            written_at: "applied_at",
            prunable: "TRUE",
            keep_for,
        }
    }
}

/// Deletes the rows of `retention.table` older than its retention; returns how many.
pub async fn prune(pool: &PgPool, retention: &Retention) -> Result<u64, StoreError> {
    let statement = format!(
        "DELETE FROM {table} WHERE ctid = ANY(ARRAY( \
           SELECT ctid FROM {table} \
           WHERE {written_at} < now() - make_interval(secs => $1) AND ({prunable}) \
           ORDER BY {written_at} LIMIT $2))",
        table = retention.table,
        written_at = retention.written_at,
        prunable = retention.prunable,
    );
    let keep_for_secs = retention.keep_for.as_secs_f64();
    let mut deleted = 0;
    loop {
        let batch = sqlx::query(&statement)
            .bind(keep_for_secs)
            .bind(BATCH)
            .execute(pool)
            .await?
            .rows_affected();
        deleted += batch;
        if batch < BATCH as u64 {
            return Ok(deleted);
        }
        // Leave room for the service's own statements between batches.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
