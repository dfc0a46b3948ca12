//! The `tandem.v1.OperatorService`: network administration by Tandem's operators.

use std::sync::Arc;

use chrono::Utc;
use tandem_domain::ids::{MerchantId, PartnershipId};
use tandem_domain::money::Currency;
use tandem_domain::partnership::{check_not_self_referral, parse_rate_bps, AttributionWindow};
use tandem_domain::ValidationError;
use tandem_proto::time::timestamp;
use tandem_proto::v1 as pb;
use tandem_proto::v1::event_envelope::Payload;
use tandem_proto::v1::operator_service_server::OperatorService;
use tonic::{Request, Response, Status};

use crate::auth::{api_key_sha256, authenticate_operator, generate_api_key};
use crate::events::record_event;
use crate::{GatewayError, State};

pub struct OperatorApi {
    pub state: Arc<State>,
}

#[tonic::async_trait]
impl OperatorService for OperatorApi {
    #[tracing::instrument(skip_all, fields(merchant_id))]
    async fn create_merchant(
        &self,
        request: Request<pb::CreateMerchantRequest>,
    ) -> Result<Response<pb::CreateMerchantResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        Ok(Response::new(self.create_merchant(request).await?))
    }

    #[tracing::instrument(skip_all, fields(partnership_id))]
    async fn create_partnership(
        &self,
        request: Request<pb::CreatePartnershipRequest>,
    ) -> Result<Response<pb::CreatePartnershipResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        Ok(Response::new(self.create_partnership(request).await?))
    }
}

impl OperatorApi {
    async fn create_merchant(
        &self,
        request: Request<pb::CreateMerchantRequest>,
    ) -> Result<pb::CreateMerchantResponse, GatewayError> {
        authenticate_operator(request.metadata(), self.state.operator_token.expose())?;
        let request = request.into_inner();
        let display_name = request.display_name.trim().to_owned();
        if display_name.is_empty() || display_name.chars().count() > 200 {
            return Err(ValidationError::new("display_name", "must be 1 to 200 characters").into());
        }
        let currency = Currency::parse("settlement_currency", &request.settlement_currency)?;
        let time_zone = parse_time_zone(&request.time_zone)?;
        let merchant_id = MerchantId::generate();
        tracing::Span::current().record("merchant_id", merchant_id.as_str());
        let api_key = generate_api_key();
        let now = tandem_proto::time::truncate_to_micros(Utc::now());

        let mut tx = self.state.pool.begin().await?;
        sqlx::query(
            "INSERT INTO merchants (merchant_id, display_name, settlement_currency, time_zone, api_key_sha256, registered_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(merchant_id.as_str())
        .bind(&display_name)
        .bind(currency.as_str())
        .bind(&time_zone)
        .bind(api_key_sha256(&api_key))
        .bind(now)
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
        let window = AttributionWindow::from_days(
            "attribution_window_days",
            request.attribution_window_days,
        )?;
        let partnership_id = PartnershipId::generate();
        tracing::Span::current().record("partnership_id", partnership_id.as_str());
        let now = tandem_proto::time::truncate_to_micros(Utc::now());
        let terms_version = 1u32;

        let mut tx = self.state.pool.begin().await?;
        for (field, merchant) in [
            ("referrer_merchant_id", &referrer),
            ("acceptor_merchant_id", &acceptor),
        ] {
            let exists: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM merchants WHERE merchant_id = $1)",
            )
            .bind(merchant.as_str())
            .fetch_one(&mut *tx)
            .await?;
            if !exists {
                return Err(GatewayError::FailedPrecondition(format!(
                    "{field} {merchant} is not a registered merchant; create it first"
                )));
            }
        }
        let inserted = sqlx::query(
            "INSERT INTO partnerships (partnership_id, referrer_merchant_id, acceptor_merchant_id, terms_version, \
             commission_rate_bps, attribution_window_days, effective_from) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (referrer_merchant_id, acceptor_merchant_id) DO NOTHING",
        )
        .bind(partnership_id.as_str())
        .bind(referrer.as_str())
        .bind(acceptor.as_str())
        .bind(terms_version as i32)
        .bind(rate_bps as i32)
        .bind(window.days() as i32)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(GatewayError::AlreadyExists(format!(
                "a partnership from {referrer} to {acceptor} already exists"
            )));
        }
        let event = pb::PartnershipCreated {
            partnership_id: partnership_id.to_string(),
            referrer_merchant_id: referrer.to_string(),
            acceptor_merchant_id: acceptor.to_string(),
            terms_version,
            commission_rate_bps: rate_bps,
            attribution_window_days: window.days(),
            effective_from: Some(timestamp(now)),
        };
        let event_id = record_event(
            &mut tx,
            &format!("partnership-{partnership_id}"),
            Payload::PartnershipCreated(event),
            now,
        )
        .await?;
        tx.commit().await?;
        self.state.outbox_written.notify_one();
        tracing::info!(%event_id, %referrer, %acceptor, "partnership created");
        Ok(pb::CreatePartnershipResponse {
            partnership_id: partnership_id.to_string(),
            terms_version,
        })
    }
}

/// An IANA zone name such as `Europe/Paris`, or `UTC`. Only the shape is checked here.
fn parse_time_zone(value: &str) -> Result<String, ValidationError> {
    let value = value.trim();
    let well_formed = value == "UTC"
        || (value.len() <= 64
            && value.split('/').count() >= 2
            && value.split('/').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'+'))
            }));
    if well_formed {
        Ok(value.to_owned())
    } else {
        Err(ValidationError::new(
            "time_zone",
            format!("must be an IANA time zone such as Europe/Paris or UTC, got {value:?}"),
        ))
    }
}
