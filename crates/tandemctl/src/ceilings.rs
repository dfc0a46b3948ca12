//! The raw ceilings of the real parts on this machine, measured by the harness itself in the same
//! run as Tandem, so that every Tandem figure can be read as a fraction of what the parts allow:
//! - Kafka: produce (the relay's producer settings: idempotent, `acks=all`) and consume, of
//!   messages the size of Tandem's, over as many partitions as `customer-activity`;
//! - Postgres: durable inserts of rows like the ledger's, one row a transaction (as single calls
//!   commit) and in batches (as bulk calls and the ledger's stages commit);
//! - tonic: unary calls carrying a `RecordPurchaseRequest` into a server that does nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use prost::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use rdkafka::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use tandem_bus::BusConfig;
use tandem_proto::v1 as pb;

/// One measured rate.
#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    pub count: u64,
    pub seconds: f64,
    pub per_second: f64,
}

impl Rate {
    pub fn of(count: u64, elapsed: Duration) -> Self {
        let seconds = elapsed.as_secs_f64().max(1e-9);
        Self {
            count,
            seconds,
            per_second: count as f64 / seconds,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Ceilings {
    /// Bytes per Kafka message measured (an encoded purchase event with its headers' size).
    pub kafka_message_bytes: usize,
    pub kafka_partitions: i32,
    pub kafka_produce: Rate,
    pub kafka_consume: Rate,
    /// One durable transaction per row, `concurrency` connections.
    pub postgres_single_row_transactions: Rate,
    /// Rows per second inserted `postgres_batch_rows` a transaction.
    pub postgres_batched_rows: Rate,
    pub postgres_batch_rows: usize,
    pub tonic_unary_calls: Rate,
    pub concurrency: usize,
}

#[derive(Debug, Clone)]
pub struct CeilingSettings {
    pub kafka_messages: u64,
    pub kafka_partitions: i32,
    /// Rows inserted one a transaction; four times as many are inserted in batches.
    pub postgres_rows: u64,
    pub postgres_batch_rows: usize,
    pub tonic_calls: u64,
    pub concurrency: usize,
}

impl CeilingSettings {
    /// Long enough to be steady on this machine: tens of seconds in all.
    pub fn full(concurrency: usize) -> Self {
        Self {
            kafka_messages: 200_000,
            kafka_partitions: 12,
            postgres_rows: 20_000,
            postgres_batch_rows: 100,
            tonic_calls: 50_000,
            concurrency: concurrency.max(1),
        }
    }

    /// Seconds in all: every figure, none of them steady.
    pub fn short(concurrency: usize) -> Self {
        Self {
            kafka_messages: 5_000,
            kafka_partitions: 12,
            postgres_rows: 500,
            postgres_batch_rows: 100,
            tonic_calls: 2_000,
            concurrency: concurrency.max(1),
        }
    }
}

/// Every ceiling, one after the other (never two at once: they share the cores).
pub async fn measure(
    bus: &BusConfig,
    database_url: &str,
    settings: &CeilingSettings,
) -> Result<Ceilings, String> {
    let (kafka_message_bytes, kafka_produce, kafka_consume) =
        kafka(bus, settings.kafka_messages, settings.kafka_partitions).await?;
    let (postgres_single_row_transactions, postgres_batched_rows) = postgres(
        database_url,
        settings.postgres_rows,
        settings.postgres_batch_rows,
        settings.concurrency,
    )
    .await?;
    let tonic_unary_calls = tonic_calls(settings.tonic_calls, settings.concurrency).await?;
    Ok(Ceilings {
        kafka_message_bytes,
        kafka_partitions: settings.kafka_partitions,
        kafka_produce,
        kafka_consume,
        postgres_single_row_transactions,
        postgres_batched_rows,
        postgres_batch_rows: settings.postgres_batch_rows,
        tonic_unary_calls,
        concurrency: settings.concurrency,
    })
}

/// A purchase event of the size Tandem publishes: the gateway's envelope with two customer keys.
pub fn sample_event() -> Vec<u8> {
    let key = format!("ck1_phone_{}", "a".repeat(64));
    pb::EventEnvelope {
        event_id: uuid::Uuid::now_v7().to_string(),
        recorded_at: Some(tandem_proto::time::timestamp(chrono::Utc::now())),
        customer_key: key.clone(),
        admin_sequence: 12,
        payload: Some(pb::event_envelope::Payload::PurchaseRecorded(
            pb::PurchaseRecorded {
                purchase_id: format!("pur_{}", uuid::Uuid::now_v7().simple()),
                merchant_id: format!("mer_{}", uuid::Uuid::now_v7().simple()),
                transaction_id: "bench-0000000000".into(),
                customer_keys: vec![key.clone(), key.replace("phone", "email")],
                amount: Some(pb::Money {
                    amount_minor: 12_345,
                    currency: "EUR".into(),
                }),
                purchased_at: Some(tandem_proto::time::timestamp(chrono::Utc::now())),
            },
        )),
    }
    .encode_to_vec()
}

pub async fn kafka(
    bus: &BusConfig,
    messages: u64,
    partitions: i32,
) -> Result<(usize, Rate, Rate), String> {
    let topic = format!(
        "{}.bench-ceiling-{}",
        bus.topic_prefix,
        uuid::Uuid::new_v4().simple()
    );
    let admin: AdminClient<DefaultClientContext> = bus
        .client_config()
        .create()
        .map_err(|e| format!("kafka admin: {e}"))?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    admin
        .create_topics(
            &[NewTopic::new(
                &topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &options,
        )
        .await
        .map_err(|e| format!("create {topic}: {e}"))?;
    let payload = sample_event();
    let producer = tandem_bus::idempotent_producer(bus).map_err(|e| format!("producer: {e}"))?;
    // As the relay publishes: batches in flight together, each awaited as a whole.
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < messages {
        let batch = (messages - sent).min(2_000);
        let deliveries = (sent..sent + batch).map(|index| {
            let key = format!("ck1_phone_{index:064}");
            let producer = &producer;
            let payload = &payload;
            let topic = &topic;
            async move {
                producer
                    .send(
                        FutureRecord::to(topic).key(&key).payload(payload),
                        Duration::from_secs(30),
                    )
                    .await
                    .map(|_| ())
                    .map_err(|(error, _)| error.to_string())
            }
        });
        for delivered in join_all(deliveries).await {
            delivered?;
        }
        sent += batch;
    }
    let produce = Rate::of(messages, started.elapsed());

    // Assigned, not subscribed: no group join in the measured time.
    let consumer: StreamConsumer = bus
        .client_config()
        .set(
            "group.id",
            format!("bench-ceiling-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| format!("consumer: {e}"))?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment
            .add_partition_offset(&topic, partition, Offset::Beginning)
            .map_err(|e| e.to_string())?;
    }
    consumer
        .assign(&assignment)
        .map_err(|e| format!("assign: {e}"))?;
    let started = Instant::now();
    let mut received = 0u64;
    let deadline = started + Duration::from_secs(120);
    while received < messages {
        if Instant::now() > deadline {
            return Err(format!("consumed {received} of {messages} in 120 s"));
        }
        match tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await {
            Ok(Ok(message)) => {
                if message.payload().is_some() {
                    received += 1;
                }
            }
            Ok(Err(error)) => return Err(format!("consume: {error}")),
            Err(_) => {}
        }
    }
    let consume = Rate::of(messages, started.elapsed());
    let _ = admin.delete_topics(&[&topic], &options).await;
    Ok((payload.len(), produce, consume))
}

pub async fn postgres(
    database_url: &str,
    rows: u64,
    batch_rows: usize,
    concurrency: usize,
) -> Result<(Rate, Rate), String> {
    let schema = format!("bench_ceiling_{}", uuid::Uuid::new_v4().simple());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(u32::try_from(concurrency).unwrap_or(32))
        .connect(database_url)
        .await
        .map_err(|e| format!("postgres: {e}"))?;
    for statement in [
        format!("CREATE SCHEMA {schema}"),
        format!(
            "CREATE TABLE {schema}.lines (line_id TEXT PRIMARY KEY, partnership_id TEXT NOT NULL, \
             purchase_id TEXT NOT NULL, amount_minor BIGINT NOT NULL, commission_minor BIGINT NOT NULL, currency TEXT NOT NULL, \
             recorded_at TIMESTAMPTZ NOT NULL)"
        ),
    ] {
        sqlx::query(&statement)
            .execute(&pool)
            .await
            .map_err(|e| format!("create the ceiling table: {e}"))?;
    }
    let insert_one =
        format!("INSERT INTO {schema}.lines VALUES ($1, $2, $3, $4, $5, 'EUR', now())");
    let insert_many = format!(
        "INSERT INTO {schema}.lines SELECT l, p, q, a, c, 'EUR', now() \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[]) AS t(l, p, q, a, c)"
    );
    let row = |kind: &str, index: u64| {
        (
            format!("{kind}-{index:012}"),
            format!("prt_{:032}", index % 1_000),
            format!("pur_{index:032}"),
        )
    };
    // One durable transaction per row (what a single call commits).
    let started = Instant::now();
    let workers = (0..concurrency as u64).map(|worker| {
        let pool = pool.clone();
        let sql = insert_one.clone();
        async move {
            let mut index = worker;
            while index < rows {
                let (line, partnership, purchase) = row("single", index);
                let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
                sqlx::query(&sql)
                    .bind(line)
                    .bind(partnership)
                    .bind(purchase)
                    .bind(10_000i64)
                    .bind(500i64)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| e.to_string())?;
                tx.commit().await.map_err(|e| e.to_string())?;
                index += concurrency as u64;
            }
            Ok::<_, String>(())
        }
    });
    for done in join_all(workers).await {
        done.map_err(|e| format!("single-row inserts: {e}"))?;
    }
    let single = Rate::of(rows, started.elapsed());
    // Batches of `batch_rows` rows a transaction (what a bulk call or a ledger batch commits).
    let batched_total = rows * 4;
    let started = Instant::now();
    let workers = (0..concurrency as u64).map(|worker| {
        let pool = pool.clone();
        let sql = insert_many.clone();
        async move {
            let mut batch = worker;
            let batches = batched_total.div_ceil(batch_rows as u64);
            while batch < batches {
                let first = batch * batch_rows as u64;
                let last = (first + batch_rows as u64).min(batched_total);
                let (mut lines, mut partnerships, mut purchases) = (vec![], vec![], vec![]);
                for index in first..last {
                    let (line, partnership, purchase) = row("batched", index);
                    lines.push(line);
                    partnerships.push(partnership);
                    purchases.push(purchase);
                }
                let amounts = vec![10_000i64; lines.len()];
                let commissions = vec![500i64; lines.len()];
                sqlx::query(&sql)
                    .bind(&lines)
                    .bind(&partnerships)
                    .bind(&purchases)
                    .bind(&amounts)
                    .bind(&commissions)
                    .execute(&pool)
                    .await
                    .map_err(|e| e.to_string())?;
                batch += concurrency as u64;
            }
            Ok::<_, String>(())
        }
    });
    for done in join_all(workers).await {
        done.map_err(|e| format!("batched inserts: {e}"))?;
    }
    let batched = Rate::of(batched_total, started.elapsed());
    let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await;
    pool.close().await;
    Ok((single, batched))
}

/// A `MerchantGateway` that does nothing: what tonic and HTTP/2 alone cost a call.
struct Sink;

fn nothing<T>() -> Result<tonic::Response<T>, tonic::Status> {
    Err(tonic::Status::unimplemented(
        "the bench's no-op server answers RecordPurchase only",
    ))
}

#[tonic::async_trait]
impl pb::merchant_gateway_server::MerchantGateway for Sink {
    async fn record_purchase(
        &self,
        request: tonic::Request<pb::RecordPurchaseRequest>,
    ) -> Result<tonic::Response<pb::RecordPurchaseResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::RecordPurchaseResponse {
            purchase_id: request.into_inner().transaction_id,
            purchased_at: None,
        }))
    }
    async fn create_referral(
        &self,
        _: tonic::Request<pb::CreateReferralRequest>,
    ) -> Result<tonic::Response<pb::CreateReferralResponse>, tonic::Status> {
        nothing()
    }
    async fn record_refund(
        &self,
        _: tonic::Request<pb::RecordRefundRequest>,
    ) -> Result<tonic::Response<pb::RecordRefundResponse>, tonic::Status> {
        nothing()
    }
    async fn record_purchases(
        &self,
        _: tonic::Request<pb::RecordPurchasesRequest>,
    ) -> Result<tonic::Response<pb::RecordPurchasesResponse>, tonic::Status> {
        nothing()
    }
    async fn record_refunds(
        &self,
        _: tonic::Request<pb::RecordRefundsRequest>,
    ) -> Result<tonic::Response<pb::RecordRefundsResponse>, tonic::Status> {
        nothing()
    }
    async fn cancel_referral(
        &self,
        _: tonic::Request<pb::CancelReferralRequest>,
    ) -> Result<tonic::Response<pb::CancelReferralResponse>, tonic::Status> {
        nothing()
    }
    async fn list_referral_activity(
        &self,
        _: tonic::Request<pb::ListReferralActivityRequest>,
    ) -> Result<tonic::Response<pb::ListReferralActivityResponse>, tonic::Status> {
        nothing()
    }
    async fn list_referrals(
        &self,
        _: tonic::Request<pb::ListReferralsRequest>,
    ) -> Result<tonic::Response<pb::ListReferralsResponse>, tonic::Status> {
        nothing()
    }
    async fn list_commissions(
        &self,
        _: tonic::Request<pb::ListCommissionsRequest>,
    ) -> Result<tonic::Response<pb::ListCommissionsResponse>, tonic::Status> {
        nothing()
    }
    async fn get_commission_totals(
        &self,
        _: tonic::Request<pb::GetCommissionTotalsRequest>,
    ) -> Result<tonic::Response<pb::GetCommissionTotalsResponse>, tonic::Status> {
        nothing()
    }
    async fn explain_commission(
        &self,
        _: tonic::Request<pb::ExplainCommissionRequest>,
    ) -> Result<tonic::Response<pb::ExplainCommissionResponse>, tonic::Status> {
        nothing()
    }
    async fn get_balances(
        &self,
        _: tonic::Request<pb::GetBalancesRequest>,
    ) -> Result<tonic::Response<pb::GetBalancesResponse>, tonic::Status> {
        nothing()
    }
    async fn declare_identifier_capture(
        &self,
        _: tonic::Request<pb::DeclareIdentifierCaptureRequest>,
    ) -> Result<tonic::Response<pb::IdentifierCaptureDeclaration>, tonic::Status> {
        nothing()
    }
    async fn get_identifier_capture(
        &self,
        _: tonic::Request<pb::GetIdentifierCaptureRequest>,
    ) -> Result<tonic::Response<pb::IdentifierCaptureDeclaration>, tonic::Status> {
        nothing()
    }
}

/// Unary calls with the bench's purchase requests into the no-op server, `concurrency` in flight
/// over one HTTP/2 connection, as the bench's clients call the gateway.
pub async fn tonic_calls(calls: u64, concurrency: usize) -> Result<Rate, String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("bind: {e}"))?;
    let address: SocketAddr = listener.local_addr().map_err(|e| e.to_string())?;
    let shutdown = Arc::new(tokio::sync::Notify::new());
    let stop = shutdown.clone();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(pb::merchant_gateway_server::MerchantGatewayServer::new(
                Sink,
            ))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.notified(),
            )
            .await
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect to the no-op server: {e}"))?;
    let client = pb::merchant_gateway_client::MerchantGatewayClient::new(channel);
    let started = Instant::now();
    let workers = (0..concurrency as u64).map(|worker| {
        let mut client = client.clone();
        async move {
            let mut index = worker;
            while index < calls {
                let request =
                    crate::network::purchase_request("ceiling", index as usize, index as usize);
                client
                    .record_purchase(crate::client::authorised(request, "tdm_bench")?)
                    .await
                    .map_err(|status| status.to_string())?;
                index += concurrency as u64;
            }
            Ok::<_, String>(())
        }
    });
    for done in join_all(workers).await {
        done?;
    }
    let rate = Rate::of(calls, started.elapsed());
    shutdown.notify_one();
    let _ = server.await;
    Ok(rate)
}
