//! Webhooks end to end: a merchant registers an endpoint; a real HTTP receiver on this machine
//! fails the first attempts and then accepts; the delivery succeeds on a retry, every attempt is
//! in the log, and the receiver got the event the expected number of times, each signed. An
//! endpoint that never accepts runs out of retries.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notifications::webhook::SigningSecret;
use support::{customer, purchase, referral, with_bearer, Stack};
use tandem_proto::v1 as pb;
use tandem_proto::v1::notification_service_client::NotificationServiceClient;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tonic::Code;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// A minimal HTTP/1.1 receiver: answers `fail_first` requests per `webhook-id` with 500 (or
/// every request, with `always` set), then 200.
struct Receiver {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
}

async fn receiver(fail_first: usize, always: bool) -> Receiver {
    receiver_slow(fail_first, always, Duration::ZERO).await
}

/// As [`receiver`], answering each request after `delay`.
async fn receiver_slow(fail_first: usize, always: bool, delay: Duration) -> Receiver {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/tandem", listener.local_addr().unwrap());
    let received: Arc<Mutex<Vec<Received>>> = Arc::default();
    let log = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                // One request per connection is enough for the client's pooled connections too:
                // the answer says `connection: close`.
                let Some((headers, body)) = tandemctl::receiver::read_request(&mut socket).await
                else {
                    return;
                };
                let headers: HashMap<String, String> = headers.into_iter().collect();
                let id = headers.get("webhook-id").cloned().unwrap_or_default();
                let seen = {
                    let mut log = log.lock().unwrap();
                    log.push(Received { headers, body });
                    log.iter()
                        .filter(|r| r.headers.get("webhook-id") == Some(&id))
                        .count()
                };
                tokio::time::sleep(delay).await;
                let (status, text) = if always || seen <= fail_first {
                    ("500 Internal Server Error", "receiver down for maintenance")
                } else {
                    ("200 OK", "thanks")
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                    text.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    Receiver { url, received }
}

async fn deliveries(
    stack: &Stack,
    key: &str,
    endpoint_id: &str,
    until: impl Fn(&[pb::WebhookDelivery]) -> bool,
) -> Vec<pb::WebhookDelivery> {
    let channel = stack.channel().await;
    tandem_testkit::eventually("webhook deliveries", Duration::from_secs(60), || {
        let channel = channel.clone();
        let until = &until;
        async move {
            let listed = NotificationServiceClient::new(channel)
                .list_webhook_deliveries(with_bearer(
                    pb::ListWebhookDeliveriesRequest {
                        endpoint_id: endpoint_id.into(),
                        ..Default::default()
                    },
                    key,
                ))
                .await
                .ok()?
                .into_inner()
                .deliveries;
            until(&listed).then_some(listed)
        }
    })
    .await
}

#[tokio::test]
async fn a_delivery_that_fails_at_first_succeeds_on_a_retry_and_every_attempt_is_logged() {
    let mut stack = Stack::start(true).await;
    stack.start_notifications().await;
    let (acceptor, acceptor_key) = stack.merchant("A").await;
    let (referrer, referrer_key) = stack.merchant("C").await;
    let (_other, other_key) = stack.merchant("X").await;
    stack.partnership(&referrer, &acceptor, 500, 30).await;
    let flaky = receiver(2, false).await;
    let dead = receiver(0, true).await;

    let mut notifications = NotificationServiceClient::new(stack.channel().await);
    let register = |key: &str, url: &str| pb::CreateWebhookEndpointRequest {
        idempotency_key: key.into(),
        url: url.into(),
        types: vec!["purchase.attributed".into()],
        description: "till integration".into(),
        ..Default::default()
    };
    let created = notifications
        .create_webhook_endpoint(with_bearer(register("flaky", &flaky.url), &referrer_key))
        .await
        .unwrap()
        .into_inner();
    let endpoint = created.endpoint.clone().unwrap();
    assert!(endpoint.endpoint_id.starts_with("whe_"));
    assert!(created.signing_secret.starts_with("whsec_"));
    // A retry of the registration answers the same endpoint; the key with another URL is refused.
    let again = notifications
        .create_webhook_endpoint(with_bearer(register("flaky", &flaky.url), &referrer_key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.endpoint.unwrap().endpoint_id, endpoint.endpoint_id);
    assert_eq!(again.signing_secret, created.signing_secret);
    let reused = notifications
        .create_webhook_endpoint(with_bearer(register("flaky", &dead.url), &referrer_key))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists);
    let dead_endpoint = notifications
        .create_webhook_endpoint(with_bearer(register("dead", &dead.url), &referrer_key))
        .await
        .unwrap()
        .into_inner()
        .endpoint
        .unwrap();
    for (bad, says) in [("ftp://127.0.0.1/x", "https"), ("not a url", "not a URL")] {
        let refused = notifications
            .create_webhook_endpoint(with_bearer(register("bad", bad), &referrer_key))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{bad}");
        assert!(refused.message().contains(says), "{}", refused.message());
    }
    let listed = notifications
        .list_webhook_endpoints(with_bearer(
            pb::ListWebhookEndpointsRequest::default(),
            &referrer_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .endpoints;
    assert_eq!(listed.len(), 2);

    // A referred customer buys at A: C's endpoints are told.
    let who = customer("card-fingerprint-hook-1", "", "hook-1@example.com");
    let mut pos = stack.pos().await;
    pos.create_referral(with_bearer(
        referral("h-ref", &acceptor, who.clone()),
        &referrer_key,
    ))
    .await
    .unwrap();
    pos.record_purchase(with_bearer(
        purchase("h-buy", "T-h", who, 8_000),
        &acceptor_key,
    ))
    .await
    .unwrap();

    let done = deliveries(&stack, &referrer_key, &endpoint.endpoint_id, |d| {
        d.len() == 1 && d[0].status == "succeeded"
    })
    .await;
    let attempts: Vec<u32> = done[0].attempts.iter().map(|a| a.status_code).collect();
    assert_eq!(attempts, [500, 500, 200], "{done:?}");
    assert_eq!(done[0].attempts[0].excerpt, "receiver down for maintenance");
    assert_eq!(done[0].r#type, "purchase.attributed");
    // The receiver got the event three times, under one webhook-id, each signed.
    let secret = SigningSecret::parse(&created.signing_secret).unwrap();
    let got = flaky.received.lock().unwrap().clone();
    assert_eq!(got.len(), 3);
    for request in &got {
        assert_eq!(request.headers["webhook-id"], done[0].notification_id);
        let timestamp: i64 = request.headers["webhook-timestamp"].parse().unwrap();
        assert_eq!(
            request.headers["webhook-signature"],
            secret.sign(&done[0].notification_id, timestamp, &request.body)
        );
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(body["type"], "purchase.attributed");
        assert_eq!(body["data"]["amount"]["amount_minor"], 8_000);
        for raw in ["card-fingerprint-hook-1", "hook-1@example.com"] {
            assert!(!String::from_utf8_lossy(&request.body).contains(raw));
        }
    }

    // The endpoint that never accepts: the first attempt and the schedule's three retries, then
    // failed.
    let failed = deliveries(&stack, &referrer_key, &dead_endpoint.endpoint_id, |d| {
        d.len() == 1 && d[0].status == "failed"
    })
    .await;
    assert_eq!(failed[0].attempts.len(), 4);
    assert_eq!(dead.received.lock().unwrap().len(), 4);

    // Another merchant cannot see C's deliveries.
    let hidden = notifications
        .list_webhook_deliveries(with_bearer(
            pb::ListWebhookDeliveriesRequest {
                endpoint_id: endpoint.endpoint_id.clone(),
                ..Default::default()
            },
            &other_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound);
    stack.stop().await;
}

/// The bodies `receiver` got, parsed.
fn bodies(receiver: &Receiver) -> Vec<(HashMap<String, String>, serde_json::Value)> {
    receiver
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.headers.clone(), serde_json::from_slice(&r.body).unwrap()))
        .collect()
}

async fn wait_for<T>(what: &str, check: impl Fn() -> Option<T>) -> T {
    tandem_testkit::eventually(what, Duration::from_secs(60), || {
        let found = check();
        async move { found }
    })
    .await
}

#[tokio::test]
async fn secrets_rotate_with_an_overlap_endpoints_disable_and_missed_events_replay() {
    let mut stack = Stack::start(true).await;
    // An endpoint that fails for longer than this is disabled.
    stack.webhook_disable_after = Duration::from_millis(400);
    stack.start_notifications().await;
    let (acceptor, acceptor_key) = stack.merchant("A").await;
    let (referrer, referrer_key) = stack.merchant("C").await;
    stack.partnership(&referrer, &acceptor, 500, 30).await;
    let ok = receiver(0, false).await;
    let dead = receiver(0, true).await;
    let mut api = NotificationServiceClient::new(stack.channel().await);
    let create = |key: &str, url: &str, types: Vec<String>| pb::CreateWebhookEndpointRequest {
        idempotency_key: key.into(),
        url: url.into(),
        types,
        ..Default::default()
    };
    let good = api
        .create_webhook_endpoint(with_bearer(create("ok", &ok.url, vec![]), &referrer_key))
        .await
        .unwrap()
        .into_inner();
    let good_id = good.endpoint.unwrap().endpoint_id;
    let old_secret = SigningSecret::parse(&good.signing_secret).unwrap();
    let bad_id = api
        .create_webhook_endpoint(with_bearer(
            create("dead", &dead.url, vec!["purchase.attributed".into()]),
            &referrer_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .endpoint
        .unwrap()
        .endpoint_id;

    let who = customer("card-fingerprint-hook-2", "", "hook-2@example.com");
    let mut pos = stack.pos().await;
    pos.create_referral(with_bearer(
        referral("r2", &acceptor, who.clone()),
        &referrer_key,
    ))
    .await
    .unwrap();
    let buy = |n: u32| {
        purchase(
            &format!("b2-{n}"),
            &format!("T2-{n}"),
            who.clone(),
            1_000 * i64::from(n),
        )
    };
    let first = pos
        .record_purchase(with_bearer(buy(1), &acceptor_key))
        .await
        .unwrap()
        .into_inner()
        .purchase_id;
    let purchase_seen = |receiver: &Receiver, purchase_id: &str| {
        bodies(receiver)
            .into_iter()
            .filter(|(_, body)| {
                body["data"]["purchase_id"] == purchase_id && body["type"] == "purchase.attributed"
            })
            .map(|(headers, _)| headers)
            .collect::<Vec<_>>()
    };
    let headers = wait_for("the first purchase delivered", || {
        purchase_seen(&ok, &first).pop()
    })
    .await;
    let id = &headers["webhook-id"];
    let at: i64 = headers["webhook-timestamp"].parse().unwrap();
    let body = ok
        .received
        .lock()
        .unwrap()
        .iter()
        .find(|r| r.headers.get("webhook-id") == Some(id))
        .unwrap()
        .body
        .clone();
    assert_eq!(headers["webhook-signature"], old_secret.sign(id, at, &body));

    // The endpoint that never answers 2xx is disabled once it has failed for long enough, and
    // the merchant is told, on its other endpoint too.
    let disabled = wait_for("the dead endpoint disabled and announced", || {
        bodies(&ok)
            .into_iter()
            .find(|(_, body)| body["type"] == "webhook.endpoint_disabled")
    })
    .await;
    assert_eq!(disabled.1["data"]["endpoint_id"], bad_id.as_str());
    let endpoints = api
        .list_webhook_endpoints(with_bearer(
            pb::ListWebhookEndpointsRequest::default(),
            &referrer_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .endpoints;
    let bad = endpoints.iter().find(|e| e.endpoint_id == bad_id).unwrap();
    assert!(!bad.enabled);
    assert!(
        bad.disabled_reason.starts_with("failing since"),
        "{}",
        bad.disabled_reason
    );
    let attempts_when_disabled = dead.received.lock().unwrap().len();

    // Rotation: both secrets sign during the overlap.
    let rotated = api
        .rotate_webhook_secret(with_bearer(
            pb::RotateWebhookSecretRequest {
                endpoint_id: good_id.clone(),
                overlap_hours: 1,
                ..Default::default()
            },
            &referrer_key,
        ))
        .await
        .unwrap()
        .into_inner();
    let new_secret = SigningSecret::parse(&rotated.signing_secret).unwrap();
    let second = pos
        .record_purchase(with_bearer(buy(2), &acceptor_key))
        .await
        .unwrap()
        .into_inner()
        .purchase_id;
    let headers = wait_for("the second purchase delivered", || {
        purchase_seen(&ok, &second).pop()
    })
    .await;
    let signatures: Vec<&str> = headers["webhook-signature"].split(' ').collect();
    assert_eq!(signatures.len(), 2, "{signatures:?}");
    let id = &headers["webhook-id"];
    let at: i64 = headers["webhook-timestamp"].parse().unwrap();
    let body = ok
        .received
        .lock()
        .unwrap()
        .iter()
        .find(|r| r.headers.get("webhook-id") == Some(id))
        .unwrap()
        .body
        .clone();
    assert_eq!(signatures[0], new_secret.sign(id, at, &body));
    assert_eq!(signatures[1], old_secret.sign(id, at, &body));
    // After the overlap (its end moved to the past here), only the new secret signs.
    let pool = stack.schema("notifications").await;
    sqlx::query("UPDATE webhook_endpoints SET previous_expires_at = now() - interval '1 second'")
        .execute(&pool)
        .await
        .unwrap();
    let third = pos
        .record_purchase(with_bearer(buy(3), &acceptor_key))
        .await
        .unwrap()
        .into_inner()
        .purchase_id;
    let headers = wait_for("the third purchase delivered", || {
        purchase_seen(&ok, &third).pop()
    })
    .await;
    assert!(!headers["webhook-signature"].contains(' '));

    // Disabled by the merchant: nothing arrives; enabled and replayed: what it missed arrives.
    let off = api
        .set_webhook_endpoint_enabled(with_bearer(
            pb::SetWebhookEndpointEnabledRequest {
                endpoint_id: good_id.clone(),
                enabled: false,
                ..Default::default()
            },
            &referrer_key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (off.enabled, off.disabled_reason.as_str()),
        (false, "disabled by the merchant")
    );
    let before_fourth = chrono::Utc::now() - chrono::Duration::seconds(1);
    let fourth = pos
        .record_purchase(with_bearer(buy(4), &acceptor_key))
        .await
        .unwrap()
        .into_inner()
        .purchase_id;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        purchase_seen(&ok, &fourth).is_empty(),
        "a disabled endpoint gets nothing"
    );
    api.set_webhook_endpoint_enabled(with_bearer(
        pb::SetWebhookEndpointEnabledRequest {
            endpoint_id: good_id.clone(),
            enabled: true,
            ..Default::default()
        },
        &referrer_key,
    ))
    .await
    .unwrap();
    let replayed = api
        .replay_webhooks(with_bearer(
            pb::ReplayWebhooksRequest {
                endpoint_id: good_id.clone(),
                since: Some(tandem_proto::time::timestamp(before_fourth)),
                ..Default::default()
            },
            &referrer_key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(replayed.queued >= 1, "{replayed:?}");
    wait_for("the missed purchase replayed", || {
        purchase_seen(&ok, &fourth).pop()
    })
    .await;

    // One delivery sent again: the receiver gets the same webhook-id once more.
    let listed_before = deliveries(&stack, &referrer_key, &good_id, |_| true).await;
    let again = listed_before.last().unwrap().notification_id.clone();
    let count = |id: &str| {
        ok.received
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.headers.get("webhook-id").map(String::as_str) == Some(id))
            .count()
    };
    let before = count(&again);
    api.redeliver_webhook(with_bearer(
        pb::RedeliverWebhookRequest {
            endpoint_id: good_id.clone(),
            notification_id: again.clone(),
            ..Default::default()
        },
        &referrer_key,
    ))
    .await
    .unwrap();
    wait_for("the redelivery", || {
        (count(&again) == before + 1).then_some(())
    })
    .await;
    // A test delivery: `webhook.test`, signed with the current secret, once per idempotency key;
    // another merchant's endpoint is not found, a disabled one is refused.
    let test = |endpoint_id: &str, key: &str| pb::SendTestWebhookRequest {
        endpoint_id: endpoint_id.into(),
        idempotency_key: key.into(),
        ..Default::default()
    };
    let sent = api
        .send_test_webhook(with_bearer(test(&good_id, "t1"), &referrer_key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.r#type, "webhook.test");
    let (headers, body) = wait_for("the test delivery", || {
        bodies(&ok)
            .into_iter()
            .find(|(headers, _)| headers["webhook-id"] == sent.notification_id)
    })
    .await;
    assert_eq!(body["type"], "webhook.test");
    assert_eq!(body["data"]["endpoint_id"], good_id.as_str());
    let raw = ok
        .received
        .lock()
        .unwrap()
        .iter()
        .find(|r| r.headers.get("webhook-id") == Some(&sent.notification_id))
        .unwrap()
        .body
        .clone();
    let at: i64 = headers["webhook-timestamp"].parse().unwrap();
    assert_eq!(
        headers["webhook-signature"],
        new_secret.sign(&sent.notification_id, at, &raw)
    );
    let again = api
        .send_test_webhook(with_bearer(test(&good_id, "t1"), &referrer_key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.notification_id, sent.notification_id);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        count(&sent.notification_id),
        1,
        "one key, one test delivery"
    );
    let listed = deliveries(&stack, &referrer_key, &good_id, |_| true).await;
    let listed = listed
        .iter()
        .find(|d| d.notification_id == sent.notification_id)
        .expect("the test delivery is listed");
    assert_eq!(
        (listed.status.as_str(), listed.attempts.len()),
        ("succeeded", 1)
    );
    let foreign = api
        .send_test_webhook(with_bearer(test(&good_id, "t2"), &acceptor_key))
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), tonic::Code::NotFound, "{foreign:?}");
    let disabled = api
        .send_test_webhook(with_bearer(test(&bad_id, "t3"), &referrer_key))
        .await
        .unwrap_err();
    assert_eq!(
        disabled.code(),
        tonic::Code::FailedPrecondition,
        "{disabled:?}"
    );
    let missing_key = api
        .send_test_webhook(with_bearer(test(&good_id, ""), &referrer_key))
        .await
        .unwrap_err();
    assert_eq!(missing_key.code(), tonic::Code::InvalidArgument);

    // The disabled dead endpoint was sent nothing more all along.
    assert_eq!(dead.received.lock().unwrap().len(), attempts_when_disabled);
    stack.stop().await;
}

/// C refers ten customers to A, each of whom buys once: a conversion, an attribution and a
/// payable commission each, thirty notifications for C.
async fn ten_referred_purchases(
    stack: &Stack,
    tag: &str,
    acceptor: (&str, &str),
    referrer_key: &str,
) {
    let (acceptor, acceptor_key) = acceptor;
    let mut pos = stack.pos().await;
    for n in 0..10 {
        let who = customer(
            &format!("card-fingerprint-{tag}-{n}"),
            "",
            &format!("{tag}-{n}@example.com"),
        );
        pos.create_referral(with_bearer(
            referral(&format!("{tag}-ref-{n}"), acceptor, who.clone()),
            referrer_key,
        ))
        .await
        .unwrap();
        pos.record_purchase(with_bearer(
            purchase(
                &format!("{tag}-buy-{n}"),
                &format!("T-{tag}{n}"),
                who,
                1_000,
            ),
            acceptor_key,
        ))
        .await
        .unwrap();
    }
}

/// Registers an endpoint for every type at `url`; returns its id.
async fn endpoint_for_all(stack: &Stack, key: &str, idempotency_key: &str, url: &str) -> String {
    NotificationServiceClient::new(stack.channel().await)
        .create_webhook_endpoint(with_bearer(
            pb::CreateWebhookEndpointRequest {
                idempotency_key: idempotency_key.into(),
                url: url.into(),
                ..Default::default()
            },
            key,
        ))
        .await
        .unwrap()
        .into_inner()
        .endpoint
        .unwrap()
        .endpoint_id
}

#[tokio::test]
async fn a_notifications_service_killed_mid_delivery_loses_no_delivery() {
    let mut stack = Stack::start(true).await;
    let address = stack.release_notifications_port();
    let mut process = support::process::ServiceProcess::start_notifications(
        &stack,
        address,
        &[
            (
                "TANDEM_WEBHOOK_RETRY_SCHEDULE",
                "100ms,200ms,400ms,800ms,1s,1s,1s,1s,1s,1s".to_owned(),
            ),
            ("TANDEM_WEBHOOK_TIMEOUT_MS", "1000".to_owned()),
        ],
    );
    support::process::wait_serving(address, Duration::from_secs(60)).await;
    let (acceptor, acceptor_key) = stack.merchant("A").await;
    let (referrer, referrer_key) = stack.merchant("C").await;
    stack.partnership(&referrer, &acceptor, 500, 30).await;
    // Each answer takes 150 ms, so kills land while deliveries are in flight.
    let slow = receiver_slow(0, false, Duration::from_millis(150)).await;
    let endpoint_id = endpoint_for_all(&stack, &referrer_key, "slow", &slow.url).await;
    ten_referred_purchases(&stack, "kill", (&acceptor, &acceptor_key), &referrer_key).await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        process.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        process.restart();
        support::process::wait_serving(address, Duration::from_secs(60)).await;
    }
    let done = deliveries(&stack, &referrer_key, &endpoint_id, |d| {
        d.len() == 30 && d.iter().all(|d| d.status == "succeeded")
    })
    .await;
    let received: std::collections::BTreeSet<String> = slow
        .received
        .lock()
        .unwrap()
        .iter()
        .filter_map(|r| r.headers.get("webhook-id").cloned())
        .collect();
    let expected: std::collections::BTreeSet<String> =
        done.iter().map(|d| d.notification_id.clone()).collect();
    assert_eq!(expected.len(), 30);
    assert_eq!(
        received, expected,
        "every delivery arrived at least once, nothing else did"
    );
    // SIGKILL again to end it: a SIGTERM a second after a restart waited more than 30 s for the
    // gRPC server to stop in one run (see the closing note of the notifications issue).
    process.kill();
    stack.stop().await;
}

/// Runs one step of a test within `limit`, so a stall names the step instead of hanging.
async fn step<T>(what: &str, limit: Duration, future: impl std::future::Future<Output = T>) -> T {
    eprintln!("[step] {what}");
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {limit:?}"))
}

#[tokio::test]
async fn two_notifications_instances_share_the_deliveries_and_send_each_once() {
    let minute = Duration::from_secs(60);
    let mut stack = step("stack", minute, Stack::start(true)).await;
    step("first instance", minute, stack.start_notifications()).await;
    let second = step("second instance", minute, stack.add_notifications()).await;
    let (acceptor, acceptor_key) = step("merchant A", minute, stack.merchant("A")).await;
    let (referrer, referrer_key) = step("merchant C", minute, stack.merchant("C")).await;
    step(
        "partnership",
        minute,
        stack.partnership(&referrer, &acceptor, 500, 30),
    )
    .await;
    let sink = receiver_slow(0, false, Duration::from_millis(20)).await;
    let endpoint_id = step(
        "endpoint",
        minute,
        endpoint_for_all(&stack, &referrer_key, "shared", &sink.url),
    )
    .await;
    step(
        "ten purchases",
        minute,
        ten_referred_purchases(&stack, "two", (&acceptor, &acceptor_key), &referrer_key),
    )
    .await;
    let done = step(
        "thirty deliveries",
        Duration::from_secs(90),
        deliveries(&stack, &referrer_key, &endpoint_id, |d| {
            d.len() == 30 && d.iter().all(|d| d.status == "succeeded")
        }),
    )
    .await;
    // Every delivery took one attempt, and the receiver got each id exactly once.
    assert!(done.iter().all(|d| d.attempts.len() == 1), "{done:?}");
    let ids: Vec<String> = sink
        .received
        .lock()
        .unwrap()
        .iter()
        .filter_map(|r| r.headers.get("webhook-id").cloned())
        .collect();
    let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), distinct.len()), (30, 30));
    step("second instance stops", minute, second.stop()).await;
    step("stack stops", minute, stack.stop()).await;
}

#[tokio::test]
async fn a_slow_endpoint_never_delays_the_deliveries_to_the_others() {
    let mut stack = Stack::start(true).await;
    // Fewer slots in all than the slow endpoint has deliveries, and a timeout longer than the
    // test: if the slow endpoint's deliveries could hold slots while they wait for it, the fast
    // endpoint would get nothing until the first of them timed out.
    stack.webhook_concurrency = 8;
    stack.webhook_timeout_ms = 45_000;
    stack.start_notifications().await;
    let (acceptor, acceptor_key) = stack.merchant("A").await;
    let (referrer, referrer_key) = stack.merchant("C").await;
    stack.partnership(&referrer, &acceptor, 500, 30).await;
    let slow = receiver_slow(0, false, Duration::from_secs(120)).await;
    let fast = receiver(0, false).await;
    let slow_id = endpoint_for_all(&stack, &referrer_key, "slow", &slow.url).await;
    let fast_id = endpoint_for_all(&stack, &referrer_key, "fast", &fast.url).await;
    ten_referred_purchases(&stack, "slow", (&acceptor, &acceptor_key), &referrer_key).await;
    deliveries(&stack, &referrer_key, &fast_id, |d| {
        d.len() == 30 && d.iter().all(|d| d.status == "succeeded")
    })
    .await;
    // The fast endpoint got everything while the slow one still held its first requests: no
    // attempt to it has ended, and no more than the per-endpoint bound (4) was sent to it.
    let slow_now = deliveries(&stack, &referrer_key, &slow_id, |d| d.len() == 30).await;
    assert!(
        slow_now.iter().all(|d| d.attempts.is_empty()),
        "{slow_now:?}"
    );
    assert!(slow.received.lock().unwrap().len() <= 4);
    assert_eq!(fast.received.lock().unwrap().len(), 30);
    stack.stop().await;
}
