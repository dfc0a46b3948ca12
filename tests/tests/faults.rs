//! Faults of the dependencies, answered truthfully: a service started before Postgres waits for
//! it with backoff instead of exiting; while Postgres is away a write answers UNAVAILABLE (a
//! till may retry), never INTERNAL; once it is back the till's retry with the same idempotency
//! key is recorded exactly once. Postgres is taken away by a TCP proxy in front of it (every
//! connection dropped at once, as a restart does), so the other tests sharing the server are
//! not disturbed.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use support::process::{free_address, wait_serving, ServiceProcess};
use support::proxy::TcpProxy;
use support::*;
use tandem_proto::v1::merchant_gateway_client::MerchantGatewayClient;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_waits_for_postgres_answers_unavailable_while_it_is_away_and_loses_nothing() {
    let stack = Stack::start(false).await;
    let (_, acceptor_key) = stack.merchant("A").await;

    // A gateway process whose database is behind a proxy that does not listen yet.
    let url = support::proxy::url_parts(&stack.database.url);
    let proxy = TcpProxy::new(free_address(), url.1);
    let through_proxy = stack
        .database
        .url
        .replace(&url.0, &proxy.address.to_string());
    let gateway_address = free_address();
    let mut gateway =
        ServiceProcess::start_gateway(&stack, gateway_address, &[("DATABASE_URL", through_proxy)]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        gateway.wait_exit(Duration::from_millis(10)).is_none(),
        "the gateway gave up while Postgres was not there yet:\n{}",
        gateway.log_tail()
    );
    let came = Instant::now();
    proxy.start().await;
    wait_serving(gateway_address, Duration::from_secs(60)).await;
    eprintln!("gateway serving {:?} after Postgres came", came.elapsed());
    assert!(
        std::fs::read_to_string(&gateway.log_path)
            .unwrap()
            .contains("Postgres is not reachable yet"),
        "the wait is logged"
    );

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{gateway_address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut pos = MerchantGatewayClient::new(channel);
    let first = purchase(
        "faults-1",
        "T-faults-1",
        customer("fp-faults-0001", "", ""),
        1_000,
    );
    pos.record_purchase(with_bearer(first, &acceptor_key))
        .await
        .unwrap();

    // Postgres goes away: the write is refused as retryable.
    proxy.stop();
    let second = purchase(
        "faults-2",
        "T-faults-2",
        customer("fp-faults-0002", "", ""),
        2_000,
    );
    let refused = pos
        .record_purchase(with_bearer(second.clone(), &acceptor_key))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("retry"),
        "the message says what to do: {}",
        refused.message()
    );

    // Back: the till's retry is recorded, and a second retry answers the same purchase.
    let back = Instant::now();
    proxy.start().await;
    let recorded = tandem_testkit::eventually(
        "the retried purchase to be recorded",
        Duration::from_secs(60),
        || {
            let mut pos = pos.clone();
            let request = with_bearer(second.clone(), &acceptor_key);
            async move { pos.record_purchase(request).await.ok() }
        },
    )
    .await
    .into_inner();
    eprintln!(
        "writes accepted {:?} after Postgres came back",
        back.elapsed()
    );
    let again = pos
        .record_purchase(with_bearer(second, &acceptor_key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.purchase_id, recorded.purchase_id);
    let gateway_db = stack.schema("gateway").await;
    let purchases: i64 = sqlx::query_scalar("SELECT count(*) FROM purchases")
        .fetch_one(&gateway_db)
        .await
        .unwrap();
    assert_eq!(
        purchases, 2,
        "every acknowledged purchase once, the refused one once"
    );
    gateway.kill();
    stack.stop().await;
}
