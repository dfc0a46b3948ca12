//! Queries answered by the referral ledger. The gateway authenticates the merchant and asks the
//! ledger on its behalf; the ledger only ever answers for the merchant the gateway names.

use std::future::Future;

use tandem_proto::v1::referral_ledger_client::ReferralLedgerClient;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::auth::authenticate_merchant;
use crate::{GatewayError, State};

/// A request to the ledger carrying the current trace context.
pub fn traced<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    for (name, value) in tandem_telemetry::current_trace_headers() {
        let key = match name.as_str() {
            "traceparent" => "traceparent",
            "tracestate" => "tracestate",
            _ => continue,
        };
        if let Ok(value) = value.parse() {
            request.metadata_mut().insert(key, value);
        }
    }
    request
}

/// Authenticates the caller, then runs `call` against the ledger with the merchant's id.
/// Statuses the client caused (a bad page token, a purchase it may not see) pass through; any
/// other failure becomes UNAVAILABLE.
pub async fn forward<Req, Resp, F, Fut>(
    state: &State,
    ledger: &ReferralLedgerClient<Channel>,
    request: Request<Req>,
    call: F,
) -> Result<Resp, GatewayError>
where
    F: FnOnce(ReferralLedgerClient<Channel>, String, Req) -> Fut,
    Fut: Future<Output = Result<Response<Resp>, Status>>,
{
    let merchant = authenticate_merchant(&state.pool, request.metadata()).await?;
    tracing::Span::current().record("merchant_id", merchant.as_str());
    match call(ledger.clone(), merchant.to_string(), request.into_inner()).await {
        Ok(response) => Ok(response.into_inner()),
        Err(status)
            if matches!(
                status.code(),
                Code::InvalidArgument | Code::NotFound | Code::PermissionDenied
            ) =>
        {
            Err(GatewayError::Upstream(Status::new(
                status.code(),
                status.message().to_owned(),
            )))
        }
        Err(status) => {
            tracing::warn!(code = ?status.code(), message = status.message(), "referral ledger call failed");
            Err(GatewayError::Unavailable(
                "the referral ledger is temporarily unavailable; retry shortly".to_owned(),
            ))
        }
    }
}
