//! The notifications service's own `main`, as a process the end-to-end tests can kill.

fn main() -> std::process::ExitCode {
    notifications::main()
}
