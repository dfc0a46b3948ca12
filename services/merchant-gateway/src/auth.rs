//! Authentication. Merchants send their API key and operators their token as
//! `authorization: Bearer <secret>` metadata. API keys are stored as SHA-256 hashes only.

use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tandem_domain::ids::MerchantId;
use tonic::metadata::MetadataMap;

use crate::GatewayError;

const API_KEY_PREFIX: &str = "tdm_";

/// A new API key: the prefix and 256 random bits in hex.
pub fn generate_api_key() -> String {
    let random = [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()];
    format!(
        "{API_KEY_PREFIX}{}{}",
        random[0].simple(),
        random[1].simple()
    )
}

pub fn api_key_sha256(api_key: &str) -> Vec<u8> {
    Sha256::digest(api_key.as_bytes()).to_vec()
}

pub(crate) fn bearer_token(metadata: &MetadataMap) -> Result<&str, GatewayError> {
    let value = metadata
        .get("authorization")
        .ok_or(GatewayError::Unauthenticated(
            "missing credentials: send `authorization: Bearer <key>` metadata",
        ))?;
    value
        .to_str()
        .ok()
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or(GatewayError::Unauthenticated(
            "malformed authorization metadata: expected `Bearer <key>`",
        ))
}

/// The merchant whose API key the request carries.
pub async fn authenticate_merchant(
    pool: &PgPool,
    metadata: &MetadataMap,
) -> Result<MerchantId, GatewayError> {
    Ok(crate::identifiers::authenticate_caller(pool, metadata)
        .await?
        .merchant)
}

/// Checks the operator token in constant time (`subtle`), over SHA-256 digests so that not even
/// the token's length shows in the timing.
pub fn authenticate_operator(metadata: &MetadataMap, expected: &str) -> Result<(), GatewayError> {
    use subtle::ConstantTimeEq as _;
    let token = bearer_token(metadata)?;
    let matches: bool = Sha256::digest(token.as_bytes())
        .as_slice()
        .ct_eq(Sha256::digest(expected.as_bytes()).as_slice())
        .into();
    if matches {
        Ok(())
    } else {
        Err(GatewayError::Unauthenticated(
            "operator token not recognised",
        ))
    }
}

/// A request may name the merchant it acts for; it must be the authenticated one.
pub fn check_acting_as(authenticated: &MerchantId, requested: &str) -> Result<(), GatewayError> {
    if requested.is_empty() || requested == authenticated.as_str() {
        Ok(())
    } else {
        Err(GatewayError::PermissionDenied(format!(
            "merchant_id {requested:?} is not the merchant this API key belongs to; a merchant can act only as itself"
        )))
    }
}
