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
    let event_id = Uuid::now_v7();
    let (event_type, topic, routing) = match &payload {
        Payload::MerchantRegistered(event) => (
            "MerchantRegistered",
            Topic::Admin,
            vec![event.merchant_id.clone()],
        ),
        Payload::PartnershipCreated(event) => (
            "PartnershipCreated",
            Topic::Admin,
            vec![event.partnership_id.clone()],
        ),
        Payload::CustomerReferred(event) => (
            "CustomerReferred",
            Topic::CustomerActivity,
            event.customer_keys.clone(),
        ),
        Payload::PurchaseRecorded(event) => (
            "PurchaseRecorded",
            Topic::CustomerActivity,
            event.customer_keys.clone(),
        ),
    };
    let mut envelope = EventEnvelope {
        event_id: event_id.to_string(),
        recorded_at: Some(tandem_proto::time::timestamp(recorded_at)),
        customer_key: String::new(),
        payload: Some(payload),
    };
    tandem_store::append_events(
        connection,
        stream_id,
        0,
        &[NewEvent {
            event_id,
            event_type,
            payload: envelope.encode_to_vec(),
        }],
    )
    .await?;

    let headers = tandem_telemetry::current_trace_headers();
    let messages: Vec<OutboxMessage> = routing
        .into_iter()
        .map(|key| {
            if topic == Topic::CustomerActivity {
                envelope.customer_key.clone_from(&key);
            }
            OutboxMessage {
                topic: topic.logical_name(),
                partition_key: key.into_bytes(),
                payload: envelope.encode_to_vec(),
                headers: headers.clone(),
            }
        })
        .collect();
    tandem_store::enqueue_outbox(connection, &messages).await?;
    Ok(event_id)
}
