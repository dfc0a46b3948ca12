//! Topic names and their creation. Brokers here do not create topics automatically, so every
//! deployment (and every test) creates its topics explicitly, with a fixed partition count.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::{BusConfig, BusError};

/// The topics Tandem uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Merchants and partnerships; key = merchant or partnership id.
    Admin,
    /// Referrals and purchases; key = customer key, so one partition holds one customer's
    /// history in order.
    CustomerActivity,
    /// Internal to the referral ledger: attributed purchases and refunds, and copies of the
    /// terms events, keyed by partnership, so that one instance owns each partnership's
    /// commission decisions.
    Attributions,
    /// What the ledger decided (referral converted, purchase attributed, commission accrued,
    /// reversed, payable); key = partnership id. Read by settlement and notifications.
    Ledger,
    /// What settlement issued (statements, payout instructions); key = merchant id. Read by
    /// notifications.
    Settlement,
}

impl Topic {
    pub const ALL: [Topic; 5] = [
        Topic::Admin,
        Topic::CustomerActivity,
        Topic::Attributions,
        Topic::Ledger,
        Topic::Settlement,
    ];

    /// The name without the deployment prefix, as stored in the outbox.
    pub fn logical_name(self) -> &'static str {
        match self {
            Topic::Admin => "admin",
            Topic::CustomerActivity => "customer-activity",
            Topic::Attributions => "attributions",
            Topic::Ledger => "ledger",
            Topic::Settlement => "settlement",
        }
    }

    pub fn from_logical_name(name: &str) -> Option<Topic> {
        Topic::ALL
            .into_iter()
            .find(|topic| topic.logical_name() == name)
    }

    pub fn name(self, config: &BusConfig) -> String {
        format!("{}.{}", config.topic_prefix, self.logical_name())
    }
}

/// How Tandem's topics are created: partitions, replication and retention come from
/// configuration (`tandemctl create-topics --help`), not from constants.
#[derive(Debug, Clone)]
pub struct TopicSettings {
    /// Partitions of customer-activity: the unit of parallelism of attribution. The admin topic
    /// always has one partition, because activity events wait for admin events by their position
    /// in its single, global order (the admin sequence).
    pub activity_partitions: i32,
    /// Partitions of the topics keyed by partnership (attributions, ledger): the unit of
    /// parallelism of commission decisions.
    pub partnership_partitions: i32,
    /// Copies of every partition: 1 on a one-node broker, 3 on a production cluster.
    pub replication_factor: i32,
    /// In-sync copies a write needs before it is acknowledged (`acks=all`); the broker's default
    /// when `None`. With replication factor 3, 2 lets one broker fail without losing or refusing
    /// a write.
    pub min_insync_replicas: Option<i32>,
    /// How long the broker keeps admin messages; -1 keeps them forever.
    pub admin_retention_ms: i64,
    /// How long the broker keeps customer-activity messages; -1 keeps them forever.
    pub activity_retention_ms: i64,
}

impl Default for TopicSettings {
    fn default() -> Self {
        Self {
            activity_partitions: 12,
            partnership_partitions: 12,
            replication_factor: 1,
            min_insync_replicas: None,
            admin_retention_ms: -1,
            activity_retention_ms: -1,
        }
    }
}

impl TopicSettings {
    fn partitions(&self, topic: Topic) -> i32 {
        match topic {
            Topic::Admin => 1,
            Topic::CustomerActivity => self.activity_partitions,
            Topic::Attributions | Topic::Ledger | Topic::Settlement => self.partnership_partitions,
        }
    }

    fn retention_ms(&self, topic: Topic) -> i64 {
        match topic {
            Topic::Admin => self.admin_retention_ms,
            Topic::CustomerActivity | Topic::Attributions | Topic::Ledger | Topic::Settlement => {
                self.activity_retention_ms
            }
        }
    }
}

/// Creates every Tandem topic for `config`'s prefix. Topics that already exist are left alone
/// (a partition count is never changed behind a running system: it would move keys between
/// partitions), but one whose partition count differs from `settings` is reported, and an admin
/// topic with more than one partition is refused.
pub async fn create_topics(config: &BusConfig, settings: &TopicSettings) -> Result<(), BusError> {
    let admin: AdminClient<DefaultClientContext> = config.client_config().create()?;
    let specs: Vec<(Topic, String, String, Option<String>)> = Topic::ALL
        .into_iter()
        .map(|topic| {
            (
                topic,
                topic.name(config),
                settings.retention_ms(topic).to_string(),
                settings.min_insync_replicas.map(|n| n.to_string()),
            )
        })
        .collect();
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|(topic, name, retention_ms, min_insync)| {
            let mut new_topic = NewTopic::new(
                name,
                settings.partitions(*topic),
                TopicReplication::Fixed(settings.replication_factor),
            )
            .set("retention.ms", retention_ms);
            if let Some(min_insync) = min_insync {
                new_topic = new_topic.set("min.insync.replicas", min_insync);
            }
            new_topic
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(BusError::CreateTopic {
                    topic,
                    reason: code.to_string(),
                })
            }
        }
    }
    for (topic, name, _, _) in &specs {
        // A topic just created may not be in every broker's metadata yet: ask again briefly.
        let mut found = 0;
        for _ in 0..50 {
            let metadata = admin
                .inner()
                .fetch_metadata(Some(name), Duration::from_secs(30))?;
            found = metadata
                .topics()
                .first()
                .map_or(0, |t| t.partitions().len() as i32);
            if found > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let wanted = settings.partitions(*topic);
        if found == wanted {
            continue;
        }
        if *topic == Topic::Admin {
            return Err(BusError::CreateTopic {
                topic: name.clone(),
                reason: format!(
                    "it exists with {found} partitions; the admin topic must have exactly 1"
                ),
            });
        }
        tracing::warn!(
            topic = %name,
            partitions = found,
            configured = wanted,
            "topic exists with another partition count; left as it is"
        );
    }
    Ok(())
}
