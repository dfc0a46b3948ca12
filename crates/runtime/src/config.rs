//! Configuration shared by the services. Each service's `Config` derives `clap::Parser` and
//! flattens these groups, so every setting is a flag and a `TANDEM_…` environment variable, and a
//! bad value is reported with the name of the setting.

use tandem_bus::BusConfig;
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
}

impl BusArgs {
    pub fn bus_config(&self) -> BusConfig {
        BusConfig {
            brokers: self.kafka_brokers.clone(),
            topic_prefix: self.topic_prefix.clone(),
        }
    }
}
