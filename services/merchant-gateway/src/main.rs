//! The merchant gateway binary. Configuration: `merchant-gateway --help`.

fn main() -> std::process::ExitCode {
    tandem_runtime::service_main(
        "merchant-gateway",
        |config: &merchant_gateway::Config| config.listen,
        merchant_gateway::run,
    )
}
