//! Operations: every service's Prometheus endpoint, read by Prometheus's own parser (`promtool
//! check metrics`), carries the metrics an operator needs; readiness follows a consumer that
//! cannot apply its batches and comes back when it can.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use support::process::{free_address, wait_serving, HealthProbe, ServiceProcess};
use support::*;
use tandem_proto::v1 as pb;
use tandem_proto::v1::merchant_gateway_client::MerchantGatewayClient;
use tandem_proto::v1::notification_service_client::NotificationServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::health_check_response::ServingStatus;

/// `GET /metrics` at `address`: the body, or `None` if nothing answered with 200.
async fn scrape(address: SocketAddr) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: tandem\r\nconnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    let answer = String::from_utf8(answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    Some(body.to_owned())
}

/// Runs Prometheus's `promtool check metrics` (the text-format parser and linter Prometheus
/// itself uses) on `text`; panics with its findings if it refuses.
fn promtool_accepts(service: &str, text: &str) {
    let promtool = std::env::var("TANDEM_PROMTOOL")
        .expect("TANDEM_PROMTOOL names promtool (deploy/local/test.sh installs it)");
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "promtool refused {service}'s metrics:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every sample: `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn has(samples: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> bool {
    samples.keys().any(|series| {
        (series == name || series.starts_with(&format!("{name}{{")))
            && labels.iter().all(|label| series.contains(label))
    })
}

fn value(samples: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            series.starts_with(&format!("{name}{{")) && labels.iter().all(|l| series.contains(l))
        })
        .map(|(_, v)| *v)
        .sum()
}

#[tokio::test]
async fn every_service_serves_metrics_prometheus_parses() {
    let mut stack = Stack::start(false).await;
    let stall = ("TANDEM_CONSUMER_STALL_TIMEOUT_MS", "6000".to_owned());
    let metrics: BTreeMap<&str, SocketAddr> = [
        ("gateway", free_address()),
        ("ledger", free_address()),
        ("settlement", free_address()),
        ("notifications", free_address()),
    ]
    .into_iter()
    .collect();
    let mut ledger = ServiceProcess::start(
        &stack,
        "referral-ledger",
        &[
            (
                "TANDEM_LEDGER_METRICS_LISTEN",
                metrics["ledger"].to_string(),
            ),
            stall.clone(),
        ],
    );
    let settlement_address = stack.release_settlement_port();
    let mut settlement = ServiceProcess::start_settlement(
        &stack,
        settlement_address,
        &[
            (
                "TANDEM_SETTLEMENT_METRICS_LISTEN",
                metrics["settlement"].to_string(),
            ),
            stall.clone(),
        ],
    );
    let notifications_address = stack.release_notifications_port();
    let mut notifications = ServiceProcess::start_notifications(
        &stack,
        notifications_address,
        &[
            (
                "TANDEM_NOTIFICATIONS_METRICS_LISTEN",
                metrics["notifications"].to_string(),
            ),
            stall,
        ],
    );
    let gateway_address = free_address();
    let mut gateway = ServiceProcess::start_gateway(
        &stack,
        gateway_address,
        &[(
            "TANDEM_GATEWAY_METRICS_LISTEN",
            metrics["gateway"].to_string(),
        )],
    );
    for address in [
        stack.ledger_address(),
        settlement_address,
        notifications_address,
        gateway_address,
    ] {
        wait_serving(address, Duration::from_secs(60)).await;
    }

    // Traffic through the gateway process: a referred purchase, an unauthenticated call, and a
    // webhook endpoint that receives the attribution.
    let (acceptor, acceptor_key) = stack.merchant("A").await;
    let (referrer, referrer_key) = stack.merchant("C").await;
    stack.partnership(&referrer, &acceptor, 500, 30).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{gateway_address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    let created = NotificationServiceClient::new(channel.clone())
        .create_webhook_endpoint(with_bearer(
            pb::CreateWebhookEndpointRequest {
                idempotency_key: "ops".into(),
                url: hook_url,
                types: vec!["purchase.attributed".into()],
                ..Default::default()
            },
            &referrer_key,
        ))
        .await
        .unwrap()
        .into_inner();
    let (sender, mut received) = tokio::sync::mpsc::channel(16);
    tokio::spawn(tandemctl::receiver::serve(
        listener,
        tandemctl::receiver::Secrets::One(
            notifications::webhook::SigningSecret::parse(&created.signing_secret).unwrap(),
        ),
        sender,
    ));
    let mut pos = MerchantGatewayClient::new(channel);
    let who = customer("card-fingerprint-ops-1", "", "ops-1@example.com");
    pos.create_referral(with_bearer(
        referral("ops-r", &acceptor, who.clone()),
        &referrer_key,
    ))
    .await
    .unwrap();
    pos.record_purchase(with_bearer(
        purchase("ops-p", "T-ops", who, 12_000),
        &acceptor_key,
    ))
    .await
    .unwrap();
    let refused = pos
        .record_purchase(tonic::Request::new(purchase(
            "ops-x",
            "T-x",
            customer("card-fingerprint-ops-2", "", ""),
            100,
        )))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let delivery = tokio::time::timeout(Duration::from_secs(60), received.recv())
        .await
        .expect("the webhook arrives")
        .unwrap();
    assert!(delivery.verified.is_ok());

    // Every endpoint parses, and carries what its service does; the consumer lag gauges appear
    // once each watchdog has read its group's positions (every second here).
    let rpc = "rpc_server_call_duration_seconds_count";
    let expected: BTreeMap<&str, Vec<(&str, Vec<&str>)>> = [
        (
            "gateway",
            vec![
                (
                    rpc,
                    vec![
                        "rpc_method=\"RecordPurchase\"",
                        "rpc_grpc_status_code=\"0\"",
                    ],
                ),
                (
                    rpc,
                    vec![
                        "rpc_method=\"RecordPurchase\"",
                        "rpc_grpc_status_code=\"16\"",
                    ],
                ),
                ("tandem_outbox_depth", vec!["db_namespace=\"gateway\""]),
                ("tandem_outbox_oldest_age_seconds", vec![]),
                (
                    "messaging_client_sent_messages_total",
                    vec!["messaging_destination_name="],
                ),
            ],
        ),
        (
            "ledger",
            vec![
                (
                    "messaging_kafka_consumer_lag",
                    vec![
                        "messaging_consumer_group_name=",
                        "messaging_destination_partition_id=",
                    ],
                ),
                ("messaging_batch_message_count_count", vec![]),
                (
                    "messaging_process_duration_seconds_bucket",
                    vec!["outcome=\"ok\"", "le=\"+Inf\""],
                ),
                ("tandem_commission_accrued_total", vec!["currency=\"EUR\""]),
                ("tandem_outbox_depth", vec!["db_namespace=\"ledger\""]),
            ],
        ),
        (
            "settlement",
            vec![
                (
                    "messaging_kafka_consumer_lag",
                    vec!["messaging_destination_name="],
                ),
                ("messaging_process_duration_seconds_count", vec![]),
                ("tandem_outbox_depth", vec!["db_namespace=\"settlement\""]),
            ],
        ),
        (
            "notifications",
            vec![
                ("messaging_kafka_consumer_lag", vec![]),
                (
                    "tandem_webhook_attempts_total",
                    vec!["outcome=\"succeeded\""],
                ),
                ("tandem_webhook_attempt_duration_seconds_count", vec![]),
                ("tandem_webhook_deliveries_pending", vec![]),
            ],
        ),
    ]
    .into_iter()
    .collect();
    for (service, address) in &metrics {
        let wanted = &expected[service];
        let text = tandem_testkit::eventually(
            "every expected metric",
            Duration::from_secs(60),
            || async {
                let text = scrape(*address).await?;
                let found = samples(&text);
                wanted
                    .iter()
                    .all(|(name, labels)| has(&found, name, labels))
                    .then_some(text)
            },
        )
        .await;
        promtool_accepts(service, &text);
        let found = samples(&text);
        for common in [
            "process_memory_usage_bytes",
            "process_cpu_time_seconds_total",
            "rpc_server_call_duration_seconds_bucket",
        ] {
            assert!(has(&found, common, &[]), "{service} lacks {common}");
        }
        let memory: f64 = found
            .iter()
            .filter(|(series, _)| series.as_str() == "process_memory_usage_bytes")
            .map(|(_, v)| *v)
            .sum();
        assert!(memory > 1e6, "{service}: resident memory {memory}");
        // No identifier, secret or customer data in any label.
        for raw in [
            "card-fingerprint-ops",
            "ops-1@example.com",
            &created.signing_secret,
        ] {
            assert!(!text.contains(raw), "{service}'s metrics show {raw}");
        }
    }
    let ledger_text = scrape(metrics["ledger"]).await.unwrap();
    assert_eq!(
        value(
            &samples(&ledger_text),
            "tandem_commission_accrued_total",
            &["currency=\"EUR\""]
        ),
        600.0,
        "5 % of EUR 120.00"
    );
    let unknown = {
        let mut stream = tokio::net::TcpStream::connect(metrics["gateway"])
            .await
            .unwrap();
        stream
            .write_all(b"GET /other HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    };
    assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");
    for process in [
        &mut gateway,
        &mut ledger,
        &mut settlement,
        &mut notifications,
    ] {
        process.kill();
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_batches_fail_is_not_ready_until_they_apply_again() {
    let mut stack = Stack::start(false).await;
    stack.consumer_args.consumer_stall_timeout_ms = 5_000;
    let listener = tokio::net::TcpListener::bind(stack.ledger_address())
        .await
        .unwrap();
    let ledger = stack.spawn_ledger(listener, "failing");
    wait_serving(ledger.address, Duration::from_secs(30)).await;
    stack.merchant("First").await;
    let ledger_db = stack.schema("ledger").await;
    tandem_testkit::eventually(
        "the first admin event applied",
        Duration::from_secs(30),
        || async {
            let applied: i64 = sqlx::query_scalar("SELECT applied_through FROM admin_progress")
                .fetch_one(&ledger_db)
                .await
                .ok()?;
            (applied >= 1).then_some(())
        },
    )
    .await;
    // Every batch now fails (the table it records progress in is gone), while messages wait.
    sqlx::query("ALTER TABLE admin_progress RENAME TO admin_progress_away")
        .execute(&ledger_db)
        .await
        .unwrap();
    stack.merchant("Second").await;
    let mut probe = HealthProbe::connect(ledger.address).await;
    tandem_testkit::eventually(
        "NOT_SERVING while batches fail",
        Duration::from_secs(60),
        || async {
            (probe.clone().status().await == Some(ServingStatus::NotServing)).then_some(())
        },
    )
    .await;
    // Alive all along: the liveness service still says SERVING, and the ledger did not end.
    assert_eq!(
        probe.service_status(tandem_runtime::LIVENESS).await,
        Some(ServingStatus::Serving)
    );
    assert!(ledger.is_running());
    sqlx::query("ALTER TABLE admin_progress_away RENAME TO admin_progress")
        .execute(&ledger_db)
        .await
        .unwrap();
    tandem_testkit::eventually(
        "SERVING again once batches apply",
        Duration::from_secs(60),
        || async { (probe.clone().status().await == Some(ServingStatus::Serving)).then_some(()) },
    )
    .await;
    let applied: i64 = sqlx::query_scalar("SELECT applied_through FROM admin_progress")
        .fetch_one(&ledger_db)
        .await
        .unwrap();
    assert!(
        applied >= 2,
        "the waiting admin event was applied: {applied}"
    );
    stack.ledger = Some(ledger);
    stack.stop().await;
}
