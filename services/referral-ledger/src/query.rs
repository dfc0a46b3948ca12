//! The ledger's internal gRPC API: queries the merchant gateway makes on behalf of an
//! authenticated merchant. Every query is scoped to that merchant; lists are keyset-paged,
//! newest first.

use chrono::{DateTime, Utc};
use prost::Message;
use sqlx::PgPool;
use tandem_codec::identifiers::kind_tag_to_proto;
use tandem_codec::{calculation_to_proto, terms_to_proto};
use tandem_domain::commission::{explain, CommissionLine, Event};
use tandem_domain::customer::IdentifierKind;
use tandem_domain::ids::{MerchantId, PartnershipId, PurchaseId};
use tandem_domain::money::{Currency, Money};
use tandem_proto::time::timestamp;
use tandem_proto::v1 as pb;
use tandem_proto::v1::referral_ledger_server::ReferralLedger;
use tonic::{Request, Response, Status};

use crate::book;

const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 500;

pub struct LedgerQueries {
    pub pool: PgPool,
}

fn internal(error: impl std::error::Error) -> Status {
    tracing::error!(error = %tandem_runtime::error_chain(&error), "ledger query failed");
    Status::unavailable("query failed; retry shortly")
}

fn merchant(value: &str) -> Result<MerchantId, Status> {
    MerchantId::parse("merchant_id", value).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn page_size(requested: u32) -> Result<u32, Status> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE),
        size if size <= MAX_PAGE_SIZE => Ok(size),
        size => Err(Status::invalid_argument(format!(
            "page_size: must be at most {MAX_PAGE_SIZE}, got {size}"
        ))),
    }
}

/// The commissions column holding the caller for `role`, and the one holding the other party.
fn role_columns(role: i32) -> Result<(&'static str, &'static str), Status> {
    match pb::PartnershipRole::try_from(role) {
        Ok(pb::PartnershipRole::Referrer) => Ok(("referrer_merchant_id", "acceptor_merchant_id")),
        Ok(pb::PartnershipRole::Acceptor) => Ok(("acceptor_merchant_id", "referrer_merchant_id")),
        _ => Err(Status::invalid_argument(
            "role: must be REFERRER (what you earn) or ACCEPTOR (what you owe)",
        )),
    }
}

fn partnership_filter(partnership_id: &str) -> Result<Option<String>, Status> {
    if partnership_id.is_empty() {
        return Ok(None);
    }
    PartnershipId::parse("partnership_id", partnership_id)
        .map(|id| Some(id.to_string()))
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

/// A filter on a partnership must name one of the caller's, in the role it asks about: another
/// merchant's partnership (or one the ledger does not know) is NOT_FOUND, never an empty page
/// that would look like "nothing earned".
async fn check_partnership_filter(
    pool: &PgPool,
    merchant: &MerchantId,
    column: &str,
    partnership: Option<&str>,
) -> Result<(), Status> {
    let Some(partnership) = partnership else {
        return Ok(());
    };
    let parties: Option<(String, String)> = sqlx::query_as(
        "SELECT referrer_merchant_id, acceptor_merchant_id FROM partnerships WHERE partnership_id = $1",
    )
    .bind(partnership)
    .fetch_optional(pool)
    .await
    .map_err(internal)?;
    let merchant = merchant.as_str();
    match parties {
        Some((referrer, acceptor)) if referrer == merchant || acceptor == merchant => {
            let (theirs, other) = if column == "referrer_merchant_id" {
                (referrer == merchant, "ACCEPTOR")
            } else {
                (acceptor == merchant, "REFERRER")
            };
            if theirs {
                Ok(())
            } else {
                Err(Status::invalid_argument(format!(
                    "partnership_id: you are not the {} of {partnership}; ask with role {other}",
                    if other == "ACCEPTOR" { "referrer" } else { "acceptor" }
                )))
            }
        }
        _ => Err(Status::not_found(format!(
            "partnership_id: you have no partnership {partnership} (ListPartnerships shows yours; a new one takes a moment to reach the ledger)"
        ))),
    }
}

fn money(amount_minor: i64, currency: &str) -> Option<pb::Money> {
    Some(pb::Money {
        amount_minor,
        currency: currency.to_owned(),
    })
}

/// A keyset position, the last row of the previous page: `v1.<unix micros>.<id>`.
fn encode_page_token(at: DateTime<Utc>, id: &str) -> String {
    format!("v1.{}.{id}", at.timestamp_micros())
}

/// `(None, None)` for the first page.
fn parse_page_token(token: &str) -> Result<(Option<DateTime<Utc>>, Option<String>), Status> {
    if token.is_empty() {
        return Ok((None, None));
    }
    let invalid = || {
        Status::invalid_argument("page_token: is not a token this API returned; pass next_page_token unchanged, or empty for the first page")
    };
    let mut parts = token.splitn(3, '.');
    let (Some("v1"), Some(micros), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(invalid());
    };
    let at = micros
        .parse()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(invalid)?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(invalid());
    }
    Ok((Some(at), Some(id.to_owned())))
}

/// A totals page position: `t1.<period start in unix micros, or "none">.<partnership>.<currency>`.
fn encode_totals_token(
    period_start: Option<DateTime<Utc>>,
    partnership_id: &str,
    currency: &str,
) -> String {
    let at = period_start.map_or_else(|| "none".to_owned(), |at| at.timestamp_micros().to_string());
    format!("t1.{at}.{partnership_id}.{currency}")
}

/// The group key after which the next totals page starts; "none" is the period of lines that
/// earned nothing, sorted last (`-infinity`).
type TotalsPosition = (Option<DateTime<Utc>>, String, String);

fn parse_totals_token(token: &str) -> Result<Option<TotalsPosition>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || {
        Status::invalid_argument("page_token: is not a token this API returned; pass next_page_token unchanged, or empty for the first page")
    };
    let parts: Vec<&str> = token.split('.').collect();
    let ["t1", at, partnership_id, currency] = parts.as_slice() else {
        return Err(invalid());
    };
    let at = if *at == "none" {
        None
    } else {
        Some(
            at.parse()
                .ok()
                .and_then(DateTime::from_timestamp_micros)
                .ok_or_else(invalid)?,
        )
    };
    PartnershipId::parse("page_token", partnership_id).map_err(|_| invalid())?;
    Currency::parse("page_token", currency).map_err(|_| invalid())?;
    Ok(Some((
        at,
        (*partnership_id).to_owned(),
        (*currency).to_owned(),
    )))
}

/// An exact sum (numeric, as text) as minor units, or OUT_OF_RANGE if it does not fit.
fn exact_minor(sum: &str, what: &str) -> Result<i64, Status> {
    sum.parse::<i64>().map_err(|_| {
        Status::out_of_range(format!(
            "{what} is {sum} minor units, more than a Money can carry (at most {}); ask for one partnership at a time",
            i64::MAX
        ))
    })
}

/// The next page's token if the query returned more rows than the page holds.
fn next_token<T>(
    rows: &mut Vec<T>,
    size: u32,
    key: impl Fn(&T) -> (DateTime<Utc>, String),
) -> String {
    if rows.len() > size as usize {
        rows.truncate(size as usize);
        rows.last()
            .map(|row| {
                let (at, id) = key(row);
                encode_page_token(at, &id)
            })
            .unwrap_or_default()
    } else {
        String::new()
    }
}

#[derive(sqlx::FromRow)]
struct ActivityRow {
    purchase_id: String,
    referral_id: String,
    referrer_reference: String,
    partnership_id: String,
    acceptor_merchant_id: String,
    amount_minor: i64,
    currency: String,
    commission_minor: i64,
    reversed_minor: i64,
    terms: Option<Vec<u8>>,
    terms_version: i32,
    purchased_at: DateTime<Utc>,
    recorded_at: DateTime<Utc>,
    matched_by: Option<String>,
}

#[derive(sqlx::FromRow)]
struct LineRow {
    purchase_id: String,
    partnership_id: String,
    referrer_merchant_id: String,
    acceptor_merchant_id: String,
    referral_id: String,
    terms_version: i32,
    rule: String,
    amount_minor: i64,
    currency: String,
    commission_minor: i64,
    refunded_minor: i64,
    reversed_minor: i64,
    purchased_at: DateTime<Utc>,
    period_start: Option<DateTime<Utc>>,
    payable_at: DateTime<Utc>,
    not_earned_reason: Option<String>,
    decision_sequence: i32,
    matched_by: Option<String>,
}

const LINE_COLUMNS: &str = "purchase_id, partnership_id, referrer_merchant_id, acceptor_merchant_id, referral_id, terms_version, rule, \
    amount_minor, currency, commission_minor, refunded_minor, reversed_minor, purchased_at, period_start, payable_at, not_earned_reason, decision_sequence, \
    (SELECT a.matched_by FROM attributed_purchases a WHERE a.purchase_id = commissions.purchase_id) AS matched_by";

impl LineRow {
    fn to_proto(&self, now: DateTime<Utc>) -> pb::CommissionLine {
        let status = if self.not_earned_reason.is_some() {
            pb::CommissionStatus::NotEarned
        } else if self.payable_at > now {
            pb::CommissionStatus::Accrued
        } else {
            pb::CommissionStatus::Payable
        };
        pb::CommissionLine {
            purchase_id: self.purchase_id.clone(),
            partnership_id: self.partnership_id.clone(),
            referrer_merchant_id: self.referrer_merchant_id.clone(),
            acceptor_merchant_id: self.acceptor_merchant_id.clone(),
            referral_id: self.referral_id.clone(),
            amount: money(self.amount_minor, &self.currency),
            commission: money(self.commission_minor, &self.currency),
            refunded: money(self.refunded_minor, &self.currency),
            reversed: money(self.reversed_minor, &self.currency),
            net_commission: money(self.commission_minor - self.reversed_minor, &self.currency),
            terms_version: u32::try_from(self.terms_version).unwrap_or(0),
            rule: self.rule.clone(),
            purchased_at: Some(timestamp(self.purchased_at)),
            period_start: self.period_start.map(timestamp),
            payable_at: Some(timestamp(self.payable_at)),
            status: status as i32,
            not_earned_reason: self.not_earned_reason.clone().unwrap_or_default(),
            matched_by: kind_tag_to_proto(self.matched_by.as_deref()),
        }
    }
}

#[tonic::async_trait]
impl ReferralLedger for LedgerQueries {
    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id = %tandem_domain::text::loggable_id(&request.get_ref().referrer_merchant_id)))]
    async fn list_referral_activity(
        &self,
        request: Request<pb::ListReferrerActivityRequest>,
    ) -> Result<Response<pb::ListReferralActivityResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        let request = request.into_inner();
        let referrer = merchant(&request.referrer_merchant_id)?;
        let size = page_size(request.page_size)?;
        let (after_at, after_id) = parse_page_token(&request.page_token)?;
        let mut rows: Vec<ActivityRow> = sqlx::query_as(
            "SELECT c.purchase_id, c.referral_id, r.referrer_reference, c.partnership_id, c.acceptor_merchant_id, \
             c.amount_minor, c.currency, c.commission_minor, c.reversed_minor, v.terms, c.terms_version, c.purchased_at, \
             c.recorded_at, (SELECT a.matched_by FROM attributed_purchases a WHERE a.purchase_id = c.purchase_id) AS matched_by \
             FROM commissions c JOIN referrals r ON r.referral_id = c.referral_id \
             LEFT JOIN partnership_versions v ON v.partnership_id = c.partnership_id AND v.version = c.terms_version \
             WHERE c.referrer_merchant_id = $1 \
             AND ($2::timestamptz IS NULL OR (c.purchased_at, c.purchase_id) < ($2, $3)) \
             ORDER BY c.purchased_at DESC, c.purchase_id DESC LIMIT $4",
        )
        .bind(referrer.as_str())
        .bind(after_at)
        .bind(after_id)
        .bind(i64::from(size) + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(internal)?;
        let next_page_token = next_token(&mut rows, size, |row| {
            (row.purchased_at, row.purchase_id.clone())
        });
        let purchases = rows
            .into_iter()
            .map(|row| {
                // The rate, for terms that pay a percentage.
                let rate = row
                    .terms
                    .and_then(|bytes| pb::Terms::decode(bytes.as_slice()).ok())
                    .and_then(|terms| match terms.rule {
                        Some(pb::terms::Rule::PercentageBps(rate)) => Some(rate),
                        _ => None,
                    })
                    .unwrap_or(0);
                pb::AttributedPurchase {
                    purchase_id: row.purchase_id,
                    referral_id: row.referral_id,
                    referrer_reference: row.referrer_reference,
                    partnership_id: row.partnership_id,
                    acceptor_merchant_id: row.acceptor_merchant_id,
                    amount: money(row.amount_minor, &row.currency),
                    commission: money(row.commission_minor, &row.currency),
                    commission_rate_bps: rate,
                    terms_version: u32::try_from(row.terms_version).unwrap_or(0),
                    purchased_at: Some(timestamp(row.purchased_at)),
                    attributed_at: Some(timestamp(row.recorded_at)),
                    reversed: money(row.reversed_minor, &row.currency),
                    net_commission: money(row.commission_minor - row.reversed_minor, &row.currency),
                    matched_by: kind_tag_to_proto(row.matched_by.as_deref()),
                }
            })
            .collect();
        Ok(Response::new(pb::ListReferralActivityResponse {
            purchases,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id = %tandem_domain::text::loggable_id(&request.get_ref().merchant_id)))]
    async fn list_referrals(
        &self,
        request: Request<pb::LedgerListReferralsRequest>,
    ) -> Result<Response<pb::ListReferralsResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        let request = request.into_inner();
        let referrer = merchant(&request.merchant_id)?;
        let query = request.request.unwrap_or_default();
        let size = page_size(query.page_size)?;
        let (after_at, after_id) = parse_page_token(&query.page_token)?;
        type Row = (
            String,
            String,
            String,
            String,
            DateTime<Utc>,
            DateTime<Utc>,
            Option<DateTime<Utc>>,
            bool,
            bool,
        );
        let mut rows: Vec<Row> = sqlx::query_as(
            "SELECT referral_id, partnership_id, acceptor_merchant_id, referrer_reference, referred_at, attribution_ends_at, \
             cancelled_at, converted, automatic FROM referrals WHERE referrer_merchant_id = $1 \
             AND ($2::timestamptz IS NULL OR (referred_at, referral_id) < ($2, $3)) \
             ORDER BY referred_at DESC, referral_id DESC LIMIT $4",
        )
        .bind(referrer.as_str())
        .bind(after_at)
        .bind(after_id)
        .bind(i64::from(size) + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(internal)?;
        let next_page_token = next_token(&mut rows, size, |row| (row.4, row.0.clone()));
        let now = Utc::now();
        let referrals = rows
            .into_iter()
            .map(
                |(
                    referral_id,
                    partnership_id,
                    acceptor,
                    reference,
                    referred_at,
                    ends_at,
                    cancelled_at,
                    converted,
                    automatic,
                )| {
                    let state = if cancelled_at.is_some() {
                        pb::ReferralState::Cancelled
                    } else if converted {
                        pb::ReferralState::Converted
                    } else if ends_at <= now {
                        pb::ReferralState::Expired
                    } else {
                        pb::ReferralState::Open
                    };
                    pb::Referral {
                        referral_id,
                        partnership_id,
                        acceptor_merchant_id: acceptor,
                        referrer_reference: reference,
                        referred_at: Some(timestamp(referred_at)),
                        attribution_ends_at: Some(timestamp(ends_at)),
                        state: state as i32,
                        automatic,
                    }
                },
            )
            .collect();
        Ok(Response::new(pb::ListReferralsResponse {
            referrals,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id = %tandem_domain::text::loggable_id(&request.get_ref().merchant_id)))]
    async fn list_commissions(
        &self,
        request: Request<pb::LedgerListCommissionsRequest>,
    ) -> Result<Response<pb::ListCommissionsResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        let request = request.into_inner();
        let merchant = merchant(&request.merchant_id)?;
        let query = request.request.unwrap_or_default();
        let (column, _) = role_columns(query.role)?;
        let partnership = partnership_filter(&query.partnership_id)?;
        check_partnership_filter(&self.pool, &merchant, column, partnership.as_deref()).await?;
        let period_start = match &query.period_start {
            None => None,
            Some(t) => Some(tandem_proto::time::datetime(t).ok_or_else(|| {
                Status::invalid_argument("period_start: is not a valid timestamp")
            })?),
        };
        let size = page_size(query.page_size)?;
        let (after_at, after_id) = parse_page_token(&query.page_token)?;
        let sql = format!(
            "SELECT {LINE_COLUMNS} FROM commissions WHERE {column} = $1 \
             AND ($2::text IS NULL OR partnership_id = $2) AND ($3::timestamptz IS NULL OR period_start = $3) \
             AND ($4::timestamptz IS NULL OR (purchased_at, purchase_id) < ($4, $5)) \
             ORDER BY purchased_at DESC, purchase_id DESC LIMIT $6"
        );
        let mut rows: Vec<LineRow> = sqlx::query_as(&sql)
            .bind(merchant.as_str())
            .bind(partnership)
            .bind(period_start)
            .bind(after_at)
            .bind(after_id)
            .bind(i64::from(size) + 1)
            .fetch_all(&self.pool)
            .await
            .map_err(internal)?;
        let next_page_token = next_token(&mut rows, size, |row| {
            (row.purchased_at, row.purchase_id.clone())
        });
        let now = Utc::now();
        let lines = rows.iter().map(|row| row.to_proto(now)).collect();
        Ok(Response::new(pb::ListCommissionsResponse {
            lines,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id = %tandem_domain::text::loggable_id(&request.get_ref().merchant_id)))]
    async fn get_commission_totals(
        &self,
        request: Request<pb::LedgerGetCommissionTotalsRequest>,
    ) -> Result<Response<pb::GetCommissionTotalsResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        let request = request.into_inner();
        let merchant = merchant(&request.merchant_id)?;
        let query = request.request.unwrap_or_default();
        let (column, counterparty) = role_columns(query.role)?;
        let partnership = partnership_filter(&query.partnership_id)?;
        check_partnership_filter(&self.pool, &merchant, column, partnership.as_deref()).await?;
        let size = page_size(query.page_size)?;
        let after = parse_totals_token(&query.page_token)?;
        type Row = (
            String,
            String,
            Option<DateTime<Utc>>,
            String,
            i64,
            String,
            String,
            String,
        );
        // Sums in numeric, which cannot overflow; ordered and paged on the group key, with the
        // lines without a period (nothing earned) last.
        let sql = format!(
            "SELECT partnership_id, {counterparty}, period_start, currency, count(*), sum(amount_minor)::text, \
             sum(commission_minor)::text, sum(reversed_minor)::text FROM commissions \
             WHERE {column} = $1 AND ($2::text IS NULL OR partnership_id = $2) \
             AND (NOT $7 \
                  OR ($3::timestamptz IS NULL AND period_start IS NULL AND (partnership_id, currency) > ($4, $5)) \
                  OR ($3 IS NOT NULL AND (period_start IS NULL OR period_start < $3 \
                      OR (period_start = $3 AND (partnership_id, currency) > ($4, $5))))) \
             GROUP BY partnership_id, {counterparty}, period_start, currency \
             ORDER BY coalesce(period_start, '-infinity') DESC, partnership_id, currency LIMIT $6"
        );
        let mut rows: Vec<Row> = sqlx::query_as(&sql)
            .bind(merchant.as_str())
            .bind(partnership)
            .bind(after.as_ref().and_then(|(at, _, _)| *at))
            .bind(after.as_ref().map(|(_, p, _)| p.clone()))
            .bind(after.as_ref().map(|(_, _, c)| c.clone()))
            .bind(i64::from(size) + 1)
            .bind(after.is_some())
            .fetch_all(&self.pool)
            .await
            .map_err(internal)?;
        let next_page_token = if rows.len() > size as usize {
            rows.truncate(size as usize);
            rows.last()
                .map(|(partnership_id, _, period_start, currency, ..)| {
                    encode_totals_token(*period_start, partnership_id, currency)
                })
                .unwrap_or_default()
        } else {
            String::new()
        };
        let mut totals = Vec::with_capacity(rows.len());
        for (
            partnership_id,
            counterparty,
            period_start,
            currency,
            purchases,
            amount,
            commission,
            reversed,
        ) in rows
        {
            let what = |name: &str| format!("{name} of partnership {partnership_id} in {currency}");
            let amount = exact_minor(&amount, &what("the attributed amount"))?;
            let commission_minor = exact_minor(&commission, &what("the commission"))?;
            let reversed_minor = exact_minor(&reversed, &what("the reversed commission"))?;
            totals.push(pb::CommissionTotal {
                partnership_id,
                counterparty_merchant_id: counterparty,
                period_start: period_start.map(timestamp),
                purchases: u32::try_from(purchases).unwrap_or(u32::MAX),
                attributed_amount: money(amount, &currency),
                commission: money(commission_minor, &currency),
                reversed: money(reversed_minor, &currency),
                net_commission: money(commission_minor - reversed_minor, &currency),
            });
        }
        Ok(Response::new(pb::GetCommissionTotalsResponse {
            totals,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id = %tandem_domain::text::loggable_id(&request.get_ref().merchant_id)))]
    async fn explain_commission(
        &self,
        request: Request<pb::LedgerExplainCommissionRequest>,
    ) -> Result<Response<pb::ExplainCommissionResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        let request = request.into_inner();
        let merchant = merchant(&request.merchant_id)?;
        let purchase_id = request.request.unwrap_or_default().purchase_id;
        let purchase_id = PurchaseId::parse("purchase_id", &purchase_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let sql = format!("SELECT {LINE_COLUMNS} FROM commissions WHERE purchase_id = $1 AND (referrer_merchant_id = $2 OR acceptor_merchant_id = $2)");
        let row: Option<LineRow> = sqlx::query_as(&sql)
            .bind(purchase_id.as_str())
            .bind(merchant.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(internal)?;
        let Some(row) = row else {
            return Err(Status::not_found(format!(
                "purchase_id: no commission line for {purchase_id} involves you; it was not attributed, or not yet"
            )));
        };
        // The decision itself: one event of the partnership's stream, and the terms it used.
        let partnership_id =
            PartnershipId::parse("partnership_id", &row.partnership_id).map_err(internal)?;
        let decision = load_decision(
            &self.pool,
            &partnership_id,
            &purchase_id,
            row.decision_sequence,
        )
        .await?;
        let currency = Currency::parse("currency", &row.currency).map_err(internal)?;
        let terms_version = u32::try_from(row.terms_version).ok().filter(|v| *v > 0);
        let terms = match terms_version {
            Some(_) => {
                let bytes: Option<Vec<u8>> = sqlx::query_scalar(
                    "SELECT terms FROM partnership_versions WHERE partnership_id = $1 AND version = $2",
                )
                .bind(partnership_id.as_str())
                .bind(row.terms_version)
                .fetch_optional(&self.pool)
                .await
                .map_err(internal)?;
                bytes
                    .map(|bytes| {
                        pb::Terms::decode(bytes.as_slice())
                            .map_err(internal)
                            .and_then(|t| tandem_codec::terms_from_proto(&t).map_err(internal))
                    })
                    .transpose()?
            }
            None => None,
        };
        let terms = terms.as_ref();
        let (calculation, not_earned) = match &decision {
            Event::CommissionAccrued { calculation, .. } => (Some(calculation), None),
            Event::CommissionNotEarned { reason, .. } => (None, Some(reason)),
            _ => (None, None),
        };
        let explanation = explain(&CommissionLine {
            amount: Money::new(row.amount_minor, currency),
            terms_version,
            terms,
            commission: Money::new(row.commission_minor, currency),
            calculation,
            not_earned,
            refunded_minor: row.refunded_minor,
            reversed_minor: row.reversed_minor,
            payable_at: row.payable_at,
        });
        // Which capture at the till found the customer (never the value).
        let explanation = match row.matched_by.as_deref().and_then(IdentifierKind::from_tag) {
            Some(kind) => {
                format!("Matched to the referral by the customer's {kind}. {explanation}")
            }
            None => explanation,
        };
        Ok(Response::new(pb::ExplainCommissionResponse {
            line: Some(row.to_proto(Utc::now())),
            terms: terms.map(terms_to_proto),
            calculation: calculation.map(calculation_to_proto),
            explanation,
        }))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id = %tandem_domain::text::loggable_id(&request.get_ref().merchant_id)))]
    async fn get_balances(
        &self,
        request: Request<pb::LedgerGetBalancesRequest>,
    ) -> Result<Response<pb::GetBalancesResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        let merchant = merchant(&request.get_ref().merchant_id)?;
        // Sums in numeric, which cannot overflow; a balance beyond a Money is OUT_OF_RANGE.
        let rows: Vec<(String, String, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT p.currency, p.account, \
             sum(p.amount_minor) FILTER (WHERE e.payable_at > now())::text, \
             sum(p.amount_minor) FILTER (WHERE e.payable_at <= now())::text \
             FROM ledger_postings p JOIN ledger_entries e ON e.entry_id = p.entry_id \
             WHERE p.merchant_id = $1 GROUP BY p.currency, p.account ORDER BY p.currency, p.account",
        )
        .bind(merchant.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(internal)?;
        let mut balances = Vec::with_capacity(rows.len());
        for (currency, account, accrued, payable) in rows {
            // Receivable balances are debits (positive); payable ones credits (negative): both
            // are reported as the positive amount owed.
            let (role, sign) = if account == "commission_receivable" {
                (pb::PartnershipRole::Referrer, 1)
            } else {
                (pb::PartnershipRole::Acceptor, -1)
            };
            let accrued = exact_minor(
                accrued.as_deref().unwrap_or("0"),
                &format!("the accrued {account} balance in {currency}"),
            )?;
            let payable = exact_minor(
                payable.as_deref().unwrap_or("0"),
                &format!("the payable {account} balance in {currency}"),
            )?;
            balances.push(pb::Balance {
                currency,
                role: role as i32,
                accrued_minor: sign * accrued,
                payable_minor: sign * payable,
                settled_minor: 0,
            });
        }
        Ok(Response::new(pb::GetBalancesResponse { balances }))
    }
}

/// The commission decision (accrued or not earned) for a purchase: the one event of the
/// partnership's stream its line points to.
async fn load_decision(
    pool: &PgPool,
    partnership_id: &PartnershipId,
    purchase_id: &PurchaseId,
    sequence: i32,
) -> Result<Event, Status> {
    let payload: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT payload FROM events WHERE stream_id = $1 AND sequence = $2")
            .bind(book::stream_id(partnership_id))
            .bind(sequence)
            .fetch_optional(pool)
            .await
            .map_err(internal)?;
    let not_found = || {
        Status::not_found(format!(
            "purchase_id: no commission decision for {purchase_id}"
        ))
    };
    let payload = payload.ok_or_else(not_found)?;
    let event = pb::PartnershipEvent::decode(payload.as_slice()).map_err(internal)?;
    let event = tandem_codec::event_from_proto(&event).map_err(internal)?;
    match &event {
        Event::CommissionAccrued {
            purchase_id: id, ..
        }
        | Event::CommissionNotEarned {
            purchase_id: id, ..
        } if id == purchase_id => Ok(event),
        _ => Err(not_found()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_total_beyond_a_money_is_out_of_range_not_wrapped() {
        assert_eq!(exact_minor("9223372036854775807", "x").unwrap(), i64::MAX);
        let status = exact_minor("18446744073709551614", "the commission").unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange);
        assert!(status
            .message()
            .contains("the commission is 18446744073709551614"));
    }

    #[test]
    fn totals_tokens_round_trip_and_refuse_what_this_api_did_not_write() {
        let at = DateTime::from_timestamp_micros(1_764_547_200_000_000).unwrap();
        let partnership = "prt_01a2321400007456805e5a64fc1f2ee2";
        let token = encode_totals_token(Some(at), partnership, "EUR");
        assert_eq!(
            parse_totals_token(&token).unwrap(),
            Some((Some(at), partnership.to_owned(), "EUR".to_owned()))
        );
        let none = encode_totals_token(None, partnership, "EUR");
        assert_eq!(parse_totals_token(&none).unwrap().unwrap().0, None);
        assert_eq!(parse_totals_token("").unwrap(), None);
        for bad in [
            "t1",
            "t1.x.prt_1.EUR",
            "t2.1.prt_01a2321400007456805e5a64fc1f2ee2.EUR",
            "t1.1.'; drop.EUR",
        ] {
            assert_eq!(
                parse_totals_token(bad).unwrap_err().code(),
                tonic::Code::InvalidArgument,
                "{bad}"
            );
        }
    }
}
