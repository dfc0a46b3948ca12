//! RED metrics for every gRPC call a service serves, as OpenTelemetry's RPC semantic conventions
//! name them: `rpc.server.call.duration` (a histogram in seconds; its count is the rate) with
//! `rpc.system` = `grpc`, `rpc.service`, `rpc.method` and `rpc.grpc.status_code` (errors are the
//! calls whose code is not 0).
//!
//! Each call (but health checks and reflection) also gets a server span named
//! `<service>/<method>` with the same `rpc.*` attributes, a child of the caller's trace when its
//! metadata carries `traceparent`; the handler's own span nests inside it.
//!
//! The call is measured until its response headers: the whole call for a unary RPC (tonic sends
//! an error as a trailers-only response, whose headers carry `grpc-status`; a success carries it
//! in the trailers, so headers without it mean 0), and until the stream opened for a streaming
//! one.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use opentelemetry::metrics::Histogram;
use opentelemetry::KeyValue;

/// Upper bounds of the duration buckets, in seconds: 1 ms to 10 s.
const BOUNDS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0,
];

#[derive(Clone)]
pub struct RpcMetricsLayer {
    duration: Histogram<f64>,
}

impl RpcMetricsLayer {
    pub fn new() -> Self {
        let duration = tandem_telemetry::meter()
            .f64_histogram("rpc.server.call.duration")
            .with_unit("s")
            .with_description("Duration of gRPC calls served, until their response headers; by service, method and status code.")
            .with_boundaries(BOUNDS.to_vec())
            .build();
        Self { duration }
    }
}

impl Default for RpcMetricsLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            duration: self.duration.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    duration: Histogram<f64>,
}

/// `/package.Service/Method` → (`package.Service`, `Method`).
fn split_path(path: &str) -> (String, String) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or_default();
    let method = parts.next().unwrap_or_default();
    if service.is_empty() || method.is_empty() || method.contains('/') {
        // Not a gRPC path: one bucket for all of them, not a label per path.
        return ("unknown".into(), "unknown".into());
    }
    (service.to_owned(), method.to_owned())
}

impl<S, B, R> tower_service::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    R: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (service, method) = split_path(request.uri().path());
        let started = Instant::now();
        let duration = self.duration.clone();
        let traced =
            !(service.starts_with("grpc.health.") || service.starts_with("grpc.reflection."));
        let span = if traced {
            let span = tracing::info_span!(
                "rpc",
                "otel.name" = %format!("{service}/{method}"),
                "otel.kind" = "server",
                "otel.status_code" = tracing::field::Empty,
                "rpc.system" = "grpc",
                "rpc.service" = %service,
                "rpc.method" = %method,
                "rpc.grpc.status_code" = tracing::field::Empty,
            );
            let headers = request.headers();
            tandem_telemetry::set_parent_from_headers(
                &span,
                ["traceparent", "tracestate"]
                    .into_iter()
                    .filter_map(|name| Some((name, headers.get(name)?.to_str().ok()?))),
            );
            span
        } else {
            tracing::Span::none()
        };
        let future = span.in_scope(|| self.inner.call(request));
        Box::pin(tracing::Instrument::instrument(
            async move {
                let result = future.await;
                // A transport failure never reached a handler: code 14 (UNAVAILABLE) as clients see it.
                let code = match &result {
                    Ok(response) => response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i64>().ok())
                        .unwrap_or(0),
                    Err(_) => 14,
                };
                let current = tracing::Span::current();
                current.record("rpc.grpc.status_code", code);
                if matches!(code, 2 | 4 | 13 | 14 | 15) {
                    current.record("otel.status_code", "ERROR");
                }
                duration.record(
                    started.elapsed().as_secs_f64(),
                    &[
                        KeyValue::new("rpc.system", "grpc"),
                        KeyValue::new("rpc.service", service),
                        KeyValue::new("rpc.method", method),
                        KeyValue::new("rpc.grpc.status_code", code),
                    ],
                );
                result
            },
            span,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_paths_split_into_service_and_method() {
        assert_eq!(
            split_path("/tandem.v1.MerchantGateway/RecordPurchase"),
            ("tandem.v1.MerchantGateway".into(), "RecordPurchase".into())
        );
        assert_eq!(split_path("/"), ("unknown".into(), "unknown".into()));
        assert_eq!(split_path("/a/b/c"), ("unknown".into(), "unknown".into()));
    }
}
