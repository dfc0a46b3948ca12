//! The one error type for input that fails validation: it names the offending field and says
//! what a valid value looks like, so that the gateway can pass it to the client unchanged.

/// Input that does not satisfy the domain's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    /// Path of the offending field in the request, e.g. `customer.phone`.
    pub field: String,
    /// What is wrong and what a valid value looks like.
    pub reason: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error, reported under a parent field, e.g. `phone` becomes `customer.phone`.
    #[must_use]
    pub fn within(self, parent: &str) -> Self {
        Self {
            field: format!("{parent}.{}", self.field),
            reason: self.reason,
        }
    }
}
