//! The ledger's internal gRPC API: queries the merchant gateway makes on behalf of an
//! authenticated merchant.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tandem_domain::ids::MerchantId;
use tandem_proto::time::timestamp;
use tandem_proto::v1 as pb;
use tandem_proto::v1::referral_ledger_server::ReferralLedger;
use tonic::{Request, Response, Status};

const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 500;

pub struct LedgerQueries {
    pub pool: PgPool,
}

type ActivityRow = (
    String,
    String,
    String,
    String,
    String,
    i64,
    String,
    i64,
    i32,
    i32,
    DateTime<Utc>,
    DateTime<Utc>,
);

#[tonic::async_trait]
impl ReferralLedger for LedgerQueries {
    #[tracing::instrument(skip_all, fields(merchant_id = %request.get_ref().referrer_merchant_id))]
    async fn list_referral_activity(
        &self,
        request: Request<pb::ListReferrerActivityRequest>,
    ) -> Result<Response<pb::ListReferralActivityResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        let request = request.into_inner();
        let referrer = MerchantId::parse("referrer_merchant_id", &request.referrer_merchant_id)
            .map_err(|error| Status::invalid_argument(error.to_string()))?;
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            size => size.min(MAX_PAGE_SIZE),
        };
        let after = PageToken::parse(&request.page_token)?;
        let (after_at, after_id) = after.map_or((None, None), |t| {
            (Some(t.purchased_at), Some(t.purchase_id))
        });
        let rows: Vec<ActivityRow> = sqlx::query_as(
            "SELECT c.purchase_id, c.referral_id, r.referrer_reference, c.partnership_id, c.acceptor_merchant_id, \
             c.amount_minor, c.currency, c.commission_minor, c.commission_rate_bps, c.terms_version, c.purchased_at, c.attributed_at \
             FROM commissions c JOIN referrals r ON r.referral_id = c.referral_id \
             WHERE c.referrer_merchant_id = $1 \
             AND ($2::timestamptz IS NULL OR (c.purchased_at, c.purchase_id) < ($2, $3)) \
             ORDER BY c.purchased_at DESC, c.purchase_id DESC LIMIT $4",
        )
        .bind(referrer.as_str())
        .bind(after_at)
        .bind(after_id)
        .bind(i64::from(page_size) + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(|error| {
            tracing::error!(error = %tandem_runtime::error_chain(&error), "activity query failed");
            Status::unavailable("activity query failed; retry shortly")
        })?;
        let more = rows.len() > page_size as usize;
        let purchases: Vec<pb::AttributedPurchase> = rows
            .into_iter()
            .take(page_size as usize)
            .map(
                |(
                    purchase_id,
                    referral_id,
                    reference,
                    partnership_id,
                    acceptor,
                    amount,
                    currency,
                    commission,
                    rate,
                    version,
                    purchased_at,
                    attributed_at,
                )| {
                    pb::AttributedPurchase {
                        purchase_id,
                        referral_id,
                        referrer_reference: reference,
                        partnership_id,
                        acceptor_merchant_id: acceptor,
                        amount: Some(pb::Money {
                            amount_minor: amount,
                            currency: currency.clone(),
                        }),
                        commission: Some(pb::Money {
                            amount_minor: commission,
                            currency,
                        }),
                        commission_rate_bps: u32::try_from(rate).unwrap_or(0),
                        terms_version: u32::try_from(version).unwrap_or(0),
                        purchased_at: Some(timestamp(purchased_at)),
                        attributed_at: Some(timestamp(attributed_at)),
                    }
                },
            )
            .collect();
        let next_page_token = match purchases.last() {
            Some(last) if more => PageToken {
                purchased_at: last
                    .purchased_at
                    .as_ref()
                    .and_then(tandem_proto::time::datetime)
                    .unwrap_or_default(),
                purchase_id: last.purchase_id.clone(),
            }
            .encode(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListReferralActivityResponse {
            purchases,
            next_page_token,
        }))
    }
}

/// Keyset position: the last row of the previous page, as `v1.<unix micros>.<purchase id>`.
struct PageToken {
    purchased_at: DateTime<Utc>,
    purchase_id: String,
}

impl PageToken {
    fn encode(&self) -> String {
        format!(
            "v1.{}.{}",
            self.purchased_at.timestamp_micros(),
            self.purchase_id
        )
    }

    fn parse(token: &str) -> Result<Option<Self>, Status> {
        if token.is_empty() {
            return Ok(None);
        }
        let invalid = || {
            Status::invalid_argument("is not a token this API returned; pass next_page_token unchanged, or empty for the first page")
        };
        let mut parts = token.splitn(3, '.');
        let (Some("v1"), Some(micros), Some(purchase_id)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        let micros: i64 = micros.parse().map_err(|_| invalid())?;
        let purchased_at = DateTime::from_timestamp_micros(micros).ok_or_else(invalid)?;
        tandem_domain::ids::PurchaseId::parse("page_token", purchase_id).map_err(|_| invalid())?;
        Ok(Some(Self {
            purchased_at,
            purchase_id: purchase_id.to_owned(),
        }))
    }
}
