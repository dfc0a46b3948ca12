//! Starts Tandem's services in-process on port 0, against a fresh database and topics of their
//! own, and gives typed clients for them.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

pub mod otlp;
pub mod process;
pub mod proxy;

use std::net::SocketAddr;
use std::time::Duration;

use merchant_gateway::parse_network_key;
use tandem_bus::BusConfig;
use tandem_proto::v1 as pb;
use tandem_proto::v1::merchant_gateway_client::MerchantGatewayClient;
use tandem_proto::v1::operator_service_client::OperatorServiceClient;
use tandem_runtime::{BusArgs, ConsumerArgs, DatabaseArgs, RetentionArgs, Secret};
use tandem_testkit::TestDatabase;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Request;

pub const OPERATOR_TOKEN: &str = "operator-token-for-tests";
/// What the internal APIs require of their callers (the gateway) in the tests' stacks.
pub const SERVICE_TOKEN: &str = "service-token-for-tests-0123456789abcdef";
pub const NETWORK_KEY: &str = "1:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// A running service and the means to stop it.
pub struct Running {
    pub address: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), String>>,
}

impl Running {
    /// Stops the service as SIGTERM would and waits for it to finish.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("service stops within 30 s")
            .expect("service task did not panic");
        result.expect("service ended without error");
    }

    /// Whether the service's task is still running.
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Waits for the service to end by itself (without being told to stop) and returns how it
    /// ended, with the error's cause chain. Panics if it still runs after `timeout`.
    pub async fn finish(self, timeout: Duration) -> Result<(), String> {
        tokio::time::timeout(timeout, self.task)
            .await
            .unwrap_or_else(|_| panic!("service still running after {timeout:?}"))
            .expect("service task did not panic")
    }
}

/// The gateway and, optionally, the ledger, on one test database and one topic prefix.
pub struct Stack {
    pub database: TestDatabase,
    pub bus: BusConfig,
    pub gateway: Option<Running>,
    pub ledger: Option<Running>,
    ledger_address: SocketAddr,
    pub settlement: Option<Running>,
    settlement_address: SocketAddr,
    /// Kept until settlement starts, so its port stays reserved for the gateway's client.
    settlement_listener: Option<TcpListener>,
    pub notifications: Option<Running>,
    notifications_address: SocketAddr,
    /// How long notifications lets an endpoint fail before disabling it (tests shorten it).
    pub webhook_disable_after: Duration,
    /// Webhook deliveries in flight at once in a notifications instance (64 unless a test
    /// narrows it).
    pub webhook_concurrency: u32,
    /// Longest wait for a webhook answer (2 s unless a test changes it).
    pub webhook_timeout_ms: u64,
    /// The gateway's per-credential rate limit (calls per second; bursts of twice that).
    pub rate_limit_per_second: u32,
    /// Pruning of the bookkeeping tables in every in-process service.
    pub retention: RetentionArgs,
    /// The gateway's network key (`<version>:<hex>`) and those of a rotation in progress.
    pub network_key: String,
    pub previous_network_keys: Vec<String>,
    notifications_listener: Option<TcpListener>,
    /// How ledgers started from now on take part in their consumer groups.
    pub consumer_args: ConsumerArgs,
}

impl Stack {
    pub async fn start(with_ledger: bool) -> Stack {
        Self::start_on(with_ledger, tandem_testkit::test_bus(4).await).await
    }

    /// As [`Stack::start`], with settings changed by `configure` before any service starts.
    pub async fn start_configured(with_ledger: bool, configure: impl FnOnce(&mut Stack)) -> Stack {
        Self::start_on_configured(with_ledger, tandem_testkit::test_bus(4).await, configure).await
    }

    /// As [`Stack::start`], on the topics of `bus` (for a test's private broker).
    pub async fn start_on(with_ledger: bool, bus: BusConfig) -> Stack {
        Self::start_on_configured(with_ledger, bus, |_| {}).await
    }

    async fn start_on_configured(
        with_ledger: bool,
        bus: BusConfig,
        configure: impl FnOnce(&mut Stack),
    ) -> Stack {
        let database = TestDatabase::create().await;
        let ledger_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ledger_address = ledger_listener.local_addr().unwrap();
        let settlement_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let settlement_address = settlement_listener.local_addr().unwrap();
        let notifications_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let notifications_address = notifications_listener.local_addr().unwrap();
        let mut stack = Stack {
            database,
            bus,
            gateway: None,
            ledger: None,
            ledger_address,
            settlement: None,
            settlement_address,
            settlement_listener: Some(settlement_listener),
            notifications: None,
            notifications_address,
            webhook_disable_after: Duration::from_secs(3600),
            webhook_concurrency: 64,
            webhook_timeout_ms: 2_000,
            rate_limit_per_second: 2_000,
            retention: RetentionArgs::default(),
            network_key: NETWORK_KEY.to_owned(),
            previous_network_keys: Vec::new(),
            notifications_listener: Some(notifications_listener),
            consumer_args: ConsumerArgs {
                instance_id: None,
                consumer_session_timeout_ms: 10_000,
                consumer_stall_timeout_ms: 60_000,
            },
        };
        configure(&mut stack);
        if with_ledger {
            stack.ledger = Some(stack.spawn_ledger(ledger_listener, "referral-ledger"));
        }
        stack.gateway = Some(stack.spawn_gateway().await);
        stack
    }

    pub fn ledger_address(&self) -> SocketAddr {
        self.ledger_address
    }

    fn database_args(&self) -> DatabaseArgs {
        DatabaseArgs {
            database_url: self.database.url.clone(),
            db_max_connections: 5,
            retention: self.retention.clone(),
        }
    }

    fn bus_args(&self) -> BusArgs {
        BusArgs {
            kafka_brokers: self.bus.brokers.clone(),
            topic_prefix: self.bus.topic_prefix.clone(),
            kafka_client_properties: None,
        }
    }

    /// Stops the stack's gateway and starts another with the stack's settings as they are now
    /// (a configuration change rolled out); it listens on a new address.
    pub async fn restart_gateway(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.stop().await;
        }
        self.gateway = Some(self.spawn_gateway().await);
    }

    /// Another gateway on the same database, topics and ledger address (gateways are
    /// stateless but for Postgres; their relays share the outbox under one lock).
    pub async fn add_gateway(&self) -> Running {
        self.spawn_gateway().await
    }

    async fn spawn_gateway(&self) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let config = merchant_gateway::Config {
            limits: merchant_gateway::LimitSettings {
                per_second: self.rate_limit_per_second,
                burst: self.rate_limit_per_second.saturating_mul(2),
                max_request_bytes: 2 * 1024 * 1024,
            },
            service_token: Secret::new(SERVICE_TOKEN),
            tls: tandem_runtime::TlsArgs::plaintext(),
            listen: address,
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            database: self.database_args(),
            bus: self.bus_args(),
            schema: "gateway".into(),
            idempotency_retention_hours: 168,
            ledger_url: format!("http://{}", self.ledger_address),
            settlement_url: format!("http://{}", self.settlement_address),
            notifications_url: format!("http://{}", self.notifications_address),
            operator_token: Secret::new(OPERATOR_TOKEN),
            network_key: parse_network_key(&self.network_key).unwrap(),
            previous_network_keys: merchant_gateway::NetworkKeyList(
                self.previous_network_keys
                    .iter()
                    .map(|key| parse_network_key(key).unwrap())
                    .collect(),
            ),
            group_commit: Default::default(),
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                merchant_gateway::run(config, listener, shutdown)
                    .await
                    .map_err(|e| tandem_runtime::error_chain(&e))
            }
        });
        wait_until_serving(address).await;
        Running {
            address,
            shutdown,
            task,
        }
    }

    /// Starts a ledger on `listener` with consumer group `group`.
    pub fn spawn_ledger(&self, listener: TcpListener, group: &str) -> Running {
        let address = listener.local_addr().unwrap();
        let config = referral_ledger::Config {
            service_token: Secret::new(SERVICE_TOKEN),
            tls: tandem_runtime::TlsArgs::plaintext(),
            listen: address,
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            database: self.database_args(),
            bus: self.bus_args(),
            schema: "ledger".into(),
            consumer: self.consumer_args.clone(),
            consumer_group: format!("{}-{group}", self.bus.topic_prefix),
            rebuild_projections: false,
            list_rejected: false,
            replay_rejected: None,
            max_batch: 500,
            consumer_lanes: 1,
            batch_gap_ms: 2,
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                referral_ledger::run(config, listener, shutdown)
                    .await
                    .map_err(|e| tandem_runtime::error_chain(&e))
            }
        });
        Running {
            address,
            shutdown,
            task,
        }
    }

    /// Starts settlement (consumer group `<prefix>-settlement`, cycles closing `grace_secs` after
    /// their cut-off).
    pub async fn start_settlement(&mut self, grace_secs: u32) {
        let listener = match self.settlement_listener.take() {
            Some(listener) => listener,
            None => bind_again(self.settlement_address).await,
        };
        self.settlement = Some(self.spawn_settlement(listener, "settlement", grace_secs));
        wait_until_serving(self.settlement_address).await;
    }

    pub fn spawn_settlement(&self, listener: TcpListener, group: &str, grace_secs: u32) -> Running {
        let address = listener.local_addr().unwrap();
        let config = self.settlement_config(address, group, grace_secs);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                settlement::run(config, listener, shutdown)
                    .await
                    .map_err(|e| tandem_runtime::error_chain(&e))
            }
        });
        Running {
            address,
            shutdown,
            task,
        }
    }

    pub fn settlement_config(
        &self,
        address: SocketAddr,
        group: &str,
        grace_secs: u32,
    ) -> settlement::Config {
        settlement::Config {
            service_token: Secret::new(SERVICE_TOKEN),
            tls: tandem_runtime::TlsArgs::plaintext(),
            listen: address,
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            database: DatabaseArgs {
                db_max_connections: 10,
                ..self.database_args()
            },
            bus: self.bus_args(),
            consumer: self.consumer_args.clone(),
            schema: "settlement".into(),
            consumer_group: format!("{}-{group}", self.bus.topic_prefix),
            close_grace_secs: grace_secs,
            schedule_secs: 1,
            max_batch: 500,
            rebuild_projections: false,
        }
    }

    pub fn settlement_address(&self) -> SocketAddr {
        self.settlement_address
    }

    /// Starts notifications (consumer group `<prefix>-notifications`), or again after a stop.
    pub async fn start_notifications(&mut self) {
        let listener = match self.notifications_listener.take() {
            Some(listener) => listener,
            None => bind_again(self.notifications_address).await,
        };
        let running = self.spawn_notifications(listener);
        wait_until_serving(running.address).await;
        self.notifications = Some(running);
    }

    /// Another notifications instance on the same database, topics and consumer group, on a
    /// port of its own: the two share the consumers' partitions and the delivery queue.
    pub async fn add_notifications(&self) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = self.spawn_notifications(listener);
        wait_until_serving(running.address).await;
        running
    }

    fn spawn_notifications(&self, listener: TcpListener) -> Running {
        let address = listener.local_addr().unwrap();
        let config = notifications::Config {
            service_token: Secret::new(SERVICE_TOKEN),
            tls: tandem_runtime::TlsArgs::plaintext(),
            listen: address,
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            database: DatabaseArgs {
                db_max_connections: 10,
                ..self.database_args()
            },
            bus: self.bus_args(),
            consumer: self.consumer_args.clone(),
            schema: "notifications".into(),
            consumer_group: format!("{}-notifications", self.bus.topic_prefix),
            // Retries in tenths of a second, so a test sees a schedule run out.
            webhook_retry_schedule: notifications::delivery::parse_schedule("100ms,200ms,300ms")
                .unwrap(),
            webhook_timeout_ms: self.webhook_timeout_ms,
            webhook_per_endpoint: 4,
            webhook_concurrency: self.webhook_concurrency,
            webhooks_allow_private: true,
            webhook_disable_after: self.webhook_disable_after,
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                notifications::run(config, listener, shutdown)
                    .await
                    .map_err(|e| tandem_runtime::error_chain(&e))
            }
        });
        Running {
            address,
            shutdown,
            task,
        }
    }

    pub fn notifications_address(&self) -> SocketAddr {
        self.notifications_address
    }

    /// Frees the settlement port the stack reserved, for a settlement process to bind.
    pub fn release_settlement_port(&mut self) -> SocketAddr {
        drop(self.settlement_listener.take());
        self.settlement_address
    }

    /// Frees the notifications port the stack reserved, for a notifications process to bind.
    pub fn release_notifications_port(&mut self) -> SocketAddr {
        drop(self.notifications_listener.take());
        self.notifications_address
    }

    /// Stops the ledger and starts a new one on the same database and address, in consumer
    /// group `group`. A new group reads both topics again from the start.
    pub async fn restart_ledger(&mut self, group: &str) {
        if let Some(ledger) = self.ledger.take() {
            ledger.stop().await;
        }
        let listener = bind_again(self.ledger_address).await;
        self.ledger = Some(self.spawn_ledger(listener, group));
        wait_until_serving(self.ledger_address).await;
    }

    pub async fn stop(mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.stop().await;
        }
        if let Some(ledger) = self.ledger.take() {
            ledger.stop().await;
        }
        if let Some(settlement) = self.settlement.take() {
            settlement.stop().await;
        }
        if let Some(notifications) = self.notifications.take() {
            notifications.stop().await;
        }
    }

    pub fn gateway_address(&self) -> SocketAddr {
        self.gateway.as_ref().expect("gateway running").address
    }

    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.gateway_address()))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn operator(&self) -> OperatorServiceClient<Channel> {
        OperatorServiceClient::new(self.channel().await)
    }

    pub async fn pos(&self) -> MerchantGatewayClient<Channel> {
        MerchantGatewayClient::new(self.channel().await)
    }

    /// Registers a merchant whose tills capture card fingerprints (of one processor every test
    /// merchant shares), PARs, phones and e-mails; returns its id and API key.
    pub async fn merchant(&self, name: &str) -> (String, String) {
        self.merchant_capturing(name, &["card:test-processor", "par", "phone", "email"])
            .await
    }

    /// Registers a merchant whose tills capture `captures` (`par`, `phone`, `email`,
    /// `card:<processor>`, `member:<programme>`); returns its id and API key.
    pub async fn merchant_capturing(&self, name: &str, captures: &[&str]) -> (String, String) {
        let response = self
            .operator()
            .await
            .create_merchant(as_operator(pb::CreateMerchantRequest {
                display_name: name.into(),
                settlement_currency: "EUR".into(),
                time_zone: "Europe/Paris".into(),
                idempotency_key: uuid::Uuid::new_v4().to_string(),
                identifier_captures: captures.iter().map(|tag| capture(tag)).collect(),
            }))
            .await
            .expect("create merchant")
            .into_inner();
        (response.merchant_id, response.api_key)
    }

    pub async fn partnership(
        &self,
        referrer: &str,
        acceptor: &str,
        rate_bps: u32,
        window_days: u32,
    ) -> String {
        self.partnership_since(referrer, acceptor, rate_bps, window_days, None)
            .await
    }

    /// A partnership the operator imports, in force since `effective_from` (default: now).
    pub async fn partnership_since(
        &self,
        referrer: &str,
        acceptor: &str,
        rate_bps: u32,
        window_days: u32,
        effective_from: Option<chrono::DateTime<chrono::Utc>>,
    ) -> String {
        self.operator()
            .await
            .create_partnership(as_operator(pb::CreatePartnershipRequest {
                referrer_merchant_id: referrer.into(),
                acceptor_merchant_id: acceptor.into(),
                commission_rate_bps: rate_bps,
                attribution_window_days: window_days,
                effective_from: effective_from.map(tandem_proto::time::timestamp),
                idempotency_key: uuid::Uuid::new_v4().to_string(),
                ..Default::default()
            }))
            .await
            .expect("create partnership")
            .into_inner()
            .partnership_id
    }

    /// Connects to the stack's database with `search_path` set to `schema`.
    pub async fn schema(&self, schema: &str) -> sqlx::PgPool {
        tandem_store::connect(&tandem_store::StoreConfig {
            database_url: self.database.url.clone(),
            schema: schema.into(),
            max_connections: 2,
        })
        .await
        .unwrap()
    }
}

pub async fn bind_again(address: SocketAddr) -> TcpListener {
    for _ in 0..50 {
        if let Ok(listener) = TcpListener::bind(address).await {
            return listener;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("could not bind {address} again");
}

async fn wait_until_serving(address: SocketAddr) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(address).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("service at {address} never accepted connections");
}

pub fn with_bearer<T>(message: T, secret: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    request
}

pub fn as_operator<T>(message: T) -> Request<T> {
    with_bearer(message, OPERATOR_TOKEN)
}

pub fn customer(card: &str, phone: &str, email: &str) -> pb::CustomerIdentifiers {
    pb::CustomerIdentifiers {
        card_fingerprint: card.into(),
        phone: phone.into(),
        email: email.into(),
        ..Default::default()
    }
}

/// `card:adyen`, `member:coalition`, `par`, `phone`, `email` as an `IdentifierCapture`.
pub fn capture(tag: &str) -> pb::IdentifierCapture {
    let (kind, scope) = tag.split_once(':').unwrap_or((tag, ""));
    let kind = match kind {
        "card" => pb::IdentifierKind::CardFingerprint,
        "par" => pb::IdentifierKind::PaymentAccountReference,
        "phone" => pb::IdentifierKind::Phone,
        "email" => pb::IdentifierKind::Email,
        "member" => pb::IdentifierKind::LoyaltyMember,
        other => panic!("unknown capture kind {other}"),
    };
    pb::IdentifierCapture {
        kind: kind as i32,
        scope: scope.into(),
    }
}

pub fn eur(amount_minor: i64) -> Option<pb::Money> {
    Some(pb::Money {
        amount_minor,
        currency: "EUR".into(),
    })
}

pub fn purchase(
    key: &str,
    transaction_id: &str,
    customer: pb::CustomerIdentifiers,
    amount_minor: i64,
) -> pb::RecordPurchaseRequest {
    pb::RecordPurchaseRequest {
        idempotency_key: key.into(),
        merchant_id: String::new(),
        transaction_id: transaction_id.into(),
        customer: Some(customer),
        amount: eur(amount_minor),
        purchased_at: None,
    }
}

pub fn referral(
    key: &str,
    acceptor: &str,
    customer: pb::CustomerIdentifiers,
) -> pb::CreateReferralRequest {
    pb::CreateReferralRequest {
        idempotency_key: key.into(),
        merchant_id: String::new(),
        acceptor_merchant_id: acceptor.into(),
        customer: Some(customer),
        referrer_reference: String::new(),
        referred_at: None,
    }
}

/// Every row of every table of `schemas`, as JSON text, for scanning.
pub async fn dump_tables(pool: &sqlx::PgPool, schemas: &[&str]) -> Vec<String> {
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema, table_name FROM information_schema.tables \
         WHERE table_schema = ANY($1) AND table_type = 'BASE TABLE'",
    )
    .bind(schemas.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    .fetch_all(pool)
    .await
    .unwrap();
    let mut rows = Vec::new();
    for (schema, table) in tables {
        rows.extend(dump_tables_named(pool, &schema, &[table.as_str()]).await);
    }
    rows
}

/// Every row of the named tables of `schema`, as JSON text, sorted: for comparing projections.
pub async fn dump_tables_named(pool: &sqlx::PgPool, schema: &str, tables: &[&str]) -> Vec<String> {
    let mut rows = Vec::new();
    for table in tables {
        let dumped: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT row_to_json(t)::text FROM {schema}.{table} t ORDER BY 1"
        ))
        .fetch_all(pool)
        .await
        .unwrap();
        rows.extend(
            dumped
                .into_iter()
                .map(|row| format!("{schema}.{table}: {row}")),
        );
    }
    rows
}

/// Asserts that none of `raw_values` (nor its hex form) is in any table of the stack's schemas or
/// in any message, key or header of any topic.
pub async fn assert_never_stored_or_published(stack: &Stack, raw_values: &[&str]) {
    let database = stack.schema("public").await;
    let rows = dump_tables(&database, &["gateway", "ledger", "public"]).await;
    assert!(
        rows.len() > 20,
        "the scan must see the data: {} rows",
        rows.len()
    );
    let mut messages: Vec<Vec<u8>> = Vec::new();
    for topic in tandem_bus::Topic::ALL {
        for message in tandem_testkit::read_topic(&stack.bus, topic) {
            messages.push(message.key);
            messages.push(message.payload);
            for (name, value) in message.headers {
                messages.push(name.into_bytes());
                messages.push(value);
            }
        }
    }
    assert!(messages.len() > 10, "the scan must see the topics");
    for raw in raw_values {
        let hex: String = raw.bytes().map(|b| format!("{b:02x}")).collect();
        for row in &rows {
            assert!(
                !row.contains(raw) && !row.contains(&hex),
                "raw identifier {raw:?} stored: {row}"
            );
        }
        for message in &messages {
            assert!(
                !message.windows(raw.len()).any(|w| w == raw.as_bytes()),
                "raw identifier {raw:?} published"
            );
        }
    }
}

/// Asserts that `result` was refused with `code` and a message mentioning `mentions`.
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    mentions: &str,
) {
    let status = result.expect_err("request should have been rejected");
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    assert!(
        status.message().contains(mentions),
        "message {:?} should mention {mentions:?}",
        status.message()
    );
}

/// Everything `key`'s merchant sees in ListReferralActivity, one item a page (so paging is
/// exercised too).
pub async fn activity(stack: &Stack, key: &str) -> Vec<pb::AttributedPurchase> {
    let mut pos = stack.pos().await;
    let mut purchases = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = pos
            .list_referral_activity(with_bearer(
                pb::ListReferralActivityRequest {
                    page_size: 1,
                    page_token,
                },
                key,
            ))
            .await
            .expect("list activity")
            .into_inner();
        purchases.extend(page.purchases);
        if page.next_page_token.is_empty() {
            return purchases;
        }
        page_token = page.next_page_token;
    }
}

/// Waits until `key`'s merchant sees at least `expected` attributed purchases.
pub async fn wait_for_activity(
    stack: &Stack,
    key: &str,
    expected: usize,
) -> Vec<pb::AttributedPurchase> {
    tandem_testkit::eventually(
        &format!("{expected} attributed purchases"),
        Duration::from_secs(60),
        || async {
            let purchases = activity(stack, key).await;
            (purchases.len() >= expected).then_some(purchases)
        },
    )
    .await
}

/// A webhook receiver on a local port (tandemctl's, verifying every signature) and an endpoint
/// of the merchant whose API key is `key`, registered through `channel` for `purchase.attributed`:
/// the registration's answer and the deliveries as they arrive.
pub async fn purchase_webhook(
    channel: Channel,
    key: &str,
    idempotency_key: &str,
) -> (
    pb::CreateWebhookEndpointResponse,
    tokio::sync::mpsc::Receiver<tandemctl::receiver::Received>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let created =
        tandem_proto::v1::notification_service_client::NotificationServiceClient::new(channel)
            .create_webhook_endpoint(with_bearer(
                pb::CreateWebhookEndpointRequest {
                    idempotency_key: idempotency_key.into(),
                    url,
                    types: vec!["purchase.attributed".into()],
                    ..Default::default()
                },
                key,
            ))
            .await
            .unwrap()
            .into_inner();
    let (sender, received) = tokio::sync::mpsc::channel(16);
    tokio::spawn(tandemctl::receiver::serve(
        listener,
        tandemctl::receiver::Secrets::One(
            notifications::webhook::SigningSecret::parse(&created.signing_secret).unwrap(),
        ),
        sender,
    ));
    (created, received)
}

/// Waits until the ledger whose schema `ledger_db` is has applied admin events up to
/// `sequence`.
pub async fn wait_admin_applied(ledger_db: &sqlx::PgPool, sequence: i64) {
    tandem_testkit::eventually(
        "the admin events applied",
        Duration::from_secs(30),
        || async {
            let applied: i64 = sqlx::query_scalar("SELECT applied_through FROM admin_progress")
                .fetch_one(ledger_db)
                .await
                .ok()?;
            (applied >= sequence).then_some(())
        },
    )
    .await;
}
