//! `tandemctl trace <trace_id>`: one trace from Jaeger's query API (the local stack's with
//! `up.sh --observability`), printed as operators read it: every span in start order, indented
//! under its parent, with its offset from the first, its duration, its service and the
//! attributes that say what it was (RPC method, topic, partition and offset, HTTP status).

use std::collections::HashMap;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    /// The trace id: 32 hexadecimal digits (the `trace_id` of a log line, or the one the demo
    /// prints).
    trace_id: String,
    /// Jaeger's query API.
    #[arg(
        long,
        env = "TANDEM_JAEGER_URL",
        default_value = "http://127.0.0.1:16686"
    )]
    jaeger: String,
}

/// Attributes worth a column, in this order.
const SHOWN: [&str; 9] = [
    "rpc.grpc.status_code",
    "messaging.destination.name",
    "messaging.destination.partition.id",
    "messaging.kafka.offset",
    "messaging.batch.message_count",
    "http.response.status_code",
    "tandem.webhook.attempt",
    "merchant_id",
    "purchase_id",
];

pub async fn run(args: TraceArgs) -> Result<(), String> {
    let id = args.trace_id.trim().to_ascii_lowercase();
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{:?} is not a trace id: 32 hexadecimal digits",
            args.trace_id
        ));
    }
    let url = format!("{}/api/traces/{id}", args.jaeger.trim_end_matches('/'));
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client.get(uri).await.map_err(|e| {
        format!(
            "cannot reach Jaeger at {}: {e} (is the stack up with --observability?)",
            args.jaeger
        )
    })?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading Jaeger's answer: {e}"))?
        .to_bytes();
    if status == hyper::StatusCode::NOT_FOUND {
        return Err(format!(
            "Jaeger has no trace {id} (yet: spans are exported in batches within seconds)"
        ));
    }
    if !status.is_success() {
        return Err(format!(
            "Jaeger answered {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let answer: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| format!("Jaeger's answer is not JSON: {e}"))?;
    let trace = &answer["data"][0];
    let spans = trace["spans"]
        .as_array()
        .ok_or("Jaeger's answer has no spans")?;
    let services: HashMap<&str, &str> = trace["processes"]
        .as_object()
        .map(|processes| {
            processes
                .iter()
                .filter_map(|(id, p)| Some((id.as_str(), p["serviceName"].as_str()?)))
                .collect()
        })
        .unwrap_or_default();
    let parent_of = |span: &serde_json::Value| -> Option<String> {
        span["references"].as_array()?.iter().find_map(|r| {
            (r["refType"] == "CHILD_OF").then(|| r["spanID"].as_str().map(str::to_owned))?
        })
    };
    let by_id: HashMap<String, &serde_json::Value> = spans
        .iter()
        .filter_map(|s| Some((s["spanID"].as_str()?.to_owned(), s)))
        .collect();
    let depth = |span: &serde_json::Value| {
        let mut depth = 0;
        let mut current = parent_of(span);
        while let Some(parent) = current {
            match by_id.get(&parent) {
                Some(found) if depth < 64 => {
                    depth += 1;
                    current = parent_of(found);
                }
                _ => break,
            }
        }
        depth
    };
    let mut ordered: Vec<&serde_json::Value> = spans.iter().collect();
    ordered.sort_by_key(|s| s["startTime"].as_i64().unwrap_or(0));
    let start = ordered
        .first()
        .and_then(|s| s["startTime"].as_i64())
        .unwrap_or(0);
    println!("trace {id}: {} spans", ordered.len());
    println!("{:>10} {:>10}  {:<18} span", "start", "duration", "service");
    for span in ordered {
        let tags: HashMap<&str, String> = span["tags"]
            .as_array()
            .map(|tags| {
                tags.iter()
                    .filter_map(|t| {
                        let value = match &t["value"] {
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        Some((t["key"].as_str()?, value))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let shown: Vec<String> = SHOWN
            .iter()
            .filter_map(|key| tags.get(key).map(|v| format!("{key}={v}")))
            .collect();
        println!(
            "{:>8.2}ms {:>8.2}ms  {:<18} {}{}  {}",
            (span["startTime"].as_i64().unwrap_or(0) - start) as f64 / 1e3,
            span["duration"].as_i64().unwrap_or(0) as f64 / 1e3,
            span["processID"]
                .as_str()
                .and_then(|p| services.get(p))
                .copied()
                .unwrap_or("?"),
            "  ".repeat(depth(span)),
            span["operationName"].as_str().unwrap_or("?"),
            shown.join(" ")
        );
    }
    Ok(())
}
