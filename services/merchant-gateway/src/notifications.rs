//! The `tandem.v1.NotificationService`: a merchant's notifications as a stream, answered by the
//! notifications service on the authenticated merchant's behalf.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use futures::StreamExt;
use tandem_proto::v1 as pb;
use tandem_proto::v1::notification_service_server::NotificationService;
use tandem_proto::v1::notifications_client::NotificationsClient;
use tonic::{Code, Request, Response, Status};

use crate::auth::{authenticate_merchant, check_acting_as};
use crate::queries::{relay_status, traced};
use crate::State;

pub struct NotificationApi {
    pub state: Arc<State>,
    pub notifications: NotificationsClient<tandem_runtime::InternalChannel>,
    /// Open streams end when the gateway shuts down (subscribers reconnect with their cursor),
    /// so a graceful shutdown never waits for them.
    pub shutdown: tokio_util::sync::CancellationToken,
}

#[tonic::async_trait]
impl NotificationService for NotificationApi {
    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::Notification, Status>> + Send>>;

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id))]
    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        tandem_runtime::link_request_span(&request);
        let merchant_id = self
            .caller(&request, &request.get_ref().merchant_id)
            .await?;
        let message = pb::SubscribeRequest {
            merchant_id,
            ..request.into_inner()
        };
        let answer = self.notifications.clone().subscribe(traced(message)).await;
        let stream = relay_status(
            "notifications",
            answer.map(|r| Response::new(r.into_inner())),
        )?;
        // A failure mid-stream: the merchant reconnects with its cursor.
        let stream = stream.map(|item| {
            item.map_err(|status| match status.code() {
                Code::InvalidArgument => status,
                _ => Status::unavailable(
                    "the notification stream was interrupted; reconnect with the cursor of the last notification you processed",
                ),
            })
        });
        let stream = stream.take_until(self.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(stream)))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id))]
    async fn create_webhook_endpoint(
        &self,
        request: Request<pb::CreateWebhookEndpointRequest>,
    ) -> Result<Response<pb::CreateWebhookEndpointResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        let merchant_id = self
            .caller(&request, &request.get_ref().merchant_id)
            .await?;
        let message = pb::CreateWebhookEndpointRequest {
            merchant_id,
            ..request.into_inner()
        };
        let answer = self
            .notifications
            .clone()
            .create_webhook_endpoint(traced(message))
            .await;
        Ok(Response::new(relay_status("notifications", answer)?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id))]
    async fn list_webhook_endpoints(
        &self,
        request: Request<pb::ListWebhookEndpointsRequest>,
    ) -> Result<Response<pb::ListWebhookEndpointsResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        let merchant_id = self
            .caller(&request, &request.get_ref().merchant_id)
            .await?;
        let answer = self
            .notifications
            .clone()
            .list_webhook_endpoints(traced(pb::ListWebhookEndpointsRequest { merchant_id }))
            .await;
        Ok(Response::new(relay_status("notifications", answer)?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id))]
    async fn list_webhook_deliveries(
        &self,
        request: Request<pb::ListWebhookDeliveriesRequest>,
    ) -> Result<Response<pb::ListWebhookDeliveriesResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        let merchant_id = self
            .caller(&request, &request.get_ref().merchant_id)
            .await?;
        let message = pb::ListWebhookDeliveriesRequest {
            merchant_id,
            ..request.into_inner()
        };
        let answer = self
            .notifications
            .clone()
            .list_webhook_deliveries(traced(message))
            .await;
        Ok(Response::new(relay_status("notifications", answer)?))
    }
    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id, endpoint_id = %tandem_domain::text::loggable_id(&request.get_ref().endpoint_id)))]
    async fn rotate_webhook_secret(
        &self,
        request: Request<pb::RotateWebhookSecretRequest>,
    ) -> Result<Response<pb::RotateWebhookSecretResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        let merchant_id = self
            .caller(&request, &request.get_ref().merchant_id)
            .await?;
        let message = pb::RotateWebhookSecretRequest {
            merchant_id,
            ..request.into_inner()
        };
        let answer = self
            .notifications
            .clone()
            .rotate_webhook_secret(traced(message))
            .await;
        Ok(Response::new(relay_status("notifications", answer)?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id, endpoint_id = %tandem_domain::text::loggable_id(&request.get_ref().endpoint_id)))]
    async fn set_webhook_endpoint_enabled(
        &self,
        request: Request<pb::SetWebhookEndpointEnabledRequest>,
    ) -> Result<Response<pb::WebhookEndpoint>, Status> {
        tandem_runtime::link_request_span(&request);
        let merchant_id = self
            .caller(&request, &request.get_ref().merchant_id)
            .await?;
        let message = pb::SetWebhookEndpointEnabledRequest {
            merchant_id,
            ..request.into_inner()
        };
        let answer = self
            .notifications
            .clone()
            .set_webhook_endpoint_enabled(traced(message))
            .await;
        Ok(Response::new(relay_status("notifications", answer)?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id, endpoint_id = %tandem_domain::text::loggable_id(&request.get_ref().endpoint_id)))]
    async fn redeliver_webhook(
        &self,
        request: Request<pb::RedeliverWebhookRequest>,
    ) -> Result<Response<pb::WebhookDelivery>, Status> {
        tandem_runtime::link_request_span(&request);
        let merchant_id = self
            .caller(&request, &request.get_ref().merchant_id)
            .await?;
        let message = pb::RedeliverWebhookRequest {
            merchant_id,
            ..request.into_inner()
        };
        let answer = self
            .notifications
            .clone()
            .redeliver_webhook(traced(message))
            .await;
        Ok(Response::new(relay_status("notifications", answer)?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id, endpoint_id = %tandem_domain::text::loggable_id(&request.get_ref().endpoint_id)))]
    async fn send_test_webhook(
        &self,
        request: Request<pb::SendTestWebhookRequest>,
    ) -> Result<Response<pb::WebhookDelivery>, Status> {
        tandem_runtime::link_request_span(&request);
        let merchant_id = self
            .caller(&request, &request.get_ref().merchant_id)
            .await?;
        let message = pb::SendTestWebhookRequest {
            merchant_id,
            ..request.into_inner()
        };
        let answer = self
            .notifications
            .clone()
            .send_test_webhook(traced(message))
            .await;
        Ok(Response::new(relay_status("notifications", answer)?))
    }

    #[tracing::instrument(skip_all, fields(trace_id = tracing::field::Empty, merchant_id, endpoint_id = %tandem_domain::text::loggable_id(&request.get_ref().endpoint_id)))]
    async fn replay_webhooks(
        &self,
        request: Request<pb::ReplayWebhooksRequest>,
    ) -> Result<Response<pb::ReplayWebhooksResponse>, Status> {
        tandem_runtime::link_request_span(&request);
        let merchant_id = self
            .caller(&request, &request.get_ref().merchant_id)
            .await?;
        let message = pb::ReplayWebhooksRequest {
            merchant_id,
            ..request.into_inner()
        };
        let answer = self
            .notifications
            .clone()
            .replay_webhooks(traced(message))
            .await;
        Ok(Response::new(relay_status("notifications", answer)?))
    }
}

impl NotificationApi {
    /// The authenticated merchant, checked against the `merchant_id` the request names.
    async fn caller<T>(&self, request: &Request<T>, named: &str) -> Result<String, Status> {
        let merchant = authenticate_merchant(&self.state.pool, request.metadata()).await?;
        tracing::Span::current().record("merchant_id", merchant.as_str());
        check_acting_as(&merchant, named)?;
        Ok(merchant.to_string())
    }
}
