//! `tandemctl webhooks ...`: a merchant's webhook endpoints from a terminal (with its API key),
//! and `receive`, a local receiver that prints the deliveries it verified.

use std::net::SocketAddr;

use tandem_proto::v1 as pb;
use tandem_proto::v1::notification_service_client::NotificationServiceClient;

use crate::call;
use crate::client::authorised;

#[derive(Debug, clap::Args)]
pub struct WebhooksArgs {
    #[command(flatten)]
    gateway: crate::client::GatewayUrl,
    /// The merchant's API key (every command but `receive`).
    #[arg(long, global = true, env = "TANDEM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[command(subcommand)]
    command: WebhooksCommand,
}

#[derive(Debug, clap::Subcommand)]
enum WebhooksCommand {
    /// Registers an endpoint and prints its signing secret (shown once).
    Register {
        #[arg(long)]
        url: String,
        /// A notification type to deliver (repeat it); none means every type.
        #[arg(long = "type")]
        types: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// Default: derived from the URL and types, so running the command again answers the
        /// same endpoint.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// The merchant's endpoints.
    List,
    /// An endpoint's deliveries, newest first, with every attempt.
    Deliveries {
        #[arg(long)]
        endpoint: String,
    },
    /// A new signing secret; the old one signs too for `--overlap-hours`.
    Rotate {
        #[arg(long)]
        endpoint: String,
        #[arg(long, default_value_t = 24)]
        overlap_hours: u32,
    },
    Enable {
        #[arg(long)]
        endpoint: String,
    },
    Disable {
        #[arg(long)]
        endpoint: String,
    },
    /// Sends one notification to the endpoint again.
    Redeliver {
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        notification: String,
    },
    /// Sends every notification since an instant (RFC 3339) to the endpoint again.
    Replay {
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        since: chrono::DateTime<chrono::Utc>,
    },
    /// Sends a `webhook.test` delivery to the endpoint (signed and retried like every
    /// delivery) and waits, up to `--wait-secs`, for its first attempt's outcome.
    Test {
        #[arg(long)]
        endpoint: String,
        /// Default: a new one, so every run sends a new test.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[arg(long, default_value_t = 30)]
        wait_secs: u64,
    },
    /// Runs a local receiver that verifies each delivery with the secret and prints it.
    Receive {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// The endpoint's signing secret (`whsec_…`).
        #[arg(long, env = "TANDEM_WEBHOOK_SECRET", hide_env_values = true)]
        secret: String,
        /// Stop after this many deliveries (default: run until interrupted).
        #[arg(long)]
        count: Option<usize>,
    },
}

pub async fn run(args: WebhooksArgs) -> Result<(), String> {
    if let WebhooksCommand::Receive {
        listen,
        secret,
        count,
    } = &args.command
    {
        return receive(*listen, secret, *count).await;
    }
    let key = args
        .api_key
        .as_deref()
        .ok_or("--api-key (or TANDEM_API_KEY) is needed")?;
    let channel = args.gateway.endpoint()?.connect_lazy();
    let mut api = NotificationServiceClient::new(channel);
    match args.command {
        WebhooksCommand::Register {
            url,
            types,
            description,
            idempotency_key,
        } => {
            let idempotency_key = idempotency_key.unwrap_or_else(|| {
                let digest = tandem_domain::statement::content_hash(
                    format!("{url}\n{}", types.join(",")).as_bytes(),
                );
                format!("tandemctl-{}", &digest[..32])
            });
            let created = call!(
                "register webhook endpoint",
                api.create_webhook_endpoint(authorised(
                    pb::CreateWebhookEndpointRequest {
                        merchant_id: String::new(),
                        idempotency_key: idempotency_key.clone(),
                        url: url.clone(),
                        types: types.clone(),
                        description: description.clone(),
                    },
                    key
                )?)
            )?;
            let endpoint = created.endpoint.unwrap_or_default();
            println!("endpoint {} -> {}", endpoint.endpoint_id, endpoint.url);
            println!(
                "signing secret (keep it; shown once): {}",
                created.signing_secret
            );
        }
        WebhooksCommand::List => {
            let listed = call!(
                "list webhook endpoints",
                api.list_webhook_endpoints(authorised(
                    pb::ListWebhookEndpointsRequest::default(),
                    key
                )?)
            )?;
            for e in listed.endpoints {
                println!(
                    "{} {} {} types [{}] {}",
                    e.endpoint_id,
                    if e.enabled { "enabled " } else { "DISABLED" },
                    e.url,
                    e.types.join(", "),
                    e.disabled_reason
                );
            }
        }
        WebhooksCommand::Deliveries { endpoint } => {
            let listed = call!(
                "list webhook deliveries",
                api.list_webhook_deliveries(authorised(
                    pb::ListWebhookDeliveriesRequest {
                        endpoint_id: endpoint.clone(),
                        ..Default::default()
                    },
                    key
                )?)
            )?;
            for d in listed.deliveries {
                println!(
                    "#{} {} {} {}",
                    d.cursor, d.r#type, d.notification_id, d.status
                );
                for a in d.attempts {
                    println!(
                        "    attempt {}: HTTP {} in {} ms: {}",
                        a.attempt,
                        a.status_code,
                        a.latency_ms,
                        a.excerpt.chars().take(80).collect::<String>()
                    );
                }
            }
        }
        WebhooksCommand::Rotate {
            endpoint,
            overlap_hours,
        } => {
            let rotated = call!(
                "rotate webhook secret",
                api.rotate_webhook_secret(authorised(
                    pb::RotateWebhookSecretRequest {
                        endpoint_id: endpoint.clone(),
                        overlap_hours,
                        ..Default::default()
                    },
                    key
                )?)
            )?;
            println!(
                "new signing secret (keep it; shown once): {}",
                rotated.signing_secret
            );
            if let Some(until) = rotated.previous_secret_expires_at {
                println!(
                    "the previous secret signs too until {}",
                    tandem_proto::time::datetime(&until)
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_default()
                );
            }
        }
        WebhooksCommand::Enable { endpoint } => set_enabled(&mut api, key, &endpoint, true).await?,
        WebhooksCommand::Disable { endpoint } => {
            set_enabled(&mut api, key, &endpoint, false).await?
        }
        WebhooksCommand::Redeliver {
            endpoint,
            notification,
        } => {
            let delivery = call!(
                "redeliver webhook",
                api.redeliver_webhook(authorised(
                    pb::RedeliverWebhookRequest {
                        endpoint_id: endpoint.clone(),
                        notification_id: notification.clone(),
                        ..Default::default()
                    },
                    key
                )?)
            )?;
            println!(
                "{} queued again ({})",
                delivery.notification_id, delivery.status
            );
        }
        WebhooksCommand::Replay { endpoint, since } => {
            let replayed = call!(
                "replay webhooks",
                api.replay_webhooks(authorised(
                    pb::ReplayWebhooksRequest {
                        endpoint_id: endpoint.clone(),
                        since: Some(tandem_proto::time::timestamp(since)),
                        ..Default::default()
                    },
                    key
                )?)
            )?;
            println!("{} deliveries queued", replayed.queued);
        }
        WebhooksCommand::Test {
            endpoint,
            idempotency_key,
            wait_secs,
        } => {
            let idempotency_key = idempotency_key
                .unwrap_or_else(|| format!("test-{}", uuid::Uuid::now_v7().simple()));
            let queued = call!(
                "send test webhook",
                api.send_test_webhook(authorised(
                    pb::SendTestWebhookRequest {
                        endpoint_id: endpoint.clone(),
                        idempotency_key: idempotency_key.clone(),
                        ..Default::default()
                    },
                    key
                )?)
            )?;
            println!("test delivery {} queued", queued.notification_id);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait_secs);
            loop {
                let deliveries = call!(
                    "list webhook deliveries",
                    api.list_webhook_deliveries(authorised(
                        pb::ListWebhookDeliveriesRequest {
                            endpoint_id: endpoint.clone(),
                            page_size: 100,
                            ..Default::default()
                        },
                        key
                    )?)
                )?;
                let attempt = deliveries
                    .deliveries
                    .iter()
                    .find(|d| d.notification_id == queued.notification_id)
                    .and_then(|d| d.attempts.first().cloned());
                if let Some(attempt) = attempt {
                    let ok = (200..300).contains(&attempt.status_code);
                    println!(
                        "attempt 1: HTTP {} in {} ms{}",
                        attempt.status_code,
                        attempt.latency_ms,
                        if attempt.excerpt.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", attempt.excerpt)
                        }
                    );
                    if ok {
                        break;
                    }
                    return Err(format!(
                        "the endpoint did not accept the test delivery; it is retried on the schedule \
                         (tandemctl webhooks deliveries --endpoint {endpoint})"
                    ));
                }
                if std::time::Instant::now() >= deadline {
                    return Err(format!(
                        "no attempt within {wait_secs} s; the delivery stays queued \
                         (tandemctl webhooks deliveries --endpoint {endpoint})"
                    ));
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        WebhooksCommand::Receive { .. } => unreachable!("handled above"),
    }
    Ok(())
}

async fn set_enabled(
    api: &mut NotificationServiceClient<tonic::transport::Channel>,
    key: &str,
    endpoint: &str,
    enabled: bool,
) -> Result<(), String> {
    let updated = call!(
        "set webhook endpoint enabled",
        api.set_webhook_endpoint_enabled(authorised(
            pb::SetWebhookEndpointEnabledRequest {
                endpoint_id: endpoint.to_owned(),
                enabled,
                ..Default::default()
            },
            key
        )?)
    )?;
    println!(
        "{} {}",
        updated.endpoint_id,
        if updated.enabled {
            "enabled"
        } else {
            "disabled"
        }
    );
    Ok(())
}

async fn receive(listen: SocketAddr, secret: &str, count: Option<usize>) -> Result<(), String> {
    let secret = notifications::webhook::SigningSecret::parse(secret)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("listening on {listen}: {e}"))?;
    println!("receiving webhooks on http://{listen}/ (Ctrl-C to stop)");
    let (sender, mut deliveries) = tokio::sync::mpsc::channel(64);
    tokio::spawn(crate::receiver::serve(
        listener,
        crate::receiver::Secrets::One(secret),
        sender,
    ));
    let mut seen = 0;
    while let Some(delivery) = deliveries.recv().await {
        let body: serde_json::Value =
            serde_json::from_slice(&delivery.body).unwrap_or(serde_json::Value::Null);
        match &delivery.verified {
            Ok(()) => println!(
                "verified {} {} {}",
                body["type"].as_str().unwrap_or("?"),
                delivery.id,
                body["data"]
            ),
            Err(reason) => println!("REJECTED {}: {reason}", delivery.id),
        }
        seen += 1;
        if count.is_some_and(|count| seen >= count) {
            break;
        }
    }
    Ok(())
}
