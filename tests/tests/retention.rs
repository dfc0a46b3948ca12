//! Bookkeeping retention: the marks of applied messages and merchants' idempotency records are
//! pruned once older than their retention, operators' records never, and what the pruning
//! removed cannot make anything count twice: a purchase retried after its idempotency record is
//! gone is refused as a recorded transaction, not recorded again. (Rows are aged by moving their
//! timestamps back, so the test does not wait a day.)
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::time::Duration;

use support::*;
use tonic::Code;

async fn count(pool: &sqlx::PgPool, query: &str) -> i64 {
    sqlx::query_scalar(query).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_marks_and_merchants_idempotency_records_are_pruned_and_nothing_counts_twice() {
    let stack = Stack::start_configured(true, |stack| {
        stack.retention.prune_every_secs = 1;
    })
    .await;
    let (acceptor, acceptor_key) = stack.merchant("Atelier Bikes").await;
    let (referrer, referrer_key) = stack.merchant("Cafe Lumiere").await;
    stack.partnership(&referrer, &acceptor, 500, 30).await;
    let mut pos = stack.pos().await;
    let customer = || customer("", "+33612345678", "");
    pos.create_referral(with_bearer(
        referral("retention-r", &acceptor, customer()),
        &referrer_key,
    ))
    .await
    .unwrap();
    let first = purchase("retention-p1", "T-retention-1", customer(), 4_000);
    let recorded = pos
        .record_purchase(with_bearer(first.clone(), &acceptor_key))
        .await
        .unwrap()
        .into_inner();
    wait_for_activity(&stack, &referrer_key, 1).await;

    let gateway = stack.schema("gateway").await;
    let ledger = stack.schema("ledger").await;
    let operator_records = count(
        &gateway,
        "SELECT count(*) FROM idempotency_records WHERE merchant_id = 'operator'",
    )
    .await;
    assert!(operator_records >= 3, "two merchants and a partnership");
    let marks = count(&ledger, "SELECT count(*) FROM applied_messages").await;
    assert!(marks > 0, "the ledger marks what it applied");

    // Every record and every mark but one is eight days old: past the seven-day retention.
    sqlx::query("UPDATE idempotency_records SET recorded_at = now() - interval '8 days'")
        .execute(&gateway)
        .await
        .unwrap();
    let kept: String = sqlx::query_scalar("SELECT max(message_id) FROM applied_messages")
        .fetch_one(&ledger)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE applied_messages SET applied_at = now() - interval '8 days' WHERE message_id <> $1",
    )
    .bind(&kept)
    .execute(&ledger)
    .await
    .unwrap();
    tandem_testkit::eventually("the pruning", Duration::from_secs(30), || async {
        let merchants = count(
            &gateway,
            "SELECT count(*) FROM idempotency_records WHERE merchant_id <> 'operator'",
        )
        .await;
        let aged = count(
            &ledger,
            "SELECT count(*) FROM applied_messages WHERE applied_at < now() - interval '7 days'",
        )
        .await;
        (merchants == 0 && aged == 0).then_some(())
    })
    .await;
    let still_there: i64 =
        sqlx::query_scalar("SELECT count(*) FROM applied_messages WHERE message_id = $1")
            .bind(&kept)
            .fetch_one(&ledger)
            .await
            .unwrap();
    assert_eq!(still_there, 1, "a recent mark is kept");
    assert_eq!(
        count(
            &gateway,
            "SELECT count(*) FROM idempotency_records WHERE merchant_id = 'operator'"
        )
        .await,
        operator_records,
        "operators' idempotency records are kept"
    );

    // The till retries the first purchase with its key, after the key was forgotten: the
    // transaction is known, so it is refused, and the ledger still has one commission.
    let retried = pos
        .record_purchase(with_bearer(first, &acceptor_key))
        .await
        .unwrap_err();
    assert_eq!(retried.code(), Code::AlreadyExists, "{retried:?}");
    assert!(
        retried.message().contains("T-retention-1") && retried.message().contains("remembered"),
        "{}",
        retried.message()
    );
    // A new purchase after the pruning is attributed as usual.
    pos.record_purchase(with_bearer(
        purchase("retention-p2", "T-retention-2", customer(), 2_500),
        &acceptor_key,
    ))
    .await
    .unwrap();
    let purchases = wait_for_activity(&stack, &referrer_key, 2).await;
    assert_eq!(purchases.len(), 2);
    assert_eq!(
        count(&ledger, "SELECT count(*) FROM commissions").await,
        2,
        "one commission per purchase"
    );
    assert!(purchases
        .iter()
        .any(|purchase| purchase.purchase_id == recorded.purchase_id));
    gateway.close().await;
    ledger.close().await;
    stack.stop().await;
}
