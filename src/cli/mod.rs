//! The `arca` command line: `arca server` wires and runs the service; every other
//! subcommand is a gRPC client of a running server (it never touches the store or HSM).
//!
//! The address and token come from `--addr`/`--token` or `ARCA_ADDR`/`ARCA_TOKEN`, as
//! Vault's CLI does. Output is human-readable, or JSON with `--output json`. Key material
//! is read and written base64-encoded.
//!
//! This file holds only the top of the command tree and the entry point: the client
//! commands, their arguments and their one call path live in `client`, the server's in
//! `server`. Neither imports this file's items.

mod client;
mod server;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use server::DEFAULT_DEV_ADDR;

#[derive(Parser)]
#[command(
    name = "arca",
    version,
    about = "Arca: HSM-backed key management service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Server(Box<server::ServerArgs>),
    #[command(flatten)]
    Client(Box<client::ClientCommand>),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Server(args) => server::run(*args),
        Command::Client(cmd) => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(client::run(*cmd)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
