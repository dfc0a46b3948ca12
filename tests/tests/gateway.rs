//! The merchant gateway on the real Postgres and broker: authentication, validation, idempotency
//! and acting only as oneself. Invalid requests must publish nothing.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use support::*;
use tandem_bus::Topic;
use tandem_proto::v1 as pb;
use tonic::Code;

const PHONE: &str = "+44 20 7946 0958";

async fn count(pool: &sqlx::PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn invalid_requests_get_precise_statuses_and_publish_nothing() {
    let stack = Stack::start(false).await;
    let (acceptor, acceptor_key) = stack.merchant("Acceptor").await;
    let (referrer, referrer_key) = stack.merchant("Referrer").await;
    let (stranger, _) = stack.merchant("Stranger").await;
    stack.partnership(&referrer, &acceptor, 1000, 30).await;
    let gateway_db = stack.schema("gateway").await;
    let events_before = count(&gateway_db, "events").await;
    let mut pos = stack.pos().await;

    // Purchases: every field, one mistake at a time.
    let valid = || purchase("idem-1", "txn-1", customer("", PHONE, ""), 1250);
    let cases: Vec<(pb::RecordPurchaseRequest, Code, &str)> = vec![
        (
            pb::RecordPurchaseRequest {
                idempotency_key: String::new(),
                ..valid()
            },
            Code::InvalidArgument,
            "idempotency_key",
        ),
        (
            pb::RecordPurchaseRequest {
                idempotency_key: "x".repeat(129),
                ..valid()
            },
            Code::InvalidArgument,
            "idempotency_key",
        ),
        (
            pb::RecordPurchaseRequest {
                transaction_id: " ".into(),
                ..valid()
            },
            Code::InvalidArgument,
            "transaction_id",
        ),
        (
            pb::RecordPurchaseRequest {
                customer: None,
                ..valid()
            },
            Code::InvalidArgument,
            "customer",
        ),
        (
            pb::RecordPurchaseRequest {
                customer: Some(customer("", "", "")),
                ..valid()
            },
            Code::InvalidArgument,
            "customer",
        ),
        (
            pb::RecordPurchaseRequest {
                customer: Some(customer("4111 1111 1111 1111", "", "")),
                ..valid()
            },
            Code::InvalidArgument,
            "card number",
        ),
        (
            pb::RecordPurchaseRequest {
                customer: Some(customer("", "020 7946 0958", "")),
                ..valid()
            },
            Code::InvalidArgument,
            "customer.phone",
        ),
        (
            pb::RecordPurchaseRequest {
                customer: Some(customer("", "", "no-at-sign")),
                ..valid()
            },
            Code::InvalidArgument,
            "customer.email",
        ),
        (
            pb::RecordPurchaseRequest {
                amount: None,
                ..valid()
            },
            Code::InvalidArgument,
            "amount",
        ),
        (
            pb::RecordPurchaseRequest {
                amount: eur(0),
                ..valid()
            },
            Code::InvalidArgument,
            "amount.amount_minor",
        ),
        (
            pb::RecordPurchaseRequest {
                amount: eur(-5),
                ..valid()
            },
            Code::InvalidArgument,
            "amount.amount_minor",
        ),
        // Above the documented maximum (one trillion minor units): two such purchases near the
        // 64-bit limit used to break the commission totals.
        (
            pb::RecordPurchaseRequest {
                amount: eur(1_000_000_000_001),
                ..valid()
            },
            Code::InvalidArgument,
            "amount.amount_minor: must be at most 1000000000000",
        ),
        (
            pb::RecordPurchaseRequest {
                amount: eur(i64::MAX),
                ..valid()
            },
            Code::InvalidArgument,
            "amount.amount_minor",
        ),
        (
            pb::RecordPurchaseRequest {
                amount: Some(pb::Money {
                    amount_minor: 100,
                    currency: "eur".into(),
                }),
                ..valid()
            },
            Code::InvalidArgument,
            "amount.currency",
        ),
        (
            pb::RecordPurchaseRequest {
                purchased_at: Some(tandem_proto::time::timestamp(
                    chrono::Utc::now() + chrono::Duration::hours(1),
                )),
                ..valid()
            },
            Code::InvalidArgument,
            "purchased_at",
        ),
        (
            pb::RecordPurchaseRequest {
                purchased_at: Some(tandem_proto::time::timestamp(
                    chrono::Utc::now() - chrono::Duration::days(31),
                )),
                ..valid()
            },
            Code::InvalidArgument,
            "purchased_at",
        ),
        (
            pb::RecordPurchaseRequest {
                merchant_id: stranger.clone(),
                ..valid()
            },
            Code::PermissionDenied,
            "act only as itself",
        ),
    ];
    for (request, code, mentions) in cases {
        assert_status(
            pos.record_purchase(with_bearer(request, &acceptor_key))
                .await,
            code,
            mentions,
        );
    }

    // Credentials.
    assert_status(
        pos.record_purchase(tonic::Request::new(valid())).await,
        Code::Unauthenticated,
        "authorization",
    );
    assert_status(
        pos.record_purchase(with_bearer(valid(), "tdm_not-a-key"))
            .await,
        Code::Unauthenticated,
        "API key",
    );
    assert_status(
        pos.record_purchase(with_bearer(valid(), OPERATOR_TOKEN))
            .await,
        Code::Unauthenticated,
        "API key",
    );

    // Referrals.
    let valid_referral = || referral("idem-r", &acceptor, customer("", PHONE, ""));
    let referral_cases: Vec<(pb::CreateReferralRequest, &str, Code, &str)> = vec![
        (
            pb::CreateReferralRequest {
                acceptor_merchant_id: "A".into(),
                ..valid_referral()
            },
            &referrer_key,
            Code::InvalidArgument,
            "acceptor_merchant_id",
        ),
        (
            pb::CreateReferralRequest {
                acceptor_merchant_id: referrer.clone(),
                ..valid_referral()
            },
            &referrer_key,
            Code::InvalidArgument,
            "itself",
        ),
        (
            pb::CreateReferralRequest {
                referrer_reference: "4111111111111111".into(),
                ..valid_referral()
            },
            &referrer_key,
            Code::InvalidArgument,
            "referrer_reference",
        ),
        (
            pb::CreateReferralRequest {
                acceptor_merchant_id: stranger.clone(),
                ..valid_referral()
            },
            &referrer_key,
            Code::FailedPrecondition,
            "no partnership",
        ),
        // The partnership is directed: the acceptor cannot refer back without one of its own.
        (
            pb::CreateReferralRequest {
                acceptor_merchant_id: referrer.clone(),
                ..valid_referral()
            },
            &acceptor_key,
            Code::FailedPrecondition,
            "no partnership",
        ),
    ];
    for (request, key, code, mentions) in referral_cases {
        assert_status(
            pos.create_referral(with_bearer(request, key)).await,
            code,
            mentions,
        );
    }

    // Operator calls.
    let mut operator = stack.operator().await;
    let merchant = || pb::CreateMerchantRequest {
        idempotency_key: uuid::Uuid::new_v4().to_string(),
        display_name: "M".into(),
        settlement_currency: "EUR".into(),
        time_zone: "Europe/Paris".into(),
        ..Default::default()
    };
    assert_status(
        operator
            .create_merchant(with_bearer(merchant(), &acceptor_key))
            .await,
        Code::Unauthenticated,
        "operator token",
    );
    assert_status(
        operator
            .create_merchant(as_operator(pb::CreateMerchantRequest {
                display_name: " ".into(),
                ..merchant()
            }))
            .await,
        Code::InvalidArgument,
        "display_name",
    );
    assert_status(
        operator
            .create_merchant(as_operator(pb::CreateMerchantRequest {
                settlement_currency: "EURO".into(),
                ..merchant()
            }))
            .await,
        Code::InvalidArgument,
        "settlement_currency",
    );
    // Unknown zones too, even well-formed ones: the settlement cut-offs need the zone's rules.
    for zone in ["Paris time", "Europe/Pariss", "Mars/Olympus_Mons"] {
        assert_status(
            operator
                .create_merchant(as_operator(pb::CreateMerchantRequest {
                    time_zone: zone.into(),
                    ..merchant()
                }))
                .await,
            Code::InvalidArgument,
            "time_zone",
        );
    }
    let partnership = |referrer: &str, acceptor: &str, rate, days| pb::CreatePartnershipRequest {
        referrer_merchant_id: referrer.into(),
        acceptor_merchant_id: acceptor.into(),
        commission_rate_bps: rate,
        attribution_window_days: days,
        effective_from: None,
        idempotency_key: uuid::Uuid::new_v4().to_string(),
        ..Default::default()
    };
    assert_status(
        operator
            .create_partnership(as_operator(partnership(&referrer, &acceptor, 1000, 30)))
            .await,
        Code::AlreadyExists,
        "already exists",
    );
    assert_status(
        operator
            .create_partnership(as_operator(partnership(&referrer, &referrer, 1000, 30)))
            .await,
        Code::InvalidArgument,
        "acceptor_merchant_id",
    );
    assert_status(
        operator
            .create_partnership(as_operator(partnership(&stranger, &acceptor, 0, 30)))
            .await,
        Code::InvalidArgument,
        "commission_rate_bps",
    );
    assert_status(
        operator
            .create_partnership(as_operator(partnership(&stranger, &acceptor, 500, 400)))
            .await,
        Code::InvalidArgument,
        "attribution_window_days",
    );
    let unknown = tandem_domain_id("mer_");
    assert_status(
        operator
            .create_partnership(as_operator(partnership(&stranger, &unknown, 500, 30)))
            .await,
        Code::FailedPrecondition,
        "not a registered merchant",
    );

    // Nothing was recorded, so nothing can have been published.
    assert_eq!(count(&gateway_db, "events").await, events_before);
    assert_eq!(count(&gateway_db, "purchases").await, 0);
    assert_eq!(merchant_idempotency_records(&gateway_db).await, 0);
    let activity = tandem_testkit::read_topic(&stack.bus, Topic::CustomerActivity);
    assert!(
        activity.is_empty(),
        "invalid requests published {} messages",
        activity.len()
    );
    stack.stop().await;
}

fn tandem_domain_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::now_v7().simple())
}

#[tokio::test]
async fn a_retried_request_is_recorded_once_and_a_reused_key_is_refused() {
    let stack = Stack::start(false).await;
    let (_, acceptor_key) = stack.merchant("Acceptor").await;
    let (_, other_key) = stack.merchant("Other").await;
    let mut pos = stack.pos().await;
    let request = purchase(
        "retry-1",
        "txn-100",
        customer("fp_card_0001", PHONE, "ana@example.com"),
        4_999,
    );

    let first = pos
        .record_purchase(with_bearer(request.clone(), &acceptor_key))
        .await
        .unwrap()
        .into_inner();
    let second = pos
        .record_purchase(with_bearer(request.clone(), &acceptor_key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, second, "a retry returns the first answer");

    // Same key, different payload.
    let changed = pb::RecordPurchaseRequest {
        amount: eur(5_000),
        ..request.clone()
    };
    assert_status(
        pos.record_purchase(with_bearer(changed, &acceptor_key))
            .await,
        Code::AlreadyExists,
        "idempotency_key",
    );
    // Same transaction, new key.
    let again = pb::RecordPurchaseRequest {
        idempotency_key: "retry-2".into(),
        ..request.clone()
    };
    assert_status(
        pos.record_purchase(with_bearer(again, &acceptor_key)).await,
        Code::AlreadyExists,
        "transaction_id",
    );
    // Keys are scoped per merchant: another merchant may use the same key and transaction id.
    let other = pos
        .record_purchase(with_bearer(request.clone(), &other_key))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(other.purchase_id, first.purchase_id);

    // Concurrent tries of one new request: one purchase, one answer.
    let concurrent = purchase("retry-3", "txn-101", customer("", PHONE, ""), 700);
    let tries = (0..8).map(|_| {
        let mut pos = pos.clone();
        let request = with_bearer(concurrent.clone(), &acceptor_key);
        tokio::spawn(async move {
            pos.record_purchase(request)
                .await
                .map(|r| r.into_inner().purchase_id)
        })
    });
    let mut ids: Vec<String> = Vec::new();
    for attempt in tries {
        ids.push(
            attempt
                .await
                .unwrap()
                .expect("every concurrent try succeeds"),
        );
    }
    ids.dedup();
    assert_eq!(
        ids.len(),
        1,
        "concurrent tries returned different purchases: {ids:?}"
    );

    let gateway_db = stack.schema("gateway").await;
    assert_eq!(count(&gateway_db, "purchases").await, 3);
    let purchase_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'PurchaseRecorded'")
            .fetch_one(&gateway_db)
            .await
            .unwrap();
    assert_eq!(purchase_events, 3);

    // Each purchase is published once per customer key: 3 keys, 3 keys, 1 key.
    let published = tandem_testkit::eventually(
        "the relay to publish 7 messages",
        std::time::Duration::from_secs(30),
        || {
            let bus = stack.bus.clone();
            async move {
                let messages = tandem_testkit::read_topic(&bus, Topic::CustomerActivity);
                (messages.len() >= 7).then_some(messages)
            }
        },
    )
    .await;
    assert_eq!(published.len(), 7);
    stack.stop().await;
}

/// Single calls share transactions (group commit): a burst of concurrent calls, some of them
/// retries of one request and some reusing one transaction id under different keys, answers each
/// call as if it had been alone.
#[tokio::test]
async fn concurrent_calls_are_committed_in_groups_and_each_is_answered_on_its_own() {
    let stack = Stack::start(false).await;
    let (_, key) = stack.merchant("Busy till").await;
    let pos = stack.pos().await;
    let retried = purchase("same-key", "txn-retried", customer("", PHONE, ""), 900);
    let mut calls = Vec::new();
    for i in 0..72 {
        let request = match i % 9 {
            // Eight tries of one request.
            0 => retried.clone(),
            // Eight keys for one transaction id: one is recorded.
            1 => purchase(&format!("dup-{i}"), "txn-dup", customer("", PHONE, ""), 500),
            _ => purchase(
                &format!("k-{i}"),
                &format!("txn-{i}"),
                customer("", PHONE, ""),
                100 + i,
            ),
        };
        let mut pos = pos.clone();
        let request = with_bearer(request, &key);
        calls.push((
            i,
            tokio::spawn(async move { pos.record_purchase(request).await }),
        ));
    }
    let mut retried_ids = Vec::new();
    let mut duplicate_ok = 0;
    let mut distinct = std::collections::HashSet::new();
    for (i, call) in calls {
        let answer = call.await.unwrap();
        match i % 9 {
            0 => retried_ids.push(
                answer
                    .expect("a retry is answered")
                    .into_inner()
                    .purchase_id,
            ),
            1 => match answer {
                Ok(_) => duplicate_ok += 1,
                Err(status) => {
                    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
                    assert!(status.message().contains("transaction_id"), "{status:?}");
                }
            },
            _ => {
                assert!(distinct.insert(
                    answer
                        .expect("a new purchase is recorded")
                        .into_inner()
                        .purchase_id
                ));
            }
        }
    }
    retried_ids.dedup();
    assert_eq!(
        retried_ids.len(),
        1,
        "tries of one request got different answers: {retried_ids:?}"
    );
    assert_eq!(
        duplicate_ok, 1,
        "one transaction id was recorded {duplicate_ok} times"
    );
    assert_eq!(distinct.len(), 56);
    let gateway_db = stack.schema("gateway").await;
    assert_eq!(count(&gateway_db, "purchases").await, 58);
    assert_eq!(merchant_idempotency_records(&gateway_db).await, 58);
    let purchase_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'PurchaseRecorded'")
            .fetch_one(&gateway_db)
            .await
            .unwrap();
    assert_eq!(purchase_events, 58);
}

/// Idempotency records of merchant calls (the operator's own creates have records too).
async fn merchant_idempotency_records(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM idempotency_records WHERE merchant_id <> 'operator'")
        .fetch_one(pool)
        .await
        .unwrap()
}
