//! Bulk calls (`RecordPurchases`, `RecordRefunds`): many items in one call and one transaction,
//! each item in its own savepoint with its own idempotency key and its own result. An item the
//! client got wrong is refused with its index and reason and the others are recorded; a failure
//! of Tandem's own parts fails the whole call and records nothing, so a retry of the same call is
//! always safe.

use sqlx::{Postgres, Transaction};
use tandem_domain::ValidationError;
use tandem_proto::v1 as pb;
use tonic::Status;

use crate::GatewayError;

/// The most items one bulk call takes.
pub const MAX_ITEMS: usize = 500;

/// One item's answer, and whether this call wrote it (false: a retry answered from the first
/// response).
pub struct Written<R> {
    pub response: R,
    pub fresh: bool,
}

pub fn check_size(field: &str, items: usize) -> Result<(), GatewayError> {
    if (1..=MAX_ITEMS).contains(&items) {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!("must hold 1 to {MAX_ITEMS} items, got {items}; split larger uploads into several calls"),
        )
        .into())
    }
}

/// An item's error, its field named under `field[index]`.
pub fn within(field: &str, index: usize, error: GatewayError) -> GatewayError {
    match error {
        GatewayError::Invalid(invalid) => {
            GatewayError::Invalid(invalid.within(&format!("{field}[{index}]")))
        }
        other => other,
    }
}

/// Ends an item's savepoint: released when the item was written, rolled back when the client got
/// the item wrong (the other items stay); any other failure fails the whole call.
pub async fn settle<R>(
    savepoint: Transaction<'_, Postgres>,
    written: Result<Written<R>, GatewayError>,
) -> Result<Result<Written<R>, GatewayError>, GatewayError> {
    match written {
        Ok(written) => {
            savepoint.commit().await?;
            Ok(Ok(written))
        }
        Err(refused) if refused.is_client_error() => {
            savepoint.rollback().await?;
            Ok(Err(refused))
        }
        Err(failure) => Err(failure),
    }
}

/// The items' results in request order, and how many this call wrote.
pub fn results<R, T>(
    outcomes: Vec<Result<Written<R>, GatewayError>>,
    make: impl Fn(u32, Result<R, pb::ItemError>) -> T,
) -> (Vec<T>, usize) {
    let mut fresh = 0;
    let results = outcomes
        .into_iter()
        .enumerate()
        .map(|(index, outcome)| {
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            match outcome {
                Ok(written) => {
                    fresh += usize::from(written.fresh);
                    make(index, Ok(written.response))
                }
                Err(refused) => {
                    let status = Status::from(refused);
                    make(
                        index,
                        Err(pb::ItemError {
                            code: status.code() as i32,
                            message: status.message().to_owned(),
                        }),
                    )
                }
            }
        })
        .collect();
    (results, fresh)
}
