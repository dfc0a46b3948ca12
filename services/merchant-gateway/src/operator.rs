//! The `tandem.v1.OperatorService`: network administration by Tandem's operators.

use std::sync::Arc;

use chrono::Utc;
use tandem_domain::commission::{Command, Partnership};
use tandem_domain::ids::{ApiKeyId, MerchantId, PartnershipId};
use tandem_domain::money::Currency;
use tandem_domain::partnership::{
    check_not_self_referral, parse_rate_bps, AttributionWindow, Terms,
};
use tandem_domain::ValidationError;
use tandem_proto::v1 as pb;
use tandem_proto::v1::event_envelope::Payload;
use tandem_proto::v1::operator_service_server::OperatorService;
use tandem_proto::v1::settlement_client::SettlementClient;
use tonic::{Request, Response, Status};

use serde_json::json;

use crate::auth::authenticate_operator;
use crate::events::record_event;
use crate::idempotency::{self, Begun, Scope, OPERATOR};
use crate::partnerships::{decide_and_record, fingerprint, register_pair};
use crate::queries::{relay_status, traced};
use crate::{audit, identifiers, keys};
use crate::{GatewayError, State};
use tandem_domain::text::parse_token;

pub struct OperatorApi {
    pub state: Arc<State>,
    pub settlement: SettlementClient<tandem_runtime::InternalChannel>,
}

#[tonic::async_trait]
impl OperatorService for OperatorApi {
    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id))]
    async fn create_merchant(
        &self,
        request: Request<pb::CreateMerchantRequest>,
    ) -> Result<Response<pb::CreateMerchantResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        self.authenticate(&request)?;
        let asked = request.get_ref();
        let detail = json!({
            "display_name": audit::text(&asked.display_name),
            "settlement_currency": audit::text(&asked.settlement_currency),
            "time_zone": audit::text(&asked.time_zone),
            "identifier_captures": asked.identifier_captures.len(),
            "idempotency_key": audit::text(&asked.idempotency_key),
        });
        let answer = self.create_merchant(request).await.map_err(Status::from);
        self.audited("CreateMerchant", String::new(), detail, answer, |r| {
            r.merchant_id.clone()
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, programme_id = %tandem_domain::text::loggable_id(&request.get_ref().programme_id)))]
    async fn register_loyalty_programme(
        &self,
        request: Request<pb::RegisterLoyaltyProgrammeRequest>,
    ) -> Result<Response<pb::LoyaltyProgramme>, Status> {
        tandem_runtime::link_request_span(&request);
        self.authenticate(&request)?;
        let asked = request.get_ref();
        let target = asked.programme_id.clone();
        let detail = json!({ "display_name": audit::text(&asked.display_name) });
        let answer = identifiers::register_programme(&self.state.pool, asked)
            .await
            .map_err(Status::from);
        self.audited("RegisterLoyaltyProgramme", target, detail, answer, |r| {
            r.programme_id.clone()
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, partnership_id))]
    async fn create_partnership(
        &self,
        request: Request<pb::CreatePartnershipRequest>,
    ) -> Result<Response<pb::CreatePartnershipResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        self.authenticate(&request)?;
        let asked = request.get_ref();
        let detail = json!({
            "referrer_merchant_id": audit::text(&asked.referrer_merchant_id),
            "acceptor_merchant_id": audit::text(&asked.acceptor_merchant_id),
            "commission_rate_bps": asked.commission_rate_bps,
            "attribution_window_days": asked.attribution_window_days,
            "settlement_cycle": asked.settlement_cycle,
            "minimum_payout_minor": asked.minimum_payout_minor,
            "idempotency_key": audit::text(&asked.idempotency_key),
        });
        let answer = self.create_partnership(request).await.map_err(Status::from);
        self.audited("CreatePartnership", String::new(), detail, answer, |r| {
            r.partnership_id.clone()
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, cycle = %tandem_domain::text::loggable_id(&request.get_ref().cycle)))]
    async fn close_settlement_cycle(
        &self,
        request: Request<pb::CloseCycleRequest>,
    ) -> Result<Response<pb::CycleSummary>, Status> {
        tandem_runtime::link_request_span(&request);
        self.authenticate(&request)?;
        let target = request.get_ref().cycle.clone();
        let answer = self
            .settlement
            .clone()
            .close_cycle(traced(request.into_inner()))
            .await;
        let answer = relay_status("settlement", answer).map_err(Status::from);
        self.audited("CloseSettlementCycle", target, json!({}), answer, |_| {
            String::new()
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty))]
    async fn list_settlement_cycles(
        &self,
        request: Request<pb::ListCyclesRequest>,
    ) -> Result<Response<pb::ListCyclesResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        self.authenticate(&request)?;
        let answer = self
            .settlement
            .clone()
            .list_cycles(traced(request.into_inner()))
            .await;
        Ok(Response::new(relay_status("settlement", answer)?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, cycle = %tandem_domain::text::loggable_id(&request.get_ref().cycle)))]
    async fn list_payout_instructions(
        &self,
        request: Request<pb::ListPayoutInstructionsRequest>,
    ) -> Result<Response<pb::ListPayoutInstructionsResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        self.authenticate(&request)?;
        let answer = self
            .settlement
            .clone()
            .list_payout_instructions(traced(request.into_inner()))
            .await;
        Ok(Response::new(relay_status("settlement", answer)?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, cycle = %tandem_domain::text::loggable_id(&request.get_ref().cycle)))]
    async fn get_payout_file(
        &self,
        request: Request<pb::GetPayoutFileRequest>,
    ) -> Result<Response<pb::PayoutFile>, Status> {
        tandem_runtime::link_request_span(&request);
        self.authenticate(&request)?;
        // A payout file holds bank details: who fetched which one is recorded.
        let asked = request.get_ref();
        let target = asked.cycle.clone();
        let detail = json!({
            "currency": audit::text(&asked.currency),
            "requested_execution_date": audit::text(&asked.requested_execution_date),
        });
        let answer = self
            .settlement
            .clone()
            .get_payout_file(traced(request.into_inner()))
            .await;
        let answer = relay_status("settlement", answer).map_err(Status::from);
        self.audited("GetPayoutFile", target, detail, answer, |_| String::new())
            .await
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id = %tandem_domain::text::loggable_id(&request.get_ref().merchant_id)))]
    async fn issue_settlement_correction(
        &self,
        request: Request<pb::IssueCorrectionRequest>,
    ) -> Result<Response<pb::IssueCorrectionResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        self.authenticate(&request)?;
        let asked = request.get_ref();
        let target = asked.merchant_id.clone();
        let detail = json!({
            "statement_number": asked.statement_number,
            "partnership_id": audit::text(&asked.partnership_id),
            "amount_minor": asked.amount.as_ref().map(|m| m.amount_minor),
            "currency": asked.amount.as_ref().map(|m| audit::text(&m.currency)),
            "reason": audit::text(&asked.reason),
            "idempotency_key": audit::text(&asked.idempotency_key),
        });
        let answer = self
            .settlement
            .clone()
            .issue_correction(traced(request.into_inner()))
            .await;
        let answer = relay_status("settlement", answer).map_err(Status::from);
        self.audited("IssueSettlementCorrection", target, detail, answer, |_| {
            String::new()
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id = %tandem_domain::text::loggable_id(&request.get_ref().merchant_id)))]
    async fn issue_api_key(
        &self,
        request: Request<pb::IssueApiKeyRequest>,
    ) -> Result<Response<pb::IssueApiKeyResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        self.authenticate(&request)?;
        let asked = request.into_inner();
        let target = asked.merchant_id.clone();
        let detail = json!({ "idempotency_key": audit::text(&asked.idempotency_key) });
        let answer = self.issue_api_key(asked).await.map_err(Status::from);
        self.audited("IssueApiKey", target, detail, answer, |r| {
            r.key
                .as_ref()
                .map(|key| format!("{}/{}", key.merchant_id, key.key_id))
                .unwrap_or_default()
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id = %tandem_domain::text::loggable_id(&request.get_ref().merchant_id)))]
    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        tandem_runtime::link_request_span(&request);
        self.authenticate(&request)?;
        let asked = request.into_inner();
        let target = format!("{}/{}", asked.merchant_id, asked.key_id);
        let answer = async {
            let merchant = MerchantId::parse("merchant_id", &asked.merchant_id)?;
            let key = ApiKeyId::parse("key_id", &asked.key_id)?;
            let now = tandem_proto::time::truncate_to_micros(Utc::now());
            let mut connection = self.state.pool.acquire().await?;
            let revoked = keys::revoke(&mut connection, &merchant, &key, now).await?;
            tracing::info!(key_id = %key, "API key revoked");
            Ok::<_, GatewayError>(revoked)
        }
        .await
        .map_err(Status::from);
        self.audited("RevokeApiKey", target, json!({}), answer, |_| String::new())
            .await
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id = %tandem_domain::text::loggable_id(&request.get_ref().merchant_id)))]
    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        self.authenticate(&request)?;
        let merchant = MerchantId::parse("merchant_id", &request.get_ref().merchant_id)
            .map_err(GatewayError::from)?;
        let mut connection = self
            .state
            .pool
            .acquire()
            .await
            .map_err(GatewayError::from)?;
        let keys = keys::list(&mut connection, &merchant).await?;
        Ok(Response::new(pb::ListApiKeysResponse { keys }))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty))]
    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        self.authenticate(&request)?;
        let asked = request.into_inner();
        let limit = match asked.page_size {
            0 => 100,
            size @ 1..=500 => i64::from(size),
            _ => {
                return Err(GatewayError::from(ValidationError::new(
                    "page_size",
                    "must be 1 to 500 (0 means 100)",
                ))
                .into())
            }
        };
        if asked.after_sequence < 0 {
            return Err(GatewayError::from(ValidationError::new(
                "after_sequence",
                "must be 0 or a sequence number from an earlier page",
            ))
            .into());
        }
        let events = audit::list(&self.state.pool, asked.after_sequence, limit)
            .await
            .map_err(GatewayError::from)?;
        Ok(Response::new(pb::ListAuditEventsResponse { events }))
    }
}

impl OperatorApi {
    fn authenticate<T>(&self, request: &Request<T>) -> Result<(), Status> {
        authenticate_operator(request.metadata(), self.state.operator_token.expose())?;
        Ok(())
    }

    /// Records an authenticated operator call in the audit log and passes its answer on. The
    /// target is `target`, or what `target_of` reads from a successful answer when empty.
    async fn audited<R>(
        &self,
        action: &'static str,
        target: String,
        detail: serde_json::Value,
        answer: Result<R, Status>,
        target_of: impl FnOnce(&R) -> String,
    ) -> Result<Response<R>, Status> {
        let target = match (&answer, target.is_empty()) {
            (Ok(response), true) => target_of(response),
            _ => target,
        };
        let outcome = answer.as_ref().map(drop).map_err(Clone::clone);
        audit::record(
            &self.state.pool,
            audit::Entry {
                action,
                target,
                detail,
                outcome: &outcome,
            },
        )
        .await;
        answer.map(Response::new)
    }

    async fn create_merchant(
        &self,
        request: Request<pb::CreateMerchantRequest>,
    ) -> Result<pb::CreateMerchantResponse, GatewayError> {
        let request = request.into_inner();
        let idempotency_key = parse_token("idempotency_key", &request.idempotency_key, 1, 128)?;
        let display_name =
            tandem_domain::text::parse_text("display_name", &request.display_name, 200)?;
        let currency = Currency::parse("settlement_currency", &request.settlement_currency)?;
        let time_zone = parse_time_zone(&request.time_zone)?;
        let captures =
            identifiers::initial_captures(&self.state, &request.identifier_captures).await?;
        let fingerprint = fingerprint("CreateMerchant", &request);
        let scope = Scope {
            owner: OPERATOR,
            key: &idempotency_key,
            operation: "CreateMerchant",
            fingerprint: &fingerprint,
        };
        let mut tx =
            match idempotency::start::<pb::CreateMerchantResponse>(&self.state.pool, &scope).await?
            {
                Begun::Replayed(first) => {
                    tracing::Span::current().record("merchant_id", first.merchant_id.as_str());
                    return Ok(first);
                }
                Begun::Fresh(tx) => tx,
            };
        let merchant_id = MerchantId::generate();
        tracing::Span::current().record("merchant_id", merchant_id.as_str());
        let now = tandem_proto::time::truncate_to_micros(Utc::now());
        sqlx::query(
            "INSERT INTO merchants (merchant_id, display_name, settlement_currency, time_zone, registered_at, identifier_captures) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(merchant_id.as_str())
        .bind(&display_name)
        .bind(currency.as_str())
        .bind(&time_zone)
        .bind(now)
        .bind(captures.tags())
        .execute(&mut *tx)
        .await?;
        let event = pb::MerchantRegistered {
            merchant_id: merchant_id.to_string(),
            display_name,
            settlement_currency: currency.to_string(),
            time_zone,
        };
        let event_id = record_event(
            &mut tx,
            &format!("merchant-{merchant_id}"),
            Payload::MerchantRegistered(event),
            now,
        )
        .await?;
        let (key, secret) = keys::insert_key(&mut tx, &merchant_id, now).await?;
        // What a retry answers: the same merchant and key id, never the secret.
        let response = pb::CreateMerchantResponse {
            merchant_id: merchant_id.to_string(),
            api_key: String::new(),
            api_key_id: key.key_id,
        };
        idempotency::complete(&self.state, tx, &scope, &response).await?;
        tracing::info!(%event_id, api_key_id = %response.api_key_id, "merchant registered");
        Ok(pb::CreateMerchantResponse {
            api_key: secret,
            ..response
        })
    }

    async fn issue_api_key(
        &self,
        asked: pb::IssueApiKeyRequest,
    ) -> Result<pb::IssueApiKeyResponse, GatewayError> {
        let merchant = MerchantId::parse("merchant_id", &asked.merchant_id)?;
        let idempotency_key = parse_token("idempotency_key", &asked.idempotency_key, 1, 128)?;
        let fingerprint = fingerprint("IssueApiKey", &asked);
        let scope = Scope {
            owner: OPERATOR,
            key: &idempotency_key,
            operation: "IssueApiKey",
            fingerprint: &fingerprint,
        };
        let mut tx =
            match idempotency::start::<pb::IssueApiKeyResponse>(&self.state.pool, &scope).await? {
                Begun::Replayed(first) => return Ok(first),
                Begun::Fresh(tx) => tx,
            };
        keys::require_merchant(&mut tx, &merchant).await?;
        let now = tandem_proto::time::truncate_to_micros(Utc::now());
        let (key, secret) = keys::insert_key(&mut tx, &merchant, now).await?;
        let response = pb::IssueApiKeyResponse {
            key: Some(key),
            api_key: String::new(),
        };
        idempotency::complete(&self.state, tx, &scope, &response).await?;
        tracing::info!(
            api_key_id = %response.key.as_ref().map(|k| k.key_id.as_str()).unwrap_or_default(),
            "API key issued"
        );
        Ok(pb::IssueApiKeyResponse {
            api_key: secret,
            ..response
        })
    }

    async fn create_partnership(
        &self,
        request: Request<pb::CreatePartnershipRequest>,
    ) -> Result<pb::CreatePartnershipResponse, GatewayError> {
        let request = request.into_inner();
        let idempotency_key = parse_token("idempotency_key", &request.idempotency_key, 1, 128)?;
        let referrer = MerchantId::parse("referrer_merchant_id", &request.referrer_merchant_id)?;
        let acceptor = MerchantId::parse("acceptor_merchant_id", &request.acceptor_merchant_id)?;
        check_not_self_referral(&referrer, &acceptor)?;
        let rate_bps = parse_rate_bps("commission_rate_bps", request.commission_rate_bps, 1)?;
        AttributionWindow::from_days("attribution_window_days", request.attribution_window_days)?;
        let now = tandem_proto::time::truncate_to_micros(Utc::now());
        let effective_from = match request.effective_from.as_ref() {
            None => now,
            Some(sent) => tandem_proto::time::datetime(sent)
                .filter(|instant| {
                    *instant >= now - chrono::Duration::days(365)
                        && *instant <= now + chrono::Duration::days(365)
                })
                .ok_or_else(|| {
                    ValidationError::new(
                        "effective_from",
                        "must be a timestamp within 365 days of now",
                    )
                })?,
        };

        let fingerprint = fingerprint("CreatePartnership", &request);
        let scope = Scope {
            owner: OPERATOR,
            key: &idempotency_key,
            operation: "CreatePartnership",
            fingerprint: &fingerprint,
        };
        let mut tx =
            match idempotency::start::<pb::CreatePartnershipResponse>(&self.state.pool, &scope)
                .await?
            {
                Begun::Replayed(first) => {
                    tracing::Span::current()
                        .record("partnership_id", first.partnership_id.as_str());
                    return Ok(first);
                }
                Begun::Fresh(tx) => tx,
            };
        let partnership_id = PartnershipId::generate();
        tracing::Span::current().record("partnership_id", partnership_id.as_str());
        register_pair(&mut tx, &partnership_id, &referrer, &acceptor).await?;
        // Commissions are in the acceptor's settlement currency: it is the one paying them.
        let currency: String =
            sqlx::query_scalar("SELECT settlement_currency FROM merchants WHERE merchant_id = $1")
                .bind(acceptor.as_str())
                .fetch_one(&mut *tx)
                .await?;
        let currency = Currency::parse("settlement_currency", &currency)?;
        let mut terms = Terms::percentage(currency, rate_bps, request.attribution_window_days)?;
        terms.settlement_cycle = tandem_codec::settlement_cycle_from_proto(
            "settlement_cycle",
            request.settlement_cycle,
        )?;
        terms.minimum_payout_minor = request.minimum_payout_minor;
        let terms = terms.validated()?;
        identifiers::require_overlap(&mut tx, &referrer, &acceptor, &terms.attributing_kinds)
            .await?;
        // The operator records an agreement both merchants already made.
        let commands = vec![Command::Import {
            referrer: referrer.clone(),
            acceptor: acceptor.clone(),
            terms,
            effective_from,
        }];
        decide_and_record(
            &mut tx,
            &partnership_id,
            Partnership::default(),
            0,
            commands,
            now,
        )
        .await?;
        let response = pb::CreatePartnershipResponse {
            partnership_id: partnership_id.to_string(),
            terms_version: 1,
        };
        idempotency::complete(&self.state, tx, &scope, &response).await?;
        tracing::info!(%referrer, %acceptor, "partnership created by the operator");
        Ok(response)
    }
}

/// An IANA zone name such as `Europe/Paris`, or `UTC`, known to the time-zone database (the
/// acceptor's settlement cycles cut off at its local midnight).
fn parse_time_zone(value: &str) -> Result<String, ValidationError> {
    Ok(
        tandem_domain::settlement::parse_time_zone("time_zone", value)?
            .name()
            .to_owned(),
    )
}
