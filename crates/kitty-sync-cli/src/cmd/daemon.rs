//! `kitty-sync daemon`: the engine's delivery loop in the foreground, for systemd, launchd, a
//! container or `&`. This file wires flags, the active targets, signals and the health
//! endpoint; scheduling, backoff and the state file are the engine's (`kitty_sync::daemon`).

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use kitty_sync::Error;
use kitty_sync::daemon::{Daemon, DaemonOptions, DaemonTarget, Notice, REQUEST_TIMEOUT, Shared, health, instance};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::Context;
use crate::exit_status::ExitStatus;
use crate::output::Printer;

/// After SIGTERM/SIGINT the request in flight gets this long before it is abandoned (the
/// contract allows 10 s; what it sent is recorded or re-sent next time).
const ABANDON_AFTER: Duration = Duration::from_secs(8);

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Serve `GET /health` on ADDR (e.g. 127.0.0.1:8788): 200 when every target is idle or delivering, else 503
    #[arg(long, value_name = "ADDR")]
    health_bind: Option<String>,
    /// Longest wait between attempts to a failing target, in seconds
    #[arg(long, value_name = "SECS", default_value = "300", value_parser = crate::args::positive_seconds)]
    max_backoff: Duration,
    /// Fallback check for new captures every N milliseconds (the store is also watched)
    #[arg(long, value_name = "N", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    poll_ms: u64,
}

pub fn run(args: DaemonArgs, home_flag: Option<&Path>, printer: &Printer) -> Result<ExitStatus> {
    let ctx = Context::load(home_flag)?;
    let mode = ctx.config.mode()?;
    ctx.check_delivery(mode)?;
    // From here on a SIGTERM/SIGINT waits for the handler below instead of killing us mid-start.
    let signals = Signals::new([SIGTERM, SIGINT])?;
    // Before binding: a second daemon is "busy" (exit 5) even when it asks for the same port.
    let _instance = instance::acquire(&ctx.home)?;
    let listener = args.health_bind.as_deref().map(bind_health).transpose()?;
    let targets = active_targets(&ctx, printer)?;
    if targets.is_empty() {
        printer.note(format!(
            "Event sync mode {mode} delivers nowhere: the daemon keeps its state and health but has no target"
        ));
    }
    let options = DaemonOptions { max_backoff: args.max_backoff, poll: Duration::from_millis(args.poll_ms) };
    let daemon = Daemon::start(&ctx.home, targets, options)?;
    let shared = daemon.shared();
    handle_signals(signals, Arc::clone(&shared));
    if let Some(listener) = listener {
        printer.note(format!("health on http://{}/health", listener.local_addr()?));
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || health::serve(listener, shared));
    }
    printer.note(format!("kitty-sync daemon running (pid {}) for {}", std::process::id(), ctx.home.root().display()));
    let mut reload = || {
        let ctx = Context::load(home_flag)?;
        ctx.check_delivery(ctx.config.mode()?)?;
        active_targets(&ctx, printer)
    };
    daemon.run(&mut |notice| print_notice(&notice, printer), &mut reload)?;
    printer.note("kitty-sync daemon stopped");
    Ok(ExitStatus::Success)
}

/// Every active target (contract §9), chosen exactly as `now` chooses them: the mode's primary
/// when the mode delivers, then the enabled named targets with their type filters.
fn active_targets(ctx: &Context, printer: &Printer) -> kitty_sync::Result<Vec<DaemonTarget>> {
    let mode = ctx.config.mode()?;
    let plan = super::fan::plan(ctx, mode, &[], REQUEST_TIMEOUT, printer)?;
    let targets = plan.targets.into_iter();
    Ok(targets.map(|t| DaemonTarget { name: t.name, receiver: t.receiver, types: t.types }).collect())
}

fn bind_health(addr: &str) -> kitty_sync::Result<TcpListener> {
    TcpListener::bind(addr).map_err(|e| {
        Error::usage(
            format!("cannot serve health on {addr}: {e}"),
            "pass a free HOST:PORT to --health-bind, e.g. 127.0.0.1:8788 (port 0 picks one)",
        )
    })
}

/// The first SIGTERM/SIGINT asks the loop to stop; if the request in flight outlasts
/// [`ABANDON_AFTER`], the stopped state is written and the process exits anyway.
fn handle_signals(mut signals: Signals, shared: Arc<Shared>) {
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            shared.request_stop();
            std::thread::sleep(ABANDON_AFTER);
            let _ = shared.write_stopped();
            std::process::exit(0);
        }
    });
}

fn print_notice(notice: &Notice<'_>, printer: &Printer) {
    match notice {
        Notice::Delivered { name, summary } => {
            printer.note(format!("{name}: {}", super::now::final_line(summary, "daemon")));
        }
        Notice::Failed { name, error, retry_in, blocked } => {
            let what = if *blocked { "blocked" } else { "failed" };
            printer.warn(format!("{name}: {what}: {error}; next attempt in {:.1} s", retry_in.as_secs_f64()));
        }
        Notice::WatchUnavailable { error } => printer.warn(error),
        Notice::Reloaded { targets } => {
            printer.note(format!("settings changed: now delivering to {targets} target(s)"))
        }
        Notice::Trouble { error } => printer.warn(format!("{error}; trying again shortly")),
    }
}
