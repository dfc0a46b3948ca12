//! `tandemctl`: the operator's command line. Creates topics, waits for services to report
//! healthy, and runs the end-to-end demo against a running stack.

use tandemctl::{
    bench, demo, import, settlement_bench, soak, statements, trace, webhook_bench, webhooks,
};

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[derive(Debug, Parser)]
#[command(name = "tandemctl", about = "Operate a Tandem deployment")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Creates Tandem's topics (those that exist are left alone).
    CreateTopics {
        #[command(flatten)]
        bus: tandem_runtime::BusArgs,
        #[command(flatten)]
        topics: tandem_runtime::TopicArgs,
    },
    /// Deletes every topic whose name starts with PREFIX (e.g. `test-`, what the test suite
    /// leaves behind), so a reused local broker does not pile up partitions.
    DeleteTopics {
        #[command(flatten)]
        bus: tandem_runtime::BusArgs,
        /// At least 3 characters; every topic starting with it is deleted.
        #[arg(long)]
        starting_with: String,
    },
    /// Creates a database on the Postgres server unless it exists.
    CreateDatabase {
        /// URL of the server (any database on it).
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        #[arg(long)]
        name: String,
    },
    /// Prints DATABASE_URL with its database replaced by NAME.
    DatabaseUrl {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        #[arg(long)]
        name: String,
    },
    /// Waits until every endpoint's gRPC health check reports SERVING; exits non-zero if one
    /// does not within the timeout (also an exec probe for orchestrators whose gRPC probes do
    /// not speak TLS: `--timeout-secs 5 --service liveness https://localhost:50051`).
    WaitHealthy {
        /// gRPC endpoints, e.g. https://127.0.0.1:50051
        #[arg(required = true)]
        endpoints: Vec<String>,
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
        /// The health service name to check: "" (readiness, the default) or `liveness`.
        #[arg(long, default_value = "")]
        service: String,
        #[command(flatten)]
        tls: tandem_runtime::ClientTlsArgs,
    },
    /// Runs the demo: two merchants, a partnership, a referral and purchases, then prints what
    /// the referrer learned.
    Demo(demo::DemoArgs),
    /// Measures a running stack: purchases acknowledged per second, and how long until the
    /// ledger attributed them all. A benchmark, not a test.
    Bench(bench::BenchArgs),
    /// Imports a merchant's purchases from a CSV file through the bulk call RecordPurchases, with
    /// a progress bar. Safe to run again: each row has its idempotency key.
    Import(import::ImportArgs),
    /// Settlement statements and payouts: list, show, export and verify a merchant's
    /// statements, register its payout account; close cycles and write payout files
    /// (operator).
    Statements(statements::StatementsArgs),
    /// Measures closing one monthly cycle over many commission lines (default a million across
    /// 1,000 merchants), on a database of its own. A benchmark, not a test.
    SettlementBench(settlement_bench::SettlementBenchArgs),
    /// Webhook endpoints: register, list, deliveries, rotate, enable, disable, redeliver,
    /// replay, test; and `receive`, a local receiver that prints the deliveries it verified.
    Webhooks(webhooks::WebhooksArgs),
    /// Measures webhooks on a running stack: POS call to the referrer's webhook at a fixed rate
    /// (p50/p99), and deliveries per second to a receiver that answers at once. A benchmark,
    /// not a test.
    WebhookBench(webhook_bench::WebhookBenchArgs),
    /// A long run at a fixed rate (default: half the benchmark's sustained rate, 10 minutes),
    /// reported per minute: latencies, the ledger's lag, each process's memory and CPU; the first
    /// and last minute side by side. Writes soak-result.json.
    Soak(soak::SoakArgs),
    /// Prints one trace from Jaeger (the local stack's with `up.sh --observability`): every span
    /// in order, under its parent, with its service, start, duration and key attributes.
    Trace(trace::TraceArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CreateTopics { bus, topics } => create_topics(&bus, &topics).await,
        Command::DeleteTopics { bus, starting_with } => {
            delete_topics(&bus.bus_config(), &starting_with).await
        }
        Command::CreateDatabase { database_url, name } => {
            tandem_store::create_database(&database_url, &name)
                .await
                .map(|created| {
                    if created {
                        eprintln!("created database {name}");
                    }
                })
                .map_err(|error| tandem_runtime::error_chain(&error))
        }
        Command::DatabaseUrl { database_url, name } => {
            println!("{}", tandem_store::url_with_database(&database_url, &name));
            Ok(())
        }
        Command::WaitHealthy {
            endpoints,
            timeout_secs,
            service,
            tls,
        } => {
            wait_healthy(
                &endpoints,
                &service,
                &tls,
                Duration::from_secs(timeout_secs),
            )
            .await
        }
        Command::Demo(args) => demo::run(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Import(args) => import::run(args).await,
        Command::Statements(args) => statements::run(args).await,
        Command::SettlementBench(args) => settlement_bench::run(args).await,
        Command::Webhooks(args) => webhooks::run(args).await,
        Command::WebhookBench(args) => webhook_bench::run(args).await,
        Command::Soak(args) => soak::run(args).await,
        Command::Trace(args) => trace::run(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tandemctl: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn create_topics(
    bus: &tandem_runtime::BusArgs,
    topics: &tandem_runtime::TopicArgs,
) -> Result<(), String> {
    let settings = topics.topic_settings()?;
    tandem_bus::create_topics(&bus.bus_config(), &settings)
        .await
        .map_err(|error| tandem_runtime::error_chain(&error))?;
    println!(
        "topics ready under prefix {:?} (customer-activity: {} partitions; attributions and ledger: {}; replication factor {})",
        bus.topic_prefix,
        settings.activity_partitions,
        settings.partnership_partitions,
        settings.replication_factor
    );
    Ok(())
}

async fn delete_topics(bus: &tandem_bus::BusConfig, prefix: &str) -> Result<(), String> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    if prefix.len() < 3 {
        return Err("--starting-with must be at least 3 characters".into());
    }
    let admin: AdminClient<DefaultClientContext> = bus
        .client_config()
        .create()
        .map_err(|e| format!("kafka admin: {e}"))?;
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(30))
        .map_err(|e| format!("topic list: {e}"))?;
    let names: Vec<String> = metadata
        .topics()
        .iter()
        .map(|topic| topic.name().to_owned())
        .filter(|name| name.starts_with(prefix))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(60)));
    for chunk in names.chunks(200) {
        let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
        admin
            .delete_topics(&chunk, &options)
            .await
            .map_err(|e| format!("delete topics: {e}"))?;
    }
    println!("deleted {} topics starting with {prefix:?}", names.len());
    Ok(())
}

async fn wait_healthy(
    endpoints: &[String],
    service: &str,
    tls: &tandem_runtime::ClientTlsArgs,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    for endpoint in endpoints {
        // A URL or CA file that cannot be used is an answer now, not after the timeout.
        let reached = tls
            .endpoint("the endpoint", endpoint)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(2));
        loop {
            match check_health(reached.clone(), service).await {
                Ok(()) => {
                    println!("{endpoint} is serving");
                    break;
                }
                // A refused certificate will not be trusted later either.
                Err(Unhealthy::CertificateRefused(reason)) => {
                    return Err(format!(
                        "{endpoint}: its TLS certificate was refused ({reason}); set \
                         TANDEM_TLS_CA (or --tls-ca) to the authority that signed it"
                    ));
                }
                Err(Unhealthy::NotYet(reason)) if tokio::time::Instant::now() >= deadline => {
                    return Err(format!(
                        "{endpoint} not healthy after {timeout:?}: {reason}"
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
    Ok(())
}

/// Why a health check did not answer SERVING.
enum Unhealthy {
    /// The TLS handshake refused the server's certificate: retrying does not help.
    CertificateRefused(String),
    NotYet(String),
}

async fn check_health(
    endpoint: tonic::transport::Endpoint,
    service: &str,
) -> Result<(), Unhealthy> {
    let channel =
        endpoint.connect().await.map_err(
            |error| match tandemctl::client::certificate_refused_by(&error) {
                Some(reason) => Unhealthy::CertificateRefused(reason),
                None => Unhealthy::NotYet(tandem_runtime::error_chain(&error)),
            },
        )?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|status| Unhealthy::NotYet(status.message().to_owned()))?;
    if response.get_ref().status == ServingStatus::Serving as i32 {
        Ok(())
    } else {
        Err(Unhealthy::NotYet(format!(
            "status {}",
            response.get_ref().status
        )))
    }
}
