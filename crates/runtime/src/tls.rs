//! TLS on every gRPC connection (rustls, through tonic): the certificate a service presents, the
//! authorities a client trusts, and the one explicit way to go without (`TANDEM_PLAINTEXT`).
//!
//! A service refuses to start without a certificate unless plaintext was asked for, and a client
//! refuses an `http://` URL unless plaintext was asked for: nothing falls back to plaintext by
//! itself. docs/SECURITY.md, "Transport", says how to deploy it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// How long a client may take over its TLS handshake before the server drops the connection
/// (a connection that never finishes one holds nothing for longer).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a process that only calls gRPC services (`tandemctl`, and every service as a client)
/// needs: whom to trust, or the explicit choice of plaintext.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTlsArgs {
    /// PEM file of the certificate authorities whose certificates the servers this process
    /// calls present (the local stack's: `.tandem/tls/ca.pem`). Unset: the system's roots.
    #[arg(long = "tls-ca", env = "TANDEM_TLS_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Serve and call gRPC without TLS: `http://` URLs are accepted and a service needs no
    /// certificate. Everything, API keys included, then crosses the network readable. For tests
    /// and a development machine only.
    #[arg(long, env = "TANDEM_PLAINTEXT", default_value_t = false, global = true)]
    pub plaintext: bool,
}

/// A service's TLS settings: the certificate it presents, and what it needs as a client.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM file of the certificate chain this service presents, leaf first. Required unless
    /// `TANDEM_PLAINTEXT=true`.
    #[arg(long = "tls-cert", env = "TANDEM_TLS_CERT")]
    pub cert: Option<PathBuf>,
    /// PEM file of the private key of `TANDEM_TLS_CERT` (PKCS#8, SEC1 or PKCS#1).
    #[arg(long = "tls-key", env = "TANDEM_TLS_KEY")]
    pub key: Option<PathBuf>,
    #[command(flatten)]
    pub client: ClientTlsArgs,
}

/// A TLS setting that cannot be used, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}")]
    Setting(String),
    #[error("cannot read {setting} ({path}): {source}")]
    Read {
        setting: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{setting} ({path}) holds no PEM {what}; give a PEM file (-----BEGIN {what}-----)")]
    NoPem {
        setting: &'static str,
        path: String,
        what: &'static str,
    },
    #[error("the certificate and key cannot serve TLS (check that TANDEM_TLS_KEY is the key of TANDEM_TLS_CERT): {0}")]
    Server(#[source] tonic::transport::Error),
    #[error("{setting} {url:?} cannot be used: {source}")]
    Client {
        setting: String,
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
}

impl TlsArgs {
    /// Plaintext, as tests and tools running everything on one machine ask for it.
    pub fn plaintext() -> TlsArgs {
        TlsArgs {
            client: ClientTlsArgs::plaintext(),
            ..TlsArgs::default()
        }
    }

    /// The server's TLS configuration, read and checked now so that a bad file stops the
    /// service at start; `None` when plaintext was asked for.
    pub fn server(&self) -> Result<Option<ServerTlsConfig>, TlsError> {
        match (&self.cert, &self.key, self.client.plaintext) {
            (None, None, true) => Ok(None),
            (Some(_), _, true) | (_, Some(_), true) => Err(TlsError::Setting(
                "TANDEM_PLAINTEXT=true and a TLS certificate or key are both set: unset one of them".to_owned(),
            )),
            (Some(cert), Some(key), false) => {
                let cert = read_pem(cert, "TANDEM_TLS_CERT", "CERTIFICATE")?;
                let key = read_pem(key, "TANDEM_TLS_KEY", "PRIVATE KEY")?;
                let config = ServerTlsConfig::new()
                    .identity(Identity::from_pem(cert, key))
                    .timeout(HANDSHAKE_TIMEOUT);
                // Build the acceptor once here: a key that does not parse or does not match
                // fails now, with the setting's name, not on the first connection.
                tonic::transport::Server::builder()
                    .tls_config(config.clone())
                    .map_err(TlsError::Server)?;
                Ok(Some(config))
            }
            (None, None, false) => Err(TlsError::Setting(
                "no TLS certificate: set TANDEM_TLS_CERT and TANDEM_TLS_KEY (PEM files; \
                 deploy/local/dev-certs.sh makes development ones), or TANDEM_PLAINTEXT=true to \
                 serve without TLS on a development machine"
                    .to_owned(),
            )),
            (Some(_), None, false) => Err(TlsError::Setting(
                "TANDEM_TLS_CERT is set but TANDEM_TLS_KEY is not: give the certificate's private key".to_owned(),
            )),
            (None, Some(_), false) => Err(TlsError::Setting(
                "TANDEM_TLS_KEY is set but TANDEM_TLS_CERT is not: give the certificate chain".to_owned(),
            )),
        }
    }
}

impl ClientTlsArgs {
    /// Plaintext, as tests and tools running everything on one machine ask for it.
    pub fn plaintext() -> ClientTlsArgs {
        ClientTlsArgs {
            ca: None,
            plaintext: true,
        }
    }

    /// An endpoint for `url`, the value of `setting` (named in errors): `https://` verified
    /// against `TANDEM_TLS_CA` (or the system's roots), `http://` only with plaintext.
    pub fn endpoint(&self, setting: &str, url: &str) -> Result<Endpoint, TlsError> {
        let invalid = |source| TlsError::Client {
            setting: setting.to_owned(),
            url: url.to_owned(),
            source,
        };
        let endpoint = Endpoint::from_shared(url.to_owned()).map_err(invalid)?;
        match endpoint.uri().scheme_str() {
            Some("https") => {
                let tls = ClientTlsConfig::new();
                let tls = match &self.ca {
                    Some(path) => tls.ca_certificate(Certificate::from_pem(read_pem(
                        path,
                        "TANDEM_TLS_CA",
                        "CERTIFICATE",
                    )?)),
                    None => tls.with_native_roots(),
                };
                endpoint.tls_config(tls).map_err(invalid)
            }
            Some("http") if self.plaintext => Ok(endpoint),
            Some("http") => Err(TlsError::Setting(format!(
                "{setting} is {url:?}: http:// would send calls (and their credentials) \
                 unencrypted; use https://, or set TANDEM_PLAINTEXT=true on a development machine"
            ))),
            _ => Err(TlsError::Setting(format!(
                "{setting} is {url:?}: give an https:// URL (http:// only with TANDEM_PLAINTEXT=true)"
            ))),
        }
    }
}

/// The contents of a PEM file, checked to hold a `what` block.
fn read_pem(path: &Path, setting: &'static str, what: &'static str) -> Result<Vec<u8>, TlsError> {
    let contents = std::fs::read(path).map_err(|source| TlsError::Read {
        setting,
        path: path.display().to_string(),
        source,
    })?;
    // "PRIVATE KEY" also matches "EC PRIVATE KEY" and "RSA PRIVATE KEY".
    let marker = format!("{what}-----");
    if !contents
        .windows(marker.len())
        .any(|window| window == marker.as_bytes())
    {
        return Err(TlsError::NoPem {
            setting,
            path: path.display().to_string(),
            what,
        });
    }
    Ok(contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_without_a_certificate_needs_plaintext_asked_for() {
        let error = TlsArgs::default().server().unwrap_err().to_string();
        assert!(error.contains("TANDEM_TLS_CERT"), "{error}");
        assert!(error.contains("TANDEM_PLAINTEXT=true"), "{error}");
        assert!(TlsArgs::plaintext().server().unwrap().is_none());
        let both = TlsArgs {
            cert: Some("cert.pem".into()),
            ..TlsArgs::plaintext()
        };
        assert!(both.server().unwrap_err().to_string().contains("both set"));
        let half = TlsArgs {
            key: Some("key.pem".into()),
            ..TlsArgs::default()
        };
        assert!(half
            .server()
            .unwrap_err()
            .to_string()
            .contains("TANDEM_TLS_CERT is not"));
    }

    #[test]
    fn http_urls_need_plaintext_asked_for() {
        let tls = ClientTlsArgs::default();
        let error = tls
            .endpoint("TANDEM_LEDGER_URL", "http://127.0.0.1:50052")
            .unwrap_err()
            .to_string();
        assert!(error.contains("TANDEM_LEDGER_URL"), "{error}");
        assert!(error.contains("https://"), "{error}");
        assert!(ClientTlsArgs::plaintext()
            .endpoint("TANDEM_LEDGER_URL", "http://127.0.0.1:50052")
            .is_ok());
        assert!(tls
            .endpoint("TANDEM_LEDGER_URL", "ftp://127.0.0.1:50052")
            .is_err());
    }

    #[test]
    fn unreadable_or_non_pem_files_are_named() {
        let missing = TlsArgs {
            cert: Some("/nonexistent/cert.pem".into()),
            key: Some("/nonexistent/key.pem".into()),
            ..TlsArgs::default()
        };
        let error = missing.server().unwrap_err().to_string();
        assert!(error.contains("TANDEM_TLS_CERT"), "{error}");
        assert!(error.contains("/nonexistent/cert.pem"), "{error}");
        let dir = std::env::temp_dir().join(format!("tandem-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("ca.der");
        std::fs::write(&not_pem, [0x30, 0x82, 0x01]).unwrap();
        let client = ClientTlsArgs {
            ca: Some(not_pem),
            plaintext: false,
        };
        let error = client
            .endpoint("TANDEM_GATEWAY_URL", "https://127.0.0.1:50051")
            .unwrap_err()
            .to_string();
        assert!(error.contains("TANDEM_TLS_CA"), "{error}");
        assert!(error.contains("BEGIN CERTIFICATE"), "{error}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
