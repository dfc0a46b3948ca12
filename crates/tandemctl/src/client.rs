//! What the demo and the benchmark share: reaching the gateway and authorising calls.

use tandem_proto::v1::merchant_gateway_client::MerchantGatewayClient;
use tandem_proto::v1::operator_service_client::OperatorServiceClient;
use tonic::transport::Channel;
use tonic::Request;

/// Where the gateway is and the operator token it was started with.
#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// The merchant gateway's gRPC endpoint.
    #[arg(
        long,
        env = "TANDEM_GATEWAY_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub gateway: String,
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
        let channel = tonic::transport::Endpoint::from_shared(self.gateway.clone())
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("cannot reach the gateway at {}: {e}", self.gateway))?;
        Ok((
            OperatorServiceClient::new(channel.clone()),
            MerchantGatewayClient::new(channel),
        ))
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

pub fn status(context: &str) -> impl FnOnce(tonic::Status) -> String + '_ {
    move |status| format!("{context}: {:?}: {}", status.code(), status.message())
}
