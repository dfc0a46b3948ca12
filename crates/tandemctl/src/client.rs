//! What the demo and the benchmark share: reaching the gateway and authorising calls.

use std::time::{Duration, Instant};

use tandem_proto::v1::merchant_gateway_client::MerchantGatewayClient;
use tandem_proto::v1::operator_service_client::OperatorServiceClient;
use tandem_runtime::ClientTlsArgs;
use tonic::transport::Channel;
use tonic::Request;

/// Where the gateway is, and how its certificate is checked.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayUrl {
    /// The merchant gateway's gRPC endpoint (https://; http:// only with TANDEM_PLAINTEXT=true).
    #[arg(
        long,
        global = true,
        env = "TANDEM_GATEWAY_URL",
        default_value = "https://127.0.0.1:50051"
    )]
    pub gateway: String,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

impl GatewayUrl {
    /// A gateway reached without TLS (tests, and tools on one machine).
    pub fn plaintext(gateway: String) -> GatewayUrl {
        GatewayUrl {
            gateway,
            tls: ClientTlsArgs::plaintext(),
        }
    }

    /// The gateway's endpoint, with TLS unless plaintext was asked for.
    pub fn endpoint(&self) -> Result<tonic::transport::Endpoint, String> {
        self.tls
            .endpoint("TANDEM_GATEWAY_URL", &self.gateway)
            .map_err(|error| error.to_string())
    }
}

/// Where the gateway is and the operator token it was started with.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub url: GatewayUrl,
    /// The operator token the gateway was started with.
    #[arg(long, env = "TANDEM_OPERATOR_TOKEN", hide_env_values = true)]
    pub operator_token: String,
}

impl GatewayArgs {
    /// Operator and POS clients over one connection.
    pub async fn clients(
        &self,
    ) -> Result<
        (
            OperatorServiceClient<Channel>,
            MerchantGatewayClient<Channel>,
        ),
        String,
    > {
        let channel = self.channel()?;
        Ok((
            OperatorServiceClient::new(channel.clone()),
            MerchantGatewayClient::new(channel),
        ))
    }
}

impl GatewayArgs {
    /// A connection to the gateway. Lazy: a gateway that is not up yet (or restarting) answers
    /// UNAVAILABLE on the first call, which `call!` retries, rather than failing here.
    pub fn channel(&self) -> Result<Channel, String> {
        Ok(self
            .url
            .endpoint()?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .connect_lazy())
    }
}

pub fn authorised<T>(message: T, secret: &str) -> Result<Request<T>, String> {
    let mut request = Request::new(message);
    let value = format!("Bearer {secret}")
        .parse()
        .map_err(|_| "secret is not valid metadata".to_owned())?;
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

/// How long a command keeps retrying a call that answers UNAVAILABLE (a service restarting, the
/// gateway not listening yet) before it gives up.
pub const RETRY_FOR: Duration = Duration::from_secs(60);

/// The retry state of one call: UNAVAILABLE is retried with exponential backoff and jitter
/// (100 ms doubling to 2 s) for at most [`RETRY_FOR`]; any other status ends the call. Every
/// write carries an idempotency key, so a retry never applies a write twice.
#[derive(Debug)]
pub struct Retry {
    what: &'static str,
    started: Instant,
    backoff: Duration,
    attempts: u32,
}

impl Retry {
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            started: Instant::now(),
            backoff: Duration::from_millis(100),
            attempts: 0,
        }
    }

    /// After a failed attempt: waits and returns `None` if the call should be tried again, or
    /// the error to report.
    pub async fn after(&mut self, status: tonic::Status) -> Option<String> {
        self.attempts += 1;
        // A certificate the client does not trust will not be trusted a minute later.
        if let Some(reason) = certificate_refused(&status) {
            return Some(format!(
                "{}: the gateway's TLS certificate was refused ({reason}): set TANDEM_TLS_CA to \
                 the authority that signed it (the local stack's: .tandem/tls/ca.pem, which \
                 .tandem/secrets.env sets)",
                self.what
            ));
        }
        if status.code() != tonic::Code::Unavailable || self.started.elapsed() >= RETRY_FOR {
            let tries = if self.attempts > 1 {
                format!(
                    " (after {} attempts over {:.0?})",
                    self.attempts,
                    self.started.elapsed()
                )
            } else {
                String::new()
            };
            return Some(format!(
                "{}: {:?}: {}{tries}",
                self.what,
                status.code(),
                status.message()
            ));
        }
        if self.attempts == 1 {
            eprintln!(
                "{}: unavailable ({}); retrying for up to {} s",
                self.what,
                status.message(),
                RETRY_FOR.as_secs()
            );
        }
        let jitter = Duration::from_millis(u64::from(rand_below(50)));
        tokio::time::sleep(self.backoff + jitter).await;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(2));
        None
    }
}

/// A small pseudo-random number for jitter: no need for a cryptographic generator here.
fn rand_below(bound: u32) -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    nanos % bound.max(1)
}

/// `call!("what", client.method(request))`: makes the call, retrying UNAVAILABLE as [`Retry`]
/// says, and returns the response message or an error naming `what`. The call expression is
/// evaluated again for each attempt, so it must build its request anew (clone it).
#[macro_export]
macro_rules! call {
    ($what:expr, $call:expr) => {{
        let mut retry = $crate::client::Retry::new($what);
        loop {
            match $call.await {
                Ok(response) => break Ok(response.into_inner()),
                Err(status) => {
                    if let Some(error) = retry.after(status).await {
                        break Err(error);
                    }
                }
            }
        }
    }};
}

/// Why the TLS handshake refused the server's certificate, if that is why `status` failed.
pub fn certificate_refused(status: &tonic::Status) -> Option<String> {
    std::error::Error::source(status).and_then(certificate_refused_by)
}

/// Why the TLS handshake refused the server's certificate, if `error` or one of its causes says
/// so (rustls reports it as "invalid peer certificate: …").
pub fn certificate_refused_by(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut source = Some(error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if let Some(at) = text.find("invalid peer certificate") {
            return Some(text[at..].to_owned());
        }
        source = cause.source();
    }
    None
}
