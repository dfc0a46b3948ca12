//! The demo a newcomer runs: merchant C refers customer B to partner merchant A at C's checkout;
//! B later buys at A twice, another customer buys at A once; C then sees exactly B's purchases,
//! with amounts and commissions, and nothing about the other customer. C's tills take cards
//! through one processor and A's through another, so their card fingerprints never match: the
//! card's PAR, the same at every processor, is what matches B. Then settlement
//! (`demo_settlement`): two merchants that refer customers to each other are settled with one
//! netted payout and a statement whose CSV hashes to its content hash.

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
    /// Where the settlement part writes the statement (CSV, PDF) and the payout file.
    #[arg(long, default_value = ".tandem/demo")]
    output_dir: std::path::PathBuf,
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
                idempotency_key: format!("demo-{run_tag}-merchant-a"),
                display_name: "Atelier Bikes (A)".into(),
                settlement_currency: "EUR".into(),
                time_zone: "Europe/Paris".into(),
                identifier_captures: captures(&[
                    (pb::IdentifierKind::CardFingerprint, "adyen"),
                    (pb::IdentifierKind::PaymentAccountReference, ""),
                    (pb::IdentifierKind::Phone, ""),
                ]),
            },
            token,
        )?)
    )?;
    let referrer = call!(
        "create merchant C",
        operator.create_merchant(authorised(
            pb::CreateMerchantRequest {
                idempotency_key: format!("demo-{run_tag}-merchant-c"),
                display_name: "Cafe Lumiere (C)".into(),
                settlement_currency: "EUR".into(),
                time_zone: "Europe/Paris".into(),
                identifier_captures: captures(&[
                    (pb::IdentifierKind::CardFingerprint, "stripe"),
                    (pb::IdentifierKind::PaymentAccountReference, ""),
                    (pb::IdentifierKind::Email, ""),
                ]),
            },
            token,
        )?)
    )?;
    println!(
        "merchant A (acceptor): {} (cards through Adyen; tills capture card fingerprint, PAR, phone)",
        acceptor.merchant_id
    );
    println!(
        "merchant C (referrer): {} (cards through Stripe; tills capture card fingerprint, PAR, e-mail)",
        referrer.merchant_id
    );

    let partnership = call!(
        "create partnership",
        operator.create_partnership(authorised(
            pb::CreatePartnershipRequest {
                referrer_merchant_id: referrer.merchant_id.clone(),
                acceptor_merchant_id: acceptor.merchant_id.clone(),
                commission_rate_bps: 750,
                attribution_window_days: 30,
                effective_from: None,
                idempotency_key: format!("demo-{run_tag}-partnership"),
                ..Default::default()
            },
            token,
        )?)
    )?;
    println!(
        "partnership C -> A: {} (7.50% commission, 30-day attribution window)",
        partnership.partnership_id
    );

    // C's integration listens for webhooks: a receiver in this process verifies each signature.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("starting the demo's webhook receiver: {e}"))?;
    let hook_url = format!(
        "http://{}/hooks/tandem",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let mut notifications =
        tandem_proto::v1::notification_service_client::NotificationServiceClient::new(
            args.gateway.channel()?,
        );
    let endpoint = call!(
        "register C's webhook endpoint",
        notifications.create_webhook_endpoint(authorised(
            pb::CreateWebhookEndpointRequest {
                merchant_id: String::new(),
                idempotency_key: format!("demo-{run_tag}-webhook"),
                url: hook_url.clone(),
                types: vec!["purchase.attributed".into()],
                description: "the demo's receiver".into(),
            },
            &referrer.api_key,
        )?)
    )?;
    let secret = notifications::webhook::SigningSecret::parse(&endpoint.signing_secret)?;
    let (hook_sender, mut hooks) = tokio::sync::mpsc::channel(16);
    tokio::spawn(crate::receiver::serve(
        listener,
        crate::receiver::Secrets::One(secret),
        hook_sender,
    ));
    println!(
        "C registered a webhook endpoint {hook_url} for purchase.attributed (the demo's receiver checks every signature)"
    );

    // B pays at C by card: Stripe reports its fingerprint of the card and the card's PAR.
    let b_par = par("V001", &run_tag, "B");
    let customer_b_at_c = pb::CustomerIdentifiers {
        card_fingerprint: format!("card_stripe_{run_tag}_b"),
        payment_account_reference: b_par.clone(),
        email: "b.martin@example.com".into(),
        ..Default::default()
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
        "C's checkout referred customer B to A: {} (card fingerprint, PAR and e-mail pseudonymised at the gateway)",
        referral.referral_id
    );

    // B pays at A as usual, with the same card: Adyen's fingerprint of it is another token than
    // Stripe's, but the PAR (here in lower case, as one terminal reports it) is the same.
    let customer_b_at_a = pb::CustomerIdentifiers {
        card_fingerprint: format!("8ad0f3c2{run_tag}b"),
        payment_account_reference: b_par.to_lowercase(),
        phone: "0033 612 345 678".into(),
        ..Default::default()
    };
    let customer_d_at_a = pb::CustomerIdentifiers {
        card_fingerprint: format!("8ad0f3c2{run_tag}d"),
        payment_account_reference: par("5001", &run_tag, "D"),
        ..Default::default()
    };
    let eur = Currency::parse("currency", "EUR").map_err(|e| e.to_string())?;
    let purchases = [
        ("B", customer_b_at_a.clone(), 12_000),
        ("B", customer_b_at_a, 4_555),
        ("D", customer_d_at_a, 8_000),
    ];
    let mut first_purchase_recorded: Option<(String, std::time::Instant)> = None;
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
        let sent = std::time::Instant::now();
        // The first purchase carries a trace context of the till's own, as an instrumented POS
        // would: its trace id finds the whole trace in a trace store.
        let trace_id = format!("{:032x}", uuid::Uuid::new_v4().as_u128());
        let recorded = call!(
            "record purchase at A",
            pos.record_purchase({
                let mut call = authorised(request.clone(), &acceptor.api_key)?;
                if index == 0 {
                    let traceparent = format!("00-{trace_id}-{:016x}-01", rand_span_id());
                    if let Ok(value) = traceparent.parse() {
                        call.metadata_mut().insert("traceparent", value);
                    }
                }
                call
            })
        )?;
        if index == 0 {
            first_purchase_recorded = Some((recorded.purchase_id.clone(), sent));
            println!("  its trace: {trace_id} (with `up.sh --observability`: tandemctl trace {trace_id})");
        }
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
        "  {:<20} {:<24} {:>12} {:>12}  {:<10} purchase",
        "purchased at (UTC)", "C's reference", "amount", "commission", "matched by"
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
        let matched_by = match pb::IdentifierKind::try_from(purchase.matched_by) {
            Ok(pb::IdentifierKind::PaymentAccountReference) => "PAR",
            Ok(pb::IdentifierKind::CardFingerprint) => "card",
            Ok(pb::IdentifierKind::Phone) => "phone",
            Ok(pb::IdentifierKind::Email) => "e-mail",
            Ok(pb::IdentifierKind::LoyaltyMember) => "member",
            _ => "-",
        };
        println!(
            "  {:<20} {:<24} {:>12} {:>12}  {:<10} {}",
            at,
            purchase.referrer_reference,
            Money::new(amount.amount_minor, currency).to_string(),
            Money::new(commission.amount_minor, currency).to_string(),
            matched_by,
            purchase.purchase_id
        );
    }
    println!(
        "  total commission owed by A to C: {}",
        Money::new(total_commission, eur)
    );
    // C's endpoint heard of the first purchase on its own, signed.
    if let Some((purchase_id, sent)) = &first_purchase_recorded {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
        loop {
            let delivery = tokio::time::timeout_at(deadline, hooks.recv())
                .await
                .map_err(|_| {
                    "C's webhook endpoint received nothing in time; see the notifications log"
                })?
                .ok_or("the demo's webhook receiver stopped")?;
            let body: serde_json::Value =
                serde_json::from_slice(&delivery.body).unwrap_or_default();
            if body["data"]["purchase_id"] != purchase_id.as_str() {
                continue;
            }
            delivery
                .verified
                .map_err(|reason| format!("C's webhook did not verify: {reason}"))?;
            println!(
                "C's webhook endpoint received purchase.attributed for that EUR 120.00 purchase {:.2} s after A's till recorded it (signature verified with C's secret, webhook-id {})",
                delivery.at.duration_since(*sent).as_secs_f64(),
                delivery.id
            );
            break;
        }
    }
    println!("Customer D was never referred by C, so C learns nothing about D's purchase.");
    println!(
        "A and C share no card processor and no phone or e-mail capture: the card's PAR matched B."
    );

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

    let channel = args.gateway.channel()?;
    let mut clients = crate::demo_settlement::Clients {
        operator,
        pos,
        statements: tandem_proto::v1::statement_service_client::StatementServiceClient::new(
            channel,
        ),
    };
    crate::demo_settlement::run(
        &mut clients,
        token,
        &run_tag,
        &args.output_dir,
        Duration::from_secs(args.timeout_secs),
    )
    .await
}

fn captures(kinds: &[(pb::IdentifierKind, &str)]) -> Vec<pb::IdentifierCapture> {
    kinds
        .iter()
        .map(|(kind, scope)| pb::IdentifierCapture {
            kind: *kind as i32,
            scope: (*scope).to_owned(),
        })
        .collect()
}

/// A well-formed PAR for this run: the BIN Controller Identifier, then 25 characters.
fn par(bin_controller: &str, run_tag: &str, who: &str) -> String {
    let mut par = format!("{bin_controller}{}{who}", run_tag.to_uppercase());
    while par.len() < 29 {
        par.push('7');
    }
    par
}

/// A random non-zero span id.
fn rand_span_id() -> u64 {
    (uuid::Uuid::new_v4().as_u128() as u64) | 1
}
