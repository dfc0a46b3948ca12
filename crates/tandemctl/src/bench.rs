//! `tandemctl bench`: measures a running stack end to end. It registers two merchants, a
//! partnership and `customers` referrals, then records `purchases` purchases of those customers
//! at the acceptor with `concurrency` calls in flight, and reports
//! - how fast the gateway acknowledged them (each acknowledgement is a committed transaction), and
//! - how long until the referral ledger had attributed every one of them.
//!
//! This is a benchmark, not a test: it asserts nothing and its numbers depend on the machine.

use std::time::{Duration, Instant};

use tandem_proto::v1 as pb;

use crate::call;
use crate::client::{authorised, GatewayArgs};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// Referred customers the purchases are spread over.
    #[arg(long, default_value_t = 200)]
    customers: usize,
    /// Purchases to record.
    #[arg(long, default_value_t = 5_000)]
    purchases: usize,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Send the purchases in RecordPurchases calls of this many items (1 to 500) instead of one
    /// RecordPurchase call each; latencies are then per call.
    #[arg(long)]
    bulk: Option<usize>,
    /// Give up waiting for the ledger after this long.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

pub async fn run(args: BenchArgs) -> Result<(), String> {
    let (mut operator, mut pos) = args.gateway.clients().await?;
    let token = args.gateway.operator_token.as_str();
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let merchant = |name: &str| pb::CreateMerchantRequest {
        display_name: format!("bench {name} {tag}"),
        settlement_currency: "EUR".into(),
        time_zone: "Europe/Paris".into(),
        ..Default::default()
    };
    let acceptor = call!(
        "create acceptor",
        operator.create_merchant(authorised(merchant("acceptor"), token)?)
    )?;
    let referrer = call!(
        "create referrer",
        operator.create_merchant(authorised(merchant("referrer"), token)?)
    )?;
    let partnership = call!(
        "create partnership",
        operator.create_partnership(authorised(
            pb::CreatePartnershipRequest {
                referrer_merchant_id: referrer.merchant_id.clone(),
                acceptor_merchant_id: acceptor.merchant_id.clone(),
                commission_rate_bps: 500,
                attribution_window_days: 30,
                effective_from: None,
            },
            token,
        )?)
    )?;
    let phone = phone_of;
    for customer in 0..args.customers {
        call!(
            "create referral",
            pos.create_referral(authorised(
                pb::CreateReferralRequest {
                    idempotency_key: format!("bench-{tag}-r{customer}"),
                    acceptor_merchant_id: acceptor.merchant_id.clone(),
                    customer: Some(pb::CustomerIdentifiers {
                        phone: phone(customer),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                &referrer.api_key,
            )?)
        )?;
    }
    println!(
        "setup: 2 merchants, 1 partnership, {} referrals",
        args.customers
    );

    if args.bulk.is_some_and(|size| !(1..=500).contains(&size)) {
        return Err("--bulk takes 1 to 500 items a call".into());
    }
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..args.concurrency {
        let mut pos = pos.clone();
        let api_key = acceptor.api_key.clone();
        let (tag, customers, purchases, concurrency) = (
            tag.clone(),
            args.customers,
            args.purchases,
            args.concurrency,
        );
        let bulk = args.bulk;
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            if let Some(size) = bulk {
                let mine: Vec<usize> = (worker..purchases).step_by(concurrency).collect();
                for chunk in mine.chunks(size) {
                    let request = pb::RecordPurchasesRequest {
                        purchases: chunk
                            .iter()
                            .map(|&index| purchase_request(&tag, index, customers))
                            .collect(),
                    };
                    let sent = Instant::now();
                    let response = call!(
                        "record purchases",
                        pos.record_purchases(authorised(request.clone(), &api_key)?)
                    )?;
                    latencies.push(sent.elapsed());
                    if let Some(refused) = response.results.iter().find_map(|r| match &r.outcome {
                        Some(pb::record_purchase_result::Outcome::Error(error)) => Some(error),
                        _ => None,
                    }) {
                        return Err(format!("a bulk item was refused: {}", refused.message));
                    }
                }
                return Ok::<_, String>(latencies);
            }
            for index in (worker..purchases).step_by(concurrency) {
                let request = purchase_request(&tag, index, customers);
                let sent = Instant::now();
                call!(
                    "record purchase",
                    pos.record_purchase(authorised(request.clone(), &api_key)?)
                )?;
                latencies.push(sent.elapsed());
            }
            Ok::<_, String>(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(args.purchases);
    for worker in workers {
        latencies.extend(worker.await.map_err(|e| e.to_string())??);
    }
    let acknowledged = started.elapsed();
    latencies.sort();
    let percentile = |p: usize| {
        latencies
            .get((latencies.len() * p / 100).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "gateway{}: {} purchases acknowledged in {:.2}s = {:.0}/s; latency p50 {:.1} ms, p99 {:.1} ms",
        args.bulk
            .map(|size| format!(" (RecordPurchases, {size} a call; latency per call)"))
            .unwrap_or_default(),
        args.purchases,
        acknowledged.as_secs_f64(),
        args.purchases as f64 / acknowledged.as_secs_f64(),
        percentile(50).as_secs_f64() * 1e3,
        percentile(99).as_secs_f64() * 1e3
    );

    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    loop {
        let totals = call!(
            "commission totals",
            pos.get_commission_totals(authorised(
                pb::GetCommissionTotalsRequest {
                    role: pb::PartnershipRole::Acceptor as i32,
                    partnership_id: partnership.partnership_id.clone(),
                    ..Default::default()
                },
                &acceptor.api_key,
            )?)
        )?
        .totals;
        let attributed: usize = totals.iter().map(|t| t.purchases as usize).sum();
        if attributed >= args.purchases {
            let all = started.elapsed();
            println!(
                "pipeline: all {} attributed {:.2}s after the first call = {:.0}/s end to end",
                args.purchases,
                all.as_secs_f64(),
                args.purchases as f64 / all.as_secs_f64()
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "only {attributed} of {} attributed after {}s",
                args.purchases, args.timeout_secs
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The phone number of the bench's customer `customer`.
fn phone_of(customer: usize) -> String {
    format!("+3361{customer:07}")
}

/// The bench's purchase number `index`, by one of `customers` referred customers.
fn purchase_request(tag: &str, index: usize, customers: usize) -> pb::RecordPurchaseRequest {
    pb::RecordPurchaseRequest {
        idempotency_key: format!("bench-{tag}-p{index}"),
        transaction_id: format!("bench-{tag}-{index}"),
        customer: Some(pb::CustomerIdentifiers {
            phone: phone_of(index % customers),
            ..Default::default()
        }),
        amount: Some(pb::Money {
            amount_minor: 1_000 + (index as i64 % 9_000),
            currency: "EUR".into(),
        }),
        ..Default::default()
    }
}
