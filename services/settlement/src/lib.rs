//! Tandem settlement: closes settlement cycles, nets what merchants owe each other and issues statements.
//!
//! Not built yet: the binary starts, serves gRPC health and reflection, and stops cleanly on
//! SIGTERM, so deployments and health checks can be wired before its issue lands.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Configuration: every setting is a flag and an environment variable.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "settlement")]
pub struct Config {
    /// Address of the gRPC listener.
    #[arg(
        long,
        env = "TANDEM_SETTLEMENT_LISTEN",
        default_value = "127.0.0.1:50053"
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
