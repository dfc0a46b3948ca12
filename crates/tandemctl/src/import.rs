//! `tandemctl import`: loads a merchant's purchases from a CSV file through the bulk call
//! `RecordPurchases`, for a till that was offline or a platform catching up. Each row carries its
//! own idempotency key, so running the same import again records nothing twice.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tandem_proto::v1 as pb;
use tandem_proto::v1::merchant_gateway_client::MerchantGatewayClient;

use crate::call;
use crate::client::authorised;

/// The most purchases one `RecordPurchases` call takes.
const MAX_BATCH: usize = 500;

/// The columns a file may have; `transaction_id`, `amount_minor` and `currency` are required,
/// and at least one identifier column.
const COLUMNS: [&str; 12] = [
    "transaction_id",
    "amount_minor",
    "currency",
    "purchased_at",
    "idempotency_key",
    "payment_account_reference",
    "card_fingerprint",
    "card_processor",
    "phone",
    "email",
    "loyalty_programme_id",
    "member_number",
];

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The CSV file: a header row, then one purchase a row. Columns: transaction_id,
    /// amount_minor, currency (required); purchased_at (RFC 3339, e.g. 2026-11-30T14:05:00Z;
    /// default: now); idempotency_key (default: import:<transaction_id>); and the identifiers the
    /// till captured: payment_account_reference, card_fingerprint, card_processor, phone, email,
    /// loyalty_programme_id, member_number.
    file: PathBuf,
    #[command(flatten)]
    gateway: crate::client::GatewayUrl,
    /// The merchant's API key.
    #[arg(long, env = "TANDEM_API_KEY", hide_env_values = true)]
    api_key: String,
    /// Purchases per call, 1 to 500.
    #[arg(long, default_value_t = MAX_BATCH)]
    batch_size: usize,
}

/// One CSV row, by column name.
struct Row {
    line: u64,
    fields: HashMap<String, String>,
}

impl Row {
    fn get(&self, column: &str) -> String {
        self.fields.get(column).cloned().unwrap_or_default()
    }

    fn to_request(&self) -> Result<pb::RecordPurchaseRequest, String> {
        let transaction_id = self.get("transaction_id");
        let amount_minor = self.get("amount_minor");
        let amount_minor: i64 = amount_minor.trim().parse().map_err(|_| {
            format!("line {}: amount_minor must be an integer number of minor units, got {amount_minor:?}", self.line)
        })?;
        let purchased_at = match self.get("purchased_at").trim() {
            "" => None,
            text => Some(tandem_proto::time::timestamp(
                chrono::DateTime::parse_from_rfc3339(text)
                    .map_err(|e| {
                        format!(
                            "line {}: purchased_at must be RFC 3339, e.g. 2026-11-30T14:05:00Z ({e})",
                            self.line
                        )
                    })?
                    .with_timezone(&chrono::Utc),
            )),
        };
        let idempotency_key = match self.get("idempotency_key") {
            key if key.trim().is_empty() => format!("import:{}", transaction_id.trim()),
            key => key,
        };
        let loyalty = (!self.get("member_number").trim().is_empty()
            || !self.get("loyalty_programme_id").trim().is_empty())
        .then(|| pb::LoyaltyMembership {
            programme_id: self.get("loyalty_programme_id"),
            member_number: self.get("member_number"),
        });
        Ok(pb::RecordPurchaseRequest {
            idempotency_key,
            merchant_id: String::new(),
            transaction_id,
            customer: Some(pb::CustomerIdentifiers {
                card_fingerprint: self.get("card_fingerprint"),
                phone: self.get("phone"),
                email: self.get("email"),
                card_processor: self.get("card_processor"),
                payment_account_reference: self.get("payment_account_reference"),
                loyalty,
            }),
            amount: Some(pb::Money {
                amount_minor,
                currency: self.get("currency"),
            }),
            purchased_at,
        })
    }
}

fn read_rows(file: &PathBuf) -> Result<Vec<Row>, String> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::Headers)
        .from_path(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| format!("{}: no header row: {e}", file.display()))?
        .iter()
        .map(str::to_owned)
        .collect();
    for header in &headers {
        if !COLUMNS.contains(&header.as_str()) {
            return Err(format!(
                "{}: unknown column {header:?}; the columns are {}",
                file.display(),
                COLUMNS.join(", ")
            ));
        }
    }
    for required in ["transaction_id", "amount_minor", "currency"] {
        if !headers.iter().any(|h| h == required) {
            return Err(format!(
                "{}: the column {required} is required",
                file.display()
            ));
        }
    }
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| format!("{}: {e}", file.display()))?;
        let line = record.position().map_or(0, csv::Position::line);
        rows.push(Row {
            line,
            fields: headers
                .iter()
                .cloned()
                .zip(record.iter().map(str::to_owned))
                .collect(),
        });
    }
    Ok(rows)
}

/// A progress bar on standard error: `[#####.....] 2500/5000 (2490 recorded, 10 refused)`.
fn progress(done: usize, total: usize, recorded: usize, refused: usize, started: Instant) {
    const WIDTH: usize = 30;
    let filled = (done * WIDTH).checked_div(total).unwrap_or(WIDTH);
    let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
    eprint!(
        "\r[{}{}] {done}/{total} purchases ({recorded} recorded, {refused} refused) {rate:.0}/s ",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled)
    );
    let _ = std::io::stderr().flush();
}

pub async fn run(args: ImportArgs) -> Result<(), String> {
    if !(1..=MAX_BATCH).contains(&args.batch_size) {
        return Err(format!("--batch-size must be 1 to {MAX_BATCH}"));
    }
    let rows = read_rows(&args.file)?;
    if rows.is_empty() {
        return Err(format!("{}: no purchases in the file", args.file.display()));
    }
    let channel = args
        .gateway
        .endpoint()?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(120))
        .connect_lazy();
    let mut pos = MerchantGatewayClient::new(channel);
    let started = Instant::now();
    let (mut recorded, mut refused, mut done) = (0usize, Vec::new(), 0usize);
    for chunk in rows.chunks(args.batch_size) {
        // Rows the file itself gets wrong are refused here, with their line, and not sent.
        let mut requests = Vec::with_capacity(chunk.len());
        let mut lines = Vec::with_capacity(chunk.len());
        for row in chunk {
            match row.to_request() {
                Ok(request) => {
                    requests.push(request);
                    lines.push(row.line);
                }
                Err(reason) => refused.push(reason),
            }
        }
        if !requests.is_empty() {
            let response = call!(
                "record purchases",
                pos.record_purchases(authorised(
                    pb::RecordPurchasesRequest {
                        purchases: requests.clone(),
                    },
                    &args.api_key,
                )?)
            )?;
            for result in response.results {
                let line = lines
                    .get(result.index as usize)
                    .copied()
                    .unwrap_or_default();
                match result.outcome {
                    Some(pb::record_purchase_result::Outcome::Recorded(_)) => recorded += 1,
                    Some(pb::record_purchase_result::Outcome::Error(error)) => {
                        refused.push(format!(
                            "line {line}: {:?}: {}",
                            tonic::Code::from_i32(error.code),
                            // The line says which row; its place in this call would only confuse.
                            error
                                .message
                                .replacen(&format!("purchases[{}].", result.index), "", 1)
                        ))
                    }
                    None => refused.push(format!("line {line}: no result")),
                }
            }
        }
        done += chunk.len();
        progress(done, rows.len(), recorded, refused.len(), started);
    }
    eprintln!();
    for reason in &refused {
        eprintln!("refused: {reason}");
    }
    println!(
        "imported {}: {recorded} purchases recorded (or already recorded by an earlier run), {} refused, in {:.1?}",
        args.file.display(),
        refused.len(),
        started.elapsed()
    );
    if refused.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} of {} rows were refused (listed above); fix them and run the import again: rows already recorded are not recorded twice",
            refused.len(),
            rows.len()
        ))
    }
}
