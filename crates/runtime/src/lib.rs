//! What every Tandem service binary shares: its configuration loader, the gRPC server with health
//! and reflection (v1 and v1alpha), trace context from gRPC metadata, and graceful shutdown on
//! SIGTERM or Ctrl-C.

mod config;
mod metrics_http;
mod rpc_metrics;
mod server;
mod service_auth;
mod tls;

pub use metrics_http::serve_metrics;
pub use rpc_metrics::RpcMetricsLayer;
pub use service_auth::{
    parse_service_token, InternalChannel, ServiceAuthLayer, ServiceCredential, SERVICE_TOKEN_ENV,
};
pub use tls::{ClientTlsArgs, TlsArgs, TlsError};

pub use config::{host_name, hours, BusArgs, ConsumerArgs, DatabaseArgs, RetentionArgs, TopicArgs};
pub use server::{
    grpc_metadata_trace_headers, link_request_span, serve, shutdown_on_signal, BackgroundTasks,
    BoxError, ServeError, LIVENESS,
};

mod secret;
pub use secret::{secret_parser, Secret, SecretParser};

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The whole `main` of a service binary: parse configuration (flags and `TANDEM_…` variables),
/// start telemetry, bind the listener, run until SIGTERM or Ctrl-C, and exit non-zero with the
/// error's cause chain logged if the service fails.
pub fn service_main<C, F, Fut, E>(
    service_name: &'static str,
    listen_address: impl FnOnce(&C) -> SocketAddr,
    metrics_address: impl FnOnce(&C) -> SocketAddr,
    run: F,
) -> ExitCode
where
    C: clap::Parser,
    F: FnOnce(C, TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::error::Error,
{
    let config = C::parse();
    // rustls picks its crypto provider by itself only while exactly one is compiled in: name
    // ring (tonic's `tls-ring`) so that a dependency enabling another cannot stop the server.
    let _already_installed = rustls::crypto::ring::default_provider().install_default();
    let address = listen_address(&config);
    let metrics = metrics_address(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{service_name}: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let _telemetry = match tandem_telemetry::init(service_name) {
            Ok(guard) => guard,
            Err(error) => {
                eprintln!(
                    "{service_name}: cannot start telemetry: {}",
                    error_chain(&error)
                );
                return ExitCode::FAILURE;
            }
        };
        let listener = match TcpListener::bind(address).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(%address, error = %error, "cannot bind the gRPC listener");
                return ExitCode::FAILURE;
            }
        };
        let shutdown = CancellationToken::new();
        match TcpListener::bind(metrics).await {
            Ok(listener) => {
                tokio::spawn(serve_metrics(listener, shutdown.clone()));
            }
            Err(error) => {
                tracing::error!(address = %metrics, error = %error, "cannot bind the metrics listener");
                return ExitCode::FAILURE;
            }
        }
        shutdown_on_signal(shutdown.clone());
        match run(config, listener, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = %error_chain(&error), "service failed");
                ExitCode::FAILURE
            }
        }
    })
}

pub use tandem_telemetry::error_chain;
