//! The merchant gateway binary. Configuration: `merchant-gateway --help`.

fn main() -> std::process::ExitCode {
    merchant_gateway::main()
}
