//! Webhook signatures as the Standard Webhooks specification defines them
//! (<https://www.standardwebhooks.com>), so that any receiver verifies them with an off-the-shelf
//! library:
//!
//! - the secret is `whsec_` followed by the base64 of 24 to 64 random bytes;
//! - a delivery carries `webhook-id` (the notification's id, the same on every retry, for
//!   deduplication), `webhook-timestamp` (Unix seconds) and `webhook-signature`;
//! - the signature is `v1,` followed by the base64 of HMAC-SHA256 under the secret's bytes of
//!   `<webhook-id>.<webhook-timestamp>.<body>`; during a secret rotation both secrets sign and the
//!   header holds both signatures, separated by a space.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::TryRngCore as _;
use sha2::Sha256;

const PREFIX: &str = "whsec_";

/// A signing secret.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret(Vec<u8>);

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningSecret(…)")
    }
}

impl SigningSecret {
    /// A new secret of 32 random bytes.
    pub fn generate() -> Self {
        let mut bytes = vec![0u8; 32];
        // The operating system's generator; a machine that cannot give 32 random bytes cannot
        // make secrets at all.
        #[allow(clippy::expect_used)]
        rand::rngs::OsRng
            .try_fill_bytes(&mut bytes)
            .expect("the operating system's random number generator");
        Self(bytes)
    }

    /// Parses `whsec_<base64>`; `Err` says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let encoded = text
            .strip_prefix(PREFIX)
            .ok_or_else(|| format!("a signing secret starts with {PREFIX}"))?;
        let bytes = STANDARD
            .decode(encoded)
            .map_err(|_| "a signing secret is whsec_ and base64".to_owned())?;
        if !(24..=64).contains(&bytes.len()) {
            return Err("a signing secret holds 24 to 64 bytes".into());
        }
        Ok(Self(bytes))
    }

    /// `whsec_<base64>`, as shown to the merchant once.
    pub fn expose(&self) -> String {
        format!("{PREFIX}{}", STANDARD.encode(&self.0))
    }

    /// `v1,<base64 HMAC-SHA256 of id.timestamp.body>`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        // HMAC accepts a key of any length; this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// The three headers of one delivery, signed by every secret in `secrets` (two during a
/// rotation's overlap).
pub fn headers(
    secrets: &[&SigningSecret],
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> [(&'static str, String); 3] {
    let signatures: Vec<String> = secrets
        .iter()
        .map(|s| s.sign(id, timestamp, body))
        .collect();
    [
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", signatures.join(" ")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_specifications_example() {
        // The example of the Standard Webhooks specification and its reference libraries.
        let secret = SigningSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = secret.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(SigningSecret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(SigningSecret::parse("whsec_c2hvcnQ=").is_err());
        let generated = SigningSecret::generate();
        assert_eq!(
            SigningSecret::parse(&generated.expose()).unwrap(),
            generated
        );
        assert!(!format!("{generated:?}").contains(&generated.expose()));
    }
}
