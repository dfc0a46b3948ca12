//! The gateway's one error type and its mapping to gRPC statuses. Client mistakes get a precise
//! status and a message that says what to fix; internal failures are logged with their cause
//! chain and reach the client only as a generic INTERNAL or UNAVAILABLE.

use tandem_domain::ValidationError;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("storage failure")]
    Store(#[from] tandem_store::StoreError),
    #[error("database failure")]
    Database(#[from] sqlx::Error),
    #[error("stored response could not be decoded")]
    CorruptResponse(#[from] prost::DecodeError),
}

impl From<GatewayError> for Status {
    fn from(error: GatewayError) -> Self {
        match error {
            GatewayError::Invalid(error) => Status::invalid_argument(error.to_string()),
            GatewayError::Unauthenticated(message) => Status::unauthenticated(message),
            GatewayError::PermissionDenied(message) => Status::permission_denied(message),
            GatewayError::AlreadyExists(message) => Status::already_exists(message),
            GatewayError::FailedPrecondition(message) => Status::failed_precondition(message),
            GatewayError::Unavailable(message) => Status::unavailable(message),
            internal @ (GatewayError::Store(_)
            | GatewayError::Database(_)
            | GatewayError::CorruptResponse(_)) => {
                tracing::error!(error = %tandem_runtime::error_chain(&internal), "internal error");
                Status::new(
                    Code::Internal,
                    "internal error; nothing was recorded, so the request can be retried unchanged",
                )
            }
        }
    }
}
