//! `tandemctl webhook-bench`: how fast referrers hear of purchases through webhooks. On the
//! stack it is pointed at (which must allow local webhook URLs, as the local stack does), it
//! builds a merchant network (`network.rs`), registers one webhook endpoint per referrer for
//! `purchase.attributed`, all served by one local receiver in this process that verifies every
//! signature and answers at once, and measures:
//!
//! 1. **Latency, open loop**: purchases at the acceptor at a fixed rate (single
//!    `RecordPurchase` calls, each sent at its intended time whatever earlier calls are doing),
//!    and for each the time from that intended time until (a) the gateway answered, (b) the
//!    ledger's `PurchaseAttributed` event was read from the `ledger` topic, (c) the referrer's
//!    endpoint received `purchase.attributed`. (b) splits the path: what the ledger adds and what
//!    notifications add.
//! 2. **Delivery throughput**: every referrer's endpoint replays what it got in (1) at once
//!    (`ReplayWebhooks`), and the receiver counts the deliveries per second until all arrived;
//!    then the hot referrer's endpoint alone (one endpoint: bounded by the per-endpoint
//!    concurrency).
//!
//! A benchmark, not a test: nothing is asserted and the figures depend on the machine.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use notifications::webhook::SigningSecret;
use serde::Serialize;
use tandem_proto::v1 as pb;
use tandem_proto::v1::notification_service_client::NotificationServiceClient;
use tokio::net::TcpListener;

use crate::bench::{latency_of, Latency, LedgerReader};
use crate::call;
use crate::client::{authorised, GatewayArgs};
use crate::network::{in_parallel, Network, NetworkSettings};
use crate::process::{self, ProcessUsage};
use crate::receiver::{Received, Secrets};

#[derive(Debug, clap::Args)]
pub struct WebhookBenchArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    #[command(flatten)]
    bus: tandem_runtime::BusArgs,
    /// The ledger's consumer group prefix: the set-up waits until the ledger has read every
    /// referring purchase.
    #[arg(
        long,
        env = "TANDEM_LEDGER_CONSUMER_GROUP",
        default_value = "referral-ledger"
    )]
    ledger_group: String,
    /// Referrers (each with a webhook endpoint), in partnership with one acceptor.
    #[arg(long, default_value_t = 100)]
    partnerships: usize,
    /// Referred customers the purchases are spread over (half of them the first referrer's).
    #[arg(long, default_value_t = 20_000)]
    customers: usize,
    /// Purchases per second in the latency run.
    #[arg(long, default_value_t = 1_000.0)]
    rate: f64,
    /// How long the latency run sends.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Seconds-scale counts (what CI could run): the figures are there, their values mean little.
    #[arg(long)]
    short: bool,
    /// Where the local scripts keep `<process>.pid` files; every process found there is measured.
    #[arg(long, default_value = ".tandem/pids")]
    pids_dir: PathBuf,
    /// Where to write the JSON result.
    #[arg(long, default_value = "webhook-bench-result.json")]
    json: PathBuf,
    /// Give up waiting after this long in each part.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

#[derive(Debug, Serialize)]
pub struct LatencyRun {
    pub rate_per_second: f64,
    pub purchases_sent: u64,
    /// How long sending took (longer than planned when the sender fell behind).
    pub send_secs: f64,
    pub gateway_answered: Latency,
    pub ledger_event_read: Latency,
    pub webhook_received: Latency,
    /// Purchases whose ledger event / webhook arrived (equal to those sent when complete).
    pub ledger_events: u64,
    pub webhooks: u64,
}

#[derive(Debug, Serialize)]
pub struct Throughput {
    pub endpoints: usize,
    pub deliveries: u64,
    pub secs: f64,
    pub per_second: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub started_at: String,
    pub partnerships: usize,
    pub customers: usize,
    pub latency: LatencyRun,
    pub all_endpoints: Throughput,
    pub one_endpoint: Throughput,
    /// Deliveries whose signature did not verify (0 unless something is wrong).
    pub unverified: u64,
    pub processes: Vec<ProcessUsage>,
}

/// What the receiver got: each delivery's arrival, id and (for `purchase.attributed`) purchase.
#[derive(Default)]
struct Arrivals {
    all: Vec<(Instant, String)>,
    purchases: Vec<(Instant, String)>,
    unverified: u64,
}

fn collect(received: Received, arrivals: &Mutex<Arrivals>) {
    let mut arrivals = arrivals.lock().unwrap_or_else(|e| e.into_inner());
    if received.verified.is_err() {
        arrivals.unverified += 1;
        return;
    }
    if let Ok(body) = serde_json::from_slice::<serde_json::Value>(&received.body) {
        if body["type"] == "purchase.attributed" {
            if let Some(purchase) = body["data"]["purchase_id"].as_str() {
                arrivals.purchases.push((received.at, purchase.to_owned()));
            }
        }
    }
    arrivals.all.push((received.at, received.id));
}

/// What one run measures, as a library call (the CLI and the test build one).
#[derive(Debug, Clone)]
pub struct Settings {
    pub gateway: GatewayArgs,
    pub bus: tandem_bus::BusConfig,
    pub ledger_group: String,
    pub partnerships: usize,
    pub customers: usize,
    pub rate: f64,
    pub seconds: f64,
    /// (name, pid) of every process to measure.
    pub processes: Vec<(String, u32)>,
    pub timeout: Duration,
}

pub async fn run(args: WebhookBenchArgs) -> Result<(), String> {
    let short = args.short;
    let settings = Settings {
        gateway: args.gateway.clone(),
        bus: args.bus.bus_config(),
        ledger_group: args.ledger_group.clone(),
        partnerships: if short { 10 } else { args.partnerships },
        customers: if short { 200 } else { args.customers },
        rate: args.rate,
        seconds: if short { 2.0 } else { args.seconds },
        processes: process::from_pid_files(&args.pids_dir),
        timeout: Duration::from_secs(args.timeout_secs),
    };
    let report = measure(&settings).await?;
    print_report(&report);
    crate::bench::write_json(&args.json, &report)
}

/// Runs every measurement.
pub async fn measure(settings: &Settings) -> Result<Report, String> {
    let (partnerships, customers, timeout) =
        (settings.partnerships, settings.customers, settings.timeout);
    let started_at = chrono::Utc::now();
    let network = Network::build(&NetworkSettings {
        gateway: settings.gateway.url.clone(),
        operator_token: settings.gateway.operator_token.clone(),
        bus: settings.bus.clone(),
        ledger_group: settings.ledger_group.clone(),
        partnerships,
        customers,
        concurrency: 32,
        timeout,
    })
    .await?;
    eprintln!(
        "network {}: 1 acceptor, {partnerships} referrers, {customers} referred customers",
        network.tag
    );

    // The receiver, and an endpoint per referrer at /<n>.
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("bind the receiver: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let channel = settings.gateway.channel()?;
    let hooks = NotificationServiceClient::new(channel);
    let registered = in_parallel(
        16,
        network.referrers.iter().enumerate().collect(),
        |(n, referrer)| {
            let mut hooks = hooks.clone();
            let tag = network.tag.clone();
            async move {
                let created = call!(
                    "create webhook endpoint",
                    hooks.create_webhook_endpoint(authorised(
                        pb::CreateWebhookEndpointRequest {
                            idempotency_key: format!("bench-{tag}-{n}"),
                            url: format!("http://127.0.0.1:{port}/{n}"),
                            types: vec!["purchase.attributed".into()],
                            description: "webhook-bench".into(),
                            ..Default::default()
                        },
                        &referrer.api_key
                    )?)
                )?;
                let secret = SigningSecret::parse(&created.signing_secret)
                    .map_err(|e| format!("the endpoint's secret: {e}"))?;
                let endpoint_id = created.endpoint.map(|e| e.endpoint_id).unwrap_or_default();
                Ok::<_, String>((format!("/{n}"), secret, endpoint_id))
            }
        },
    )
    .await?;
    let secrets: HashMap<String, SigningSecret> = registered
        .iter()
        .map(|(path, secret, _)| (path.clone(), secret.clone()))
        .collect();
    let endpoints: Vec<String> = registered.into_iter().map(|(_, _, id)| id).collect();
    let (sender, mut deliveries) = tokio::sync::mpsc::channel::<Received>(4096);
    tokio::spawn(crate::receiver::serve(
        listener,
        Secrets::ByPath(Arc::new(secrets)),
        sender,
    ));
    let arrivals: Arc<Mutex<Arrivals>> = Arc::default();
    tokio::spawn({
        let arrivals = arrivals.clone();
        async move {
            while let Some(received) = deliveries.recv().await {
                collect(received, &arrivals);
            }
        }
    });

    let latency = latency_run(settings, &network, &arrivals).await?;
    eprintln!(
        "latency at {:.0}/s: webhook p50 {:.1} ms, p99 {:.1} ms",
        latency.rate_per_second, latency.webhook_received.p50_ms, latency.webhook_received.p99_ms
    );

    // Throughput: every endpoint replays this run's purchases at once, then the hot one alone.
    let replay = |endpoint_ids: Vec<(String, String)>| {
        let hooks = hooks.clone();
        async move {
            let queued = in_parallel(16, endpoint_ids, |(endpoint_id, api_key)| {
                let mut hooks = hooks.clone();
                async move {
                    Ok::<_, String>(
                        call!(
                            "replay webhooks",
                            hooks.replay_webhooks(authorised(
                                pb::ReplayWebhooksRequest {
                                    endpoint_id: endpoint_id.clone(),
                                    since: Some(tandem_proto::time::timestamp(started_at)),
                                    ..Default::default()
                                },
                                &api_key
                            )?)
                        )?
                        .queued,
                    )
                }
            })
            .await?;
            Ok::<u64, String>(queued.into_iter().sum())
        }
    };
    let mut throughput = Vec::new();
    for endpoints in [
        endpoints
            .iter()
            .zip(&network.referrers)
            .map(|(e, r)| (e.clone(), r.api_key.clone()))
            .collect::<Vec<_>>(),
        vec![(endpoints[0].clone(), network.referrers[0].api_key.clone())],
    ] {
        let count = endpoints.len();
        let before = arrivals.lock().unwrap_or_else(|e| e.into_inner()).all.len();
        let started = Instant::now();
        let queued = replay(endpoints).await?;
        let deadline = started + timeout;
        let last = loop {
            let (received, last) = {
                let arrivals = arrivals.lock().unwrap_or_else(|e| e.into_inner());
                (
                    (arrivals.all.len() - before) as u64,
                    arrivals.all.last().map(|(at, _)| *at),
                )
            };
            if received >= queued {
                break last.unwrap_or(started);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "only {received} of {queued} replayed deliveries arrived within {timeout:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let secs = last.duration_since(started).as_secs_f64();
        throughput.push(Throughput {
            endpoints: count,
            deliveries: queued,
            secs,
            per_second: queued as f64 / secs.max(1e-9),
        });
    }
    let one_endpoint = throughput.pop().ok_or("no throughput run")?;
    let all_endpoints = throughput.pop().ok_or("no throughput run")?;
    let unverified = arrivals
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .unverified;
    Ok(Report {
        started_at: started_at.to_rfc3339(),
        partnerships,
        customers,
        latency,
        all_endpoints,
        one_endpoint,
        unverified,
        processes: settings
            .processes
            .iter()
            .filter_map(|(name, pid)| process::usage(name, *pid))
            .collect(),
    })
}

async fn latency_run(
    settings: &Settings,
    network: &Network,
    arrivals: &Mutex<Arrivals>,
) -> Result<LatencyRun, String> {
    let timeout = settings.timeout;
    let rate = settings.rate.max(1.0);
    let count = ((rate * settings.seconds).ceil() as usize).max(1);
    let reader = LedgerReader::from_end(&settings.bus)?;
    let read_until = tokio::time::Instant::now() + timeout;
    let ours = format!("bench-{}-hook-", network.tag);
    let reading = tokio::spawn(async move {
        let mut read = Vec::with_capacity(count);
        while read.len() < count && tokio::time::Instant::now() < read_until {
            for transaction_id in reader.attributed(Duration::from_millis(50)).await? {
                if transaction_id.starts_with(&ours) {
                    read.push((transaction_id, Instant::now()));
                }
            }
        }
        Ok::<_, String>(read)
    });
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(100);
    let mut calls = Vec::with_capacity(count);
    for index in 0..count {
        let at = start + interval.mul_f64(index as f64);
        let request = network.purchase("hook", index);
        let mut pos = network.pos.clone();
        let api_key = network.acceptor.api_key.clone();
        calls.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let answer = call!(
                "record purchase",
                pos.record_purchase(authorised(request.clone(), &api_key)?)
            )?;
            Ok::<_, String>((
                request.transaction_id,
                answer.purchase_id,
                at,
                Instant::now(),
            ))
        }));
    }
    let mut by_transaction = HashMap::with_capacity(count);
    let mut by_purchase = HashMap::with_capacity(count);
    let mut answered = Vec::with_capacity(count);
    for call in calls {
        let (transaction_id, purchase_id, at, done) = call.await.map_err(|e| e.to_string())??;
        answered.push(done.duration_since(at));
        by_transaction.insert(transaction_id, at);
        by_purchase.insert(purchase_id, at);
    }
    let send_secs = start.elapsed().as_secs_f64();
    let mut ledger = Vec::with_capacity(count);
    for (transaction_id, read_at) in reading.await.map_err(|e| e.to_string())?? {
        if let Some(at) = by_transaction.remove(&transaction_id) {
            ledger.push(read_at.duration_since(at));
        }
    }
    // Wait for the webhooks of every purchase (or the timeout).
    let deadline = Instant::now() + timeout;
    let mut webhooks = Vec::with_capacity(count);
    loop {
        {
            let arrivals = arrivals.lock().unwrap_or_else(|e| e.into_inner());
            let seen: std::collections::HashSet<&str> =
                arrivals.purchases.iter().map(|(_, p)| p.as_str()).collect();
            if by_purchase.keys().all(|p| seen.contains(p.as_str())) || Instant::now() > deadline {
                for (received_at, purchase_id) in &arrivals.purchases {
                    // The first arrival of each purchase (a redelivery may bring it twice).
                    if let Some(at) = by_purchase.remove(purchase_id) {
                        webhooks.push(received_at.duration_since(at));
                    }
                }
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    answered.sort();
    ledger.sort();
    webhooks.sort();
    Ok(LatencyRun {
        rate_per_second: rate,
        purchases_sent: count as u64,
        send_secs,
        gateway_answered: latency_of(&answered),
        ledger_event_read: latency_of(&ledger),
        webhook_received: latency_of(&webhooks),
        ledger_events: ledger.len() as u64,
        webhooks: webhooks.len() as u64,
    })
}

fn print_report(report: &Report) {
    let l = &report.latency;
    let row = |name: &str, latency: &Latency| {
        println!(
            "  {name:<36} p50 {:>8.1} ms  p99 {:>8.1} ms  p99.9 {:>8.1} ms",
            latency.p50_ms, latency.p99_ms, latency.p999_ms
        );
    };
    println!(
        "open loop: {} purchases at {:.0}/s (sent in {:.1} s), {} referrers",
        l.purchases_sent, l.rate_per_second, l.send_secs, report.partnerships
    );
    row("gateway answered", &l.gateway_answered);
    row(
        &format!("ledger event read ({})", l.ledger_events),
        &l.ledger_event_read,
    );
    row(
        &format!("webhook received ({})", l.webhooks),
        &l.webhook_received,
    );
    for (name, t) in [
        ("every endpoint replays", &report.all_endpoints),
        ("one endpoint replays", &report.one_endpoint),
    ] {
        println!(
            "{name}: {} deliveries to {} endpoint(s) in {:.2} s = {:.0} deliveries/s",
            t.deliveries, t.endpoints, t.secs, t.per_second
        );
    }
    println!("unverified deliveries: {}", report.unverified);
    for p in &report.processes {
        println!(
            "  {:<16} cpu {:>7.1} s  peak rss {:>7.1} MiB",
            p.name, p.cpu_seconds, p.peak_rss_mib
        );
    }
}
