//! Topic names and their creation. Brokers here do not create topics automatically, so every
//! deployment (and every test) creates its topics explicitly, with a fixed partition count.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;

use crate::BusError;

/// How a service reaches the broker and which topics are its deployment's.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// Comma-separated `host:port` list.
    pub brokers: String,
    /// Prefix of every topic name, e.g. `tandem` gives `tandem.customer-activity`. Tests use a
    /// unique prefix each so they never see each other's messages.
    pub topic_prefix: String,
}

/// The topics Tandem uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Merchants and partnerships; key = merchant or partnership id.
    Admin,
    /// Referrals and purchases; key = customer key, so one partition holds one customer's
    /// history in order.
    CustomerActivity,
}

impl Topic {
    pub const ALL: [Topic; 2] = [Topic::Admin, Topic::CustomerActivity];

    /// The name without the deployment prefix, as stored in the outbox.
    pub fn logical_name(self) -> &'static str {
        match self {
            Topic::Admin => "admin",
            Topic::CustomerActivity => "customer-activity",
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

    /// Partitions to create. Customer activity is where throughput is needed.
    pub fn default_partitions(self) -> i32 {
        match self {
            Topic::Admin => 1,
            Topic::CustomerActivity => 12,
        }
    }
}

/// Creates every Tandem topic for `config`'s prefix; topics that already exist are left alone.
pub async fn create_topics(config: &BusConfig, activity_partitions: i32) -> Result<(), BusError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .create()?;
    let names: Vec<(String, i32)> = Topic::ALL
        .into_iter()
        .map(|topic| {
            let partitions = match topic {
                Topic::CustomerActivity => activity_partitions,
                other => other.default_partitions(),
            };
            (topic.name(config), partitions)
        })
        .collect();
    let new_topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
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
    Ok(())
}
