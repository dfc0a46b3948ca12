//! The referral ledger binary. Configuration: `referral-ledger --help`.

fn main() -> std::process::ExitCode {
    referral_ledger::main()
}
