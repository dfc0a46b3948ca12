//! The privacy scan. A full run, every service a process of its own exporting traces to a real
//! OTLP receiver and writing debug logs to files, carries one customer's raw identifiers through
//! referral, purchase, refund, attribution, settlement lines and a webhook; every free-text field
//! is then fed the same identifiers and must refuse them, naming the field. Afterwards every
//! table of every schema, every message on every topic (keys, payloads, headers), every log
//! line, every exported span and every metric is scanned for the raw values: nothing may be
//! found.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::time::Duration;

use support::otlp::{span_text, text, Receiver};
use support::process::{free_address, wait_serving, ServiceProcess};
use support::*;
use tandem_proto::v1 as pb;
use tandem_proto::v1::merchant_gateway_client::MerchantGatewayClient;
use tandem_proto::v1::notification_service_client::NotificationServiceClient;
use tandem_proto::v1::operator_service_client::OperatorServiceClient;
use tandem_proto::v1::statement_service_client::StatementServiceClient;
use tonic::transport::Channel;
use tonic::Code;

const CARD_FINGERPRINT: &str = "fp-privacy-7f3a9c21d4";
const PHONE: &str = "+33 6 98 76 54 32";
const EMAIL: &str = "Zoe.Privacy@Example.org";
/// A card number a till might paste into a free-text field.
const CARD_NUMBER: &str = "4111 1111 1111 1111";

/// Every spelling of the raw identifiers the scan looks for.
const RAW: &[&str] = &[
    CARD_FINGERPRINT,
    "+33 6 98 76 54 32",
    "+33698765432",
    "33698765432",
    "698765432",
    "6 98 76 54 32",
    "zoe.privacy@example.org",
    "zoe.privacy",
    "4111 1111 1111 1111",
    "4111111111111111",
];

async fn merchant(channel: &Channel, name: &str) -> (String, String) {
    let created = OperatorServiceClient::new(channel.clone())
        .create_merchant(as_operator(pb::CreateMerchantRequest {
            display_name: name.into(),
            settlement_currency: "EUR".into(),
            time_zone: "Europe/Paris".into(),
            idempotency_key: uuid::Uuid::new_v4().to_string(),
            identifier_captures: ["card:test-processor", "phone", "email"]
                .iter()
                .map(|tag| capture(tag))
                .collect(),
        }))
        .await
        .unwrap()
        .into_inner();
    (created.merchant_id, created.api_key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_raw_identifier_reaches_a_table_a_topic_a_log_a_trace_or_a_metric() {
    let (receiver, otlp) = Receiver::start().await;
    let metrics: Vec<std::net::SocketAddr> = (0..4).map(|_| free_address()).collect();
    let settings = |metrics_variable: &'static str, at: std::net::SocketAddr| {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.clone()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
            // Debug logs of Tandem and its libraries (SQL statements included); only the HTTP/2
            // framing is left at info.
            (
                "RUST_LOG",
                "debug,h2=info,hyper=info,hyper_util=info,tower=info,tonic=info".to_owned(),
            ),
            (metrics_variable, at.to_string()),
        ]
    };

    // Every service a process: the stack's in-process gateway only holds the ports.
    let mut stack = Stack::start(false).await;
    if let Some(gateway) = stack.gateway.take() {
        gateway.stop().await;
    }
    let mut ledger = ServiceProcess::start(
        &stack,
        "referral-ledger",
        &settings("TANDEM_LEDGER_METRICS_LISTEN", metrics[0]),
    );
    let settlement_address = stack.release_settlement_port();
    let mut settlement = ServiceProcess::start_settlement(
        &stack,
        settlement_address,
        &settings("TANDEM_SETTLEMENT_METRICS_LISTEN", metrics[1]),
    );
    let notifications_address = stack.release_notifications_port();
    let mut notifications = ServiceProcess::start_notifications(
        &stack,
        notifications_address,
        &settings("TANDEM_NOTIFICATIONS_METRICS_LISTEN", metrics[2]),
    );
    let gateway_address = free_address();
    let mut gateway = ServiceProcess::start_gateway(
        &stack,
        gateway_address,
        &settings("TANDEM_GATEWAY_METRICS_LISTEN", metrics[3]),
    );
    for address in [
        stack.ledger_address(),
        settlement_address,
        notifications_address,
        gateway_address,
    ] {
        wait_serving(address, Duration::from_secs(60)).await;
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{gateway_address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    // The customer's journey: C refers B to A, B buys at A, A refunds part of it.
    let (acceptor, acceptor_key) = merchant(&channel, "Atelier A").await;
    let (referrer, referrer_key) = merchant(&channel, "Cafe C").await;
    let partnership = OperatorServiceClient::new(channel.clone())
        .create_partnership(as_operator(pb::CreatePartnershipRequest {
            referrer_merchant_id: referrer.clone(),
            acceptor_merchant_id: acceptor.clone(),
            commission_rate_bps: 500,
            attribution_window_days: 30,
            idempotency_key: "privacy-partnership".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .partnership_id;
    let (_, mut hooks) = purchase_webhook(channel.clone(), &referrer_key, "privacy-hook").await;
    let who = customer(CARD_FINGERPRINT, PHONE, EMAIL);
    let mut pos = MerchantGatewayClient::new(channel.clone());
    let mut referred = referral("privacy-r", &acceptor, who.clone());
    referred.referrer_reference = "C-privacy-0001".into();
    // Admin events reach the ledger asynchronously: retry until the partnership is known.
    tandem_testkit::eventually(
        "the referral to be accepted",
        Duration::from_secs(60),
        || {
            let mut pos = pos.clone();
            let request = with_bearer(referred.clone(), &referrer_key);
            async move { pos.create_referral(request).await.ok() }
        },
    )
    .await;
    let bought = pos
        .record_purchase(with_bearer(
            purchase("privacy-p", "T-privacy-1", who.clone(), 12_345),
            &acceptor_key,
        ))
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(60), hooks.recv())
        .await
        .expect("the webhook arrives")
        .unwrap();
    pos.record_refund(with_bearer(
        pb::RecordRefundRequest {
            idempotency_key: "privacy-refund".into(),
            transaction_id: "T-privacy-1".into(),
            amount: eur(2_345),
            customer: Some(who.clone()),
            ..Default::default()
        },
        &acceptor_key,
    ))
    .await
    .unwrap();
    // Settlement has the purchase's line.
    let mut statements = StatementServiceClient::new(channel.clone());
    tandem_testkit::eventually(
        "settlement to hold the purchase's line",
        Duration::from_secs(60),
        || {
            let mut statements = statements.clone();
            let request = with_bearer(pb::ListUnsettledLinesRequest::default(), &referrer_key);
            async move {
                let lines = statements.list_unsettled_lines(request).await.ok()?;
                (!lines.into_inner().lines.is_empty()).then_some(())
            }
        },
    )
    .await;

    // Every free-text field refuses each identifier, naming the field.
    for pollutant in [CARD_NUMBER, PHONE, EMAIL] {
        let inside = format!("ref {pollutant} x");
        let mut attempts: Vec<(&str, Result<(), tonic::Status>)> = Vec::new();
        let mut r = referral("privacy-r2", &acceptor, who.clone());
        r.referrer_reference = inside.clone();
        attempts.push((
            "referrer_reference",
            pos.create_referral(with_bearer(r, &referrer_key))
                .await
                .map(drop),
        ));
        let r = referral(&inside, &acceptor, who.clone());
        attempts.push((
            "idempotency_key",
            pos.create_referral(with_bearer(r, &referrer_key))
                .await
                .map(drop),
        ));
        attempts.push((
            "transaction_id",
            pos.record_purchase(with_bearer(
                purchase("privacy-p2", &inside, who.clone(), 100),
                &acceptor_key,
            ))
            .await
            .map(drop),
        ));
        attempts.push((
            "idempotency_key",
            pos.record_purchase(with_bearer(
                purchase(&inside, "T-privacy-2", who.clone(), 100),
                &acceptor_key,
            ))
            .await
            .map(drop),
        ));
        attempts.push((
            "transaction_id",
            pos.record_refund(with_bearer(
                pb::RecordRefundRequest {
                    idempotency_key: "privacy-refund-2".into(),
                    transaction_id: inside.clone(),
                    amount: eur(1),
                    ..Default::default()
                },
                &acceptor_key,
            ))
            .await
            .map(drop),
        ));
        attempts.push((
            "display_name",
            OperatorServiceClient::new(channel.clone())
                .create_merchant(as_operator(pb::CreateMerchantRequest {
                    display_name: inside.clone(),
                    settlement_currency: "EUR".into(),
                    time_zone: "Europe/Paris".into(),
                    idempotency_key: "privacy-merchant".into(),
                    identifier_captures: vec![capture("phone")],
                }))
                .await
                .map(drop),
        ));
        attempts.push((
            "display_name",
            OperatorServiceClient::new(channel.clone())
                .register_loyalty_programme(as_operator(pb::RegisterLoyaltyProgrammeRequest {
                    programme_id: "privacy-club".into(),
                    display_name: inside.clone(),
                    member_number_format: Some(pb::MemberNumberFormat {
                        alphabet: pb::MemberAlphabet::Digits as i32,
                        min_length: 8,
                        max_length: 12,
                        ..Default::default()
                    }),
                }))
                .await
                .map(drop),
        ));
        attempts.push((
            "description",
            NotificationServiceClient::new(channel.clone())
                .create_webhook_endpoint(with_bearer(
                    pb::CreateWebhookEndpointRequest {
                        idempotency_key: "privacy-hook-2".into(),
                        url: "http://127.0.0.1:9/hook".into(),
                        types: vec!["purchase.attributed".into()],
                        description: inside.clone(),
                        ..Default::default()
                    },
                    &referrer_key,
                ))
                .await
                .map(drop),
        ));
        attempts.push((
            "account_holder",
            statements
                .register_payout_account(with_bearer(
                    pb::RegisterPayoutAccountRequest {
                        iban: "FR76 3000 6000 0112 3456 7890 189".into(),
                        bic: "BNPAFRPPXXX".into(),
                        account_holder: inside.clone(),
                        ..Default::default()
                    },
                    &referrer_key,
                ))
                .await
                .map(drop),
        ));
        attempts.push((
            "reason",
            OperatorServiceClient::new(channel.clone())
                .issue_settlement_correction(as_operator(pb::IssueCorrectionRequest {
                    idempotency_key: "privacy-correction".into(),
                    merchant_id: referrer.clone(),
                    statement_number: 1,
                    partnership_id: partnership.clone(),
                    amount: eur(100),
                    reason: inside.clone(),
                }))
                .await
                .map(drop),
        ));
        for (field, answer) in attempts {
            let status = answer.expect_err(&format!("{field} took {pollutant:?}"));
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{field} with {pollutant:?}: {status:?}"
            );
            assert!(
                status.message().contains(field)
                    && (status.message().contains("card number")
                        || status.message().contains("phone number")
                        || status.message().contains("e-mail")),
                "{field} with {pollutant:?}: {}",
                status.message()
            );
        }
    }

    // Id fields are not free text: a raw identifier sent as an id is refused as a malformed id,
    // and must not reach a span or a log line either.
    for pollutant in [CARD_NUMBER, PHONE, EMAIL] {
        let refused = [
            OperatorServiceClient::new(channel.clone())
                .close_settlement_cycle(as_operator(pb::CloseCycleRequest {
                    cycle: pollutant.into(),
                }))
                .await
                .map(drop),
            pos.explain_commission(with_bearer(
                pb::ExplainCommissionRequest {
                    purchase_id: pollutant.into(),
                },
                &referrer_key,
            ))
            .await
            .map(drop),
            tandem_proto::v1::partnership_service_client::PartnershipServiceClient::new(
                channel.clone(),
            )
            .get_partnership(with_bearer(
                pb::GetPartnershipRequest {
                    partnership_id: pollutant.into(),
                },
                &referrer_key,
            ))
            .await
            .map(drop),
            OperatorServiceClient::new(channel.clone())
                .issue_api_key(as_operator(pb::IssueApiKeyRequest {
                    merchant_id: pollutant.into(),
                    idempotency_key: "privacy-key".into(),
                }))
                .await
                .map(drop),
        ];
        for answer in refused {
            assert_eq!(
                answer.unwrap_err().code(),
                Code::InvalidArgument,
                "{pollutant:?} as an id"
            );
        }
    }

    // Spans flushed (the batch exporter runs every 100 ms) and the last lines logged.
    tandem_testkit::eventually(
        "the webhook's span exported",
        Duration::from_secs(30),
        || async {
            receiver
                .spans()
                .iter()
                .any(|r| r.span.name == "POST webhook")
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut scraped = Vec::new();
    for address in &metrics {
        scraped.push(scrape(*address).await);
    }
    for process in [
        &mut gateway,
        &mut ledger,
        &mut settlement,
        &mut notifications,
    ] {
        process.kill();
    }

    // The scan.
    let database = stack.schema("public").await;
    let rows = dump_tables(
        &database,
        &["gateway", "ledger", "settlement", "notifications", "public"],
    )
    .await;
    let mut topics: Vec<String> = Vec::new();
    for topic in tandem_bus::Topic::ALL {
        for message in tandem_testkit::read_topic(&stack.bus, topic) {
            topics.push(String::from_utf8_lossy(&message.key).into_owned());
            topics.push(String::from_utf8_lossy(&message.payload).into_owned());
            for (name, value) in message.headers {
                topics.push(format!("{name}: {}", String::from_utf8_lossy(&value)));
            }
        }
    }
    let logs: Vec<(String, String)> = [&gateway, &ledger, &settlement, &notifications]
        .iter()
        .map(|process| {
            (
                process.log_path.display().to_string(),
                std::fs::read_to_string(&process.log_path).unwrap(),
            )
        })
        .collect();
    let spans: Vec<String> = receiver
        .spans()
        .iter()
        .map(|r| format!("{} {}", r.service, span_text(&r.span)))
        .collect();

    // The scan sees the data: the purchase's own (non-identifying) values are everywhere.
    let seen = |haystack: &[String], needle: &str| haystack.iter().any(|h| h.contains(needle));
    assert!(
        seen(&rows, "T-privacy-1") && seen(&rows, &bought.purchase_id),
        "the tables hold the purchase"
    );
    for schema in ["gateway.", "ledger.", "settlement.", "notifications."] {
        assert!(
            rows.iter().any(|row| row.starts_with(schema)),
            "no rows of {schema}"
        );
    }
    assert!(seen(&topics, &bought.purchase_id), "the topics hold it");
    for (path, log) in &logs {
        assert!(log.lines().count() > 20, "{path} is nearly empty");
    }
    assert!(
        spans.iter().any(|s| s.contains(&bought.purchase_id)),
        "the spans name the purchase"
    );
    assert!(receiver.spans().iter().any(|r| {
        r.span.name == "tandem.v1.MerchantGateway/RecordPurchase"
            && text(&r.span.attributes, "rpc.grpc.status_code").is_some()
    }));
    for metric in &scraped {
        assert!(metric.contains("rpc_server_call_duration_seconds") || metric.contains("tandem_"));
    }

    let mut found = Vec::new();
    for raw in RAW {
        let lower = raw.to_lowercase();
        let hex: String = raw.bytes().map(|b| format!("{b:02x}")).collect();
        let hit = |text: &str| {
            let text = text.to_lowercase();
            text.contains(&lower) || text.contains(&hex)
        };
        for row in &rows {
            if hit(row) {
                found.push(format!("table row {row}"));
            }
        }
        for message in &topics {
            if hit(message) {
                found.push(format!("topic message {message}"));
            }
        }
        for (path, log) in &logs {
            for line in log.lines().filter(|line| hit(line)) {
                found.push(format!("log {path}: {line}"));
            }
        }
        for span in &spans {
            if hit(span) {
                found.push(format!("span {span}"));
            }
        }
        for metric in &scraped {
            if hit(metric) {
                found.push(format!("metrics {raw}"));
            }
        }
    }
    found.truncate(20);
    assert!(
        found.is_empty(),
        "raw identifiers found:\n{}",
        found.join("\n")
    );
    eprintln!(
        "privacy scan: {} rows, {} topic parts, {} log lines, {} spans, {} metric bytes: no raw identifier",
        rows.len(),
        topics.len(),
        logs.iter().map(|(_, log)| log.lines().count()).sum::<usize>(),
        spans.len(),
        scraped.iter().map(String::len).sum::<usize>()
    );
    stack.stop().await;
}

/// The Prometheus text a service serves at `/metrics`.
async fn scrape(address: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}
