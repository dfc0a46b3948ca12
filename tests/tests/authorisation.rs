//! The authorisation matrix, generated from the service descriptors (so a new RPC cannot be
//! forgotten): every method of every service the merchant gateway serves, called with each kind
//! of wrong credentials, is refused with UNAUTHENTICATED or PERMISSION_DENIED and returns no
//! data. A service the gateway does not serve (the internal APIs) answers UNIMPLEMENTED there.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use bytes::{Buf, BufMut};
use prost::Message as _;
use support::*;
use tandem_proto::v1 as pb;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Code;

/// Messages as raw bytes: the matrix sends an empty request (all fields default) to every
/// method, whatever its type.
#[derive(Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Self::Error> {
        let bytes = src.copy_to_bytes(src.remaining());
        Ok(Some(bytes.to_vec()))
    }
}

/// Calls `/service/method` with an empty message and `authorization` (if any); the status
/// code, or `Ok` if the call (or the stream's opening) succeeded.
async fn call(
    channel: &tonic::transport::Channel,
    service: &str,
    method: &str,
    streaming: bool,
    authorization: Option<&str>,
) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(Vec::new());
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
    }
    let path: tonic::codegen::http::uri::PathAndQuery =
        format!("/{service}/{method}").parse().unwrap();
    if streaming {
        let mut stream = grpc
            .server_streaming(request, path, RawCodec)
            .await?
            .into_inner();
        // A stream that opened must not carry anything either.
        match tokio::time::timeout(std::time::Duration::from_secs(2), stream.message()).await {
            Ok(Ok(Some(_))) => Ok(()),
            Ok(Err(status)) => Err(status),
            _ => Err(tonic::Status::ok("stream opened but sent nothing")),
        }
    } else {
        grpc.unary(request, path, RawCodec).await.map(|_| ())
    }
}

#[tokio::test]
async fn every_gateway_rpc_refuses_every_wrong_credential() {
    let stack = Stack::start(true).await;
    let (_, merchant_key) = stack.merchant("A").await;
    let channel = stack.channel().await;
    // A key that worked once and was revoked.
    let (revoked_merchant, revoked_key) = stack.merchant("Revoked").await;
    let mut operator = stack.operator().await;
    let keys = operator
        .list_api_keys(as_operator(pb::ListApiKeysRequest {
            merchant_id: revoked_merchant.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .keys;
    operator
        .revoke_api_key(as_operator(pb::RevokeApiKeyRequest {
            merchant_id: revoked_merchant,
            key_id: keys[0].key_id.clone(),
        }))
        .await
        .unwrap();
    let descriptors =
        prost_types::FileDescriptorSet::decode(tandem_proto::FILE_DESCRIPTOR_SET).unwrap();
    let wrong: [(&str, Option<String>); 5] = [
        ("revoked key", Some(format!("Bearer {revoked_key}"))),
        ("no credentials", None),
        ("malformed", Some("Basic dXNlcjpwYXNz".to_owned())),
        (
            "unknown key",
            Some(format!(
                "Bearer {}",
                merchant_key.chars().rev().collect::<String>()
            )),
        ),
        ("empty bearer", Some("Bearer ".to_owned())),
    ];
    let mut served = 0;
    let mut internal = Vec::new();
    for file in &descriptors.file {
        let package = file.package();
        for service in &file.service {
            let name = format!("{package}.{}", service.name());
            let operator_service = name == "tandem.v1.OperatorService";
            for method in &service.method {
                let (m, streaming) = (method.name(), method.server_streaming());
                // Whether the gateway serves it at all: the internal APIs are not there.
                let probe = call(&channel, &name, m, streaming, None).await;
                if probe.as_ref().err().map(tonic::Status::code) == Some(Code::Unimplemented) {
                    internal.push(format!("{name}/{m}"));
                    continue;
                }
                served += 1;
                let mut cases: Vec<(&str, Option<String>)> = wrong.to_vec();
                if operator_service {
                    cases.push((
                        "a merchant's key on an operator call",
                        Some(format!("Bearer {merchant_key}")),
                    ));
                } else {
                    cases.push((
                        "the operator token on a merchant call",
                        Some(format!("Bearer {OPERATOR_TOKEN}")),
                    ));
                }
                for (case, authorization) in cases {
                    let answer =
                        call(&channel, &name, m, streaming, authorization.as_deref()).await;
                    let code = answer.as_ref().err().map(tonic::Status::code);
                    assert!(
                        matches!(code, Some(Code::Unauthenticated | Code::PermissionDenied)),
                        "{name}/{m} with {case}: {answer:?}"
                    );
                }
            }
        }
    }
    assert!(served >= 30, "only {served} methods served by the gateway");
    // Every method of the public services is served (so none escaped the matrix above).
    for public in [
        "MerchantGateway",
        "OperatorService",
        "PartnershipService",
        "NotificationService",
        "StatementService",
    ] {
        assert!(
            !internal
                .iter()
                .any(|m| m.starts_with(&format!("tandem.v1.{public}/"))),
            "{public} has methods the gateway does not serve: {internal:?}"
        );
    }
    eprintln!("{served} gateway methods × 6 wrong credentials refused; {} internal methods not served by the gateway", internal.len());
    stack.stop().await;
}

/// The internal APIs (ledger, settlement, notifications) trust the merchant id in each request,
/// so they serve only callers with the deployment's service token: every method of theirs
/// refuses no token, a wrong token, a merchant's API key and the operator token; health checks
/// stay open; the gateway, which has the token, gets through.
#[tokio::test]
async fn internal_apis_refuse_every_caller_without_the_service_token() {
    let mut stack = Stack::start(true).await;
    stack.start_settlement(3600).await;
    stack.start_notifications().await;
    let (_, merchant_key) = stack.merchant("A").await;
    let descriptors =
        prost_types::FileDescriptorSet::decode(tandem_proto::FILE_DESCRIPTOR_SET).unwrap();
    let wrong: [(&str, Option<String>); 5] = [
        ("no token", None),
        (
            "a wrong token",
            Some(format!("Bearer {}", SERVICE_TOKEN.replace('0', "1"))),
        ),
        ("a merchant's key", Some(format!("Bearer {merchant_key}"))),
        (
            "the operator token",
            Some(format!("Bearer {OPERATOR_TOKEN}")),
        ),
        ("the token without Bearer", Some(SERVICE_TOKEN.to_owned())),
    ];
    let mut refused = 0;
    for (service, address) in [
        ("tandem.v1.ReferralLedger", stack.ledger_address()),
        ("tandem.v1.Settlement", stack.settlement_address()),
        ("tandem.v1.Notifications", stack.notifications_address()),
    ] {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let methods = descriptors
            .file
            .iter()
            .flat_map(|file| {
                file.service
                    .iter()
                    .map(move |s| (format!("{}.{}", file.package(), s.name()), s))
            })
            .find(|(name, _)| name == service)
            .unwrap_or_else(|| panic!("{service} not in the descriptors"))
            .1
            .method
            .clone();
        assert!(!methods.is_empty());
        for method in &methods {
            for (case, authorization) in &wrong {
                let answer = call(
                    &channel,
                    service,
                    method.name(),
                    method.server_streaming(),
                    authorization.as_deref(),
                )
                .await;
                assert_eq!(
                    answer.as_ref().err().map(tonic::Status::code),
                    Some(Code::Unauthenticated),
                    "{service}/{} with {case}: {answer:?}",
                    method.name()
                );
                refused += 1;
            }
        }
        // Health stays open to orchestrators.
        assert_eq!(
            support::process::HealthProbe::connect(address)
                .await
                .service_status(service)
                .await,
            Some(tonic_health::pb::health_check_response::ServingStatus::Serving),
            "{service} health"
        );
        // With the token, the call reaches the handler (which refuses the empty request on
        // its merits, never as unauthenticated).
        let method = &methods[0];
        let answer = call(
            &channel,
            service,
            method.name(),
            method.server_streaming(),
            Some(&format!("Bearer {SERVICE_TOKEN}")),
        )
        .await;
        assert_ne!(
            answer.as_ref().err().map(tonic::Status::code),
            Some(Code::Unauthenticated),
            "{service}/{} with the token: {answer:?}",
            method.name()
        );
    }
    // And the gateway, holding the token, reaches them: a merchant's query through it works.
    stack
        .pos()
        .await
        .list_referrals(with_bearer(
            pb::ListReferralsRequest::default(),
            &merchant_key,
        ))
        .await
        .unwrap();
    eprintln!("{refused} calls to the internal APIs without the service token refused");
    stack.stop().await;
}
