//! The internal gRPC API: a merchant's notifications as a stream, from a cursor, then live.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tandem_domain::ids::MerchantId;
use tandem_proto::v1 as pb;
use tandem_proto::v1::notifications_server::Notifications;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Notifications read from Postgres at a time.
const PAGE: i64 = 500;
/// How long a caught-up stream waits before looking again without being woken (another
/// instance's intake wakes nobody here).
const IDLE_POLL: Duration = Duration::from_millis(500);

pub struct NotificationsApi {
    pub pool: PgPool,
    pub written: Arc<Notify>,
    pub shutdown: CancellationToken,
    pub allow_private: bool,
    /// Rung when deliveries are queued (a redelivery, a replay): the worker looks at once.
    pub queued: Arc<Notify>,
}

fn merchant_of(value: &str) -> Result<MerchantId, Status> {
    MerchantId::parse("merchant_id", value).map_err(|e| Status::invalid_argument(e.to_string()))
}

impl From<crate::NotificationsError> for Status {
    fn from(error: crate::NotificationsError) -> Self {
        tracing::warn!(error = %tandem_runtime::error_chain(&error), "notifications storage failed");
        Status::unavailable("notifications storage is unavailable; retry shortly")
    }
}

/// A type filter entry: lower-case letters and dots, e.g. `purchase.attributed`.
fn valid_type(kind: &str) -> bool {
    !kind.is_empty()
        && kind.len() <= 64
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'.' || b == b'_')
}

#[derive(sqlx::FromRow)]
struct Row {
    cursor: i64,
    notification_id: uuid::Uuid,
    #[sqlx(rename = "type")]
    kind: String,
    occurred_at: DateTime<Utc>,
    payload: String,
}

#[tonic::async_trait]
impl Notifications for NotificationsApi {
    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::Notification, Status>> + Send>>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let request = request.into_inner();
        let merchant = MerchantId::parse("merchant_id", &request.merchant_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut after = i64::try_from(request.after_cursor).map_err(|_| {
            Status::invalid_argument("after_cursor: out of range; send the cursor of the last notification you processed")
        })?;
        if let Some(bad) = request.types.iter().find(|t| !valid_type(t)) {
            return Err(Status::invalid_argument(format!(
                "types: {bad:?} is not a notification type; use names such as purchase.attributed (docs/NOTIFICATIONS.md)"
            )));
        }
        let types = request.types;
        let (sender, receiver) = mpsc::channel(64);
        let pool = self.pool.clone();
        let written = self.written.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                // Registered before reading, so a commit between the read and the wait wakes it.
                let woken = written.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                let rows: Result<Vec<Row>, sqlx::Error> = sqlx::query_as(
                    "SELECT cursor, notification_id, type, occurred_at, payload FROM notifications \
                     WHERE merchant_id = $1 AND cursor > $2 AND (cardinality($3::text[]) = 0 OR type = ANY($3)) \
                     ORDER BY cursor LIMIT $4",
                )
                .bind(merchant.as_str())
                .bind(after)
                .bind(&types)
                .bind(PAGE)
                .fetch_all(&pool)
                .await;
                let rows = match rows {
                    Ok(rows) => rows,
                    Err(error) => {
                        tracing::warn!(error = %error, "reading notifications failed; the stream ends");
                        let _ = sender
                            .send(Err(Status::unavailable(
                                "notifications are unavailable; reconnect with the cursor of the last notification you processed",
                            )))
                            .await;
                        return;
                    }
                };
                let full = rows.len() as i64 == PAGE;
                for row in rows {
                    after = row.cursor;
                    let notification = pb::Notification {
                        cursor: u64::try_from(row.cursor).unwrap_or(0),
                        id: row.notification_id.to_string(),
                        r#type: row.kind,
                        occurred_at: Some(tandem_proto::time::timestamp(row.occurred_at)),
                        payload_json: row.payload,
                    };
                    if sender.send(Ok(notification)).await.is_err() {
                        return; // the subscriber hung up
                    }
                }
                if full {
                    continue;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = sender.closed() => return,
                    () = &mut woken => {}
                    () = tokio::time::sleep(IDLE_POLL) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn create_webhook_endpoint(
        &self,
        request: Request<pb::CreateWebhookEndpointRequest>,
    ) -> Result<Response<pb::CreateWebhookEndpointResponse>, Status> {
        let request = request.into_inner();
        let merchant = MerchantId::parse("merchant_id", &request.merchant_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let created =
            crate::endpoints::create(&self.pool, merchant.as_str(), &request, self.allow_private)
                .await?;
        Ok(Response::new(created))
    }

    async fn list_webhook_endpoints(
        &self,
        request: Request<pb::ListWebhookEndpointsRequest>,
    ) -> Result<Response<pb::ListWebhookEndpointsResponse>, Status> {
        let merchant = MerchantId::parse("merchant_id", &request.get_ref().merchant_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::ListWebhookEndpointsResponse {
            endpoints: crate::endpoints::list(&self.pool, merchant.as_str()).await?,
        }))
    }

    async fn list_webhook_deliveries(
        &self,
        request: Request<pb::ListWebhookDeliveriesRequest>,
    ) -> Result<Response<pb::ListWebhookDeliveriesResponse>, Status> {
        let request = request.into_inner();
        let merchant = MerchantId::parse("merchant_id", &request.merchant_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let owner: Option<String> =
            sqlx::query_scalar("SELECT merchant_id FROM webhook_endpoints WHERE endpoint_id = $1")
                .bind(&request.endpoint_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(crate::NotificationsError::from)?;
        if owner.as_deref() != Some(merchant.as_str()) {
            return Err(Status::not_found(format!(
                "you have no webhook endpoint {:?}; ListWebhookEndpoints shows yours",
                request.endpoint_id
            )));
        }
        let limit = match request.page_size {
            0 => 100,
            size if size <= 500 => i64::from(size),
            size => {
                return Err(Status::invalid_argument(format!(
                    "page_size: must be at most 500, got {size}"
                )))
            }
        };
        let offset = if request.page_token.is_empty() {
            0
        } else {
            request
                .page_token
                .strip_prefix("v1.")
                .and_then(|n| n.parse::<i64>().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    Status::invalid_argument("page_token: not a token this API issued")
                })?
        };
        let deliveries =
            crate::delivery::list(&self.pool, &request.endpoint_id, None, offset, limit).await?;
        let next_page_token = if deliveries.len() as i64 == limit {
            format!("v1.{}", offset + limit)
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListWebhookDeliveriesResponse {
            deliveries,
            next_page_token,
        }))
    }

    async fn rotate_webhook_secret(
        &self,
        request: Request<pb::RotateWebhookSecretRequest>,
    ) -> Result<Response<pb::RotateWebhookSecretResponse>, Status> {
        let request = request.into_inner();
        let merchant = merchant_of(&request.merchant_id)?;
        Ok(Response::new(
            crate::endpoints::rotate(&self.pool, merchant.as_str(), &request).await?,
        ))
    }

    async fn set_webhook_endpoint_enabled(
        &self,
        request: Request<pb::SetWebhookEndpointEnabledRequest>,
    ) -> Result<Response<pb::WebhookEndpoint>, Status> {
        let request = request.into_inner();
        let merchant = merchant_of(&request.merchant_id)?;
        let endpoint = crate::endpoints::set_enabled(
            &self.pool,
            merchant.as_str(),
            &request.endpoint_id,
            request.enabled,
        )
        .await?;
        if request.enabled {
            self.queued.notify_waiters();
        }
        Ok(Response::new(endpoint))
    }

    async fn redeliver_webhook(
        &self,
        request: Request<pb::RedeliverWebhookRequest>,
    ) -> Result<Response<pb::WebhookDelivery>, Status> {
        let request = request.into_inner();
        let merchant = merchant_of(&request.merchant_id)?;
        crate::endpoints::redeliver(&self.pool, merchant.as_str(), &request).await?;
        self.queued.notify_waiters();
        let id = uuid::Uuid::parse_str(&request.notification_id)
            .map_err(|_| Status::invalid_argument("notification_id: must be a UUID"))?;
        let delivery = crate::delivery::list(&self.pool, &request.endpoint_id, Some(id), 0, 1)
            .await?
            .pop()
            .ok_or_else(|| Status::not_found("the delivery is gone"))?;
        Ok(Response::new(delivery))
    }

    async fn replay_webhooks(
        &self,
        request: Request<pb::ReplayWebhooksRequest>,
    ) -> Result<Response<pb::ReplayWebhooksResponse>, Status> {
        let request = request.into_inner();
        let merchant = merchant_of(&request.merchant_id)?;
        let queued = crate::endpoints::replay(&self.pool, merchant.as_str(), &request).await?;
        self.queued.notify_waiters();
        tracing::info!(endpoint_id = %request.endpoint_id, queued, "webhooks replayed");
        Ok(Response::new(pb::ReplayWebhooksResponse { queued }))
    }

    async fn send_test_webhook(
        &self,
        request: Request<pb::SendTestWebhookRequest>,
    ) -> Result<Response<pb::WebhookDelivery>, Status> {
        let request = request.into_inner();
        let merchant = merchant_of(&request.merchant_id)?;
        let id = crate::endpoints::send_test(&self.pool, merchant.as_str(), &request).await?;
        self.queued.notify_waiters();
        tracing::info!(endpoint_id = %request.endpoint_id, notification_id = %id, "test webhook queued");
        let delivery = crate::delivery::list(&self.pool, &request.endpoint_id, Some(id), 0, 1)
            .await?
            .pop()
            .ok_or_else(|| Status::not_found("the test delivery is gone"))?;
        Ok(Response::new(delivery))
    }
}
