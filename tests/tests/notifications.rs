//! Notifications end to end: a referrer subscribes through the gateway, purchases at its partner
//! are attributed, and it hears about each; it disconnects and resumes from its cursor without a
//! gap or a duplicate; each side sees only what it may; another merchant sees nothing of it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::{customer, purchase, referral, with_bearer, Stack};
use tandem_proto::v1 as pb;
use tandem_proto::v1::notification_service_client::NotificationServiceClient;
use tonic::{Code, Streaming};

async fn subscribe(
    stack: &Stack,
    key: &str,
    request: pb::SubscribeRequest,
) -> Result<Streaming<pb::Notification>, tonic::Status> {
    NotificationServiceClient::new(stack.channel().await)
        .subscribe(with_bearer(request, key))
        .await
        .map(tonic::Response::into_inner)
}

/// The next `count` notifications of `stream`, waiting at most 60 s for them.
async fn next(stream: &mut Streaming<pb::Notification>, count: usize) -> Vec<pb::Notification> {
    let mut got = Vec::with_capacity(count);
    while got.len() < count {
        let item = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {count} notifications in 60 s: {got:?}",
                    got.len()
                )
            })
            .expect("stream stays healthy")
            .expect("stream stays open");
        got.push(item);
    }
    got
}

fn payload(notification: &pb::Notification) -> serde_json::Value {
    serde_json::from_str(&notification.payload_json).unwrap()
}

#[tokio::test]
async fn a_referrer_hears_of_each_purchase_and_resumes_from_its_cursor_exactly_once() {
    let mut stack = Stack::start(true).await;
    stack.start_notifications().await;
    let (acceptor, acceptor_key) = stack.merchant("A").await;
    let (referrer, referrer_key) = stack.merchant("C").await;
    let (_stranger, stranger_key) = stack.merchant("X").await;
    stack.partnership(&referrer, &acceptor, 500, 30).await;

    // C subscribes before anything happens.
    let mut stream = subscribe(&stack, &referrer_key, pb::SubscribeRequest::default())
        .await
        .unwrap();
    let mut pos = stack.pos().await;
    let who = customer("card-fingerprint-notify-1", "", "notify-1@example.com");
    pos.create_referral(with_bearer(
        pb::CreateReferralRequest {
            referrer_reference: "C-receipt-77".into(),
            ..referral("n-ref", &acceptor, who.clone())
        },
        &referrer_key,
    ))
    .await
    .unwrap();
    for (index, amount) in [10_000, 2_000, 4_550].into_iter().enumerate() {
        pos.record_purchase(with_bearer(
            purchase(
                &format!("n-buy-{index}"),
                &format!("T-{index}"),
                who.clone(),
                amount,
            ),
            &acceptor_key,
        ))
        .await
        .unwrap();
    }
    // One conversion, and for each purchase its attribution and, with no holding period, its
    // commission becoming payable: seven. Read three, then hang up.
    let first = next(&mut stream, 3).await;
    drop(stream);
    let last_seen = first.last().unwrap().cursor;
    let mut resumed = subscribe(
        &stack,
        &referrer_key,
        pb::SubscribeRequest {
            after_cursor: last_seen,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let rest = next(&mut resumed, 4).await;
    let all: Vec<&pb::Notification> = first.iter().chain(&rest).collect();
    let cursors: Vec<u64> = all.iter().map(|n| n.cursor).collect();
    assert_eq!(
        cursors,
        (1..=7).collect::<Vec<u64>>(),
        "no gap, no duplicate"
    );
    let ids: BTreeSet<&str> = all.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids.len(), 7);
    let kinds: Vec<&str> = all.iter().map(|n| n.r#type.as_str()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "referral.converted").count(),
        1
    );
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == "purchase.attributed")
            .count(),
        3
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "commission.payable").count(),
        3
    );
    // Nothing more for now.
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), resumed.message())
            .await
            .is_err(),
        "no eighth notification"
    );

    // The referrer's view: its own reference, the amount and commission; never the acceptor's
    // transaction id, never an identifier.
    let attributed: Vec<serde_json::Value> = all
        .iter()
        .filter(|n| n.r#type == "purchase.attributed")
        .map(|n| payload(n))
        .collect();
    let first_purchase = attributed
        .iter()
        .find(|p| p["data"]["amount"]["amount_minor"] == 10_000)
        .unwrap();
    assert_eq!(first_purchase["type"], "purchase.attributed");
    assert_eq!(first_purchase["version"], 1);
    assert_eq!(first_purchase["merchant_id"], referrer.as_str());
    assert_eq!(first_purchase["data"]["role"], "referrer");
    assert_eq!(first_purchase["data"]["referrer_reference"], "C-receipt-77");
    assert_eq!(first_purchase["data"]["commission"]["amount_minor"], 500);
    assert_eq!(
        first_purchase["data"]["acceptor_merchant_id"],
        acceptor.as_str()
    );
    assert!(first_purchase["data"].get("transaction_id").is_none());
    for notification in &all {
        for raw in ["card-fingerprint-notify-1", "notify-1@example.com"] {
            assert!(!notification.payload_json.contains(raw), "{raw} leaked");
        }
    }

    // The acceptor's view of the same purchases: its transaction id, what it owes, to whom.
    let mut acceptor_stream = subscribe(
        &stack,
        &acceptor_key,
        pb::SubscribeRequest {
            types: vec!["purchase.attributed".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let theirs = next(&mut acceptor_stream, 3).await;
    for notification in &theirs {
        let body = payload(notification);
        assert_eq!(body["data"]["role"], "acceptor");
        assert_eq!(body["data"]["referrer_merchant_id"], referrer.as_str());
        assert!(body["data"]["transaction_id"]
            .as_str()
            .unwrap()
            .starts_with("T-"));
        assert!(body["data"].get("referrer_reference").is_none());
    }

    // A filter by type, from the start.
    let mut payable = subscribe(
        &stack,
        &referrer_key,
        pb::SubscribeRequest {
            types: vec!["commission.payable".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let only = next(&mut payable, 3).await;
    assert!(only.iter().all(|n| n.r#type == "commission.payable"));

    // Another merchant: nothing of C's, and it cannot ask for C's.
    let refused = subscribe(
        &stack,
        &stranger_key,
        pb::SubscribeRequest {
            merchant_id: referrer.clone(),
            ..Default::default()
        },
    )
    .await
    .expect_err("refused");
    assert_eq!(refused.code(), Code::PermissionDenied);
    let mut own = subscribe(&stack, &stranger_key, pb::SubscribeRequest::default())
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), own.message())
            .await
            .is_err(),
        "a merchant with no activity hears nothing"
    );
    let unauthenticated = NotificationServiceClient::new(stack.channel().await)
        .subscribe(pb::SubscribeRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);
    let bad_type = subscribe(
        &stack,
        &referrer_key,
        pb::SubscribeRequest {
            types: vec!["Purchase Attributed".into()],
            ..Default::default()
        },
    )
    .await
    .expect_err("refused");
    assert_eq!(bad_type.code(), Code::InvalidArgument);
    stack.stop().await;
}
