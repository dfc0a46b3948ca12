//! The one consumer loop. It reads messages in batches, hands each batch to a [`BatchHandler`]
//! that applies it in one Postgres transaction (recording message ids for deduplication), and
//! commits the batch's offsets to the broker only after the handler succeeded. A crash anywhere
//! redelivers at most the last batch, which the handler's deduplication absorbs.
//!
//! This does not rely on Kafka transactions or `read_committed`.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{BusConfig, BusError, Topic};

/// One message as the handler sees it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub topic: Topic,
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Delivery {
    /// Makes `span` a child of the trace that produced this message, and records the trace id in
    /// its `trace_id` field if it has one.
    pub fn link_span(&self, span: &tracing::Span) {
        tandem_telemetry::set_parent_from_headers(
            span,
            self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        tandem_telemetry::record_trace_id(span);
    }
}

/// Applies a batch of messages atomically. An error means nothing of the batch was applied; the
/// loop retries the same batch with backoff.
pub trait BatchHandler: Send + Sync {
    type Error: std::error::Error + Send + Sync + 'static;

    fn handle(&self, batch: &[Delivery]) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Tuning of a consumer. Every number is bounded.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub group_id: String,
    pub topics: Vec<Topic>,
    /// Most messages per batch (one transaction), 1 to 10 000.
    pub max_batch: usize,
    /// Longest wait to fill a batch once its first message arrived.
    pub max_wait: Duration,
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs until `shutdown` is cancelled.
pub async fn run_consumer<H: BatchHandler>(
    config: BusConfig,
    settings: ConsumerSettings,
    handler: H,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", "10000")
        .create()?;
    let topic_names: Vec<String> = settings.topics.iter().map(|t| t.name(&config)).collect();
    let by_name: HashMap<String, Topic> = settings
        .topics
        .iter()
        .map(|t| (t.name(&config), *t))
        .collect();
    let subscribed: Vec<&str> = topic_names.iter().map(String::as_str).collect();
    consumer.subscribe(&subscribed)?;
    tracing::info!(group_id = %settings.group_id, topics = ?topic_names, "consumer started");
    let max_batch = settings.max_batch.clamp(1, 10_000);

    loop {
        let mut batch: Vec<Delivery> = Vec::with_capacity(max_batch);
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            message = consumer.recv() => message,
        };
        match first {
            Ok(message) => push(&mut batch, &message, &by_name),
            Err(error) => {
                tracing::warn!(error = %error, "consumer error");
                continue;
            }
        }
        let deadline = Instant::now() + settings.max_wait;
        while batch.len() < max_batch {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(message)) => push(&mut batch, &message, &by_name),
                Ok(Err(error)) => tracing::warn!(error = %error, "consumer error"),
                Err(_) => break,
            }
        }

        let mut backoff = Duration::from_millis(100);
        loop {
            match handler.handle(&batch).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(error = %error, source = ?std::error::Error::source(&error), messages = batch.len(), backoff_ms = backoff.as_millis() as u64, "batch not applied; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }

        let mut next_offsets: HashMap<(Topic, i32), i64> = HashMap::new();
        for delivery in &batch {
            let next = next_offsets
                .entry((delivery.topic, delivery.partition))
                .or_insert(0);
            *next = (*next).max(delivery.offset + 1);
        }
        let mut offsets = TopicPartitionList::with_capacity(next_offsets.len());
        for ((topic, partition), next) in next_offsets {
            offsets.add_partition_offset(&topic.name(&config), partition, Offset::Offset(next))?;
        }
        // A failed commit only means the batch may be delivered again, which deduplication absorbs.
        if let Err(error) = consumer.commit(&offsets, CommitMode::Async) {
            tracing::warn!(error = %error, "offset commit failed; the batch may be redelivered");
        }
    }
    tracing::info!(group_id = %settings.group_id, "consumer stopped");
    Ok(())
}

fn push<M: Message>(batch: &mut Vec<Delivery>, message: &M, by_name: &HashMap<String, Topic>) {
    let Some(topic) = by_name.get(message.topic()).copied() else {
        tracing::warn!(
            topic = message.topic(),
            "message from an unexpected topic ignored"
        );
        return;
    };
    let headers = message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .filter_map(|header| {
                    let value = std::str::from_utf8(header.value?).ok()?;
                    Some((header.key.to_owned(), value.to_owned()))
                })
                .collect()
        })
        .unwrap_or_default();
    batch.push(Delivery {
        topic,
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec).unwrap_or_default(),
        payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers,
    });
}
