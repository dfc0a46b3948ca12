//! `tandemctl settlement-bench`: how long closing one monthly cycle takes, and the closing
//! process's peak memory, over N commission lines across M merchants. A benchmark, not a test.
//!
//! It works on a database of its own: settlement's schema is created there and filled with the
//! facts settlement would have taken from Kafka (merchants, terms, attributed purchases and
//! their commission lines, written by `INSERT … SELECT generate_series`, so generating a million
//! lines takes seconds), then the cycle is closed in this process by the same code the service
//! runs. What is timed is the close alone: one transaction that reads the lines, nets them,
//! issues a statement per merchant (each line on two statements), records the payout
//! instructions and marks the lines settled. Peak memory is this process's high-water mark
//! (`VmHWM`), reset after the generation (`/proc/self/clear_refs`).

use std::time::Instant;

use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct SettlementBenchArgs {
    /// URL of the Postgres server (any database on it); the benchmark creates its own.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Commission lines in the cycle.
    #[arg(long, default_value_t = 1_000_000)]
    lines: i64,
    /// Merchants taking part.
    #[arg(long, default_value_t = 1_000)]
    merchants: i64,
    /// Partnerships between them (each merchant refers to several others).
    #[arg(long, default_value_t = 5_000)]
    partnerships: i64,
    /// Also write the results here, as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
struct Report {
    lines: i64,
    merchants: i64,
    partnerships: i64,
    generate_secs: f64,
    close_secs: f64,
    lines_per_sec: f64,
    statements: u32,
    settled_lines: u64,
    payout_instructions: u32,
    peak_rss_mib: f64,
    export_largest_csv_secs: f64,
    largest_statement_lines: i64,
}

fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

pub async fn run(args: SettlementBenchArgs) -> Result<(), String> {
    let error = |e: &dyn std::error::Error| tandem_runtime::error_chain(e);
    let name = "tandem_settlement_bench";
    {
        use sqlx::Connection;
        let mut server = sqlx::PgConnection::connect(&args.database_url)
            .await
            .map_err(|e| error(&e))?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut server)
            .await
            .map_err(|e| error(&e))?;
    }
    tandem_store::create_database(&args.database_url, name)
        .await
        .map_err(|e| error(&e))?;
    let pool = tandem_store::connect(&tandem_store::StoreConfig {
        database_url: tandem_store::url_with_database(&args.database_url, name),
        schema: "settlement".into(),
        max_connections: 4,
    })
    .await
    .map_err(|e| error(&e))?;
    settlement::migrate(&pool).await.map_err(|e| error(&e))?;

    let month =
        settlement::parse_cycle("monthly:Europe/Paris:2026-10-01").map_err(|e| e.to_string())?;
    eprintln!(
        "generating {} lines across {} merchants and {} partnerships",
        args.lines, args.merchants, args.partnerships
    );
    let started = Instant::now();
    let id = |prefix: &str, expression: &str| {
        format!("'{prefix}' || lpad(to_hex({expression}), 32, '0')")
    };
    let statements = [
        format!(
            "INSERT INTO merchants SELECT {}, 'Merchant ' || m, 'EUR', 'Europe/Paris' FROM generate_series(1, $1) m",
            id("mer_", "m")
        ),
        // Partnership p: referrer 1 + p % M, acceptor a few places further round the ring.
        format!(
            "INSERT INTO partnership_terms SELECT {}, 1, {}, {}, 'EUR', 'monthly', 0, 'percentage 500 bps' \
             FROM generate_series(0, $2 - 1) p",
            id("prt_", "p + 1"),
            id("mer_", "1 + p % $1"),
            id("mer_", "1 + (p % $1 + 1 + (p / $1) % ($1 - 1)) % $1")
        ),
        format!(
            "INSERT INTO attributions SELECT {}, {}, 1, {}, 'receipt ' || n, 'T-' || n, 1000 + n % 9000, 'EUR', 50 + (n % 9000) / 20, 0, true \
             FROM generate_series(0, $3 - 1) n",
            id("pur_", "n + 1"),
            id("prt_", "n % $2 + 1"),
            id("ref_", "n + 1")
        ),
        // Spread over the month (31 days of October), payable before its cut-off.
        "INSERT INTO lines (line_id, kind, partnership_id, terms_version, referrer_merchant_id, acceptor_merchant_id, \
               purchase_id, refund_id, transaction_id, referral_id, referrer_reference, base_amount_minor, amount_minor, \
               currency, payable_at) \
             SELECT 'commission:' || a.purchase_id, 'commission', a.partnership_id, 1, t.referrer_merchant_id, t.acceptor_merchant_id, \
               a.purchase_id, NULL, a.transaction_id, a.referral_id, a.referrer_reference, a.purchase_amount_minor, a.commission_minor, 'EUR', \
               $4::timestamptz + (row_number() OVER (ORDER BY a.purchase_id) * interval '2 seconds') \
             FROM attributions a JOIN partnership_terms t USING (partnership_id, terms_version)"
            .to_owned(),
    ];
    for statement in &statements {
        sqlx::query(statement)
            .bind(args.merchants)
            .bind(args.partnerships)
            .bind(args.lines)
            .bind(month.start)
            .execute(&pool)
            .await
            .map_err(|e| error(&e))?;
    }
    sqlx::query("VACUUM ANALYZE")
        .execute(&pool)
        .await
        .map_err(|e| error(&e))?;
    let generate_secs = started.elapsed().as_secs_f64();
    eprintln!("generated in {generate_secs:.1} s; closing {}", month.key());

    // Reset the high-water mark: what follows is the close's own peak.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let wake = tokio::sync::Notify::new();
    let started = Instant::now();
    let summary = settlement::close_cycle(&pool, &month, chrono::Utc::now(), &wake)
        .await
        .map_err(|e| error(&e))?
        .map_err(|refused| refused.to_string())?;
    let close_secs = started.elapsed().as_secs_f64();
    let peak_rss_mib = vm_hwm_kib().unwrap_or(0) as f64 / 1024.0;

    let (merchant, largest): (String, i32) = sqlx::query_as(
        "SELECT merchant_id, line_count FROM statements ORDER BY line_count DESC, merchant_id LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .map_err(|e| error(&e))?;
    let started = Instant::now();
    let statement = settlement::statements::issued(&pool, &merchant, 1)
        .await
        .map_err(|e| error(&e))?
        .ok_or("the largest statement is missing")?;
    let csv = statement.canonical_csv();
    let export_largest_csv_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "largest statement: {} lines, {} bytes of CSV",
        statement.lines.len(),
        csv.len()
    );
    let report = Report {
        lines: args.lines,
        merchants: args.merchants,
        partnerships: args.partnerships,
        generate_secs,
        close_secs,
        lines_per_sec: args.lines as f64 / close_secs,
        statements: summary.statements,
        settled_lines: summary.settled_lines,
        payout_instructions: summary.payout_instructions,
        peak_rss_mib,
        export_largest_csv_secs,
        largest_statement_lines: i64::from(largest),
    };
    println!(
        "closed {} lines into {} statements and {} payout instructions in {:.2} s ({:.0} lines/s); peak RSS {:.0} MiB; \
         largest statement ({} lines) exported as CSV in {:.2} s",
        report.settled_lines,
        report.statements,
        report.payout_instructions,
        report.close_secs,
        report.lines_per_sec,
        report.peak_rss_mib,
        report.largest_statement_lines,
        report.export_largest_csv_secs
    );
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    pool.close().await;
    Ok(())
}
