//! The settlement binary. Configuration: `settlement --help`.

fn main() -> std::process::ExitCode {
    settlement::main()
}
