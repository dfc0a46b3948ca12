//! Idempotency keys. Each write runs in one transaction that first takes a lock on its
//! (merchant, key) pair, so two concurrent tries of one request are serialised: the second waits
//! for the first to commit and then returns its answer.

use prost::Message;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use crate::{GatewayError, State};

/// The owner of operator calls' idempotency keys (never a merchant id, which has a `mer_`
/// prefix).
pub const OPERATOR: &str = "operator";

/// The retention of merchants' idempotency records; operators' are kept (a second merchant
/// created by a retry a week later would be a second merchant).
pub fn retention(keep_for: std::time::Duration) -> tandem_store::Retention {
    tandem_store::Retention {
        table: "idempotency_records",
        written_at: "recorded_at",
        prunable: "merchant_id <> 'operator'",
        keep_for,
    }
}

/// What identifies one idempotent write.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// Whose key it is: a merchant id, or [`OPERATOR`] for operator calls.
    pub owner: &'a str,
    pub key: &'a str,
    pub operation: &'static str,
    /// SHA-256 of the request after pseudonymisation.
    pub fingerprint: &'a [u8],
}

/// How an idempotent write begins: with the first answer to a retried request, or with a fresh
/// transaction to do the work in.
pub enum Begun<R> {
    Replayed(R),
    Fresh(Transaction<'static, Postgres>),
}

/// Opens the write's transaction and checks its idempotency key (see [`begin`]).
pub async fn start<R: Message + Default>(
    pool: &PgPool,
    scope: &Scope<'_>,
) -> Result<Begun<R>, GatewayError> {
    let mut tx = pool.begin().await?;
    match begin(
        &mut tx,
        scope.owner,
        scope.key,
        scope.operation,
        scope.fingerprint,
    )
    .await?
    {
        Some(previous) => {
            tracing::info!(
                operation = scope.operation,
                "idempotent retry answered from the first response"
            );
            Ok(Begun::Replayed(R::decode(previous.as_slice())?))
        }
        None => Ok(Begun::Fresh(tx)),
    }
}

/// Stores the answer with the write, commits, and wakes the outbox relay.
pub async fn complete<R: Message>(
    state: &State,
    mut tx: Transaction<'static, Postgres>,
    scope: &Scope<'_>,
    response: &R,
) -> Result<(), GatewayError> {
    finish(
        &mut tx,
        scope.owner,
        scope.key,
        scope.operation,
        scope.fingerprint,
        &response.encode_to_vec(),
    )
    .await?;
    tx.commit().await?;
    state.outbox_written.notify_one();
    Ok(())
}

/// Checks the key inside a transaction the caller already holds (a bulk call writes many items
/// in one): the stored answer to a retried request, or `None` for a new key. The key's lock is
/// held until that transaction ends.
pub async fn check<R: Message + Default>(
    connection: &mut PgConnection,
    scope: &Scope<'_>,
) -> Result<Option<R>, GatewayError> {
    begin(
        connection,
        scope.owner,
        scope.key,
        scope.operation,
        scope.fingerprint,
    )
    .await?
    .map(|previous| R::decode(previous.as_slice()).map_err(GatewayError::from))
    .transpose()
}

/// Stores the answer to a new key in the caller's transaction (see [`check`]).
pub async fn store<R: Message>(
    connection: &mut PgConnection,
    scope: &Scope<'_>,
    response: &R,
) -> Result<(), GatewayError> {
    finish(
        connection,
        scope.owner,
        scope.key,
        scope.operation,
        scope.fingerprint,
        &response.encode_to_vec(),
    )
    .await
}

/// Starts an idempotent write: returns the stored answer if this key was already used for the
/// same request, an error if it was used for a different one, and `None` for a new key.
async fn begin(
    connection: &mut PgConnection,
    owner: &str,
    idempotency_key: &str,
    operation: &str,
    fingerprint: &[u8],
) -> Result<Option<Vec<u8>>, GatewayError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || ':' || $2, 0))")
        .bind(owner)
        .bind(idempotency_key)
        .execute(&mut *connection)
        .await?;
    let previous: Option<(String, Vec<u8>, Vec<u8>)> = sqlx::query_as(
        "SELECT operation, request_fingerprint, response FROM idempotency_records \
         WHERE merchant_id = $1 AND idempotency_key = $2",
    )
    .bind(owner)
    .bind(idempotency_key)
    .fetch_optional(&mut *connection)
    .await?;
    match previous {
        None => Ok(None),
        Some((previous_operation, previous_fingerprint, response))
            if previous_operation == operation
                && crate::commands::same_request(&previous_fingerprint, fingerprint) =>
        {
            Ok(Some(response))
        }
        Some((previous_operation, _, _)) => Err(GatewayError::AlreadyExists(format!(
            "idempotency_key {idempotency_key:?} was already used for a different {previous_operation} request; \
             a retry must repeat the request exactly, and a new request needs a new key"
        ))),
    }
}

/// Stores the answer to a new key, in the same transaction as the write.
async fn finish(
    connection: &mut PgConnection,
    owner: &str,
    idempotency_key: &str,
    operation: &str,
    fingerprint: &[u8],
    response: &[u8],
) -> Result<(), GatewayError> {
    sqlx::query(
        "INSERT INTO idempotency_records \
         (merchant_id, idempotency_key, operation, request_fingerprint, response) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(owner)
    .bind(idempotency_key)
    .bind(operation)
    .bind(fingerprint)
    .bind(response)
    .execute(connection)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_keeps_the_operators_records() {
        let retention = retention(std::time::Duration::from_secs(86_400));
        assert_eq!(retention.prunable, format!("merchant_id <> '{OPERATOR}'"));
    }
}
