//! Operator calls are idempotent, API keys rotate (two valid at once, then revoke) and revoke
//! at once, and every operator call lands in the append-only audit log without a secret.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use support::*;
use tandem_proto::v1 as pb;
use tonic::Code;

fn new_merchant(key: &str, name: &str) -> pb::CreateMerchantRequest {
    pb::CreateMerchantRequest {
        display_name: name.into(),
        settlement_currency: "EUR".into(),
        time_zone: "Europe/Paris".into(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

/// Who the gateway says `api_key` belongs to, or the refusal.
async fn whoami(stack: &Stack, api_key: &str) -> Result<String, tonic::Status> {
    stack
        .pos()
        .await
        .get_identifier_capture(with_bearer(pb::GetIdentifierCaptureRequest {}, api_key))
        .await
        .map(|answer| answer.into_inner().merchant_id)
}

#[tokio::test]
async fn creates_are_idempotent_and_keys_rotate_and_revoke_with_an_audit_trail() {
    let stack = Stack::start(false).await;
    let mut operator = stack.operator().await;

    // CreateMerchant: the same key and request answer the same merchant, never a second one,
    // and never the secret again.
    let first = operator
        .create_merchant(as_operator(new_merchant("onboard-a", "Atelier A")))
        .await
        .unwrap()
        .into_inner();
    assert!(first.api_key.starts_with("tdm_"));
    assert!(first.api_key_id.starts_with("key_"));
    let retry = operator
        .create_merchant(as_operator(new_merchant("onboard-a", "Atelier A")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry.merchant_id, first.merchant_id);
    assert_eq!(retry.api_key_id, first.api_key_id);
    assert_eq!(retry.api_key, "", "a retry never shows the secret");
    assert_status(
        operator
            .create_merchant(as_operator(new_merchant("onboard-a", "Another name")))
            .await,
        Code::AlreadyExists,
        "idempotency",
    );
    assert_status(
        operator
            .create_merchant(as_operator(new_merchant("", "No key")))
            .await,
        Code::InvalidArgument,
        "idempotency_key",
    );
    let gateway_db = stack.schema("gateway").await;
    let merchants: i64 = sqlx::query_scalar("SELECT count(*) FROM merchants")
        .fetch_one(&gateway_db)
        .await
        .unwrap();
    assert_eq!(merchants, 1, "one merchant for one idempotency key");

    // CreatePartnership likewise.
    let other = operator
        .create_merchant(as_operator(new_merchant("onboard-c", "Cafe C")))
        .await
        .unwrap()
        .into_inner();
    let partnership = |key: &str| pb::CreatePartnershipRequest {
        referrer_merchant_id: other.merchant_id.clone(),
        acceptor_merchant_id: first.merchant_id.clone(),
        commission_rate_bps: 500,
        attribution_window_days: 30,
        idempotency_key: key.into(),
        ..Default::default()
    };
    let created = operator
        .create_partnership(as_operator(partnership("c-to-a")))
        .await
        .unwrap()
        .into_inner();
    let again = operator
        .create_partnership(as_operator(partnership("c-to-a")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.partnership_id, created.partnership_id);
    assert_status(
        operator
            .create_partnership(as_operator(partnership("c-to-a-again")))
            .await,
        Code::AlreadyExists,
        &created.partnership_id,
    );

    // Rotation: a second key, both valid, then the first revoked.
    assert_eq!(
        whoami(&stack, &first.api_key).await.unwrap(),
        first.merchant_id
    );
    let issued = operator
        .issue_api_key(as_operator(pb::IssueApiKeyRequest {
            merchant_id: first.merchant_id.clone(),
            idempotency_key: "rotate-2026-12".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    let second = issued.key.clone().unwrap();
    assert_ne!(second.key_id, first.api_key_id);
    assert_eq!(second.hint, issued.api_key[..8]);
    let reissued = operator
        .issue_api_key(as_operator(pb::IssueApiKeyRequest {
            merchant_id: first.merchant_id.clone(),
            idempotency_key: "rotate-2026-12".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reissued.key.unwrap().key_id, second.key_id);
    assert_eq!(reissued.api_key, "");
    assert_eq!(
        whoami(&stack, &first.api_key).await.unwrap(),
        first.merchant_id
    );
    assert_eq!(
        whoami(&stack, &issued.api_key).await.unwrap(),
        first.merchant_id
    );

    let revoked = operator
        .revoke_api_key(as_operator(pb::RevokeApiKeyRequest {
            merchant_id: first.merchant_id.clone(),
            key_id: first.api_key_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked_at.is_some());
    assert_status(
        whoami(&stack, &first.api_key).await,
        Code::Unauthenticated,
        "revoked",
    );
    assert_eq!(
        whoami(&stack, &issued.api_key).await.unwrap(),
        first.merchant_id
    );
    // Revoking again answers the same revocation.
    let revoked_again = operator
        .revoke_api_key(as_operator(pb::RevokeApiKeyRequest {
            merchant_id: first.merchant_id.clone(),
            key_id: first.api_key_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked_again, revoked);
    // A key is revoked only through its own merchant.
    assert_status(
        operator
            .revoke_api_key(as_operator(pb::RevokeApiKeyRequest {
                merchant_id: other.merchant_id.clone(),
                key_id: second.key_id.clone(),
            }))
            .await,
        Code::NotFound,
        &second.key_id,
    );
    assert_eq!(
        whoami(&stack, &issued.api_key).await.unwrap(),
        first.merchant_id
    );
    let listed = operator
        .list_api_keys(as_operator(pb::ListApiKeysRequest {
            merchant_id: first.merchant_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].key_id, first.api_key_id);
    assert!(listed[0].revoked_at.is_some());
    assert!(listed[1].revoked_at.is_none());
    // Merchants cannot manage keys.
    assert_status(
        operator
            .list_api_keys(with_bearer(
                pb::ListApiKeysRequest {
                    merchant_id: first.merchant_id.clone(),
                },
                &issued.api_key,
            ))
            .await,
        Code::Unauthenticated,
        "operator token",
    );

    // The audit log: every authenticated operator call, refusals included, no secret.
    let events = operator
        .list_audit_events(as_operator(pb::ListAuditEventsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .events;
    let summary: Vec<(String, String)> = events
        .iter()
        .map(|e| (e.action.clone(), e.outcome.clone()))
        .collect();
    for expected in [
        ("CreateMerchant", "OK"),
        ("CreateMerchant", "ALREADY_EXISTS"),
        ("CreateMerchant", "INVALID_ARGUMENT"),
        ("CreatePartnership", "OK"),
        ("IssueApiKey", "OK"),
        ("RevokeApiKey", "OK"),
        ("RevokeApiKey", "NOT_FOUND"),
    ] {
        assert!(
            summary.contains(&(expected.0.to_owned(), expected.1.to_owned())),
            "{expected:?} missing from {summary:?}"
        );
    }
    let created_row = events
        .iter()
        .find(|e| e.action == "CreateMerchant" && e.outcome == "OK")
        .unwrap();
    assert_eq!(created_row.target, first.merchant_id);
    assert!(created_row.detail.contains("Atelier A"));
    assert_eq!(created_row.trace_id.len(), 32);
    assert!(events.windows(2).all(|w| w[0].sequence < w[1].sequence));
    for event in &events {
        for secret in [&first.api_key, &other.api_key, &issued.api_key] {
            assert!(
                !event.detail.contains(secret.as_str()) && !event.target.contains(secret.as_str())
            );
        }
        assert!(!event.detail.contains(OPERATOR_TOKEN));
    }
    // Paging.
    let after = operator
        .list_audit_events(as_operator(pb::ListAuditEventsRequest {
            after_sequence: events[1].sequence,
            page_size: 2,
        }))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(after.len(), 2);
    assert_eq!(after[0].sequence, events[2].sequence);
    // Append-only, whoever asks.
    for statement in [
        "UPDATE operator_audit SET outcome = 'OK'",
        "DELETE FROM operator_audit",
        "TRUNCATE operator_audit",
    ] {
        let refused = sqlx::query(statement)
            .execute(&gateway_db)
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains("append-only"),
            "{statement}: {refused}"
        );
    }
    stack.stop().await;
}
