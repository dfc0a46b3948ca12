//! Merchants' API keys: several valid at once (rotation), each revocable, stored as SHA-256
//! hashes only. A key's secret is shown in the answer that created it and never again.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use tandem_domain::ids::{ApiKeyId, MerchantId};
use tandem_proto::v1 as pb;

use crate::auth::{api_key_sha256, generate_api_key};
use crate::GatewayError;

/// A new key for `merchant`, written in the caller's transaction: its id and its secret.
pub async fn insert_key(
    connection: &mut PgConnection,
    merchant: &MerchantId,
    now: DateTime<Utc>,
) -> Result<(pb::ApiKey, String), GatewayError> {
    let key_id = ApiKeyId::generate();
    let secret = generate_api_key();
    let hint: String = secret.chars().take(8).collect();
    sqlx::query(
        "INSERT INTO api_keys (key_id, merchant_id, sha256, hint, created_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(key_id.as_str())
    .bind(merchant.as_str())
    .bind(api_key_sha256(&secret))
    .bind(&hint)
    .bind(now)
    .execute(&mut *connection)
    .await?;
    Ok((
        pb::ApiKey {
            key_id: key_id.to_string(),
            merchant_id: merchant.to_string(),
            hint,
            created_at: Some(tandem_proto::time::timestamp(now)),
            revoked_at: None,
        },
        secret,
    ))
}

type KeyRow = (String, String, String, DateTime<Utc>, Option<DateTime<Utc>>);

fn to_proto((key_id, merchant_id, hint, created_at, revoked_at): KeyRow) -> pb::ApiKey {
    pb::ApiKey {
        key_id,
        merchant_id,
        hint,
        created_at: Some(tandem_proto::time::timestamp(created_at)),
        revoked_at: revoked_at.map(tandem_proto::time::timestamp),
    }
}

/// Revokes `key` of `merchant` (at once: every call authenticates against the table). A
/// revoked key answers as it is; a key of another merchant is NOT_FOUND, like an unknown one.
pub async fn revoke(
    connection: &mut PgConnection,
    merchant: &MerchantId,
    key: &ApiKeyId,
    now: DateTime<Utc>,
) -> Result<pb::ApiKey, GatewayError> {
    let row: Option<KeyRow> = sqlx::query_as(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $3) \
         WHERE key_id = $1 AND merchant_id = $2 \
         RETURNING key_id, merchant_id, hint, created_at, revoked_at",
    )
    .bind(key.as_str())
    .bind(merchant.as_str())
    .bind(now)
    .fetch_optional(&mut *connection)
    .await?;
    row.map(to_proto)
        .ok_or_else(|| GatewayError::NotFound(format!("merchant {merchant} has no API key {key}")))
}

/// Every key of `merchant`, oldest first; NOT_FOUND if the merchant is not registered.
pub async fn list(
    connection: &mut PgConnection,
    merchant: &MerchantId,
) -> Result<Vec<pb::ApiKey>, GatewayError> {
    require_merchant(connection, merchant).await?;
    let rows: Vec<KeyRow> = sqlx::query_as(
        "SELECT key_id, merchant_id, hint, created_at, revoked_at FROM api_keys \
         WHERE merchant_id = $1 ORDER BY created_at, key_id",
    )
    .bind(merchant.as_str())
    .fetch_all(&mut *connection)
    .await?;
    Ok(rows.into_iter().map(to_proto).collect())
}

pub async fn require_merchant(
    connection: &mut PgConnection,
    merchant: &MerchantId,
) -> Result<(), GatewayError> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM merchants WHERE merchant_id = $1)")
            .bind(merchant.as_str())
            .fetch_one(&mut *connection)
            .await?;
    if exists {
        Ok(())
    } else {
        Err(GatewayError::NotFound(format!(
            "merchant {merchant} is not registered"
        )))
    }
}
