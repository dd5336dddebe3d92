//! The `arca` binary: the server and the admin CLI in one.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    arca::cli::main()
}
