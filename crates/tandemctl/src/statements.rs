//! `tandemctl statements ...`: settlement from a terminal. A merchant (with its API key) lists,
//! shows, exports and verifies its statements and registers its payout account; an operator
//! (with the operator token) closes cycles, lists them and their payout instructions, and writes
//! a cycle's pain.001 file.

use std::path::PathBuf;

use tandem_proto::v1 as pb;
use tandem_proto::v1::operator_service_client::OperatorServiceClient;
use tandem_proto::v1::statement_service_client::StatementServiceClient;

use crate::call;
use crate::client::authorised;

#[derive(Debug, clap::Args)]
pub struct StatementsArgs {
    #[command(flatten)]
    gateway: crate::client::GatewayUrl,
    #[command(subcommand)]
    command: StatementsCommand,
}

#[derive(Debug, clap::Args)]
struct MerchantKey {
    /// The merchant's API key.
    #[arg(long, env = "TANDEM_API_KEY", hide_env_values = true)]
    api_key: String,
}

#[derive(Debug, clap::Args)]
struct OperatorToken {
    /// The operator token the gateway was started with.
    #[arg(long, env = "TANDEM_OPERATOR_TOKEN", hide_env_values = true)]
    operator_token: String,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Format {
    Csv,
    Json,
    Pdf,
}

#[derive(Debug, clap::Subcommand)]
enum StatementsCommand {
    /// The merchant's statements, newest first: number, cycle, totals, content hash.
    List {
        #[command(flatten)]
        key: MerchantKey,
    },
    /// One statement with its lines.
    Show {
        number: u32,
        #[command(flatten)]
        key: MerchantKey,
    },
    /// Writes a statement to a file (CSV: its canonical encoding; JSON; PDF) and prints its
    /// content hash.
    Export {
        number: u32,
        #[arg(long, value_enum, default_value = "csv")]
        format: Format,
        /// Default: the file name settlement gives, in the current directory.
        #[arg(long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        key: MerchantKey,
    },
    /// Checks a CSV or JSON export against the issued statement: computes its SHA-256 here
    /// (from the JSON, by writing its rows back as the canonical CSV), then asks settlement.
    Verify {
        number: u32,
        file: PathBuf,
        #[command(flatten)]
        key: MerchantKey,
    },
    /// Registers the merchant's payout account (IBAN, BIC, holder), replacing the previous one.
    RegisterAccount {
        #[arg(long)]
        iban: String,
        #[arg(long)]
        bic: String,
        #[arg(long)]
        holder: String,
        #[command(flatten)]
        key: MerchantKey,
    },
    /// Operator: closes an ended cycle now, e.g. `monthly:Europe/Paris:2026-11-01`.
    Close {
        cycle: String,
        #[command(flatten)]
        token: OperatorToken,
    },
    /// Operator: corrects a merchant's statement with an adjustment on one of its partnerships
    /// (settled with the next cycle; correction statements naming the corrected ones are issued
    /// at once). Safe to run again with the same --idempotency-key.
    Correct {
        /// The statement's merchant.
        #[arg(long)]
        merchant: String,
        /// The statement's number.
        #[arg(long)]
        number: u32,
        #[arg(long)]
        partnership: String,
        /// Minor units, not zero: positive is owed by the partnership's acceptor to its referrer.
        #[arg(long, allow_hyphen_values = true)]
        amount_minor: i64,
        #[arg(long, default_value = "EUR")]
        currency: String,
        /// Why, shown on the statements (1 to 200 printable ASCII characters).
        #[arg(long)]
        reason: String,
        #[arg(long)]
        idempotency_key: String,
        #[command(flatten)]
        token: OperatorToken,
    },
    /// Operator: the closed cycles, newest first.
    Cycles {
        #[command(flatten)]
        token: OperatorToken,
    },
    /// Operator: payout instructions, of one cycle or all.
    Payouts {
        #[arg(long)]
        cycle: Option<String>,
        #[command(flatten)]
        token: OperatorToken,
    },
    /// Operator: writes a closed cycle's ISO 20022 pain.001 credit-transfer file for one
    /// currency.
    PayoutFile {
        cycle: String,
        #[arg(long, default_value = "EUR")]
        currency: String,
        /// YYYY-MM-DD; default: the day after the cycle closed.
        #[arg(long)]
        execution_date: Option<String>,
        #[arg(long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        token: OperatorToken,
    },
}

fn channel(gateway: &crate::client::GatewayUrl) -> Result<tonic::transport::Channel, String> {
    Ok(gateway
        .endpoint()?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(120))
        .connect_lazy())
}

fn totals(totals: &[pb::StatementTotal]) -> String {
    totals
        .iter()
        .map(|t| {
            let carried = if t.carried_forward_minor == 0 {
                String::new()
            } else {
                format!(" (carried forward {})", t.carried_forward_minor)
            };
            format!("{} net {}{carried}", t.currency, t.net_minor)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn write_file(path: &PathBuf, content: &[u8]) -> Result<(), String> {
    std::fs::write(path, content).map_err(|e| format!("writing {}: {e}", path.display()))
}

pub async fn run(args: StatementsArgs) -> Result<(), String> {
    let channel = channel(&args.gateway)?;
    let mut merchant = StatementServiceClient::new(channel.clone());
    let mut operator = OperatorServiceClient::new(channel);
    match args.command {
        StatementsCommand::List { key } => {
            let mut page_token = String::new();
            loop {
                let page = call!(
                    "list statements",
                    merchant.list_statements(authorised(
                        pb::ListStatementsRequest {
                            page_token: page_token.clone(),
                            ..Default::default()
                        },
                        &key.api_key
                    )?)
                )?;
                for s in &page.statements {
                    println!(
                        "#{:<4} {:<36} {:>6} lines  {}  sha256 {}",
                        s.number,
                        s.cycle,
                        s.line_count,
                        totals(&s.totals),
                        s.content_hash
                    );
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
        }
        StatementsCommand::Show { number, key } => {
            let s = call!(
                "get statement",
                merchant.get_statement(authorised(
                    pb::GetStatementRequest {
                        merchant_id: String::new(),
                        number
                    },
                    &key.api_key
                )?)
            )?;
            println!(
                "statement {} of {}, cycle {}, {} lines\n{}\nsha256 {}",
                s.number,
                s.merchant_id,
                s.cycle,
                s.line_count,
                totals(&s.totals),
                s.content_hash
            );
            for line in &s.lines {
                let kind = if line.kind == pb::StatementLineKind::Clawback as i32 {
                    "clawback"
                } else {
                    "commission"
                };
                let status = if line.status == pb::StatementLineStatus::CarriedForward as i32 {
                    "carried"
                } else {
                    "settled"
                };
                println!(
                    "{:>5} {kind:<10} {status:<8} {} {} {:>12} {} ({} {:?})",
                    line.line_number,
                    line.counterparty_merchant_id,
                    if line.refund_id.is_empty() {
                        &line.purchase_id
                    } else {
                        &line.refund_id
                    },
                    line.amount_minor,
                    line.currency,
                    line.transaction_id,
                    line.referrer_reference
                );
            }
        }
        StatementsCommand::Export {
            number,
            format,
            output,
            key,
        } => {
            let format = match format {
                Format::Csv => pb::ExportFormat::Csv,
                Format::Json => pb::ExportFormat::Json,
                Format::Pdf => pb::ExportFormat::Pdf,
            };
            let export = call!(
                "export statement",
                merchant.export_statement(authorised(
                    pb::ExportStatementRequest {
                        merchant_id: String::new(),
                        number,
                        format: format as i32,
                    },
                    &key.api_key
                )?)
            )?;
            let path = output.unwrap_or_else(|| PathBuf::from(&export.file_name));
            write_file(&path, &export.content)?;
            println!("{}  sha256 {}", path.display(), export.content_hash);
        }
        StatementsCommand::Verify { number, file, key } => {
            let bytes =
                std::fs::read(&file).map_err(|e| format!("reading {}: {e}", file.display()))?;
            let is_json = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
            let local = if is_json {
                let canonical = settlement::statements::canonical_from_json(&bytes)
                    .map_err(|reason| format!("{}: {reason}", file.display()))?;
                tandem_domain::statement::content_hash(canonical.as_bytes())
            } else {
                tandem_domain::statement::content_hash(&bytes)
            };
            let verdict = call!(
                "verify statement",
                merchant.verify_statement(authorised(
                    pb::VerifyStatementRequest {
                        merchant_id: String::new(),
                        number,
                        claim: Some(pb::verify_statement_request::Claim::ContentHash(
                            local.clone()
                        )),
                    },
                    &key.api_key
                )?)
            )?;
            if verdict.matches {
                println!(
                    "OK: {} is statement {number} (sha256 {local})",
                    file.display()
                );
            } else {
                return Err(format!(
                    "{} does NOT match statement {number}: its sha256 is {local}, the issued statement's is {}",
                    file.display(),
                    verdict.content_hash
                ));
            }
        }
        StatementsCommand::RegisterAccount {
            iban,
            bic,
            holder,
            key,
        } => {
            let account = call!(
                "register payout account",
                merchant.register_payout_account(authorised(
                    pb::RegisterPayoutAccountRequest {
                        merchant_id: String::new(),
                        iban: iban.clone(),
                        bic: bic.clone(),
                        account_holder: holder.clone(),
                    },
                    &key.api_key
                )?)
            )?;
            println!(
                "payout account of {}: {} {} ({})",
                account.merchant_id, account.iban, account.bic, account.account_holder
            );
        }
        StatementsCommand::Close { cycle, token } => {
            let summary = call!(
                "close cycle",
                operator.close_settlement_cycle(authorised(
                    pb::CloseCycleRequest {
                        cycle: cycle.clone()
                    },
                    &token.operator_token
                )?)
            )?;
            println!(
                "{} {}: {} statements, {} lines settled, {} carried forward, {} payout instructions",
                summary.cycle,
                if summary.closed_now {
                    "closed"
                } else {
                    "was already closed"
                },
                summary.statements,
                summary.settled_lines,
                summary.carried_forward_lines,
                summary.payout_instructions
            );
        }
        StatementsCommand::Correct {
            merchant: merchant_id,
            number,
            partnership,
            amount_minor,
            currency,
            reason,
            idempotency_key,
            token,
        } => {
            let corrected = call!(
                "issue correction",
                operator.issue_settlement_correction(authorised(
                    pb::IssueCorrectionRequest {
                        idempotency_key: idempotency_key.clone(),
                        merchant_id: merchant_id.clone(),
                        statement_number: number,
                        partnership_id: partnership.clone(),
                        amount: Some(pb::Money {
                            amount_minor,
                            currency: currency.clone(),
                        }),
                        reason: reason.clone(),
                    },
                    &token.operator_token
                )?)
            )?;
            for s in &corrected.statements {
                println!(
                    "{} statement {} of {} corrects {} ({}): {}  sha256 {}",
                    if corrected.created_now {
                        "issued"
                    } else {
                        "already issued:"
                    },
                    s.number,
                    s.merchant_id,
                    s.corrects_statement_number,
                    s.cycle,
                    totals(&s.totals),
                    s.content_hash
                );
            }
        }
        StatementsCommand::Cycles { token } => {
            let mut page_token = String::new();
            loop {
                let page = call!(
                    "list cycles",
                    operator.list_settlement_cycles(authorised(
                        pb::ListCyclesRequest {
                            page_size: 0,
                            page_token: page_token.clone()
                        },
                        &token.operator_token
                    )?)
                )?;
                for c in &page.cycles {
                    println!(
                        "{:<40} {:>5} statements {:>9} settled {:>7} carried {:>5} payouts",
                        c.cycle,
                        c.statements,
                        c.settled_lines,
                        c.carried_forward_lines,
                        c.payout_instructions
                    );
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
        }
        StatementsCommand::Payouts { cycle, token } => {
            let mut page_token = String::new();
            loop {
                let page = call!(
                    "list payout instructions",
                    operator.list_payout_instructions(authorised(
                        pb::ListPayoutInstructionsRequest {
                            cycle: cycle.clone().unwrap_or_default(),
                            page_token: page_token.clone(),
                            ..Default::default()
                        },
                        &token.operator_token
                    )?)
                )?;
                for i in &page.instructions {
                    println!(
                        "{:<48} {} pays {} {} {}",
                        i.instruction_id,
                        i.from_merchant_id,
                        i.to_merchant_id,
                        i.amount_minor,
                        i.currency
                    );
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
        }
        StatementsCommand::PayoutFile {
            cycle,
            currency,
            execution_date,
            output,
            token,
        } => {
            let file = call!(
                "payout file",
                operator.get_payout_file(authorised(
                    pb::GetPayoutFileRequest {
                        cycle: cycle.clone(),
                        currency: currency.clone(),
                        requested_execution_date: execution_date.clone().unwrap_or_default(),
                    },
                    &token.operator_token
                )?)
            )?;
            let path = output.unwrap_or_else(|| PathBuf::from(&file.file_name));
            write_file(&path, &file.content)?;
            println!(
                "{}: {} transfers, {} {} in total (message id {})",
                path.display(),
                file.number_of_transactions,
                file.control_sum_minor,
                currency,
                file.message_id
            );
        }
    }
    Ok(())
}
