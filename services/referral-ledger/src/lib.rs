//! The referral ledger: consumes the admin and customer-activity topics, attributes purchases to
//! referrals, computes commissions (half-even to the minor unit) and posts them to a
//! double-entry ledger. Every projection here is rebuilt by replaying the topics from the start.

mod apply;
mod book;
mod events;
mod query;

pub use book::rebuild_projections;

use std::net::SocketAddr;
use std::time::Duration;

use tandem_bus::{run_consumer, ConsumerSettings, Topic};
use tandem_proto::v1::referral_ledger_server::ReferralLedgerServer;
use tandem_runtime::{BackgroundTasks, BusArgs, ConsumerArgs, DatabaseArgs};
use tokio::net::TcpListener;
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
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub bus: BusArgs,
    #[command(flatten)]
    pub consumer: ConsumerArgs,
    /// Postgres schema of the ledger.
    #[arg(long, env = "TANDEM_LEDGER_SCHEMA", default_value = "ledger")]
    pub schema: String,
    /// Kafka consumer group prefix: the ledger consumes the admin topic in `<group>.admin` and
    /// customer activity in `<group>.activity`.
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
    /// Most events applied in one transaction.
    #[arg(long, env = "TANDEM_LEDGER_MAX_BATCH", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_batch: u32,
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

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("storage")]
    Store(#[from] tandem_store::StoreError),
    #[error("message bus")]
    Bus(#[from] tandem_bus::BusError),
    #[error("gRPC server")]
    Serve(#[from] tandem_runtime::ServeError),
    #[error("rebuilding the projections failed")]
    Rebuild(#[from] LedgerError),
}

/// The whole binary: configuration from flags and the environment, then [`run`] until SIGTERM.
/// Exits non-zero when the ledger fails, a consumer included.
pub fn main() -> std::process::ExitCode {
    tandem_runtime::service_main("referral-ledger", |config: &Config| config.listen, run)
}

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Runs the ledger until `shutdown` is cancelled: migrates, consumes, serves queries.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let pool = tandem_store::connect(&config.database.store_config(&config.schema)).await?;
    tandem_store::migrate(&pool, &MIGRATIONS).await?;
    if config.rebuild_projections {
        let replayed = rebuild_projections(&pool).await?;
        tracing::info!(replayed, "projections rebuilt from the event table");
        pool.close().await;
        return Ok(());
    }
    // Two consumers, so that customer activity waiting for a partnership it references never
    // holds up the admin topic that will bring it.
    let membership = config.consumer.membership(config.listen.port());
    let mut tasks = BackgroundTasks::default();
    for (suffix, topic) in [
        ("admin", Topic::Admin),
        ("activity", Topic::CustomerActivity),
    ] {
        let group_id = format!("{}.{suffix}", config.consumer_group);
        tasks.spawn(
            format!("the consumer of group {group_id}"),
            run_consumer(
                config.bus.bus_config(),
                ConsumerSettings {
                    group_id,
                    topics: vec![topic],
                    max_batch: config.max_batch as usize,
                    max_wait: Duration::from_millis(20),
                    membership: membership.clone(),
                },
                apply::Applier { pool: pool.clone() },
                shutdown.clone(),
            ),
        );
    }
    let routes = Routes::new(ReferralLedgerServer::new(query::LedgerQueries {
        pool: pool.clone(),
    }));
    let served = tandem_runtime::serve(
        listener,
        routes,
        &[<ReferralLedgerServer<query::LedgerQueries> as NamedService>::NAME],
        tasks,
        shutdown.clone(),
    )
    .await;
    pool.close().await;
    served?;
    Ok(())
}
