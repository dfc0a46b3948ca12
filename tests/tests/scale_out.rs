//! Scale-out, proven on the real parts: three referral-ledger processes share the work of one
//! stack (attribution by customer partition, commission decisions by partnership partition) with
//! two gateways in front, on a three-broker Apache Kafka cluster with every topic replicated
//! three times. While POS clients record purchases through both gateways, one ledger is killed
//! with SIGKILL and one broker is killed too. Afterwards every acknowledged purchase is
//! attributed exactly once, its commission line and its `purchase.attributed` announcement
//! appear once, and the ledger balances per currency.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use support::process::{wait_serving, LedgerProcess, PrivateKafka};
use support::*;
use tandem_bus::Topic;
use tandem_proto::v1 as pb;
use tandem_proto::v1::merchant_gateway_client::MerchantGatewayClient;
use tonic::Code;

const PARTNERSHIPS: usize = 3;
const CUSTOMERS: usize = 30;

fn phone(customer: usize) -> String {
    format!("+3362{customer:07}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_ledgers_and_two_gateways_survive_a_killed_ledger_and_a_killed_broker() {
    let kafka = PrivateKafka::cluster(3);
    let bus = tandem_testkit::test_bus_replicated(&kafka.brokers(), 6, 3, 2).await;
    let stack = Stack::start_on(false, bus).await;
    let second_gateway = stack.add_gateway().await;

    // Three ledger processes: the first on the stack's ledger address (the gateways' queries go
    // there), the others on addresses of their own.
    let session = ("TANDEM_CONSUMER_SESSION_TIMEOUT_MS", "6000".to_owned());
    let mut ledgers = vec![LedgerProcess::start(
        &stack,
        "scale",
        std::slice::from_ref(&session),
    )];
    for _ in 1..3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        ledgers.push(LedgerProcess::start(
            &stack,
            "scale",
            &[
                session.clone(),
                ("TANDEM_LEDGER_LISTEN", format!("127.0.0.1:{port}")),
            ],
        ));
    }
    for ledger in &ledgers {
        wait_serving(ledger.address, Duration::from_secs(60)).await;
    }

    // Partnerships with one acceptor each; every customer referred under each.
    let mut acceptors = Vec::new();
    for p in 0..PARTNERSHIPS {
        let (acceptor, acceptor_key) = stack.merchant(&format!("Acceptor {p}")).await;
        let (referrer, referrer_key) = stack.merchant(&format!("Referrer {p}")).await;
        stack
            .partnership(&referrer, &acceptor, 500 + 100 * p as u32, 30)
            .await;
        let mut pos = stack.pos().await;
        for customer in 0..CUSTOMERS {
            pos.create_referral(with_bearer(
                referral(
                    &format!("r{p}-{customer}"),
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
        acceptors.push(acceptor_key);
    }

    // POS clients on both gateways, retrying UNAVAILABLE with the same idempotency key.
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let gateways = [stack.pos().await, {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", second_gateway.address))
                .unwrap()
                .connect_lazy();
        MerchantGatewayClient::new(channel)
    }];
    let mut workers = Vec::new();
    for worker in 0..6 {
        let mut pos = gateways[worker % 2].clone();
        let key = acceptors[worker % PARTNERSHIPS].clone();
        let stop = stop.clone();
        let acknowledged = acknowledged.clone();
        workers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let transaction = format!("w{worker}-{n}");
                let request = purchase(
                    &transaction,
                    &transaction,
                    pb::CustomerIdentifiers {
                        phone: phone((worker * 7 + n) % CUSTOMERS),
                        ..Default::default()
                    },
                    1_000 + n as i64,
                );
                loop {
                    match pos
                        .record_purchase(with_bearer(request.clone(), &key))
                        .await
                    {
                        Ok(response) => {
                            acknowledged
                                .lock()
                                .unwrap()
                                .insert(transaction.clone(), response.into_inner().purchase_id);
                            break;
                        }
                        Err(status) if status.code() == Code::Unavailable => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(status) => panic!("purchase {transaction} refused: {status}"),
                    }
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }

    let count = || acknowledged.lock().unwrap().len();
    wait_for(|| count() >= 100, "100 purchases before the faults").await;
    ledgers[1].kill();
    let killed_ledger_at = count();
    wait_for(
        || count() >= killed_ledger_at + 100,
        "100 purchases after the ledger died",
    )
    .await;
    kafka.kill(3);
    let killed_broker_at = count();
    wait_for(
        || count() >= killed_broker_at + 100,
        "100 purchases after the broker died",
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    let purchases: BTreeSet<String> = acknowledged.values().cloned().collect();
    assert_eq!(
        purchases.len(),
        acknowledged.len(),
        "one purchase id per transaction"
    );

    // Every acknowledged purchase gets exactly one commission line.
    let ledger = stack.schema("ledger").await;
    let started = Instant::now();
    tandem_testkit::eventually(
        &format!("{} commission lines", purchases.len()),
        Duration::from_secs(180),
        || async {
            let lines: i64 = sqlx::query_scalar("SELECT count(*) FROM commissions")
                .fetch_one(&ledger)
                .await
                .unwrap();
            (lines as usize >= purchases.len()).then_some(())
        },
    )
    .await;
    eprintln!(
        "scale-out: {} purchases acknowledged; all attributed {:?} after the last one",
        purchases.len(),
        started.elapsed()
    );
    let lines: Vec<String> = sqlx::query_scalar("SELECT purchase_id FROM commissions")
        .fetch_all(&ledger)
        .await
        .unwrap();
    let lined: BTreeSet<String> = lines.iter().cloned().collect();
    assert_eq!(lines.len(), lined.len());
    assert_eq!(
        lined, purchases,
        "commission lines are exactly the acknowledged purchases"
    );
    let unbalanced: Vec<(String, i64)> = sqlx::query_as(
        "SELECT currency, sum(amount_minor)::bigint FROM ledger_postings GROUP BY currency HAVING sum(amount_minor) <> 0",
    )
    .fetch_all(&ledger)
    .await
    .unwrap();
    assert!(
        unbalanced.is_empty(),
        "the ledger does not balance: {unbalanced:?}"
    );
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_entries")
        .fetch_one(&ledger)
        .await
        .unwrap();
    assert_eq!(
        entries as usize,
        purchases.len(),
        "one accrual entry per purchase"
    );

    // One `purchase.attributed` announcement per purchase: the same id when published twice.
    let announced = tandem_testkit::eventually(
        "an announcement of every purchase",
        Duration::from_secs(60),
        || async {
            let mut ids: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for message in tandem_testkit::read_topic(&stack.bus, Topic::Ledger) {
                let event = pb::LedgerEvent::decode(message.payload.as_slice()).unwrap();
                if let Some(pb::ledger_event::Event::PurchaseAttributed(attributed)) = event.event {
                    ids.entry(attributed.purchase_id)
                        .or_default()
                        .insert(event.event_id);
                }
            }
            (ids.len() >= purchases.len()).then_some(ids)
        },
    )
    .await;
    assert_eq!(
        announced.keys().cloned().collect::<BTreeSet<_>>(),
        purchases
    );
    assert!(
        announced.values().all(|ids| ids.len() == 1),
        "a purchase was announced under two ids"
    );
    drop(ledgers);
    drop(second_gateway);
}

async fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
