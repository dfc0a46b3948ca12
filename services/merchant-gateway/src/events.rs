//! Recording events: each is appended to the gateway's event table and put in the outbox in the
//! caller's transaction. Customer-activity events go out once per customer key, keyed by it.

use chrono::{DateTime, Utc};
use prost::Message;
use sqlx::PgConnection;
use tandem_bus::Topic;
use tandem_proto::v1::{event_envelope::Payload, EventEnvelope};
use tandem_store::{NewEvent, OutboxMessage};
use uuid::Uuid;

use crate::GatewayError;

/// Appends `payload` as the first event of `stream_id` and enqueues it for publication. Returns
/// the event id.
pub async fn record_event(
    connection: &mut PgConnection,
    stream_id: &str,
    payload: Payload,
    recorded_at: DateTime<Utc>,
) -> Result<Uuid, GatewayError> {
    let ids = record_events(connection, stream_id, 0, vec![payload], recorded_at).await?;
    Ok(ids[0])
}

/// Appends `payloads` to `stream_id`, which the caller read at `expected_sequence` events (a
/// concurrent writer makes this fail with a conflict), and enqueues them for publication.
pub async fn record_events(
    connection: &mut PgConnection,
    stream_id: &str,
    expected_sequence: i32,
    payloads: Vec<Payload>,
    recorded_at: DateTime<Utc>,
) -> Result<Vec<Uuid>, GatewayError> {
    let headers = tandem_telemetry::current_trace_headers();
    let mut stored = Vec::with_capacity(payloads.len());
    let mut messages = Vec::new();
    let mut ids = Vec::with_capacity(payloads.len());
    for payload in payloads {
        let event_id = Uuid::now_v7();
        let (event_type, topic, routing) = routing(&payload);
        let admin_sequence = if topic == Topic::Admin {
            // Takes the row lock until commit: admin events are numbered in commit order.
            sqlx::query_scalar::<_, i64>(
                "UPDATE admin_sequence SET value = value + 1 RETURNING value",
            )
            .fetch_one(&mut *connection)
            .await?
        } else {
            sqlx::query_scalar::<_, i64>("SELECT value FROM admin_sequence")
                .fetch_one(&mut *connection)
                .await?
        };
        let mut envelope = EventEnvelope {
            event_id: event_id.to_string(),
            recorded_at: Some(tandem_proto::time::timestamp(recorded_at)),
            customer_key: String::new(),
            admin_sequence: u64::try_from(admin_sequence).unwrap_or(0),
            payload: Some(payload),
        };
        stored.push(NewEvent {
            event_id,
            event_type,
            payload: envelope.encode_to_vec(),
            recorded_at,
        });
        for key in routing {
            if topic == Topic::CustomerActivity {
                envelope.customer_key.clone_from(&key);
            }
            messages.push(OutboxMessage {
                topic: topic.logical_name(),
                partition_key: key.into_bytes(),
                payload: envelope.encode_to_vec(),
                headers: headers.clone(),
            });
        }
        ids.push(event_id);
    }
    match tandem_store::append_events(connection, stream_id, expected_sequence, &stored).await {
        Err(tandem_store::StoreError::Conflict { .. }) => {
            return Err(GatewayError::Aborted(format!(
                "{stream_id} was changed by a concurrent request; retry"
            )))
        }
        other => other?,
    }
    tandem_store::enqueue_outbox(connection, &messages).await?;
    Ok(ids)
}

/// The payloads of a stream's events, in order.
pub async fn load_stream(
    connection: &mut PgConnection,
    stream_id: &str,
) -> Result<Vec<Payload>, GatewayError> {
    let rows: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT payload FROM events WHERE stream_id = $1 ORDER BY sequence")
            .bind(stream_id)
            .fetch_all(connection)
            .await?;
    rows.iter()
        .map(|bytes| {
            EventEnvelope::decode(bytes.as_slice())?
                .payload
                .ok_or(GatewayError::CorruptEvent(stream_id.to_owned()))
        })
        .collect()
}

/// The event type, topic and partition keys of a payload.
fn routing(payload: &Payload) -> (&'static str, Topic, Vec<String>) {
    match payload {
        Payload::MerchantRegistered(e) => (
            "MerchantRegistered",
            Topic::Admin,
            vec![e.merchant_id.clone()],
        ),
        Payload::PayoutAccountRegistered(e) => (
            "PayoutAccountRegistered",
            Topic::Admin,
            vec![e.merchant_id.clone()],
        ),
        Payload::PartnershipTermsProposed(e) => (
            "PartnershipTermsProposed",
            Topic::Admin,
            vec![e.partnership_id.clone()],
        ),
        Payload::PartnershipTermsAccepted(e) => (
            "PartnershipTermsAccepted",
            Topic::Admin,
            vec![e.partnership_id.clone()],
        ),
        Payload::PartnershipTerminated(e) => (
            "PartnershipTerminated",
            Topic::Admin,
            vec![e.partnership_id.clone()],
        ),
        Payload::CustomerReferred(e) => (
            "CustomerReferred",
            Topic::CustomerActivity,
            e.customer_keys.clone(),
        ),
        Payload::PurchaseRecorded(e) => (
            "PurchaseRecorded",
            Topic::CustomerActivity,
            e.customer_keys.clone(),
        ),
        Payload::ReferralCancelled(e) => (
            "ReferralCancelled",
            Topic::CustomerActivity,
            e.customer_keys.clone(),
        ),
        Payload::RefundRecorded(e) => (
            "RefundRecorded",
            Topic::CustomerActivity,
            e.customer_keys.clone(),
        ),
    }
}
