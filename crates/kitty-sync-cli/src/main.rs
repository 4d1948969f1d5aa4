//! `kitty-sync`: parses the command line, calls the engine, renders text or JSON, and maps
//! errors to the contract's exit codes.

mod args;
mod cmd;
mod exit_status;
mod output;
mod receiver_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::exit_status::ExitStatus;
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
    /// Run the whole story on loopback in a temporary home (two built-in receivers)
    Demo(cmd::demo::DemoArgs),
    /// Capture events into the journal (one event, or many from JSON Lines)
    Emit(cmd::emit::EmitArgs),
    /// Show or set the sync server URL (the target authority)
    Server(cmd::server::ServerArgs),
    /// Show or set the event sync mode
    Mode(cmd::mode::ModeArgs),
    /// Show one event: envelope, capture metadata and per-target delivery history
    Inspect(cmd::inspect::InspectArgs),
    /// Show what the journal holds and what each target has received (read-only)
    Status(cmd::status::StatusArgs),
    /// Deliver what every active target (or each --target) has not received yet
    Now(cmd::now::NowArgs),
    /// Make parked (and rejected, or not-consented) events due again for the active targets
    Retry(cmd::retry::RetryArgs),
    /// Write fully delivered events to a gzip JSON Lines archive and mark them archived
    Archive(cmd::retention::ArchiveArgs),
    /// Purge payload bytes of fully delivered or archived events (history is kept)
    Gc(cmd::retention::GcArgs),
    /// Import spec-kitty's stores (≤ 3.2.3 queues, 3.2.4–3.2.7 journals, ledger, project stores), read-only
    Migrate(cmd::migrate::MigrateArgs),
    /// Named targets delivered beside the mode's own (list, add, remove, enable, disable)
    #[command(subcommand)]
    Target(cmd::targets::TargetCommand),
    /// Print stored events as JSON Lines in capture order (--follow for new captures)
    Tail(cmd::tail::TailArgs),
    /// Check the home, store, config, credentials, targets and daemon (changes nothing)
    Doctor,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions(cmd::completions::CompletionsArgs),
    /// Print the man page (roff)
    Man,
    /// Keep every active target delivered, in the foreground (systemd, launchd, containers)
    Daemon(cmd::daemon::DaemonArgs),
    /// The built-in batch-protocol receiver (serve, dump)
    #[command(subcommand)]
    Receiver(receiver_cmd::ReceiverCommand),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let printer = Printer::new(cli.json, cli.quiet, cli.verbose);
    let result = match cli.command {
        Command::Demo(args) => cmd::demo::run(args, cli.home.as_deref(), &printer),
        Command::Emit(args) => cmd::emit::run(args, cli.home.as_deref(), &printer),
        Command::Server(args) => cmd::server::run(args, cli.home.as_deref(), &printer),
        Command::Mode(args) => cmd::mode::run(args, cli.home.as_deref(), &printer),
        Command::Inspect(args) => cmd::inspect::run(args, cli.home.as_deref(), &printer),
        Command::Status(args) => cmd::status::run(args, cli.home.as_deref(), &printer),
        Command::Now(args) => cmd::now::run(args, cli.home.as_deref(), &printer),
        Command::Retry(args) => cmd::retry::run(args, cli.home.as_deref(), &printer),
        Command::Archive(args) => cmd::retention::archive(args, cli.home.as_deref(), &printer),
        Command::Gc(args) => cmd::retention::gc(args, cli.home.as_deref(), &printer),
        Command::Migrate(args) => cmd::migrate::run(args, cli.home.as_deref(), &printer),
        Command::Target(command) => cmd::targets::run(command, cli.home.as_deref(), &printer),
        Command::Tail(args) => cmd::tail::run(args, cli.home.as_deref(), &printer),
        Command::Doctor => cmd::doctor::run(cli.home.as_deref(), &printer),
        Command::Completions(args) => cmd::completions::completions(args, Cli::command()),
        Command::Man => cmd::completions::man(Cli::command()),
        Command::Daemon(args) => cmd::daemon::run(args, cli.home.as_deref(), &printer),
        Command::Receiver(command) => receiver_cmd::run(command, cli.json).map(|()| ExitStatus::Success),
    };
    result.unwrap_or_else(|err| printer.error(&err)).into()
}

/// clap's own message, plus the contract's `hint:` line; `--help`/`--version` exit 0.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let _ = e.print();
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitStatus::Success.into(),
        _ => {
            eprintln!("hint: run `kitty-sync --help` (or `kitty-sync COMMAND --help`) for the commands and flags");
            ExitStatus::Usage.into()
        }
    }
}
