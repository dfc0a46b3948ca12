//! The demo a newcomer runs: merchant C refers customer B to partner merchant A at C's checkout;
//! B later buys at A twice, another customer buys at A once; C then sees exactly B's purchases,
//! with amounts and commissions, and nothing about the other customer.

use std::time::Duration;

use tandem_domain::money::{Currency, Money};
use tandem_proto::v1 as pb;

use crate::call;
use crate::client::{authorised, GatewayArgs};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// How long to wait for the referrer to see the purchases.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
}

pub async fn run(args: DemoArgs) -> Result<(), String> {
    let (mut operator, mut pos) = args.gateway.clients().await?;
    let token = args.gateway.operator_token.as_str();
    let run_tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();

    println!("== Tandem demo (run {run_tag}) ==");
    let acceptor = call!(
        "create merchant A",
        operator.create_merchant(authorised(
            pb::CreateMerchantRequest {
                display_name: "Atelier Bikes (A)".into(),
                settlement_currency: "EUR".into(),
                time_zone: "Europe/Paris".into(),
            },
            token,
        )?)
    )?;
    let referrer = call!(
        "create merchant C",
        operator.create_merchant(authorised(
            pb::CreateMerchantRequest {
                display_name: "Cafe Lumiere (C)".into(),
                settlement_currency: "EUR".into(),
                time_zone: "Europe/Paris".into(),
            },
            token,
        )?)
    )?;
    println!("merchant A (acceptor): {}", acceptor.merchant_id);
    println!("merchant C (referrer): {}", referrer.merchant_id);

    let partnership = call!(
        "create partnership",
        operator.create_partnership(authorised(
            pb::CreatePartnershipRequest {
                referrer_merchant_id: referrer.merchant_id.clone(),
                acceptor_merchant_id: acceptor.merchant_id.clone(),
                commission_rate_bps: 750,
                attribution_window_days: 30,
                effective_from: None,
            },
            token,
        )?)
    )?;
    println!(
        "partnership C -> A: {} (7.50% commission, 30-day attribution window)",
        partnership.partnership_id
    );

    let customer_b_at_c = pb::CustomerIdentifiers {
        card_fingerprint: String::new(),
        phone: "+33 6 12 34 56 78".into(),
        email: "b.martin@example.com".into(),
    };
    let referral = call!(
        "create referral at C",
        pos.create_referral(authorised(
            pb::CreateReferralRequest {
                idempotency_key: format!("demo-{run_tag}-referral"),
                merchant_id: String::new(),
                acceptor_merchant_id: acceptor.merchant_id.clone(),
                customer: Some(customer_b_at_c.clone()),
                referrer_reference: format!("C-receipt-{run_tag}"),
                referred_at: None,
            },
            &referrer.api_key,
        )?)
    )?;
    println!(
        "C's checkout referred customer B to A: {} (phone and e-mail pseudonymised at the gateway)",
        referral.referral_id
    );

    // B pays at A as usual: A's POS captured the phone written differently, plus a card fingerprint.
    let customer_b_at_a = pb::CustomerIdentifiers {
        card_fingerprint: format!("fp_{run_tag}_b"),
        phone: "0033 612 345 678".into(),
        email: String::new(),
    };
    let customer_d_at_a = pb::CustomerIdentifiers {
        card_fingerprint: format!("fp_{run_tag}_d"),
        phone: String::new(),
        email: "someone.else@example.org".into(),
    };
    let eur = Currency::parse("currency", "EUR").map_err(|e| e.to_string())?;
    let purchases = [
        ("B", customer_b_at_a.clone(), 12_000),
        ("B", customer_b_at_a, 4_555),
        ("D", customer_d_at_a, 8_000),
    ];
    for (index, (who, customer, amount_minor)) in purchases.into_iter().enumerate() {
        let transaction_id = format!("A-{run_tag}-{index}");
        let request = pb::RecordPurchaseRequest {
            idempotency_key: format!("demo-{run_tag}-purchase-{index}"),
            merchant_id: String::new(),
            transaction_id: transaction_id.clone(),
            customer: Some(customer),
            amount: Some(pb::Money {
                amount_minor,
                currency: "EUR".into(),
            }),
            purchased_at: None,
        };
        let recorded = call!(
            "record purchase at A",
            pos.record_purchase(authorised(request.clone(), &acceptor.api_key)?)
        )?;
        println!(
            "customer {who} bought {} at A: {} ({transaction_id})",
            Money::new(amount_minor, eur),
            recorded.purchase_id
        );
        if index == 0 {
            // A POS that lost the answer retries with the same idempotency key: same purchase, counted once.
            let retried = call!(
                "retry purchase at A",
                pos.record_purchase(authorised(request.clone(), &acceptor.api_key)?)
            )?;
            println!(
                "  A's POS retried that call: same answer {}, not counted twice",
                retried.purchase_id
            );
        }
    }

    println!("waiting for the referral ledger to attribute the purchases...");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let activity = loop {
        let activity = call!(
            "list referral activity for C",
            pos.list_referral_activity(authorised(
                pb::ListReferralActivityRequest {
                    page_size: 100,
                    page_token: String::new(),
                },
                &referrer.api_key,
            )?)
        )?;
        if activity.purchases.len() >= 2 {
            break activity;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "C saw {} attributed purchases after {}s, expected 2; see the service logs",
                activity.purchases.len(),
                args.timeout_secs
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    println!();
    println!("What C learned (ListReferralActivity, as C):");
    println!(
        "  {:<20} {:<24} {:>12} {:>12}  purchase",
        "purchased at (UTC)", "C's reference", "amount", "commission"
    );
    let mut total_commission = 0i64;
    for purchase in &activity.purchases {
        let amount = purchase.amount.clone().unwrap_or_default();
        let commission = purchase.commission.clone().unwrap_or_default();
        let currency = Currency::parse("currency", &amount.currency).map_err(|e| e.to_string())?;
        total_commission += commission.amount_minor;
        let at = purchase
            .purchased_at
            .as_ref()
            .and_then(tandem_proto::time::datetime)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default();
        println!(
            "  {:<20} {:<24} {:>12} {:>12}  {}",
            at,
            purchase.referrer_reference,
            Money::new(amount.amount_minor, currency).to_string(),
            Money::new(commission.amount_minor, currency).to_string(),
            purchase.purchase_id
        );
    }
    println!(
        "  total commission owed by A to C: {}",
        Money::new(total_commission, eur)
    );
    println!("Customer D was never referred by C, so C learns nothing about D's purchase.");

    // B returns part of the first purchase: the commission is clawed back in proportion.
    let first_purchase = activity
        .purchases
        .iter()
        .find(|p| p.amount.as_ref().is_some_and(|a| a.amount_minor == 12_000))
        .map(|p| p.purchase_id.clone())
        .ok_or("the EUR 120.00 purchase is missing from C's activity")?;
    call!(
        "refund at A",
        pos.record_refund(authorised(
            pb::RecordRefundRequest {
                idempotency_key: format!("demo-{run_tag}-refund"),
                transaction_id: format!("A-{run_tag}-0"),
                amount: Some(pb::Money {
                    amount_minor: 2_000,
                    currency: "EUR".into(),
                }),
                ..Default::default()
            },
            &acceptor.api_key,
        )?)
    )?;
    println!();
    println!("B returned EUR 20.00 of the EUR 120.00 purchase at A.");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let explained = loop {
        let explained = call!(
            "explain commission for C",
            pos.explain_commission(authorised(
                pb::ExplainCommissionRequest {
                    purchase_id: first_purchase.clone(),
                },
                &referrer.api_key,
            )?)
        )?;
        if explained
            .line
            .as_ref()
            .and_then(|l| l.refunded.as_ref())
            .is_some_and(|r| r.amount_minor > 0)
        {
            break explained;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err("the refund did not reach the ledger in time; see the service logs".into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!("Why C earns what it earns on that purchase (ExplainCommission, as C):");
    println!("  {}", explained.explanation);
    let balances = call!(
        "balances for C",
        pos.get_balances(authorised(pb::GetBalancesRequest {}, &referrer.api_key)?)
    )?;
    for balance in balances.balances {
        let currency = Currency::parse("currency", &balance.currency).map_err(|e| e.to_string())?;
        println!(
            "C's commission balance: {} accrued, {} payable, {} settled",
            Money::new(balance.accrued_minor, currency),
            Money::new(balance.payable_minor, currency),
            Money::new(balance.settled_minor, currency)
        );
    }
    Ok(())
}
