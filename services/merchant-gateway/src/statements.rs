//! The `tandem.v1.StatementService`: a merchant's settlement statements (answered by the
//! settlement service on the authenticated merchant's behalf) and its payout account (kept
//! here, announced on the admin topic for settlement).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tandem_domain::payout::PayoutAccount;
use tandem_proto::v1 as pb;
use tandem_proto::v1::event_envelope::Payload;
use tandem_proto::v1::settlement_client::SettlementClient;
use tandem_proto::v1::statement_service_server::StatementService;
use tonic::{Request, Response, Status};

use crate::auth::{authenticate_merchant, check_acting_as};
use crate::events::record_event;
use crate::queries::{relay_status, traced};
use crate::{GatewayError, State};

pub struct StatementApi {
    pub state: Arc<State>,
    pub settlement: SettlementClient<tandem_runtime::InternalChannel>,
}

const SETTLEMENT: &str = "settlement";

impl StatementApi {
    /// The authenticated merchant, checked against the `merchant_id` the request names.
    async fn caller<T>(&self, request: &Request<T>, named: &str) -> Result<String, GatewayError> {
        let merchant = authenticate_merchant(&self.state.pool, request.metadata()).await?;
        tracing::Span::current().record("merchant_id", merchant.as_str());
        check_acting_as(&merchant, named)?;
        Ok(merchant.to_string())
    }

    async fn register(
        &self,
        request: Request<pb::RegisterPayoutAccountRequest>,
    ) -> Result<pb::PayoutAccount, GatewayError> {
        let merchant = self
            .caller(&request, &request.get_ref().merchant_id)
            .await?;
        let request = request.into_inner();
        let account = PayoutAccount::parse(&request.iban, &request.bic, &request.account_holder)?;
        let mut tx = self.state.pool.begin().await?;
        // One registration at a time per merchant: the merchant row is the lock.
        sqlx::query("SELECT 1 FROM merchants WHERE merchant_id = $1 FOR UPDATE")
            .bind(&merchant)
            .execute(&mut *tx)
            .await?;
        let current: Option<(String, String, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT iban, bic, account_holder, registered_at FROM payout_accounts WHERE merchant_id = $1",
        )
        .bind(&merchant)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((iban, bic, holder, registered_at)) = current {
            if iban == account.iban.as_str()
                && bic == account.bic.as_str()
                && holder == account.holder
            {
                // The same account again (a retry): nothing changes.
                return Ok(proto(&merchant, &iban, &bic, &holder, registered_at));
            }
        }
        let now = tandem_proto::time::truncate_to_micros(Utc::now());
        sqlx::query(
            "INSERT INTO payout_accounts (merchant_id, iban, bic, account_holder, registered_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (merchant_id) DO UPDATE SET iban = EXCLUDED.iban, bic = EXCLUDED.bic, \
               account_holder = EXCLUDED.account_holder, registered_at = EXCLUDED.registered_at",
        )
        .bind(&merchant)
        .bind(account.iban.as_str())
        .bind(account.bic.as_str())
        .bind(&account.holder)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let event_id = record_event(
            &mut tx,
            &format!("payout-account-{merchant}-{}", uuid::Uuid::now_v7()),
            Payload::PayoutAccountRegistered(pb::PayoutAccountRegistered {
                merchant_id: merchant.clone(),
                iban: account.iban.as_str().to_owned(),
                bic: account.bic.as_str().to_owned(),
                account_holder: account.holder.clone(),
                registered_at: Some(tandem_proto::time::timestamp(now)),
            }),
            now,
        )
        .await?;
        tx.commit().await?;
        self.state.outbox_written.notify_one();
        tracing::info!(%event_id, country = account.iban.country(), "payout account registered");
        Ok(proto(
            &merchant,
            account.iban.as_str(),
            account.bic.as_str(),
            &account.holder,
            now,
        ))
    }

    async fn current(
        &self,
        request: Request<pb::GetPayoutAccountRequest>,
    ) -> Result<pb::PayoutAccount, GatewayError> {
        let merchant = self
            .caller(&request, &request.get_ref().merchant_id)
            .await?;
        let current: Option<(String, String, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT iban, bic, account_holder, registered_at FROM payout_accounts WHERE merchant_id = $1",
        )
        .bind(&merchant)
        .fetch_optional(&self.state.pool)
        .await?;
        let (iban, bic, holder, at) = current.ok_or_else(|| {
            GatewayError::Upstream(Status::not_found(
                "no payout account registered yet; RegisterPayoutAccount registers one",
            ))
        })?;
        Ok(proto(&merchant, &iban, &bic, &holder, at))
    }
}

fn proto(
    merchant: &str,
    iban: &str,
    bic: &str,
    holder: &str,
    at: DateTime<Utc>,
) -> pb::PayoutAccount {
    pb::PayoutAccount {
        merchant_id: merchant.to_owned(),
        iban: iban.to_owned(),
        bic: bic.to_owned(),
        account_holder: holder.to_owned(),
        registered_at: Some(tandem_proto::time::timestamp(at)),
    }
}

#[tonic::async_trait]
impl StatementService for StatementApi {
    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id))]
    async fn list_statements(
        &self,
        request: Request<pb::ListStatementsRequest>,
    ) -> Result<Response<pb::ListStatementsResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        let merchant_id = self
            .caller(&request, &request.get_ref().merchant_id)
            .await?;
        let message = pb::ListStatementsRequest {
            merchant_id,
            ..request.into_inner()
        };
        let answer = self
            .settlement
            .clone()
            .list_statements(traced(message))
            .await;
        Ok(Response::new(relay_status(SETTLEMENT, answer)?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id, number = request.get_ref().number))]
    async fn get_statement(
        &self,
        request: Request<pb::GetStatementRequest>,
    ) -> Result<Response<pb::Statement>, Status> {
        tandem_runtime::link_request_span(&request);
        let merchant_id = self
            .caller(&request, &request.get_ref().merchant_id)
            .await?;
        let message = pb::GetStatementRequest {
            merchant_id,
            ..request.into_inner()
        };
        let answer = self.settlement.clone().get_statement(traced(message)).await;
        Ok(Response::new(relay_status(SETTLEMENT, answer)?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id, number = request.get_ref().number))]
    async fn export_statement(
        &self,
        request: Request<pb::ExportStatementRequest>,
    ) -> Result<Response<pb::ExportStatementResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        let merchant_id = self
            .caller(&request, &request.get_ref().merchant_id)
            .await?;
        let message = pb::ExportStatementRequest {
            merchant_id,
            ..request.into_inner()
        };
        let answer = self
            .settlement
            .clone()
            .export_statement(traced(message))
            .await;
        Ok(Response::new(relay_status(SETTLEMENT, answer)?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id, number = request.get_ref().number))]
    async fn verify_statement(
        &self,
        request: Request<pb::VerifyStatementRequest>,
    ) -> Result<Response<pb::VerifyStatementResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        let merchant_id = self
            .caller(&request, &request.get_ref().merchant_id)
            .await?;
        let message = pb::VerifyStatementRequest {
            merchant_id,
            ..request.into_inner()
        };
        let answer = self
            .settlement
            .clone()
            .verify_statement(traced(message))
            .await;
        Ok(Response::new(relay_status(SETTLEMENT, answer)?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id))]
    async fn list_unsettled_lines(
        &self,
        request: Request<pb::ListUnsettledLinesRequest>,
    ) -> Result<Response<pb::ListUnsettledLinesResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        let merchant_id = self
            .caller(&request, &request.get_ref().merchant_id)
            .await?;
        let message = pb::ListUnsettledLinesRequest {
            merchant_id,
            ..request.into_inner()
        };
        let answer = self
            .settlement
            .clone()
            .list_unsettled_lines(traced(message))
            .await;
        Ok(Response::new(relay_status(SETTLEMENT, answer)?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id))]
    async fn register_payout_account(
        &self,
        request: Request<pb::RegisterPayoutAccountRequest>,
    ) -> Result<Response<pb::PayoutAccount>, Status> {
        tandem_runtime::link_request_span(&request);
        Ok(Response::new(self.register(request).await?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id))]
    async fn get_payout_account(
        &self,
        request: Request<pb::GetPayoutAccountRequest>,
    ) -> Result<Response<pb::PayoutAccount>, Status> {
        tandem_runtime::link_request_span(&request);
        Ok(Response::new(self.current(request).await?))
    }
}
