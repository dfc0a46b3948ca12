//! The `tandem.v1.OperatorService`: network administration by Tandem's operators.

use std::sync::Arc;

use chrono::Utc;
use tandem_domain::commission::{Command, Partnership};
use tandem_domain::ids::{MerchantId, PartnershipId};
use tandem_domain::money::Currency;
use tandem_domain::partnership::{
    check_not_self_referral, parse_rate_bps, AttributionWindow, Terms,
};
use tandem_domain::ValidationError;
use tandem_proto::v1 as pb;
use tandem_proto::v1::event_envelope::Payload;
use tandem_proto::v1::operator_service_server::OperatorService;
use tandem_proto::v1::settlement_client::SettlementClient;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::auth::{api_key_sha256, authenticate_operator, generate_api_key};
use crate::events::record_event;
use crate::identifiers;
use crate::partnerships::{decide_and_record, register_pair};
use crate::queries::{relay_status, traced};
use crate::{GatewayError, State};

pub struct OperatorApi {
    pub state: Arc<State>,
    pub settlement: SettlementClient<Channel>,
}

#[tonic::async_trait]
impl OperatorService for OperatorApi {
    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id))]
    async fn create_merchant(
        &self,
        request: Request<pb::CreateMerchantRequest>,
    ) -> Result<Response<pb::CreateMerchantResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        Ok(Response::new(self.create_merchant(request).await?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, programme_id = %request.get_ref().programme_id))]
    async fn register_loyalty_programme(
        &self,
        request: Request<pb::RegisterLoyaltyProgrammeRequest>,
    ) -> Result<Response<pb::LoyaltyProgramme>, Status> {
        tandem_runtime::link_request_span(&request);
        authenticate_operator(request.metadata(), self.state.operator_token.expose())?;
        Ok(Response::new(
            identifiers::register_programme(&self.state.pool, request.get_ref()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, partnership_id))]
    async fn create_partnership(
        &self,
        request: Request<pb::CreatePartnershipRequest>,
    ) -> Result<Response<pb::CreatePartnershipResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        Ok(Response::new(self.create_partnership(request).await?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, cycle = %request.get_ref().cycle))]
    async fn close_settlement_cycle(
        &self,
        request: Request<pb::CloseCycleRequest>,
    ) -> Result<Response<pb::CycleSummary>, Status> {
        tandem_runtime::link_request_span(&request);
        authenticate_operator(request.metadata(), self.state.operator_token.expose())?;
        let answer = self
            .settlement
            .clone()
            .close_cycle(traced(request.into_inner()))
            .await;
        Ok(Response::new(relay_status("settlement", answer)?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty))]
    async fn list_settlement_cycles(
        &self,
        request: Request<pb::ListCyclesRequest>,
    ) -> Result<Response<pb::ListCyclesResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        authenticate_operator(request.metadata(), self.state.operator_token.expose())?;
        let answer = self
            .settlement
            .clone()
            .list_cycles(traced(request.into_inner()))
            .await;
        Ok(Response::new(relay_status("settlement", answer)?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, cycle = %request.get_ref().cycle))]
    async fn list_payout_instructions(
        &self,
        request: Request<pb::ListPayoutInstructionsRequest>,
    ) -> Result<Response<pb::ListPayoutInstructionsResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        authenticate_operator(request.metadata(), self.state.operator_token.expose())?;
        let answer = self
            .settlement
            .clone()
            .list_payout_instructions(traced(request.into_inner()))
            .await;
        Ok(Response::new(relay_status("settlement", answer)?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, cycle = %request.get_ref().cycle))]
    async fn get_payout_file(
        &self,
        request: Request<pb::GetPayoutFileRequest>,
    ) -> Result<Response<pb::PayoutFile>, Status> {
        tandem_runtime::link_request_span(&request);
        authenticate_operator(request.metadata(), self.state.operator_token.expose())?;
        let answer = self
            .settlement
            .clone()
            .get_payout_file(traced(request.into_inner()))
            .await;
        Ok(Response::new(relay_status("settlement", answer)?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id = %request.get_ref().merchant_id))]
    async fn issue_settlement_correction(
        &self,
        request: Request<pb::IssueCorrectionRequest>,
    ) -> Result<Response<pb::IssueCorrectionResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        authenticate_operator(request.metadata(), self.state.operator_token.expose())?;
        let answer = self
            .settlement
            .clone()
            .issue_correction(traced(request.into_inner()))
            .await;
        Ok(Response::new(relay_status("settlement", answer)?))
    }
}

impl OperatorApi {
    async fn create_merchant(
        &self,
        request: Request<pb::CreateMerchantRequest>,
    ) -> Result<pb::CreateMerchantResponse, GatewayError> {
        authenticate_operator(request.metadata(), self.state.operator_token.expose())?;
        let request = request.into_inner();
        let display_name =
            tandem_domain::text::parse_text("display_name", &request.display_name, 200)?;
        let currency = Currency::parse("settlement_currency", &request.settlement_currency)?;
        let time_zone = parse_time_zone(&request.time_zone)?;
        let captures =
            identifiers::initial_captures(&self.state, &request.identifier_captures).await?;
        let merchant_id = MerchantId::generate();
        tracing::Span::current().record("merchant_id", merchant_id.as_str());
        let api_key = generate_api_key();
        let now = tandem_proto::time::truncate_to_micros(Utc::now());

        let mut tx = self.state.pool.begin().await?;
        sqlx::query(
            "INSERT INTO merchants (merchant_id, display_name, settlement_currency, time_zone, api_key_sha256, registered_at, identifier_captures) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(merchant_id.as_str())
        .bind(&display_name)
        .bind(currency.as_str())
        .bind(&time_zone)
        .bind(api_key_sha256(&api_key))
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
        tx.commit().await?;
        self.state.outbox_written.notify_one();
        tracing::info!(%event_id, "merchant registered");
        Ok(pb::CreateMerchantResponse {
            merchant_id: merchant_id.to_string(),
            api_key,
        })
    }

    async fn create_partnership(
        &self,
        request: Request<pb::CreatePartnershipRequest>,
    ) -> Result<pb::CreatePartnershipResponse, GatewayError> {
        authenticate_operator(request.metadata(), self.state.operator_token.expose())?;
        let request = request.into_inner();
        let referrer = MerchantId::parse("referrer_merchant_id", &request.referrer_merchant_id)?;
        let acceptor = MerchantId::parse("acceptor_merchant_id", &request.acceptor_merchant_id)?;
        check_not_self_referral(&referrer, &acceptor)?;
        let rate_bps = parse_rate_bps("commission_rate_bps", request.commission_rate_bps, 1)?;
        AttributionWindow::from_days("attribution_window_days", request.attribution_window_days)?;
        let partnership_id = PartnershipId::generate();
        tracing::Span::current().record("partnership_id", partnership_id.as_str());
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

        let mut tx = self.state.pool.begin().await?;
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
        tx.commit().await?;
        self.state.outbox_written.notify_one();
        tracing::info!(%referrer, %acceptor, "partnership created by the operator");
        Ok(pb::CreatePartnershipResponse {
            partnership_id: partnership_id.to_string(),
            terms_version: 1,
        })
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
