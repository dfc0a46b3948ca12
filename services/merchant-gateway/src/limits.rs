//! Per-credential rate limits and request size limits at the gateway's edge.
//!
//! Every call's bearer credential (a merchant's API key, or the operator token) draws from a
//! token bucket of its own: `per_second` calls sustained, `burst` at once. A call over the limit
//! answers RESOURCE_EXHAUSTED before any work, with the wait in the message, in
//! `retry-after-ms` metadata and as a `google.rpc.RetryInfo` status detail (what gRPC clients'
//! retry policies read). A merchant has one key, two during a rotation. Calls without a
//! credential are not counted here (the handler refuses them). Buckets live in the gateway
//! instance: with N instances behind a balancer a key may make up to N times the rate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

/// The gateway's limits; every one is a flag and an environment variable.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct LimitSettings {
    /// Calls per second one credential (API key or operator token) may make, sustained; 0
    /// turns rate limiting off.
    #[arg(
        long = "rate-limit-per-second",
        env = "TANDEM_GATEWAY_RATE_LIMIT_PER_SECOND",
        default_value_t = 2000
    )]
    pub per_second: u32,
    /// Calls one credential may make at once above the sustained rate.
    #[arg(
        long = "rate-limit-burst",
        env = "TANDEM_GATEWAY_RATE_LIMIT_BURST",
        default_value_t = 4000
    )]
    pub burst: u32,
    /// Largest request message the gateway decodes, in bytes; a larger one answers OUT_OF_RANGE
    /// ("decoded message length too large", tonic's answer) before any work. 2 MiB holds a bulk
    /// call of 500 items with every field at its limit.
    #[arg(
        long = "max-request-bytes",
        env = "TANDEM_GATEWAY_MAX_REQUEST_BYTES",
        default_value_t = 2 * 1024 * 1024
    )]
    pub max_request_bytes: usize,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The rate limiter, as a tonic interceptor on every public service of the gateway.
#[derive(Clone)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Arc<Mutex<HashMap<[u8; 32], Bucket>>>,
}

/// Buckets kept at most; idle ones (full again) are dropped first.
const MAX_BUCKETS: usize = 100_000;

impl RateLimiter {
    pub fn new(settings: &LimitSettings) -> Self {
        Self {
            per_second: f64::from(settings.per_second),
            burst: f64::from(settings.burst.max(1)),
            buckets: Arc::default(),
        }
    }

    /// Takes one call from `credential`'s bucket at `now`: `Err(wait)` if it is empty.
    fn take(&self, credential: &str, now: Instant) -> Result<(), Duration> {
        let key: [u8; 32] = Sha256::digest(credential.as_bytes()).into();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_BUCKETS {
            let full_after = Duration::from_secs_f64(self.burst / self.per_second);
            buckets.retain(|_, bucket| now.duration_since(bucket.at) < full_after);
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }

    fn refusal(&self, wait: Duration) -> Status {
        let wait_ms = wait.as_millis().max(1) as u64;
        let message = format!(
            "rate limit: one API key may make {} calls per second (bursts of {}); retry in {wait_ms} ms",
            self.per_second, self.burst
        );
        let retry_info = RetryInfo {
            retry_delay: Some(prost_types::Duration {
                seconds: (wait_ms / 1000) as i64,
                nanos: ((wait_ms % 1000) * 1_000_000) as i32,
            }),
        };
        let details = RpcStatus {
            code: tonic::Code::ResourceExhausted as i32,
            message: message.clone(),
            details: vec![prost_types::Any {
                type_url: "type.googleapis.com/google.rpc.RetryInfo".to_owned(),
                value: retry_info.encode_to_vec(),
            }],
        };
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert("retry-after-ms", wait_ms.into());
        Status::with_details_and_metadata(
            tonic::Code::ResourceExhausted,
            message,
            details.encode_to_vec().into(),
            metadata,
        )
    }
}

impl tonic::service::Interceptor for RateLimiter {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.per_second <= 0.0 {
            return Ok(request);
        }
        let Some(credential) = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|credential| !credential.is_empty())
        else {
            return Ok(request);
        };
        match self.take(credential, Instant::now()) {
            Ok(()) => Ok(request),
            Err(wait) => {
                tracing::warn!(retry_in_ms = wait.as_millis() as u64, "rate limit reached");
                Err(self.refusal(wait))
            }
        }
    }
}

/// `google.rpc.Status`, the payload of `grpc-status-details-bin`.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

/// `google.rpc.RetryInfo`.
#[derive(Clone, PartialEq, Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<prost_types::Duration>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn limiter(per_second: u32, burst: u32) -> RateLimiter {
        RateLimiter::new(&LimitSettings {
            per_second,
            burst,
            max_request_bytes: 1024,
        })
    }

    #[test]
    fn a_burst_then_the_sustained_rate_per_credential() {
        let limiter = limiter(10, 3);
        let start = Instant::now();
        for _ in 0..3 {
            assert!(limiter.take("key-a", start).is_ok());
        }
        let wait = limiter.take("key-a", start).unwrap_err();
        assert!(wait > Duration::from_millis(90) && wait <= Duration::from_millis(100));
        // Another key has its own bucket.
        assert!(limiter.take("key-b", start).is_ok());
        // 100 ms later, one more call.
        let later = start + Duration::from_millis(100);
        assert!(limiter.take("key-a", later).is_ok());
        assert!(limiter.take("key-a", later).is_err());
    }

    #[test]
    fn the_refusal_says_when_to_retry_three_ways() {
        let status = limiter(10, 3).refusal(Duration::from_millis(250));
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("retry in 250 ms"));
        assert_eq!(status.metadata().get("retry-after-ms").unwrap(), "250");
        let details = RpcStatus::decode(status.details()).unwrap();
        let retry = RetryInfo::decode(details.details[0].value.as_slice()).unwrap();
        assert_eq!(retry.retry_delay.unwrap().nanos, 250_000_000);
    }
}
