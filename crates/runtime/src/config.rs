//! Configuration shared by the services. Each service's `Config` derives `clap::Parser` and
//! flattens these groups, so every setting is a flag and a `TANDEM_…` environment variable, and a
//! bad value is reported with the name of the setting.

use std::time::Duration;

use tandem_bus::{BusConfig, ClientProperties, GroupMembership, TopicSettings};
use tandem_store::StoreConfig;

/// Where the service's Postgres schema lives.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseArgs {
    /// Postgres URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres:postgres@127.0.0.1:5432/tandem"
    )]
    pub database_url: String,
    /// Connections in the pool.
    #[arg(long, env = "TANDEM_DB_MAX_CONNECTIONS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=200))]
    pub db_max_connections: u32,
    #[command(flatten)]
    pub retention: RetentionArgs,
}

/// How long the bookkeeping tables keep their rows, and how often they are pruned. Why these
/// bounds keep exactly-once: docs/SECURITY.md, "Bookkeeping retention".
#[derive(Debug, Clone, clap::Args)]
pub struct RetentionArgs {
    /// Seconds between two prunings of the bookkeeping tables.
    #[arg(long, env = "TANDEM_PRUNE_EVERY_SECS", default_value_t = 3_600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub prune_every_secs: u64,
    /// Hours a consumer keeps the mark of a message it applied (`applied_messages`): a copy of
    /// the message delivered again within that time is recognised and skipped. At least a day.
    #[arg(long, env = "TANDEM_APPLIED_MESSAGES_RETENTION_HOURS", default_value_t = 168, value_parser = clap::value_parser!(u64).range(24..=87_600))]
    pub applied_messages_retention_hours: u64,
}

impl Default for RetentionArgs {
    fn default() -> Self {
        Self {
            prune_every_secs: 3_600,
            applied_messages_retention_hours: 168,
        }
    }
}

impl RetentionArgs {
    pub fn prune_every(&self) -> Duration {
        Duration::from_secs(self.prune_every_secs)
    }

    /// The retention of `applied_messages`.
    pub fn applied_messages(&self) -> tandem_store::Retention {
        tandem_store::Retention::applied_messages(hours(self.applied_messages_retention_hours))
    }
}

/// `count` hours.
pub fn hours(count: u64) -> Duration {
    Duration::from_secs(count.saturating_mul(3_600))
}

impl DatabaseArgs {
    pub fn store_config(&self, schema: &str) -> StoreConfig {
        StoreConfig {
            database_url: self.database_url.clone(),
            schema: schema.to_owned(),
            max_connections: self.db_max_connections,
        }
    }
}

/// How the service reaches Kafka.
#[derive(Debug, Clone, clap::Args)]
pub struct BusArgs {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "TANDEM_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Prefix of every topic name.
    #[arg(long, env = "TANDEM_TOPIC_PREFIX", default_value = "tandem")]
    pub topic_prefix: String,
    /// A properties file (`key=value` lines) of librdkafka settings for every Kafka client, for
    /// an existing cluster's TLS and SASL: `security.protocol`, `ssl.ca.location`,
    /// `sasl.mechanism`, `sasl.username`, `sasl.password`, ...
    #[arg(long, env = "TANDEM_KAFKA_CLIENT_PROPERTIES", value_parser = ClientProperties::from_file)]
    pub kafka_client_properties: Option<ClientProperties>,
}

impl BusArgs {
    pub fn bus_config(&self) -> BusConfig {
        BusConfig {
            brokers: self.kafka_brokers.clone(),
            topic_prefix: self.topic_prefix.clone(),
            client_properties: self.kafka_client_properties.clone().unwrap_or_default(),
        }
    }
}

/// How a consuming service takes part in its consumer groups. The reasons for the defaults are
/// in docs/ARCHITECTURE.md, "Consumer groups and recovery".
#[derive(Debug, Clone, clap::Args)]
pub struct ConsumerArgs {
    /// This instance's stable id in its consumer groups (Kafka static membership): a restart
    /// under the same id resumes at once. Unique per running instance. Default:
    /// `<host name>:<listen port>`, which two live processes on one host cannot share.
    #[arg(long, env = "TANDEM_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// How long the group waits for a silent instance before its partitions go to others.
    #[arg(long, env = "TANDEM_CONSUMER_SESSION_TIMEOUT_MS", default_value_t = 15_000, value_parser = clap::value_parser!(u64).range(6_000..=300_000))]
    pub consumer_session_timeout_ms: u64,
    /// How long a consumer may make no progress while messages wait for it before the service
    /// reports NOT_SERVING and exits non-zero, for its supervisor to restart it.
    #[arg(long, env = "TANDEM_CONSUMER_STALL_TIMEOUT_MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(5_000..=150_000))]
    pub consumer_stall_timeout_ms: u64,
}

impl ConsumerArgs {
    /// The membership of a service listening on `listen_port`.
    pub fn membership(&self, listen_port: u16) -> GroupMembership {
        GroupMembership {
            instance_id: Some(
                self.instance_id
                    .clone()
                    .unwrap_or_else(|| format!("{}:{listen_port}", host_name())),
            ),
            session_timeout: Duration::from_millis(self.consumer_session_timeout_ms),
            stall_timeout: Duration::from_millis(self.consumer_stall_timeout_ms),
        }
    }
}

/// The machine's host name (a pod's name on Kubernetes), or `localhost` if it cannot be read.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// How `tandemctl create-topics` creates the topics.
#[derive(Debug, Clone, clap::Args)]
pub struct TopicArgs {
    /// Partitions of the customer-activity topic (the admin topic always has one).
    #[arg(long, env = "TANDEM_ACTIVITY_PARTITIONS", default_value_t = 12, value_parser = clap::value_parser!(i32).range(1..=1_000))]
    pub activity_partitions: i32,
    /// Partitions of the topics keyed by partnership (attributions, ledger): how many ledger
    /// instances can share commission decisions.
    #[arg(long, env = "TANDEM_PARTNERSHIP_PARTITIONS", default_value_t = 12, value_parser = clap::value_parser!(i32).range(1..=1_000))]
    pub partnership_partitions: i32,
    /// Copies of every partition: 1 on a one-node broker, 3 on a production cluster.
    #[arg(long, env = "TANDEM_TOPIC_REPLICATION_FACTOR", default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=16))]
    pub replication_factor: i32,
    /// In-sync copies a write needs (the topic's min.insync.replicas); the broker's default if
    /// unset. 2 with replication factor 3.
    #[arg(long, env = "TANDEM_TOPIC_MIN_INSYNC_REPLICAS", value_parser = clap::value_parser!(i32).range(1..=16))]
    pub min_insync_replicas: Option<i32>,
    /// Retention of the admin topic in milliseconds; -1 keeps it forever.
    #[arg(long, env = "TANDEM_ADMIN_RETENTION_MS", default_value_t = -1, allow_negative_numbers = true, value_parser = parse_retention)]
    pub admin_retention_ms: i64,
    /// Retention of the customer-activity, attributions and ledger topics in milliseconds; -1
    /// keeps them forever (a projection is rebuilt by replaying them).
    #[arg(long, env = "TANDEM_ACTIVITY_RETENTION_MS", default_value_t = -1, allow_negative_numbers = true, value_parser = parse_retention)]
    pub activity_retention_ms: i64,
}

fn parse_retention(value: &str) -> Result<i64, String> {
    match value.trim().parse::<i64>() {
        Ok(-1) => Ok(-1),
        Ok(ms) if ms >= 60_000 => Ok(ms),
        _ => Err("must be -1 (forever) or at least 60000 (one minute)".to_owned()),
    }
}

impl TopicArgs {
    pub fn topic_settings(&self) -> Result<TopicSettings, String> {
        if let Some(min_insync) = self.min_insync_replicas {
            if min_insync > self.replication_factor {
                return Err(format!(
                    "--min-insync-replicas ({min_insync}) cannot exceed --replication-factor ({}): every write would be refused",
                    self.replication_factor
                ));
            }
        }
        Ok(TopicSettings {
            activity_partitions: self.activity_partitions,
            partnership_partitions: self.partnership_partitions,
            replication_factor: self.replication_factor,
            min_insync_replicas: self.min_insync_replicas,
            admin_retention_ms: self.admin_retention_ms,
            activity_retention_ms: self.activity_retention_ms,
        })
    }
}
