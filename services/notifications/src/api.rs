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
}
