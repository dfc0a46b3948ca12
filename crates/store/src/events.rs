//! Appending to the event table with optimistic concurrency.

use sqlx::{PgConnection, Postgres, QueryBuilder};
use uuid::Uuid;

use crate::StoreError;

/// An event to append to a stream.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event_type: &'static str,
    pub payload: Vec<u8>,
    /// When the fact was recorded. Given by the caller, so that projections that show it are
    /// rebuilt identically from the stored events.
    pub recorded_at: chrono::DateTime<chrono::Utc>,
}

/// Appends `events` to `stream_id`, which the caller last saw at sequence `expected_sequence`
/// (0 for a new stream). Fails with [`StoreError::Conflict`] if another writer appended first.
pub async fn append_events(
    connection: &mut PgConnection,
    stream_id: &str,
    expected_sequence: i32,
    events: &[NewEvent],
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let mut query: QueryBuilder<Postgres> = QueryBuilder::new(
        "INSERT INTO events (stream_id, sequence, event_id, event_type, payload, recorded_at) ",
    );
    let mut sequence = expected_sequence;
    query.push_values(events, |mut row, event| {
        sequence += 1;
        row.push_bind(stream_id)
            .push_bind(sequence)
            .push_bind(event.event_id)
            .push_bind(event.event_type)
            .push_bind(&event.payload)
            .push_bind(event.recorded_at);
    });
    match query.build().execute(connection).await {
        Ok(_) => Ok(()),
        Err(error) if crate::is_unique_violation(&error) => Err(StoreError::Conflict {
            stream_id: stream_id.to_owned(),
            expected: expected_sequence,
        }),
        Err(error) => Err(error.into()),
    }
}
