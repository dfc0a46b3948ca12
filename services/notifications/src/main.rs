//! The notifications binary. Configuration: `notifications --help`.

fn main() -> std::process::ExitCode {
    notifications::main()
}
