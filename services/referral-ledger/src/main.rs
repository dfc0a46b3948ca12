//! The referral ledger binary. Configuration: `referral-ledger --help`.

fn main() -> std::process::ExitCode {
    tandem_runtime::service_main(
        "referral-ledger",
        |config: &referral_ledger::Config| config.listen,
        referral_ledger::run,
    )
}
