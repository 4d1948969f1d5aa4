//! `kitty-sync`: parses the command line, calls the engine, renders text or JSON, and maps
//! errors to the contract's exit codes.

mod cmd;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::output::Printer;

#[derive(Parser, Debug)]
#[command(
    name = "kitty-sync",
    version,
    about = "Keep every event in an append-only local journal and deliver it to any number of targets",
    long_about = None,
    propagate_version = true
)]
struct Cli {
    /// Home directory (default: $SPEC_KITTY_HOME, else ~/.spec-kitty)
    #[arg(long, global = true, value_name = "DIR")]
    home: Option<PathBuf>,
    /// Print exactly one JSON document on stdout (commands that support it)
    #[arg(long, global = true)]
    json: bool,
    /// Print only warnings and errors
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Print more detail
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Capture events into the journal (one event, or many from JSON Lines)
    Emit(cmd::emit::EmitArgs),
    /// Show or set the sync server URL (the target authority)
    Server(cmd::server::ServerArgs),
    /// Show or set the event sync mode
    Mode(cmd::mode::ModeArgs),
    /// Show one event: envelope, capture metadata and per-target delivery history
    Inspect(cmd::inspect::InspectArgs),
    /// Import spec-kitty's legacy offline queues (read-only) into the journal
    Migrate(cmd::migrate::MigrateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let printer = Printer::new(cli.json, cli.quiet, cli.verbose);
    let result = match cli.command {
        Command::Emit(args) => cmd::emit::run(args, cli.home.as_deref(), &printer),
        Command::Server(args) => cmd::server::run(args, cli.home.as_deref(), &printer),
        Command::Mode(args) => cmd::mode::run(args, cli.home.as_deref(), &printer),
        Command::Inspect(args) => cmd::inspect::run(args, cli.home.as_deref(), &printer),
        Command::Migrate(args) => cmd::migrate::run(args, cli.home.as_deref(), &printer),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => ExitCode::from(printer.error(&err)),
    }
}
