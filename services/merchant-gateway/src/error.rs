//! The gateway's one error type and its mapping to gRPC statuses. Client mistakes get a precise
//! status and a message that says what to fix; internal failures are logged with their cause
//! chain and reach the client only as a generic INTERNAL or UNAVAILABLE.

use tandem_domain::commission::PartnershipError;
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
    NotFound(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unavailable(String),
    /// A client-caused status from the referral ledger, passed through unchanged.
    #[error("{}", .0.message())]
    Upstream(Status),
    #[error("stored event of {0} has no payload")]
    CorruptEvent(String),
    #[error("storage failure")]
    Store(#[from] tandem_store::StoreError),
    #[error("database failure")]
    Database(#[from] sqlx::Error),
    #[error("stored response could not be decoded")]
    CorruptResponse(#[from] prost::DecodeError),
    #[error("invariant broken: {0}")]
    Invariant(&'static str),
}

impl GatewayError {
    /// Whether the client caused it (a bulk call refuses that item and records the others), as
    /// opposed to a failure of Tandem's own parts (the whole call fails and nothing is recorded).
    pub fn is_client_error(&self) -> bool {
        match self {
            GatewayError::Invalid(_)
            | GatewayError::Unauthenticated(_)
            | GatewayError::PermissionDenied(_)
            | GatewayError::AlreadyExists(_)
            | GatewayError::FailedPrecondition(_)
            | GatewayError::NotFound(_)
            | GatewayError::Aborted(_) => true,
            GatewayError::Upstream(status) => status.code() != Code::Unavailable,
            GatewayError::Unavailable(_)
            | GatewayError::CorruptEvent(_)
            | GatewayError::Store(_)
            | GatewayError::Database(_)
            | GatewayError::CorruptResponse(_)
            | GatewayError::Invariant(_) => false,
        }
    }
}

impl From<GatewayError> for Status {
    fn from(error: GatewayError) -> Self {
        match error {
            GatewayError::Invalid(error) => Status::invalid_argument(error.to_string()),
            GatewayError::Unauthenticated(message) => Status::unauthenticated(message),
            GatewayError::PermissionDenied(message) => Status::permission_denied(message),
            GatewayError::AlreadyExists(message) => Status::already_exists(message),
            GatewayError::FailedPrecondition(message) => Status::failed_precondition(message),
            GatewayError::NotFound(message) => Status::not_found(message),
            GatewayError::Aborted(message) => Status::aborted(message),
            GatewayError::Unavailable(message) => Status::unavailable(message),
            GatewayError::Upstream(status) => status,
            GatewayError::Database(error) if tandem_store::is_unreachable(&error) => {
                unreachable_status(&error)
            }
            GatewayError::Store(tandem_store::StoreError::Database(error))
                if tandem_store::is_unreachable(&error) =>
            {
                unreachable_status(&error)
            }
            internal @ (GatewayError::Store(_)
            | GatewayError::Invariant(_)
            | GatewayError::Database(_)
            | GatewayError::CorruptResponse(_)
            | GatewayError::CorruptEvent(_)) => {
                tracing::error!(error = %tandem_runtime::error_chain(&internal), "internal error");
                Status::new(
                    Code::Internal,
                    "internal error; nothing was recorded, so the request can be retried unchanged",
                )
            }
        }
    }
}

fn unreachable_status(error: &sqlx::Error) -> Status {
    tracing::warn!(error = %tandem_runtime::error_chain(error), "database unreachable");
    Status::unavailable(
        "the database is unreachable; nothing was recorded, so retry with the same idempotency key",
    )
}

impl From<PartnershipError> for GatewayError {
    fn from(error: PartnershipError) -> Self {
        match error {
            PartnershipError::InvalidTerms(invalid) => GatewayError::Invalid(invalid),
            PartnershipError::Retroactive { .. } => {
                GatewayError::Invalid(ValidationError::new("effective_from", error.to_string()))
            }
            PartnershipError::NotAParty(_) => GatewayError::PermissionDenied(error.to_string()),
            PartnershipError::NonPositiveRefund => GatewayError::Invalid(ValidationError::new(
                "amount.amount_minor",
                error.to_string(),
            )),
            PartnershipError::NotCreated
            | PartnershipError::PartiesChanged
            | PartnershipError::UnknownVersion(_)
            | PartnershipError::AlreadyAccepted(_)
            | PartnershipError::Superseded(_)
            | PartnershipError::OwnProposal
            | PartnershipError::Terminated(_)
            | PartnershipError::RefundExceedsPurchase { .. }
            | PartnershipError::RefundCurrency { .. } => {
                GatewayError::FailedPrecondition(error.to_string())
            }
        }
    }
}

#[cfg(test)]
mod unreachable_tests {
    use super::*;

    #[test]
    fn outages_are_unavailable_and_statement_failures_are_not() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(tandem_store::is_unreachable(&io));
        assert!(tandem_store::is_unreachable(&sqlx::Error::PoolTimedOut));
        assert_eq!(
            Status::from(GatewayError::Database(sqlx::Error::PoolTimedOut)).code(),
            Code::Unavailable
        );
        assert_eq!(
            Status::from(GatewayError::Store(tandem_store::StoreError::Database(
                sqlx::Error::PoolTimedOut
            )))
            .code(),
            Code::Unavailable
        );
        assert!(!tandem_store::is_unreachable(&sqlx::Error::RowNotFound));
        assert_eq!(
            Status::from(GatewayError::Database(sqlx::Error::RowNotFound)).code(),
            Code::Internal
        );
    }
}
