//! Service-to-service authentication. The internal APIs (the ledger's, settlement's and
//! notifications') trust the merchant id in each request: only the merchant gateway, which
//! authenticated the merchant, may call them. Every call to them must carry the deployment's
//! service token as `authorization: Bearer <token>`; health checks are open (orchestrators probe
//! them), and reflection is open (it describes the API, it serves no data).
//!
//! The token is compared in constant time (`subtle`) over SHA-256 digests, so neither its bytes
//! nor its length show in the timing. A refused call answers UNAUTHENTICATED before any handler
//! runs, and is counted by the RPC metrics like any other.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::Secret;

/// The environment variable every service reads the token from.
pub const SERVICE_TOKEN_ENV: &str = "TANDEM_SERVICE_TOKEN";

/// Checks a service token as configured: 32 to 256 printable ASCII characters (a random token
/// of at least 128 bits, hex or base64).
pub fn parse_service_token(value: &str) -> Result<Secret, String> {
    let value = value.trim();
    if !(32..=256).contains(&value.len()) || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{SERVICE_TOKEN_ENV} must be 32 to 256 printable ASCII characters without spaces (e.g. 32 random bytes in hex)"
        ));
    }
    Ok(Secret::new(value))
}

/// The server side: refuses calls without the token, or lets every call through (`open`, for
/// the merchant gateway, whose handlers authenticate merchants and operators themselves).
#[derive(Clone)]
pub struct ServiceAuthLayer {
    digest: Option<[u8; 32]>,
}

impl ServiceAuthLayer {
    pub fn require(token: &Secret) -> Self {
        Self {
            digest: Some(Sha256::digest(token.expose().as_bytes()).into()),
        }
    }

    pub fn open() -> Self {
        Self { digest: None }
    }
}

impl<S> tower_layer::Layer<S> for ServiceAuthLayer {
    type Service = ServiceAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServiceAuth {
            inner,
            digest: self.digest,
        }
    }
}

#[derive(Clone)]
pub struct ServiceAuth<S> {
    inner: S,
    digest: Option<[u8; 32]>,
}

/// Whether `headers` carry `Bearer <token>` whose digest is `expected`.
fn presents(headers: &http::HeaderMap, expected: &[u8; 32]) -> bool {
    use subtle::ConstantTimeEq as _;
    let Some(token) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
    else {
        return false;
    };
    Sha256::digest(token.trim().as_bytes())
        .as_slice()
        .ct_eq(expected)
        .into()
}

impl<S, B, R> tower_service::Service<http::Request<B>> for ServiceAuth<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let open =
            path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.");
        match &self.digest {
            Some(expected) if !open && !presents(request.headers(), expected) => {
                tracing::warn!(path = %path, "internal call without the service token refused");
                let refused = tonic::Status::unauthenticated(format!(
                    "this is an internal Tandem API: calls need the deployment's service token ({SERVICE_TOKEN_ENV}) as `authorization: Bearer <token>`; merchants call the merchant gateway"
                ))
                .into_http::<R>();
                Box::pin(async move { Ok(refused) })
            }
            _ => Box::pin(self.inner.call(request)),
        }
    }
}

/// The client side: adds the service token to every call of an internal API's client.
#[derive(Clone)]
pub struct ServiceCredential(MetadataValue<Ascii>);

impl ServiceCredential {
    pub fn new(token: &Secret) -> Result<Self, String> {
        format!("Bearer {}", token.expose())
            .parse()
            .map(Self)
            .map_err(|_| format!("{SERVICE_TOKEN_ENV} is not a valid header value"))
    }
}

impl tonic::service::Interceptor for ServiceCredential {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A channel to an internal API that presents the service token on every call.
pub type InternalChannel =
    tonic::service::interceptor::InterceptedService<Channel, ServiceCredential>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_and_printable() {
        assert!(parse_service_token("short").is_err());
        assert!(parse_service_token(&"a b".repeat(20)).is_err());
        assert!(parse_service_token(&"0123456789abcdef".repeat(2)).is_ok());
    }

    #[test]
    fn only_the_exact_token_passes() {
        let token = Secret::new("0123456789abcdef0123456789abcdef");
        let expected: [u8; 32] = Sha256::digest(token.expose().as_bytes()).into();
        let headers = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::AUTHORIZATION, value.parse().unwrap());
            headers
        };
        assert!(presents(
            &headers("Bearer 0123456789abcdef0123456789abcdef"),
            &expected
        ));
        assert!(!presents(
            &headers("Bearer 0123456789abcdef0123456789abcdeF"),
            &expected
        ));
        assert!(!presents(
            &headers("0123456789abcdef0123456789abcdef"),
            &expected
        ));
        assert!(!presents(&http::HeaderMap::new(), &expected));
    }
}
