//! The fault suite: the whole stack as processes (gateway, ledger, settlement, notifications) on
//! a three-broker Kafka cluster, with Postgres behind a proxy, while POS clients record
//! referrals, purchases and refunds and retry every failure with the same idempotency key. Faults
//! are injected while they run: SIGKILL of each service (restarted at once, as a supervisor
//! would), one broker killed and restarted, the whole cluster restarted, Postgres restarted
//! (every connection dropped, refused for a while). Afterwards:
//!
//! - every acknowledged purchase has exactly one commission line and one accrual entry, every
//!   acknowledged refund is reversed exactly once, nothing unacknowledged is there, and the ledger
//!   sums to zero;
//! - the referrer's webhook receiver got every `purchase.attributed` at least once, and its
//!   deduplicated set (by `webhook-id`) is exactly one event per purchase;
//! - every topic, read from the start in a fresh consumer group, holds each attributed purchase's
//!   ledger event (copies share one message id);
//! - a second settlement service replaying the topics from the start into a fresh schema and
//!   fresh consumer groups issues the same statements, byte for byte (the `issued_at` column
//!   aside: it is the instant of the close).
//!
//! The short form (CI) injects each fault once. The long form, on demand:
//! `TANDEM_CHAOS_FAULTS=40 cargo nextest run -p tandem-e2e --test chaos --no-capture`
//! (at least 20 of them service kills). It prints the recovery time after each fault.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use support::process::{free_address, wait_serving, PrivateKafka, ServiceProcess};
use support::proxy::TcpProxy;
use support::*;
use tandem_domain::settlement::{Cycle, CycleKind};
use tandem_proto::v1 as pb;
use tandem_proto::v1::merchant_gateway_client::MerchantGatewayClient;
use tandem_proto::v1::operator_service_client::OperatorServiceClient;
use tandem_proto::v1::settlement_client::SettlementClient;
use tonic::transport::Channel;
use tonic::Code;

/// Customers referred before the faults start, per acceptor.
const REFERRED_AT_START: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Service {
    Gateway,
    Ledger,
    Settlement,
    Notifications,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill(Service),
    /// SIGKILL of one broker of the three, restarted two seconds later.
    KillBroker(u16),
    /// A controlled stop of the whole cluster, then a start.
    RestartBrokers,
    /// Every Postgres connection dropped and new ones refused for two seconds.
    RestartPostgres,
}

/// Faults in the short form (CI's): each kind once.
const SHORT_FORM: usize = 7;

/// The faults of one run: each kind once (the short form), then, up to `count`, random ones,
/// three in four a service kill.
fn schedule(count: usize, seed: &mut u64) -> Vec<Fault> {
    let mut faults = vec![
        Fault::Kill(Service::Ledger),
        Fault::Kill(Service::Gateway),
        Fault::KillBroker(2),
        Fault::Kill(Service::Notifications),
        Fault::RestartPostgres,
        Fault::Kill(Service::Settlement),
        Fault::RestartBrokers,
    ];
    let services = [
        Service::Gateway,
        Service::Ledger,
        Service::Settlement,
        Service::Notifications,
    ];
    while faults.len() < count {
        let roll = next(seed);
        faults.push(match roll % 8 {
            0 => Fault::KillBroker(1 + (roll >> 8) as u16 % 3),
            1 => Fault::RestartPostgres,
            _ => Fault::Kill(services[(roll >> 8) as usize % services.len()]),
        });
    }
    faults
}

fn next(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 16
}

/// Yesterday in Paris, as a daily cycle: ended, so it closes. Every referral, purchase and
/// refund of the run is dated in it.
fn yesterday() -> Cycle {
    Cycle::containing(
        CycleKind::Daily,
        "Europe/Paris".parse().unwrap(),
        Utc::now() - chrono::Duration::days(1),
    )
}

fn at(hours: i64, seconds: i64) -> Option<prost_types::Timestamp> {
    let instant: DateTime<Utc> =
        yesterday().start + chrono::Duration::hours(hours) + chrono::Duration::seconds(seconds);
    Some(tandem_proto::time::timestamp(instant))
}

fn who(customer: usize) -> pb::CustomerIdentifiers {
    support::customer("", &format!("+3370{customer:07}"), "")
}

/// Codes a client caused: retrying would not help, and the run fails.
fn definitive(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unimplemented
    )
}

/// What the POS clients saw: acknowledged writes, when each came, and every failure by code.
#[derive(Default)]
struct Seen {
    /// transaction id -> (purchase id, acceptor, amount)
    purchases: BTreeMap<String, (String, String, i64)>,
    /// transaction id -> refunded amount
    refunds: BTreeMap<String, i64>,
    /// (customer, acceptor) of every acknowledged referral
    referred: Vec<(usize, String)>,
    acknowledged_at: Vec<Instant>,
    /// purchase id -> when the till got its acknowledgement
    purchased_at: BTreeMap<String, Instant>,
    failures: BTreeMap<String, u64>,
}

type Shared = Arc<Mutex<Seen>>;

/// Calls `call` until it succeeds; a definitive error panics, any other is counted and retried
/// (with the same request, so the same idempotency key).
async fn until_done<T, F, Fut>(seen: &Shared, what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    loop {
        match call().await {
            Ok(answer) => {
                seen.lock().unwrap().acknowledged_at.push(Instant::now());
                return answer.into_inner();
            }
            Err(status) if definitive(status.code()) => panic!("{what}: {status:?}"),
            Err(status) => {
                *seen
                    .lock()
                    .unwrap()
                    .failures
                    .entry(format!("{:?}", status.code()))
                    .or_default() += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn pos_client(gateway: SocketAddr) -> MerchantGatewayClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{gateway}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(15))
        .connect_lazy();
    MerchantGatewayClient::new(channel)
}

struct Merchant {
    id: String,
    key: String,
}

async fn create_merchant(channel: &Channel, name: &str) -> Merchant {
    let created = OperatorServiceClient::new(channel.clone())
        .create_merchant(as_operator(pb::CreateMerchantRequest {
            display_name: name.into(),
            settlement_currency: "EUR".into(),
            time_zone: "Europe/Paris".into(),
            idempotency_key: uuid::Uuid::new_v4().to_string(),
            identifier_captures: ["phone"].iter().map(|tag| capture(tag)).collect(),
        }))
        .await
        .unwrap()
        .into_inner();
    Merchant {
        id: created.merchant_id,
        key: created.api_key,
    }
}

async fn daily_partnership(channel: &Channel, referrer: &str, acceptor: &str) {
    OperatorServiceClient::new(channel.clone())
        .create_partnership(as_operator(pb::CreatePartnershipRequest {
            referrer_merchant_id: referrer.into(),
            acceptor_merchant_id: acceptor.into(),
            commission_rate_bps: 500,
            attribution_window_days: 30,
            effective_from: Some(tandem_proto::time::timestamp(
                Utc::now() - chrono::Duration::days(3),
            )),
            settlement_cycle: pb::SettlementCycle::Daily as i32,
            minimum_payout_minor: 0,
            idempotency_key: uuid::Uuid::new_v4().to_string(),
        }))
        .await
        .unwrap();
}

/// The referrer's referral of `customer` to `acceptor`, retried until acknowledged.
async fn refer(
    pos: &MerchantGatewayClient<Channel>,
    seen: &Shared,
    referrer_key: &str,
    customer: usize,
    acceptor: &str,
) {
    let mut request = referral(&format!("ref-{customer}"), acceptor, who(customer));
    request.referred_at = at(1, customer as i64);
    until_done(seen, "create referral", || {
        let (mut pos, request) = (pos.clone(), with_bearer(request.clone(), referrer_key));
        async move { pos.create_referral(request).await }
    })
    .await;
    seen.lock()
        .unwrap()
        .referred
        .push((customer, acceptor.to_owned()));
}

/// The service processes, restarted at once after a kill (as Compose or Kubernetes would).
struct Processes {
    all: BTreeMap<Service, ServiceProcess>,
}

impl Processes {
    fn addresses(&self) -> Vec<SocketAddr> {
        self.all.values().map(|process| process.address).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_kills_and_restarts_everything_acknowledged_counts_once_and_statements_match_a_replay(
) {
    let faults_wanted: usize = std::env::var("TANDEM_CHAOS_FAULTS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(SHORT_FORM);
    // TANDEM_CHAOS_SEED=<the seed a run printed> replays its fault schedule.
    let mut seed: u64 = std::env::var("TANDEM_CHAOS_SEED")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| uuid::Uuid::new_v4().as_u128() as u64);
    eprintln!("chaos seed {seed} (TANDEM_CHAOS_SEED to replay the schedule)");
    let faults = schedule(faults_wanted, &mut seed);

    let kafka = PrivateKafka::cluster(3);
    let bus = tandem_testkit::test_bus_replicated(&kafka.brokers(), 6, 3, 2).await;
    let mut stack = Stack::start_on(false, bus).await;
    if let Some(gateway) = stack.gateway.take() {
        gateway.stop().await;
    }
    // The services reach Postgres through a proxy the test can take away.
    let database = support::proxy::url_parts(&stack.database.url);
    let postgres = TcpProxy::new(free_address(), database.1);
    postgres.start().await;
    let through_proxy = stack
        .database
        .url
        .replace(&database.0, &postgres.address.to_string());
    let common = |extra: &[(&'static str, String)]| {
        let mut settings = vec![
            ("DATABASE_URL", through_proxy.clone()),
            ("TANDEM_CONSUMER_SESSION_TIMEOUT_MS", "6000".to_owned()),
        ];
        settings.extend(extra.iter().cloned());
        settings
    };
    let settlement_address = stack.release_settlement_port();
    let notifications_address = stack.release_notifications_port();
    let gateway_address = free_address();
    let mut processes = Processes {
        all: BTreeMap::new(),
    };
    processes.all.insert(
        Service::Ledger,
        ServiceProcess::start(&stack, "referral-ledger", &common(&[])),
    );
    processes.all.insert(
        Service::Settlement,
        ServiceProcess::start_settlement(
            &stack,
            settlement_address,
            // Only the test closes the cycle.
            &common(&[("TANDEM_SETTLEMENT_CLOSE_GRACE_SECS", "86400".to_owned())]),
        ),
    );
    processes.all.insert(
        Service::Notifications,
        ServiceProcess::start_notifications(
            &stack,
            notifications_address,
            &common(&[("TANDEM_WEBHOOK_RETRY_SCHEDULE", "1s,2s,5s,10s".to_owned())]),
        ),
    );
    processes.all.insert(
        Service::Gateway,
        ServiceProcess::start_gateway(&stack, gateway_address, &common(&[])),
    );
    for address in processes.addresses() {
        wait_serving(address, Duration::from_secs(90)).await;
    }

    // C refers customers to A and B; a webhook receiver listens for C.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{gateway_address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let a = create_merchant(&channel, "Atelier A").await;
    let b = create_merchant(&channel, "Boulangerie B").await;
    let c = create_merchant(&channel, "Cafe C").await;
    daily_partnership(&channel, &c.id, &a.id).await;
    daily_partnership(&channel, &c.id, &b.id).await;
    let (_, mut hooks) = purchase_webhook(channel.clone(), &c.key, "chaos-hook").await;
    // (webhook id, purchase id, when it arrived)
    let delivered: Arc<Mutex<Vec<(String, String, Instant)>>> = Arc::default();
    let collector = tokio::spawn({
        let delivered = delivered.clone();
        async move {
            while let Some(received) = hooks.recv().await {
                assert!(received.verified.is_ok(), "{:?}", received.verified);
                let body: serde_json::Value = serde_json::from_slice(&received.body).unwrap();
                let purchase = body["data"]["purchase_id"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                delivered
                    .lock()
                    .unwrap()
                    .push((received.id, purchase, Instant::now()));
            }
        }
    });
    let seen: Shared = Arc::default();
    let pos = pos_client(gateway_address);
    // Admin events reach the ledger asynchronously: the first referral waits for them.
    tandem_testkit::eventually(
        "the partnerships known to the ledger",
        Duration::from_secs(60),
        || {
            let mut pos = pos.clone();
            let mut request = referral("ref-0", &a.id, who(0));
            request.referred_at = at(1, 0);
            let key = c.key.clone();
            async move { pos.create_referral(with_bearer(request, &key)).await.ok() }
        },
    )
    .await;
    seen.lock().unwrap().referred.push((0, a.id.clone()));
    for customer in 1..2 * REFERRED_AT_START {
        let acceptor = if customer.is_multiple_of(2) {
            &a.id
        } else {
            &b.id
        };
        refer(&pos, &seen, &c.key, customer, acceptor).await;
    }

    // The load: two tills buying at A and B, one refunding, one referring new customers.
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for (till, acceptor) in [(0usize, &a), (1, &b)] {
        let (stop, seen, acceptor_id, key) = (
            stop.clone(),
            seen.clone(),
            acceptor.id.clone(),
            acceptor.key.clone(),
        );
        let pos = pos_client(gateway_address);
        workers.push(tokio::spawn(async move {
            let mut index = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let customers: Vec<usize> = seen
                    .lock()
                    .unwrap()
                    .referred
                    .iter()
                    .filter(|(_, at)| *at == acceptor_id)
                    .map(|(customer, _)| *customer)
                    .collect();
                let customer = customers[index % customers.len()];
                let transaction_id = format!("T{till}-{index}");
                let amount = 1_000 + (index as i64 % 40) * 25;
                let mut request = purchase(
                    &format!("buy-{transaction_id}"),
                    &transaction_id,
                    who(customer),
                    amount,
                );
                request.purchased_at = at(12, index as i64);
                let answer = until_done(&seen, "record purchase", || {
                    let (mut pos, request) = (pos.clone(), with_bearer(request.clone(), &key));
                    async move { pos.record_purchase(request).await }
                })
                .await;
                {
                    let mut seen = seen.lock().unwrap();
                    seen.purchased_at
                        .insert(answer.purchase_id.clone(), Instant::now());
                    seen.purchases.insert(
                        transaction_id,
                        (answer.purchase_id, acceptor_id.clone(), amount),
                    );
                }
                index += 1;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        }));
    }
    {
        let (stop, seen) = (stop.clone(), seen.clone());
        let keys: BTreeMap<String, String> =
            [(a.id.clone(), a.key.clone()), (b.id.clone(), b.key.clone())].into();
        let pos = pos_client(gateway_address);
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // Every third purchase gets a quarter refunded.
                let next = {
                    let seen = seen.lock().unwrap();
                    seen.purchases
                        .iter()
                        .enumerate()
                        .filter(|(n, (tx, _))| {
                            n.is_multiple_of(3) && !seen.refunds.contains_key(*tx)
                        })
                        .map(|(_, (tx, (_, acceptor, amount)))| {
                            (tx.clone(), acceptor.clone(), *amount)
                        })
                        .next()
                };
                let Some((transaction_id, acceptor, amount)) = next else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let request = pb::RecordRefundRequest {
                    idempotency_key: format!("refund-{transaction_id}"),
                    transaction_id: transaction_id.clone(),
                    amount: eur(amount / 4),
                    refunded_at: at(18, 0),
                    ..Default::default()
                };
                until_done(&seen, "record refund", || {
                    let (mut pos, request) =
                        (pos.clone(), with_bearer(request.clone(), &keys[&acceptor]));
                    async move { pos.record_refund(request).await }
                })
                .await;
                seen.lock()
                    .unwrap()
                    .refunds
                    .insert(transaction_id, amount / 4);
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }));
    }
    {
        let (stop, seen) = (stop.clone(), seen.clone());
        let (a_id, b_id, c_key) = (a.id.clone(), b.id.clone(), c.key.clone());
        let pos = pos_client(gateway_address);
        workers.push(tokio::spawn(async move {
            let mut customer = 2 * REFERRED_AT_START;
            while !stop.load(Ordering::Relaxed) {
                let acceptor = if customer.is_multiple_of(2) {
                    &a_id
                } else {
                    &b_id
                };
                refer(&pos, &seen, &c_key, customer, acceptor).await;
                customer += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }

    // The faults, each at a random moment, each followed by the restart.
    let mut recoveries: Vec<(String, Duration, Duration)> = Vec::new();
    for fault in &faults {
        tokio::time::sleep(Duration::from_millis(1_000 + next(&mut seed) % 2_500)).await;
        let injected = Instant::now();
        match *fault {
            Fault::Kill(service) => {
                let process = processes.all.get_mut(&service).unwrap();
                process.kill();
                process.restart();
                let address = process.address;
                wait_serving(address, Duration::from_secs(120)).await;
            }
            Fault::KillBroker(node) => {
                kafka.kill(node);
                tokio::time::sleep(Duration::from_secs(2)).await;
                tokio::task::block_in_place(|| kafka.start_again());
            }
            Fault::RestartBrokers => {
                tokio::task::block_in_place(|| {
                    kafka.stop();
                    kafka.start_again();
                });
            }
            Fault::RestartPostgres => {
                postgres.stop();
                tokio::time::sleep(Duration::from_secs(2)).await;
                postgres.start().await;
            }
        }
        // Back: the service reports SERVING again, the brokers answer, the proxy listens.
        let serving = injected.elapsed();
        // Recovery, as a till sees it: from the fault to the next acknowledged call after the
        // restart.
        let acknowledged = tandem_testkit::eventually(
            "a call acknowledged after the fault",
            Duration::from_secs(120),
            || {
                let seen = seen.clone();
                async move {
                    let seen = seen.lock().unwrap();
                    let last = *seen.acknowledged_at.last()?;
                    (last > injected + serving).then_some(last)
                }
            },
        )
        .await;
        let recovery = acknowledged.duration_since(injected);
        // Recovery, as the referrer sees it: from the fault to the first webhook, once the part
        // is back, for a purchase acknowledged after the fault. The gateway acknowledges into its
        // outbox while the brokers are down; this is when the whole pipeline moves again.
        let flowing = tandem_testkit::eventually(
            "a webhook for a purchase acknowledged after the fault",
            Duration::from_secs(180),
            || {
                let (seen, delivered) = (seen.clone(), delivered.clone());
                async move {
                    let seen = seen.lock().unwrap();
                    let delivered = delivered.lock().unwrap();
                    delivered
                        .iter()
                        .find(|(_, purchase, arrived)| {
                            *arrived > injected + serving
                                && seen
                                    .purchased_at
                                    .get(purchase)
                                    .is_some_and(|at| *at > injected)
                        })
                        .map(|(_, _, arrived)| *arrived)
                }
            },
        )
        .await
        .duration_since(injected);
        let during = seen
            .lock()
            .unwrap()
            .acknowledged_at
            .iter()
            .filter(|at| **at > injected && **at < injected + serving)
            .count();
        eprintln!(
            "fault {fault:?}: back in {serving:?} ({during} calls acknowledged meanwhile), first \
             acknowledgement {recovery:?} after it, first webhook for a later purchase {flowing:?} \
             after it"
        );
        recoveries.push((format!("{fault:?}"), serving, recovery.max(flowing)));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let stopped = Instant::now();
    let seen = Arc::try_unwrap(seen).ok().unwrap().into_inner().unwrap();
    let purchase_ids: BTreeSet<String> = seen
        .purchases
        .values()
        .map(|(id, _, _)| id.clone())
        .collect();
    assert_eq!(
        purchase_ids.len(),
        seen.purchases.len(),
        "two transactions got one purchase id"
    );
    let expected_refunded: BTreeMap<String, i64> = seen
        .refunds
        .iter()
        .map(|(tx, amount)| (seen.purchases[tx].0.clone(), *amount))
        .collect();

    // Everything drains: each purchase attributed, each refund reversed, each webhook sent.
    let ledger = stack.schema("ledger").await;
    let drained = tandem_testkit::eventually(
        "every acknowledged purchase and refund in the ledger, every webhook delivered",
        Duration::from_secs(240),
        || {
            let (ledger, delivered) = (ledger.clone(), delivered.clone());
            let (wanted, refunds) = (purchase_ids.len() as i64, seen.refunds.len() as i64);
            async move {
                let commissions: i64 = sqlx::query_scalar("SELECT count(*) FROM commissions")
                    .fetch_one(&ledger)
                    .await
                    .ok()?;
                let refunded: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM commissions WHERE refunded_minor > 0")
                        .fetch_one(&ledger)
                        .await
                        .ok()?;
                let hooks: BTreeSet<String> = delivered
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(_, purchase, _)| purchase.clone())
                    .collect();
                (commissions >= wanted && refunded >= refunds && hooks.len() as i64 >= wanted)
                    .then(Instant::now)
            }
        },
    )
    .await;
    eprintln!(
        "drained {:?} after the tills stopped",
        drained.duration_since(stopped)
    );

    // Exactly once in the ledger.
    let commissioned: Vec<(String, i64)> =
        sqlx::query_as("SELECT purchase_id, refunded_minor FROM commissions ORDER BY 1")
            .fetch_all(&ledger)
            .await
            .unwrap();
    assert_eq!(
        commissioned
            .iter()
            .map(|(id, _)| id.clone())
            .collect::<BTreeSet<_>>(),
        purchase_ids,
        "commission lines are not exactly the acknowledged purchases"
    );
    let refunded: BTreeMap<String, i64> = commissioned
        .into_iter()
        .filter(|(_, refunded)| *refunded > 0)
        .collect();
    assert_eq!(
        refunded, expected_refunded,
        "refunds are not exactly the acknowledged ones"
    );
    let entries: Vec<(String, i64)> =
        sqlx::query_as("SELECT kind, count(*) FROM ledger_entries GROUP BY kind ORDER BY kind")
            .fetch_all(&ledger)
            .await
            .unwrap();
    let entries: BTreeMap<String, i64> = entries.into_iter().collect();
    assert_eq!(
        entries.get("commission_accrual").copied().unwrap_or(0),
        purchase_ids.len() as i64,
        "one accrual per purchase: {entries:?}"
    );
    assert_eq!(
        entries.get("commission_reversal").copied().unwrap_or(0),
        seen.refunds.len() as i64,
        "one reversal per refund: {entries:?}"
    );
    let sums: Vec<(String, i64)> = sqlx::query_as(
        "SELECT currency, sum(amount_minor)::bigint FROM ledger_postings GROUP BY currency",
    )
    .fetch_all(&ledger)
    .await
    .unwrap();
    for (currency, sum) in &sums {
        assert_eq!(*sum, 0, "the ledger does not balance in {currency}");
    }
    let rejected: i64 = sqlx::query_scalar("SELECT count(*) FROM rejected_messages")
        .fetch_one(&ledger)
        .await
        .unwrap();
    assert_eq!(rejected, 0, "messages were rejected");
    ledger.close().await;

    // Webhooks: at least once each, exactly one event per purchase once deduplicated.
    let deliveries = delivered.lock().unwrap().clone();
    let by_event: BTreeMap<String, BTreeSet<String>> =
        deliveries
            .iter()
            .fold(BTreeMap::new(), |mut events, (id, purchase, _)| {
                events
                    .entry(id.clone())
                    .or_default()
                    .insert(purchase.clone());
                events
            });
    assert!(
        by_event.values().all(|purchases| purchases.len() == 1),
        "one webhook id carried two purchases"
    );
    let per_purchase: BTreeMap<&String, usize> =
        by_event
            .values()
            .flatten()
            .fold(BTreeMap::new(), |mut counts, purchase| {
                *counts.entry(purchase).or_default() += 1;
                counts
            });
    assert_eq!(
        per_purchase
            .keys()
            .cloned()
            .cloned()
            .collect::<BTreeSet<_>>(),
        purchase_ids,
        "the deduplicated webhooks are not exactly the purchases"
    );
    assert!(
        per_purchase.values().all(|events| *events == 1),
        "a purchase was announced under two webhook ids"
    );

    // Every topic from the start, in fresh groups: each purchase's commission was decided once
    // (copies of a message share its event id).
    let (topic_sizes, accrued) = tokio::task::block_in_place(|| replay_topics(&stack));
    assert_eq!(
        accrued.keys().cloned().collect::<BTreeSet<_>>(),
        purchase_ids,
        "the ledger topic's accruals are not exactly the purchases"
    );
    assert!(
        accrued.values().all(|ids| ids.len() == 1),
        "a purchase's commission was decided twice"
    );
    eprintln!("topics replayed from the start: {topic_sizes:?}");

    // Statements: the faulted settlement and a clean replay close the same cycle alike.
    let cycle = yesterday().key();
    let replay_address = free_address();
    let mut replay = ServiceProcess::start_settlement(
        &stack,
        replay_address,
        &[
            ("TANDEM_SETTLEMENT_SCHEMA", "settlement_replay".to_owned()),
            (
                "TANDEM_SETTLEMENT_CONSUMER_GROUP",
                format!("{}-settlement-replay", stack.bus.topic_prefix),
            ),
            ("TANDEM_SETTLEMENT_CLOSE_GRACE_SECS", "86400".to_owned()),
        ],
    );
    wait_serving(replay_address, Duration::from_secs(90)).await;
    let lines_wanted = count_lines(&stack, "settlement").await;
    tandem_testkit::eventually(
        "the replay to receive every line",
        Duration::from_secs(120),
        || async {
            let got = count_lines(&stack, "settlement_replay").await;
            (got >= lines_wanted).then_some(())
        },
    )
    .await;
    let live = statements_after_close(settlement_address, &cycle, [&a, &b, &c]).await;
    let replayed = statements_after_close(replay_address, &cycle, [&a, &b, &c]).await;
    assert_eq!(live.len(), 3, "one statement per merchant");
    assert_eq!(
        live, replayed,
        "the statements differ from those of a clean replay"
    );

    eprintln!(
        "chaos: {} faults ({} service kills), {} purchases, {} refunds, {} referrals acknowledged; 0 lost, 0 doubled; \
         {} webhook deliveries for {} events; retried failures by code: {:?}",
        faults.len(),
        faults
            .iter()
            .filter(|f| matches!(f, Fault::Kill(_)))
            .count(),
        seen.purchases.len(),
        seen.refunds.len(),
        seen.referred.len(),
        deliveries.len(),
        by_event.len(),
        seen.failures
    );
    let worst = recoveries.iter().map(|r| r.2).max().unwrap_or_default();
    eprintln!("chaos: slowest recovery {worst:?}");

    replay.terminate();
    for (_, mut process) in std::mem::take(&mut processes.all) {
        process.kill();
    }
    collector.abort();
    postgres.stop();
    stack.stop().await;
}

/// How many statement lines a settlement schema holds (0 before it exists).
async fn count_lines(stack: &Stack, schema: &str) -> i64 {
    let pool = stack.schema(schema).await;
    let count = sqlx::query_scalar("SELECT count(*) FROM lines")
        .fetch_one(&pool)
        .await
        .unwrap_or(0);
    pool.close().await;
    count
}

/// Closes `cycle` on the settlement service at `address` and returns each merchant's statement
/// of it as its canonical CSV, with `issued_at` (the close's own instant) blanked.
async fn statements_after_close(
    address: SocketAddr,
    cycle: &str,
    merchants: [&Merchant; 3],
) -> BTreeMap<String, String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut settlement = SettlementClient::new(channel);
    settlement
        .close_cycle(with_bearer(
            pb::CloseCycleRequest {
                cycle: cycle.to_owned(),
            },
            SERVICE_TOKEN,
        ))
        .await
        .unwrap();
    let mut statements = BTreeMap::new();
    for (name, merchant) in ["A", "B", "C"].into_iter().zip(merchants) {
        let listed = settlement
            .list_statements(with_bearer(
                pb::ListStatementsRequest {
                    merchant_id: merchant.id.clone(),
                    ..Default::default()
                },
                SERVICE_TOKEN,
            ))
            .await
            .unwrap()
            .into_inner()
            .statements;
        for statement in listed {
            let export = settlement
                .export_statement(with_bearer(
                    pb::ExportStatementRequest {
                        merchant_id: merchant.id.clone(),
                        number: statement.number,
                        format: pb::ExportFormat::Csv as i32,
                    },
                    SERVICE_TOKEN,
                ))
                .await
                .unwrap()
                .into_inner();
            let csv = String::from_utf8(export.content).unwrap();
            statements.insert(
                format!("{name} #{}", statement.number),
                without_issued_at(&csv),
            );
        }
    }
    statements
}

/// The CSV with its `issued_at` column emptied. Fields before it never hold a comma (ids, a
/// number, a cycle name, an instant), so splitting the first columns on commas is exact.
fn without_issued_at(csv: &str) -> String {
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let column = header.iter().position(|name| *name == "issued_at").unwrap();
    csv.lines()
        .map(|line| {
            let mut fields: Vec<&str> = line.splitn(column + 2, ',').collect();
            if fields.len() > column && fields[column] != "issued_at" {
                fields[column] = "";
            }
            fields.join(",")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every topic read from the start in a fresh consumer group: how many messages each holds, and
/// the commission-accrued events of the ledger topic by purchase (the set of their event ids:
/// a copy published twice keeps its id).
fn replay_topics(stack: &Stack) -> (BTreeMap<String, usize>, BTreeMap<String, BTreeSet<String>>) {
    use prost::Message as _;
    let mut sizes = BTreeMap::new();
    let mut accrued: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for topic in tandem_bus::Topic::ALL {
        let messages = tandem_testkit::read_topic(&stack.bus, topic);
        sizes.insert(topic.name(&stack.bus), messages.len());
        if topic != tandem_bus::Topic::Ledger {
            continue;
        }
        for message in messages {
            let event = pb::LedgerEvent::decode(message.payload.as_slice())
                .expect("every ledger topic message decodes");
            if let Some(pb::ledger_event::Event::CommissionAccrued(commission)) = event.event {
                accrued
                    .entry(commission.purchase_id)
                    .or_default()
                    .insert(event.event_id);
            }
        }
    }
    (sizes, accrued)
}
