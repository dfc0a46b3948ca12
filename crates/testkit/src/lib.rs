//! Test helpers for tests that use the real Postgres and the real broker: a fresh database per
//! test, a unique topic prefix per test (with its topics created), and helpers to read topics
//! back. `DATABASE_URL` and `TANDEM_KAFKA_BROKERS` say where they are; `deploy/local/test.sh`
//! starts both.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::{Connection, PgConnection};
use tandem_bus::{BusConfig, Topic};

pub fn database_server_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".to_owned())
}

pub fn brokers() -> String {
    std::env::var("TANDEM_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// A database of its own for one test, dropped when the value is.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    server_url: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        tandem_telemetry::init_for_tests();
        let server_url = database_server_url();
        let name = format!("tandem_test_{}", uuid::Uuid::new_v4().simple());
        let mut connection = PgConnection::connect(&server_url)
            .await
            .expect("connect to Postgres at DATABASE_URL (run deploy/local/test.sh to start it)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut connection)
            .await
            .expect("create test database");
        let url = tandem_store::url_with_database(&server_url, &name);
        Self {
            name,
            url,
            server_url,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let server_url = self.server_url.clone();
        let name = self.name.clone();
        // Best effort, on a thread of its own: Drop cannot be async.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let mut connection = PgConnection::connect(&server_url)
                    .await
                    .map_err(std::io::Error::other)?;
                // Bounded: a drop that waits on a lock must not hold the test forever.
                sqlx::query("SET statement_timeout = '30s'")
                    .execute(&mut connection)
                    .await
                    .map_err(std::io::Error::other)?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut connection)
                    .await
                    .map_err(std::io::Error::other)?;
                Ok::<(), std::io::Error>(())
            })
        })
        .join();
    }
}

/// Topics of their own for one test: a unique prefix, with every Tandem topic created.
pub async fn test_bus(activity_partitions: i32) -> BusConfig {
    test_bus_on(&brokers(), activity_partitions).await
}

/// As [`test_bus`], on the broker(s) at `brokers` (a test's private broker).
pub async fn test_bus_on(brokers: &str, activity_partitions: i32) -> BusConfig {
    let config = BusConfig {
        brokers: brokers.to_owned(),
        topic_prefix: format!("test-{}", uuid::Uuid::new_v4().simple()),
        client_properties: Default::default(),
    };
    let settings = tandem_bus::TopicSettings {
        activity_partitions,
        partnership_partitions: activity_partitions,
        ..Default::default()
    };
    tandem_bus::create_topics(&config, &settings)
        .await
        .expect("create topics (is the broker running? deploy/local/test.sh starts it)");
    config
}

/// Topics of their own on a cluster: every partition copied `replication` times, writes
/// acknowledged by `min_insync` copies, so one broker can die without losing or refusing any.
pub async fn test_bus_replicated(
    brokers: &str,
    partitions: i32,
    replication: i32,
    min_insync: i32,
) -> BusConfig {
    let config = BusConfig {
        brokers: brokers.to_owned(),
        topic_prefix: format!("test-{}", uuid::Uuid::new_v4().simple()),
        client_properties: Default::default(),
    };
    let settings = tandem_bus::TopicSettings {
        activity_partitions: partitions,
        partnership_partitions: partitions,
        replication_factor: replication,
        min_insync_replicas: Some(min_insync),
        ..Default::default()
    };
    tandem_bus::create_topics(&config, &settings)
        .await
        .expect("create replicated topics");
    config
}

/// A raw message read back from a topic.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Every message on `topic` up to its current end, from all partitions.
pub fn read_topic(config: &BusConfig, topic: Topic) -> Vec<RawMessage> {
    let name = topic.name(config);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set(
            "group.id",
            format!("reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader consumer");
    let metadata = consumer
        .fetch_metadata(Some(&name), Duration::from_secs(10))
        .expect("topic metadata");
    let partitions: Vec<i32> = metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut assignment = TopicPartitionList::new();
    let mut remaining = 0i64;
    let mut ends = std::collections::HashMap::new();
    for partition in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(&name, *partition, Duration::from_secs(10))
            .expect("watermarks");
        if high > low {
            assignment
                .add_partition_offset(&name, *partition, Offset::Offset(low))
                .expect("assign");
            remaining += high - low;
            ends.insert(*partition, high);
        }
    }
    let mut messages = Vec::new();
    if remaining == 0 {
        return messages;
    }
    consumer.assign(&assignment).expect("assign partitions");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while remaining > 0 && std::time::Instant::now() < deadline {
        if let Some(result) = consumer.poll(Duration::from_millis(200)) {
            // A broker of the cluster that is down (a fault test killed it) is reported as an
            // error event; the client fails over to the replicas, so keep reading.
            let message = match result {
                Ok(message) => message,
                Err(KafkaError::MessageConsumption(
                    RDKafkaErrorCode::BrokerTransportFailure
                    | RDKafkaErrorCode::AllBrokersDown
                    | RDKafkaErrorCode::NetworkException,
                )) => continue,
                Err(error) => panic!("read message from {name}: {error}"),
            };
            if message.offset() < ends[&message.partition()] {
                remaining -= 1;
                let headers = message
                    .headers()
                    .map(|headers| {
                        use rdkafka::message::Headers;
                        headers
                            .iter()
                            .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                messages.push(RawMessage {
                    key: message.key().unwrap_or_default().to_vec(),
                    payload: message.payload().unwrap_or_default().to_vec(),
                    headers,
                });
            }
        }
    }
    assert_eq!(remaining, 0, "could not read all of {name} within 30 s");
    messages
}

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Messages on `topic` that consumer group `group` has not committed past yet (all of them if
/// it never committed).
pub fn group_lag(config: &BusConfig, group: &str, topic: Topic) -> i64 {
    let monitor = tandem_bus::group_monitor(config, group).expect("lag consumer");
    tandem_bus::group_positions(&monitor, &[topic.name(config)], Duration::from_secs(10))
        .expect("group positions")
        .iter()
        .map(|position| position.lag)
        .sum()
}

/// Publishes one message to `topic` (acknowledged by every in-sync replica), as a producer
/// outside Tandem would: for poison messages and for replaying captured messages in another
/// order.
pub async fn publish(config: &BusConfig, topic: Topic, key: &[u8], payload: &[u8]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("acks", "all")
        .create()
        .expect("test producer");
    let name = topic.name(config);
    producer
        .send(
            FutureRecord::to(&name).key(key).payload(payload),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(error, _)| error)
        .expect("publish a test message");
}
