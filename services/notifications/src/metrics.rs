//! Webhook instruments:
//!
//! - `tandem.webhook.attempts` (counter): every attempt, by `outcome` (`succeeded`, `failed`);
//! - `tandem.webhook.attempt.duration` (histogram, s): until the endpoint's answer (or the
//!   timeout), by outcome;
//! - `tandem.webhook.endpoints.disabled` (counter): endpoints the service disabled because
//!   they kept failing (an alert's signal);
//! - `tandem.webhook.deliveries.pending` (gauge, counted up to 100 000) and
//!   `tandem.webhook.deliveries.oldest_due_age` (gauge, s): the queue, measured every 5 s.

use std::sync::OnceLock;

use opentelemetry::metrics::{Counter, Gauge, Histogram};

pub(crate) struct WebhookMetrics {
    pub attempts: Counter<u64>,
    pub duration: Histogram<f64>,
    pub disabled: Counter<u64>,
    pub pending: Gauge<i64>,
    pub oldest_due_age: Gauge<f64>,
}

pub(crate) fn metrics() -> &'static WebhookMetrics {
    static METRICS: OnceLock<WebhookMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = tandem_telemetry::meter();
        WebhookMetrics {
            attempts: meter
                .u64_counter("tandem.webhook.attempts")
                .with_unit("{attempt}")
                .with_description("Webhook delivery attempts, by outcome.")
                .build(),
            duration: meter
                .f64_histogram("tandem.webhook.attempt.duration")
                .with_unit("s")
                .with_description("Time until the endpoint answered (or the timeout), by outcome.")
                .with_boundaries(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ])
                .build(),
            disabled: meter
                .u64_counter("tandem.webhook.endpoints.disabled")
                .with_unit("{endpoint}")
                .with_description(
                    "Endpoints disabled because every delivery failed for longer than allowed.",
                )
                .build(),
            pending: meter
                .i64_gauge("tandem.webhook.deliveries.pending")
                .with_unit("{delivery}")
                .with_description("Deliveries waiting (due or scheduled), counted up to 100000.")
                .build(),
            oldest_due_age: meter
                .f64_gauge("tandem.webhook.deliveries.oldest_due_age")
                .with_unit("s")
                .with_description(
                    "How long the longest-waiting due delivery has been due (0 when none).",
                )
                .build(),
        }
    })
}
