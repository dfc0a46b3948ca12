//! The operator audit log: one row per operator call (the answer's status included), in an
//! append-only table (a trigger refuses updates, deletes and truncation). Rows never carry a
//! secret: API keys, the operator token and bank details stay out of `detail`.
//!
//! A row is written after the call is answered by its own part (the gateway's transaction, or
//! settlement for the calls the gateway forwards), so a write that fails leaves the effect
//! without its row; that failure is logged at ERROR with the action and target, and counted
//! by the RPC metrics like any other call.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tandem_proto::v1 as pb;
use tonic::Status;

/// What one operator call did, for its audit row.
pub struct Entry<'a> {
    pub action: &'static str,
    pub target: String,
    pub detail: serde_json::Value,
    pub outcome: &'a Result<(), Status>,
}

/// Free text as the audit row keeps it: as sent if it passes the free-text guard, else a
/// placeholder (a refused call's text may hold the very identifier it was refused for).
pub fn text(value: &str) -> serde_json::Value {
    match tandem_domain::text::reject_personal_data("", value) {
        Ok(()) => serde_json::Value::String(value.to_owned()),
        Err(_) => serde_json::Value::String("<withheld: shaped like a customer identifier>".into()),
    }
}

/// Records `entry`; a failure to record is logged, never returned (the call already happened).
pub async fn record(pool: &PgPool, entry: Entry<'_>) {
    let outcome = match entry.outcome {
        Ok(()) => "OK".to_owned(),
        Err(status) => status_name(status.code()).to_owned(),
    };
    let trace_id = current_trace_id();
    // The target of a refused call is what the caller sent: guarded like free text.
    let target = match text(&entry.target) {
        serde_json::Value::String(target) => target,
        _ => String::new(),
    };
    let written = sqlx::query(
        "INSERT INTO operator_audit (action, target, outcome, detail, trace_id) VALUES ($1, $2, $3, $4::jsonb, $5)",
    )
    .bind(entry.action)
    .bind(&target)
    .bind(&outcome)
    .bind(entry.detail.to_string())
    .bind(&trace_id)
    .execute(pool)
    .await;
    if let Err(error) = written {
        tracing::error!(action = entry.action, target = %target, outcome = %outcome, error = %error, "operator action not recorded in the audit log");
    }
}

type AuditRow = (i64, DateTime<Utc>, String, String, String, String, String);

/// The audit log after `after`, oldest first, at most `limit` rows.
pub async fn list(
    pool: &PgPool,
    after: i64,
    limit: i64,
) -> Result<Vec<pb::AuditEvent>, sqlx::Error> {
    let rows: Vec<AuditRow> = sqlx::query_as(
        "SELECT sequence, recorded_at, action, target, outcome, detail::text, trace_id \
             FROM operator_audit WHERE sequence > $1 ORDER BY sequence LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(sequence, recorded_at, action, target, outcome, detail, trace_id)| pb::AuditEvent {
                sequence,
                recorded_at: Some(tandem_proto::time::timestamp(recorded_at)),
                action,
                target,
                outcome,
                detail,
                trace_id,
            },
        )
        .collect())
}

/// The current call's W3C trace id, or empty.
fn current_trace_id() -> String {
    tandem_telemetry::current_trace_headers()
        .into_iter()
        .find(|(name, _)| name == "traceparent")
        .and_then(|(_, value)| value.split('-').nth(1).map(str::to_owned))
        .unwrap_or_default()
}

/// The canonical gRPC name of `code` (`INVALID_ARGUMENT`).
fn status_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
