//! The merchant gateway's own `main`, as a process the end-to-end tests can start and scrape.

fn main() -> std::process::ExitCode {
    merchant_gateway::main()
}
