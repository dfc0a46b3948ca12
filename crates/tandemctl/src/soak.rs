//! `tandemctl soak`: a long run at a fixed rate, reported window by window, to show that nothing
//! grows that should not: purchases are sent open loop (each at its intended time, whatever the
//! answers), and for every window (a minute by default) it reports the acknowledgement latency
//! and the latency from the POS call to the ledger's event (both from the intended send time),
//! the ledger's consumer lag at the window's end, and the resident memory and CPU of every
//! process of the stack. The first and last windows are printed side by side.
//!
//! A benchmark, not a test: it asserts nothing. (A test runs a seconds-long form and checks that
//! every figure is there.)

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tandem_bus::{BusConfig, Topic};
use tokio::time::Instant;

use crate::bench::{latency_of, write_json, Latency, LedgerReader};
use crate::call;
use crate::client::{authorised, GatewayArgs};
use crate::network::{Network, NetworkSettings};
use crate::process;

#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    #[command(flatten)]
    bus: tandem_runtime::BusArgs,
    /// The ledger's consumer group prefix: its lag is sampled at the end of every window.
    #[arg(
        long,
        env = "TANDEM_LEDGER_CONSUMER_GROUP",
        default_value = "referral-ledger"
    )]
    ledger_group: String,
    /// Partnerships of the network the purchases are spread over.
    #[arg(long, default_value_t = 100)]
    partnerships: usize,
    /// Referred customers the purchases are spread over.
    #[arg(long, default_value_t = 20_000)]
    customers: usize,
    /// Purchases per second. The default is half the sustained single-call rate recorded in
    /// docs/BENCHMARKS.md (1 085/s end to end).
    #[arg(long, default_value_t = 540.0)]
    rate: f64,
    /// Length of the run, in seconds.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Length of one reporting window, in seconds.
    #[arg(long, default_value_t = 60)]
    window_secs: u64,
    /// Where the local scripts keep `<process>.pid` files; every process found there is measured.
    #[arg(long, default_value = ".tandem/pids")]
    pids_dir: PathBuf,
    /// Where to write the JSON result.
    #[arg(long, default_value = "soak-result.json")]
    json: PathBuf,
}

/// What one soak measures, as a library call (the CLI and the test build one).
#[derive(Debug, Clone)]
pub struct Settings {
    pub gateway: crate::client::GatewayUrl,
    pub operator_token: String,
    pub bus: BusConfig,
    pub ledger_group: String,
    pub partnerships: usize,
    pub customers: usize,
    pub rate: f64,
    pub duration: Duration,
    pub window: Duration,
    /// (name, pid) of every process to measure.
    pub processes: Vec<(String, u32)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Window {
    /// Seconds from the start of the run to the window's start.
    pub starts_at_secs: u64,
    pub purchases_sent: u64,
    pub purchases_acknowledged: u64,
    /// Purchases the gateway refused (after the client's retries): counted, not fatal.
    pub purchases_failed: u64,
    /// Purchases of this window whose ledger event was read.
    pub purchases_announced: u64,
    /// From the intended send time to the gateway's answer.
    pub acknowledgement: Latency,
    /// From the intended send time to the ledger's `PurchaseAttributed` event.
    pub end_to_end: Latency,
    /// Messages waiting for the ledger's consumer groups when the window ended; `None` if the
    /// broker could not say.
    pub ledger_lag: Option<i64>,
    /// Resident memory (MiB) of each measured process when the window ended.
    pub rss_mib: Vec<(String, f64)>,
    /// CPU seconds each measured process spent in the window.
    pub cpu_seconds: Vec<(String, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub started_at: String,
    pub machine: process::Machine,
    pub rate_per_second: f64,
    pub windows: Vec<Window>,
}

pub async fn run(args: SoakArgs) -> Result<(), String> {
    if args.window_secs == 0 || args.seconds < args.window_secs {
        return Err("--seconds must hold at least one --window-secs window".into());
    }
    let settings = Settings {
        gateway: args.gateway.url.clone(),
        operator_token: args.gateway.operator_token.clone(),
        bus: args.bus.bus_config(),
        ledger_group: args.ledger_group.clone(),
        partnerships: args.partnerships,
        customers: args.customers,
        rate: args.rate,
        duration: Duration::from_secs(args.seconds),
        window: Duration::from_secs(args.window_secs),
        processes: process::from_pid_files(&args.pids_dir),
    };
    let report = soak(&settings).await?;
    print_report(&report);
    write_json(&args.json, &report)
}

/// Per window: acknowledgement and end-to-end latencies, and how many were acknowledged.
#[derive(Default)]
struct Tally {
    sent: u64,
    failed: u64,
    acknowledged: Vec<Duration>,
    announced: Vec<Duration>,
}

pub async fn soak(settings: &Settings) -> Result<Report, String> {
    if !(settings.rate > 0.0 && settings.rate <= 100_000.0) {
        return Err("the rate must be above 0 and at most 100000 purchases a second".into());
    }
    let windows =
        (settings.duration.as_secs_f64() / settings.window.as_secs_f64()).floor() as usize;
    if windows == 0 {
        return Err("the run must hold at least one window".into());
    }
    let started_at = chrono::Utc::now().to_rfc3339();
    let network = Network::build(&NetworkSettings {
        gateway: settings.gateway.clone(),
        operator_token: settings.operator_token.clone(),
        bus: settings.bus.clone(),
        ledger_group: settings.ledger_group.clone(),
        partnerships: settings.partnerships,
        customers: settings.customers,
        concurrency: 32,
        timeout: Duration::from_secs(600),
    })
    .await?;
    let tallies: Arc<Mutex<Vec<Tally>>> =
        Arc::new(Mutex::new((0..windows).map(|_| Tally::default()).collect()));
    let interval = Duration::from_secs_f64(1.0 / settings.rate);
    let start = Instant::now() + Duration::from_millis(200);
    let window_of = {
        let window = settings.window;
        move |at: Instant| (at.duration_since(start).as_secs_f64() / window.as_secs_f64()) as usize
    };
    let count = (settings.rate * settings.window.as_secs_f64() * windows as f64) as usize;

    // The ledger topic, read from its end while the purchases are sent: each event is timed
    // when read, against the intended send time of its purchase.
    let intended: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let reader = LedgerReader::from_end(&settings.bus)?;
    let ours = format!("bench-{}-soak-", network.tag);
    let end = start + settings.window * windows as u32;
    let sender_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reading = tokio::spawn({
        let (intended, tallies, sender_done) =
            (intended.clone(), tallies.clone(), sender_done.clone());
        async move {
            // Events of the last window may come after it: read until every purchase was
            // seen, or 30 s past the end.
            loop {
                let now = Instant::now();
                let all_seen = sender_done.load(std::sync::atomic::Ordering::Acquire)
                    && intended
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .is_empty();
                if all_seen || now >= end + Duration::from_secs(30) {
                    break;
                }
                for transaction_id in reader.attributed(Duration::from_millis(50)).await? {
                    if !transaction_id.starts_with(&ours) {
                        continue;
                    }
                    let read_at = Instant::now();
                    if let Some(at) = intended
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&transaction_id)
                    {
                        let mut tallies = tallies.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(tally) = tallies.get_mut(window_of(at)) {
                            tally.announced.push(read_at.duration_since(at));
                        }
                    }
                }
            }
            Ok::<_, String>(())
        }
    });

    // The sender: one task per purchase, each at its intended time.
    let network = Arc::new(network);
    let sending = tokio::spawn({
        let (intended, tallies, network) = (intended.clone(), tallies.clone(), network.clone());
        let sender_done = sender_done.clone();
        let pos = network.pos.clone();
        let api_key = network.acceptor.api_key.clone();
        async move {
            let mut calls = tokio::task::JoinSet::new();
            for index in 0..count {
                let request = network.purchase("soak", index);
                let at = start + interval.mul_f64(index as f64);
                tokio::time::sleep_until(at).await;
                intended
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(request.transaction_id.clone(), at);
                if let Some(tally) = tallies
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(window_of(at))
                {
                    tally.sent += 1;
                }
                let (mut pos, api_key, tallies) = (pos.clone(), api_key.clone(), tallies.clone());
                calls.spawn(async move {
                    let answer = call!(
                        "record purchase",
                        pos.record_purchase(authorised(request.clone(), &api_key)?)
                    );
                    let answered = Instant::now();
                    if let Some(tally) = tallies
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_mut(window_of(at))
                    {
                        match answer {
                            Ok(_) => tally.acknowledged.push(answered.duration_since(at)),
                            Err(error) => {
                                tally.failed += 1;
                                eprintln!("soak: a purchase failed: {error}");
                            }
                        }
                    }
                    Ok::<_, String>(())
                });
                while let Some(done) = calls.try_join_next() {
                    done.map_err(|e| e.to_string())??;
                }
            }
            while let Some(done) = calls.join_next().await {
                done.map_err(|e| e.to_string())??;
            }
            sender_done.store(true, std::sync::atomic::Ordering::Release);
            Ok::<_, String>(())
        }
    });

    // At the end of every window: the ledger's lag, and each process's memory and CPU.
    let monitors: Arc<Vec<_>> = Arc::new(
        ["activity", "commissions"]
            .into_iter()
            .map(|stage| {
                tandem_bus::group_monitor(
                    &settings.bus,
                    &format!("{}.{stage}", settings.ledger_group),
                )
            })
            .collect::<Result<_, _>>()
            .map_err(|e| format!("ledger group monitor: {e}"))?,
    );
    let topics: Vec<String> = [Topic::CustomerActivity, Topic::Attributions]
        .iter()
        .map(|topic| topic.name(&settings.bus))
        .collect();
    let mut samples: Vec<Sample> = Vec::with_capacity(windows);
    let mut cpu_before: HashMap<String, f64> = cpu_now(&settings.processes);
    for window in 0..windows {
        tokio::time::sleep_until(start + settings.window * (window as u32 + 1)).await;
        let lag = {
            let topics = topics.clone();
            let monitors = monitors.clone();
            tokio::task::spawn_blocking(move || {
                monitors
                    .iter()
                    .zip(&topics)
                    .map(|(monitor, topic)| {
                        tandem_bus::group_positions(
                            monitor,
                            std::slice::from_ref(topic),
                            Duration::from_secs(5),
                        )
                        .map(|positions| positions.iter().map(|p| p.lag).sum::<i64>())
                        .ok()
                    })
                    .sum::<Option<i64>>()
            })
            .await
            .map_err(|e| e.to_string())?
        };
        let rss = settings
            .processes
            .iter()
            .filter_map(|(name, pid)| Some((name.clone(), process::memory_mib(*pid, "VmRSS:")?)))
            .collect();
        let cpu_after = cpu_now(&settings.processes);
        let cpu = cpu_after
            .iter()
            .map(|(name, after)| {
                (
                    name.clone(),
                    after - cpu_before.get(name).copied().unwrap_or(*after),
                )
            })
            .collect();
        cpu_before = cpu_after;
        eprintln!(
            "soak: window {} of {windows} done, ledger lag {}",
            window + 1,
            lag.map_or_else(|| "unknown".to_owned(), |lag| lag.to_string())
        );
        samples.push((lag, rss, cpu));
    }
    sending.await.map_err(|e| e.to_string())??;
    reading.await.map_err(|e| e.to_string())??;
    // Clients with a group id close synchronously: not on the runtime's threads.
    drop(tokio::task::spawn_blocking(move || drop(monitors)).await);

    let tallies = std::mem::take(&mut *tallies.lock().unwrap_or_else(|e| e.into_inner()));
    let windows = tallies
        .into_iter()
        .zip(samples)
        .enumerate()
        .map(|(index, (mut tally, (ledger_lag, rss_mib, cpu_seconds)))| {
            tally.acknowledged.sort();
            tally.announced.sort();
            Window {
                starts_at_secs: settings.window.as_secs() * index as u64,
                purchases_sent: tally.sent,
                purchases_acknowledged: tally.acknowledged.len() as u64,
                purchases_failed: tally.failed,
                purchases_announced: tally.announced.len() as u64,
                acknowledgement: latency_of(&tally.acknowledged),
                end_to_end: latency_of(&tally.announced),
                ledger_lag,
                rss_mib,
                cpu_seconds,
            }
        })
        .collect();
    Ok(Report {
        started_at,
        machine: process::machine(),
        rate_per_second: settings.rate,
        windows,
    })
}

/// What is sampled at the end of a window: the ledger's lag, then each process's resident memory
/// and the CPU it spent in the window.
type Sample = (Option<i64>, Vec<(String, f64)>, Vec<(String, f64)>);

fn cpu_now(processes: &[(String, u32)]) -> HashMap<String, f64> {
    processes
        .iter()
        .filter_map(|(name, pid)| Some((name.clone(), process::usage(name, *pid)?.cpu_seconds)))
        .collect()
}

fn print_report(report: &Report) {
    println!(
        "soak at {:.0} purchases/s, {} windows",
        report.rate_per_second,
        report.windows.len()
    );
    println!(
        "{:>7} {:>6} {:>6} {:>6} {:>9} {:>9} {:>9} {:>9} {:>7}  memory (MiB)",
        "window", "sent", "acked", "seen", "ack p50", "ack p99", "e2e p50", "e2e p99", "lag"
    );
    let row = |label: String, window: &Window| {
        let memory: Vec<String> = window
            .rss_mib
            .iter()
            .map(|(name, mib)| format!("{name} {mib:.0}"))
            .collect();
        println!(
            "{label:>7} {:>6} {:>6} {:>6} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7}  {}",
            window.purchases_sent,
            window.purchases_acknowledged,
            window.purchases_announced,
            window.acknowledgement.p50_ms,
            window.acknowledgement.p99_ms,
            window.end_to_end.p50_ms,
            window.end_to_end.p99_ms,
            window
                .ledger_lag
                .map_or_else(|| "?".to_owned(), |lag| lag.to_string()),
            memory.join(", ")
        );
    };
    for window in &report.windows {
        row(format!("{}s", window.starts_at_secs), window);
    }
    if let (Some(first), Some(last)) = (report.windows.first(), report.windows.last()) {
        println!("first and last window side by side:");
        row("first".into(), first);
        row("last".into(), last);
    }
}
