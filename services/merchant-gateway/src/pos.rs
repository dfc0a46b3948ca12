//! The `tandem.v1.MerchantGateway` service: what a merchant's point-of-sale calls.

use std::sync::Arc;

use chrono::Utc;
use prost::Message;
use tandem_domain::attribution::attribution_ends_at;
use tandem_domain::ids::{MerchantId, PartnershipId, PurchaseId, ReferralId};
use tandem_domain::partnership::{check_not_self_referral, AttributionWindow};
use tandem_proto::time::timestamp;
use tandem_proto::v1::event_envelope::Payload;
use tandem_proto::v1::merchant_gateway_server::MerchantGateway;
use tandem_proto::v1::{self as pb, referral_ledger_client::ReferralLedgerClient};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::auth::{authenticate_merchant, check_acting_as};
use crate::commands::{parse_create_referral, parse_record_purchase};
use crate::events::record_event;
use crate::{idempotency, GatewayError, State};

const MAX_PAGE_SIZE: u32 = 500;

pub struct PosApi {
    pub state: Arc<State>,
    pub ledger: ReferralLedgerClient<Channel>,
}

#[tonic::async_trait]
impl MerchantGateway for PosApi {
    #[tracing::instrument(skip_all, fields(merchant_id, referral_id, partnership_id))]
    async fn create_referral(
        &self,
        request: Request<pb::CreateReferralRequest>,
    ) -> Result<Response<pb::CreateReferralResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        Ok(Response::new(self.create_referral(request).await?))
    }

    #[tracing::instrument(skip_all, fields(merchant_id, purchase_id))]
    async fn record_purchase(
        &self,
        request: Request<pb::RecordPurchaseRequest>,
    ) -> Result<Response<pb::RecordPurchaseResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        Ok(Response::new(self.record_purchase(request).await?))
    }

    #[tracing::instrument(skip_all, fields(merchant_id))]
    async fn list_referral_activity(
        &self,
        request: Request<pb::ListReferralActivityRequest>,
    ) -> Result<Response<pb::ListReferralActivityResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        Ok(Response::new(self.list_referral_activity(request).await?))
    }
}

impl PosApi {
    async fn create_referral(
        &self,
        request: Request<pb::CreateReferralRequest>,
    ) -> Result<pb::CreateReferralResponse, GatewayError> {
        let merchant = authenticate_merchant(&self.state.pool, request.metadata()).await?;
        let span = tracing::Span::current();
        span.record("merchant_id", merchant.as_str());
        let request = request.into_inner();
        check_acting_as(&merchant, &request.merchant_id)?;
        let now = Utc::now();
        let parsed = parse_create_referral(&request, &self.state.network_key, now)?;
        let command = parsed.command;
        check_not_self_referral(&merchant, &command.acceptor)?;

        let mut tx = self.state.pool.begin().await?;
        if let Some(previous) = idempotency::begin(
            &mut tx,
            &merchant,
            &parsed.idempotency_key,
            "CreateReferral",
            &parsed.fingerprint,
        )
        .await?
        {
            tracing::info!("idempotent retry answered from the first response");
            return Ok(pb::CreateReferralResponse::decode(previous.as_slice())?);
        }
        let partnership: Option<(String, i32, i32)> = sqlx::query_as(
            "SELECT partnership_id, terms_version, attribution_window_days FROM partnerships \
             WHERE referrer_merchant_id = $1 AND acceptor_merchant_id = $2",
        )
        .bind(merchant.as_str())
        .bind(command.acceptor.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some((partnership_id, terms_version, window_days)) = partnership else {
            return Err(GatewayError::FailedPrecondition(format!(
                "there is no partnership from {merchant} to {}; a referral needs one (ask the operator to create it)",
                command.acceptor
            )));
        };
        let partnership_id = PartnershipId::parse("partnership_id", &partnership_id)?;
        let window = AttributionWindow::from_days(
            "attribution_window_days",
            u32::try_from(window_days).unwrap_or(0),
        )?;
        let referral_id = ReferralId::generate();
        let ends_at = attribution_ends_at(command.referred_at, window);
        span.record("referral_id", referral_id.as_str());
        span.record("partnership_id", partnership_id.as_str());

        let event = pb::CustomerReferred {
            referral_id: referral_id.to_string(),
            partnership_id: partnership_id.to_string(),
            terms_version: u32::try_from(terms_version).unwrap_or(0),
            referrer_merchant_id: merchant.to_string(),
            acceptor_merchant_id: command.acceptor.to_string(),
            customer_keys: command
                .customer_keys
                .iter()
                .map(ToString::to_string)
                .collect(),
            referrer_reference: command.referrer_reference,
            referred_at: Some(timestamp(command.referred_at)),
            attribution_ends_at: Some(timestamp(ends_at)),
        };
        let event_id = record_event(
            &mut tx,
            &format!("referral-{referral_id}"),
            Payload::CustomerReferred(event),
            now,
        )
        .await?;
        let response = pb::CreateReferralResponse {
            referral_id: referral_id.to_string(),
            partnership_id: partnership_id.to_string(),
            referred_at: Some(timestamp(command.referred_at)),
            attribution_ends_at: Some(timestamp(ends_at)),
        };
        idempotency::finish(
            &mut tx,
            &merchant,
            &parsed.idempotency_key,
            "CreateReferral",
            &parsed.fingerprint,
            &response.encode_to_vec(),
        )
        .await?;
        tx.commit().await?;
        self.state.outbox_written.notify_one();
        tracing::info!(%event_id, "referral recorded");
        Ok(response)
    }

    async fn record_purchase(
        &self,
        request: Request<pb::RecordPurchaseRequest>,
    ) -> Result<pb::RecordPurchaseResponse, GatewayError> {
        let merchant = authenticate_merchant(&self.state.pool, request.metadata()).await?;
        let span = tracing::Span::current();
        span.record("merchant_id", merchant.as_str());
        let request = request.into_inner();
        check_acting_as(&merchant, &request.merchant_id)?;
        let now = Utc::now();
        let parsed = parse_record_purchase(&request, &self.state.network_key, now)?;
        let command = parsed.command;

        let mut tx = self.state.pool.begin().await?;
        if let Some(previous) = idempotency::begin(
            &mut tx,
            &merchant,
            &parsed.idempotency_key,
            "RecordPurchase",
            &parsed.fingerprint,
        )
        .await?
        {
            tracing::info!("idempotent retry answered from the first response");
            return Ok(pb::RecordPurchaseResponse::decode(previous.as_slice())?);
        }
        let purchase_id = PurchaseId::generate();
        span.record("purchase_id", purchase_id.as_str());
        let inserted = sqlx::query(
            "INSERT INTO purchases (merchant_id, transaction_id, purchase_id) VALUES ($1, $2, $3) \
             ON CONFLICT (merchant_id, transaction_id) DO NOTHING",
        )
        .bind(merchant.as_str())
        .bind(&command.transaction_id)
        .bind(purchase_id.as_str())
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(GatewayError::AlreadyExists(format!(
                "transaction_id {:?} was already recorded with another idempotency key; a transaction is recorded once",
                command.transaction_id
            )));
        }
        let event = pb::PurchaseRecorded {
            purchase_id: purchase_id.to_string(),
            merchant_id: merchant.to_string(),
            transaction_id: command.transaction_id,
            customer_keys: command
                .customer_keys
                .iter()
                .map(ToString::to_string)
                .collect(),
            amount: Some(pb::Money {
                amount_minor: command.amount.amount_minor,
                currency: command.amount.currency.to_string(),
            }),
            purchased_at: Some(timestamp(command.purchased_at)),
        };
        let event_id = record_event(
            &mut tx,
            &format!("purchase-{purchase_id}"),
            Payload::PurchaseRecorded(event),
            now,
        )
        .await?;
        let response = pb::RecordPurchaseResponse {
            purchase_id: purchase_id.to_string(),
            purchased_at: Some(timestamp(command.purchased_at)),
        };
        idempotency::finish(
            &mut tx,
            &merchant,
            &parsed.idempotency_key,
            "RecordPurchase",
            &parsed.fingerprint,
            &response.encode_to_vec(),
        )
        .await?;
        tx.commit().await?;
        self.state.outbox_written.notify_one();
        tracing::info!(%event_id, "purchase recorded");
        Ok(response)
    }

    async fn list_referral_activity(
        &self,
        request: Request<pb::ListReferralActivityRequest>,
    ) -> Result<pb::ListReferralActivityResponse, GatewayError> {
        let merchant: MerchantId =
            authenticate_merchant(&self.state.pool, request.metadata()).await?;
        tracing::Span::current().record("merchant_id", merchant.as_str());
        let request = request.into_inner();
        if request.page_size > MAX_PAGE_SIZE {
            return Err(tandem_domain::ValidationError::new(
                "page_size",
                format!("must be at most {MAX_PAGE_SIZE}, got {}", request.page_size),
            )
            .into());
        }
        let mut ledger_request = Request::new(pb::ListReferrerActivityRequest {
            referrer_merchant_id: merchant.to_string(),
            page_size: request.page_size,
            page_token: request.page_token,
        });
        for (name, value) in tandem_telemetry::current_trace_headers() {
            let key = match name.as_str() {
                "traceparent" => "traceparent",
                "tracestate" => "tracestate",
                _ => continue,
            };
            if let Ok(value) = value.parse() {
                ledger_request.metadata_mut().insert(key, value);
            }
        }
        let mut ledger = self.ledger.clone();
        match ledger.list_referral_activity(ledger_request).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                Err(tandem_domain::ValidationError::new("page_token", status.message()).into())
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "referral ledger call failed");
                Err(GatewayError::Unavailable(
                    "referral activity is temporarily unavailable; retry shortly".to_owned(),
                ))
            }
        }
    }
}
