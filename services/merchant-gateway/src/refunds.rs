//! Refunds, voids and referral cancellations: writes that change what was already recorded.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::{Acquire, PgConnection};
use tandem_domain::ids::{MerchantId, ReferralId, RefundId};
use tandem_domain::money::Money;
use tandem_domain::text::parse_token;
use tandem_domain::ValidationError;
use tandem_proto::time::timestamp;
use tandem_proto::v1 as pb;
use tandem_proto::v1::event_envelope::Payload;
use tonic::Request;

use crate::auth::authenticate_merchant;
use crate::bulk;
use crate::commands::parse_instant;
use crate::events::record_event;
use crate::identifiers::{authenticate_caller, customer_keys, Caller};
use crate::{idempotency, GatewayError, State};

type ReferralRow = (String, String, Vec<String>, Option<chrono::DateTime<Utc>>);
type PurchaseRow = (
    String,
    Option<i64>,
    Option<String>,
    Option<Vec<String>>,
    i64,
);

pub async fn record_refund(
    state: &State,
    request: Request<pb::RecordRefundRequest>,
) -> Result<pb::RecordRefundResponse, GatewayError> {
    let caller = authenticate_caller(&state.pool, request.metadata()).await?;
    let span = tracing::Span::current();
    span.record("merchant_id", caller.merchant.as_str());
    let request = request.into_inner();
    let now = Utc::now();
    let prepared = prepare_refund(state, &caller, &request, now).await?;
    let mut tx = state.pool.begin().await?;
    let written = write_refund(&mut tx, &caller.merchant, prepared, now).await?;
    tx.commit().await?;
    if written.fresh {
        state.outbox_written.notify_one();
    }
    span.record("refund_id", written.response.refund_id.as_str());
    Ok(written.response)
}

/// Up to [`bulk::MAX_ITEMS`] refunds in one call and one transaction, applied in request order
/// (a refund and a later void of the same purchase in one call work as two calls would).
pub async fn record_refunds(
    state: &State,
    request: Request<pb::RecordRefundsRequest>,
) -> Result<pb::RecordRefundsResponse, GatewayError> {
    let caller = authenticate_caller(&state.pool, request.metadata()).await?;
    tracing::Span::current().record("merchant_id", caller.merchant.as_str());
    let items = request.into_inner().refunds;
    bulk::check_size("refunds", items.len())?;
    let now = Utc::now();
    let mut prepared = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        prepared.push(
            prepare_refund(state, &caller, item, now)
                .await
                .map_err(|error| bulk::within("refunds", index, error)),
        );
    }
    let mut tx = state.pool.begin().await?;
    let mut outcomes = Vec::with_capacity(items.len());
    for item in prepared {
        let outcome = match item {
            Err(refused) => Err(refused),
            Ok(prepared) => {
                let mut savepoint = Acquire::begin(&mut tx).await?;
                let written = write_refund(&mut savepoint, &caller.merchant, prepared, now).await;
                bulk::settle(savepoint, written).await?
            }
        };
        outcomes.push(outcome);
    }
    tx.commit().await?;
    let (results, fresh) = bulk::results(outcomes, |index, outcome| pb::RecordRefundResult {
        index,
        outcome: Some(match outcome {
            Ok(recorded) => pb::record_refund_result::Outcome::Recorded(recorded),
            Err(error) => pb::record_refund_result::Outcome::Error(error),
        }),
    });
    if fresh > 0 {
        state.outbox_written.notify_one();
    }
    tracing::info!(
        items = results.len(),
        recorded = fresh,
        "bulk refunds recorded"
    );
    Ok(pb::RecordRefundsResponse { results })
}

/// A refund request validated and pseudonymised.
pub struct PreparedRefund {
    idempotency_key: String,
    transaction_id: String,
    refunded_at: DateTime<Utc>,
    amount: Option<Money>,
    void: bool,
    customer_keys: Option<Vec<String>>,
    fingerprint: Vec<u8>,
}

async fn prepare_refund(
    state: &State,
    caller: &Caller,
    request: &pb::RecordRefundRequest,
    now: DateTime<Utc>,
) -> Result<PreparedRefund, GatewayError> {
    let idempotency_key = parse_token("idempotency_key", &request.idempotency_key, 1, 128)?;
    let transaction_id = parse_token("transaction_id", &request.transaction_id, 1, 128)?;
    let refunded_at = parse_instant("refunded_at", request.refunded_at.as_ref(), now)?;
    let amount = match (&request.amount, request.void) {
        (Some(_), true) => {
            return Err(ValidationError::new(
                "amount",
                "must be empty for a void: a void refunds whatever is left",
            )
            .into())
        }
        (None, false) => {
            return Err(
                ValidationError::new("amount", "is required for a refund (or set void)").into(),
            )
        }
        (Some(amount), false) => Some(Money::parse_bounded(
            "amount",
            amount.amount_minor,
            &amount.currency,
        )?),
        (None, true) => None,
    };
    let keys = match &request.customer {
        Some(customer) => Some(customer_keys(state, caller, Some(customer)).await?),
        None => None,
    };
    let amount_part = amount.map(|a| a.to_string()).unwrap_or_default();
    let refunded_at_part = request
        .refunded_at
        .map(|t| format!("{}.{}", t.seconds, t.nanos))
        .unwrap_or_default();
    let fingerprint = crate::commands::keyed_fingerprint(
        &[
            transaction_id.as_str(),
            &amount_part,
            if request.void { "void" } else { "refund" },
            &refunded_at_part,
        ],
        keys.as_deref().unwrap_or_default(),
        3,
    );
    let customer_keys: Option<Vec<String>> =
        keys.map(|keys| keys.into_iter().map(|key| key.to_string()).collect());
    Ok(PreparedRefund {
        idempotency_key,
        transaction_id,
        refunded_at,
        amount,
        void: request.void,
        customer_keys,
        fingerprint,
    })
}

/// Writes one refund in the caller's transaction; a retry answers the stored response.
async fn write_refund(
    connection: &mut PgConnection,
    merchant: &MerchantId,
    prepared: PreparedRefund,
    now: DateTime<Utc>,
) -> Result<bulk::Written<pb::RecordRefundResponse>, GatewayError> {
    let PreparedRefund {
        idempotency_key,
        transaction_id,
        refunded_at,
        amount,
        void,
        customer_keys,
        fingerprint,
    } = prepared;
    let scope = idempotency::Scope {
        owner: merchant.as_str(),
        key: &idempotency_key,
        operation: "RecordRefund",
        fingerprint: &fingerprint,
    };
    if let Some(response) = idempotency::check(connection, &scope).await? {
        tracing::info!("idempotent retry answered from the first response");
        return Ok(bulk::Written {
            response,
            fresh: false,
        });
    }
    let purchase: Option<PurchaseRow> = sqlx::query_as(
        "SELECT purchase_id, amount_minor, currency, customer_keys, refunded_minor FROM purchases \
         WHERE merchant_id = $1 AND transaction_id = $2 FOR UPDATE",
    )
    .bind(merchant.as_str())
    .bind(&transaction_id)
    .fetch_optional(&mut *connection)
    .await?;
    let (purchase_id, refund, keys) = match purchase {
        Some((purchase_id, Some(amount_minor), Some(currency), Some(keys), refunded_minor)) => {
            let remaining = amount_minor - refunded_minor;
            let refund = match amount {
                None if remaining <= 0 => {
                    return Err(GatewayError::FailedPrecondition(format!("transaction {transaction_id} is already fully refunded")))
                }
                None => Money::parse_positive("amount", remaining, &currency)?,
                Some(refund) if refund.currency.as_str() != currency => {
                    return Err(ValidationError::new("amount.currency", format!("must be the purchase's currency {currency}")).into())
                }
                Some(refund) if refund.amount_minor > remaining => {
                    return Err(GatewayError::FailedPrecondition(format!(
                        "a refund of {refund} would exceed what is left to refund of transaction {transaction_id}: {} of {}",
                        Money::new(remaining, refund.currency),
                        Money::new(amount_minor, refund.currency)
                    )))
                }
                Some(refund) => refund,
            };
            sqlx::query("UPDATE purchases SET refunded_minor = refunded_minor + $3 WHERE merchant_id = $1 AND transaction_id = $2")
                .bind(merchant.as_str())
                .bind(&transaction_id)
                .bind(refund.amount_minor)
                .execute(&mut *connection)
                .await?;
            (purchase_id, refund, keys)
        }
        _ => {
            // The purchase has not reached Tandem yet (or predates refund support): the refund
            // waits for it in the ledger, routed by the customer keys the POS sends now.
            let Some(refund) = amount else {
                return Err(GatewayError::FailedPrecondition(format!(
                    "transaction {transaction_id} is not recorded, so there is nothing to void; record the purchase first or refund an amount"
                )));
            };
            let Some(keys) = customer_keys else {
                return Err(GatewayError::FailedPrecondition(format!(
                    "transaction {transaction_id} is not recorded yet; send the customer identifiers with the refund so it can wait for the purchase"
                )));
            };
            (String::new(), refund, keys)
        }
    };
    let refund_id = RefundId::generate();
    sqlx::query("INSERT INTO refunds (refund_id, merchant_id, transaction_id, amount_minor, currency) VALUES ($1, $2, $3, $4, $5)")
        .bind(refund_id.as_str())
        .bind(merchant.as_str())
        .bind(&transaction_id)
        .bind(refund.amount_minor)
        .bind(refund.currency.as_str())
        .execute(&mut *connection)
        .await?;
    let refunded = pb::Money {
        amount_minor: refund.amount_minor,
        currency: refund.currency.to_string(),
    };
    let event = pb::RefundRecorded {
        refund_id: refund_id.to_string(),
        merchant_id: merchant.to_string(),
        transaction_id,
        purchase_id: purchase_id.clone(),
        customer_keys: keys,
        amount: Some(refunded.clone()),
        refunded_at: Some(timestamp(refunded_at)),
        void,
    };
    let event_id = record_event(
        connection,
        &format!("refund-{refund_id}"),
        Payload::RefundRecorded(event),
        now,
    )
    .await?;
    let response = pb::RecordRefundResponse {
        refund_id: refund_id.to_string(),
        purchase_id,
        refunded: Some(refunded),
    };
    idempotency::store(connection, &scope, &response).await?;
    tracing::info!(%event_id, %refund_id, "refund recorded");
    Ok(bulk::Written {
        response,
        fresh: true,
    })
}

pub async fn cancel_referral(
    state: &State,
    request: Request<pb::CancelReferralRequest>,
) -> Result<pb::CancelReferralResponse, GatewayError> {
    let merchant = authenticate_merchant(&state.pool, request.metadata()).await?;
    tracing::Span::current().record("merchant_id", merchant.as_str());
    let request = request.into_inner();
    let idempotency_key = parse_token("idempotency_key", &request.idempotency_key, 1, 128)?;
    let referral_id = ReferralId::parse("referral_id", &request.referral_id)?;
    let fingerprint = Sha256::digest(referral_id.as_str().as_bytes()).to_vec();
    let now = tandem_proto::time::truncate_to_micros(Utc::now());

    let scope = idempotency::Scope {
        owner: merchant.as_str(),
        key: &idempotency_key,
        operation: "CancelReferral",
        fingerprint: &fingerprint,
    };
    let mut tx = match idempotency::start(&state.pool, &scope).await? {
        idempotency::Begun::Replayed(response) => return Ok(response),
        idempotency::Begun::Fresh(tx) => tx,
    };
    let referral: Option<ReferralRow> = sqlx::query_as(
        "SELECT referrer_merchant_id, acceptor_merchant_id, customer_keys, cancelled_at FROM referrals WHERE referral_id = $1 FOR UPDATE",
    )
    .bind(referral_id.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    // Another merchant's referral answers as one that does not exist: the answer must not tell
    // the caller that the id is someone else's.
    let Some((referrer, acceptor, customer_keys, cancelled_at)) =
        referral.filter(|(referrer, ..)| referrer == merchant.as_str())
    else {
        return Err(GatewayError::NotFound(format!(
            "referral {referral_id} is not one of your referrals (only the merchant that made a referral can cancel it)"
        )));
    };
    if let Some(at) = cancelled_at {
        return Err(GatewayError::FailedPrecondition(format!(
            "referral {referral_id} was already cancelled at {at}"
        )));
    }
    sqlx::query("UPDATE referrals SET cancelled_at = $2 WHERE referral_id = $1")
        .bind(referral_id.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?;
    let event = pb::ReferralCancelled {
        referral_id: referral_id.to_string(),
        referrer_merchant_id: referrer,
        acceptor_merchant_id: acceptor,
        customer_keys,
        cancelled_at: Some(timestamp(now)),
    };
    record_event(
        &mut tx,
        &format!("referral-{referral_id}-cancellation"),
        Payload::ReferralCancelled(event),
        now,
    )
    .await?;
    let response = pb::CancelReferralResponse {
        referral_id: referral_id.to_string(),
        cancelled_at: Some(timestamp(now)),
    };
    idempotency::complete(state, tx, &scope, &response).await?;
    tracing::info!("referral cancelled");
    Ok(response)
}
