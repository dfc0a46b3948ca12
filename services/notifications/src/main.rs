//! The notifications binary. Configuration: `notifications --help`.

fn main() -> std::process::ExitCode {
    tandem_runtime::service_main(
        "notifications",
        |config: &notifications::Config| config.listen,
        notifications::run,
    )
}
