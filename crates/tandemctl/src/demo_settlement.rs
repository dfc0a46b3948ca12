//! The demo's second part: settlement. Two merchants that send customers to each other, E and F,
//! settle daily; yesterday each referred a customer who bought at the other. The operator closes
//! yesterday's cycle: one netted payout between them instead of two, a statement each whose CSV
//! hashes to its content hash, a PDF and the ISO 20022 payout file written to a directory.
//!
//! A cycle closes once, for the whole network, so the demo settles in the first time zone of a
//! list whose yesterday is not closed yet; after twenty runs in a day it says so and stops.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use tandem_domain::money::{Currency, Money};
use tandem_domain::settlement::{Cycle, CycleKind};
use tandem_proto::v1 as pb;
use tandem_proto::v1::merchant_gateway_client::MerchantGatewayClient;
use tandem_proto::v1::operator_service_client::OperatorServiceClient;
use tandem_proto::v1::statement_service_client::StatementServiceClient;
use tonic::transport::Channel;

use crate::call;
use crate::client::authorised;

const ZONES: [&str; 20] = [
    "Europe/Paris",
    "Europe/Berlin",
    "Europe/Madrid",
    "Europe/Rome",
    "Europe/Amsterdam",
    "Europe/Brussels",
    "Europe/Vienna",
    "Europe/Lisbon",
    "Europe/Dublin",
    "Europe/Helsinki",
    "Europe/Athens",
    "Europe/Warsaw",
    "Europe/Prague",
    "Europe/Stockholm",
    "Europe/Copenhagen",
    "Europe/Oslo",
    "Europe/Zurich",
    "Europe/Luxembourg",
    "Europe/Tallinn",
    "Europe/Riga",
];

pub struct Clients {
    pub operator: OperatorServiceClient<Channel>,
    pub pos: MerchantGatewayClient<Channel>,
    pub statements: StatementServiceClient<Channel>,
}

async fn closed_cycles(
    operator: &mut OperatorServiceClient<Channel>,
    token: &str,
) -> Result<Vec<String>, String> {
    let mut closed = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = call!(
            "list settlement cycles",
            operator.list_settlement_cycles(authorised(
                pb::ListCyclesRequest {
                    page_size: 500,
                    page_token: page_token.clone()
                },
                token
            )?)
        )?;
        closed.extend(page.cycles.into_iter().map(|c| c.cycle));
        if page.next_page_token.is_empty() {
            return Ok(closed);
        }
        page_token = page.next_page_token;
    }
}

/// A yesterday's daily cycle no run has closed yet, if any.
async fn open_yesterday(
    operator: &mut OperatorServiceClient<Channel>,
    token: &str,
) -> Result<Option<Cycle>, String> {
    let closed = closed_cycles(operator, token).await?;
    for zone in ZONES {
        let zone =
            tandem_domain::settlement::parse_time_zone("zone", zone).map_err(|e| e.to_string())?;
        let yesterday = Cycle::containing(
            CycleKind::Daily,
            zone,
            Utc::now() - chrono::Duration::days(1),
        );
        if !closed.contains(&yesterday.key()) {
            return Ok(Some(yesterday));
        }
    }
    Ok(None)
}

fn write(directory: &Path, name: &str, content: &[u8]) -> Result<PathBuf, String> {
    let path = directory.join(name);
    std::fs::write(&path, content).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path)
}

pub async fn run(
    clients: &mut Clients,
    token: &str,
    run_tag: &str,
    output: &Path,
    timeout: Duration,
) -> Result<(), String> {
    println!();
    println!("== Settlement ==");
    let Some(day) = open_yesterday(&mut clients.operator, token).await? else {
        println!(
            "Every demo time zone's yesterday is already settled (the demo ran {} times today); run it again tomorrow.",
            ZONES.len()
        );
        return Ok(());
    };
    let zone = day.time_zone.name();
    let eur = Currency::parse("currency", "EUR").map_err(|e| e.to_string())?;
    let merchant = |name: &'static str| {
        let mut operator = clients.operator.clone();
        async move {
            call!(
                "create merchant",
                operator.create_merchant(authorised(
                    pb::CreateMerchantRequest {
                        display_name: name.into(),
                        settlement_currency: "EUR".into(),
                        time_zone: zone.into(),
                        idempotency_key: uuid::Uuid::new_v4().to_string(),
                        identifier_captures: vec![pb::IdentifierCapture {
                            kind: pb::IdentifierKind::Email as i32,
                            scope: String::new(),
                        }],
                    },
                    token,
                )?)
            )
        }
    };
    let e = merchant("Boulangerie (E)").await?;
    let f = merchant("Fleuriste (F)").await?;
    for (from, to) in [(&e, &f), (&f, &e)] {
        call!(
            "create daily partnership",
            clients.operator.create_partnership(authorised(
                pb::CreatePartnershipRequest {
                    referrer_merchant_id: from.merchant_id.clone(),
                    acceptor_merchant_id: to.merchant_id.clone(),
                    commission_rate_bps: 500,
                    attribution_window_days: 30,
                    effective_from: Some(tandem_proto::time::timestamp(
                        Utc::now() - chrono::Duration::days(3)
                    )),
                    settlement_cycle: pb::SettlementCycle::Daily as i32,
                    minimum_payout_minor: 0,
                    idempotency_key: uuid::Uuid::new_v4().to_string(),
                },
                token,
            )?)
        )?;
    }
    for (who, key, iban, bic) in [
        (
            "E",
            &e.api_key,
            "FR7630006000011234567890189",
            "BNPAFRPPXXX",
        ),
        ("F", &f.api_key, "DE89370400440532013000", "COBADEFFXXX"),
    ] {
        call!(
            "register payout account",
            clients.statements.register_payout_account(authorised(
                pb::RegisterPayoutAccountRequest {
                    merchant_id: String::new(),
                    iban: iban.into(),
                    bic: bic.into(),
                    account_holder: format!("Demo merchant {who}"),
                },
                key,
            )?)
        )?;
    }
    println!(
        "E {} and F {} (both in {zone}) send customers to each other: 5%, settled daily at midnight in {zone}; both registered a payout account",
        e.merchant_id, f.merchant_id
    );

    // Yesterday, E's checkout sent G to F and F's sent H to E; both bought the same afternoon.
    let at = |hours| tandem_proto::time::timestamp(day.start + chrono::Duration::hours(hours));
    for (referrer, acceptor, customer, amount) in
        [(&e, &f, "g", 8_000_i64), (&f, &e, "h", 3_000_i64)]
    {
        let who = pb::CustomerIdentifiers {
            email: format!("{customer}.{run_tag}@example.com"),
            ..Default::default()
        };
        call!(
            "create referral",
            clients.pos.create_referral(authorised(
                pb::CreateReferralRequest {
                    idempotency_key: format!("demo-{run_tag}-settle-ref-{customer}"),
                    merchant_id: String::new(),
                    acceptor_merchant_id: acceptor.merchant_id.clone(),
                    customer: Some(who.clone()),
                    referrer_reference: format!("receipt-{customer}-{run_tag}"),
                    referred_at: Some(at(10)),
                },
                &referrer.api_key,
            )?)
        )?;
        call!(
            "record purchase",
            clients.pos.record_purchase(authorised(
                pb::RecordPurchaseRequest {
                    idempotency_key: format!("demo-{run_tag}-settle-buy-{customer}"),
                    merchant_id: String::new(),
                    transaction_id: format!("T-{customer}-{run_tag}"),
                    customer: Some(who.clone()),
                    amount: Some(pb::Money {
                        amount_minor: amount,
                        currency: "EUR".into(),
                    }),
                    purchased_at: Some(at(15)),
                },
                &acceptor.api_key,
            )?)
        )?;
    }
    println!(
        "yesterday ({}) G, sent by E, spent {} at F; H, sent by F, spent {} at E",
        day.first_day,
        Money::new(8_000, eur),
        Money::new(3_000, eur)
    );

    // Wait until settlement holds both commissions, then close yesterday.
    println!("waiting for settlement to receive both commissions...");
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let pending = call!(
            "list unsettled lines",
            clients.statements.list_unsettled_lines(authorised(
                pb::ListUnsettledLinesRequest::default(),
                &e.api_key
            )?)
        )?;
        if pending.lines.len() >= 2 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(
                "settlement did not receive the commissions in time; see the service logs".into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let summary = call!(
        "close cycle",
        clients.operator.close_settlement_cycle(authorised(
            pb::CloseCycleRequest { cycle: day.key() },
            token
        )?)
    )?;
    println!(
        "operator closed {}: {} statements, {} lines settled, {} payout instruction(s)",
        summary.cycle, summary.statements, summary.settled_lines, summary.payout_instructions
    );
    let instructions = call!(
        "list payout instructions",
        clients.operator.list_payout_instructions(authorised(
            pb::ListPayoutInstructionsRequest {
                cycle: day.key(),
                ..Default::default()
            },
            token
        )?)
    )?;
    for instruction in &instructions.instructions {
        let (from, to) = if instruction.from_merchant_id == f.merchant_id {
            ("F", "E")
        } else {
            ("E", "F")
        };
        println!(
            "  {from} pays {to} {}: E earned {} from F and owes F {}, netted into one transfer",
            Money::new(instruction.amount_minor, eur),
            Money::new(400, eur),
            Money::new(150, eur)
        );
    }

    std::fs::create_dir_all(output).map_err(|e| format!("creating {}: {e}", output.display()))?;
    let listed = call!(
        "list statements",
        clients.statements.list_statements(authorised(
            pb::ListStatementsRequest::default(),
            &e.api_key
        )?)
    )?;
    let statement = listed
        .statements
        .first()
        .ok_or("E has no statement")?
        .clone();
    let mut files = Vec::new();
    for (format, name) in [
        (pb::ExportFormat::Csv, "csv"),
        (pb::ExportFormat::Pdf, "pdf"),
    ] {
        let export = call!(
            "export statement",
            clients.statements.export_statement(authorised(
                pb::ExportStatementRequest {
                    merchant_id: String::new(),
                    number: statement.number,
                    format: format as i32,
                },
                &e.api_key,
            )?)
        )?;
        files.push((
            name,
            write(output, &export.file_name, &export.content)?,
            export,
        ));
    }
    let csv = &files[0].2;
    let computed = tandem_domain::statement::content_hash(&csv.content);
    println!(
        "E's statement {} ({}): net {}, content hash {}",
        statement.number,
        statement.cycle,
        statement
            .totals
            .iter()
            .map(|t| Currency::parse("currency", &t.currency).map_or_else(
                |_| format!("{} {}", t.currency, t.net_minor),
                |c| Money::new(t.net_minor, c).to_string()
            ))
            .collect::<Vec<_>>()
            .join(", "),
        statement.content_hash
    );
    println!(
        "  SHA-256 of the CSV export, computed here: {computed} ({})",
        if computed == statement.content_hash {
            "matches"
        } else {
            "DOES NOT MATCH"
        }
    );
    for line in String::from_utf8_lossy(&csv.content).lines() {
        println!("  | {line}");
    }
    let file = call!(
        "payout file",
        clients.operator.get_payout_file(authorised(
            pb::GetPayoutFileRequest {
                cycle: day.key(),
                currency: "EUR".into(),
                requested_execution_date: String::new(),
            },
            token,
        )?)
    )?;
    let pain = write(output, &file.file_name, &file.content)?;
    println!(
        "written: {} (CSV), {} (PDF), {} (pain.001 for the bank: {} transfer(s), {} in total)",
        files[0].1.display(),
        files[1].1.display(),
        pain.display(),
        file.number_of_transactions,
        Money::new(file.control_sum_minor, eur)
    );
    if computed != statement.content_hash {
        return Err("the statement's CSV does not hash to its content hash".into());
    }
    Ok(())
}
