//! `lodectl`: command-line tool for Lode images (see `lodectl --help`).

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use lode_snapshotter::ctl::Cli;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // On a terminal, progress bars report progress and only warnings are
    // logged; otherwise (CI, pipes) info lines take the bars' place.
    let terminal = std::io::stderr().is_terminal();
    let default_level = if terminal { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_ansi(terminal)
        .with_writer(std::io::stderr)
        .init();
    match cli.command.run(&mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Library errors already spell out their causes.
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}
