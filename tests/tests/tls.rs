//! TLS on every gRPC endpoint: the four services run as processes with certificates made by the
//! local scripts' `deploy/local/dev-certs.sh`, the gateway calls the internal services over TLS,
//! and a client that does not speak TLS, or does not trust the authority, gets nothing. A service
//! refuses to start in plaintext unless asked to, and the gateway refuses an `http://` backend
//! (and names a refused secret setting without showing its value).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::process::{free_address, repo_root, ServiceProcess};
use support::{as_operator, with_bearer, Stack};
use tandem_proto::v1 as pb;
use tandem_proto::v1::merchant_gateway_client::MerchantGatewayClient;
use tandem_proto::v1::notification_service_client::NotificationServiceClient;
use tandem_proto::v1::operator_service_client::OperatorServiceClient;
use tandem_proto::v1::statement_service_client::StatementServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The development certificates, made by the script the local stack uses, in a new directory.
fn dev_certs() -> PathBuf {
    let tls = std::env::temp_dir().join(format!("tandem-tls-{}", uuid::Uuid::new_v4().simple()));
    let status = std::process::Command::new("bash")
        .arg(repo_root().join("deploy/local/dev-certs.sh"))
        .arg(&tls)
        .status()
        .expect("run deploy/local/dev-certs.sh");
    assert!(status.success(), "dev-certs.sh failed: {status}");
    tls
}

/// The settings that make a service process serve TLS and trust the development CA.
fn tls_settings(tls: &Path) -> Vec<(&'static str, String)> {
    let file = |name: &str| tls.join(name).display().to_string();
    vec![
        ("TANDEM_PLAINTEXT", "false".to_owned()),
        ("TANDEM_TLS_CERT", file("server.pem")),
        ("TANDEM_TLS_KEY", file("server.key")),
        ("TANDEM_TLS_CA", file("ca.pem")),
    ]
}

/// A TLS channel to `address` that trusts the development CA (`https://127.0.0.1:<port>`,
/// checked against the certificate's IP address).
async fn tls_channel(address: SocketAddr, ca: &Path) -> Result<Channel, tonic::transport::Error> {
    let ca = std::fs::read(ca).expect("read ca.pem");
    Endpoint::from_shared(format!("https://{address}"))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
}

/// Waits for `process` (`what`, for messages) to exit by itself, asserts that it failed, and
/// returns its log.
fn exit_log(mut process: ServiceProcess, what: &str) -> String {
    let status = process
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{what} still runs after 30 s"));
    assert!(!status.success(), "{what} exited successfully");
    std::fs::read_to_string(&process.log_path).unwrap()
}

async fn serving(channel: Channel) -> Result<ServingStatus, tonic::Status> {
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner()
        .status;
    Ok(ServingStatus::try_from(status).unwrap())
}

/// Waits until the TLS service at `address` reports SERVING.
async fn wait_serving_tls(address: SocketAddr, ca: &Path, process: &ServiceProcess) {
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(90) {
        if let Ok(channel) = tls_channel(address, ca).await {
            if serving(channel).await.ok() == Some(ServingStatus::Serving) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{address} did not report SERVING over TLS; its log:\n{}",
        std::fs::read_to_string(&process.log_path).unwrap_or_default()
    );
}

/// The merchant's commissions as a referrer: a gateway call the ledger answers.
async fn referrer_commissions(
    channel: Channel,
    key: &str,
) -> Result<pb::ListCommissionsResponse, tonic::Status> {
    MerchantGatewayClient::new(channel)
        .list_commissions(with_bearer(
            pb::ListCommissionsRequest {
                role: pb::PartnershipRole::Referrer as i32,
                ..Default::default()
            },
            key,
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// What `openssl s_client` (an independent TLS implementation) reports for `address`.
fn s_client(address: SocketAddr, extra: &[&str]) -> (bool, String) {
    let output = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &address.to_string()])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl s_client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_grpc_endpoint_serves_tls_and_the_gateway_calls_the_internal_services_over_it() {
    let tls = dev_certs();
    let ca = tls.join("ca.pem");
    let other_tls = dev_certs();
    let mut stack = Stack::start(false).await;
    if let Some(gateway) = stack.gateway.take() {
        gateway.stop().await;
    }
    let settlement_address = stack.release_settlement_port();
    let notifications_address = stack.release_notifications_port();
    let gateway_address = free_address();
    let secure = tls_settings(&tls);
    let https = |address: SocketAddr| format!("https://{address}");
    let mut gateway_settings = secure.clone();
    gateway_settings.extend([
        ("TANDEM_LEDGER_URL", https(stack.ledger_address())),
        ("TANDEM_SETTLEMENT_URL", https(settlement_address)),
        ("TANDEM_NOTIFICATIONS_URL", https(notifications_address)),
    ]);
    let processes = [
        ServiceProcess::start(&stack, "ledger-tls", &secure),
        ServiceProcess::start_settlement(&stack, settlement_address, &secure),
        ServiceProcess::start_notifications(&stack, notifications_address, &secure),
        ServiceProcess::start_gateway(&stack, gateway_address, &gateway_settings),
    ];
    for process in &processes {
        wait_serving_tls(process.address, &ca, process).await;
    }

    // A merchant works through the gateway over TLS, reached the way tandemctl reaches it
    // (`TANDEM_GATEWAY_URL` and `TANDEM_TLS_CA`), and each call below is answered by an internal
    // service the gateway reached over TLS: the ledger, settlement, notifications.
    let gateway_url = tandemctl::client::GatewayUrl {
        gateway: https(gateway_address),
        tls: tandem_runtime::ClientTlsArgs {
            ca: Some(ca.clone()),
            plaintext: false,
        },
    };
    let channel = gateway_url.endpoint().unwrap().connect().await.unwrap();
    let created = OperatorServiceClient::new(channel.clone())
        .create_merchant(as_operator(pb::CreateMerchantRequest {
            display_name: "Atelier A".into(),
            settlement_currency: "EUR".into(),
            time_zone: "Europe/Paris".into(),
            idempotency_key: uuid::Uuid::new_v4().to_string(),
            identifier_captures: vec![support::capture("email")],
        }))
        .await
        .expect("create a merchant over TLS")
        .into_inner();
    let key = created.api_key.as_str();
    let commissions = referrer_commissions(channel.clone(), key)
        .await
        .expect("the ledger answers the gateway over TLS");
    assert!(commissions.lines.is_empty());
    StatementServiceClient::new(channel.clone())
        .list_statements(with_bearer(pb::ListStatementsRequest::default(), key))
        .await
        .expect("settlement answers the gateway over TLS");
    NotificationServiceClient::new(channel.clone())
        .list_webhook_endpoints(with_bearer(pb::ListWebhookEndpointsRequest::default(), key))
        .await
        .expect("notifications answers the gateway over TLS");

    for process in &processes {
        let address = process.address;
        // A client that speaks plaintext HTTP/2 gets no answer.
        let plaintext = Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect_lazy();
        let refused = serving(plaintext).await;
        assert!(
            refused.is_err(),
            "{address} answered plaintext: {refused:?}"
        );
        // A client that trusts another authority, and one that trusts the right one but expects
        // another name, do not connect: the certificate is refused.
        for (what, tls_config) in [
            (
                "another CA",
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(
                    std::fs::read(other_tls.join("ca.pem")).unwrap(),
                )),
            ),
            (
                "another name",
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(std::fs::read(&ca).unwrap()))
                    .domain_name("ledger.example.com"),
            ),
        ] {
            let refused = Endpoint::from_shared(format!("https://{address}"))
                .unwrap()
                .tls_config(tls_config)
                .unwrap()
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .map(|_| ())
                .map_err(|error| tandem_runtime::error_chain(&error));
            let error = refused.expect_err(&format!("{address} was trusted with {what}"));
            assert!(
                error.contains("invalid peer certificate"),
                "{address} with {what}: {error}"
            );
        }
        // OpenSSL's client verifies the chain against the CA, and negotiates HTTP/2 over TLS
        // 1.2 or 1.3; TLS 1.1 is refused.
        let (ok, report) = s_client(
            address,
            &[
                "-CAfile",
                ca.to_str().unwrap(),
                "-verify_return_error",
                "-verify_ip",
                "127.0.0.1",
                "-alpn",
                "h2",
            ],
        );
        assert!(ok, "openssl s_client failed against {address}:\n{report}");
        assert!(
            report.contains("Verify return code: 0 (ok)"),
            "{address}: {report}"
        );
        assert!(report.contains("ALPN protocol: h2"), "{address}: {report}");
        assert!(
            report.contains("New, TLSv1.3") || report.contains("New, TLSv1.2"),
            "{address}: {report}"
        );
        // OpenSSL 3 does not offer TLS 1.1 at its default security level: lowered, it does,
        // and the server answers with an alert.
        let (old_ok, old) = s_client(address, &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]);
        assert!(
            !old_ok && old.contains("SSL alert number"),
            "{address} did not refuse TLS 1.1 with an alert:\n{old}"
        );
    }
    // A gateway that trusts another authority serves, but its calls to the internal services
    // fail: it verifies their certificates.
    let mut doubting_settings = gateway_settings.clone();
    doubting_settings.push((
        "TANDEM_TLS_CA",
        other_tls.join("ca.pem").display().to_string(),
    ));
    let doubting_address = free_address();
    let mut doubting = ServiceProcess::start_gateway(&stack, doubting_address, &doubting_settings);
    wait_serving_tls(doubting_address, &ca, &doubting).await;
    let refused = referrer_commissions(tls_channel(doubting_address, &ca).await.unwrap(), key)
        .await
        .expect_err("a ledger whose certificate the gateway does not trust");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    doubting.kill();

    for mut process in processes {
        process.kill();
    }
    stack.stop().await;
    std::fs::remove_dir_all(&tls).ok();
    std::fs::remove_dir_all(&other_tls).ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn services_refuse_to_start_in_plaintext_unless_asked_and_the_gateway_refuses_http_backends()
{
    let tls = dev_certs();
    let mut stack = Stack::start(false).await;
    if let Some(gateway) = stack.gateway.take() {
        gateway.stop().await;
    }

    // No certificate, and plaintext not asked for.
    let no_tls = [
        ("TANDEM_PLAINTEXT", "false".to_owned()),
        ("TANDEM_LEDGER_LISTEN", free_address().to_string()),
    ];
    let log = exit_log(
        ServiceProcess::start(&stack, "ledger-no-tls", &no_tls),
        "the ledger without a certificate",
    );
    assert!(
        log.contains("TANDEM_TLS_CERT") && log.contains("TANDEM_PLAINTEXT=true"),
        "the ledger's log says what to set: {log}"
    );

    // A key that is not the certificate's.
    let other_tls = dev_certs();
    let mut mismatched = tls_settings(&tls);
    mismatched.push((
        "TANDEM_TLS_KEY",
        other_tls.join("server.key").display().to_string(),
    ));
    mismatched.push(("TANDEM_LEDGER_LISTEN", free_address().to_string()));
    let log = exit_log(
        ServiceProcess::start(&stack, "ledger-bad-key", &mismatched),
        "the ledger with a key that is not its certificate's",
    );
    assert!(log.contains("TANDEM_TLS_KEY"), "{log}");

    // A TLS gateway told to call the ledger over http://.
    let mut settings = tls_settings(&tls);
    settings.push((
        "TANDEM_LEDGER_URL",
        format!("http://{}", stack.ledger_address()),
    ));
    let log = exit_log(
        ServiceProcess::start_gateway(&stack, free_address(), &settings),
        "the gateway with an http:// backend",
    );
    assert!(
        log.contains("TANDEM_LEDGER_URL") && log.contains("https://"),
        "the gateway's log names the setting and the fix: {log}"
    );
    // A secret setting that is refused is named, never shown: a mistyped network key must not
    // land in the log.
    let mut settings = tls_settings(&tls);
    settings.push(("TANDEM_NETWORK_KEY", "7:c0ffee5ecc0ffee5ec".to_owned()));
    let log = exit_log(
        ServiceProcess::start_gateway(&stack, free_address(), &settings),
        "the gateway with a network key that is too short",
    );
    assert!(log.contains("TANDEM_NETWORK_KEY"), "{log}");
    assert!(
        !log.contains("c0ffee5ec"),
        "the log shows the secret: {log}"
    );

    stack.stop().await;
    std::fs::remove_dir_all(&tls).ok();
    std::fs::remove_dir_all(&other_tls).ok();
}
