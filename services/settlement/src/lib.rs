//! Tandem settlement: closes settlement cycles, nets what merchants owe each other and issues
//! statements and payout instructions.
//!
//! It consumes the admin topic (merchants, terms, payout accounts) and the `ledger` topic
//! (commissions that became payable, reversals) into commission lines (`intake`); closes each
//! cycle a grace period after its cut-off, or on an operator's request, in one transaction
//! (`close`); serves statements and their exports (CSV, JSON, PDF) to the merchant gateway
//! (`api`); and announces statements and payout instructions on the `settlement` topic through
//! its outbox. How cycles, netting and the canonical encoding work: docs/SETTLEMENT.md.

mod api;
pub mod close;
pub mod corrections;
mod intake;
mod lines;
mod metrics;
pub mod pain001;
pub mod payouts;
pub mod pdf;
pub mod statements;

pub use close::{close_cycle, close_due_cycles, parse_cycle, rebuild_projections, ClosureSummary};
pub use intake::Intake;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem_bus::{run_consumer, run_outbox_relay, ConsumerSettings, RelaySettings, Topic};
use tandem_domain::partnership::SettlementCycle;
use tandem_domain::settlement::CycleKind;
use tandem_proto::v1::settlement_server::SettlementServer;
use tandem_runtime::{BackgroundTasks, BusArgs, ConsumerArgs, DatabaseArgs};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::Routes;

/// Configuration: every setting is a flag and an environment variable.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "settlement",
    about = "Tandem's settlement cycles, statements and payouts"
)]
pub struct Config {
    /// Address of the internal gRPC listener.
    #[arg(
        long,
        env = "TANDEM_SETTLEMENT_LISTEN",
        default_value = "127.0.0.1:50053"
    )]
    pub listen: SocketAddr,
    /// Address of the Prometheus scrape endpoint (`GET /metrics`).
    #[arg(
        long,
        env = "TANDEM_SETTLEMENT_METRICS_LISTEN",
        default_value = "127.0.0.1:9466"
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
    /// Postgres schema of settlement.
    #[arg(long, env = "TANDEM_SETTLEMENT_SCHEMA", default_value = "settlement")]
    pub schema: String,
    /// Kafka consumer group prefix: settlement consumes the admin topic in `<group>.admin` and
    /// the ledger topic in `<group>.ledger`.
    #[arg(
        long,
        env = "TANDEM_SETTLEMENT_CONSUMER_GROUP",
        default_value = "settlement"
    )]
    pub consumer_group: String,
    /// A cycle closes by itself this many seconds after its cut-off, so that commissions that
    /// became payable just before it are received first (a later one goes into the next cycle).
    #[arg(long, env = "TANDEM_SETTLEMENT_CLOSE_GRACE_SECS", default_value_t = 300, value_parser = clap::value_parser!(u32).range(0..=86_400))]
    pub close_grace_secs: u32,
    /// How often the schedule looks for cycles due to close, in seconds.
    #[arg(long, env = "TANDEM_SETTLEMENT_SCHEDULE_SECS", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=3_600))]
    pub schedule_secs: u32,
    /// Most messages applied in one transaction.
    #[arg(long, env = "TANDEM_SETTLEMENT_MAX_BATCH", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=5_000))]
    pub max_batch: u32,
    /// Rebuild the projections (statements, carried-forward lines, cycle summaries, payout
    /// instructions) from the recorded closures and lines, then exit instead of serving.
    #[arg(long)]
    pub rebuild_projections: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SettlementError {
    #[error("database failure")]
    Database(#[from] sqlx::Error),
    #[error("storage failure")]
    Store(#[from] tandem_store::StoreError),
    #[error("stored data violates the domain's rules")]
    Corrupt(#[from] tandem_domain::ValidationError),
    #[error("invariant violated: {0}")]
    Invariant(&'static str),
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("TLS")]
    Tls(#[from] tandem_runtime::TlsError),
    #[error("storage")]
    Store(#[from] tandem_store::StoreError),
    #[error("message bus")]
    Bus(#[from] tandem_bus::BusError),
    #[error("gRPC server")]
    Serve(#[from] tandem_runtime::ServeError),
    #[error("rebuilding the projections failed")]
    Rebuild(#[from] SettlementError),
    #[error("{0}")]
    Config(String),
}

/// The cycle kind of a terms version's settlement cycle.
pub fn cycle_kind(cycle: SettlementCycle) -> CycleKind {
    match cycle {
        SettlementCycle::Daily => CycleKind::Daily,
        SettlementCycle::Weekly => CycleKind::Weekly,
        SettlementCycle::Monthly => CycleKind::Monthly,
    }
}

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Creates or upgrades settlement's schema (what `run` does first).
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), tandem_store::StoreError> {
    tandem_store::migrate(pool, &MIGRATIONS).await
}

/// The whole binary: configuration from flags and the environment, then [`run`] until SIGTERM.
pub fn main() -> std::process::ExitCode {
    tandem_runtime::service_main(
        "settlement",
        |config: &Config| config.listen,
        |config: &Config| config.metrics_listen,
        run,
    )
}

/// Runs settlement until `shutdown` is cancelled: migrates, consumes, closes cycles on schedule,
/// serves its API.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    // A certificate that cannot be served stops the service before it touches anything.
    let tls = config.tls.server()?;
    // Two consumers, the relay's lock and its batches, a closure and its readers, and one for the
    // API and the schedule.
    let needed = 2 + 2 + 1 + close::READ_PARTS + 1;
    if config.database.db_max_connections < needed {
        return Err(StartError::Config(format!(
            "settlement needs at least {needed} database connections (two consumers, the outbox relay, a closure with its {} readers, the API); \
             TANDEM_DB_MAX_CONNECTIONS is {}: raise it",
            close::READ_PARTS,
            config.database.db_max_connections
        )));
    }
    let pool = tandem_store::connect(&config.database.store_config(&config.schema)).await?;
    tandem_store::migrate(&pool, &MIGRATIONS).await?;
    if config.rebuild_projections {
        let replayed = rebuild_projections(&pool).await?;
        tracing::info!(
            closures = replayed,
            "projections rebuilt from the recorded closures"
        );
        pool.close().await;
        return Ok(());
    }
    let membership = config.consumer.membership(config.listen.port());
    let bus = config.bus.bus_config();
    let producer = tandem_bus::idempotent_producer(&bus)?;
    let outbox_written = Arc::new(Notify::new());
    let mut tasks = BackgroundTasks::default();
    tasks.probe_database(pool.clone());
    tasks.prune_bookkeeping(
        pool.clone(),
        &config.database.retention,
        Vec::new(),
        shutdown.clone(),
    );
    tasks.probe_brokers(bus.clone());
    for (suffix, topic) in [("admin", Topic::Admin), ("ledger", Topic::Ledger)] {
        let group_id = format!("{}.{suffix}", config.consumer_group);
        tasks.spawn(
            format!("the consumer of group {group_id}"),
            run_consumer(
                bus.clone(),
                ConsumerSettings {
                    group_id,
                    topics: vec![topic],
                    max_batch: config.max_batch as usize,
                    max_wait: Duration::from_millis(20),
                    lanes: 1,
                    batch_gap: Duration::from_millis(2),
                    membership: membership.clone(),
                    readiness: tasks.readiness(),
                },
                intake::Intake { pool: pool.clone() },
                shutdown.clone(),
            ),
        );
    }
    let relay = run_outbox_relay(
        pool.clone(),
        producer,
        bus.clone(),
        RelaySettings::default(),
        outbox_written.clone(),
        shutdown.clone(),
    );
    tasks.spawn("the outbox relay", async move {
        relay.await;
        Ok::<(), std::convert::Infallible>(())
    });
    let schedule = run_schedule(
        pool.clone(),
        Duration::from_secs(u64::from(config.schedule_secs)),
        chrono::Duration::seconds(i64::from(config.close_grace_secs)),
        outbox_written.clone(),
        shutdown.clone(),
    );
    tasks.spawn("the closing schedule", async move {
        schedule.await;
        Ok::<(), std::convert::Infallible>(())
    });
    let routes = Routes::new(SettlementServer::new(api::SettlementApi {
        pool: pool.clone(),
        outbox_written,
    }));
    let served = tandem_runtime::serve(
        listener,
        tls,
        routes,
        tandem_runtime::ServiceAuthLayer::require(&config.service_token),
        &[<SettlementServer<api::SettlementApi> as NamedService>::NAME],
        tasks,
        shutdown.clone(),
    )
    .await;
    pool.close().await;
    served?;
    Ok(())
}

/// Closes due cycles every `every` until `shutdown`; a failure is logged and tried again on the
/// next round. Closing is idempotent, so several instances may run it: the closure transaction
/// serialises them and the second finds the cycle closed.
async fn run_schedule(
    pool: sqlx::PgPool,
    every: Duration,
    grace: chrono::Duration,
    outbox_written: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        match close_due_cycles(&pool, chrono::Utc::now(), grace, &outbox_written).await {
            Ok(0) => {}
            Ok(closed) => tracing::info!(closed, "due cycles closed"),
            Err(error) => {
                tracing::warn!(error = %tandem_runtime::error_chain(&error), "closing due cycles failed; trying again next round")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
