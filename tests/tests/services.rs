//! Every service serves gRPC health and reflection (v1 and v1alpha) and stops cleanly when told
//! to, as it does on SIGTERM.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::time::Duration;

use support::*;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::{v1, v1alpha};

async fn channel(address: std::net::SocketAddr) -> Channel {
    for _ in 0..100 {
        if let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{address}")) {
            if let Ok(channel) = endpoint.connect().await {
                return channel;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot connect to {address}");
}

async fn assert_serving(channel: Channel, service: &str) {
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("health of {service:?}: {e}"))
        .into_inner()
        .status;
    assert_eq!(
        status,
        ServingStatus::Serving as i32,
        "{service:?} is not serving"
    );
}

async fn reflected_services(channel: Channel) -> (Vec<String>, Vec<String>) {
    use v1::server_reflection_request::MessageRequest as V1Request;
    use v1::server_reflection_response::MessageResponse as V1Response;
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(V1Request::ListServices(String::new())),
    };
    let mut responses = v1::server_reflection_client::ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(V1Response::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("v1 reflection did not list services");
    };
    let from_v1 = list.service.into_iter().map(|s| s.name).collect();

    use v1alpha::server_reflection_request::MessageRequest as AlphaRequest;
    use v1alpha::server_reflection_response::MessageResponse as AlphaResponse;
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(AlphaRequest::ListServices(String::new())),
    };
    let mut responses = v1alpha::server_reflection_client::ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(AlphaResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("v1alpha reflection did not list services");
    };
    (from_v1, list.service.into_iter().map(|s| s.name).collect())
}

#[tokio::test]
async fn gateway_ledger_and_settlement_serve_health_and_reflection() {
    let mut stack = Stack::start(true).await;
    stack.start_settlement(300).await;
    stack.start_notifications().await;
    let gateway = channel(stack.gateway.as_ref().unwrap().address).await;
    let notifications = channel(stack.notifications_address()).await;
    assert_serving(notifications.clone(), "tandem.v1.Notifications").await;
    let ledger = channel(stack.ledger.as_ref().unwrap().address).await;
    let settlement = channel(stack.settlement_address()).await;
    assert_serving(gateway.clone(), "tandem.v1.StatementService").await;
    assert_serving(settlement.clone(), "tandem.v1.Settlement").await;
    assert_serving(gateway.clone(), "").await;
    assert_serving(gateway.clone(), "tandem.v1.MerchantGateway").await;
    assert_serving(gateway.clone(), "tandem.v1.OperatorService").await;
    assert_serving(ledger.clone(), "tandem.v1.ReferralLedger").await;
    let reflection = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    // Each server lists exactly what it serves: the gateway never advertises the ledger's
    // internal API, nor the ledger the gateway's.
    let mut gateway_expected: Vec<String> = [
        "tandem.v1.MerchantGateway",
        "tandem.v1.OperatorService",
        "tandem.v1.PartnershipService",
        "tandem.v1.StatementService",
        "tandem.v1.NotificationService",
    ]
    .into_iter()
    .chain(reflection)
    .map(String::from)
    .collect();
    gateway_expected.sort();
    let mut ledger_expected: Vec<String> = ["tandem.v1.ReferralLedger"]
        .into_iter()
        .chain(reflection)
        .map(String::from)
        .collect();
    ledger_expected.sort();
    let mut settlement_expected: Vec<String> = ["tandem.v1.Settlement"]
        .into_iter()
        .chain(reflection)
        .map(String::from)
        .collect();
    settlement_expected.sort();
    let mut notifications_expected: Vec<String> = ["tandem.v1.Notifications"]
        .into_iter()
        .chain(reflection)
        .map(String::from)
        .collect();
    notifications_expected.sort();
    for (channel, expected) in [
        (gateway, gateway_expected),
        (ledger, ledger_expected),
        (settlement, settlement_expected),
        (notifications, notifications_expected),
    ] {
        let (mut v1_names, mut v1alpha_names) = reflected_services(channel).await;
        v1_names.sort();
        v1alpha_names.sort();
        assert_eq!(v1_names, expected, "v1 reflection");
        assert_eq!(v1alpha_names, expected, "v1alpha reflection");
    }
    stack.stop().await;
}
