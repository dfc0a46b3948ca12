//! The referral ledger, in two stages. Attribution (`apply`) consumes the admin and
//! customer-activity topics, keyed by customer, and attributes purchases to referrals; it hands
//! what it attributed to the commission stage (`commissions`) on the internal `attributions`
//! topic, keyed by partnership, through its outbox. The commission stage, one writer per
//! partnership, computes commissions (half-even to the minor unit), posts them to a double-entry
//! ledger and announces its decisions on the `ledger` topic. Every projection here is rebuilt
//! by replaying the topics from the start (or the partnership streams, `rebuild_projections`).

mod apply;
mod attribution;
mod book;
mod commissions;
mod events;
mod facts;
mod metrics;
mod projection;
mod query;
mod rejected;
mod terms;

pub use book::rebuild_projections;
pub use commissions::{fire_payable_timers, payable_announcement_id, BatchCost, CommissionStage};
pub use rejected::RejectedRow;

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;

use tandem_bus::{run_consumer, run_outbox_relay, ConsumerSettings, RelaySettings, Topic};
use tandem_proto::v1::referral_ledger_server::ReferralLedgerServer;
use tandem_runtime::{BackgroundTasks, BusArgs, ConsumerArgs, DatabaseArgs};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::Routes;

/// Configuration: every setting is a flag and an environment variable.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "referral-ledger",
    about = "Tandem's attribution and commission ledger"
)]
pub struct Config {
    /// Address of the internal gRPC listener.
    #[arg(long, env = "TANDEM_LEDGER_LISTEN", default_value = "127.0.0.1:50052")]
    pub listen: SocketAddr,
    /// Address of the Prometheus scrape endpoint (`GET /metrics`).
    #[arg(
        long,
        env = "TANDEM_LEDGER_METRICS_LISTEN",
        default_value = "127.0.0.1:9465"
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
    /// Postgres schema of the ledger.
    #[arg(long, env = "TANDEM_LEDGER_SCHEMA", default_value = "ledger")]
    pub schema: String,
    /// Kafka consumer group prefix: the ledger consumes the admin topic in `<group>.admin`,
    /// customer activity in `<group>.activity` and attributions in `<group>.commissions`.
    #[arg(
        long,
        env = "TANDEM_LEDGER_CONSUMER_GROUP",
        default_value = "referral-ledger"
    )]
    pub consumer_group: String,
    /// Rebuild the projections of the partnership streams (commissions, balances, terms) from
    /// the event table, then exit instead of serving.
    #[arg(long)]
    pub rebuild_projections: bool,
    /// List the messages the ledger rejected and skipped (reason, topic, partition, offset),
    /// then exit.
    #[arg(long, conflicts_with_all = ["rebuild_projections", "replay_rejected"])]
    pub list_rejected: bool,
    /// Apply a rejected message again (once its cause is fixed: a deployment that understands
    /// it, a partnership that now exists), by its `message_ref` from `--list-rejected`, then
    /// exit. If it is refused again, it is recorded again with the new reason.
    #[arg(
        long,
        value_name = "MESSAGE_REF",
        conflicts_with = "rebuild_projections"
    )]
    pub replay_rejected: Option<String>,
    /// Most events applied in one transaction.
    #[arg(long, env = "TANDEM_LEDGER_MAX_BATCH", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_batch: u32,
    /// Parts of each consumed batch applied at once, each in its own transaction and connection
    /// (a partition's messages stay in one part, in order). Each of the three consumers uses
    /// this many connections, so the pool needs at least 3 × lanes + 2
    /// (`TANDEM_DB_MAX_CONNECTIONS`).
    #[arg(long, env = "TANDEM_LEDGER_CONSUMER_LANES", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub consumer_lanes: u32,
    /// A consumed batch fills while messages keep coming, for at most 20 ms; a pause in
    /// arrivals this long (milliseconds) closes it sooner. 0: every batch waits the 20 ms.
    /// Shorter means lower latency; longer means bigger batches, so fewer transactions,
    /// offset commits and relay rounds a purchase.
    #[arg(long, env = "TANDEM_LEDGER_BATCH_GAP_MS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=20))]
    pub batch_gap_ms: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("database failure")]
    Database(#[from] sqlx::Error),
    #[error("storage failure")]
    Store(#[from] tandem_store::StoreError),
    #[error("waiting for admin event {needed}; applied through {applied}")]
    AwaitingAdmin { needed: i64, applied: i64 },
    #[error("partnership {0} is not known yet; waiting for its admin event")]
    AwaitingPartnership(String),
    #[error("stored data violates the domain's rules")]
    Corrupt(#[from] tandem_domain::ValidationError),
    #[error("ledger entry does not balance")]
    Unbalanced(#[from] tandem_domain::ledger::UnbalancedEntry),
    #[error("invariant violated: {0}")]
    Invariant(&'static str),
}

impl LedgerError {
    /// True when the data, not the infrastructure, made the batch fail: a constraint it breaks,
    /// a value out of range, stored data the domain refuses. Such a failure would repeat on
    /// every retry, so the consumer isolates the message and records it instead of retrying.
    pub fn is_data_error(&self) -> bool {
        match self {
            Self::Database(sqlx::Error::Database(error)) => error.code().is_some_and(|code| {
                code.starts_with("22") || (code.starts_with("23") && code != "23505")
            }),
            Self::Store(tandem_store::StoreError::Database(sqlx::Error::Database(error))) => {
                error.code().is_some_and(|code| {
                    code.starts_with("22") || (code.starts_with("23") && code != "23505")
                })
            }
            Self::Corrupt(_) | Self::Unbalanced(_) | Self::Invariant(_) => true,
            _ => false,
        }
    }
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
    Rebuild(#[from] LedgerError),
    #[error("{0}")]
    Replay(String),
    #[error("{0}")]
    Config(String),
}

/// The whole binary: configuration from flags and the environment, then [`run`] until SIGTERM.
/// Exits non-zero when the ledger fails, a consumer included.
pub fn main() -> std::process::ExitCode {
    tandem_runtime::service_main(
        "referral-ledger",
        |config: &Config| config.listen,
        |config: &Config| config.metrics_listen,
        run,
    )
}

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Creates or upgrades the ledger's schema (what `run` does first).
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), tandem_store::StoreError> {
    tandem_store::migrate(pool, &MIGRATIONS).await
}

/// Applies one rejected message again through its stage; what it hands on or announces waits in
/// the outbox for the running ledger's relay. Returns the new reason if it was rejected again.
pub async fn replay_rejected(
    pool: &sqlx::PgPool,
    message_ref: &str,
) -> Result<Option<String>, StartError> {
    use tandem_bus::BatchHandler;
    let Some(delivery) = rejected::take(pool, message_ref).await? else {
        return Err(StartError::Replay(format!(
            "no rejected message {message_ref:?}; --list-rejected shows them"
        )));
    };
    let wake = Arc::new(Notify::new());
    match delivery.topic {
        Topic::Attributions => {
            commissions::CommissionStage::new(pool.clone(), wake)
                .handle(std::slice::from_ref(&delivery))
                .await?
        }
        _ => {
            apply::Applier {
                pool: pool.clone(),
                outbox_written: wake,
            }
            .handle(std::slice::from_ref(&delivery))
            .await?
        }
    }
    let again = rejected::list(pool).await?.into_iter().find(|row| {
        row.topic == delivery.topic.logical_name()
            && row.offset == delivery.offset
            && row.partition == delivery.partition
    });
    Ok(again.map(|row| row.reason))
}

/// Runs the ledger until `shutdown` is cancelled: migrates, consumes, serves queries.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    // A certificate that cannot be served stops the service before it touches anything.
    let tls = config.tls.server()?;
    // Three consumers with their lanes, the relay's lock, and one for the relay's batches and
    // the payable timers.
    let needed = 3 * config.consumer_lanes + 2;
    if config.database.db_max_connections < needed {
        return Err(StartError::Config(format!(
            "{} consumer lanes need at least {needed} database connections (3 consumers × lanes, the outbox relay's lock, its batches and the timers); \
             TANDEM_DB_MAX_CONNECTIONS is {}: raise it or lower TANDEM_LEDGER_CONSUMER_LANES",
            config.consumer_lanes, config.database.db_max_connections
        )));
    }
    let pool = tandem_store::connect(&config.database.store_config(&config.schema)).await?;
    tandem_store::migrate(&pool, &MIGRATIONS).await?;
    if config.list_rejected {
        for row in rejected::list(&pool).await? {
            println!(
                "{}\t{}/{}/{}\t{}\t{}",
                row.message_ref,
                row.topic,
                row.partition,
                row.offset,
                row.rejected_at.to_rfc3339(),
                row.reason
            );
        }
        pool.close().await;
        return Ok(());
    }
    if let Some(message_ref) = &config.replay_rejected {
        let outcome = replay_rejected(&pool, message_ref).await;
        pool.close().await;
        match outcome? {
            None => println!("applied: {message_ref}"),
            Some(reason) => println!("rejected again: {reason}"),
        }
        return Ok(());
    }
    if config.rebuild_projections {
        let replayed = rebuild_projections(&pool).await?;
        tracing::info!(replayed, "projections rebuilt from the event table");
        pool.close().await;
        return Ok(());
    }
    // Three consumers: customer activity waiting for a partnership it references never holds
    // up the admin topic that will bring it, and commission decisions (keyed by partnership)
    // are spread over instances independently of attribution (keyed by customer).
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
    for (suffix, topic) in [
        ("admin", Topic::Admin),
        ("activity", Topic::CustomerActivity),
    ] {
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
                    lanes: config.consumer_lanes as usize,
                    batch_gap: Duration::from_millis(u64::from(config.batch_gap_ms)),
                    membership: membership.clone(),
                    readiness: tasks.readiness(),
                },
                apply::Applier {
                    pool: pool.clone(),
                    outbox_written: outbox_written.clone(),
                },
                shutdown.clone(),
            ),
        );
    }
    let group_id = format!("{}.commissions", config.consumer_group);
    let stage = commissions::CommissionStage::new(pool.clone(), outbox_written.clone());
    tasks.spawn(
        format!("the consumer of group {group_id}"),
        run_consumer(
            bus.clone(),
            ConsumerSettings {
                group_id,
                topics: vec![Topic::Attributions],
                max_batch: config.max_batch as usize,
                max_wait: Duration::from_millis(20),
                lanes: config.consumer_lanes as usize,
                batch_gap: Duration::from_millis(u64::from(config.batch_gap_ms)),
                membership: membership.clone(),
                readiness: tasks.readiness(),
            },
            stage,
            shutdown.clone(),
        ),
    );
    let relay = run_outbox_relay(
        pool.clone(),
        producer,
        bus.clone(),
        RelaySettings::default(),
        outbox_written.clone(),
        shutdown.clone(),
    );
    // The relay and the timers retry every failure themselves; they end only at shutdown.
    tasks.spawn("the outbox relay", async move {
        relay.await;
        Ok::<(), std::convert::Infallible>(())
    });
    let timers = commissions::run_payable_timers(pool.clone(), outbox_written, shutdown.clone());
    tokio::spawn(metrics::run_balance_check(pool.clone(), shutdown.clone()));
    tasks.spawn("the payable timers", async move {
        timers.await;
        Ok::<(), std::convert::Infallible>(())
    });
    let routes = Routes::new(ReferralLedgerServer::new(query::LedgerQueries {
        pool: pool.clone(),
    }));
    let served = tandem_runtime::serve(
        listener,
        tls,
        routes,
        tandem_runtime::ServiceAuthLayer::require(&config.service_token),
        &[<ReferralLedgerServer<query::LedgerQueries> as NamedService>::NAME],
        tasks,
        shutdown.clone(),
    )
    .await;
    pool.close().await;
    served?;
    Ok(())
}
