//! Identifier kinds end to end: a PAR matches across payment processors where card fingerprints
//! never do; a partnership limited to member numbers ignores a phone match; partners that share no
//! identifier are refused precisely; requests carry only what their merchant declared.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::time::Duration;

use support::*;
use tandem_proto::v1 as pb;
use tandem_proto::v1::partnership_service_client::PartnershipServiceClient;
use tonic::Code;

const PAR: &str = "V0010013018276458729101214380";
const SHARED_TOKEN: &str = "tok_8ad0f3c2b1e94d7a";

/// Waits until the ledger has applied every copy of `purchase_id` (one per customer key), so
/// that an attribution that did not happen is known not to be pending.
async fn wait_applied(stack: &Stack, purchase_id: &str, copies: i64) {
    let ledger = stack.schema("ledger").await;
    tandem_testkit::eventually(
        &format!("the ledger applied {copies} copies of {purchase_id}"),
        Duration::from_secs(60),
        || async {
            let applied: i64 =
                sqlx::query_scalar("SELECT count(*) FROM purchase_keys WHERE purchase_id = $1")
                    .bind(purchase_id)
                    .fetch_one(&ledger)
                    .await
                    .unwrap();
            (applied >= copies).then_some(())
        },
    )
    .await;
}

fn customer_with(fill: impl FnOnce(&mut pb::CustomerIdentifiers)) -> pb::CustomerIdentifiers {
    let mut customer = pb::CustomerIdentifiers::default();
    fill(&mut customer);
    customer
}

async fn record(stack: &Stack, key: &str, id: &str, customer: pb::CustomerIdentifiers) -> String {
    stack
        .pos()
        .await
        .record_purchase(with_bearer(purchase(id, id, customer, 10_000), key))
        .await
        .expect("record purchase")
        .into_inner()
        .purchase_id
}

#[tokio::test]
async fn a_par_matches_across_processors_where_equal_fingerprints_never_do() {
    let stack = Stack::start(true).await;
    let (acceptor, acceptor_key) = stack
        .merchant_capturing("A on Adyen", &["card:adyen", "par"])
        .await;
    let (referrer, referrer_key) = stack
        .merchant_capturing("C on Stripe", &["card:stripe", "par"])
        .await;
    stack.partnership(&referrer, &acceptor, 1_000, 30).await;

    // C's till: Stripe's fingerprint and the card's PAR.
    stack
        .pos()
        .await
        .create_referral(with_bearer(
            referral(
                "r-1",
                &acceptor,
                customer_with(|c| {
                    c.card_fingerprint = SHARED_TOKEN.into();
                    c.payment_account_reference = PAR.into();
                }),
            ),
            &referrer_key,
        ))
        .await
        .unwrap();
    // At A, Adyen happens to issue the very same token string for another card: a different
    // namespace, so no match.
    let by_fingerprint = record(
        &stack,
        &acceptor_key,
        "p-fingerprint",
        customer_with(|c| c.card_fingerprint = SHARED_TOKEN.into()),
    )
    .await;
    // The same card as at C, by its PAR (a terminal that reports it in lower case).
    let by_par = record(
        &stack,
        &acceptor_key,
        "p-par",
        customer_with(|c| {
            c.card_fingerprint = "adyen_other_token_1".into();
            c.payment_account_reference = PAR.to_lowercase();
        }),
    )
    .await;
    let seen = wait_for_activity(&stack, &referrer_key, 1).await;
    wait_applied(&stack, &by_fingerprint, 1).await;
    let seen_after = activity(&stack, &referrer_key).await;
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen_after.len(),
        1,
        "the equal fingerprint of another processor matched"
    );
    assert_eq!(seen_after[0].purchase_id, by_par);
    assert_eq!(
        seen_after[0].matched_by,
        pb::IdentifierKind::PaymentAccountReference as i32
    );

    let explained = stack
        .pos()
        .await
        .explain_commission(with_bearer(
            pb::ExplainCommissionRequest {
                purchase_id: by_par.clone(),
            },
            &referrer_key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        explained
            .explanation
            .contains("payment account reference (PAR)"),
        "{}",
        explained.explanation
    );
    assert_eq!(
        explained.line.unwrap().matched_by,
        pb::IdentifierKind::PaymentAccountReference as i32
    );
    assert_eq!(
        stack
            .pos()
            .await
            .explain_commission(with_bearer(
                pb::ExplainCommissionRequest {
                    purchase_id: by_fingerprint
                },
                &referrer_key,
            ))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    // Neither the PAR nor the fingerprints are stored or published, in any spelling.
    assert_never_stored_or_published(
        &stack,
        &[
            PAR,
            &PAR.to_lowercase(),
            SHARED_TOKEN,
            "adyen_other_token_1",
        ],
    )
    .await;
    stack.stop().await;
}

#[tokio::test]
async fn a_partnership_limited_to_member_numbers_ignores_a_phone_match() {
    let stack = Stack::start(true).await;
    let mut operator = stack.operator().await;
    let programme = pb::RegisterLoyaltyProgrammeRequest {
        programme_id: "Coalition".into(),
        display_name: "Coalition Rewards".into(),
        member_number_format: Some(pb::MemberNumberFormat {
            alphabet: pb::MemberAlphabet::Digits as i32,
            min_length: 8,
            max_length: 12,
            check_digit: pb::CheckDigitScheme::Luhn as i32,
        }),
    };
    let registered = operator
        .register_loyalty_programme(as_operator(programme.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(registered.programme_id, "coalition");
    // The same definition again: the registered programme. Another one: ALREADY_EXISTS.
    operator
        .register_loyalty_programme(as_operator(programme.clone()))
        .await
        .unwrap();
    let changed = operator
        .register_loyalty_programme(as_operator(pb::RegisterLoyaltyProgrammeRequest {
            display_name: "Renamed".into(),
            ..programme.clone()
        }))
        .await
        .unwrap_err();
    assert_eq!(changed.code(), Code::AlreadyExists, "{changed:?}");

    let (acceptor, acceptor_key) = stack
        .merchant_capturing("A", &["phone", "member:coalition"])
        .await;
    let (_, referrer_key) = stack
        .merchant_capturing("C", &["phone", "member:coalition"])
        .await;
    let mut agreements = PartnershipServiceClient::new(stack.channel().await);
    let terms = pb::Terms {
        currency: "EUR".into(),
        attribution_window_days: 30,
        rule: Some(pb::terms::Rule::PercentageBps(500)),
        attributing_kinds: vec![pb::IdentifierKind::LoyaltyMember as i32],
        ..Default::default()
    };
    let proposed = agreements
        .propose_terms(with_bearer(
            pb::ProposeTermsRequest {
                idempotency_key: "members-only".into(),
                counterparty_merchant_id: acceptor.clone(),
                caller_role: pb::PartnershipRole::Referrer as i32,
                terms: Some(terms),
                ..Default::default()
            },
            &referrer_key,
        ))
        .await
        .unwrap()
        .into_inner();
    agreements
        .accept_terms(with_bearer(
            pb::AcceptTermsRequest {
                idempotency_key: "ok".into(),
                partnership_id: proposed.partnership_id.clone(),
                version: 1,
            },
            &acceptor_key,
        ))
        .await
        .unwrap();
    let shown = agreements
        .get_partnership(with_bearer(
            pb::GetPartnershipRequest {
                partnership_id: proposed.partnership_id.clone(),
            },
            &acceptor_key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.identifier_overlap, vec![capture("member:coalition")]);
    assert_eq!(shown.referrer_captures.len(), 2);

    let member = |number: &str| pb::LoyaltyMembership {
        programme_id: "coalition".into(),
        member_number: number.into(),
    };
    stack
        .pos()
        .await
        .create_referral(with_bearer(
            referral(
                "r-1",
                &acceptor,
                customer_with(|c| {
                    c.phone = "+44 20 7946 0958".into();
                    c.loyalty = Some(member("7992 7398 713"));
                }),
            ),
            &referrer_key,
        ))
        .await
        .unwrap();
    let by_phone = record(
        &stack,
        &acceptor_key,
        "p-phone",
        customer_with(|c| c.phone = "+44 (0)20 7946 0958".into()),
    )
    .await;
    let by_member = record(
        &stack,
        &acceptor_key,
        "p-member",
        customer_with(|c| c.loyalty = Some(member("79927398713"))),
    )
    .await;
    wait_for_activity(&stack, &referrer_key, 1).await;
    wait_applied(&stack, &by_phone, 1).await;
    let seen = activity(&stack, &referrer_key).await;
    assert_eq!(
        seen.len(),
        1,
        "the phone match attributed under members-only terms"
    );
    assert_eq!(seen[0].purchase_id, by_member);
    assert_eq!(seen[0].matched_by, pb::IdentifierKind::LoyaltyMember as i32);

    // A mistyped member number fails the programme's check digit.
    let typo = stack
        .pos()
        .await
        .record_purchase(with_bearer(
            purchase(
                "p-typo",
                "p-typo",
                customer_with(|c| c.loyalty = Some(member("79927398714"))),
                100,
            ),
            &acceptor_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(typo.code(), Code::InvalidArgument);
    assert!(
        typo.message().contains("customer.loyalty.member_number"),
        "{}",
        typo.message()
    );
    stack.stop().await;
}

#[tokio::test]
async fn partners_sharing_no_identifier_and_undeclared_identifiers_are_refused_precisely() {
    let stack = Stack::start(false).await;
    let (adyen, adyen_key) = stack.merchant_capturing("On Adyen", &["card:adyen"]).await;
    let (stripe, _) = stack
        .merchant_capturing("On Stripe", &["card:stripe"])
        .await;
    let refused = stack
        .operator()
        .await
        .create_partnership(as_operator(pb::CreatePartnershipRequest {
            referrer_merchant_id: stripe.clone(),
            acceptor_merchant_id: adyen.clone(),
            commission_rate_bps: 500,
            attribution_window_days: 30,
            effective_from: None,
            idempotency_key: "stripe-adyen".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    for says in [
        "no identifier in common",
        "card:adyen",
        "card:stripe",
        "PAR",
    ] {
        assert!(refused.message().contains(says), "{}", refused.message());
    }

    // Terms that allow only e-mail, between a phone-only and a phone+e-mail merchant.
    let (_, phone_only_key) = stack.merchant_capturing("Phones", &["phone"]).await;
    let (both, _) = stack.merchant_capturing("Both", &["phone", "email"]).await;
    let refused = PartnershipServiceClient::new(stack.channel().await)
        .propose_terms(with_bearer(
            pb::ProposeTermsRequest {
                idempotency_key: "email-only".into(),
                counterparty_merchant_id: both.clone(),
                caller_role: pb::PartnershipRole::Referrer as i32,
                terms: Some(pb::Terms {
                    currency: "EUR".into(),
                    attribution_window_days: 30,
                    rule: Some(pb::terms::Rule::PercentageBps(500)),
                    attributing_kinds: vec![pb::IdentifierKind::Email as i32],
                    ..Default::default()
                }),
                ..Default::default()
            },
            &phone_only_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("the terms allow email"),
        "{}",
        refused.message()
    );

    let mut pos = stack.pos().await;
    let refuse = |customer: pb::CustomerIdentifiers| purchase("k", "t", customer, 100);
    // An e-mail from a till whose merchant declared only phones.
    assert_status(
        pos.record_purchase(with_bearer(
            refuse(customer("", "", "a@b.example")),
            &phone_only_key,
        ))
        .await,
        Code::FailedPrecondition,
        "customer.email: your merchant has not declared",
    );
    // A fingerprint of a processor the merchant did not declare.
    assert_status(
        pos.record_purchase(with_bearer(
            refuse(customer_with(|c| {
                c.card_fingerprint = "tok_1234567890".into();
                c.card_processor = "stripe".into();
            })),
            &adyen_key,
        ))
        .await,
        Code::FailedPrecondition,
        "customer.card_processor",
    );
    // A card number where the PAR goes.
    assert_status(
        pos.record_purchase(with_bearer(
            refuse(customer_with(|c| {
                c.payment_account_reference = "4111 1111 1111 1111".into()
            })),
            &adyen_key,
        ))
        .await,
        Code::InvalidArgument,
        "card number",
    );

    // Declaring a programme nobody registered is refused; so is a card capture without its
    // processor; a declaration round-trips.
    let declare = |tags: &[&str]| pb::DeclareIdentifierCaptureRequest {
        captures: tags.iter().map(|tag| capture(tag)).collect(),
    };
    assert_status(
        pos.declare_identifier_capture(with_bearer(declare(&["member:unknown"]), &adyen_key))
            .await,
        Code::FailedPrecondition,
        "is not registered",
    );
    assert_status(
        pos.declare_identifier_capture(with_bearer(declare(&["card"]), &adyen_key))
            .await,
        Code::InvalidArgument,
        "processor",
    );
    let declared = pos
        .declare_identifier_capture(with_bearer(
            declare(&["card:Adyen", "par", "par"]),
            &adyen_key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        declared.captures,
        vec![capture("card:adyen"), capture("par")]
    );
    let read = pos
        .get_identifier_capture(with_bearer(pb::GetIdentifierCaptureRequest {}, &adyen_key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read, declared);
    stack.stop().await;
}
