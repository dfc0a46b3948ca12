//! Notices a consumer that has stopped making progress while messages wait for it, so that it
//! fails loudly instead of sitting idle and healthy.
//!
//! Every few seconds it reads the group's position on every partition of the consumer's topics
//! ([`crate::lag`]). A partition is stalled when it has messages past the committed offset and
//! that offset has not moved for the stall timeout. The consumer fails when a stalled partition is
//! assigned to it, or when it has no partition at all while one is stalled (the group left it out,
//! or the coordinator lost track of it). When the broker cannot be asked, nothing is concluded,
//! and the time it could not be asked does not count towards a stall.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use tokio::time::Instant;

use crate::lag::{group_monitor, group_positions, GroupPosition};
use crate::{BusConfig, BusError};

/// Bound of every request the watchdog makes to the broker.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Watchdog {
    pub config: BusConfig,
    pub group_id: String,
    pub topics: Vec<String>,
    pub stall_timeout: Duration,
    pub readiness: crate::Readiness,
    /// Why the consumer's batches are failing, if they are.
    pub failing: crate::consumer::Failing,
}

impl Watchdog {
    /// A client that reads the group's committed offsets for [`Watchdog::run`]; the caller
    /// closes it off the runtime when the watchdog ends (it has a `group.id`).
    pub fn monitor(&self) -> Result<Arc<BaseConsumer>, BusError> {
        Ok(Arc::new(group_monitor(&self.config, &self.group_id)?))
    }

    /// Returns only when the consumer is stalled.
    pub async fn run(&self, consumer: &StreamConsumer, monitor: Arc<BaseConsumer>) -> BusError {
        let interval =
            (self.stall_timeout / 6).clamp(Duration::from_secs(1), Duration::from_secs(10));
        // Per partition: the committed offset last seen, and since when it has not moved.
        let mut seen: HashMap<(String, i32), (i64, Instant)> = HashMap::new();
        // A gap this long between two good reads is an outage of the broker, not a slow read.
        let outage = interval * 2 + REQUEST_TIMEOUT;
        let mut last_read = Instant::now();
        loop {
            tokio::time::sleep(interval).await;
            let positions = match self.positions(monitor.clone()).await {
                Ok(positions) => positions,
                Err(error) => {
                    tracing::debug!(group_id = %self.group_id, error = %error, "watchdog could not read the group's positions");
                    continue;
                }
            };
            let now = Instant::now();
            // The time the broker could not be asked does not count towards a stall: otherwise
            // an outage longer than the stall timeout would end the consumer the moment the
            // broker is back, while it rejoins the group. A read failing now and then (one
            // partition's watermarks) does not pause the clocks.
            let gap = now.duration_since(last_read);
            if gap > outage {
                for (_, since) in seen.values_mut() {
                    *since += gap;
                }
            }
            last_read = now;
            let metrics = crate::metrics::metrics();
            for position in &positions {
                metrics.lag.record(
                    position.lag,
                    &[
                        KeyValue::new("messaging.consumer.group.name", self.group_id.clone()),
                        KeyValue::new("messaging.destination.name", position.topic.clone()),
                        KeyValue::new(
                            "messaging.destination.partition.id",
                            position.partition.to_string(),
                        ),
                    ],
                );
            }
            let condition = format!("consumer {}", self.group_id);
            let mut stalled = Vec::new();
            for position in positions {
                let key = (position.topic.clone(), position.partition);
                let entry = seen.entry(key).or_insert((position.committed, now));
                if position.committed != entry.0 || position.lag == 0 {
                    *entry = (position.committed, now);
                } else if now.duration_since(entry.1) >= self.stall_timeout {
                    stalled.push(position);
                }
            }
            if stalled.is_empty() {
                self.readiness.set(&condition, None);
                continue;
            }
            // Stalled because every batch fails (the database is down, say): not ready, and
            // ready again once a batch goes through; restarting would not help.
            if let Some(why) = self.failing.why() {
                self.readiness.set(
                    &condition,
                    Some(format!(
                        "no progress for {} s on {} partition(s) with messages waiting; applying batches fails: {why}",
                        self.stall_timeout.as_secs(),
                        stalled.len()
                    )),
                );
                continue;
            }
            let assigned: HashSet<(String, i32)> = consumer
                .assignment()
                .map(|list| {
                    list.elements()
                        .iter()
                        .map(|element| (element.topic().to_owned(), element.partition()))
                        .collect()
                })
                .unwrap_or_default();
            let mine: Vec<&GroupPosition> = stalled
                .iter()
                .filter(|p| assigned.contains(&(p.topic.clone(), p.partition)))
                .collect();
            if mine.is_empty() && !assigned.is_empty() {
                // Another member of the group owns them; its own watchdog will speak.
                continue;
            }
            let blamed: Vec<&GroupPosition> = if mine.is_empty() {
                stalled.iter().collect()
            } else {
                mine
            };
            return BusError::ConsumerStalled {
                group_id: self.group_id.clone(),
                partitions: blamed
                    .iter()
                    .map(|p| format!("{}[{}] ({} waiting)", p.topic, p.partition, p.lag))
                    .collect::<Vec<_>>()
                    .join(", "),
                assigned: assigned.len(),
                stalled_for_secs: self.stall_timeout.as_secs(),
            };
        }
    }

    /// The group's position on every partition, read off the async runtime's threads.
    async fn positions(&self, monitor: Arc<BaseConsumer>) -> Result<Vec<GroupPosition>, BusError> {
        let topics = self.topics.clone();
        let joined = tokio::task::spawn_blocking(move || {
            group_positions(&monitor, &topics, REQUEST_TIMEOUT)
        })
        .await;
        match joined {
            Ok(result) => Ok(result?),
            Err(join_error) => Err(BusError::Monitor(join_error.to_string())),
        }
    }
}
