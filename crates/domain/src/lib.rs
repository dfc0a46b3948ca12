//! Tandem's domain model, free of I/O: identifiers, money and its one rounding rule, pseudonymous
//! customer keys, partnership terms, attribution and commission. Services parse raw input into
//! these types at their edge; nothing below the edge sees a raw string.

pub mod attribution;
pub mod commission;
pub mod customer;
pub mod error;
pub mod ids;
pub mod ledger;
pub mod loyalty;
pub mod money;
pub mod partnership;
pub mod payout;
pub mod settlement;
pub mod statement;
pub mod text;

pub use error::ValidationError;
