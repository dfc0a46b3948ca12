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
}

pub(crate) fn endpoint_to_proto(row: &EndpointRow) -> pb::WebhookEndpoint {
    pb::WebhookEndpoint {
        endpoint_id: row.endpoint_id.clone(),
        url: row.url.clone(),
        types: row.types.clone(),
        description: row.description.clone(),
        enabled: row.enabled,
        created_at: Some(timestamp(row.created_at)),
    }
}

const ENDPOINT_COLUMNS: &str =
    "endpoint_id, url, types, description, enabled, created_at, signing_secret, request_digest";

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
