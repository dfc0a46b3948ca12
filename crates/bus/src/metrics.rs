//! The bus's instruments (OpenTelemetry messaging conventions where they name one):
//!
//! - `messaging.kafka.consumer.lag` (gauge, `{message}`): messages past the group's committed
//!   offset, per group, topic and partition, read by the stall watchdog every few seconds;
//! - `messaging.batch.message_count` (histogram): messages per applied batch part, per group;
//! - `messaging.process.duration` (histogram, s): applying one batch part, per group and
//!   outcome (`ok`, `error`);
//! - `messaging.client.sent.messages` (counter): messages the outbox relay published, per topic;
//! - `tandem.outbox.depth` (gauge, `{message}`, counted up to 100 000) and
//!   `tandem.outbox.oldest_age` (gauge, s): what waits in a service's outbox, per schema.

use std::sync::OnceLock;

use opentelemetry::metrics::{Counter, Gauge, Histogram};

pub(crate) struct BusMetrics {
    pub lag: Gauge<i64>,
    pub batch_size: Histogram<u64>,
    pub process_duration: Histogram<f64>,
    pub sent: Counter<u64>,
    pub outbox_depth: Gauge<i64>,
    pub outbox_oldest_age: Gauge<f64>,
}

pub(crate) fn metrics() -> &'static BusMetrics {
    static METRICS: OnceLock<BusMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = tandem_telemetry::meter();
        BusMetrics {
            lag: meter
                .i64_gauge("messaging.kafka.consumer.lag")
                .with_unit("{message}")
                .with_description("Messages past the consumer group's committed offset, per partition.")
                .build(),
            batch_size: meter
                .u64_histogram("messaging.batch.message_count")
                .with_unit("{message}")
                .with_description("Messages in each applied batch part, per consumer group.")
                .with_boundaries(vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0])
                .build(),
            process_duration: meter
                .f64_histogram("messaging.process.duration")
                .with_unit("s")
                .with_description("Time to apply one batch part (one transaction), per consumer group and outcome.")
                .with_boundaries(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
                .build(),
            sent: meter
                .u64_counter("messaging.client.sent.messages")
                .with_unit("{message}")
                .with_description("Messages the outbox relay published, per topic.")
                .build(),
            outbox_depth: meter
                .i64_gauge("tandem.outbox.depth")
                .with_unit("{message}")
                .with_description("Messages waiting in the outbox (counted up to 100000), per schema.")
                .build(),
            outbox_oldest_age: meter
                .f64_gauge("tandem.outbox.oldest_age")
                .with_unit("s")
                .with_description("Age of the oldest message waiting in the outbox (0 when empty), per schema.")
                .build(),
        }
    })
}
