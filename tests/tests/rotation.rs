//! Rotating the customer-key network secret without missing an attribution: a referral recorded
//! under version 1 matches a purchase made after the gateway moved to version 2 with version 1
//! kept as previous; a referral made during the change-over matches after version 1 is retired;
//! each purchase is attributed once (its copies under two versions do not count twice); and a
//! till's retry answered by a gateway on the other side of the change is the same request.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::time::Duration;

use support::*;
use tandem_proto::v1 as pb;

const VERSION_2: &str = "2:202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f";

fn phone(number: &str) -> pb::CustomerIdentifiers {
    customer("", number, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_key_rotation_misses_no_attribution_and_counts_none_twice() {
    let mut stack = Stack::start(true).await;
    let (acceptor, acceptor_key) = stack.merchant("Atelier Bikes").await;
    let (referrer, referrer_key) = stack.merchant("Cafe Lumiere").await;
    stack.partnership(&referrer, &acceptor, 500, 30).await;
    let before = "+33 6 11 22 33 44";
    let during = "+33 6 55 66 77 88";

    // Version 1: a referral, and a purchase whose answer the till never got.
    stack
        .pos()
        .await
        .create_referral(with_bearer(
            referral("rot-r1", &acceptor, phone(before)),
            &referrer_key,
        ))
        .await
        .unwrap();
    let unanswered = purchase("rot-p0", "T-rot-0", phone(before), 1_000);
    let first_try = stack
        .pos()
        .await
        .record_purchase(with_bearer(unanswered.clone(), &acceptor_key))
        .await
        .unwrap()
        .into_inner();
    wait_for_activity(&stack, &referrer_key, 1).await;

    // The change-over: version 2 current, version 1 kept as previous.
    stack.network_key = VERSION_2.to_owned();
    stack.previous_network_keys = vec![NETWORK_KEY.to_owned()];
    stack.restart_gateway().await;
    let mut pos = stack.pos().await;
    // The till's retry, answered by the rotated gateway: the same request, the first answer.
    let retried = pos
        .record_purchase(with_bearer(unanswered, &acceptor_key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.purchase_id, first_try.purchase_id);
    // The customer referred under version 1 buys: attributed.
    pos.record_purchase(with_bearer(
        purchase("rot-p1", "T-rot-1", phone(before), 2_000),
        &acceptor_key,
    ))
    .await
    .unwrap();
    pos.create_referral(with_bearer(
        referral("rot-r2", &acceptor, phone(during)),
        &referrer_key,
    ))
    .await
    .unwrap();
    wait_for_activity(&stack, &referrer_key, 2).await;

    // Version 1 retired: the customer referred during the change-over buys: attributed.
    stack.previous_network_keys.clear();
    stack.restart_gateway().await;
    let mut pos = stack.pos().await;
    pos.record_purchase(with_bearer(
        purchase("rot-p2", "T-rot-2", phone(during), 3_000),
        &acceptor_key,
    ))
    .await
    .unwrap();
    let activity = wait_for_activity(&stack, &referrer_key, 3).await;
    assert_eq!(activity.len(), 3, "{activity:?}");

    // Each purchase once: one commission line each, though two copies were published.
    let ledger = stack.schema("ledger").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let commissions: Vec<(String, i64)> =
        sqlx::query_as("SELECT purchase_id, amount_minor FROM commissions ORDER BY amount_minor")
            .fetch_all(&ledger)
            .await
            .unwrap();
    assert_eq!(
        commissions.iter().map(|c| c.1).collect::<Vec<_>>(),
        [1_000, 2_000, 3_000]
    );
    let versions: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT substring(customer_key from '^ck[0-9]+') FROM referral_keys ORDER BY 1",
    )
    .fetch_all(&ledger)
    .await
    .unwrap();
    assert_eq!(
        versions,
        ["ck1", "ck2"],
        "the change-over referral has keys of both"
    );
    ledger.close().await;
    stack.stop().await;
}
