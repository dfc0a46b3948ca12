//! Tandem notifications: tells merchants what happened, over gRPC streams and signed webhooks.
//!
//! Not built yet: the binary starts, serves gRPC health and reflection, and stops cleanly on
//! SIGTERM, so deployments and health checks can be wired before its issue lands.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Configuration: every setting is a flag and an environment variable.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "notifications")]
pub struct Config {
    /// Address of the gRPC listener.
    #[arg(
        long,
        env = "TANDEM_NOTIFICATIONS_LISTEN",
        default_value = "127.0.0.1:50054"
    )]
    pub listen: SocketAddr,
}

/// Serves health and reflection until `shutdown` is cancelled.
pub async fn run(
    _config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tandem_runtime::ServeError> {
    tandem_runtime::serve_health_only(listener, shutdown).await
}
