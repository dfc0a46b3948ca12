//! The gateway's edge limits: each credential has its own rate limit, answered with
//! RESOURCE_EXHAUSTED and when to retry; an oversized request is refused before any work.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::time::Duration;

use support::*;
use tandem_proto::v1 as pb;
use tandem_proto::v1::merchant_gateway_client::MerchantGatewayClient;
use tonic::Code;

#[tokio::test]
async fn each_key_has_its_own_rate_limit_and_oversized_requests_are_refused() {
    let mut stack = Stack::start(false).await;
    let (_, busy_key) = stack.merchant("Busy").await;
    let (_, quiet_key) = stack.merchant("Quiet").await;
    // A gateway allowing 5 calls a second, in bursts of 10.
    stack.rate_limit_per_second = 5;
    let limited = stack.add_gateway().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", limited.address))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut pos = MerchantGatewayClient::new(channel);
    let ask = |key: &str| with_bearer(pb::GetIdentifierCaptureRequest {}, key);

    let mut answered = 0;
    let mut refusal = None;
    for _ in 0..30 {
        match pos.get_identifier_capture(ask(&busy_key)).await {
            Ok(_) => answered += 1,
            Err(status) => {
                refusal = Some(status);
                break;
            }
        }
    }
    let refusal = refusal.expect("the limit is reached within 30 quick calls");
    assert!(
        (10..=12).contains(&answered),
        "{answered} calls before the limit"
    );
    assert_eq!(refusal.code(), Code::ResourceExhausted);
    assert!(
        refusal.message().contains("retry in"),
        "{}",
        refusal.message()
    );
    let wait: u64 = refusal
        .metadata()
        .get("retry-after-ms")
        .expect("retry-after-ms metadata")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=200).contains(&wait), "retry after {wait} ms");
    assert!(
        !refusal.details().is_empty(),
        "a google.rpc.RetryInfo detail"
    );
    // Another merchant is not held back by the busy one.
    pos.get_identifier_capture(ask(&quiet_key)).await.unwrap();
    // After the wait, the busy merchant may call again.
    tokio::time::sleep(Duration::from_millis(wait + 50)).await;
    pos.get_identifier_capture(ask(&busy_key)).await.unwrap();

    // A request over the size limit is refused before it is decoded.
    let mut huge = referral(
        "huge",
        "mer_00000000000000000000000000000000",
        customer("fp-huge-0001", "", ""),
    );
    huge.referrer_reference = "x".repeat(3 * 1024 * 1024);
    let refused = stack
        .pos()
        .await
        .create_referral(with_bearer(huge, &quiet_key))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert!(
        refused.message().contains("too large"),
        "{}",
        refused.message()
    );

    limited.stop().await;
    stack.stop().await;
}
