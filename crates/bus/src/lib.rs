//! Kafka plumbing shared by every Tandem service: the topic names, an idempotent producer, the
//! outbox relay that publishes what services commit to Postgres, and the one consumer loop that
//! applies messages in batches and stores offsets only after the batch's transaction commits.

mod close;
mod config;
mod consumer;
mod lag;
mod metrics;
mod readiness;
mod relay;
mod topics;
mod watchdog;

pub use config::{BusConfig, ClientProperties};
pub use consumer::{run_consumer, BatchHandler, ConsumerSettings, Delivery, GroupMembership};
pub use lag::{group_monitor, group_positions, GroupPosition};
pub use readiness::{watch_brokers, watch_database, Readiness};
pub use relay::{run_outbox_relay, RelaySettings};
pub use topics::{create_topics, Topic, TopicSettings};

use rdkafka::producer::FutureProducer;

/// Errors from the message bus, with the cause chain kept.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("kafka error")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("could not create topic {topic}: {reason}")]
    CreateTopic { topic: String, reason: String },
    #[error("outbox storage error")]
    Store(#[from] tandem_store::StoreError),
    #[error("unknown logical topic {0:?} in the outbox")]
    UnknownTopic(String),
    #[error("consumer group {group_id} made no progress for {stalled_for_secs} s while messages waited on {partitions} ({assigned} partitions assigned to this instance)")]
    ConsumerStalled {
        group_id: String,
        partitions: String,
        assigned: usize,
        stalled_for_secs: u64,
    },
    #[error("the Kafka consumer failed fatally ({code}): {reason}; if another instance runs with the same instance id (TANDEM_INSTANCE_ID), give each its own")]
    ConsumerFatal { code: String, reason: String },
    #[error("the consumer watchdog failed: {0}")]
    Monitor(String),
}

/// A producer that never loses or duplicates a message it acknowledged: idempotence on, every
/// in-sync replica must acknowledge (`acks=all`).
pub fn idempotent_producer(config: &BusConfig) -> Result<FutureProducer, BusError> {
    Ok(config
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()?)
}
