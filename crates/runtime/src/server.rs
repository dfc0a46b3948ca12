//! The gRPC server every service runs: its own services plus health and reflection.

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Server;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("could not build the reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC transport error")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves `routes` on `listener`, with gRPC health (each name in `service_names` reported as
/// serving, and the overall "" status) and server reflection v1 and v1alpha, until `shutdown` is
/// cancelled. In-flight calls finish before this returns.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    service_names: &[&str],
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    for name in service_names {
        health_reporter
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tandem_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tandem_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let routes = routes
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let address = listener.local_addr().ok();
    tracing::info!(address = ?address, services = ?service_names, "gRPC server listening");
    let shutting_down = shutdown.clone();
    Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            shutting_down.cancelled().await;
            health_reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        })
        .await?;
    tracing::info!("gRPC server stopped");
    Ok(())
}

/// Cancels `token` on SIGTERM or Ctrl-C.
pub fn shutdown_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut terminate =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(signal) => signal,
                    Err(error) => {
                        tracing::error!(error = %error, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = terminate.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        token.cancel();
    });
}

/// The W3C trace context headers of a gRPC request's metadata.
pub fn grpc_metadata_trace_headers(metadata: &tonic::metadata::MetadataMap) -> Vec<(&str, &str)> {
    ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|name| Some((name, metadata.get(name)?.to_str().ok()?)))
        .collect()
}

/// Makes the current span (the handler's) a child of the caller's trace, if it sent one.
/// Also records the trace id in the span's `trace_id` field, if it has one.
pub fn link_request_span<T>(request: &tonic::Request<T>) {
    let span = tracing::Span::current();
    tandem_telemetry::set_parent_from_headers(
        &span,
        grpc_metadata_trace_headers(request.metadata()),
    );
    tandem_telemetry::record_trace_id(&span);
}
