//! Bulk calls: `RecordPurchases` and `RecordRefunds` with valid and invalid items mixed, retried
//! with the same keys, answer each item and record each valid one exactly once.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::time::Duration;

use support::*;
use tandem_proto::v1 as pb;
use tonic::Code;

const B_PHONE: &str = "+33 6 12 34 56 78";

fn outcome_of(result: &pb::RecordPurchaseResult) -> Result<String, (Code, String)> {
    match result.outcome.as_ref().expect("every item has an outcome") {
        pb::record_purchase_result::Outcome::Recorded(recorded) => Ok(recorded.purchase_id.clone()),
        pb::record_purchase_result::Outcome::Error(error) => {
            Err((Code::from_i32(error.code), error.message.clone()))
        }
    }
}

fn refund_outcome(result: &pb::RecordRefundResult) -> Result<(String, i64), (Code, String)> {
    match result.outcome.as_ref().expect("every item has an outcome") {
        pb::record_refund_result::Outcome::Recorded(recorded) => Ok((
            recorded.refund_id.clone(),
            recorded.refunded.as_ref().unwrap().amount_minor,
        )),
        pb::record_refund_result::Outcome::Error(error) => {
            Err((Code::from_i32(error.code), error.message.clone()))
        }
    }
}

#[tokio::test]
async fn bulk_calls_answer_every_item_and_record_each_valid_one_exactly_once() {
    let stack = Stack::start(true).await;
    let (acceptor, acceptor_key) = stack.merchant("Atelier Bikes").await;
    let (referrer, referrer_key) = stack.merchant("Cafe Lumiere").await;
    stack.partnership(&referrer, &acceptor, 1_000, 30).await;
    let mut pos = stack.pos().await;
    pos.create_referral(with_bearer(
        referral("r-1", &acceptor, customer("", B_PHONE, "")),
        &referrer_key,
    ))
    .await
    .unwrap();

    let items = vec![
        // 0: B, referred.
        purchase("k-0", "T-0", customer("", "0033 612 345 678", ""), 10_000),
        // 1: a phone that is not one.
        purchase("k-1", "T-1", customer("", "12345", ""), 1_000),
        // 2: another customer.
        purchase("k-2", "T-2", customer("", "", "dora@example.org"), 2_000),
        // 3: the transaction of item 0 again, under another key.
        purchase("k-3", "T-0", customer("", B_PHONE, ""), 10_000),
        // 4: item 0 sent twice in one call: the same answer.
        purchase("k-0", "T-0", customer("", "0033 612 345 678", ""), 10_000),
        // 5: a card number where the PAR goes.
        pb::RecordPurchaseRequest {
            customer: Some(pb::CustomerIdentifiers {
                payment_account_reference: "4111111111111111".into(),
                ..Default::default()
            }),
            ..purchase("k-5", "T-5", customer("", "", ""), 500)
        },
        // 6: acting for another merchant.
        pb::RecordPurchaseRequest {
            merchant_id: referrer.clone(),
            ..purchase("k-6", "T-6", customer("", B_PHONE, ""), 500)
        },
    ];
    let call = |items: Vec<pb::RecordPurchaseRequest>| {
        let mut pos = pos.clone();
        let key = acceptor_key.clone();
        async move {
            pos.record_purchases(with_bearer(
                pb::RecordPurchasesRequest { purchases: items },
                &key,
            ))
            .await
        }
    };
    let first = call(items.clone()).await.unwrap().into_inner().results;
    assert_eq!(first.len(), items.len());
    for (index, result) in first.iter().enumerate() {
        assert_eq!(result.index as usize, index);
    }
    let outcomes: Vec<_> = first.iter().map(outcome_of).collect();
    let recorded_0 = outcomes[0].clone().expect("item 0 recorded");
    outcomes[2].clone().expect("item 2 recorded");
    let refused = |index: usize, code: Code, mentions: &str| {
        let (got, message) = outcomes[index].clone().expect_err("refused");
        assert_eq!(got, code, "item {index}: {message}");
        assert!(message.contains(mentions), "item {index}: {message}");
    };
    refused(1, Code::InvalidArgument, "purchases[1].customer.phone");
    refused(3, Code::AlreadyExists, "transaction_id \"T-0\"");
    assert_eq!(outcomes[4], Ok(recorded_0.clone()), "one key, one purchase");
    refused(
        5,
        Code::InvalidArgument,
        "purchases[5].customer.payment_account_reference",
    );
    refused(6, Code::PermissionDenied, "");

    // The till retries the whole call: every item answers as before, nothing is recorded twice.
    let again = call(items.clone()).await.unwrap().into_inner().results;
    assert_eq!(again.iter().map(outcome_of).collect::<Vec<_>>(), outcomes);
    let gateway = stack.schema("gateway").await;
    let purchases: i64 =
        sqlx::query_scalar("SELECT count(*) FROM purchases WHERE merchant_id = $1")
            .bind(&acceptor)
            .fetch_one(&gateway)
            .await
            .unwrap();
    assert_eq!(purchases, 2);

    // Refunds in one call apply in order: a partial refund, then a void of the rest.
    let refund = |key: &str, transaction: &str, amount: Option<i64>| pb::RecordRefundRequest {
        idempotency_key: key.into(),
        transaction_id: transaction.into(),
        amount: amount.and_then(eur),
        void: amount.is_none(),
        ..Default::default()
    };
    let refunds = vec![
        refund("f-0", "T-0", Some(3_000)),
        refund("f-1", "T-0", None),
        refund("f-2", "T-unknown", Some(100)),
        refund("f-3", "T-2", Some(5_000)),
        refund("f-4", "T-2", Some(500)),
    ];
    let refund_call = |refunds: Vec<pb::RecordRefundRequest>| {
        let mut pos = pos.clone();
        let key = acceptor_key.clone();
        async move {
            pos.record_refunds(with_bearer(pb::RecordRefundsRequest { refunds }, &key))
                .await
                .unwrap()
                .into_inner()
                .results
                .iter()
                .map(refund_outcome)
                .collect::<Vec<_>>()
        }
    };
    let refunded = refund_call(refunds.clone()).await;
    assert_eq!(refunded[0].as_ref().unwrap().1, 3_000);
    assert_eq!(
        refunded[1].as_ref().unwrap().1,
        7_000,
        "the void takes what is left"
    );
    assert_eq!(
        refunded[2].as_ref().unwrap_err().0,
        Code::FailedPrecondition
    );
    assert_eq!(
        refunded[3].as_ref().unwrap_err().0,
        Code::FailedPrecondition,
        "beyond the purchase"
    );
    assert_eq!(refunded[4].as_ref().unwrap().1, 500);
    // Retried: the recorded refunds answer as before; the refused ones are judged again (a
    // refused item is not stored), with the same status.
    let retried = refund_call(refunds).await;
    for (first, again) in refunded.iter().zip(&retried) {
        match (first, again) {
            (Ok(first), Ok(again)) => assert_eq!(first, again),
            (Err(first), Err(again)) => assert_eq!(first.0, again.0),
            _ => panic!("a retried bulk refund changed an outcome: {first:?} then {again:?}"),
        }
    }

    // Limits: an empty call and one over 500 items are refused as a whole.
    for size in [0, 501] {
        let status = call(vec![purchase("k", "T", customer("", B_PHONE, ""), 1); size])
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("1 to 500"),
            "{}",
            status.message()
        );
    }

    // The ledger saw B's purchase once, with its refunds.
    let line = tandem_testkit::eventually(
        "B's purchase attributed and fully refunded",
        Duration::from_secs(60),
        || {
            let mut pos = pos.clone();
            let key = referrer_key.clone();
            let purchase_id = recorded_0.clone();
            async move {
                let explained = pos
                    .explain_commission(with_bearer(
                        pb::ExplainCommissionRequest { purchase_id },
                        &key,
                    ))
                    .await
                    .ok()?
                    .into_inner();
                let line = explained.line?;
                (line.refunded.as_ref()?.amount_minor == 10_000).then_some(line)
            }
        },
    )
    .await;
    assert_eq!(line.commission.unwrap().amount_minor, 1_000);
    assert_eq!(line.reversed.unwrap().amount_minor, 1_000);
    stack.stop().await;
}
