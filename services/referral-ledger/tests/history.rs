//! The cost of a commission decision does not grow with the partnership's history: the batch
//! that decides the 100,001st purchase sends the same statements as the batch that decided the
//! first, and takes about the same time (reported, not asserted: timings are for benchmarks).
//! Runs the commission stage directly on the real Postgres, without the broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Duration, TimeZone, Utc};
use prost::Message;
use referral_ledger::CommissionStage;
use tandem_bus::{Delivery, Topic};
use tandem_codec::event_to_proto;
use tandem_domain::commission::Event;
use tandem_domain::ids::{MerchantId, PartnershipId, PurchaseId, ReferralId};
use tandem_domain::money::{Currency, Money};
use tandem_domain::partnership::{CommissionRule, Terms, Tier};
use tandem_proto::time::timestamp;
use tandem_proto::v1 as pb;

const HISTORY: usize = 100_000;
const BATCH: usize = 1_000;
const CUSTOMERS: usize = 10_000;

struct Feed {
    partnership: PartnershipId,
    offset: i64,
}

impl Feed {
    fn delivery(
        &mut self,
        command_id: String,
        command: pb::partnership_command::Command,
    ) -> Delivery {
        self.offset += 1;
        Delivery {
            topic: Topic::Attributions,
            topic_name: Topic::Attributions.logical_name().to_owned(),
            partition: 0,
            offset: self.offset,
            key: self.partnership.as_str().as_bytes().to_vec(),
            payload: pb::PartnershipCommand {
                command_id,
                partnership_id: self.partnership.to_string(),
                recorded_at: Some(timestamp(start())),
                command: Some(command),
            }
            .encode_to_vec(),
            headers: Vec::new(),
        }
    }

    fn terms(&mut self, event: &Event) -> Delivery {
        let id = uuid::Uuid::now_v7();
        self.delivery(
            format!("terms/{id}"),
            pb::partnership_command::Command::Terms(event_to_proto(&self.partnership, event)),
        )
    }

    fn purchase(&mut self, referral: &ReferralId, n: usize) -> Delivery {
        let purchase_id = PurchaseId::generate();
        let at = start() + Duration::minutes(i64::try_from(n).unwrap());
        self.delivery(
            format!("attribution/{purchase_id}"),
            pb::partnership_command::Command::AttributePurchase(pb::AttributePurchase {
                purchase_id: purchase_id.to_string(),
                referral_id: referral.to_string(),
                amount: Some(tandem_codec::money_to_proto(Money::new(
                    1_000 + i64::try_from(n % 5_000).unwrap(),
                    eur(),
                ))),
                purchased_at: Some(timestamp(at)),
                referred_at: Some(timestamp(start())),
                previous_purchase_at: None,
                referrer_reference: format!("ref-{n}"),
                transaction_id: format!("tx-{n}"),
                matched_by: pb::IdentifierKind::Phone as i32,
            }),
        )
    }
}

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().unwrap()
}

fn eur() -> Currency {
    Currency::parse("c", "EUR").unwrap()
}

#[tokio::test]
async fn the_100001st_purchase_costs_the_statements_of_the_first() {
    let database = tandem_testkit::TestDatabase::create().await;
    let pool = tandem_store::connect(&tandem_store::StoreConfig {
        database_url: database.url.clone(),
        schema: "ledger".into(),
        max_connections: 4,
    })
    .await
    .unwrap();
    referral_ledger::migrate(&pool).await.unwrap();
    let stage = CommissionStage::new(pool.clone(), Arc::new(tokio::sync::Notify::new()));

    let referrer = MerchantId::generate();
    let acceptor = MerchantId::generate();
    let mut feed = Feed {
        partnership: PartnershipId::generate(),
        offset: 0,
    };
    // Tiers and caps: the decision needs the period's spend and the customer's earnings.
    let terms = Terms {
        rule: CommissionRule::MarginalTiers {
            tiers: vec![
                Tier {
                    from_minor: 0,
                    rate_bps: 500,
                },
                Tier {
                    from_minor: 10_000_000,
                    rate_bps: 800,
                },
            ],
        },
        cap_per_customer_minor: Some(50_000),
        holding_period_days: 14,
        ..Terms::percentage(eur(), 500, 30).unwrap()
    };
    let agreed = start() - Duration::days(1);
    let terms_batch = vec![
        feed.terms(&Event::TermsProposed {
            version: 1,
            referrer: referrer.clone(),
            acceptor: acceptor.clone(),
            proposed_by: referrer.clone(),
            terms,
            effective_from: agreed,
        }),
        feed.terms(&Event::TermsAccepted {
            version: 1,
            accepted_by: acceptor.clone(),
            effective_from: agreed,
        }),
    ];
    stage.apply(&terms_batch).await.unwrap();

    let customers: Vec<ReferralId> = (0..CUSTOMERS).map(|_| ReferralId::generate()).collect();
    let first_batch = vec![feed.purchase(&customers[0], 0)];
    let started = Instant::now();
    let first = stage.apply(&first_batch).await.unwrap();
    let first_time = started.elapsed();

    // A hundred thousand purchases of history, a thousand per batch.
    let mut full_batch_first = None;
    let mut full_batch_last = None;
    let mut n = 1;
    while n < HISTORY {
        let batch: Vec<Delivery> = (n..(n + BATCH).min(HISTORY))
            .map(|i| feed.purchase(&customers[i % CUSTOMERS], i))
            .collect();
        n += batch.len();
        let started = Instant::now();
        let cost = stage.apply(&batch).await.unwrap();
        let elapsed = started.elapsed();
        if full_batch_first.is_none() {
            full_batch_first = Some((cost, elapsed));
        }
        full_batch_last = Some((cost, elapsed));
    }

    // The 100,001st purchase, by a customer with history, and by a new one.
    let latest_batch = vec![feed.purchase(&customers[1], HISTORY)];
    let started = Instant::now();
    let latest = stage.apply(&latest_batch).await.unwrap();
    let latest_time = started.elapsed();

    let lines: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger.commissions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(lines, i64::try_from(HISTORY + 1).unwrap());
    let sum: Option<i64> =
        sqlx::query_scalar("SELECT sum(amount_minor)::bigint FROM ledger.ledger_postings")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(sum, Some(0), "the ledger balances");
    let snapshot: i32 = sqlx::query_scalar("SELECT length(core) FROM ledger.partnership_books")
        .fetch_one(&pool)
        .await
        .unwrap();

    let (full_first, full_first_time) = full_batch_first.unwrap();
    let (full_last, full_last_time) = full_batch_last.unwrap();
    eprintln!(
        "history test: 1st purchase {} statements in {:?}; 100,001st {} statements in {:?}; \
         batch of {BATCH} at the start {} statements in {:?}, at the end {} statements in {:?}; \
         core snapshot {snapshot} bytes",
        first.statements,
        first_time,
        latest.statements,
        latest_time,
        full_first.statements,
        full_first_time,
        full_last.statements,
        full_last_time,
    );
    assert_eq!(
        latest.statements, first.statements,
        "deciding a purchase costs the same statements whatever the history"
    );
    assert_eq!(
        full_last.statements, full_first.statements,
        "a full batch costs the same statements whatever the history"
    );
    assert!(
        full_first.statements <= 20,
        "a batch of {BATCH} sends a bounded number of statements, not one per message: {}",
        full_first.statements
    );
}
