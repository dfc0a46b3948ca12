//! Crashes and restarts on the real stack: the referral ledger killed with SIGKILL again and
//! again while purchases flow, the broker stopped and started under load, and consumers that
//! stall or are fenced turning their service NOT_SERVING and ending it, so a supervisor restarts
//! it instead of it sitting idle and "healthy".
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::process::{health, wait_serving, HealthProbe, LedgerProcess, PrivateKafka};
use support::*;
use tandem_proto::v1 as pb;
use tokio::net::TcpListener;
use tonic_health::pb::health_check_response::ServingStatus;

const CUSTOMERS: usize = 20;

fn phone(customer: usize) -> String {
    format!("+3361{customer:07}")
}

/// Two merchants, a partnership and a referral of every customer: every purchase of theirs at
/// the acceptor is attributed. Returns the acceptor's API key and the partnership id.
async fn referred_customers(stack: &Stack) -> (String, String) {
    let (acceptor, acceptor_key) = stack.merchant("Atelier Bikes").await;
    let (referrer, referrer_key) = stack.merchant("Cafe Lumiere").await;
    let partnership = stack.partnership(&referrer, &acceptor, 500, 30).await;
    let mut pos = stack.pos().await;
    for customer in 0..CUSTOMERS {
        pos.create_referral(with_bearer(
            referral(
                &format!("r{customer}"),
                &acceptor,
                pb::CustomerIdentifiers {
                    phone: phone(customer),
                    ..Default::default()
                },
            ),
            &referrer_key,
        ))
        .await
        .expect("referral");
    }
    (acceptor_key, partnership)
}

/// Purchases recorded by POS clients that retry UNAVAILABLE with the same idempotency key,
/// until told to stop. The map holds every acknowledged purchase: transaction id -> purchase id.
struct Till {
    stop: Arc<AtomicBool>,
    acknowledged: Arc<Mutex<BTreeMap<String, String>>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Till {
    fn start(stack: &Stack, api_key: &str, clients: usize, pause: Duration) -> Till {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(Mutex::new(BTreeMap::new()));
        let mut workers = Vec::new();
        for client in 0..clients {
            let (stop, acknowledged, api_key) =
                (stop.clone(), acknowledged.clone(), api_key.to_owned());
            let channel = tonic::transport::Endpoint::from_shared(format!(
                "http://{}",
                stack.gateway.as_ref().unwrap().address
            ))
            .unwrap()
            .connect_lazy();
            workers.push(tokio::spawn(async move {
                let mut pos = pb::merchant_gateway_client::MerchantGatewayClient::new(channel);
                let mut index = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let transaction_id = format!("T{client}-{index}");
                    let request = purchase(
                        &format!("k-{transaction_id}"),
                        &transaction_id,
                        pb::CustomerIdentifiers {
                            phone: phone((client * 7 + index) % CUSTOMERS),
                            ..Default::default()
                        },
                        1_000 + (index as i64 % 50) * 10,
                    );
                    loop {
                        match pos
                            .record_purchase(with_bearer(request.clone(), &api_key))
                            .await
                        {
                            Ok(answer) => {
                                acknowledged.lock().unwrap().insert(
                                    transaction_id.clone(),
                                    answer.into_inner().purchase_id,
                                );
                                break;
                            }
                            Err(status) if status.code() == tonic::Code::Unavailable => {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            Err(status) => panic!("record purchase {transaction_id}: {status}"),
                        }
                    }
                    index += 1;
                    tokio::time::sleep(pause).await;
                }
            }));
        }
        Till {
            stop,
            acknowledged,
            workers,
        }
    }

    fn acknowledged_so_far(&self) -> usize {
        self.acknowledged.lock().unwrap().len()
    }

    async fn stop(self) -> BTreeMap<String, String> {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            worker.await.expect("till worker");
        }
        let acknowledged = self.acknowledged.lock().unwrap().clone();
        acknowledged
    }
}

/// What the ledger holds: purchase ids with a commission line, the number of accrual entries,
/// and the sum of the postings per currency.
struct LedgerContents {
    commissioned: Vec<String>,
    accruals: i64,
    sums: Vec<(String, i64)>,
    rejected: i64,
}

async fn ledger_contents(stack: &Stack) -> LedgerContents {
    let ledger = stack.schema("ledger").await;
    let commissioned: Vec<String> =
        sqlx::query_scalar("SELECT purchase_id FROM commissions ORDER BY 1")
            .fetch_all(&ledger)
            .await
            .unwrap();
    let accruals: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE kind = 'commission_accrual'")
            .fetch_one(&ledger)
            .await
            .unwrap();
    let sums: Vec<(String, i64)> = sqlx::query_as(
        "SELECT currency, sum(amount_minor)::bigint FROM ledger_postings GROUP BY currency ORDER BY 1",
    )
    .fetch_all(&ledger)
    .await
    .unwrap();
    let rejected: i64 = sqlx::query_scalar("SELECT count(*) FROM rejected_messages")
        .fetch_one(&ledger)
        .await
        .unwrap();
    ledger.close().await;
    LedgerContents {
        commissioned,
        accruals,
        sums,
        rejected,
    }
}

/// Waits until the ledger has a commission line for every acknowledged purchase; returns how
/// long that took. After `bound`, the error says how far it got and where the rest stands:
/// still in the gateway's outbox (not published), or published and not applied.
async fn wait_all_attributed(
    stack: &Stack,
    acknowledged: &BTreeMap<String, String>,
    bound: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let ledger = stack.schema("ledger").await;
    loop {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM commissions")
            .fetch_one(&ledger)
            .await
            .unwrap();
        if count as usize >= acknowledged.len() {
            ledger.close().await;
            return Ok(started.elapsed());
        }
        if started.elapsed() >= bound {
            ledger.close().await;
            return Err(format!(
                "only {count} of {} acknowledged purchases attributed {bound:?} after the last restart; {}",
                acknowledged.len(),
                where_the_rest_is(stack).await
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rows waiting in each service's outbox and purchases the ledger has recorded: tells a relay
/// that stopped publishing from a consumer that stopped applying.
async fn where_the_rest_is(stack: &Stack) -> String {
    let mut report = Vec::new();
    for schema in ["gateway", "ledger"] {
        let pool = stack.schema(schema).await;
        let waiting: Result<i64, _> = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&pool)
            .await;
        report.push(format!("{schema} outbox: {waiting:?}"));
        pool.close().await;
    }
    let ledger = stack.schema("ledger").await;
    let purchases: Result<i64, _> = sqlx::query_scalar("SELECT count(*) FROM purchases")
        .fetch_one(&ledger)
        .await;
    ledger.close().await;
    report.push(format!("ledger purchases: {purchases:?}"));
    report.push(format!(
        "in-process ledger running: {:?}",
        stack.ledger.as_ref().map(|ledger| ledger.is_running())
    ));
    report.join(", ")
}

/// Every acknowledged purchase is in the ledger exactly once, and the ledger balances.
async fn assert_exactly_once_and_balanced(stack: &Stack, acknowledged: &BTreeMap<String, String>) {
    let contents = ledger_contents(stack).await;
    let mut expected: Vec<String> = acknowledged.values().cloned().collect();
    expected.sort();
    expected.dedup();
    assert_eq!(
        expected.len(),
        acknowledged.len(),
        "two transactions got one purchase id"
    );
    assert_eq!(
        contents.commissioned, expected,
        "commission lines are not exactly the acknowledged purchases"
    );
    assert_eq!(
        contents.accruals as usize,
        expected.len(),
        "one accrual entry per purchase"
    );
    for (currency, sum) in &contents.sums {
        assert_eq!(*sum, 0, "the ledger does not balance in {currency}");
    }
    assert_eq!(contents.rejected, 0, "messages were rejected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_killed_five_times_under_load_recovers_by_itself_and_counts_each_purchase_once() {
    let stack = Stack::start(false).await;
    let (acceptor_key, _partnership) = referred_customers(&stack).await;
    let mut ledger = LedgerProcess::start(
        &stack,
        "ledger",
        &[("TANDEM_CONSUMER_SESSION_TIMEOUT_MS", "10000".into())],
    );
    wait_serving(ledger.address, Duration::from_secs(60)).await;

    let till = Till::start(&stack, &acceptor_key, 4, Duration::from_millis(5));
    // Five SIGKILLs in quick succession, each at a different moment of the ledger's life:
    // while it starts, while it catches up, while it applies a batch.
    let mut seed = uuid::Uuid::new_v4().as_u128();
    for kill in 1..=5 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let alive_for = Duration::from_millis(300 + (seed >> 64) as u64 % 2_500);
        tokio::time::sleep(alive_for).await;
        ledger.kill();
        eprintln!(
            "kill {kill}: after {alive_for:?}, {} purchases acknowledged so far",
            till.acknowledged_so_far()
        );
        ledger.restart();
    }
    let restarted = Instant::now();
    // Purchases keep flowing for a moment after the last restart, then the tills stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acknowledged = till.stop().await;
    assert!(
        acknowledged.len() >= 100,
        "only {} purchases were acknowledged under load",
        acknowledged.len()
    );

    // Bound: the session timeout (10 s) plus time to apply the backlog. With static membership
    // the restarted instance takes its partitions back at once, so this is mostly backlog.
    let bound = Duration::from_secs(90);
    let caught_up = match wait_all_attributed(&stack, &acknowledged, bound).await {
        Ok(caught_up) => caught_up,
        Err(error) => panic!("{error}\n{}", ledger.log_tail()),
    };
    let recovery = restarted.elapsed();
    eprintln!(
        "recovery: all {} acknowledged purchases attributed {:.1} s after the last restart ({:.1} s after the tills stopped)",
        acknowledged.len(),
        recovery.as_secs_f64(),
        caught_up.as_secs_f64()
    );
    assert_exactly_once_and_balanced(&stack, &acknowledged).await;
    assert_eq!(
        health(ledger.address).await,
        Some(ServingStatus::Serving),
        "{}",
        ledger.log_tail()
    );
    let status = ledger.terminate();
    assert!(
        status.success(),
        "the ledger did not stop cleanly: {status:?}\n{}",
        ledger.log_tail()
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchases_acknowledged_while_the_broker_is_down_are_kept_and_attributed_once_it_is_back() {
    let kafka = PrivateKafka::start();
    let bus = tandem_testkit::test_bus_on(&kafka.brokers(), 4).await;
    let stack = Stack::start_on(true, bus).await;
    let (acceptor_key, _partnership) = referred_customers(&stack).await;

    let till = Till::start(&stack, &acceptor_key, 2, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_secs(2)).await;
    kafka.stop();
    let before_outage = till.acknowledged_so_far();
    // The broker is down: the gateway still acknowledges purchases, because an acknowledgement
    // means "committed to the outbox", not "published".
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during_outage = till.acknowledged_so_far() - before_outage;
    assert!(
        during_outage > 0,
        "no purchase was acknowledged while the broker was down"
    );
    kafka.start_again();
    let restarted = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acknowledged = till.stop().await;

    if let Err(error) = wait_all_attributed(&stack, &acknowledged, Duration::from_secs(120)).await {
        panic!("{error}");
    }
    eprintln!(
        "{} purchases, {during_outage} acknowledged while the broker was down; all attributed {:.1} s after it was back",
        acknowledged.len(),
        restarted.elapsed().as_secs_f64()
    );
    assert_exactly_once_and_balanced(&stack, &acknowledged).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_consumer_turns_the_ledger_not_serving_and_ends_it() {
    let mut stack = Stack::start(false).await;
    stack.consumer_args.consumer_stall_timeout_ms = 5_000;
    let listener = TcpListener::bind(stack.ledger_address()).await.unwrap();
    let ledger = stack.spawn_ledger(listener, "stalled");
    wait_serving(ledger.address, Duration::from_secs(30)).await;
    // Let the ledger migrate and apply what is there, then hold a lock its batches need.
    stack.merchant("First").await;
    let ledger_db = stack.schema("ledger").await;
    wait_admin_applied(&ledger_db, 1).await;
    let mut blocker = ledger_db.begin().await.unwrap();
    sqlx::query("LOCK TABLE admin_progress IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let mut probe = HealthProbe::connect(ledger.address).await;
    stack.merchant("Second").await;

    let started = Instant::now();
    let mut saw_not_serving = false;
    while started.elapsed() < Duration::from_secs(60) {
        match probe.status().await {
            Some(ServingStatus::NotServing) => {
                saw_not_serving = true;
                break;
            }
            // No answer (a busy moment, or already gone): ask again until the deadline.
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    if !saw_not_serving {
        let ended = ledger.finish(Duration::from_secs(30)).await;
        panic!("health never reported NOT_SERVING for a stalled consumer; the ledger ended with {ended:?}");
    }
    let error = ledger
        .finish(Duration::from_secs(30))
        .await
        .expect_err("the ledger must fail");
    assert!(error.contains("made no progress"), "{error}");
    eprintln!(
        "stall noticed after {:.1} s: {error}",
        started.elapsed().as_secs_f64()
    );
    blocker.rollback().await.unwrap();
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_with_the_same_instance_id_fences_the_first_which_ends() {
    let mut stack = Stack::start(false).await;
    stack.consumer_args.instance_id = Some("the-same-id".into());
    let first_listener = TcpListener::bind(stack.ledger_address()).await.unwrap();
    let first = stack.spawn_ledger(first_listener, "fenced");
    wait_serving(first.address, Duration::from_secs(30)).await;
    stack.merchant("Someone").await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let second_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second = stack.spawn_ledger(second_listener, "fenced");
    wait_serving(second.address, Duration::from_secs(30)).await;
    let error = first
        .finish(Duration::from_secs(60))
        .await
        .expect_err("the fenced ledger must fail");
    assert!(error.contains("fatal"), "{error}");
    assert_eq!(health(second.address).await, Some(ServingStatus::Serving));
    second.stop().await;
    stack.stop().await;
}
