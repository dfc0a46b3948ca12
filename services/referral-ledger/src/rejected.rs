//! Messages the ledger could not apply: undecodable, refused by the domain, or failing alone on
//! a constraint. Each is kept with its reason, its position and its bytes, and skipped, so that
//! nothing blocks a partition. An operator lists them and, once the cause is fixed, replays one
//! (`referral-ledger --list-rejected`, `--replay-rejected <ref>`): the stored bytes go through the
//! same stage again, as if redelivered.

// Row and column tuples here mirror the SQL statements' columns one to one.
#![allow(clippy::type_complexity)]

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use tandem_bus::Delivery;

use crate::LedgerError;

#[derive(Debug, Clone)]
pub struct Rejected {
    /// The message id when it could be read; otherwise its position.
    pub message_ref: String,
    pub reason: String,
    pub topic: &'static str,
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Rejected {
    pub fn of(delivery: &Delivery, message_id: Option<String>, reason: String) -> Self {
        let position = format!(
            "{}/{}/{}",
            delivery.topic.logical_name(),
            delivery.partition,
            delivery.offset
        );
        Self {
            message_ref: message_id.map_or(position.clone(), |id| format!("{id}@{position}")),
            reason,
            topic: delivery.topic.logical_name(),
            partition: delivery.partition,
            offset: delivery.offset,
            key: delivery.key.clone(),
            payload: delivery.payload.clone(),
        }
    }
}

/// Records `rejected` in one statement.
pub async fn record(
    connection: &mut PgConnection,
    rejected: &[Rejected],
) -> Result<(), LedgerError> {
    if rejected.is_empty() {
        return Ok(());
    }
    for r in rejected {
        tracing::error!(message_ref = %r.message_ref, topic = r.topic, partition = r.partition, offset = r.offset, reason = %r.reason, "message rejected; kept in rejected_messages and skipped");
    }
    let mut c: (
        Vec<&str>,
        Vec<&str>,
        Vec<&str>,
        Vec<i32>,
        Vec<i64>,
        Vec<&[u8]>,
        Vec<&[u8]>,
    ) = Default::default();
    for r in rejected {
        c.0.push(&r.message_ref);
        c.1.push(&r.reason);
        c.2.push(r.topic);
        c.3.push(r.partition);
        c.4.push(r.offset);
        c.5.push(&r.key);
        c.6.push(&r.payload);
    }
    sqlx::query(
        "INSERT INTO rejected_messages (message_ref, reason, topic, partition, \"offset\", key, payload) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[], $6::bytea[], $7::bytea[]) \
         ON CONFLICT (message_ref) DO NOTHING",
    )
    .bind(c.0)
    .bind(c.1)
    .bind(c.2)
    .bind(c.3)
    .bind(c.4)
    .bind(c.5)
    .bind(c.6)
    .execute(connection)
    .await?;
    Ok(())
}

/// One rejected message, as listed to an operator.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RejectedRow {
    pub message_ref: String,
    pub reason: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub rejected_at: DateTime<Utc>,
}

/// Every rejected message, oldest first.
pub async fn list(pool: &sqlx::PgPool) -> Result<Vec<RejectedRow>, LedgerError> {
    Ok(sqlx::query_as(
        "SELECT message_ref, reason, topic, partition, \"offset\", rejected_at FROM rejected_messages \
         ORDER BY rejected_at, message_ref",
    )
    .fetch_all(pool)
    .await?)
}

/// Takes a rejected message out of the table (and its id out of the applied set) and returns
/// it as the delivery it was, to be applied again by its stage.
pub async fn take(
    pool: &sqlx::PgPool,
    message_ref: &str,
) -> Result<Option<tandem_bus::Delivery>, LedgerError> {
    let mut tx = pool.begin().await?;
    let row: Option<(String, i32, i64, Vec<u8>, Vec<u8>)> = sqlx::query_as(
        "DELETE FROM rejected_messages WHERE message_ref = $1 RETURNING topic, partition, \"offset\", key, payload",
    )
    .bind(message_ref)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((topic, partition, offset, key, payload)) = row else {
        return Ok(None);
    };
    let topic = tandem_bus::Topic::from_logical_name(&topic).ok_or(LedgerError::Invariant(
        "rejected message of an unknown topic",
    ))?;
    if let Some((message_id, _)) = message_ref.split_once('@') {
        sqlx::query("DELETE FROM applied_messages WHERE message_id = $1")
            .bind(message_id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(Some(tandem_bus::Delivery {
        topic,
        topic_name: topic.logical_name().to_owned(),
        partition,
        offset,
        key,
        payload,
        headers: Vec::new(),
    }))
}
