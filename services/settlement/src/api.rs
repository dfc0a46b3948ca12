//! Settlement's internal gRPC API: what the merchant gateway asks on behalf of an authenticated
//! merchant (statements, always scoped to `merchant_id`) or of an operator (cycles, payout
//! instructions).

use std::sync::Arc;

use chrono::Utc;
use sqlx::PgPool;
use tandem_domain::ids::MerchantId;
use tandem_domain::money::Currency;
use tandem_proto::time::timestamp;
use tandem_proto::v1 as pb;
use tandem_proto::v1::settlement_server::Settlement;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::close::{self, CloseRefused, ClosureSummary};
use crate::statements::{self, Header};
use crate::SettlementError;

const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 500;

pub struct SettlementApi {
    pub pool: PgPool,
    pub outbox_written: Arc<Notify>,
}

impl From<SettlementError> for Status {
    fn from(error: SettlementError) -> Self {
        match &error {
            SettlementError::Corrupt(invalid) => {
                tracing::error!(error = %invalid, "stored settlement data is invalid");
                Status::internal("stored settlement data is invalid; operators have been told")
            }
            SettlementError::Invariant(what) => {
                tracing::error!(invariant = what, "settlement invariant violated");
                Status::internal(format!("{what}; operators have been told"))
            }
            _ => {
                tracing::warn!(error = %tandem_runtime::error_chain(&error), "settlement query failed");
                Status::unavailable("settlement storage is unavailable; retry shortly")
            }
        }
    }
}

impl From<CloseRefused> for Status {
    fn from(refused: CloseRefused) -> Self {
        match refused {
            CloseRefused::AwaitingAdmin { .. } => Status::unavailable(refused.to_string()),
            _ => Status::failed_precondition(refused.to_string()),
        }
    }
}

fn merchant(value: &str) -> Result<MerchantId, Status> {
    MerchantId::parse("merchant_id", value).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn page_size(requested: u32) -> Result<i64, Status> {
    match requested {
        0 => Ok(i64::from(DEFAULT_PAGE_SIZE)),
        size if size <= MAX_PAGE_SIZE => Ok(i64::from(size)),
        size => Err(Status::invalid_argument(format!(
            "page_size: must be at most {MAX_PAGE_SIZE}, got {size}"
        ))),
    }
}

/// Page tokens are `v1.<number>`: the last position of the previous page.
fn page_token(token: &str) -> Result<i64, Status> {
    if token.is_empty() {
        return Ok(0);
    }
    token
        .strip_prefix("v1.")
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            Status::invalid_argument(
                "page_token: not a token this API issued; pass the next_page_token of the previous page, or nothing for the first",
            )
        })
}

fn statement_number(number: u32) -> Result<i32, Status> {
    i32::try_from(number)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| Status::invalid_argument("number: must be a statement number, 1 or more"))
}

pub(crate) fn summary_to_proto(summary: &ClosureSummary) -> pb::CycleSummary {
    pb::CycleSummary {
        cycle: summary.cycle.clone(),
        start: Some(timestamp(summary.start)),
        cut_off: Some(timestamp(summary.cut_off)),
        closed_at: Some(timestamp(summary.closed_at)),
        statements: summary.statements,
        settled_lines: summary.settled_lines,
        carried_forward_lines: summary.carried_forward_lines,
        payout_instructions: summary.payout_instructions,
        closed_now: summary.closed_now,
    }
}

impl SettlementApi {
    async fn issued(&self, merchant_id: &str, number: u32) -> Result<Header, Status> {
        let merchant = merchant(merchant_id)?;
        let number = statement_number(number)?;
        statements::header(&self.pool, merchant.as_str(), number)
            .await?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "you have no statement number {number}; ListStatements shows yours"
                ))
            })
    }
}

#[tonic::async_trait]
impl Settlement for SettlementApi {
    async fn list_statements(
        &self,
        request: Request<pb::ListStatementsRequest>,
    ) -> Result<Response<pb::ListStatementsResponse>, Status> {
        let request = request.into_inner();
        let merchant = merchant(&request.merchant_id)?;
        let limit = page_size(request.page_size)?;
        let before = i32::try_from(page_token(&request.page_token)?)
            .map_err(|_| Status::invalid_argument("page_token: out of range"))?;
        let headers = statements::list(&self.pool, merchant.as_str(), before, limit).await?;
        let next_page_token = match headers.last() {
            Some(last) if headers.len() as i64 == limit && last.number > 1 => {
                format!("v1.{}", last.number)
            }
            _ => String::new(),
        };
        Ok(Response::new(pb::ListStatementsResponse {
            statements: headers.iter().map(statements::header_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn get_statement(
        &self,
        request: Request<pb::GetStatementRequest>,
    ) -> Result<Response<pb::Statement>, Status> {
        let request = request.into_inner();
        let header = self.issued(&request.merchant_id, request.number).await?;
        let statement = statements::load(&self.pool, &header).await?;
        Ok(Response::new(statements::statement_to_proto(
            &header, &statement,
        )))
    }

    async fn export_statement(
        &self,
        request: Request<pb::ExportStatementRequest>,
    ) -> Result<Response<pb::ExportStatementResponse>, Status> {
        let request = request.into_inner();
        let format = pb::ExportFormat::try_from(request.format)
            .ok()
            .filter(|f| *f != pb::ExportFormat::Unspecified)
            .ok_or_else(|| Status::invalid_argument("format: must be CSV, JSON or PDF"))?;
        let header = self.issued(&request.merchant_id, request.number).await?;
        let statement = statements::load(&self.pool, &header).await?;
        let (content_type, extension, content) = match format {
            pb::ExportFormat::Csv => ("text/csv", "csv", statement.canonical_csv().into_bytes()),
            pb::ExportFormat::Json => {
                ("application/json", "json", statements::to_json(&statement)?)
            }
            _ => (
                "application/pdf",
                "pdf",
                crate::pdf::render(&statement, &header.content_hash),
            ),
        };
        Ok(Response::new(pb::ExportStatementResponse {
            content_type: content_type.to_owned(),
            file_name: statements::file_name(&statement, extension),
            content,
            content_hash: header.content_hash,
        }))
    }

    async fn verify_statement(
        &self,
        request: Request<pb::VerifyStatementRequest>,
    ) -> Result<Response<pb::VerifyStatementResponse>, Status> {
        let request = request.into_inner();
        let header = self.issued(&request.merchant_id, request.number).await?;
        let computed = match request.claim {
            Some(pb::verify_statement_request::Claim::ContentHash(hash)) => {
                let hash = hash.trim().to_ascii_lowercase();
                if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(Status::invalid_argument(
                        "content_hash: must be 64 hexadecimal characters (SHA-256)",
                    ));
                }
                hash
            }
            Some(pb::verify_statement_request::Claim::Csv(bytes)) => {
                tandem_domain::statement::content_hash(&bytes)
            }
            Some(pb::verify_statement_request::Claim::Json(bytes)) => {
                let canonical = statements::canonical_from_json(&bytes)
                    .map_err(|reason| Status::invalid_argument(format!("json: {reason}")))?;
                tandem_domain::statement::content_hash(canonical.as_bytes())
            }
            None => {
                return Err(Status::invalid_argument(
                    "claim: send content_hash, csv or json to verify",
                ))
            }
        };
        Ok(Response::new(pb::VerifyStatementResponse {
            matches: computed == header.content_hash,
            content_hash: header.content_hash,
            computed_hash: computed,
        }))
    }

    async fn list_unsettled_lines(
        &self,
        request: Request<pb::ListUnsettledLinesRequest>,
    ) -> Result<Response<pb::ListUnsettledLinesResponse>, Status> {
        let request = request.into_inner();
        let merchant = merchant(&request.merchant_id)?;
        let limit = page_size(request.page_size)?;
        let offset = page_token(&request.page_token)?;
        let lines = statements::unsettled(&self.pool, merchant.as_str(), offset, limit).await?;
        let next_page_token = if lines.len() as i64 == limit {
            format!("v1.{}", offset + limit)
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListUnsettledLinesResponse {
            lines,
            next_page_token,
        }))
    }

    async fn close_cycle(
        &self,
        request: Request<pb::CloseCycleRequest>,
    ) -> Result<Response<pb::CycleSummary>, Status> {
        let request = request.into_inner();
        let cycle = close::parse_cycle(&request.cycle)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let summary =
            close::close_cycle(&self.pool, &cycle, Utc::now(), &self.outbox_written).await??;
        tracing::info!(cycle = %summary.cycle, closed_now = summary.closed_now, "cycle closed on request");
        Ok(Response::new(summary_to_proto(&summary)))
    }

    async fn list_cycles(
        &self,
        request: Request<pb::ListCyclesRequest>,
    ) -> Result<Response<pb::ListCyclesResponse>, Status> {
        let request = request.into_inner();
        let limit = page_size(request.page_size)?;
        let before = page_token(&request.page_token)?;
        type Row = (
            i64,
            String,
            chrono::DateTime<Utc>,
            chrono::DateTime<Utc>,
            chrono::DateTime<Utc>,
            i32,
            i64,
            i64,
            i32,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT k.closure, k.cycle, k.start_at, k.cut_off, k.closed_at, c.statements, c.settled_lines, \
               c.carried_forward_lines, c.payout_instructions \
             FROM cycle_closures k JOIN cycles c USING (cycle) WHERE ($1 = 0 OR k.closure < $1) \
             ORDER BY k.closure DESC LIMIT $2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(SettlementError::from)?;
        let next_page_token = match rows.last() {
            Some(last) if rows.len() as i64 == limit && last.0 > 1 => format!("v1.{}", last.0),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListCyclesResponse {
            cycles: rows
                .into_iter()
                .map(
                    |(_, cycle, start, cut_off, closed_at, s, settled, carried, p)| {
                        summary_to_proto(&close::summary_from_row((
                            cycle, start, cut_off, closed_at, s, settled, carried, p,
                        )))
                    },
                )
                .collect(),
            next_page_token,
        }))
    }

    async fn list_payout_instructions(
        &self,
        request: Request<pb::ListPayoutInstructionsRequest>,
    ) -> Result<Response<pb::ListPayoutInstructionsResponse>, Status> {
        let request = request.into_inner();
        let limit = page_size(request.page_size)?;
        let offset = page_token(&request.page_token)?;
        let cycle = if request.cycle.is_empty() {
            None
        } else {
            Some(
                close::parse_cycle(&request.cycle)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?
                    .key(),
            )
        };
        let currency = if request.currency.is_empty() {
            None
        } else {
            Some(
                Currency::parse("currency", &request.currency)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?
                    .to_string(),
            )
        };
        if let Some(cycle) = &cycle {
            if close::summary_of(&self.pool, cycle).await?.is_none() {
                return Err(Status::not_found(format!(
                    "cycle {cycle} is not closed; ListSettlementCycles shows the closed ones"
                )));
            }
        }
        let instructions = crate::payouts::list(
            &self.pool,
            cycle.as_deref(),
            currency.as_deref(),
            offset,
            limit,
        )
        .await?;
        let next_page_token = if instructions.len() as i64 == limit {
            format!("v1.{}", offset + limit)
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListPayoutInstructionsResponse {
            instructions,
            next_page_token,
        }))
    }

    async fn get_payout_file(
        &self,
        request: Request<pb::GetPayoutFileRequest>,
    ) -> Result<Response<pb::PayoutFile>, Status> {
        let request = request.into_inner();
        let cycle = close::parse_cycle(&request.cycle)
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .key();
        let currency = Currency::parse("currency", &request.currency)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let date = if request.requested_execution_date.is_empty() {
            None
        } else {
            Some(
                chrono::NaiveDate::parse_from_str(&request.requested_execution_date, "%Y-%m-%d")
                    .map_err(|_| {
                        Status::invalid_argument(
                            "requested_execution_date: must be a date YYYY-MM-DD, or empty for the day after the cycle closed",
                        )
                    })?,
            )
        };
        let file = crate::payouts::payout_file(&self.pool, &cycle, currency, date)
            .await?
            .map_err(|refused| match refused {
                crate::payouts::FileRefused::NotClosed(_) => Status::not_found(refused.to_string()),
                _ => Status::failed_precondition(refused.to_string()),
            })?;
        Ok(Response::new(pb::PayoutFile {
            file_name: format!("pain001-{}-{currency}.xml", cycle.replace([':', '/'], "_")),
            content_type: "application/xml".into(),
            content: file.xml.into_bytes(),
            number_of_transactions: file.transactions,
            control_sum_minor: file.control_sum_minor,
            message_id: file.message_id,
        }))
    }

    async fn issue_correction(
        &self,
        request: Request<pb::IssueCorrectionRequest>,
    ) -> Result<Response<pb::IssueCorrectionResponse>, Status> {
        let request = request.into_inner();
        let invalid = |e: tandem_domain::ValidationError| Status::invalid_argument(e.to_string());
        let idempotency_key =
            tandem_domain::text::parse_token("idempotency_key", &request.idempotency_key, 1, 128)
                .map_err(invalid)?;
        let merchant_id = merchant(&request.merchant_id)?;
        let statement_number = statement_number(request.statement_number).map_err(|_| {
            Status::invalid_argument("statement_number: must be a statement number, 1 or more")
        })?;
        let partnership_id =
            tandem_domain::ids::PartnershipId::parse("partnership_id", &request.partnership_id)
                .map_err(invalid)?;
        let money = request
            .amount
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("amount: is missing"))?;
        let currency = Currency::parse("amount.currency", &money.currency).map_err(invalid)?;
        if money.amount_minor == 0
            || money.amount_minor.unsigned_abs()
                > tandem_domain::money::MAX_AMOUNT_MINOR.unsigned_abs()
        {
            return Err(Status::invalid_argument(format!(
                "amount.amount_minor: must not be zero and at most {} in absolute value (minor units): positive is owed by the acceptor to the referrer, negative the reverse",
                tandem_domain::money::MAX_AMOUNT_MINOR
            )));
        }
        let reason =
            tandem_domain::text::parse_token("reason", &request.reason, 1, 200).map_err(invalid)?;
        let correction = crate::corrections::CorrectionRequest {
            idempotency_key,
            merchant_id,
            statement_number,
            partnership_id,
            amount: tandem_domain::money::Money::new(money.amount_minor, currency),
            reason,
        };
        let corrected =
            crate::corrections::issue(&self.pool, &correction, Utc::now(), &self.outbox_written)
                .await?
                .map_err(|refused| match refused {
                    crate::corrections::CorrectionRefused::NoStatement { .. }
                    | crate::corrections::CorrectionRefused::NoPartnership(_) => {
                        Status::not_found(refused.to_string())
                    }
                    crate::corrections::CorrectionRefused::Currency { .. } => {
                        Status::invalid_argument(refused.to_string())
                    }
                    crate::corrections::CorrectionRefused::KeyReused(_) => {
                        Status::already_exists(refused.to_string())
                    }
                    crate::corrections::CorrectionRefused::NotAParty { .. } => {
                        Status::failed_precondition(refused.to_string())
                    }
                })?;
        let mut issued = Vec::with_capacity(corrected.statements.len());
        for (merchant, number) in &corrected.statements {
            let header = statements::header(&self.pool, merchant, *number)
                .await?
                .ok_or(SettlementError::Invariant(
                    "a correction statement is missing",
                ))?;
            let statement = statements::load(&self.pool, &header).await?;
            issued.push(statements::statement_to_proto(&header, &statement));
        }
        Ok(Response::new(pb::IssueCorrectionResponse {
            statements: issued,
            created_now: corrected.created_now,
        }))
    }
}
