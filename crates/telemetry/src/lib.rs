//! Telemetry for every Tandem binary, initialised once by [`init`]:
//!
//! - structured JSON logs on stdout, filtered by `RUST_LOG` (default `info`);
//! - OpenTelemetry spans from `tracing`, exported over OTLP/gRPC when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set (spans still get trace ids without it, so the context
//!   still propagates);
//! - W3C trace context (`traceparent`) carried in gRPC metadata and Kafka headers, so one trace
//!   follows a purchase from the POS call to the referrer.
//!
//! Spans carry merchant, event and purchase ids. They never carry customer identifiers: those are
//! turned into customer keys before any span sees them.

use std::collections::HashMap;

mod metrics;
pub use metrics::{meter, prometheus_text};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("could not build the OTLP metric exporter for {endpoint}")]
    MetricExporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("could not build the OTLP span exporter for {endpoint}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInitialised(#[source] tracing_subscriber::util::TryInitError),
}

/// Flushes and shuts down span export when dropped; keep it alive for the life of `main`.
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
    meters: Option<opentelemetry_sdk::metrics::SdkMeterProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("telemetry: span export did not shut down cleanly: {error}");
        }
        if let Some(Err(error)) = self.meters.as_ref().map(|m| m.shutdown()) {
            eprintln!("telemetry: metric export did not shut down cleanly: {error}");
        }
    }
}

/// Installs logging and tracing for the binary `service_name`.
pub fn init(service_name: &'static str) -> Result<TelemetryGuard, TelemetryError> {
    let provider = tracer_provider(service_name)?;
    let endpoint = otlp_endpoint();
    let meters =
        metrics::install(resource(service_name), endpoint.as_deref()).map_err(|source| {
            TelemetryError::MetricExporter {
                endpoint: endpoint.clone().unwrap_or_default(),
                source,
            }
        })?;
    let tracer = provider.tracer(service_name);
    // The log filter applies to the logs only: spans are always recorded for tracing at INFO,
    // so that trace context keeps propagating whatever RUST_LOG says.
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .with_target(true)
                .with_filter(log_filter("info,sqlx=warn")),
        )
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(LevelFilter::INFO),
        )
        .try_init()
        .map_err(TelemetryError::AlreadyInitialised)?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Ok(TelemetryGuard { provider, meters })
}

/// Installs human-readable logs for tests, shown only when `TEST_LOG` is set. Safe to call from
/// every test: only the first call installs anything.
pub fn init_for_tests() {
    let _ = metrics::install(resource("tandem-tests"), None);
    let filter = if std::env::var_os("TEST_LOG").is_some() {
        "info"
    } else {
        "off"
    };
    let provider = SdkTracerProvider::builder().build();
    let tracer = provider.tracer("test");
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(log_filter(filter)),
        )
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(LevelFilter::INFO),
        )
        .try_init();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
}

/// `RUST_LOG` if set, else `default`.
fn log_filter(default: &str) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default))
}

fn resource(service_name: &'static str) -> Resource {
    Resource::builder().with_service_name(service_name).build()
}

/// `OTEL_EXPORTER_OTLP_ENDPOINT`, when set and not empty.
fn otlp_endpoint() -> Option<String> {
    std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
}

fn tracer_provider(service_name: &'static str) -> Result<SdkTracerProvider, TelemetryError> {
    let builder = SdkTracerProvider::builder().with_resource(resource(service_name));
    let Some(endpoint) = otlp_endpoint() else {
        return Ok(builder.build());
    };
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .build()
        .map_err(|source| TelemetryError::Exporter { endpoint, source })?;
    Ok(builder.with_batch_exporter(exporter).build())
}

/// The current span's trace context as header pairs (`traceparent`, maybe `tracestate`), to
/// attach to an outgoing message.
pub fn current_trace_headers() -> Vec<(String, String)> {
    let context = tracing::Span::current().context();
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut HeaderCarrier(&mut carrier));
    let mut headers: Vec<(String, String)> = carrier.into_iter().collect();
    headers.sort();
    headers
}

/// Makes `span` a child of the trace context found in `headers` (from a Kafka message or gRPC
/// metadata). Without a valid `traceparent`, the span starts a new trace.
pub fn set_parent_from_headers<'a>(
    span: &tracing::Span,
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) {
    let _ = span.set_parent(extract(headers));
}

/// The trace context in `headers` (names in any case).
fn extract<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> opentelemetry::Context {
    let carrier: HashMap<String, String> = headers
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
        .collect();
    TraceContextPropagator::new().extract(&HeaderMapView(&carrier))
}

/// An error and all its causes, `outer: inner: innermost`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Adds to `span` a link to the trace context found in `headers` (a message of a batch the span
/// processes), if there is a valid one.
pub fn link_from_headers<'a>(
    span: &tracing::Span,
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) {
    use opentelemetry::trace::TraceContextExt;
    let linked = extract(headers).span().span_context().clone();
    if linked.is_valid() {
        span.add_link(linked);
    }
}

/// Writes the span's trace id into its `trace_id` field (declare it as
/// `trace_id = tracing::field::Empty`), so that every log line inside the span names the trace an
/// operator can open.
pub fn record_trace_id(span: &tracing::Span) {
    use opentelemetry::trace::TraceContextExt;
    let trace_id = span.context().span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}

struct HeaderCarrier<'a>(&'a mut HashMap<String, String>);

impl Injector for HeaderCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct HeaderMapView<'a>(&'a HashMap<String, String>);

impl Extractor for HeaderMapView<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use opentelemetry::trace::TraceContextExt;

    #[test]
    fn a_span_joins_the_trace_in_its_headers_and_passes_it_on() {
        init_for_tests();
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let span = tracing::info_span!("consume", trace_id = tracing::field::Empty);
        set_parent_from_headers(&span, [("traceparent", incoming)]);
        record_trace_id(&span);
        let trace_id = span.context().span().span_context().trace_id().to_string();
        assert_eq!(trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        let outgoing = span.in_scope(current_trace_headers);
        let traceparent = &outgoing.iter().find(|(k, _)| k == "traceparent").unwrap().1;
        assert!(
            traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{traceparent}"
        );
        assert!(
            !traceparent.contains("00f067aa0ba902b7"),
            "a child span has its own span id"
        );
    }
}
