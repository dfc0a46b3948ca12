//! The `tandem.v1.MerchantGateway` service: what a merchant's point-of-sale calls.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tandem_domain::attribution::attribution_ends_at;
use tandem_domain::ids::ReferralId;
use tandem_domain::partnership::check_not_self_referral;
use tandem_proto::time::timestamp;
use tandem_proto::v1::event_envelope::Payload;
use tandem_proto::v1::merchant_gateway_server::MerchantGateway;
use tandem_proto::v1::{self as pb, referral_ledger_client::ReferralLedgerClient};
use tonic::{Request, Response, Status};

use crate::auth::{authenticate_merchant, check_acting_as};
use crate::bulk;
use crate::commands::{parse_create_referral, parse_record_purchase};
use crate::commands::{Parsed, RecordPurchase};
use crate::events::record_event;
use crate::identifiers::{self, authenticate_caller, customer_keys, Caller};
use crate::ingest::{self, PurchaseItem};
use crate::partnerships::{find_by_pair, load_partnership};
use crate::{idempotency, GatewayError, State};
use crate::{queries, refunds};

const MAX_PAGE_SIZE: u32 = 500;

pub struct PosApi {
    pub state: Arc<State>,
    pub ledger: ReferralLedgerClient<tandem_runtime::InternalChannel>,
}

#[tonic::async_trait]
impl MerchantGateway for PosApi {
    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id))]
    async fn declare_identifier_capture(
        &self,
        request: Request<pb::DeclareIdentifierCaptureRequest>,
    ) -> Result<Response<pb::IdentifierCaptureDeclaration>, Status> {
        tandem_runtime::link_request_span(&request);
        let merchant = authenticate_merchant(&self.state.pool, request.metadata()).await?;
        tracing::Span::current().record("merchant_id", merchant.as_str());
        Ok(Response::new(
            identifiers::declare_captures(&self.state, &merchant, request.get_ref()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id))]
    async fn get_identifier_capture(
        &self,
        request: Request<pb::GetIdentifierCaptureRequest>,
    ) -> Result<Response<pb::IdentifierCaptureDeclaration>, Status> {
        tandem_runtime::link_request_span(&request);
        let caller = authenticate_caller(&self.state.pool, request.metadata()).await?;
        tracing::Span::current().record("merchant_id", caller.merchant.as_str());
        Ok(Response::new(identifiers::declaration(&caller)))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id, referral_id, partnership_id))]
    async fn create_referral(
        &self,
        request: Request<pb::CreateReferralRequest>,
    ) -> Result<Response<pb::CreateReferralResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        Ok(Response::new(self.create_referral(request).await?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id, purchase_id))]
    async fn record_purchase(
        &self,
        request: Request<pb::RecordPurchaseRequest>,
    ) -> Result<Response<pb::RecordPurchaseResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        Ok(Response::new(self.record_purchase(request).await?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id, items = request.get_ref().purchases.len()))]
    async fn record_purchases(
        &self,
        request: Request<pb::RecordPurchasesRequest>,
    ) -> Result<Response<pb::RecordPurchasesResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        Ok(Response::new(self.record_purchases(request).await?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id, items = request.get_ref().refunds.len()))]
    async fn record_refunds(
        &self,
        request: Request<pb::RecordRefundsRequest>,
    ) -> Result<Response<pb::RecordRefundsResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        Ok(Response::new(
            refunds::record_refunds(&self.state, request).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id, refund_id))]
    async fn record_refund(
        &self,
        request: Request<pb::RecordRefundRequest>,
    ) -> Result<Response<pb::RecordRefundResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        Ok(Response::new(
            refunds::record_refund(&self.state, request).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id, referral_id = %tandem_domain::text::loggable_id(&request.get_ref().referral_id)))]
    async fn cancel_referral(
        &self,
        request: Request<pb::CancelReferralRequest>,
    ) -> Result<Response<pb::CancelReferralResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        Ok(Response::new(
            refunds::cancel_referral(&self.state, request).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id))]
    async fn list_referrals(
        &self,
        request: Request<pb::ListReferralsRequest>,
    ) -> Result<Response<pb::ListReferralsResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        let response = queries::forward(
            &self.state,
            &self.ledger,
            request,
            |mut ledger, merchant_id, request| async move {
                ledger
                    .list_referrals(queries::traced(pb::LedgerListReferralsRequest {
                        merchant_id,
                        request: Some(request),
                    }))
                    .await
            },
        )
        .await?;
        Ok(Response::new(response))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id))]
    async fn list_commissions(
        &self,
        request: Request<pb::ListCommissionsRequest>,
    ) -> Result<Response<pb::ListCommissionsResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        let response = queries::forward(
            &self.state,
            &self.ledger,
            request,
            |mut ledger, merchant_id, request| async move {
                ledger
                    .list_commissions(queries::traced(pb::LedgerListCommissionsRequest {
                        merchant_id,
                        request: Some(request),
                    }))
                    .await
            },
        )
        .await?;
        Ok(Response::new(response))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id, purchase_id = %tandem_domain::text::loggable_id(&request.get_ref().purchase_id)))]
    async fn explain_commission(
        &self,
        request: Request<pb::ExplainCommissionRequest>,
    ) -> Result<Response<pb::ExplainCommissionResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        let response = queries::forward(
            &self.state,
            &self.ledger,
            request,
            |mut ledger, merchant_id, request| async move {
                ledger
                    .explain_commission(queries::traced(pb::LedgerExplainCommissionRequest {
                        merchant_id,
                        request: Some(request),
                    }))
                    .await
            },
        )
        .await?;
        Ok(Response::new(response))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id))]
    async fn get_commission_totals(
        &self,
        request: Request<pb::GetCommissionTotalsRequest>,
    ) -> Result<Response<pb::GetCommissionTotalsResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        let response = queries::forward(
            &self.state,
            &self.ledger,
            request,
            |mut ledger, merchant_id, request| async move {
                ledger
                    .get_commission_totals(queries::traced(pb::LedgerGetCommissionTotalsRequest {
                        merchant_id,
                        request: Some(request),
                    }))
                    .await
            },
        )
        .await?;
        Ok(Response::new(response))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id))]
    async fn get_balances(
        &self,
        request: Request<pb::GetBalancesRequest>,
    ) -> Result<Response<pb::GetBalancesResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        let response = queries::forward(
            &self.state,
            &self.ledger,
            request,
            |mut ledger, merchant_id, _| async move {
                ledger
                    .get_balances(queries::traced(pb::LedgerGetBalancesRequest {
                        merchant_id,
                    }))
                    .await
            },
        )
        .await?;
        Ok(Response::new(response))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id))]
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
        let caller = authenticate_caller(&self.state.pool, request.metadata()).await?;
        let merchant = caller.merchant.clone();
        let span = tracing::Span::current();
        span.record("merchant_id", merchant.as_str());
        let request = request.into_inner();
        check_acting_as(&merchant, &request.merchant_id)?;
        let now = Utc::now();
        let keys = customer_keys(&self.state, &caller, request.customer.as_ref()).await?;
        let parsed = parse_create_referral(&request, keys, now)?;
        let command = parsed.command;
        check_not_self_referral(&merchant, &command.acceptor)?;

        let scope = idempotency::Scope {
            owner: merchant.as_str(),
            key: &parsed.idempotency_key,
            operation: "CreateReferral",
            fingerprint: &parsed.fingerprint,
        };
        let mut tx = match idempotency::start(&self.state.pool, &scope).await? {
            idempotency::Begun::Replayed(response) => return Ok(response),
            idempotency::Begun::Fresh(tx) => tx,
        };
        let Some(partnership_id) = find_by_pair(&mut tx, &merchant, &command.acceptor).await?
        else {
            return Err(GatewayError::FailedPrecondition(format!(
                "there is no partnership from {merchant} to {}; a referral needs one (propose terms with PartnershipService)",
                command.acceptor
            )));
        };
        let (partnership, _) = load_partnership(&mut tx, &partnership_id).await?;
        if let Some(terminated_at) = partnership
            .terminated_at()
            .filter(|at| *at <= command.referred_at)
        {
            return Err(GatewayError::FailedPrecondition(format!(
                "partnership {partnership_id} was terminated at {terminated_at} and takes no new referrals"
            )));
        }
        let Some((terms_version, terms)) = partnership.terms_at(command.referred_at) else {
            return Err(GatewayError::FailedPrecondition(format!(
                "partnership {partnership_id} has no accepted terms in force at {}; the other merchant must accept a proposal first",
                command.referred_at
            )));
        };
        let window = terms.attribution_window;
        let referral_id = ReferralId::generate();
        let ends_at = attribution_ends_at(command.referred_at, window);
        span.record("referral_id", referral_id.as_str());
        span.record("partnership_id", partnership_id.as_str());

        let event = pb::CustomerReferred {
            referral_id: referral_id.to_string(),
            partnership_id: partnership_id.to_string(),
            terms_version,
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
        sqlx::query(
            "INSERT INTO referrals (referral_id, referrer_merchant_id, acceptor_merchant_id, customer_keys) VALUES ($1, $2, $3, $4)",
        )
        .bind(referral_id.as_str())
        .bind(merchant.as_str())
        .bind(command.acceptor.as_str())
        .bind(&event.customer_keys)
        .execute(&mut *tx)
        .await?;
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
        idempotency::complete(&self.state, tx, &scope, &response).await?;
        tracing::info!(%event_id, "referral recorded");
        Ok(response)
    }

    async fn record_purchase(
        &self,
        request: Request<pb::RecordPurchaseRequest>,
    ) -> Result<pb::RecordPurchaseResponse, GatewayError> {
        let caller = authenticate_caller(&self.state.pool, request.metadata()).await?;
        tracing::Span::current().record("merchant_id", caller.merchant.as_str());
        let request = request.into_inner();
        let now = Utc::now();
        let parsed = prepare_purchase(&self.state, &caller, &request, now).await?;
        let written = self
            .state
            .group_commit
            .submit(PurchaseItem {
                merchant: caller.merchant.clone(),
                parsed,
                headers: tandem_telemetry::current_trace_headers(),
            })
            .await?;
        tracing::Span::current().record("purchase_id", written.response.purchase_id.as_str());
        Ok(written.response)
    }

    async fn record_purchases(
        &self,
        request: Request<pb::RecordPurchasesRequest>,
    ) -> Result<pb::RecordPurchasesResponse, GatewayError> {
        let caller = authenticate_caller(&self.state.pool, request.metadata()).await?;
        tracing::Span::current().record("merchant_id", caller.merchant.as_str());
        let items = request.into_inner().purchases;
        bulk::check_size("purchases", items.len())?;
        let now = Utc::now();
        let mut prepared = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            prepared.push(
                prepare_purchase(&self.state, &caller, item, now)
                    .await
                    .map_err(|error| bulk::within("purchases", index, error)),
            );
        }
        // The valid items in one group (one transaction, a fixed number of statements), the
        // refused ones answered with their reason.
        let headers = tandem_telemetry::current_trace_headers();
        let mut valid = Vec::with_capacity(items.len());
        let mut outcomes: Vec<Option<ingest::Outcome>> = Vec::with_capacity(items.len());
        for item in prepared {
            match item {
                Ok(parsed) => {
                    valid.push(PurchaseItem {
                        merchant: caller.merchant.clone(),
                        parsed,
                        headers: headers.clone(),
                    });
                    outcomes.push(None);
                }
                Err(refused) => outcomes.push(Some(Err(refused))),
            }
        }
        let mut tx = self.state.pool.begin().await?;
        let mut written = ingest::write_purchases(&mut tx, &valid, now)
            .await?
            .into_iter();
        tx.commit().await?;
        let outcomes: Vec<ingest::Outcome> = outcomes
            .into_iter()
            .map(|outcome| {
                outcome.unwrap_or_else(|| {
                    written.next().unwrap_or_else(|| {
                        Err(GatewayError::Invariant("a bulk item without its outcome"))
                    })
                })
            })
            .collect();
        let (results, fresh) = bulk::results(outcomes, |index, outcome| pb::RecordPurchaseResult {
            index,
            outcome: Some(match outcome {
                Ok(recorded) => pb::record_purchase_result::Outcome::Recorded(recorded),
                Err(error) => pb::record_purchase_result::Outcome::Error(error),
            }),
        });
        if fresh > 0 {
            self.state.outbox_written.notify_one();
        }
        tracing::info!(
            items = results.len(),
            recorded = fresh,
            "bulk purchases recorded"
        );
        Ok(pb::RecordPurchasesResponse { results })
    }

    async fn list_referral_activity(
        &self,
        request: Request<pb::ListReferralActivityRequest>,
    ) -> Result<pb::ListReferralActivityResponse, GatewayError> {
        if request.get_ref().page_size > MAX_PAGE_SIZE {
            return Err(tandem_domain::ValidationError::new(
                "page_size",
                format!(
                    "must be at most {MAX_PAGE_SIZE}, got {}",
                    request.get_ref().page_size
                ),
            )
            .into());
        }
        queries::forward(
            &self.state,
            &self.ledger,
            request,
            |mut ledger, referrer_merchant_id, request| async move {
                ledger
                    .list_referral_activity(queries::traced(pb::ListReferrerActivityRequest {
                        referrer_merchant_id,
                        page_size: request.page_size,
                        page_token: request.page_token,
                    }))
                    .await
            },
        )
        .await
    }
}

/// A purchase request validated and pseudonymised: nothing raw is left in it.
async fn prepare_purchase(
    state: &State,
    caller: &Caller,
    request: &pb::RecordPurchaseRequest,
    now: DateTime<Utc>,
) -> Result<Parsed<RecordPurchase>, GatewayError> {
    check_acting_as(&caller.merchant, &request.merchant_id)?;
    let keys = customer_keys(state, caller, request.customer.as_ref()).await?;
    Ok(parse_record_purchase(request, keys, now)?)
}
