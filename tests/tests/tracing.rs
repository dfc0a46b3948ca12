//! One purchase, one trace: a real OTLP receiver (an OTLP/gRPC trace service in the test) takes
//! the spans of the gateway, the ledger and notifications, each a process of its own exporting
//! as in production, and the spans of a referred purchase form one trace from the POS call to
//! the referrer's webhook, with the OpenTelemetry RPC and messaging attributes, and no customer
//! identifier or secret in any attribute.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use support::otlp::{text, value_text, Received, Receiver};
use support::process::{free_address, wait_serving, ServiceProcess};
use support::*;
use tandem_proto::v1::merchant_gateway_client::MerchantGatewayClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_purchase_is_one_trace_from_the_till_to_the_webhook() {
    // The receiver.
    let (receiver, otlp) = Receiver::start().await;
    let exporting = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.clone()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ];

    // Set up through the stack's own gateway, then hand over to a gateway process (the relay
    // that publishes the purchase must be the exporting one).
    let mut stack = Stack::start(false).await;
    let mut ledger = ServiceProcess::start(&stack, "referral-ledger", &exporting);
    let notifications_address = stack.release_notifications_port();
    let mut notifications =
        ServiceProcess::start_notifications(&stack, notifications_address, &exporting);
    wait_serving(stack.ledger_address(), Duration::from_secs(60)).await;
    wait_serving(notifications_address, Duration::from_secs(60)).await;
    let (acceptor, acceptor_key) = stack.merchant("A").await;
    let (referrer, referrer_key) = stack.merchant("C").await;
    stack.partnership(&referrer, &acceptor, 500, 30).await;
    if let Some(gateway) = stack.gateway.take() {
        gateway.stop().await;
    }
    let gateway_address = free_address();
    let mut gateway = ServiceProcess::start_gateway(&stack, gateway_address, &exporting);
    wait_serving(gateway_address, Duration::from_secs(60)).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{gateway_address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let (created, mut hooks) = purchase_webhook(channel.clone(), &referrer_key, "trace").await;
    let raw = [
        "card-fingerprint-trace-1",
        "+33 6 12 34 56 78",
        "trace-1@example.com",
    ];
    let who = customer(raw[0], raw[1], raw[2]);
    let mut pos = MerchantGatewayClient::new(channel);
    pos.create_referral(with_bearer(
        referral("tr-r", &acceptor, who.clone()),
        &referrer_key,
    ))
    .await
    .unwrap();
    let bought = pos
        .record_purchase(with_bearer(
            purchase("tr-p", "T-trace", who, 9_900),
            &acceptor_key,
        ))
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(60), hooks.recv())
        .await
        .expect("the webhook arrives")
        .unwrap();

    // The trace: from the gateway's RecordPurchase server span to the webhook's POST.
    let trace = tandem_testkit::eventually(
        "the purchase's trace, webhook included",
        Duration::from_secs(60),
        || async {
            let spans = receiver.0.lock().unwrap().clone();
            let root = spans.iter().find(|r| {
                r.service == "merchant-gateway"
                    && r.span.name == "tandem.v1.MerchantGateway/RecordPurchase"
            })?;
            let trace: Vec<Received> = spans
                .iter()
                .filter(|r| r.span.trace_id == root.span.trace_id)
                .cloned()
                .collect();
            trace
                .iter()
                .any(|r| r.span.name == "POST webhook")
                .then_some(trace)
        },
    )
    .await;
    let services: BTreeSet<&str> = trace.iter().map(|r| r.service.as_str()).collect();
    for service in ["merchant-gateway", "referral-ledger", "notifications"] {
        assert!(
            services.contains(service),
            "{service} missing from {services:?}"
        );
    }
    let prefix = &stack.bus.topic_prefix;
    let named = |name: &str| {
        trace
            .iter()
            .find(|r| r.span.name == name)
            .unwrap_or_else(|| {
                panic!(
                    "no span {name} in the trace: {:?}",
                    trace.iter().map(|r| &r.span.name).collect::<Vec<_>>()
                )
            })
    };
    let server = named("tandem.v1.MerchantGateway/RecordPurchase");
    assert_eq!(
        text(&server.span.attributes, "rpc.system").as_deref(),
        Some("grpc")
    );
    assert_eq!(
        text(&server.span.attributes, "rpc.method").as_deref(),
        Some("RecordPurchase")
    );
    assert_eq!(server.span.kind, 2, "SERVER");
    for (name, kind, operation) in [
        (format!("send {prefix}.customer-activity"), 4, "send"),
        (format!("process {prefix}.customer-activity"), 5, "process"),
        (format!("send {prefix}.ledger"), 4, "send"),
        (format!("process {prefix}.ledger"), 5, "process"),
    ] {
        let span = &named(&name).span;
        assert_eq!(span.kind, kind, "{name}");
        let attributes = &span.attributes;
        assert_eq!(
            text(attributes, "messaging.system").as_deref(),
            Some("kafka"),
            "{name}"
        );
        assert_eq!(
            text(attributes, "messaging.operation.type").as_deref(),
            Some(operation),
            "{name}"
        );
        assert!(
            text(attributes, "messaging.destination.name").is_some_and(|d| name.ends_with(&d)),
            "{name}"
        );
        assert!(
            text(attributes, "messaging.kafka.offset").is_some(),
            "{name}"
        );
        assert!(
            text(attributes, "messaging.destination.partition.id").is_some(),
            "{name}"
        );
    }
    let post = named("POST webhook");
    assert_eq!(post.service, "notifications");
    assert_eq!(
        text(&post.span.attributes, "http.response.status_code").as_deref(),
        Some("200")
    );
    // Every span of the trace has a parent in it but the server span (the till called without
    // a trace of its own): one tree.
    let ids: BTreeSet<&[u8]> = trace.iter().map(|r| r.span.span_id.as_slice()).collect();
    for r in &trace {
        if r.span.name != server.span.name {
            assert!(
                ids.contains(r.span.parent_span_id.as_slice()),
                "{} ({}) has a parent outside the trace",
                r.span.name,
                r.service
            );
        }
    }
    // Batches link to the traces of their messages.
    let all = receiver.0.lock().unwrap().clone();
    assert!(
        all.iter().any(|r| r.span.name.starts_with("process ")
            && r.span
                .links
                .iter()
                .any(|l| l.trace_id == server.span.trace_id)),
        "no batch span links to the purchase's trace"
    );
    // No customer identifier, API key or webhook secret in any attribute of any span.
    for r in &all {
        for kv in r.span.attributes.iter() {
            let value = value_text(&kv.value);
            for secret in raw.iter().copied().chain([
                acceptor_key.as_str(),
                referrer_key.as_str(),
                created.signing_secret.as_str(),
            ]) {
                assert!(
                    !value.contains(secret),
                    "{} of {} ({}) carries {secret}",
                    kv.key,
                    r.span.name,
                    r.service
                );
            }
        }
    }
    // The trace, in order, for operators (and the closing note).
    let mut ordered = trace.clone();
    ordered.sort_by_key(|r| r.span.start_time_unix_nano);
    let start = ordered[0].span.start_time_unix_nano;
    let mut by_name: BTreeMap<String, usize> = BTreeMap::new();
    eprintln!(
        "trace {} of purchase {}:",
        hex(&server.span.trace_id),
        bought.purchase_id
    );
    for r in &ordered {
        *by_name.entry(r.span.name.clone()).or_default() += 1;
        eprintln!(
            "  +{:>8.2} ms  {:>8.2} ms  {:<16} {}",
            (r.span.start_time_unix_nano - start) as f64 / 1e6,
            (r.span.end_time_unix_nano - r.span.start_time_unix_nano) as f64 / 1e6,
            r.service,
            r.span.name
        );
    }
    for process in [&mut gateway, &mut ledger, &mut notifications] {
        process.kill();
    }
    stack.stop().await;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
