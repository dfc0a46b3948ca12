//! The merchant gateway: Tandem's POS-facing gRPC API.
//!
//! Every write is validated and pseudonymised at the edge, recorded in one Postgres transaction
//! (event table, outbox and idempotency record together) and acknowledged only after that commit.
//! The outbox relay then publishes it to Kafka. Raw customer identifiers never leave this crate's
//! request parsing.

mod audit;
mod auth;
mod bulk;
/// Request parsing and validation of the POS writes (public for the fuzz targets).
pub mod commands;
mod error;
mod events;
mod idempotency;
mod identifiers;
mod ingest;
mod keys;
mod limits;
mod notifications;
mod operator;
mod partnerships;
mod pos;
mod queries;
mod refunds;
mod statements;

use std::net::SocketAddr;
use std::sync::Arc;

use sqlx::PgPool;
use tandem_bus::{idempotent_producer, run_outbox_relay, RelaySettings};
use tandem_domain::customer::NetworkKey;
use tandem_proto::v1::merchant_gateway_server::MerchantGatewayServer;
use tandem_proto::v1::notification_service_server::NotificationServiceServer;
use tandem_proto::v1::notifications_client::NotificationsClient;
use tandem_proto::v1::operator_service_server::OperatorServiceServer;
use tandem_proto::v1::partnership_service_server::PartnershipServiceServer;
use tandem_proto::v1::referral_ledger_client::ReferralLedgerClient;
use tandem_proto::v1::settlement_client::SettlementClient;
use tandem_proto::v1::statement_service_server::StatementServiceServer;
use tandem_runtime::{BackgroundTasks, BusArgs, DatabaseArgs, Secret};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Routes;

pub use error::GatewayError;
pub use ingest::GroupCommitSettings;
pub use limits::LimitSettings;

/// Configuration: every setting is a flag and an environment variable.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "merchant-gateway", about = "Tandem's POS-facing gRPC API")]
pub struct Config {
    /// Address of the gRPC listener.
    #[arg(long, env = "TANDEM_GATEWAY_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Address of the Prometheus scrape endpoint (`GET /metrics`).
    #[arg(
        long,
        env = "TANDEM_GATEWAY_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_listen: SocketAddr,
    /// The deployment's service token (`TANDEM_SERVICE_TOKEN`, 32+ characters), presented on
    /// every call to the internal APIs (ledger, settlement, notifications).
    #[arg(long, env = "TANDEM_SERVICE_TOKEN", hide_env_values = true, value_parser = tandem_runtime::secret_parser(tandem_runtime::parse_service_token))]
    pub service_token: tandem_runtime::Secret,
    /// TLS: the certificate this service presents (and, for the gateway, whom it trusts).
    #[command(flatten)]
    pub tls: tandem_runtime::TlsArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub bus: BusArgs,
    /// Postgres schema of the gateway.
    #[arg(long, env = "TANDEM_GATEWAY_SCHEMA", default_value = "gateway")]
    pub schema: String,
    /// Hours a merchant's idempotency key is remembered: a retry within that time gets the
    /// first answer; after it, the key may be used again. At least a day. Operators' keys are
    /// never forgotten.
    #[arg(long, env = "TANDEM_IDEMPOTENCY_RETENTION_HOURS", default_value_t = 168, value_parser = clap::value_parser!(u64).range(24..=87_600))]
    pub idempotency_retention_hours: u64,
    /// URL of the referral ledger's gRPC API.
    #[arg(
        long,
        env = "TANDEM_LEDGER_URL",
        default_value = "https://127.0.0.1:50052"
    )]
    pub ledger_url: String,
    /// URL of the settlement service's gRPC API.
    #[arg(
        long,
        env = "TANDEM_SETTLEMENT_URL",
        default_value = "https://127.0.0.1:50053"
    )]
    pub settlement_url: String,
    /// URL of the notifications service's gRPC API.
    #[arg(
        long,
        env = "TANDEM_NOTIFICATIONS_URL",
        default_value = "https://127.0.0.1:50054"
    )]
    pub notifications_url: String,
    /// Token operators present as `authorization: Bearer <token>`; at least 16 characters.
    #[arg(long, env = "TANDEM_OPERATOR_TOKEN", hide_env_values = true, value_parser = tandem_runtime::secret_parser(parse_operator_token))]
    pub operator_token: Secret,
    #[command(flatten)]
    pub group_commit: ingest::GroupCommitSettings,
    #[command(flatten)]
    pub limits: LimitSettings,
    /// Key customer keys are derived with, `<version>:<secret in hex, at least 32 bytes>`.
    #[arg(long, env = "TANDEM_NETWORK_KEY", hide_env_values = true, value_parser = tandem_runtime::secret_parser(parse_network_key))]
    pub network_key: NetworkKey,
    /// Earlier network keys still in use during a rotation, comma-separated, each
    /// `<version>:<hex>` with a version below the current one: every identifier's key is derived
    /// under each of them too, so that referrals recorded before the rotation still match. Keep
    /// them for the longest attribution window (docs/IDENTIFIERS.md, "Rotating the network key").
    #[arg(long, env = "TANDEM_NETWORK_KEY_PREVIOUS", hide_env_values = true, default_value = "", value_parser = tandem_runtime::secret_parser(parse_network_key_list))]
    pub previous_network_keys: NetworkKeyList,
}

/// Network keys given as one comma-separated value; blank items are ignored, so an empty
/// `TANDEM_NETWORK_KEY_PREVIOUS` means none.
#[derive(Debug, Clone, Default)]
pub struct NetworkKeyList(pub Vec<NetworkKey>);

/// Parses `<version>:<hex>[,<version>:<hex>…]`, spaces around items allowed.
pub fn parse_network_key_list(value: &str) -> Result<NetworkKeyList, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .enumerate()
        .map(|(index, item)| {
            parse_network_key(item).map_err(|reason| format!("item {}: {reason}", index + 1))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(NetworkKeyList)
}

/// The network keys to derive customer keys under, current first; refuses earlier keys whose
/// version is not below the current one, or repeated.
pub fn network_keys(
    current: &NetworkKey,
    previous: &[NetworkKey],
) -> Result<Vec<NetworkKey>, String> {
    let mut versions = std::collections::BTreeSet::new();
    for key in previous {
        if key.version() >= current.version() {
            return Err(format!(
                "TANDEM_NETWORK_KEY_PREVIOUS: version {} is not below the current version {} (TANDEM_NETWORK_KEY); a rotation moves to a higher version",
                key.version(),
                current.version()
            ));
        }
        if !versions.insert(key.version()) {
            return Err(format!(
                "TANDEM_NETWORK_KEY_PREVIOUS: version {} is given twice",
                key.version()
            ));
        }
    }
    Ok(std::iter::once(current.clone())
        .chain(previous.iter().cloned())
        .collect())
}

fn parse_operator_token(value: &str) -> Result<Secret, String> {
    if value.trim().len() < 16 {
        return Err("must be at least 16 characters".to_owned());
    }
    Ok(Secret::new(value.trim()))
}

/// Parses `<version>:<hex secret>`.
pub fn parse_network_key(value: &str) -> Result<NetworkKey, String> {
    let (version, secret) = value
        .split_once(':')
        .ok_or("must be <version>:<secret in hex>, e.g. 1:9f86d0…")?;
    let version: u16 = version
        .trim()
        .parse()
        .map_err(|_| "version must be a number from 0 to 65533")?;
    let secret = hex::decode(secret.trim()).map_err(|_| "secret must be hexadecimal")?;
    NetworkKey::new(version, secret).map_err(|error| error.reason)
}

/// What the handlers share.
pub struct State {
    pub pool: PgPool,
    /// The keys customer keys are derived under: the current one first, then those of a
    /// rotation still in progress.
    pub network_keys: Vec<NetworkKey>,
    pub operator_token: Secret,
    /// Rung after every commit that wrote to the outbox, so the relay publishes at once.
    pub outbox_written: Arc<Notify>,
    /// Registered loyalty programmes, cached once seen.
    pub programmes: identifiers::Programmes,
    /// Single purchase calls, written in groups.
    pub group_commit: ingest::GroupCommit,
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
    #[error("{0}")]
    ServiceToken(String),
    #[error("{0}")]
    NetworkKeys(String),
}

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The whole binary: configuration from flags and the environment, then [`run`] until SIGTERM.
pub fn main() -> std::process::ExitCode {
    tandem_runtime::service_main(
        "merchant-gateway",
        |config: &Config| config.listen,
        |config: &Config| config.metrics_listen,
        run,
    )
}

/// Runs the gateway on `listener` until `shutdown` is cancelled: migrates its schema, starts the
/// outbox relay and serves gRPC.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    // A certificate that cannot be served stops the service before it touches anything.
    let tls = config.tls.server()?;
    let pool = tandem_store::connect(&config.database.store_config(&config.schema)).await?;
    tandem_store::migrate(&pool, &MIGRATIONS).await?;
    let bus = config.bus.bus_config();
    let producer = idempotent_producer(&bus)?;
    let client_tls = &config.tls.client;
    let ledger_channel = client_tls
        .endpoint("TANDEM_LEDGER_URL", &config.ledger_url)?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(10))
        .connect_lazy();
    let settlement_channel = client_tls
        .endpoint("TANDEM_SETTLEMENT_URL", &config.settlement_url)?
        .connect_timeout(std::time::Duration::from_secs(5))
        // Exports of long statements and cycle closures take longer than a query.
        .timeout(std::time::Duration::from_secs(120))
        .connect_lazy();
    // Streams last as long as the merchant listens: no request timeout on this channel.
    let notifications_channel = client_tls
        .endpoint("TANDEM_NOTIFICATIONS_URL", &config.notifications_url)?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect_lazy();
    let credential = tandem_runtime::ServiceCredential::new(&config.service_token)
        .map_err(StartError::ServiceToken)?;
    let outbox_written = Arc::new(Notify::new());
    let group_commit =
        ingest::GroupCommit::start(pool.clone(), config.group_commit, outbox_written.clone());
    let state = Arc::new(State {
        pool: pool.clone(),
        network_keys: network_keys(&config.network_key, &config.previous_network_keys.0)
            .map_err(StartError::NetworkKeys)?,
        operator_token: config.operator_token,
        outbox_written,
        programmes: identifiers::Programmes::default(),
        group_commit,
    });

    let mut tasks = BackgroundTasks::default();
    tasks.probe_database(pool.clone());
    tasks.prune_bookkeeping(
        pool.clone(),
        &config.database.retention,
        vec![idempotency::retention(tandem_runtime::hours(
            config.idempotency_retention_hours,
        ))],
        shutdown.clone(),
    );
    tasks.probe_brokers(bus.clone());
    let relay = run_outbox_relay(
        pool.clone(),
        producer,
        bus,
        RelaySettings::default(),
        state.outbox_written.clone(),
        shutdown.clone(),
    );
    // The relay retries every failure itself; it ends only at shutdown (or by a panic).
    tasks.spawn("the outbox relay", async move {
        relay.await;
        Ok::<(), std::convert::Infallible>(())
    });
    // Every public service: the per-credential rate limit first, then the size limit.
    let limiter = limits::RateLimiter::new(&config.limits);
    let max_bytes = config.limits.max_request_bytes;
    let routes = Routes::new(InterceptedService::new(
        MerchantGatewayServer::new(pos::PosApi {
            state: state.clone(),
            ledger: ReferralLedgerClient::with_interceptor(ledger_channel, credential.clone()),
        })
        .max_decoding_message_size(max_bytes),
        limiter.clone(),
    ))
    .add_service(InterceptedService::new(
        PartnershipServiceServer::new(partnerships::PartnershipApi {
            state: state.clone(),
        })
        .max_decoding_message_size(max_bytes),
        limiter.clone(),
    ))
    .add_service(InterceptedService::new(
        StatementServiceServer::new(statements::StatementApi {
            state: state.clone(),
            settlement: SettlementClient::with_interceptor(
                settlement_channel.clone(),
                credential.clone(),
            ),
        })
        .max_decoding_message_size(max_bytes),
        limiter.clone(),
    ))
    .add_service(InterceptedService::new(
        NotificationServiceServer::new(notifications::NotificationApi {
            state: state.clone(),
            notifications: NotificationsClient::with_interceptor(
                notifications_channel,
                credential.clone(),
            ),
            shutdown: shutdown.clone(),
        })
        .max_decoding_message_size(max_bytes),
        limiter.clone(),
    ))
    .add_service(InterceptedService::new(
        OperatorServiceServer::new(operator::OperatorApi {
            state,
            settlement: SettlementClient::with_interceptor(settlement_channel, credential),
        })
        .max_decoding_message_size(max_bytes),
        limiter,
    ));
    let served = tandem_runtime::serve(
        listener,
        tls,
        routes,
        tandem_runtime::ServiceAuthLayer::open(),
        &[
            <MerchantGatewayServer<pos::PosApi> as NamedService>::NAME,
            <OperatorServiceServer<operator::OperatorApi> as NamedService>::NAME,
            <PartnershipServiceServer<partnerships::PartnershipApi> as NamedService>::NAME,
            <StatementServiceServer<statements::StatementApi> as NamedService>::NAME,
            <NotificationServiceServer<notifications::NotificationApi> as NamedService>::NAME,
        ],
        tasks,
        shutdown.clone(),
    )
    .await;
    pool.close().await;
    served?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn earlier_network_keys_must_have_lower_distinct_versions() {
        let key = |version: u16| NetworkKey::new(version, vec![7; 32]).unwrap();
        let keys = network_keys(&key(3), &[key(2), key(1)]).unwrap();
        assert_eq!(
            keys.iter().map(NetworkKey::version).collect::<Vec<_>>(),
            [3, 2, 1]
        );
        let error = network_keys(&key(2), &[key(2)]).unwrap_err();
        assert!(error.contains("not below the current version 2"), "{error}");
        let error = network_keys(&key(3), &[key(1), key(1)]).unwrap_err();
        assert!(error.contains("given twice"), "{error}");
        let secret = "00".repeat(32);
        assert!(parse_network_key(&format!("65534:{secret}")).is_err());
        assert!(parse_network_key(&format!("65533:{secret}")).is_ok());
        // Blank items (an emptied variable) mean none; spaces around items are allowed.
        assert!(parse_network_key_list("").unwrap().0.is_empty());
        assert!(parse_network_key_list(" , ").unwrap().0.is_empty());
        let list = parse_network_key_list(&format!("1:{secret}, 2:{secret}")).unwrap();
        assert_eq!(list.0.len(), 2);
        assert!(parse_network_key_list(&format!("1:{secret},x"))
            .unwrap_err()
            .starts_with("item 2:"));
    }
}
