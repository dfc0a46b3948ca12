//! The ledger engine end to end: poison messages are recorded and skipped without holding up any
//! partition; a cancellation that arrives before its referral still cancels it; the `ledger`
//! topic folds to the ledger's own balances, and a replay announces nothing twice; totals page.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use prost::Message;
use support::*;
use tandem_bus::Topic;
use tandem_proto::v1 as pb;
use tandem_proto::v1::event_envelope::Payload;
use tonic::Code;

const B_PHONE: &str = "+33 6 12 34 56 78";

/// Commission lines so far (0 while the ledger is still creating its schema).
async fn attributed(stack: &Stack) -> i64 {
    let ledger = stack.schema("ledger").await;
    sqlx::query_scalar("SELECT count(*) FROM commissions")
        .fetch_one(&ledger)
        .await
        .unwrap_or(0)
}

async fn wait_attributed(stack: &Stack, expected: i64) {
    tandem_testkit::eventually(
        &format!("{expected} commission lines"),
        Duration::from_secs(60),
        || async { (attributed(stack).await >= expected).then_some(()) },
    )
    .await;
}

fn phone(n: usize) -> String {
    format!("+33 6 12 34 {:02} {:02}", n / 100, n % 100)
}

#[tokio::test]
async fn poison_messages_are_recorded_and_skipped_and_every_partition_moves_on() {
    let stack = Stack::start(true).await;
    let (acceptor, acceptor_key) = stack.merchant("Atelier Bikes").await;
    let (referrer, referrer_key) = stack.merchant("Cafe Lumiere").await;
    stack.partnership(&referrer, &acceptor, 1_000, 30).await;
    let mut pos = stack.pos().await;

    // Poison on every partition of both consumed topics: bytes that are no message at all, and
    // a well-formed command for a partnership nobody created (the domain refuses it).
    let mut poison = 0;
    for n in 0..16 {
        let key = format!("poison-{n}");
        tandem_testkit::publish(
            &stack.bus,
            Topic::CustomerActivity,
            key.as_bytes(),
            b"\xff not protobuf",
        )
        .await;
        tandem_testkit::publish(
            &stack.bus,
            Topic::Attributions,
            key.as_bytes(),
            b"\xff not protobuf",
        )
        .await;
        poison += 2;
    }
    let stranger = pb::PartnershipCommand {
        command_id: "attribution/pur_00000000000000000000000000000000".into(),
        partnership_id: "prt_00000000000000000000000000000000".into(),
        recorded_at: Some(tandem_proto::time::timestamp(chrono::Utc::now())),
        command: Some(pb::partnership_command::Command::AttributePurchase(
            pb::AttributePurchase {
                purchase_id: "pur_00000000000000000000000000000000".into(),
                referral_id: "ref_00000000000000000000000000000000".into(),
                amount: eur(1_000),
                purchased_at: Some(tandem_proto::time::timestamp(chrono::Utc::now())),
                referred_at: Some(tandem_proto::time::timestamp(chrono::Utc::now())),
                ..Default::default()
            },
        )),
    };
    tandem_testkit::publish(
        &stack.bus,
        Topic::Attributions,
        stranger.partnership_id.as_bytes(),
        &stranger.encode_to_vec(),
    )
    .await;
    poison += 1;

    // Then ordinary traffic from many customers, spread over every partition.
    let customers = 24;
    for n in 0..customers {
        pos.create_referral(with_bearer(
            referral(&format!("r-{n}"), &acceptor, customer("", &phone(n), "")),
            &referrer_key,
        ))
        .await
        .unwrap();
        pos.record_purchase(with_bearer(
            purchase(
                &format!("p-{n}"),
                &format!("T-{n}"),
                customer("", &phone(n), ""),
                10_000,
            ),
            &acceptor_key,
        ))
        .await
        .unwrap();
    }
    wait_attributed(&stack, customers as i64).await;

    let ledger = stack.schema("ledger").await;
    let rejected: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT message_ref, topic, reason FROM rejected_messages ORDER BY topic, message_ref",
    )
    .fetch_all(&ledger)
    .await
    .unwrap();
    assert_eq!(
        rejected.len(),
        poison,
        "every poison message is recorded once: {rejected:#?}"
    );
    assert!(
        rejected
            .iter()
            .any(|(_, topic, reason)| topic == "attributions"
                && reason.contains("does not exist yet"))
    );
    assert!(rejected
        .iter()
        .any(|(_, topic, reason)| topic == "customer-activity"
            && reason.contains("not an EventEnvelope")));
    let sum: Option<i64> =
        sqlx::query_scalar("SELECT sum(amount_minor)::bigint FROM ledger_postings")
            .fetch_one(&ledger)
            .await
            .unwrap();
    assert_eq!(sum, Some(0));
}

#[tokio::test]
async fn a_cancellation_that_arrives_before_its_referral_still_cancels_it() {
    // A stack without a ledger records a referral, its cancellation and a purchase after it...
    let source = Stack::start(false).await;
    let (acceptor, acceptor_key) = source.merchant("Atelier Bikes").await;
    let (referrer, referrer_key) = source.merchant("Cafe Lumiere").await;
    source.partnership(&referrer, &acceptor, 1_000, 30).await;
    let mut pos = source.pos().await;
    let referral_id = pos
        .create_referral(with_bearer(
            referral("r-1", &acceptor, customer("", B_PHONE, "")),
            &referrer_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .referral_id;
    pos.cancel_referral(with_bearer(
        pb::CancelReferralRequest {
            idempotency_key: "c-1".into(),
            referral_id: referral_id.clone(),
        },
        &referrer_key,
    ))
    .await
    .unwrap();
    pos.record_purchase(with_bearer(
        purchase("p-1", "T-1", customer("", B_PHONE, ""), 10_000),
        &acceptor_key,
    ))
    .await
    .unwrap();
    let admin = tandem_testkit::eventually("the admin events", Duration::from_secs(30), || async {
        let messages = tandem_testkit::read_topic(&source.bus, Topic::Admin);
        (messages.len() >= 4).then_some(messages)
    })
    .await;
    let activity =
        tandem_testkit::eventually("the activity events", Duration::from_secs(30), || async {
            let messages = tandem_testkit::read_topic(&source.bus, Topic::CustomerActivity);
            (messages.len() >= 3).then_some(messages)
        })
        .await;

    // ...and a ledger receives them with the cancellation first, as a till's offline queue or a
    // second customer key's partition could deliver them.
    let target = Stack::start(true).await;
    for message in &admin {
        tandem_testkit::publish(&target.bus, Topic::Admin, &message.key, &message.payload).await;
    }
    let kind = |payload: &[u8]| pb::EventEnvelope::decode(payload).unwrap().payload;
    let mut reordered: Vec<_> = activity.iter().collect();
    reordered.sort_by_key(|m| match kind(&m.payload) {
        Some(Payload::ReferralCancelled(_)) => 0,
        Some(Payload::CustomerReferred(_)) => 1,
        _ => 2,
    });
    assert!(matches!(
        kind(&reordered[0].payload),
        Some(Payload::ReferralCancelled(_))
    ));
    for message in reordered {
        tandem_testkit::publish(
            &target.bus,
            Topic::CustomerActivity,
            &message.key,
            &message.payload,
        )
        .await;
    }

    let ledger = target.schema("ledger").await;
    let cancelled = tandem_testkit::eventually(
        "the referral to arrive",
        Duration::from_secs(60),
        || async {
            // The ledger may still be creating its schema: an error is "not yet".
            let row: Option<Option<chrono::DateTime<chrono::Utc>>> =
                sqlx::query_scalar("SELECT cancelled_at FROM referrals WHERE referral_id = $1")
                    .bind(&referral_id)
                    .fetch_optional(&ledger)
                    .await
                    .ok()?;
            let purchases: i64 = sqlx::query_scalar("SELECT count(*) FROM purchases")
                .fetch_one(&ledger)
                .await
                .ok()?;
            row.filter(|_| purchases == 1)
        },
    )
    .await;
    assert!(
        cancelled.is_some(),
        "the cancellation that came first was lost"
    );
    // Give the commission stage a moment: nothing may be attributed to a cancelled referral.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        attributed(&target).await,
        0,
        "a purchase was attributed to a cancelled referral"
    );
}

/// Per (referrer, currency) balances, events per kind, and the ids seen.
type Folded = (
    BTreeMap<(String, String), i64>,
    BTreeMap<&'static str, usize>,
    HashSet<String>,
);

/// Folds the `ledger` topic: per (merchant, currency), commission accrued minus reversed, from
/// the events deduplicated by id; and how many events of each kind.
fn fold(messages: &[tandem_testkit::RawMessage]) -> Folded {
    let mut balances = BTreeMap::new();
    let mut kinds = BTreeMap::new();
    let mut seen = HashSet::new();
    for message in messages {
        let event = pb::LedgerEvent::decode(message.payload.as_slice()).unwrap();
        assert_eq!(event.schema_version, 1);
        assert_eq!(
            message.key,
            event.partnership_id.as_bytes(),
            "keyed by partnership"
        );
        if !seen.insert(event.event_id.clone()) {
            continue;
        }
        let (kind, delta) = match event.event.unwrap() {
            pb::ledger_event::Event::ReferralConverted(_) => ("converted", None),
            pb::ledger_event::Event::PurchaseAttributed(_) => ("attributed", None),
            pb::ledger_event::Event::CommissionAccrued(e) => ("accrued", e.commission),
            pb::ledger_event::Event::CommissionReversed(e) => (
                "reversed",
                e.reversal.map(|m| pb::Money {
                    amount_minor: -m.amount_minor,
                    ..m
                }),
            ),
            pb::ledger_event::Event::CommissionPayable(_) => ("payable", None),
        };
        *kinds.entry(kind).or_default() += 1;
        if let Some(money) = delta {
            *balances
                .entry((event.referrer_merchant_id.clone(), money.currency.clone()))
                .or_default() += money.amount_minor;
        }
    }
    (balances, kinds, seen)
}

#[tokio::test]
async fn the_ledger_topic_folds_to_the_ledgers_balances_and_a_replay_announces_nothing_twice() {
    let mut stack = Stack::start(true).await;
    let (acceptor, acceptor_key) = stack.merchant("Atelier Bikes").await;
    let (referrer, referrer_key) = stack.merchant("Cafe Lumiere").await;
    let (second, second_key) = stack.merchant("Librairie").await;
    stack.partnership(&referrer, &acceptor, 1_000, 30).await;
    stack.partnership(&second, &acceptor, 500, 30).await;
    let mut pos = stack.pos().await;
    for (n, key) in [(0, &referrer_key), (1, &second_key)] {
        pos.create_referral(with_bearer(
            referral(&format!("r-{n}"), &acceptor, customer("", &phone(n), "")),
            key,
        ))
        .await
        .unwrap();
    }
    for n in 0..3 {
        pos.record_purchase(with_bearer(
            purchase(
                &format!("p-{n}"),
                &format!("T-{n}"),
                customer("", &phone(0), ""),
                10_000 + n as i64,
            ),
            &acceptor_key,
        ))
        .await
        .unwrap();
    }
    pos.record_purchase(with_bearer(
        purchase("p-9", "T-9", customer("", &phone(1), ""), 20_000),
        &acceptor_key,
    ))
    .await
    .unwrap();
    wait_attributed(&stack, 4).await;
    pos.record_refund(with_bearer(
        pb::RecordRefundRequest {
            idempotency_key: "f-1".into(),
            transaction_id: "T-1".into(),
            amount: eur(5_000),
            ..Default::default()
        },
        &acceptor_key,
    ))
    .await
    .unwrap();

    // The referrer's balance as the ledger reports it...
    let balance = |key: String| {
        let stack = &stack;
        async move {
            let balances = stack
                .pos()
                .await
                .get_balances(with_bearer(pb::GetBalancesRequest {}, &key))
                .await
                .unwrap()
                .into_inner()
                .balances;
            balances
                .iter()
                .filter(|b| b.role == pb::PartnershipRole::Referrer as i32)
                .map(|b| b.accrued_minor + b.payable_minor)
                .sum::<i64>()
        }
    };
    // ...equals the fold of the ledger topic, once the refund's reversal is announced.
    let (folded, kinds, ids) = tandem_testkit::eventually(
        "the ledger topic to carry the reversal",
        Duration::from_secs(60),
        || async {
            let folded = fold(&tandem_testkit::read_topic(&stack.bus, Topic::Ledger));
            // The terms hold nothing back: every commission also becomes payable at once.
            (folded.1.get("reversed") == Some(&1) && folded.1.get("payable") == Some(&4))
                .then_some(folded)
        },
    )
    .await;
    assert_eq!(
        folded.get(&(referrer.clone(), "EUR".into())).copied(),
        Some(balance(referrer_key.clone()).await)
    );
    assert_eq!(
        folded.get(&(second.clone(), "EUR".into())).copied(),
        Some(balance(second_key.clone()).await)
    );
    assert_eq!(kinds.get("converted"), Some(&2), "{kinds:?}");
    assert_eq!(kinds.get("attributed"), Some(&4), "{kinds:?}");
    assert_eq!(kinds.get("accrued"), Some(&4), "{kinds:?}");

    // A consumer that receives an event twice (the relay may publish twice after a crash)
    // counts it once: the fold deduplicates by id.
    let mut doubled = tandem_testkit::read_topic(&stack.bus, Topic::Ledger);
    doubled.extend(doubled.clone());
    assert_eq!(fold(&doubled).0, folded);

    // A ledger in a new consumer group replays every topic from the start: every command is
    // recognised as applied, and nothing is announced again.
    let before = tandem_testkit::read_topic(&stack.bus, Topic::Ledger).len();
    stack.restart_ledger("replay").await;
    let group = format!("{}-replay", stack.bus.topic_prefix);
    tandem_testkit::eventually(
        "the replaying ledger to catch up",
        Duration::from_secs(60),
        || async {
            let lag =
                tandem_testkit::group_lag(&stack.bus, &format!("{group}.admin"), Topic::Admin)
                    + tandem_testkit::group_lag(
                        &stack.bus,
                        &format!("{group}.activity"),
                        Topic::CustomerActivity,
                    )
                    + tandem_testkit::group_lag(
                        &stack.bus,
                        &format!("{group}.commissions"),
                        Topic::Attributions,
                    );
            (lag == 0).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = tandem_testkit::read_topic(&stack.bus, Topic::Ledger);
    assert_eq!(after.len(), before, "the replay announced again");
    assert_eq!(fold(&after).2, ids);

    // Totals page: one partnership per page for the acceptor, then no token.
    let page = |token: String| {
        let stack = &stack;
        let key = acceptor_key.clone();
        async move {
            stack
                .pos()
                .await
                .get_commission_totals(with_bearer(
                    pb::GetCommissionTotalsRequest {
                        role: pb::PartnershipRole::Acceptor as i32,
                        page_size: 1,
                        page_token: token,
                        ..Default::default()
                    },
                    &key,
                ))
                .await
        }
    };
    let first = page(String::new()).await.unwrap().into_inner();
    assert_eq!(first.totals.len(), 1);
    assert!(!first.next_page_token.is_empty());
    let second_page = page(first.next_page_token.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second_page.totals.len(), 1);
    assert_ne!(
        second_page.totals[0].partnership_id,
        first.totals[0].partnership_id
    );
    assert!(second_page.next_page_token.is_empty());
    assert_eq!(
        page("t1.garbage".into()).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}
