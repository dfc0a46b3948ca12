//! The Prometheus scrape endpoint every service serves on a port of its own: `GET /metrics`
//! answers the process's metrics in the text format; anything else is 404 (405 for another
//! method on `/metrics`).

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            (StatusCode::OK, tandem_telemetry::prometheus_text())
        }
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET /metrics\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "metrics are at /metrics\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(CONTENT_TYPE) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    Ok(response)
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve_metrics(listener: TcpListener, shutdown: CancellationToken) {
    tracing::info!(address = ?listener.local_addr().ok(), "metrics endpoint listening (GET /metrics)");
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(answer));
            tokio::select! {
                _ = connection => {}
                () = shutdown.cancelled() => {}
            }
        });
    }
}
