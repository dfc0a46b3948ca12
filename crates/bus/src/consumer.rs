//! The one consumer loop. It reads messages in batches, hands each batch to a [`BatchHandler`]
//! that applies it in one Postgres transaction (recording message ids for deduplication), and
//! commits the batch's offsets to the broker only after the handler succeeded. A crash anywhere
//! redelivers at most the last batch, which the handler's deduplication absorbs.
//!
//! This does not rely on Kafka transactions or `read_committed`.
//!
//! A consumer that cannot go on (fenced, fatal client error, or stalled with messages waiting)
//! returns an error instead of sitting idle: see [`run_consumer`].

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use futures::future::join_all;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::close::{close_off_runtime, CLOSE_WITHIN};
use crate::watchdog::Watchdog;
use crate::{BusConfig, BusError, Topic};

/// One message as the handler sees it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub topic: Topic,
    /// The topic's full name (with the deployment's prefix), as the broker knows it.
    pub topic_name: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Delivery {
    /// A `process` span for this message (OpenTelemetry messaging conventions), a child of the
    /// `send` span that published it. `message_id` is the id the consumer deduplicates by.
    pub fn process_span(&self, message_id: &str) -> tracing::Span {
        let topic = &self.topic_name;
        let span = tracing::info_span!(
            "process",
            "otel.name" = %format!("process {topic}"),
            "otel.kind" = "consumer",
            "messaging.system" = "kafka",
            "messaging.operation.type" = "process",
            "messaging.operation.name" = "process",
            "messaging.destination.name" = %topic,
            "messaging.destination.partition.id" = self.partition,
            "messaging.kafka.offset" = self.offset,
            "messaging.message.id" = %message_id,
            trace_id = tracing::field::Empty,
        );
        self.link_span(&span);
        span
    }

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
    /// A pause in arrivals this long closes a batch before `max_wait`; zero: no such pause,
    /// every batch waits `max_wait` (or fills).
    pub batch_gap: Duration,
    /// How many parts of a batch are applied at once, 1 to 16: the batch is split by partition
    /// (partition modulo lanes), each part applied in its own transaction, concurrently; a
    /// partition's messages stay in one part, in order. Offsets are committed once every part is
    /// applied.
    pub lanes: usize,
    pub membership: GroupMembership,
    /// Set NOT_READY (condition `consumer <group>`) while the consumer is stalled because its
    /// batches keep failing (a dependency is down), cleared when it moves again.
    pub readiness: crate::Readiness,
}

/// How a consumer takes part in its group, and when it counts as stalled. Why these settings:
/// docs/ARCHITECTURE.md, "Consumer groups and recovery".
#[derive(Debug, Clone)]
pub struct GroupMembership {
    /// Static membership (`group.instance.id`): an instance restarted under the same id takes
    /// back its partitions at once, without a rebalance and without waiting for its dead
    /// predecessor's session to expire. Two live consumers with one id fence each other: the
    /// older one fails (and its process exits). `None` joins as a dynamic member.
    pub instance_id: Option<String>,
    /// How long the group coordinator waits without a heartbeat before it hands a member's
    /// partitions to others (6 s to 5 min).
    pub session_timeout: Duration,
    /// How long the consumer may go without committing progress on a partition that has
    /// messages waiting before the consumer counts as stalled and fails (at least 5 s, below
    /// `max.poll.interval.ms`).
    pub stall_timeout: Duration,
}

/// `max.poll.interval.ms`: the longest the loop may spend on one batch before librdkafka leaves
/// the group. The stall watchdog fires long before, so this is only the last line.
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(300);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs until `shutdown` is cancelled, and returns `Ok` then. Returns an error, and stops
/// consuming, when the consumer cannot go on: a fatal client error (such as being fenced by
/// another instance with the same `group.instance.id`) or a stall (messages waiting on a
/// partition of this consumer and no progress for `stall_timeout`). The caller treats either as
/// the end of the service: health NOT_SERVING and a non-zero exit, so a supervisor restarts it.
pub async fn run_consumer<H: BatchHandler>(
    config: BusConfig,
    settings: ConsumerSettings,
    handler: H,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let membership = &settings.membership;
    let session_timeout = membership
        .session_timeout
        .clamp(Duration::from_secs(6), Duration::from_secs(300));
    let stall_timeout = membership
        .stall_timeout
        .clamp(Duration::from_secs(5), MAX_POLL_INTERVAL / 2);
    let mut client = config.client_config();
    client
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set(
            "session.timeout.ms",
            session_timeout.as_millis().to_string(),
        )
        // A third of the session at most, as Kafka advises; a fifth leaves room for a lost one.
        .set(
            "heartbeat.interval.ms",
            (session_timeout / 5).as_millis().to_string(),
        )
        .set(
            "max.poll.interval.ms",
            MAX_POLL_INTERVAL.as_millis().to_string(),
        )
        // librdkafka prefetches up to 64 MiB a consumer by default, which a service with three
        // consumers holds as resident memory under load (the ledger peaked at 311 MiB over a
        // million purchases); 16 MiB is still forty full batches of Tandem's messages. A fetch
        // response is capped by that, and filled partition by partition (up to
        // `max.partition.fetch.bytes` each, 1 MiB by default) in the same order every time: with
        // an 8 MiB cap and a backlog, partitions 8 to 11 of 12 got nothing for a minute and the
        // stall watchdog ended the ledger. At 256 KiB a partition, 64 partitions fit in one
        // response.
        .set("queued.max.messages.kbytes", "16384")
        .set("max.partition.fetch.bytes", "262144");
    if let Some(instance_id) = &membership.instance_id {
        client.set("group.instance.id", instance_id);
    }
    let topic_names: Vec<String> = settings.topics.iter().map(|t| t.name(&config)).collect();
    let subscribed: Vec<&str> = topic_names.iter().map(String::as_str).collect();
    let mut rejoins: Vec<Instant> = Vec::new();
    loop {
        let consumer: StreamConsumer = client.create()?;
        consumer.subscribe(&subscribed)?;
        let outage = Outage::default();
        let result = run_member(
            &consumer,
            &config,
            &settings,
            &handler,
            &shutdown,
            &topic_names,
            stall_timeout,
            session_timeout,
            &outage,
        )
        .await;
        // A static member can be fenced by its own earlier session when the group coordinator
        // came back from an outage (the broker restarted) while a commit was in flight: the
        // same process, not another instance. Rejoin then, a few times at most; a fencing with
        // no outage just before is another instance with this id, and ends this one.
        if let Err(BusError::ConsumerFatal { code, .. }) = &result {
            let now = Instant::now();
            rejoins.retain(|at| now.duration_since(*at) < REJOIN_WINDOW);
            if code == "FencedInstanceId"
                && outage.seen_within(OUTAGE_BEFORE_FENCING)
                && rejoins.len() < MAX_REJOINS
            {
                rejoins.push(now);
                tracing::warn!(group_id = %settings.group_id, "fenced right after the brokers were unreachable: rejoining the group");
                close_off_runtime("consumer", &settings.group_id, consumer, CLOSE_WITHIN).await;
                continue;
            }
        }
        close_off_runtime("consumer", &settings.group_id, consumer, CLOSE_WITHIN).await;
        return result;
    }
}

/// How recent a broker outage must be for a fencing to count as its after-effect.
const OUTAGE_BEFORE_FENCING: Duration = Duration::from_secs(120);
/// At most this many rejoins within [`REJOIN_WINDOW`].
const MAX_REJOINS: usize = 3;
const REJOIN_WINDOW: Duration = Duration::from_secs(600);

/// When this member last saw every broker unreachable or a transport failure.
#[derive(Default)]
struct Outage(std::sync::Mutex<Option<Instant>>);

impl Outage {
    fn record(&self) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
    }

    fn seen_within(&self, window: Duration) -> bool {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() < window)
    }
}

/// One membership of the group: consume until shutdown, a fatal error or a stall.
#[allow(clippy::too_many_arguments)]
async fn run_member<H: BatchHandler>(
    consumer: &StreamConsumer,
    config: &BusConfig,
    settings: &ConsumerSettings,
    handler: &H,
    shutdown: &CancellationToken,
    topic_names: &[String],
    stall_timeout: Duration,
    session_timeout: Duration,
    outage: &Outage,
) -> Result<(), BusError> {
    let membership = &settings.membership;
    tracing::info!(
        group_id = %settings.group_id,
        instance_id = membership.instance_id.as_deref().unwrap_or("(dynamic)"),
        topics = ?topic_names,
        session_timeout_ms = session_timeout.as_millis() as u64,
        stall_timeout_ms = stall_timeout.as_millis() as u64,
        "consumer started"
    );
    let failing = Failing::default();
    let watchdog = Watchdog {
        config: config.clone(),
        group_id: settings.group_id.clone(),
        topics: topic_names.to_vec(),
        stall_timeout,
        readiness: settings.readiness.clone(),
        failing: failing.clone(),
    };
    let monitor = watchdog.monitor()?;
    let result = tokio::select! {
        result = consume(consumer, config, settings, handler, shutdown, outage, &failing) => result,
        stalled = watchdog.run(consumer, monitor.clone()) => Err(stalled),
    };
    close_off_runtime("group monitor", &settings.group_id, monitor, CLOSE_WITHIN).await;
    settings
        .readiness
        .set(&format!("consumer {}", settings.group_id), None);
    match &result {
        Ok(()) => tracing::info!(group_id = %settings.group_id, "consumer stopped"),
        Err(error) => {
            tracing::error!(group_id = %settings.group_id, error = %error, "consumer failed")
        }
    }
    result
}

/// The loop proper: fill a batch, apply it until it succeeds, commit its offsets.
async fn consume<H: BatchHandler>(
    consumer: &StreamConsumer,
    config: &BusConfig,
    settings: &ConsumerSettings,
    handler: &H,
    shutdown: &CancellationToken,
    outage: &Outage,
    failing: &Failing,
) -> Result<(), BusError> {
    let by_name: HashMap<String, Topic> = settings
        .topics
        .iter()
        .map(|t| (t.name(config), *t))
        .collect();
    let max_batch = settings.max_batch.clamp(1, 10_000);
    loop {
        let mut batch: Vec<Delivery> = Vec::with_capacity(max_batch);
        let first = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            message = consumer.recv() => message,
        };
        match first {
            Ok(message) => push(&mut batch, &message, &by_name),
            Err(error) => {
                fail_if_fatal(consumer, error, outage)?;
                continue;
            }
        }
        // The batch fills while messages keep coming, up to `max_wait`; a pause of
        // `batch_gap` closes it, so a lone message is not held back for the whole wait.
        let deadline = Instant::now() + settings.max_wait;
        while batch.len() < max_batch {
            let until = if settings.batch_gap.is_zero() {
                deadline
            } else {
                deadline.min(Instant::now() + settings.batch_gap)
            };
            match tokio::time::timeout_at(until, consumer.recv()).await {
                Ok(Ok(message)) => push(&mut batch, &message, &by_name),
                Ok(Err(error)) => fail_if_fatal(consumer, error, outage)?,
                Err(_) => break,
            }
        }

        // Lanes: a partition's messages in one lane and in order (the sort is stable).
        let lanes = settings.lanes.clamp(1, 16);
        let lane_of =
            |delivery: &Delivery| usize::try_from(delivery.partition).unwrap_or(0) % lanes;
        batch.sort_by_key(|delivery| lane_of(delivery));
        let parts: Vec<&[Delivery]> = batch.chunk_by(|a, b| lane_of(a) == lane_of(b)).collect();
        // One span for the batch, linked to the trace of each message (at most 128 links).
        let batch_span = tracing::info_span!(
            "process batch",
            "otel.name" = %format!("process {}", settings.group_id),
            "otel.kind" = "consumer",
            "messaging.system" = "kafka",
            "messaging.operation.type" = "process",
            "messaging.consumer.group.name" = %settings.group_id,
            "messaging.batch.message_count" = batch.len(),
        );
        for delivery in batch.iter().take(128) {
            tandem_telemetry::link_from_headers(
                &batch_span,
                delivery
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            );
        }
        let applied =
            join_all(parts.into_iter().map(|part| {
                apply_until_done(handler, part, shutdown, &settings.group_id, failing)
            }))
            .instrument(batch_span)
            .await;
        if applied.iter().any(|done| !done) {
            return Ok(());
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
            offsets.add_partition_offset(&topic.name(config), partition, Offset::Offset(next))?;
        }
        // A failed commit only means the batch may be delivered again, which deduplication absorbs.
        if let Err(error) = consumer.commit(&offsets, CommitMode::Async) {
            tracing::warn!(error = %error, "offset commit failed; the batch may be redelivered");
        }
    }
}

/// Why the consumer's batches have been failing, since the last one that succeeded: the stall
/// watchdog tells a consumer stuck on a dependency (which may recover) from one that stopped.
#[derive(Clone, Default)]
pub(crate) struct Failing(std::sync::Arc<std::sync::Mutex<Option<String>>>);

impl Failing {
    fn set(&self, error: Option<String>) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = error;
    }

    pub(crate) fn why(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Applies one part of a batch until it succeeds, retrying with backoff; `false` if shutdown
/// came first.
async fn apply_until_done<H: BatchHandler>(
    handler: &H,
    part: &[Delivery],
    shutdown: &CancellationToken,
    group_id: &str,
    failing: &Failing,
) -> bool {
    let mut backoff = Duration::from_millis(100);
    let metrics = crate::metrics::metrics();
    let group = [opentelemetry::KeyValue::new(
        "messaging.consumer.group.name",
        group_id.to_owned(),
    )];
    metrics.batch_size.record(part.len() as u64, &group);
    loop {
        let started = Instant::now();
        let applied = handler.handle(part).await;
        let outcome = if applied.is_ok() { "ok" } else { "error" };
        metrics.process_duration.record(
            started.elapsed().as_secs_f64(),
            &[
                group[0].clone(),
                opentelemetry::KeyValue::new("outcome", outcome),
            ],
        );
        match applied {
            Ok(()) => {
                failing.set(None);
                return true;
            }
            Err(error) => {
                failing.set(Some(tandem_telemetry::error_chain(&error)));
                tracing::warn!(error = %error, source = ?std::error::Error::source(&error), messages = part.len(), backoff_ms = backoff.as_millis() as u64, "batch not applied; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return false,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Transient errors (a broker restarting) are logged and consumption goes on; librdkafka
/// reconnects by itself. A fatal error leaves the client unusable: it ends the consumer.
fn fail_if_fatal(
    consumer: &StreamConsumer,
    error: KafkaError,
    outage: &Outage,
) -> Result<(), BusError> {
    if let Some((code, reason)) = consumer.client().fatal_error() {
        return Err(BusError::ConsumerFatal {
            code: format!("{code:?}"),
            reason,
        });
    }
    if let KafkaError::MessageConsumptionFatal(code) = error {
        return Err(BusError::ConsumerFatal {
            code: format!("{code:?}"),
            reason: error.to_string(),
        });
    }
    if let KafkaError::MessageConsumption(
        RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure,
    ) = error
    {
        outage.record();
    }
    tracing::warn!(error = %error, "consumer error");
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
        topic_name: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec).unwrap_or_default(),
        payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers,
    });
}
