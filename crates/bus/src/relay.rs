//! The outbox relay: publishes what a service committed to its outbox, in commit order, with the
//! idempotent producer, and deletes each batch once the broker acknowledged all of it.
//!
//! Only one relay per schema publishes at a time (a Postgres advisory lock), so messages for one
//! key reach the broker in the order they were enqueued. If a batch fails, none of it is deleted
//! and the whole batch is sent again: a message may be published twice, never lost, and consumers
//! deduplicate by message id.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::close::{close_off_runtime, CLOSE_WITHIN};
use crate::{BusConfig, BusError, Topic};

/// Tuning of the relay. Every number is bounded.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Messages read and published per round, 1 to 10 000.
    pub batch_size: i64,
    /// How long to sleep when the outbox is empty and nobody rang the bell.
    pub idle_poll: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            batch_size: 2_000,
            idle_poll: Duration::from_millis(200),
        }
    }
}

/// Advisory lock class for "the outbox relay"; the second key is the schema's hash, so the
/// relays of two services sharing a database (one schema each) do not exclude each other.
const RELAY_LOCK_ID: i32 = 0x7464_0001;
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often a relay round reads the outbox from the start (see `run_outbox_relay`).
const FULL_SCAN_EVERY: Duration = Duration::from_millis(250);
/// How often the outbox's depth and oldest age are measured for the metrics.
const MEASURE_EVERY: Duration = Duration::from_secs(5);

/// Records `tandem.outbox.depth` (counted up to 100 000, so a large backlog costs a bounded
/// scan) and `tandem.outbox.oldest_age` for the pool's schema. A failed query records nothing.
async fn measure_outbox(pool: &PgPool) {
    let measured: Result<(String, i64, Option<f64>), sqlx::Error> = sqlx::query_as(
        "SELECT current_schema(), \
           (SELECT count(*) FROM (SELECT 1 FROM outbox LIMIT 100000) AS waiting), \
           (SELECT extract(epoch FROM now() - enqueued_at)::float8 FROM outbox ORDER BY id LIMIT 1)",
    )
    .fetch_one(pool)
    .await;
    if let Ok((schema, depth, oldest)) = measured {
        let metrics = crate::metrics::metrics();
        let schema = [opentelemetry::KeyValue::new("db.namespace", schema)];
        metrics.outbox_depth.record(depth, &schema);
        metrics
            .outbox_oldest_age
            .record(oldest.unwrap_or(0.0).max(0.0), &schema);
    }
}

/// Runs until `shutdown` is cancelled. `wake` is notified by writers after they commit to the
/// outbox, so a message is published at once rather than at the next poll.
pub async fn run_outbox_relay(
    pool: PgPool,
    mut producer: FutureProducer,
    config: BusConfig,
    settings: RelaySettings,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let batch_size = settings.batch_size.clamp(1, 10_000);
    let mut backoff = Duration::from_millis(100);
    // Held for the relay's lifetime: its connection owns the advisory lock.
    let mut waiting_measured: Option<Instant> = None;
    let mut lock_connection = loop {
        // Every instance reports the outbox, the one publishing it or not.
        if waiting_measured.is_none_or(|at| at.elapsed() >= MEASURE_EVERY) {
            waiting_measured = Some(Instant::now());
            measure_outbox(&pool).await;
        }
        match try_take_lock(&pool).await {
            Ok(Some(connection)) => break connection,
            Ok(None) => tracing::info!("another outbox relay holds the lock; waiting"),
            Err(error) => tracing::warn!(error = %error, "could not take the outbox relay lock"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    tracing::info!("outbox relay started");
    // A round reads rows above `floor`: the id just below the oldest row that the full scan
    // before the last one found (a scan from the start, every `FULL_SCAN_EVERY`). Published rows
    // are deleted, but their index entries stay until vacuum, and a scan from the start walks
    // all of them; from `floor` it walks at most what was published in the last two intervals.
    // A row below `floor` is one whose transaction took its id before that scan and had still
    // not committed an interval later; the next full scan finds it.
    let mut floor: i64 = 0;
    let mut next_floor: i64 = 0;
    let mut last_full_scan: Option<Instant> = None;
    let mut last_measured: Option<Instant> = None;
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        if last_measured.is_none_or(|at| at.elapsed() >= MEASURE_EVERY) {
            last_measured = Some(Instant::now());
            measure_outbox(&pool).await;
        }
        let full_scan = last_full_scan.is_none_or(|at| at.elapsed() >= FULL_SCAN_EVERY);
        if full_scan {
            last_full_scan = Some(Instant::now());
        }
        let after = if full_scan { 0 } else { floor };
        match publish_batch(&pool, &producer, &config, after, batch_size).await {
            Ok((0, _, _)) => {
                backoff = Duration::from_millis(100);
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = wake.notified() => {}
                    () = tokio::time::sleep(settings.idle_poll) => {}
                }
            }
            Ok((published, lowest, _)) => {
                if full_scan {
                    floor = next_floor;
                    next_floor = lowest - 1;
                }
                backoff = Duration::from_millis(100);
                tracing::debug!(published, "outbox batch published");
            }
            Err(error) => {
                tracing::warn!(error = %error, source = ?std::error::Error::source(&error), backoff_ms = backoff.as_millis() as u64, "outbox batch not published; retrying");
                // An idempotent producer that hit a fatal error (its sequence broken by a broker
                // that lost its state, say) refuses every later send: without a new one the
                // outbox would only grow. The new producer gets a new producer id; what the old
                // one may already have written is sent again and deduplicated by message id.
                if let Some((code, reason)) = producer.client().fatal_error() {
                    tracing::error!(code = ?code, reason = %reason, "the Kafka producer failed fatally; replacing it");
                    match crate::idempotent_producer(&config) {
                        Ok(fresh) => {
                            let failed = std::mem::replace(&mut producer, fresh);
                            close_off_runtime("producer", "outbox relay", failed, CLOSE_WITHIN)
                                .await;
                        }
                        Err(error) => {
                            tracing::error!(error = %error, "could not create a new Kafka producer; retrying");
                        }
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    let _ = sqlx::query("SELECT pg_advisory_unlock($1, hashtext(current_schema()))")
        .bind(RELAY_LOCK_ID)
        .execute(&mut *lock_connection)
        .await;
    tracing::info!("outbox relay stopped");
}

async fn try_take_lock(
    pool: &PgPool,
) -> Result<Option<sqlx::pool::PoolConnection<sqlx::Postgres>>, sqlx::Error> {
    let mut connection = pool.acquire().await?;
    let locked: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext(current_schema()))")
            .bind(RELAY_LOCK_ID)
            .fetch_one(&mut *connection)
            .await?;
    Ok(locked.then_some(connection))
}

/// Publishes the oldest batch above id `after`; returns how many messages it published and the
/// lowest and highest ids among them.
async fn publish_batch(
    pool: &PgPool,
    producer: &FutureProducer,
    config: &BusConfig,
    after: i64,
    batch_size: i64,
) -> Result<(usize, i64, i64), BusError> {
    let rows = tandem_store::fetch_outbox(pool, after, batch_size).await?;
    let (Some(lowest), Some(highest)) = (rows.first().map(|r| r.id), rows.last().map(|r| r.id))
    else {
        return Ok((0, after, after));
    };
    let mut topic_names = Vec::with_capacity(rows.len());
    for row in &rows {
        let topic = Topic::from_logical_name(&row.topic)
            .ok_or_else(|| BusError::UnknownTopic(row.topic.clone()))?;
        topic_names.push(topic.name(config));
    }
    // A `send` span per message, in the trace of whatever wrote it (its stored `traceparent`);
    // the message carries the span's own context on, so its consumers nest under it.
    let spans: Vec<(tracing::Span, Vec<(String, String)>)> = rows
        .iter()
        .zip(&topic_names)
        .map(|(row, topic_name)| {
            let span = tracing::info_span!(
                "send",
                "otel.name" = %format!("send {topic_name}"),
                "otel.kind" = "producer",
                "messaging.system" = "kafka",
                "messaging.operation.type" = "send",
                "messaging.operation.name" = "send",
                "messaging.destination.name" = %topic_name,
                "tandem.outbox.id" = row.id,
                "messaging.destination.partition.id" = tracing::field::Empty,
                "messaging.kafka.offset" = tracing::field::Empty,
            );
            tandem_telemetry::set_parent_from_headers(
                &span,
                row.header_names
                    .iter()
                    .zip(&row.header_values)
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            );
            let mut headers: Vec<(String, String)> = row
                .header_names
                .iter()
                .zip(&row.header_values)
                .filter(|(name, _)| !matches!(name.as_str(), "traceparent" | "tracestate"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            headers.extend(span.in_scope(tandem_telemetry::current_trace_headers));
            (span, headers)
        })
        .collect();
    let sends = rows
        .iter()
        .zip(&topic_names)
        .zip(&spans)
        .map(|((row, topic_name), (_, pairs))| {
            let mut headers = OwnedHeaders::new_with_capacity(pairs.len());
            for (name, value) in pairs {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value.as_bytes()),
                });
            }
            let record = FutureRecord::to(topic_name)
                .key(&row.partition_key)
                .payload(&row.payload)
                .headers(headers);
            producer.send(record, Timeout::After(Duration::from_secs(30)))
        });
    for (result, (span, _)) in join_all(sends).await.into_iter().zip(&spans) {
        match result {
            Ok(delivery) => {
                span.record("messaging.destination.partition.id", delivery.partition);
                span.record("messaging.kafka.offset", delivery.offset);
            }
            Err((error, _message)) => return Err(BusError::Kafka(error)),
        }
    }
    drop(spans);
    let mut per_topic: std::collections::BTreeMap<&str, u64> = Default::default();
    for topic_name in &topic_names {
        *per_topic.entry(topic_name.as_str()).or_default() += 1;
    }
    for (topic_name, count) in per_topic {
        crate::metrics::metrics().sent.add(
            count,
            &[opentelemetry::KeyValue::new(
                "messaging.destination.name",
                topic_name.to_owned(),
            )],
        );
    }
    let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
    tandem_store::delete_outbox(pool, &ids).await?;
    Ok((rows.len(), lowest, highest))
}
