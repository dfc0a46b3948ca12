//! `tandemctl bench`: the benchmark harness. In one run, on the stack it is pointed at, it measures
//! - the raw ceilings of the real parts on this machine (Kafka, Postgres, tonic; `ceilings.rs`),
//! - Tandem end to end with single `RecordPurchase` calls, then with bulk `RecordPurchases` calls:
//!   how fast the gateway acknowledged the purchases, the acknowledgement latencies, and how long
//!   until the referral ledger had attributed every one,
//! - the CPU seconds and peak memory of each service process and of the broker,
//!
//! and prints a table and writes the same figures as JSON, so runs can be compared.
//!
//! This is a benchmark, not a test: it asserts nothing and its numbers depend on the machine.
//! (A test runs its short form and checks that every figure is there.)

use std::path::PathBuf;
use std::time::{Duration, Instant};

use prost::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use serde::Serialize;
use tandem_bus::BusConfig;
use tandem_proto::v1 as pb;

use crate::call;
use crate::ceilings::{self, CeilingSettings, Ceilings, Rate};
use crate::client::{authorised, GatewayArgs};
use crate::network::{in_parallel, refused, Network, NetworkSettings};
use crate::process::{self, Machine, ProcessUsage};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    #[command(flatten)]
    bus: tandem_runtime::BusArgs,
    /// A Postgres server URL for the Postgres ceiling (a scratch schema is created and dropped).
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Partnerships of the benchmark's network: one acceptor and this many referrers; the first
    /// partnership takes half the traffic.
    #[arg(long, default_value_t = 1_000)]
    partnerships: usize,
    /// Referred customers the purchases are spread over (half of them the hot partnership's).
    #[arg(long, default_value_t = 100_000)]
    customers: usize,
    /// The ledger's consumer group prefix: the set-up waits until the ledger has read every
    /// referring purchase.
    #[arg(
        long,
        env = "TANDEM_LEDGER_CONSUMER_GROUP",
        default_value = "referral-ledger"
    )]
    ledger_group: String,
    /// Purchases to record, in each of the two workloads (single calls, bulk calls).
    #[arg(long, default_value_t = 5_000)]
    purchases: usize,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Items per RecordPurchases call in the bulk workload, 1 to 500.
    #[arg(long, default_value_t = 100)]
    bulk: usize,
    /// Purchases of the history run: one partnership, bulk calls; the end-to-end rate over the
    /// last tenth divided by the rate over the first (the long form is 1000000). 0 skips
    /// it.
    #[arg(long, default_value_t = 0)]
    history: usize,
    /// Seconds-scale counts everywhere (what CI runs): the figures are there, their values mean
    /// little.
    #[arg(long)]
    short: bool,
    /// Where the local scripts keep `<process>.pid` files; every process found there is measured.
    #[arg(long, default_value = ".tandem/pids")]
    pids_dir: PathBuf,
    /// Where to write the JSON result.
    #[arg(long, default_value = "bench-result.json")]
    json: PathBuf,
    /// Give up waiting for the ledger after this long.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

/// What one harness run measures, as a library call (the CLI and the test build one).
#[derive(Debug, Clone)]
pub struct Settings {
    pub gateway: crate::client::GatewayUrl,
    pub operator_token: String,
    pub bus: BusConfig,
    pub database_url: String,
    /// The ledger's consumer group prefix.
    pub ledger_group: String,
    pub partnerships: usize,
    pub customers: usize,
    pub purchases: usize,
    pub concurrency: usize,
    pub bulk: usize,
    pub ceilings: CeilingSettings,
    /// (name, pid) of every process to measure.
    pub processes: Vec<(String, u32)>,
    /// How long the open-loop latency run sends, at half the single-call end-to-end rate.
    pub open_loop_seconds: f64,
    /// Purchases of the history run (one partnership, bulk calls); 0 skips it.
    pub history_purchases: usize,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    /// `RecordPurchase` calls, or `RecordPurchases` calls of `items_per_call`.
    pub calls: String,
    pub items_per_call: usize,
    pub purchases_sent: u64,
    /// Purchases the ledger attributed (equal to those sent when the run is complete).
    pub purchases_attributed: u64,
    /// From the first call to the last acknowledgement.
    pub acknowledged: Rate,
    /// Per call, closed loop (each client waits for its answer before the next call).
    pub acknowledgement_latency: Latency,
    /// From the first call until the ledger had attributed every purchase.
    pub end_to_end: Rate,
    /// CPU seconds each measured process spent during this workload.
    pub cpu_seconds: Vec<(String, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// End-to-end single-call rate over the slowest of the Kafka produce, Postgres one-row
    /// transaction and tonic ceilings (target ≥ 0.4).
    pub single_over_slowest_ceiling: f64,
    /// End-to-end bulk rate over the lower of the Kafka produce and Postgres batched ceilings
    /// (target ≥ 0.5).
    pub bulk_over_lower_of_kafka_and_postgres: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub started_at: String,
    pub machine: Machine,
    pub ceilings: Ceilings,
    pub single: Workload,
    pub bulk: Workload,
    /// Latency from the POS call to the ledger's event, at half the sustained single-call rate.
    pub open_loop: OpenLoop,
    /// How cost grows with a partnership's history (absent when not run).
    pub history: Option<History>,
    pub ratios: Ratios,
    /// Peak RSS and total CPU of each measured process at the end of the run.
    pub processes: Vec<ProcessUsage>,
}

pub async fn run(args: BenchArgs) -> Result<(), String> {
    let short = args.short;
    let settings = Settings {
        gateway: args.gateway.url.clone(),
        operator_token: args.gateway.operator_token.clone(),
        bus: args.bus.bus_config(),
        database_url: args.database_url.clone(),
        ledger_group: args.ledger_group.clone(),
        partnerships: if short { 10 } else { args.partnerships },
        customers: if short { 200 } else { args.customers },
        purchases: if short { 200 } else { args.purchases },
        concurrency: args.concurrency,
        bulk: args.bulk,
        ceilings: if short {
            CeilingSettings::short(args.concurrency)
        } else {
            CeilingSettings::full(args.concurrency)
        },
        processes: process::from_pid_files(&args.pids_dir),
        open_loop_seconds: if short { 2.0 } else { 10.0 },
        history_purchases: if short { 500 } else { args.history },
        timeout: Duration::from_secs(args.timeout_secs),
    };
    let report = measure(&settings).await?;
    print_report(&report);
    write_json(&args.json, &report)
}

/// Writes a benchmark's report as pretty JSON and says where.
pub(crate) fn write_json(path: &std::path::Path, report: &impl Serialize) -> Result<(), String> {
    let json = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    std::fs::write(path, json + "\n").map_err(|e| format!("write {}: {e}", path.display()))?;
    println!("JSON result written to {}", path.display());
    Ok(())
}

/// Runs every measurement of the harness.
pub async fn measure(settings: &Settings) -> Result<Report, String> {
    if !(1..=500).contains(&settings.bulk) {
        return Err("the bulk workload takes 1 to 500 items a call".into());
    }
    if (1..10).contains(&settings.history_purchases) {
        return Err("the history run needs at least 10 purchases (or 0 to skip it)".into());
    }
    let started_at = chrono::Utc::now().to_rfc3339();
    let ceilings =
        ceilings::measure(&settings.bus, &settings.database_url, &settings.ceilings).await?;
    let network = Network::build(&NetworkSettings {
        gateway: settings.gateway.clone(),
        operator_token: settings.operator_token.clone(),
        bus: settings.bus.clone(),
        ledger_group: settings.ledger_group.clone(),
        partnerships: settings.partnerships,
        customers: settings.customers,
        concurrency: settings.concurrency,
        timeout: settings.timeout,
    })
    .await?;
    let single = workload(settings, &network, None).await?;
    let bulk = workload(settings, &network, Some(settings.bulk)).await?;
    let open_loop = open_loop(
        settings,
        &network,
        single.end_to_end.per_second / 2.0,
        settings.open_loop_seconds,
    )
    .await?;
    let history = match settings.history_purchases {
        0 => None,
        purchases => Some(history(settings, &network, purchases).await?),
    };
    let slowest = ceilings
        .kafka_produce
        .per_second
        .min(ceilings.postgres_single_row_transactions.per_second)
        .min(ceilings.tonic_unary_calls.per_second);
    let lower = ceilings
        .kafka_produce
        .per_second
        .min(ceilings.postgres_batched_rows.per_second);
    let ratios = Ratios {
        single_over_slowest_ceiling: single.end_to_end.per_second / slowest,
        bulk_over_lower_of_kafka_and_postgres: bulk.end_to_end.per_second / lower,
    };
    Ok(Report {
        started_at,
        machine: process::machine(),
        ceilings,
        single,
        bulk,
        open_loop,
        history,
        ratios,
        processes: settings
            .processes
            .iter()
            .filter_map(|(name, pid)| process::usage(name, *pid))
            .collect(),
    })
}

/// One workload on the network: `purchases` purchases at the acceptor (half of them the hot
/// partnership's), in single calls or bulk calls of `bulk` items.
async fn workload(
    settings: &Settings,
    network: &Network,
    bulk: Option<usize>,
) -> Result<Workload, String> {
    let run = if bulk.is_some() { "bulk" } else { "single" };
    let before = network.attributed(None).await?;
    let cpu_before = cpu_of(&settings.processes);
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..settings.concurrency {
        let mut pos = network.pos.clone();
        let api_key = network.acceptor.api_key.clone();
        let mine: Vec<usize> = (worker..settings.purchases)
            .step_by(settings.concurrency)
            .collect();
        let requests: Vec<pb::RecordPurchaseRequest> = mine
            .iter()
            .map(|&index| network.purchase(run, index))
            .collect();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            match bulk {
                Some(size) => {
                    for chunk in requests.chunks(size) {
                        let request = pb::RecordPurchasesRequest {
                            purchases: chunk.to_vec(),
                        };
                        let sent = Instant::now();
                        let response = call!(
                            "record purchases",
                            pos.record_purchases(authorised(request.clone(), &api_key)?)
                        )?;
                        latencies.push(sent.elapsed());
                        if let Some(refused) = refused(&response) {
                            return Err(refused);
                        }
                    }
                }
                None => {
                    for request in requests {
                        let sent = Instant::now();
                        call!(
                            "record purchase",
                            pos.record_purchase(authorised(request.clone(), &api_key)?)
                        )?;
                        latencies.push(sent.elapsed());
                    }
                }
            }
            Ok::<_, String>(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(settings.purchases);
    for worker in workers {
        latencies.extend(worker.await.map_err(|e| e.to_string())??);
    }
    let acknowledged = Rate::of(settings.purchases as u64, started.elapsed());
    latencies.sort();
    let acknowledgement_latency = latency_of(&latencies);
    let attributed = network
        .wait_attributed(None, before + settings.purchases as u64, settings.timeout)
        .await?
        - before;
    let end_to_end = Rate::of(settings.purchases as u64, started.elapsed());
    let cpu_after = cpu_of(&settings.processes);
    Ok(Workload {
        calls: match bulk {
            Some(_) => "RecordPurchases".into(),
            None => "RecordPurchase".into(),
        },
        items_per_call: bulk.unwrap_or(1),
        purchases_sent: settings.purchases as u64,
        purchases_attributed: attributed,
        acknowledged,
        acknowledgement_latency,
        end_to_end,
        cpu_seconds: cpu_after
            .into_iter()
            .zip(cpu_before)
            .map(|((name, after), (_, before))| (name, after - before))
            .collect(),
    })
}

/// How cost grows with history: one partnership takes `purchases` purchases in bulk calls; the
/// end-to-end rate over the last tenth divided by the rate over the first tenth (target ≥ 0.9).
#[derive(Debug, Clone, Serialize)]
pub struct History {
    pub purchases: u64,
    pub first_tenth: Rate,
    pub last_tenth: Rate,
    pub ratio: f64,
}

async fn history(
    settings: &Settings,
    network: &Network,
    purchases: usize,
) -> Result<History, String> {
    let hot = Some(network.hot_partnership_id.as_str());
    let before = network.attributed(hot).await?;
    let tenth = (purchases / 10).max(1);
    let timed = |range: std::ops::Range<usize>| async move {
        let started = Instant::now();
        let count = range.len() as u64;
        let end = before + range.end as u64;
        send_bulk(settings, network, range).await?;
        network.wait_attributed(hot, end, settings.timeout).await?;
        Ok::<_, String>(Rate::of(count, started.elapsed()))
    };
    let first_tenth = timed(0..tenth).await?;
    timed(tenth..purchases - tenth).await?;
    let last_tenth = timed(purchases - tenth..purchases).await?;
    Ok(History {
        purchases: purchases as u64,
        ratio: last_tenth.per_second / first_tenth.per_second,
        first_tenth,
        last_tenth,
    })
}

/// Records the hot partnership's purchases `range` in bulk calls, `concurrency` calls in flight.
async fn send_bulk(
    settings: &Settings,
    network: &Network,
    range: std::ops::Range<usize>,
) -> Result<(), String> {
    let indices: Vec<usize> = range.collect();
    let calls: Vec<pb::RecordPurchasesRequest> = indices
        .chunks(settings.bulk)
        .map(|chunk| pb::RecordPurchasesRequest {
            purchases: chunk
                .iter()
                .map(|&index| network.hot_purchase("history", index))
                .collect(),
        })
        .collect();
    let api_key = network.acceptor.api_key.clone();
    in_parallel(settings.concurrency, calls, |request| {
        let mut pos = network.pos.clone();
        let api_key = api_key.clone();
        async move {
            let response = call!(
                "record purchases",
                pos.record_purchases(authorised(request.clone(), &api_key)?)
            )?;
            refused(&response).map_or(Ok(()), Err)
        }
    })
    .await?;
    Ok(())
}

/// Percentiles of sorted durations, in milliseconds.
pub(crate) fn latency_of(sorted: &[Duration]) -> Latency {
    let percentile = |per_mille: usize| {
        sorted
            .get((sorted.len() * per_mille / 1000).min(sorted.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
            .as_secs_f64()
            * 1e3
    };
    Latency {
        p50_ms: percentile(500),
        p99_ms: percentile(990),
        p999_ms: percentile(999),
    }
}

/// CPU seconds so far of every measured process, of the Postgres server (all its processes) and
/// of this load generator: the machine's cores are shared by all of them.
fn cpu_of(processes: &[(String, u32)]) -> Vec<(String, f64)> {
    let mut cpu: Vec<(String, f64)> = processes
        .iter()
        .map(|(name, pid)| {
            (
                name.clone(),
                process::usage(name, *pid).map_or(0.0, |u| u.cpu_seconds),
            )
        })
        .collect();
    if let Some(seconds) = process::postgres_cpu_seconds() {
        cpu.push(("postgres (all processes)".into(), seconds));
    }
    if let Some(usage) = process::usage("load generator", std::process::id()) {
        cpu.push(("load generator (this harness)".into(), usage.cpu_seconds));
    }
    cpu
}

fn print_report(report: &Report) {
    let c = &report.ceilings;
    println!(
        "machine: {} cores, {:.0} GiB; run started {}",
        report.machine.cores, report.machine.memory_gib, report.started_at
    );
    println!();
    println!(
        "ceilings of the parts on this machine ({} in flight):",
        c.concurrency
    );
    println!(
        "  Kafka produce ({} B messages, {} partitions, acks=all, idempotent) {:>10.0}/s",
        c.kafka_message_bytes, c.kafka_partitions, c.kafka_produce.per_second
    );
    println!(
        "  Kafka consume                                                 {:>10.0}/s",
        c.kafka_consume.per_second
    );
    println!(
        "  Postgres, one durable transaction a row                       {:>10.0}/s",
        c.postgres_single_row_transactions.per_second
    );
    println!(
        "  Postgres, {} rows a transaction                              {:>10.0} rows/s",
        c.postgres_batch_rows, c.postgres_batched_rows.per_second
    );
    println!(
        "  tonic unary RecordPurchase into a no-op server                {:>10.0}/s",
        c.tonic_unary_calls.per_second
    );
    for workload in [&report.single, &report.bulk] {
        println!();
        println!(
            "Tandem, {} ({} a call): {} purchases",
            workload.calls, workload.items_per_call, workload.purchases_sent
        );
        println!(
            "  gateway acknowledged {:>8.0}/s; per call p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms",
            workload.acknowledged.per_second,
            workload.acknowledgement_latency.p50_ms,
            workload.acknowledgement_latency.p99_ms,
            workload.acknowledgement_latency.p999_ms
        );
        println!(
            "  all {} attributed in {:.2} s: {:.0}/s end to end",
            workload.purchases_attributed,
            workload.end_to_end.seconds,
            workload.end_to_end.per_second
        );
        for (name, seconds) in &workload.cpu_seconds {
            println!("  CPU {name}: {seconds:.1} s");
        }
    }
    let open = &report.open_loop;
    println!();
    println!(
        "open loop at {:.0}/s (half the single-call rate): {} of {} purchases announced on the ledger topic; \
         POS call to ledger event p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms",
        open.rate_per_second,
        open.purchases_announced,
        open.purchases_sent,
        open.latency.p50_ms,
        open.latency.p99_ms,
        open.latency.p999_ms
    );
    if let Some(history) = &report.history {
        println!();
        println!(
            "history: {} purchases on one partnership; first tenth {:.0}/s, last tenth {:.0}/s: ratio {:.2} (target 0.90)",
            history.purchases,
            history.first_tenth.per_second,
            history.last_tenth.per_second,
            history.ratio
        );
    }
    println!();
    println!(
        "ratios: single calls / slowest ceiling {:.2} (target 0.40); bulk / lower of Kafka and Postgres {:.2} (target 0.50)",
        report.ratios.single_over_slowest_ceiling, report.ratios.bulk_over_lower_of_kafka_and_postgres
    );
    for process in &report.processes {
        println!(
            "process {} (pid {}): peak RSS {:.0} MiB, {:.1} CPU s in all",
            process.name, process.pid, process.peak_rss_mib, process.cpu_seconds
        );
    }
}

/// The open-loop latency run: purchases sent at a fixed rate (each at its intended time, whether
/// or not earlier calls answered), latency counted from the intended send time to the moment the
/// harness reads the ledger's `PurchaseAttributed` event for it from the `ledger` topic, so a
/// stall anywhere shows up in the figures instead of slowing the sender down.
#[derive(Debug, Clone, Serialize)]
pub struct OpenLoop {
    pub rate_per_second: f64,
    pub purchases_sent: u64,
    /// Purchases whose ledger event was read (equal to those sent when the run is complete).
    pub purchases_announced: u64,
    pub latency: Latency,
}

async fn open_loop(
    settings: &Settings,
    network: &Network,
    rate: f64,
    seconds: f64,
) -> Result<OpenLoop, String> {
    let rate = rate.max(1.0);
    let count = ((rate * seconds).ceil() as usize).max(1);
    // Read the ledger topic from its current end, before the first purchase is sent, and while
    // the purchases are sent: each event is timed when it is read.
    let reader = LedgerReader::from_end(&settings.bus)?;
    let read_until = tokio::time::Instant::now() + settings.timeout;
    let ours = format!("bench-{}-open-", network.tag);
    let reading = tokio::spawn(async move {
        let mut arrivals = Vec::with_capacity(count);
        while arrivals.len() < count && tokio::time::Instant::now() < read_until {
            for transaction_id in reader.attributed(Duration::from_millis(50)).await? {
                if transaction_id.starts_with(&ours) {
                    arrivals.push((transaction_id, tokio::time::Instant::now()));
                }
            }
        }
        Ok::<_, String>(arrivals)
    });
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut intended = std::collections::HashMap::with_capacity(count);
    let mut calls = Vec::with_capacity(count);
    for index in 0..count {
        let at = start + interval.mul_f64(index as f64);
        let request = network.purchase("open", index);
        intended.insert(request.transaction_id.clone(), at);
        let mut pos = network.pos.clone();
        let api_key = network.acceptor.api_key.clone();
        calls.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            call!(
                "record purchase",
                pos.record_purchase(authorised(request.clone(), &api_key)?)
            )
            .map(|_| ())
        }));
    }
    for sent in calls {
        sent.await.map_err(|e| e.to_string())??;
    }
    let mut latencies = Vec::with_capacity(count);
    for (transaction_id, read_at) in reading.await.map_err(|e| e.to_string())?? {
        // Only this run's purchases, each once (an event may be read twice after a redelivery).
        if let Some(at) = intended.remove(&transaction_id) {
            latencies.push(read_at.duration_since(at));
        }
    }
    let announced = latencies.len() as u64;
    latencies.sort();
    Ok(OpenLoop {
        rate_per_second: rate,
        purchases_sent: count as u64,
        purchases_announced: announced,
        latency: latency_of(&latencies),
    })
}

/// Reads `PurchaseAttributed` events from the `ledger` topic, every partition, from where the
/// topic ended when the reader was made.
pub(crate) struct LedgerReader {
    consumer: StreamConsumer,
}

impl LedgerReader {
    pub(crate) fn from_end(bus: &BusConfig) -> Result<Self, String> {
        let topic = tandem_bus::Topic::Ledger.name(bus);
        let consumer: StreamConsumer = bus
            .client_config()
            .set(
                "group.id",
                format!("bench-latency-{}", uuid::Uuid::new_v4().simple()),
            )
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| format!("ledger topic reader: {e}"))?;
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .map_err(|e| format!("ledger topic metadata: {e}"))?;
        let mut assignment = TopicPartitionList::new();
        for partition in metadata
            .topics()
            .first()
            .map(|t| t.partitions())
            .unwrap_or_default()
        {
            let (_, high) = consumer
                .fetch_watermarks(&topic, partition.id(), Duration::from_secs(10))
                .map_err(|e| format!("ledger topic watermarks: {e}"))?;
            assignment
                .add_partition_offset(&topic, partition.id(), Offset::Offset(high))
                .map_err(|e| e.to_string())?;
        }
        consumer
            .assign(&assignment)
            .map_err(|e| format!("assign: {e}"))?;
        Ok(Self { consumer })
    }

    /// The transaction ids of the purchases attributed in the events read within `wait`.
    pub(crate) async fn attributed(&self, wait: Duration) -> Result<Vec<String>, String> {
        let mut found = Vec::new();
        let until = tokio::time::Instant::now() + wait;
        while let Ok(message) = tokio::time::timeout_at(until, self.consumer.recv()).await {
            let Ok(message) = message else { continue };
            let Some(payload) = message.payload() else {
                continue;
            };
            if let Ok(event) = pb::LedgerEvent::decode(payload) {
                if let Some(pb::ledger_event::Event::PurchaseAttributed(attributed)) = event.event {
                    found.push(attributed.transaction_id);
                }
            }
        }
        Ok(found)
    }
}
