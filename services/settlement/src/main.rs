//! The settlement binary. Configuration: `settlement --help`.

fn main() -> std::process::ExitCode {
    tandem_runtime::service_main(
        "settlement",
        |config: &settlement::Config| config.listen,
        settlement::run,
    )
}
