//! End to end on the real broker and Postgres: a referral at C and purchases at A flow through
//! the gateway, its outbox, the topics and the referral ledger, and C sees exactly what it earned.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::time::Duration;

use support::*;
use tandem_bus::Topic;
use tandem_proto::v1 as pb;

const B_PHONE_AT_C: &str = "+33 6 12 34 56 78";
const B_PHONE_AT_A: &str = "0033 (6) 12-34-56-78";
const B_EMAIL_AT_C: &str = "b.martin@example.com";
const B_EMAIL_AT_A: &str = "  B.Martin@Example.COM ";
const B_CARD_AT_A: &str = "fp_1Nv0c2Hk9ZxQ";
const D_EMAIL: &str = "dora.other@example.org";
const X_PHONE: &str = "+49 30 1234 5678";

async fn ledger_totals(stack: &Stack) -> (i64, i64, i64) {
    let ledger = stack.schema("ledger").await;
    let (commissions, postings, sum): (i64, i64, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM commissions), (SELECT count(*) FROM ledger_postings), \
         (SELECT sum(amount_minor)::bigint FROM ledger_postings)",
    )
    .fetch_one(&ledger)
    .await
    .unwrap();
    (commissions, postings, sum.unwrap_or(0))
}

#[tokio::test]
async fn referred_purchases_reach_the_referrer_exactly_once() {
    let mut stack = Stack::start(true).await;
    let (acceptor, acceptor_key) = stack.merchant("Atelier Bikes").await;
    let (referrer, referrer_key) = stack.merchant("Cafe Lumiere").await;
    let (_outsider, outsider_key) = stack.merchant("Unrelated Shop").await;
    // Imported by the operator as in force for 20 days, so that a referral can date from before
    // today.
    let partnership = stack
        .partnership_since(
            &referrer,
            &acceptor,
            750,
            7,
            Some(chrono::Utc::now() - chrono::Duration::days(20)),
        )
        .await;
    let mut pos = stack.pos().await;

    // C refers B (phone and e-mail) now, and X (phone) ten days ago: X's 7-day window is over.
    let b_referral = pos
        .create_referral(with_bearer(
            pb::CreateReferralRequest {
                referrer_reference: "C-0001".into(),
                ..referral("r-b", &acceptor, customer("", B_PHONE_AT_C, B_EMAIL_AT_C))
            },
            &referrer_key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b_referral.partnership_id, partnership);
    let ten_days_ago = chrono::Utc::now() - chrono::Duration::days(10);
    pos.create_referral(with_bearer(
        pb::CreateReferralRequest {
            referred_at: Some(tandem_proto::time::timestamp(ten_days_ago)),
            ..referral("r-x", &acceptor, customer("", X_PHONE, ""))
        },
        &referrer_key,
    ))
    .await
    .unwrap();

    // At A: B pays with card and phone (written differently), then with e-mail only; D was never
    // referred; X comes back after the window; B also buys at a merchant that is not a partner.
    let b1 = pos
        .record_purchase(with_bearer(
            purchase(
                "p-1",
                "A-1",
                customer(B_CARD_AT_A, B_PHONE_AT_A, ""),
                12_000,
            ),
            &acceptor_key,
        ))
        .await
        .unwrap()
        .into_inner();
    // The POS retries b1: still one purchase.
    pos.record_purchase(with_bearer(
        purchase(
            "p-1",
            "A-1",
            customer(B_CARD_AT_A, B_PHONE_AT_A, ""),
            12_000,
        ),
        &acceptor_key,
    ))
    .await
    .unwrap();
    let b2 = pos
        .record_purchase(with_bearer(
            purchase("p-2", "A-2", customer("", "", B_EMAIL_AT_A), 4_555),
            &acceptor_key,
        ))
        .await
        .unwrap()
        .into_inner();
    pos.record_purchase(with_bearer(
        purchase("p-3", "A-3", customer("", "", D_EMAIL), 8_000),
        &acceptor_key,
    ))
    .await
    .unwrap();
    pos.record_purchase(with_bearer(
        purchase("p-4", "A-4", customer("", X_PHONE, ""), 5_000),
        &acceptor_key,
    ))
    .await
    .unwrap();
    pos.record_purchase(with_bearer(
        purchase("p-5", "U-1", customer("", B_PHONE_AT_A, ""), 9_900),
        &outsider_key,
    ))
    .await
    .unwrap();

    let seen = wait_for_activity(&stack, &referrer_key, 2).await;
    // Give stragglers (the purchases that must not count) the same chance to be applied.
    tandem_testkit::eventually(
        "the ledger to apply every purchase",
        Duration::from_secs(60),
        || async {
            let ledger = stack.schema("ledger").await;
            let purchases: i64 = sqlx::query_scalar("SELECT count(*) FROM purchases")
                .fetch_one(&ledger)
                .await
                .unwrap();
            (purchases == 5).then_some(())
        },
    )
    .await;
    let seen_after = activity(&stack, &referrer_key).await;
    assert_eq!(
        seen_after.len(),
        2,
        "only B's two purchases at A are C's: {seen_after:#?}"
    );
    assert_eq!(seen, seen_after);

    // Newest first: b2 then b1. 12 000 × 7.5% = 900; 4 555 × 7.5% = 341.625 → 342 (half-even).
    let expected = [
        (&b2.purchase_id, 4_555, 342),
        (&b1.purchase_id, 12_000, 900),
    ];
    for (purchase, (purchase_id, amount, commission)) in seen_after.iter().zip(expected) {
        assert_eq!(&purchase.purchase_id, purchase_id);
        assert_eq!(purchase.amount, eur(amount));
        assert_eq!(purchase.commission, eur(commission));
        assert_eq!(purchase.net_commission, eur(commission), "nothing refunded");
        assert_eq!(purchase.commission_rate_bps, 750);
        assert_eq!(purchase.terms_version, 1);
        assert_eq!(purchase.referral_id, b_referral.referral_id);
        assert_eq!(purchase.referrer_reference, "C-0001");
        assert_eq!(purchase.acceptor_merchant_id, acceptor);
        assert_eq!(purchase.partnership_id, partnership);
    }
    // The acceptor and the outsider referred nobody.
    assert!(activity(&stack, &acceptor_key).await.is_empty());
    assert!(activity(&stack, &outsider_key).await.is_empty());

    let (commissions, postings, sum) = ledger_totals(&stack).await;
    assert_eq!(
        (commissions, postings, sum),
        (2, 4, 0),
        "two balanced accruals"
    );

    // Redeliver everything: a ledger in a new consumer group reads both topics from the start.
    stack.restart_ledger("replay").await;
    let group = format!("{}-replay", stack.bus.topic_prefix);
    tandem_testkit::eventually(
        "the replaying ledger to commit past every message",
        Duration::from_secs(60),
        || async {
            let lag =
                tandem_testkit::group_lag(&stack.bus, &format!("{group}.admin"), Topic::Admin)
                    + tandem_testkit::group_lag(
                        &stack.bus,
                        &format!("{group}.activity"),
                        Topic::CustomerActivity,
                    );
            (lag == 0).then_some(())
        },
    )
    .await;
    assert_eq!(
        activity(&stack, &referrer_key).await,
        seen_after,
        "redelivery changed what C sees"
    );
    assert_eq!(
        ledger_totals(&stack).await,
        (2, 4, 0),
        "redelivery double counted"
    );

    // The replaying ledger keeps attributing new purchases.
    let b3 = pos
        .record_purchase(with_bearer(
            purchase("p-6", "A-6", customer("", B_PHONE_AT_A, ""), 1_000),
            &acceptor_key,
        ))
        .await
        .unwrap()
        .into_inner();
    let latest = wait_for_activity(&stack, &referrer_key, 3).await;
    assert_eq!(latest[0].purchase_id, b3.purchase_id);
    assert_eq!(latest[0].commission, eur(75));
    assert_eq!(ledger_totals(&stack).await, (3, 6, 0));

    // No raw identifier anywhere: not in any table of any service, not in any topic message.
    let raw_values = [
        "612345678",
        "6 12 34 56 78",
        B_EMAIL_AT_C,
        "b.martin",
        "example.com",
        B_CARD_AT_A,
        "dora.other",
        "3012345678",
    ];
    // Every message carries the trace of the call that caused it.
    for topic in Topic::ALL {
        for message in tandem_testkit::read_topic(&stack.bus, topic) {
            let traceparent = message
                .headers
                .iter()
                .find(|(name, _)| name == "traceparent")
                .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
                .expect("a traceparent header on every message");
            let parts: Vec<&str> = traceparent.split('-').collect();
            assert!(
                parts.len() == 4 && parts[1].len() == 32 && parts[1] != "0".repeat(32),
                "not a W3C traceparent: {traceparent}"
            );
        }
    }
    assert_never_stored_or_published(&stack, &raw_values).await;
    stack.stop().await;
}

#[tokio::test]
async fn a_late_referral_attributes_earlier_purchases_with_their_refunds() {
    let stack = Stack::start(true).await;
    let (acceptor, acceptor_key) = stack.merchant("Atelier Bikes").await;
    let (referrer, referrer_key) = stack.merchant("Cafe Lumiere").await;
    stack
        .partnership_since(
            &referrer,
            &acceptor,
            1000,
            30,
            Some(chrono::Utc::now() - chrono::Duration::days(20)),
        )
        .await;
    let mut pos = stack.pos().await;
    let days_ago = |days| {
        Some(tandem_proto::time::timestamp(
            chrono::Utc::now() - chrono::Duration::days(days),
        ))
    };

    // B bought at A five days ago, and returned half of it today.
    let bought = pos
        .record_purchase(with_bearer(
            pb::RecordPurchaseRequest {
                purchased_at: days_ago(5),
                ..purchase("p-1", "A-1", customer("", B_PHONE_AT_A, ""), 30_000)
            },
            &acceptor_key,
        ))
        .await
        .unwrap()
        .into_inner();
    pos.record_refund(with_bearer(
        pb::RecordRefundRequest {
            idempotency_key: "f-1".into(),
            transaction_id: "A-1".into(),
            amount: eur(15_000),
            ..Default::default()
        },
        &acceptor_key,
    ))
    .await
    .unwrap();
    // Only now does C's till, offline for a week, upload the referral it made ten days ago.
    pos.create_referral(with_bearer(
        pb::CreateReferralRequest {
            referred_at: days_ago(10),
            ..referral("r-1", &acceptor, customer("", B_PHONE_AT_C, ""))
        },
        &referrer_key,
    ))
    .await
    .unwrap();

    let line = tandem_testkit::eventually(
        "the late attribution with its refund",
        Duration::from_secs(60),
        || async {
            let lines = stack
                .pos()
                .await
                .list_commissions(with_bearer(
                    pb::ListCommissionsRequest {
                        role: pb::PartnershipRole::Referrer as i32,
                        ..Default::default()
                    },
                    &referrer_key,
                ))
                .await
                .unwrap()
                .into_inner()
                .lines;
            lines
                .into_iter()
                .find(|l| l.reversed.as_ref().is_some_and(|r| r.amount_minor > 0))
        },
    )
    .await;
    assert_eq!(line.purchase_id, bought.purchase_id);
    assert_eq!(
        (
            line.commission.clone(),
            line.refunded.clone(),
            line.reversed.clone(),
            line.net_commission.clone()
        ),
        (eur(3_000), eur(15_000), eur(1_500), eur(1_500))
    );
    stack.stop().await;
}
