//! Webhook endpoints: registration (with the URL checked against private addresses), listing,
//! and the fan-out of new notifications into the delivery queue.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use tandem_proto::time::timestamp;
use tandem_proto::v1 as pb;
use tonic::Status;

use crate::webhook::SigningSecret;
use crate::NotificationsError;

/// Whether an address is one a webhook may not reach unless the deployment allows it:
/// loopback, private, link-local, unspecified, shared (carrier-grade NAT), multicast or
/// broadcast, and their IPv4-mapped IPv6 forms.
pub fn is_private(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || (a == 100 && (64..128).contains(&b))
                || a == 0
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
    }
}

/// Checks a webhook URL: https (http only when private addresses are allowed, for local
/// development), a host, at most 2 048 characters, and every address it resolves to public
/// unless `allow_private`. `Err` is the message for the merchant.
pub async fn check_url(url: &str, allow_private: bool) -> Result<hyper::Uri, String> {
    if url.is_empty() || url.len() > 2048 {
        return Err("url: must be 1 to 2048 characters".into());
    }
    let uri: hyper::Uri = url
        .parse()
        .map_err(|_| format!("url: {url:?} is not a URL; use https://host/path"))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if allow_private => {}
        _ => return Err("url: must start with https://".into()),
    }
    let host = uri
        .host()
        .ok_or("url: has no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let addresses: Vec<IpAddr> = match host.parse::<IpAddr>() {
        Ok(address) => vec![address],
        Err(_) => tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|_| format!("url: the host {host:?} does not resolve"))?
            .map(|socket| socket.ip())
            .collect(),
    };
    if !allow_private {
        if let Some(private) = addresses.iter().find(|a| is_private(**a)) {
            return Err(format!(
                "url: {host:?} reaches {private}, a private, loopback or link-local address; webhooks go to public addresses"
            ));
        }
    }
    Ok(uri)
}

#[derive(sqlx::FromRow)]
pub(crate) struct EndpointRow {
    pub endpoint_id: String,
    pub url: String,
    pub types: Vec<String>,
    pub description: String,
    pub enabled: bool,
    pub created_at: DateTime<Utc>,
    pub signing_secret: String,
    pub request_digest: String,
    pub disabled_reason: String,
    pub failing_since: Option<DateTime<Utc>>,
}

pub(crate) fn endpoint_to_proto(row: &EndpointRow) -> pb::WebhookEndpoint {
    pb::WebhookEndpoint {
        endpoint_id: row.endpoint_id.clone(),
        url: row.url.clone(),
        types: row.types.clone(),
        description: row.description.clone(),
        enabled: row.enabled,
        created_at: Some(timestamp(row.created_at)),
        disabled_reason: row.disabled_reason.clone(),
        failing_since: row.failing_since.map(timestamp),
    }
}

const ENDPOINT_COLUMNS: &str =
    "endpoint_id, url, types, description, enabled, created_at, signing_secret, \
    request_digest, disabled_reason, failing_since";

/// Registers an endpoint for `merchant` (validated request), or answers the one this key
/// registered.
pub(crate) async fn create(
    pool: &PgPool,
    merchant: &str,
    request: &pb::CreateWebhookEndpointRequest,
    allow_private: bool,
) -> Result<pb::CreateWebhookEndpointResponse, Status> {
    let key = tandem_domain::text::parse_token("idempotency_key", &request.idempotency_key, 1, 128)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let description = if request.description.trim().is_empty() {
        String::new()
    } else {
        tandem_domain::text::parse_token("description", &request.description, 1, 200)
            .map_err(|e| Status::invalid_argument(e.to_string()))?
    };
    let mut types = request.types.clone();
    types.sort();
    types.dedup();
    if let Some(bad) = types
        .iter()
        .find(|t| !crate::intake::TYPES.contains(&t.as_str()))
    {
        return Err(Status::invalid_argument(format!(
            "types: {bad:?} is not a notification type; use {}",
            crate::intake::TYPES.join(", ")
        )));
    }
    let uri = check_url(request.url.trim(), allow_private)
        .await
        .map_err(Status::invalid_argument)?;
    let url = uri.to_string();
    let digest = hex::encode(Sha256::digest(
        format!("{url}\n{}\n{description}", types.join(",")).as_bytes(),
    ));
    let existing: Option<EndpointRow> = sqlx::query_as(&format!(
        "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE merchant_id = $1 AND idempotency_key = $2"
    ))
    .bind(merchant)
    .bind(&key)
    .fetch_optional(pool)
    .await
    .map_err(NotificationsError::from)?;
    let row = match existing {
        Some(row) if row.request_digest == digest => row,
        Some(_) => {
            return Err(Status::already_exists(format!(
                "idempotency_key {key:?} registered another endpoint; send a new key for a new endpoint"
            )))
        }
        None => {
            let secret = SigningSecret::generate();
            let endpoint_id = format!("whe_{}", uuid::Uuid::now_v7().simple());
            let inserted: Option<EndpointRow> = sqlx::query_as(&format!(
                "INSERT INTO webhook_endpoints (endpoint_id, merchant_id, idempotency_key, request_digest, url, types, \
                   description, signing_secret, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (merchant_id, idempotency_key) DO NOTHING RETURNING {ENDPOINT_COLUMNS}"
            ))
            .bind(&endpoint_id)
            .bind(merchant)
            .bind(&key)
            .bind(&digest)
            .bind(&url)
            .bind(&types)
            .bind(&description)
            .bind(secret.expose())
            .bind(tandem_proto::time::truncate_to_micros(Utc::now()))
            .fetch_optional(pool)
            .await
            .map_err(NotificationsError::from)?;
            match inserted {
                Some(row) => row,
                // A concurrent retry registered it first.
                None => {
                    return Box::pin(create(pool, merchant, request, allow_private)).await;
                }
            }
        }
    };
    Ok(pb::CreateWebhookEndpointResponse {
        endpoint: Some(endpoint_to_proto(&row)),
        signing_secret: row.signing_secret.clone(),
    })
}

pub(crate) async fn list(
    pool: &PgPool,
    merchant: &str,
) -> Result<Vec<pb::WebhookEndpoint>, NotificationsError> {
    let rows: Vec<EndpointRow> = sqlx::query_as(&format!(
        "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE merchant_id = $1 ORDER BY created_at, endpoint_id"
    ))
    .bind(merchant)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(endpoint_to_proto).collect())
}

/// The caller's endpoint, or NOT_FOUND.
pub(crate) async fn owned(
    pool: &PgPool,
    merchant: &str,
    endpoint_id: &str,
) -> Result<EndpointRow, Status> {
    let row: Option<EndpointRow> = sqlx::query_as(&format!(
        "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE endpoint_id = $1 AND merchant_id = $2"
    ))
    .bind(endpoint_id)
    .bind(merchant)
    .fetch_optional(pool)
    .await
    .map_err(NotificationsError::from)?;
    row.ok_or_else(|| {
        Status::not_found(format!(
            "you have no webhook endpoint {endpoint_id:?}; ListWebhookEndpoints shows yours"
        ))
    })
}

/// A new secret; the previous one signs too for `overlap_hours` (0: 24, at most 168).
pub(crate) async fn rotate(
    pool: &PgPool,
    merchant: &str,
    request: &pb::RotateWebhookSecretRequest,
) -> Result<pb::RotateWebhookSecretResponse, Status> {
    let hours = match request.overlap_hours {
        0 => 24,
        hours if hours <= 168 => hours,
        hours => {
            return Err(Status::invalid_argument(format!(
                "overlap_hours: must be at most 168 (a week), got {hours}"
            )))
        }
    };
    owned(pool, merchant, &request.endpoint_id).await?;
    let secret = SigningSecret::generate();
    let expires: DateTime<Utc> = sqlx::query_scalar(
        "UPDATE webhook_endpoints SET previous_signing_secret = signing_secret, \
           previous_expires_at = now() + $3 * interval '1 hour', signing_secret = $4 \
         WHERE endpoint_id = $1 AND merchant_id = $2 RETURNING previous_expires_at",
    )
    .bind(&request.endpoint_id)
    .bind(merchant)
    .bind(f64::from(hours))
    .bind(secret.expose())
    .fetch_one(pool)
    .await
    .map_err(NotificationsError::from)?;
    tracing::info!(endpoint_id = %request.endpoint_id, overlap_hours = hours, "webhook secret rotated");
    Ok(pb::RotateWebhookSecretResponse {
        signing_secret: secret.expose(),
        previous_secret_expires_at: Some(timestamp(expires)),
    })
}

/// Enables or disables the caller's endpoint.
pub(crate) async fn set_enabled(
    pool: &PgPool,
    merchant: &str,
    endpoint_id: &str,
    enabled: bool,
) -> Result<pb::WebhookEndpoint, Status> {
    owned(pool, merchant, endpoint_id).await?;
    let row: EndpointRow = sqlx::query_as(&format!(
        "UPDATE webhook_endpoints SET enabled = $3, \
           disabled_reason = CASE WHEN $3 THEN '' ELSE 'disabled by the merchant' END, \
           failing_since = CASE WHEN $3 THEN NULL ELSE failing_since END \
         WHERE endpoint_id = $1 AND merchant_id = $2 RETURNING {ENDPOINT_COLUMNS}"
    ))
    .bind(endpoint_id)
    .bind(merchant)
    .bind(enabled)
    .fetch_one(pool)
    .await
    .map_err(NotificationsError::from)?;
    Ok(endpoint_to_proto(&row))
}

/// Queues one notification for the caller's endpoint again, with a new round of retries.
pub(crate) async fn redeliver(
    pool: &PgPool,
    merchant: &str,
    request: &pb::RedeliverWebhookRequest,
) -> Result<(), Status> {
    owned(pool, merchant, &request.endpoint_id).await?;
    let id = uuid::Uuid::parse_str(&request.notification_id).map_err(|_| {
        Status::invalid_argument("notification_id: must be a notification id (a UUID)")
    })?;
    let updated = sqlx::query(
        "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = now(), round_start = attempts, \
           leased_until = NULL WHERE endpoint_id = $1 AND notification_id = $2",
    )
    .bind(&request.endpoint_id)
    .bind(id)
    .execute(pool)
    .await
    .map_err(NotificationsError::from)?
    .rows_affected();
    if updated == 0 {
        return Err(Status::not_found(format!(
            "endpoint {} has no delivery of notification {}; ListWebhookDeliveries shows them (ReplayWebhooks sends older ones)",
            request.endpoint_id, request.notification_id
        )));
    }
    Ok(())
}

/// Queues every notification of the endpoint's types since `since` for it again.
pub(crate) async fn replay(
    pool: &PgPool,
    merchant: &str,
    request: &pb::ReplayWebhooksRequest,
) -> Result<u64, Status> {
    let endpoint = owned(pool, merchant, &request.endpoint_id).await?;
    let since = request
        .since
        .as_ref()
        .and_then(tandem_proto::time::datetime)
        .filter(|since| *since >= Utc::now() - chrono::Duration::days(90))
        .ok_or_else(|| {
            Status::invalid_argument("since: must be an instant within the last 90 days")
        })?;
    if !endpoint.enabled {
        return Err(Status::failed_precondition(
            "the endpoint is disabled; enable it first (SetWebhookEndpointEnabled), then replay",
        ));
    }
    let queued = sqlx::query(
        "INSERT INTO webhook_deliveries (endpoint_id, notification_id, merchant_id, cursor, next_attempt_at) \
         SELECT $1, n.notification_id, n.merchant_id, n.cursor, now() FROM notifications n \
         WHERE n.merchant_id = $2 AND n.occurred_at >= $3 AND (cardinality($4::text[]) = 0 OR n.type = ANY($4)) \
         ON CONFLICT (endpoint_id, notification_id) DO UPDATE SET status = 'pending', next_attempt_at = now(), \
           round_start = webhook_deliveries.attempts, leased_until = NULL",
    )
    .bind(&request.endpoint_id)
    .bind(merchant)
    .bind(since)
    .bind(&endpoint.types)
    .execute(pool)
    .await
    .map_err(NotificationsError::from)?
    .rows_affected();
    Ok(queued)
}

/// Queues a `webhook.test` delivery to the caller's endpoint (enabled), once per idempotency
/// key. Returns its notification id.
pub(crate) async fn send_test(
    pool: &PgPool,
    merchant: &str,
    request: &pb::SendTestWebhookRequest,
) -> Result<uuid::Uuid, Status> {
    let key = tandem_domain::text::parse_token("idempotency_key", &request.idempotency_key, 1, 128)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let endpoint = owned(pool, merchant, &request.endpoint_id).await?;
    if !endpoint.enabled {
        return Err(Status::failed_precondition(
            "the endpoint is disabled; enable it first (SetWebhookEndpointEnabled), then send a test",
        ));
    }
    // The id derives from the endpoint and the key: a retried call finds the same message.
    let digest = Sha256::digest(format!("test/{}/{key}", endpoint.endpoint_id).as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    let id = uuid::Builder::from_custom_bytes(bytes).into_uuid();
    let now = tandem_proto::time::truncate_to_micros(Utc::now());
    let payload = serde_json::json!({
        "id": id.to_string(),
        "type": "webhook.test",
        "version": crate::intake::PAYLOAD_VERSION,
        "timestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "merchant_id": merchant,
        "data": {
            "endpoint_id": endpoint.endpoint_id,
            "url": endpoint.url,
            "message": "a test delivery from Tandem; it carries no business event",
        },
    });
    let mut tx = pool.begin().await.map_err(NotificationsError::from)?;
    let inserted = sqlx::query(
        "INSERT INTO webhook_test_messages (notification_id, endpoint_id, merchant_id, idempotency_key, payload, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
    )
    .bind(id)
    .bind(&endpoint.endpoint_id)
    .bind(merchant)
    .bind(&key)
    .bind(payload.to_string())
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(NotificationsError::from)?
    .rows_affected();
    if inserted == 1 {
        sqlx::query(
            "INSERT INTO webhook_deliveries (endpoint_id, notification_id, merchant_id, cursor, next_attempt_at) \
             VALUES ($1, $2, $3, coalesce((SELECT last_cursor FROM merchant_cursors WHERE merchant_id = $3), 0), now())",
        )
        .bind(&endpoint.endpoint_id)
        .bind(id)
        .bind(merchant)
        .execute(&mut *tx)
        .await
        .map_err(NotificationsError::from)?;
    }
    tx.commit().await.map_err(NotificationsError::from)?;
    Ok(id)
}

/// Queues a delivery of each of `notifications` to every enabled endpoint of its merchant that
/// takes its type, in the caller's transaction.
pub(crate) async fn fan_out(
    tx: &mut PgConnection,
    notifications: &[uuid::Uuid],
) -> Result<u64, NotificationsError> {
    if notifications.is_empty() {
        return Ok(0);
    }
    Ok(sqlx::query(
        "INSERT INTO webhook_deliveries (endpoint_id, notification_id, merchant_id, cursor, next_attempt_at) \
         SELECT e.endpoint_id, n.notification_id, n.merchant_id, n.cursor, now() \
         FROM notifications n JOIN webhook_endpoints e ON e.merchant_id = n.merchant_id AND e.enabled \
           AND (cardinality(e.types) = 0 OR n.type = ANY(e.types)) \
         WHERE n.notification_id = ANY($1) ON CONFLICT DO NOTHING",
    )
    .bind(notifications)
    .execute(&mut *tx)
    .await?
    .rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_loopback_and_link_local_addresses_are_recognised() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(is_private(private.parse().unwrap()), "{private}");
        }
        for public in ["93.184.216.34", "8.8.8.8", "2606:4700::6810:84e5"] {
            assert!(!is_private(public.parse().unwrap()), "{public}");
        }
    }

    #[tokio::test]
    async fn urls_must_be_https_to_public_hosts_unless_allowed() {
        assert!(check_url("http://93.184.216.34/hook", false).await.is_err());
        assert!(check_url("https://127.0.0.1/hook", false)
            .await
            .unwrap_err()
            .contains("loopback"));
        assert!(check_url("https://[::1]:8443/hook", false).await.is_err());
        assert!(check_url("https://169.254.169.254/latest", false)
            .await
            .is_err());
        assert!(check_url("https://93.184.216.34/hook", false).await.is_ok());
        assert!(check_url("http://127.0.0.1:9000/hook", true).await.is_ok());
        assert!(check_url("ftp://example.com/", true).await.is_err());
        assert!(check_url("not a url", true).await.is_err());
    }
}
