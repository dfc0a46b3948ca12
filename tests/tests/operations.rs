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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::health_check_response::ServingStatus;

/// `GET <path>` at `address` over HTTP/1.1: the whole answer, head and body.
async fn http_get(address: SocketAddr, path: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: tandem\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    String::from_utf8(answer).ok()
}

/// `GET /metrics` at `address`: the body, or `None` if nothing answered with 200.
async fn scrape(address: SocketAddr) -> Option<String> {
    let answer = http_get(address, "/metrics").await?;
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

fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The names of Tandem's metrics a PromQL text mentions.
fn referenced_metrics(text: &str) -> std::collections::BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|token| {
            ["tandem_", "messaging_", "rpc_", "process_"]
                .iter()
                .any(|prefix| token.starts_with(prefix))
        })
        .map(str::to_owned)
        .collect()
}

fn promtool(args: &[&str], directory: &std::path::Path) -> std::process::Output {
    let promtool = std::env::var("TANDEM_PROMTOOL")
        .expect("TANDEM_PROMTOOL names promtool (deploy/local/test.sh installs it)");
    std::process::Command::new(promtool)
        .args(args)
        .current_dir(directory)
        .output()
        .expect("run promtool")
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let directory = repo_root().join("deploy/prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts.test.yml"][..],
        &["check", "config", "prometheus.yml"][..],
    ] {
        let output = promtool(args, &directory);
        assert!(
            output.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn the_dashboard_is_well_formed_and_every_query_parses() {
    let path = repo_root().join("deploy/grafana/tandem-overview.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(dashboard["uid"], "tandem-overview");
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    assert_eq!(dashboard["templating"]["list"][0]["type"], "datasource");
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    let mut ids = std::collections::BTreeSet::new();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for panel in panels {
        let id = panel["id"].as_u64().unwrap();
        assert!(ids.insert(id), "panel id {id} twice");
        let title = panel["title"].as_str().unwrap();
        assert!(!title.is_empty());
        let grid = &panel["gridPos"];
        let (x, w, h) = (
            grid["x"].as_u64().unwrap(),
            grid["w"].as_u64().unwrap(),
            grid["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24 && w > 0 && h > 0, "{title}: {grid}");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        assert!(
            panel["fieldConfig"]["defaults"]["unit"].is_string(),
            "{title}"
        );
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no query");
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            let reference = target["refId"].as_str().unwrap();
            // Each query becomes a recording rule, so promtool parses it as PromQL.
            rules.push_str(&format!(
                "      - record: dashboard:panel_{id}:{}\n        expr: {}\n",
                reference.to_lowercase(),
                serde_json::to_string(expr).unwrap()
            ));
        }
    }
    let file = std::env::temp_dir().join(format!("tandem-dashboard-{}.yml", std::process::id()));
    std::fs::write(&file, rules).unwrap();
    let output = promtool(
        &["check", "rules", file.to_str().unwrap()],
        &std::env::temp_dir(),
    );
    let _ = std::fs::remove_file(&file);
    assert!(
        output.status.success(),
        "a dashboard query does not parse:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
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
    let (created, mut received) = purchase_webhook(channel.clone(), &referrer_key, "ops").await;
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
    pos.record_refund(with_bearer(
        pb::RecordRefundRequest {
            idempotency_key: "ops-f".into(),
            transaction_id: "T-ops".into(),
            amount: eur(2_000),
            ..Default::default()
        },
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
                ("tandem_commission_reversed_total", vec!["currency=\"EUR\""]),
                ("tandem_outbox_depth", vec!["db_namespace=\"ledger\""]),
                (
                    "messaging_client_sent_messages_total",
                    vec!["messaging_destination_name="],
                ),
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
                ("tandem_webhook_endpoints_disabled_total", vec![]),
            ],
        ),
    ]
    .into_iter()
    .collect();
    for (service, address) in &metrics {
        let wanted = &expected[service];
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let text = loop {
            let text = scrape(*address).await.unwrap_or_default();
            let found = samples(&text);
            let missing: Vec<&str> = wanted
                .iter()
                .filter(|(name, labels)| !has(&found, name, labels))
                .map(|(name, _)| *name)
                .collect();
            if missing.is_empty() {
                break text;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{service} lacks {missing:?} after 60 s:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
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
    // The dashboard and the alerts only name metrics the services serve.
    let mut families = std::collections::BTreeSet::new();
    for address in metrics.values() {
        let text = scrape(*address).await.unwrap();
        families.extend(
            text.lines()
                .filter_map(|line| line.strip_prefix("# TYPE "))
                .filter_map(|line| line.split(' ').next())
                .map(str::to_owned),
        );
        // Label names too: queries group by them.
        for series in samples(&text).keys() {
            if let Some((_, labels)) = series.split_once('{') {
                families.extend(
                    labels
                        .split(',')
                        .filter_map(|pair| pair.split_once('=').map(|(k, _)| k.to_owned())),
                );
            }
        }
    }
    // Families that exist only after an event this test does not cause: a cycle closed, the
    // ledger's minute-long balance check.
    families.insert("tandem_commission_settled_total".into());
    families.insert("tandem_ledger_imbalance".into());
    for file in [
        "deploy/grafana/tandem-overview.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let text = std::fs::read_to_string(repo_root().join(file)).unwrap();
        for name in referenced_metrics(&text) {
            let known = families.contains(&name)
                || ["_bucket", "_count", "_sum"].iter().any(|suffix| {
                    name.strip_suffix(suffix)
                        .is_some_and(|base| families.contains(base))
                });
            assert!(
                known,
                "{file} names {name}, which no service serves: {families:?}"
            );
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
    assert_eq!(
        value(
            &samples(&ledger_text),
            "tandem_commission_reversed_total",
            &["currency=\"EUR\""]
        ),
        100.0,
        "5 % of the EUR 20.00 refunded"
    );
    let unknown = http_get(metrics["gateway"], "/other").await.unwrap();
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
    wait_admin_applied(&ledger_db, 1).await;
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
