//! What a consumer group has yet to consume: its committed offset and lag on every partition of
//! some topics, read by a client that shares the group id but never subscribes, so it never
//! joins the group. The stall watchdog reads it every few seconds; tests read it too.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

use crate::{BusConfig, BusError};

/// Where a consumer group stands on one partition.
#[derive(Debug, Clone)]
pub struct GroupPosition {
    pub topic: String,
    pub partition: i32,
    /// The next offset the group will read (the partition's first if it never committed).
    pub committed: i64,
    /// Messages past `committed`.
    pub lag: i64,
}

/// A client that reads `group_id`'s committed offsets without joining the group.
pub fn group_monitor(config: &BusConfig, group_id: &str) -> Result<BaseConsumer, BusError> {
    Ok(config
        .client_config()
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .create()?)
}

/// The group's position on every partition of `topics` (full names). Blocking: each request
/// waits up to `timeout`.
pub fn group_positions(
    monitor: &BaseConsumer,
    topics: &[String],
    timeout: Duration,
) -> KafkaResult<Vec<GroupPosition>> {
    let mut partitions = TopicPartitionList::new();
    for topic in topics {
        let metadata = monitor.fetch_metadata(Some(topic), timeout)?;
        for found in metadata.topics() {
            for partition in found.partitions() {
                partitions.add_partition(topic, partition.id());
            }
        }
    }
    let committed = monitor.committed_offsets(partitions, timeout)?;
    let mut positions = Vec::new();
    for element in committed.elements() {
        let (low, high) =
            monitor.fetch_watermarks(element.topic(), element.partition(), timeout)?;
        let committed = match element.offset() {
            Offset::Offset(offset) => offset,
            _ => low,
        };
        positions.push(GroupPosition {
            topic: element.topic().to_owned(),
            partition: element.partition(),
            committed,
            lag: (high - committed.max(low)).max(0),
        });
    }
    Ok(positions)
}
