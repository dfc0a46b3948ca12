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
    call_with(
        channel,
        service,
        method,
        streaming,
        authorization,
        Vec::new(),
    )
    .await
    .map(drop)
}

/// Calls `/<service>/<method>` with `body` as the encoded request; returns the encoded answer
/// (a stream's first message; empty if it opened and sent nothing within two seconds).
async fn call_with(
    channel: &tonic::transport::Channel,
    service: &str,
    method: &str,
    streaming: bool,
    authorization: Option<&str>,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(body);
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
            Ok(Ok(Some(message))) => Ok(message),
            Ok(Ok(None)) => Ok(Vec::new()),
            Ok(Err(status)) => Err(status),
            Err(_) => Ok(Vec::new()),
        }
    } else {
        grpc.unary(request, path, RawCodec)
            .await
            .map(tonic::Response::into_inner)
    }
}

/// A request of type `input` (from the descriptors) with every field that names an object set to
/// the victim's real one: ids by field name, statement number 1, an idempotency key. Other fields
/// stay empty.
fn request_naming(
    descriptors: &prost_types::FileDescriptorSet,
    input: &str,
    objects: &std::collections::BTreeMap<&str, String>,
    idempotency_key: &str,
) -> Vec<u8> {
    let name = input.trim_start_matches(".tandem.v1.");
    let message = descriptors
        .file
        .iter()
        .flat_map(|file| &file.message_type)
        .find(|message| message.name() == name)
        .unwrap_or_else(|| panic!("no descriptor for {input}"));
    let mut body = Vec::new();
    for field in &message.field {
        let number = field.number() as u32;
        let text = match field.name() {
            "idempotency_key" => Some(idempotency_key.to_owned()),
            other => objects.get(other).cloned(),
        };
        match (field.r#type(), text) {
            (prost_types::field_descriptor_proto::Type::String, Some(text)) => {
                prost::encoding::string::encode(number, &text, &mut body);
            }
            (prost_types::field_descriptor_proto::Type::Uint32, _) if field.name() == "number" => {
                prost::encoding::uint32::encode(number, &1, &mut body);
            }
            _ => {}
        }
    }
    body
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

/// The "another merchant's key" column, with real ids: every merchant-facing method called with
/// merchant B's valid key and a request naming merchant A's real objects (A's merchant id, a
/// partnership of A's that B is not part of, its referral, purchase, transaction and webhook
/// endpoint) is refused, or answers B's own (empty) view: never anything of A's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_merchant_rpc_naming_another_merchants_objects_gives_none_of_their_data() {
    let mut stack = Stack::start(true).await;
    stack.start_settlement(86_400).await;
    stack.start_notifications().await;
    let (victim, victim_key) = stack.merchant("Victim A").await;
    let (partner, partner_key) = stack.merchant("Partner C").await;
    let (_, intruder_key) = stack.merchant("Intruder B").await;
    let partnership = stack.partnership(&partner, &victim, 500, 30).await;
    let who = customer("", "+33 6 10 20 30 40", "");
    let referral_id = stack
        .pos()
        .await
        .create_referral(with_bearer(
            referral("authz-r", &victim, who.clone()),
            &partner_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .referral_id;
    let purchase_id = stack
        .pos()
        .await
        .record_purchase(with_bearer(
            purchase("authz-p", "T-authz-victim", who, 4_200),
            &victim_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .purchase_id;
    wait_for_activity(&stack, &partner_key, 1).await;
    let (endpoint, _deliveries) =
        purchase_webhook(stack.channel().await, &victim_key, "authz-hook").await;
    let endpoint_id = endpoint.endpoint.unwrap().endpoint_id;
    let objects: std::collections::BTreeMap<&str, String> = [
        ("merchant_id", victim.clone()),
        ("acceptor_merchant_id", victim.clone()),
        ("referrer_merchant_id", victim.clone()),
        ("partnership_id", partnership.clone()),
        ("referral_id", referral_id.clone()),
        ("purchase_id", purchase_id.clone()),
        ("transaction_id", "T-authz-victim".to_owned()),
        ("endpoint_id", endpoint_id.clone()),
    ]
    .into();
    let secrets = [
        victim.as_str(),
        partnership.as_str(),
        referral_id.as_str(),
        purchase_id.as_str(),
        "T-authz-victim",
        endpoint_id.as_str(),
    ];

    // The same objects, well formed but nobody's: an answer about A's objects must not differ
    // from the answer about these (else it tells B that they exist).
    let unknown = |id: &str| match id.split_once('_') {
        Some((prefix, rest)) => format!("{prefix}_{}", rest.chars().rev().collect::<String>()),
        None => id.chars().rev().collect(),
    };
    let nobodys: std::collections::BTreeMap<&str, String> = objects
        .iter()
        .map(|(field, id)| (*field, unknown(id)))
        .collect();
    // Twice: naming A as the merchant acted for (refused at once), and acting as B itself while
    // naming A's objects (each object's own scoping answers).
    let as_itself = |map: &std::collections::BTreeMap<&'static str, String>| {
        let mut map = map.clone();
        map.remove("merchant_id");
        map
    };
    let variants = [
        ("for A", objects.clone(), nobodys.clone()),
        ("as B", as_itself(&objects), as_itself(&nobodys)),
    ];
    let channel = stack.channel().await;
    let descriptors =
        prost_types::FileDescriptorSet::decode(tandem_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut outcomes: Vec<String> = Vec::new();
    // Answers that tell B whether A's objects exist.
    let mut telling: Vec<String> = Vec::new();
    for file in &descriptors.file {
        for service in &file.service {
            if !matches!(
                service.name(),
                "MerchantGateway"
                    | "PartnershipService"
                    | "NotificationService"
                    | "StatementService"
            ) {
                continue;
            }
            let name = format!("{}.{}", file.package(), service.name());
            for method in &service.method {
                for (variant, objects, nobodys) in &variants {
                    let body = request_naming(
                        &descriptors,
                        method.input_type(),
                        objects,
                        &format!("authz-{}", method.name()),
                    );
                    let answer = call_with(
                        &channel,
                        &name,
                        method.name(),
                        method.server_streaming(),
                        Some(&format!("Bearer {intruder_key}")),
                        body,
                    )
                    .await;
                    let what = format!("{name}/{} {variant}", method.name());
                    let about_nobody = call_with(
                        &channel,
                        &name,
                        method.name(),
                        method.server_streaming(),
                        Some(&format!("Bearer {intruder_key}")),
                        request_naming(
                            &descriptors,
                            method.input_type(),
                            nobodys,
                            &format!("authz-nobody-{}", method.name()),
                        ),
                    )
                    .await;
                    // Error answers alike, once each names its own ids in the same words.
                    let blind =
                        |status: &tonic::Status, ids: &std::collections::BTreeMap<&str, String>| {
                            let mut message = status.message().to_owned();
                            for id in ids.values() {
                                message = message.replace(id.as_str(), "<id>");
                            }
                            (status.code(), message)
                        };
                    match (&answer, &about_nobody) {
                        (Err(a), Err(b)) if blind(a, objects) == blind(b, nobodys) => {}
                        (Ok(_), Ok(_)) => {}
                        _ => telling.push(format!(
                            "{what}: {answer:?} about another merchant's objects, {about_nobody:?} about objects that do not exist"
                        )),
                    }
                    match &answer {
                        Ok(bytes) => {
                            for secret in secrets {
                                assert!(
                                    !bytes
                                        .windows(secret.len())
                                        .any(|window| window == secret.as_bytes()),
                                    "{what} answered another merchant's {secret:?}"
                                );
                            }
                            outcomes.push(format!("{what}: OK, none of A's data"));
                        }
                        Err(status) => {
                            assert!(
                                matches!(
                                    status.code(),
                                    Code::PermissionDenied
                                        | Code::NotFound
                                        | Code::InvalidArgument
                                        | Code::FailedPrecondition
                                        | Code::AlreadyExists
                                ),
                                "{what}: {status:?}"
                            );
                            outcomes.push(format!("{what}: {:?}", status.code()));
                        }
                    }
                }
            }
        }
    }
    assert!(
        telling.is_empty(),
        "answers that differ for another merchant's objects and for objects that do not exist:\n{}",
        telling.join("\n")
    );
    assert!(outcomes.len() >= 25, "only {} methods", outcomes.len());
    eprintln!("{}", outcomes.join("\n"));
    stack.stop().await;
}

/// The matrix above fills only the fields that name objects, so a write can be refused for a
/// missing amount before its ownership is checked. Here the writes are complete and valid, as a
/// till or partner would send them: B refunding A's transaction, referring for C to A, proposing
/// terms on C and A's partnership, and filtering commissions on it. Each is refused exactly as
/// the same request about objects that do not exist, and none changes anything of A's or C's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_writes_naming_another_merchants_objects_are_refused_alike_and_change_nothing() {
    use tandem_proto::v1::partnership_service_client::PartnershipServiceClient;

    let stack = Stack::start(true).await;
    let (victim, victim_key) = stack.merchant("Victim A").await;
    let (partner, partner_key) = stack.merchant("Partner C").await;
    let (_, intruder_key) = stack.merchant("Intruder B").await;
    let partnership = stack.partnership(&partner, &victim, 500, 30).await;
    let who = customer("", "+33 6 10 20 30 41", "");
    stack
        .pos()
        .await
        .create_referral(with_bearer(
            referral("complete-r", &victim, who.clone()),
            &partner_key,
        ))
        .await
        .unwrap();
    stack
        .pos()
        .await
        .record_purchase(with_bearer(
            purchase("complete-p", "T-complete-victim", who.clone(), 4_200),
            &victim_key,
        ))
        .await
        .unwrap();
    wait_for_activity(&stack, &partner_key, 1).await;
    let nobody = |id: &str| match id.split_once('_') {
        Some((prefix, rest)) => format!("{prefix}_{}", rest.chars().rev().collect::<String>()),
        None => id.chars().rev().collect(),
    };
    let blind =
        |status: tonic::Status, id: &str| (status.code(), status.message().replace(id, "<id>"));
    let mut pos = stack.pos().await;
    let mut partnerships = PartnershipServiceClient::new(stack.channel().await);
    let mut compared = Vec::new();

    // B refunds A's transaction. A transaction id is the merchant's own, so this is a refund of
    // B's transaction "T-complete-victim", which B has not recorded yet: it is accepted and
    // waits for B's purchase (refunds may arrive first), exactly as one of a transaction id
    // nobody used; neither touches A's purchase (the ledger matches refunds by merchant and
    // transaction id).
    let refund = |transaction: &str, key: &str| pb::RecordRefundRequest {
        idempotency_key: key.into(),
        transaction_id: transaction.into(),
        amount: eur(1_000),
        void: false,
        customer: Some(who.clone()),
        refunded_at: None,
    };
    let mut waiting = Vec::new();
    for (transaction, key) in [
        ("T-complete-victim", "complete-refund-a"),
        ("T-complete-nobody", "complete-refund-b"),
    ] {
        let answer = pos
            .record_refund(with_bearer(refund(transaction, key), &intruder_key))
            .await
            .unwrap()
            .into_inner();
        waiting.push((answer.purchase_id, answer.refunded));
    }
    assert_eq!(waiting[0], waiting[1]);
    assert_eq!(
        waiting[0].0, "",
        "B's refund names no purchase: {waiting:?}"
    );

    // B refers a customer to A acting for C (a partnership B is not part of), and as itself.
    let refer = |acting_for: &str, acceptor: &str, key: &str| pb::CreateReferralRequest {
        merchant_id: acting_for.into(),
        ..referral(key, acceptor, who.clone())
    };
    let a = pos
        .create_referral(with_bearer(
            refer(&partner, &victim, "complete-refer-a"),
            &intruder_key,
        ))
        .await
        .unwrap_err();
    let b = pos
        .create_referral(with_bearer(
            refer(&nobody(&partner), &victim, "complete-refer-b"),
            &intruder_key,
        ))
        .await
        .unwrap_err();
    compared.push((
        "CreateReferral for C",
        blind(a, &partner),
        blind(b, &nobody(&partner)),
    ));

    // B proposes terms on C and A's partnership.
    let propose = |partnership_id: &str, key: &str| pb::ProposeTermsRequest {
        idempotency_key: key.into(),
        partnership_id: partnership_id.into(),
        counterparty_merchant_id: String::new(),
        caller_role: pb::PartnershipRole::Referrer as i32,
        terms: Some(pb::Terms {
            currency: "EUR".into(),
            attribution_window_days: 30,
            rule: Some(pb::terms::Rule::PercentageBps(9_000)),
            holding_period_days: 14,
            ..Default::default()
        }),
        effective_from: None,
    };
    let a = partnerships
        .propose_terms(with_bearer(
            propose(&partnership, "complete-terms-a"),
            &intruder_key,
        ))
        .await
        .unwrap_err();
    let b = partnerships
        .propose_terms(with_bearer(
            propose(&nobody(&partnership), "complete-terms-b"),
            &intruder_key,
        ))
        .await
        .unwrap_err();
    compared.push((
        "ProposeTerms",
        blind(a, &partnership),
        blind(b, &nobody(&partnership)),
    ));

    // B lists commissions filtered on C and A's partnership, in either role.
    for role in [pb::PartnershipRole::Referrer, pb::PartnershipRole::Acceptor] {
        let list = |partnership_id: &str| pb::ListCommissionsRequest {
            role: role as i32,
            partnership_id: partnership_id.into(),
            ..Default::default()
        };
        let a = pos
            .list_commissions(with_bearer(list(&partnership), &intruder_key))
            .await
            .unwrap_err();
        let b = pos
            .list_commissions(with_bearer(list(&nobody(&partnership)), &intruder_key))
            .await
            .unwrap_err();
        compared.push((
            "ListCommissions",
            blind(a, &partnership),
            blind(b, &nobody(&partnership)),
        ));
    }

    for (method, real, fake) in &compared {
        assert!(
            matches!(
                real.0,
                Code::PermissionDenied | Code::NotFound | Code::FailedPrecondition
            ),
            "{method}: {real:?}"
        );
        assert_eq!(
            real, fake,
            "{method} answers another merchant's objects unlike objects that do not exist"
        );
    }

    // Nothing of A's or C's changed: one referral, one commission line, and the partnership
    // still has its one terms version.
    let referrals = pos
        .list_referrals(with_bearer(
            pb::ListReferralsRequest::default(),
            &partner_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .referrals;
    assert_eq!(referrals.len(), 1);
    let lines = activity(&stack, &partner_key).await;
    assert_eq!(lines.len(), 1);
    let commissions = pos
        .list_commissions(with_bearer(
            pb::ListCommissionsRequest {
                role: pb::PartnershipRole::Referrer as i32,
                partnership_id: partnership.clone(),
                ..Default::default()
            },
            &partner_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .lines;
    assert_eq!(commissions.len(), 1, "{commissions:?}");
    let versions = partnerships
        .get_partnership(with_bearer(
            pb::GetPartnershipRequest {
                partnership_id: partnership.clone(),
            },
            &victim_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(versions.len(), 1, "{versions:?}");
    // A's purchase can still be refunded in full by A (B's refund took nothing off it), and
    // the referrer's commission is reversed once, in full.
    let refunded = pos
        .record_refund(with_bearer(
            pb::RecordRefundRequest {
                amount: eur(4_200),
                ..refund("T-complete-victim", "complete-refund-victim")
            },
            &victim_key,
        ))
        .await
        .expect("A refunds its whole purchase")
        .into_inner();
    assert!(!refunded.purchase_id.is_empty());
    // The referrer's line: refunded 42.00 and reversed 2.10 (5 % of it), once; so B's 10.00
    // refund of "its" transaction reached nothing of A's.
    let line = tandem_testkit::eventually(
        "the reversal of A's refund",
        std::time::Duration::from_secs(60),
        || {
            let mut pos = pos.clone();
            let partner_key = partner_key.clone();
            let partnership = partnership.clone();
            async move {
                let lines = pos
                    .list_commissions(with_bearer(
                        pb::ListCommissionsRequest {
                            role: pb::PartnershipRole::Referrer as i32,
                            partnership_id: partnership,
                            ..Default::default()
                        },
                        &partner_key,
                    ))
                    .await
                    .ok()?
                    .into_inner()
                    .lines;
                let line = lines.into_iter().next()?;
                (line.reversed.as_ref()?.amount_minor != 0).then_some(line)
            }
        },
    )
    .await;
    assert_eq!(line.refunded, eur(4_200), "{line:?}");
    assert_eq!(line.commission, eur(210), "{line:?}");
    assert_eq!(line.reversed, eur(210), "{line:?}");
    assert_eq!(line.net_commission, eur(0), "{line:?}");
    eprintln!("{compared:#?}");
    stack.stop().await;
}
