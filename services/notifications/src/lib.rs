//! Tandem notifications: tells merchants what happened.
//!
//! It consumes the `ledger` and `settlement` topics into each merchant's notifications (typed,
//! versioned JSON; numbered per merchant without gaps) and serves them to the merchant gateway as
//! a gRPC stream a merchant resumes from its cursor. What each payload holds:
//! docs/NOTIFICATIONS.md. Signed webhooks are the next step of its issue.

mod api;
pub mod delivery;
pub mod endpoints;
pub mod intake;
mod metrics;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem_bus::{run_consumer, ConsumerSettings, Topic};
use tandem_proto::v1::notifications_server::NotificationsServer;
use tandem_runtime::{BackgroundTasks, BusArgs, ConsumerArgs, DatabaseArgs};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::Routes;

/// Configuration: every setting is a flag and an environment variable.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "notifications", about = "Tandem's notifications to merchants")]
pub struct Config {
    /// Address of the internal gRPC listener.
    #[arg(
        long,
        env = "TANDEM_NOTIFICATIONS_LISTEN",
        default_value = "127.0.0.1:50054"
    )]
    pub listen: SocketAddr,
    /// Address of the Prometheus scrape endpoint (`GET /metrics`).
    #[arg(
        long,
        env = "TANDEM_NOTIFICATIONS_METRICS_LISTEN",
        default_value = "127.0.0.1:9467"
    )]
    pub metrics_listen: SocketAddr,
    /// The deployment's service token (`TANDEM_SERVICE_TOKEN`, 32+ characters): every call to
    /// this internal API must present it as `authorization: Bearer <token>` (health checks
    /// excepted). The merchant gateway is configured with the same token.
    #[arg(long, env = "TANDEM_SERVICE_TOKEN", hide_env_values = true, value_parser = tandem_runtime::secret_parser(tandem_runtime::parse_service_token))]
    pub service_token: tandem_runtime::Secret,
    /// TLS: the certificate this service presents (and, for the gateway, whom it trusts).
    #[command(flatten)]
    pub tls: tandem_runtime::TlsArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub bus: BusArgs,
    #[command(flatten)]
    pub consumer: ConsumerArgs,
    /// Postgres schema of notifications.
    #[arg(
        long,
        env = "TANDEM_NOTIFICATIONS_SCHEMA",
        default_value = "notifications"
    )]
    pub schema: String,
    /// Kafka consumer group prefix: `<group>.ledger` and `<group>.settlement`.
    #[arg(
        long,
        env = "TANDEM_NOTIFICATIONS_CONSUMER_GROUP",
        default_value = "notifications"
    )]
    pub consumer_group: String,
    /// The wait before each webhook retry (the first attempt is at once), e.g. the default
    /// `5s,5m,30m,2h,5h,10h,10h`: about 27.6 hours, then the delivery is failed.
    #[arg(long, env = "TANDEM_WEBHOOK_RETRY_SCHEDULE", default_value = "5s,5m,30m,2h,5h,10h,10h", value_parser = delivery::parse_schedule)]
    pub webhook_retry_schedule: std::vec::Vec<std::time::Duration>,
    /// Longest wait for an endpoint's answer, in milliseconds.
    #[arg(long, env = "TANDEM_WEBHOOK_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub webhook_timeout_ms: u64,
    /// Deliveries in flight to one endpoint at most.
    #[arg(long, env = "TANDEM_WEBHOOK_PER_ENDPOINT", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub webhook_per_endpoint: u32,
    /// Deliveries in flight in all at most.
    #[arg(long, env = "TANDEM_WEBHOOK_CONCURRENCY", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub webhook_concurrency: u32,
    /// An endpoint whose every delivery failed for this long is disabled and its merchant told
    /// (`webhook.endpoint_disabled`): e.g. `5d`, `12h`.
    #[arg(long, env = "TANDEM_WEBHOOK_DISABLE_AFTER", default_value = "5d", value_parser = delivery::parse_duration)]
    pub webhook_disable_after: std::time::Duration,
    /// Allow webhook URLs over http and to private, loopback or link-local addresses (local
    /// development only; the local scripts set it).
    #[arg(long, env = "TANDEM_WEBHOOKS_ALLOW_PRIVATE", default_value_t = false)]
    pub webhooks_allow_private: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NotificationsError {
    #[error("database failure")]
    Database(#[from] sqlx::Error),
    #[error("storage failure")]
    Store(#[from] tandem_store::StoreError),
    #[error("broken invariant: {0}")]
    Invariant(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("TLS")]
    Tls(#[from] tandem_runtime::TlsError),
    #[error("storage")]
    Store(#[from] tandem_store::StoreError),
    #[error("gRPC server")]
    Serve(#[from] tandem_runtime::ServeError),
}

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The whole binary: configuration from flags and the environment, then [`run`] until SIGTERM.
pub fn main() -> std::process::ExitCode {
    tandem_runtime::service_main(
        "notifications",
        |config: &Config| config.listen,
        |config: &Config| config.metrics_listen,
        run,
    )
}

/// Runs notifications until `shutdown` is cancelled: migrates, consumes, serves streams.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    // A certificate that cannot be served stops the service before it touches anything.
    let tls = config.tls.server()?;
    let pool = tandem_store::connect(&config.database.store_config(&config.schema)).await?;
    tandem_store::migrate(&pool, &MIGRATIONS).await?;
    let membership = config.consumer.membership(config.listen.port());
    let bus = config.bus.bus_config();
    let written = Arc::new(Notify::new());
    let queued = Arc::new(Notify::new());
    let mut tasks = BackgroundTasks::default();
    tasks.probe_database(pool.clone());
    tasks.prune_bookkeeping(
        pool.clone(),
        &config.database.retention,
        Vec::new(),
        shutdown.clone(),
    );
    tasks.probe_brokers(bus.clone());
    for (suffix, topic) in [("ledger", Topic::Ledger), ("settlement", Topic::Settlement)] {
        let group_id = format!("{}.{suffix}", config.consumer_group);
        tasks.spawn(
            format!("the consumer of group {group_id}"),
            run_consumer(
                bus.clone(),
                ConsumerSettings {
                    group_id,
                    topics: vec![topic],
                    max_batch: 1000,
                    max_wait: Duration::from_millis(20),
                    lanes: 1,
                    batch_gap: Duration::from_millis(2),
                    membership: membership.clone(),
                    readiness: tasks.readiness(),
                },
                intake::Intake {
                    pool: pool.clone(),
                    written: written.clone(),
                    queued: queued.clone(),
                },
                shutdown.clone(),
            ),
        );
    }
    let settings = delivery::DeliverySettings {
        schedule: config.webhook_retry_schedule.clone(),
        timeout: Duration::from_millis(config.webhook_timeout_ms),
        per_endpoint: config.webhook_per_endpoint as usize,
        concurrency: config.webhook_concurrency as usize,
        allow_private: config.webhooks_allow_private,
        disable_after: config.webhook_disable_after,
    };
    let worker = delivery::run(pool.clone(), settings, queued.clone(), shutdown.clone());
    tasks.spawn("the webhook delivery worker", async move {
        worker.await;
        Ok::<(), std::convert::Infallible>(())
    });
    let routes = Routes::new(NotificationsServer::new(api::NotificationsApi {
        pool: pool.clone(),
        written,
        shutdown: shutdown.clone(),
        allow_private: config.webhooks_allow_private,
        queued,
    }));
    let served = tandem_runtime::serve(
        listener,
        tls,
        routes,
        tandem_runtime::ServiceAuthLayer::require(&config.service_token),
        &[<NotificationsServer<api::NotificationsApi> as NamedService>::NAME],
        tasks,
        shutdown.clone(),
    )
    .await;
    pool.close().await;
    served?;
    Ok(())
}
