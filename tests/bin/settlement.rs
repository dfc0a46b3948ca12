//! The settlement service's own `main`, as a process the end-to-end tests can start and scrape.

fn main() -> std::process::ExitCode {
    settlement::main()
}
