//! A small local webhook receiver: accepts Tandem's POSTs over HTTP/1.1, verifies each
//! delivery's Standard Webhooks signature with the endpoint's secret (and that its timestamp is
//! within five minutes), answers 200 to a verified delivery and 400 to anything else, and hands
//! every delivery to the caller. `tandemctl webhooks receive` prints them; the demo uses it to
//! show a referrer hearing of a purchase.

use std::time::{Duration, Instant};

use notifications::webhook::SigningSecret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// One delivery as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: String,
    pub body: Vec<u8>,
    /// `Ok` when the signature and timestamp verified; `Err` says why not.
    pub verified: Result<(), String>,
    pub at: Instant,
}

/// Tolerance for `webhook-timestamp`, as the Standard Webhooks libraries use.
const TOLERANCE_SECS: i64 = 300;

/// Comparison that takes the same time wherever the inputs differ (`subtle`).
fn same(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

fn verify(
    secret: &SigningSecret,
    id: &str,
    timestamp: &str,
    signature: &str,
    body: &[u8],
) -> Result<(), String> {
    let at: i64 = timestamp
        .parse()
        .map_err(|_| "webhook-timestamp is not a number".to_owned())?;
    if (chrono::Utc::now().timestamp() - at).abs() > TOLERANCE_SECS {
        return Err("webhook-timestamp is more than five minutes away".into());
    }
    let expected = secret.sign(id, at, body);
    if signature
        .split(' ')
        .any(|candidate| same(candidate, &expected))
    {
        Ok(())
    } else {
        Err("no signature matches the secret".into())
    }
}

/// The secrets a receiver verifies with: one for every path, or one per path (the benchmark's
/// receiver stands for many merchants' endpoints, `/<n>` each).
#[derive(Clone)]
pub enum Secrets {
    One(SigningSecret),
    ByPath(std::sync::Arc<std::collections::HashMap<String, SigningSecret>>),
}

impl Secrets {
    fn for_path(&self, path: &str) -> Option<&SigningSecret> {
        match self {
            Secrets::One(secret) => Some(secret),
            Secrets::ByPath(secrets) => secrets.get(path),
        }
    }
}

/// Serves on `listener` until the receiving side of `deliveries` is dropped. Connections are
/// kept alive between requests (as a receiver behind any HTTP server would), unless the sender
/// asks to close.
pub async fn serve(listener: TcpListener, secrets: Secrets, deliveries: mpsc::Sender<Received>) {
    loop {
        let accepted = tokio::select! {
            () = deliveries.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((mut socket, _)) = accepted else {
            continue;
        };
        let (secrets, deliveries) = (secrets.clone(), deliveries.clone());
        tokio::spawn(async move {
            loop {
                let Ok(Some(request)) =
                    tokio::time::timeout(Duration::from_secs(30), read_one(&mut socket)).await
                else {
                    return;
                };
                let header = |name: &str| {
                    request
                        .headers
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                let id = header("webhook-id");
                let verified = match secrets.for_path(&request.path) {
                    Some(secret) => verify(
                        secret,
                        &id,
                        &header("webhook-timestamp"),
                        &header("webhook-signature"),
                        &request.body,
                    ),
                    None => Err(format!("no endpoint at {}", request.path)),
                };
                let close = header("connection").eq_ignore_ascii_case("close");
                let (status, text) = if verified.is_ok() {
                    ("200 OK", "verified")
                } else {
                    ("400 Bad Request", "signature not verified")
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: {}\r\n\r\n{text}",
                    text.len(),
                    if close { "close" } else { "keep-alive" },
                );
                let written = socket.write_all(answer.as_bytes()).await;
                let _ = deliveries
                    .send(Received {
                        id,
                        body: request.body,
                        verified,
                        at: Instant::now(),
                    })
                    .await;
                if close || written.is_err() {
                    let _ = socket.shutdown().await;
                    return;
                }
            }
        });
    }
}

/// One HTTP/1.1 request.
pub struct Request {
    pub path: String,
    /// Names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Reads one HTTP/1.1 request: its headers (names in lower case) and body; `None` if the peer
/// closed first or sent more than 64 KiB of headers.
pub async fn read_request(
    socket: &mut tokio::net::TcpStream,
) -> Option<(Vec<(String, String)>, Vec<u8>)> {
    read_one(socket)
        .await
        .map(|request| (request.headers, request.body))
}

/// Reads one request from `socket` (requests are not pipelined: the sender waits for each
/// answer).
pub async fn read_one(socket: &mut tokio::net::TcpStream) -> Option<Request> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    let (head_end, length) = loop {
        let read = socket.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (end + 4, length.min(1 << 20));
        }
        if buffer.len() > 64 * 1024 {
            return None;
        }
    };
    while buffer.len() < head_end + length {
        let read = socket.read(&mut chunk).await.ok()?;
        if read == 0 {
            break;
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let path = head
        .lines()
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .unwrap_or("/")
        .to_owned();
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_owned()))
        .collect();
    Some(Request {
        path,
        headers,
        body: buffer[head_end..(head_end + length).min(buffer.len())].to_vec(),
    })
}
