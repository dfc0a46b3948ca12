//! Idempotent consumption: a consumer records the id of every message it applies in the same
//! transaction as the message's effect, and skips ids already recorded.

use std::collections::HashSet;

use sqlx::PgConnection;

use crate::StoreError;

/// Records `message_ids` as applied and returns those that were not applied before: the caller
/// applies exactly these, in the same transaction. A concurrent consumer holding the same id
/// blocks here until it commits or rolls back, so an id is never applied twice.
pub async fn claim_unapplied(
    connection: &mut PgConnection,
    message_ids: &[String],
) -> Result<HashSet<String>, StoreError> {
    if message_ids.is_empty() {
        return Ok(HashSet::new());
    }
    let claimed: Vec<String> = sqlx::query_scalar(
        "INSERT INTO applied_messages (message_id) SELECT * FROM UNNEST($1::text[]) \
         ON CONFLICT (message_id) DO NOTHING RETURNING message_id",
    )
    .bind(message_ids)
    .fetch_all(connection)
    .await?;
    Ok(claimed.into_iter().collect())
}
