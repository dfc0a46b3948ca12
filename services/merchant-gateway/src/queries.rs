//! Queries answered by the referral ledger and by settlement. The gateway authenticates the
//! merchant and asks on its behalf; those services only ever answer for the merchant the gateway
//! names.

use std::future::Future;

use tandem_proto::v1::referral_ledger_client::ReferralLedgerClient;
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
    ledger: &ReferralLedgerClient<tandem_runtime::InternalChannel>,
    request: Request<Req>,
    call: F,
) -> Result<Resp, GatewayError>
where
    F: FnOnce(ReferralLedgerClient<tandem_runtime::InternalChannel>, String, Req) -> Fut,
    Fut: Future<Output = Result<Response<Resp>, Status>>,
{
    let merchant = authenticate_merchant(&state.pool, request.metadata()).await?;
    tracing::Span::current().record("merchant_id", merchant.as_str());
    relay_status(
        "the referral ledger",
        call(ledger.clone(), merchant.to_string(), request.into_inner()).await,
    )
}

/// A backend's answer as the gateway's: statuses the client caused, and INTERNAL (a fault
/// retrying will not cure), pass through with their message; anything else becomes UNAVAILABLE,
/// naming `backend`.
pub fn relay_status<Resp>(
    backend: &str,
    answer: Result<Response<Resp>, Status>,
) -> Result<Resp, GatewayError> {
    match answer {
        Ok(response) => Ok(response.into_inner()),
        Err(status)
            if matches!(
                status.code(),
                Code::InvalidArgument
                    | Code::NotFound
                    | Code::PermissionDenied
                    | Code::FailedPrecondition
                    | Code::AlreadyExists
                    | Code::OutOfRange
                    | Code::Internal
            ) =>
        {
            Err(GatewayError::Upstream(Status::new(
                status.code(),
                status.message().to_owned(),
            )))
        }
        Err(status) => {
            tracing::warn!(code = ?status.code(), message = status.message(), backend, "backend call failed");
            let message = if status.code() == Code::Unavailable && !status.message().is_empty() {
                format!(
                    "{backend} is temporarily unavailable ({}); retry shortly",
                    status.message()
                )
            } else {
                format!("{backend} is temporarily unavailable; retry shortly")
            };
            Err(GatewayError::Unavailable(message))
        }
    }
}
