//! Metrics: OpenTelemetry instruments (one meter, `tandem`), read two ways at once:
//!
//! - exported over OTLP/gRPC every `OTEL_METRIC_EXPORT_INTERVAL` (60 s by default) when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set, like the spans;
//! - rendered in the Prometheus text format (version 0.0.4) on demand, for a scrape endpoint
//!   ([`prometheus_text`]), from a reader the process keeps.
//!
//! Names follow OpenTelemetry's conventions (`rpc.server.call.duration`, unit `s`); the
//! Prometheus rendering turns them into Prometheus's (`rpc_server_call_duration_seconds`, a
//! counter's name ending in `_total`), as the OpenTelemetry specification's Prometheus
//! compatibility rules say.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use opentelemetry::metrics::Meter;
use opentelemetry::KeyValue;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
};
use opentelemetry_sdk::Resource;

/// The reader behind the scrape endpoint, shared between the meter provider and [`prometheus_text`].
#[derive(Debug, Clone)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline);
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

static SCRAPE: OnceLock<SharedReader> = OnceLock::new();

/// The meter every Tandem instrument is made from.
pub fn meter() -> Meter {
    opentelemetry::global::meter("tandem")
}

/// Builds the process's meter provider (a scrape reader, plus OTLP export when `otlp_endpoint`
/// is given), installs it as the global one, and starts the process metrics (memory, CPU).
/// Only the first call in a process installs anything; later calls return `None`.
pub(crate) fn install(
    resource: Resource,
    otlp_endpoint: Option<&str>,
) -> Result<Option<SdkMeterProvider>, opentelemetry_otlp::ExporterBuildError> {
    let reader = SharedReader(Arc::new(ManualReader::builder().build()));
    if SCRAPE.set(reader.clone()).is_err() {
        return Ok(None);
    }
    let mut builder = SdkMeterProvider::builder()
        .with_resource(resource)
        .with_reader(reader);
    if let Some(endpoint) = otlp_endpoint {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.to_owned())
            .build()?;
        builder = builder
            .with_reader(opentelemetry_sdk::metrics::PeriodicReader::builder(exporter).build());
    }
    let provider = builder.build();
    opentelemetry::global::set_meter_provider(provider.clone());
    process_metrics();
    Ok(Some(provider))
}

/// `process.memory.usage` (resident set, bytes) and `process.cpu.time` (seconds, user and
/// system), read from `/proc/self` when collected.
fn process_metrics() {
    let meter = meter();
    let _memory = meter
        .u64_observable_gauge("process.memory.usage")
        .with_unit("By")
        .with_description("Resident memory of the process.")
        .with_callback(|observer| {
            if let Some(bytes) = resident_bytes() {
                observer.observe(bytes, &[]);
            }
        })
        .build();
    let _cpu = meter
        .f64_observable_counter("process.cpu.time")
        .with_unit("s")
        .with_description("CPU time the process used, by mode.")
        .with_callback(|observer| {
            if let Some((user, system)) = cpu_seconds() {
                observer.observe(user, &[KeyValue::new("cpu.mode", "user")]);
                observer.observe(system, &[KeyValue::new("cpu.mode", "system")]);
            }
        })
        .build();
}

fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

fn cpu_seconds() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the state.
    let ticks = |index: usize| fields.get(index)?.parse::<f64>().ok();
    // The kernel reports in clock ticks; Linux's USER_HZ is 100 on every architecture Tandem
    // runs on.
    Some((ticks(11)? / 100.0, ticks(12)? / 100.0))
}

/// Everything the process's instruments hold now, in the Prometheus text format.
pub fn prometheus_text() -> String {
    let Some(reader) = SCRAPE.get() else {
        return String::new();
    };
    let mut collected = ResourceMetrics::default();
    if reader.collect(&mut collected).is_err() {
        return String::new();
    }
    encode(&collected)
}

/// One metric family, by its Prometheus name.
#[derive(Default)]
struct Family {
    kind: &'static str,
    help: String,
    samples: Vec<String>,
}

fn encode(collected: &ResourceMetrics) -> String {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for scope in collected.scope_metrics() {
        for metric in scope.metrics() {
            let base = prometheus_name(metric.name(), metric.unit());
            let help = metric.description().to_owned();
            match metric.data() {
                AggregatedMetrics::F64(data) => add(&mut families, &base, help, data),
                AggregatedMetrics::U64(data) => add(&mut families, &base, help, data),
                AggregatedMetrics::I64(data) => add(&mut families, &base, help, data),
            }
        }
    }
    let mut out = String::new();
    for (name, family) in families {
        if !family.help.is_empty() {
            let _ = writeln!(out, "# HELP {name} {}", escape_help(&family.help));
        }
        let _ = writeln!(out, "# TYPE {name} {}", family.kind);
        for sample in family.samples {
            out.push_str(&sample);
        }
    }
    out
}

trait Number: Copy {
    fn text(self) -> String;
}

impl Number for f64 {
    fn text(self) -> String {
        if self.is_nan() {
            "NaN".into()
        } else if self.is_infinite() {
            if self > 0.0 { "+Inf" } else { "-Inf" }.into()
        } else {
            format!("{self}")
        }
    }
}

impl Number for u64 {
    fn text(self) -> String {
        self.to_string()
    }
}

impl Number for i64 {
    fn text(self) -> String {
        self.to_string()
    }
}

fn add<T: Number>(
    families: &mut BTreeMap<String, Family>,
    base: &str,
    help: String,
    data: &MetricData<T>,
) {
    match data {
        MetricData::Gauge(gauge) => {
            let family = family(families, base.to_owned(), "gauge", help);
            for point in gauge.data_points() {
                let labels = labels(point.attributes(), None);
                family
                    .samples
                    .push(format!("{base}{labels} {}\n", point.value().text()));
            }
        }
        MetricData::Sum(sum) => {
            let (name, kind) = if sum.is_monotonic() {
                (format!("{base}_total"), "counter")
            } else {
                (base.to_owned(), "gauge")
            };
            let family = family(families, name.clone(), kind, help);
            for point in sum.data_points() {
                let labels = labels(point.attributes(), None);
                family
                    .samples
                    .push(format!("{name}{labels} {}\n", point.value().text()));
            }
        }
        MetricData::Histogram(histogram) => {
            let family = family(families, base.to_owned(), "histogram", help);
            for point in histogram.data_points() {
                let mut cumulative = 0u64;
                let counts: Vec<u64> = point.bucket_counts().collect();
                for (index, bound) in point.bounds().enumerate() {
                    cumulative += counts.get(index).copied().unwrap_or(0);
                    let labels = labels(point.attributes(), Some(bound.text()));
                    family
                        .samples
                        .push(format!("{base}_bucket{labels} {cumulative}\n"));
                }
                let labels_inf = labels(point.attributes(), Some("+Inf".into()));
                family
                    .samples
                    .push(format!("{base}_bucket{labels_inf} {}\n", point.count()));
                let plain = labels(point.attributes(), None);
                family
                    .samples
                    .push(format!("{base}_sum{plain} {}\n", point.sum().text()));
                family
                    .samples
                    .push(format!("{base}_count{plain} {}\n", point.count()));
            }
        }
        MetricData::ExponentialHistogram(_) => {}
    }
}

fn family<'a>(
    families: &'a mut BTreeMap<String, Family>,
    name: String,
    kind: &'static str,
    help: String,
) -> &'a mut Family {
    let family = families.entry(name).or_default();
    family.kind = kind;
    if family.help.is_empty() {
        family.help = help;
    }
    family
}

/// `{a="1",b="2"}` (with `le` last for a bucket), or nothing without labels.
fn labels<'a>(attributes: impl Iterator<Item = &'a KeyValue>, le: Option<String>) -> String {
    let mut pairs: Vec<(String, String)> = attributes
        .map(|kv| (sanitize(kv.key.as_str()), kv.value.to_string()))
        .collect();
    pairs.sort();
    if let Some(le) = le {
        pairs.push(("le".into(), le));
    }
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .into_iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_value(&v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// An OpenTelemetry name and unit as a Prometheus name: dots and other characters Prometheus
/// does not take become `_`, and the unit becomes a suffix (`s` → `_seconds`, `By` → `_bytes`;
/// dimensionless and annotation units such as `{message}` add nothing).
fn prometheus_name(name: &str, unit: &str) -> String {
    let mut out = sanitize(name);
    let suffix = match unit {
        "s" => "seconds",
        "ms" => "milliseconds",
        "By" => "bytes",
        "%" => "percent",
        _ => "",
    };
    if !suffix.is_empty() && !out.ends_with(suffix) {
        out.push('_');
        out.push_str(suffix);
    }
    out
}

fn sanitize(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn escape_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        assert_eq!(
            prometheus_name("rpc.server.call.duration", "s"),
            "rpc_server_call_duration_seconds"
        );
        assert_eq!(
            prometheus_name("process.memory.usage", "By"),
            "process_memory_usage_bytes"
        );
        assert_eq!(
            prometheus_name("messaging.kafka.consumer.lag", "{message}"),
            "messaging_kafka_consumer_lag"
        );
        assert_eq!(sanitize("9lives-x"), "_9lives_x");
        assert_eq!(escape_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
