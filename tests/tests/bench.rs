//! The benchmark harness's short form, on the real stack: every figure is there and the
//! end-to-end counts equal the purchases sent. No timing is asserted: a benchmark is not a test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::time::Duration;

use support::*;
use tandemctl::bench::{measure, Settings};
use tandemctl::ceilings::CeilingSettings;

#[tokio::test]
async fn the_harness_short_form_reports_every_figure() {
    let stack = Stack::start(true).await;
    let settings = Settings {
        gateway: tandemctl::client::GatewayUrl::plaintext(format!(
            "http://{}",
            stack.gateway_address()
        )),
        operator_token: OPERATOR_TOKEN.into(),
        bus: stack.bus.clone(),
        database_url: stack.database.url.clone(),
        ledger_group: format!("{}-referral-ledger", stack.bus.topic_prefix),
        partnerships: 5,
        customers: 40,
        purchases: 120,
        concurrency: 4,
        bulk: 25,
        ceilings: CeilingSettings {
            kafka_messages: 1_000,
            kafka_partitions: 3,
            postgres_rows: 100,
            postgres_batch_rows: 20,
            tonic_calls: 500,
            concurrency: 4,
        },
        processes: vec![("test process".into(), std::process::id())],
        open_loop_seconds: 2.0,
        history_purchases: 200,
        timeout: Duration::from_secs(120),
    };
    let report = measure(&settings).await.expect("the harness runs");
    let c = &report.ceilings;
    for (what, rate) in [
        ("kafka produce", &c.kafka_produce),
        ("kafka consume", &c.kafka_consume),
        ("postgres single", &c.postgres_single_row_transactions),
        ("postgres batched", &c.postgres_batched_rows),
        ("tonic", &c.tonic_unary_calls),
    ] {
        assert!(rate.count > 0 && rate.per_second > 0.0, "{what}: {rate:?}");
    }
    assert_eq!(c.kafka_produce.count, 1_000);
    assert_eq!(c.kafka_consume.count, 1_000);
    assert_eq!(c.postgres_batched_rows.count, 400);
    assert!(c.kafka_message_bytes > 100);
    for workload in [&report.single, &report.bulk] {
        assert_eq!(workload.purchases_sent, 120);
        assert_eq!(workload.purchases_attributed, 120, "{workload:?}");
        assert!(workload.end_to_end.per_second > 0.0);
        assert!(
            workload.acknowledgement_latency.p999_ms >= workload.acknowledgement_latency.p50_ms
        );
        assert!(
            workload
                .cpu_seconds
                .iter()
                .any(|(name, _)| name == "test process"),
            "{:?}",
            workload.cpu_seconds
        );
    }
    assert_eq!(report.bulk.items_per_call, 25);
    let open = &report.open_loop;
    assert!(open.purchases_sent > 0 && open.rate_per_second > 0.0);
    assert_eq!(open.purchases_announced, open.purchases_sent, "{open:?}");
    assert!(open.latency.p99_ms >= open.latency.p50_ms && open.latency.p50_ms > 0.0);
    let history = report.history.as_ref().expect("the history run");
    assert_eq!(history.purchases, 200);
    assert_eq!(history.first_tenth.count, 20);
    assert_eq!(history.last_tenth.count, 20);
    assert!(history.ratio > 0.0);
    assert!(report.ratios.single_over_slowest_ceiling > 0.0);
    assert!(report.ratios.bulk_over_lower_of_kafka_and_postgres > 0.0);
    assert_eq!(report.processes.len(), 1);
    assert!(report.processes[0].peak_rss_mib > 0.0);
    // The JSON result carries the same figures.
    let json = serde_json::to_value(&report).unwrap();
    for key in [
        "ceilings",
        "single",
        "bulk",
        "ratios",
        "processes",
        "machine",
    ] {
        assert!(
            json.get(key).is_some(),
            "{key} missing from the JSON result"
        );
    }
    stack.stop().await;
}

#[tokio::test]
async fn the_webhook_harness_short_form_reports_every_figure() {
    let mut stack = Stack::start(true).await;
    stack.start_notifications().await;
    let settings = tandemctl::webhook_bench::Settings {
        gateway: tandemctl::client::GatewayArgs {
            url: tandemctl::client::GatewayUrl::plaintext(format!(
                "http://{}",
                stack.gateway_address()
            )),
            operator_token: OPERATOR_TOKEN.into(),
        },
        bus: stack.bus.clone(),
        ledger_group: format!("{}-referral-ledger", stack.bus.topic_prefix),
        partnerships: 5,
        customers: 40,
        rate: 100.0,
        seconds: 2.0,
        processes: vec![("test process".into(), std::process::id())],
        timeout: Duration::from_secs(120),
    };
    let report = tandemctl::webhook_bench::measure(&settings)
        .await
        .expect("the webhook harness runs");
    let latency = &report.latency;
    assert_eq!(latency.purchases_sent, 200);
    // Every purchase reached the ledger topic and its referrer's endpoint.
    assert_eq!(latency.ledger_events, 200, "{latency:?}");
    assert_eq!(latency.webhooks, 200, "{latency:?}");
    for figure in [
        &latency.gateway_answered,
        &latency.ledger_event_read,
        &latency.webhook_received,
    ] {
        assert!(
            figure.p50_ms > 0.0 && figure.p99_ms >= figure.p50_ms,
            "{figure:?}"
        );
    }
    // Replays: each purchase's purchase.attributed once per referrer endpoint; the first
    // referrer (the hot partnership) has half of them.
    assert_eq!(
        (
            report.all_endpoints.endpoints,
            report.all_endpoints.deliveries
        ),
        (5, 200)
    );
    assert_eq!(
        (
            report.one_endpoint.endpoints,
            report.one_endpoint.deliveries
        ),
        (1, 100)
    );
    assert!(report.all_endpoints.per_second > 0.0 && report.one_endpoint.per_second > 0.0);
    assert_eq!(report.unverified, 0);
    assert_eq!(report.processes.len(), 1);
    stack.stop().await;
}

/// The soak's seconds-long form: every window has its figures, and every purchase sent was
/// acknowledged and announced by the ledger in its window.
#[tokio::test]
async fn the_soak_short_form_reports_every_window() {
    let stack = Stack::start(true).await;
    let settings = tandemctl::soak::Settings {
        gateway: tandemctl::client::GatewayUrl::plaintext(format!(
            "http://{}",
            stack.gateway_address()
        )),
        operator_token: OPERATOR_TOKEN.into(),
        bus: stack.bus.clone(),
        ledger_group: format!("{}-referral-ledger", stack.bus.topic_prefix),
        partnerships: 3,
        customers: 30,
        rate: 40.0,
        duration: Duration::from_secs(6),
        window: Duration::from_secs(2),
        processes: vec![("test process".into(), std::process::id())],
    };
    let report = tandemctl::soak::soak(&settings)
        .await
        .expect("the soak runs");
    assert_eq!(report.windows.len(), 3);
    for window in &report.windows {
        assert!(window.purchases_sent >= 70, "{window:?}");
        assert_eq!(
            window.purchases_acknowledged, window.purchases_sent,
            "{window:?}"
        );
        assert_eq!(
            window.purchases_announced, window.purchases_sent,
            "{window:?}"
        );
        assert!(window.end_to_end.p99_ms >= window.end_to_end.p50_ms);
        assert!(
            window.ledger_lag.is_some(),
            "the lag could not be read: {window:?}"
        );
        assert_eq!(window.purchases_failed, 0, "{window:?}");
        assert_eq!(window.rss_mib.len(), 1);
        assert!(window.rss_mib[0].1 > 1.0);
    }
    stack.stop().await;
}
