//! Postgres plumbing shared by every Tandem service. Each service owns one schema; this crate
//! connects to it, migrates it, and provides the three infrastructure tables every service has:
//! the append-only `events` table, the transactional `outbox`, and `applied_messages` for
//! idempotent consumers.

mod applied;
mod events;
mod outbox;
mod pool;
mod prune;

pub use applied::claim_unapplied;
pub use events::{append_events, NewEvent};
pub use outbox::{delete_outbox, enqueue_outbox, fetch_outbox, OutboxMessage, OutboxRow};
pub use pool::{connect, create_database, migrate, url_with_database, StoreConfig};
pub use prune::{prune, Retention};

/// Errors from the storage layer, with the cause chain kept.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("schema migration failed")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("stream {stream_id} was changed concurrently: expected it at sequence {expected}")]
    Conflict { stream_id: String, expected: i32 },
    #[error(
        "invalid schema or database name {0:?}: use lower-case letters, digits and underscores"
    )]
    InvalidSchema(String),
}

/// Whether a database error says Postgres could not be reached or is shutting down, restarting
/// or out of connections (worth retrying), rather than that a statement failed: transport
/// errors, pool timeouts, and SQLSTATE classes 08 (connection exception) and 57P (operator
/// intervention: shutdown, crash recovery, cannot connect now) and 53300 (too many
/// connections).
pub fn is_unreachable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(database) => database.code().is_some_and(|code| {
            code.starts_with("08") || code.starts_with("57P") || code == "53300"
        }),
        _ => false,
    }
}

/// True if `error` is a violation of a unique constraint (SQLSTATE 23505).
pub fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}
