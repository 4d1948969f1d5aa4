//! `kitty-sync now`: drain the journal to the active target.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use kitty_sync::Error;
use kitty_sync::delivery::dispatcher::{DrainOptions, DrainSummary, StopReason, drain};
use kitty_sync::delivery::lock;
use kitty_sync::delivery::target::TargetKind;
use kitty_sync::home::write_atomically;
use kitty_sync::store::Store;
use serde::Serialize;

use super::Context;
use crate::exit_status::ExitStatus;
use crate::output::Printer;

#[derive(Args, Debug)]
pub struct NowArgs {
    /// Deliver at most N events this run
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    /// Events per batch
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    batch_events: u64,
    /// Uncompressed bytes per batch body
    #[arg(long, value_name = "N", default_value_t = 512 * 1024, value_parser = clap::value_parser!(u64).range(64..))]
    batch_bytes: u64,
    /// Re-sends of a batch after a transient failure
    #[arg(long, value_name = "N", default_value_t = 3)]
    retries: u32,
    /// Request timeout in seconds
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = crate::args::positive_seconds)]
    timeout: Duration,
    /// Wait up to SECS for another drain to finish (default: do not wait)
    #[arg(long, value_name = "SECS", default_value = "0", value_parser = crate::args::seconds)]
    wait: Duration,
    /// Also write the JSON report to PATH
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
    /// Deliver every retained event again to this target (after its server was reset);
    /// earlier ledger rows are kept as history
    #[arg(long)]
    redrain: bool,
}

#[derive(Serialize)]
struct NowReport<'a> {
    mode: &'static str,
    #[serde(flatten)]
    summary: Option<&'a DrainSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
    /// Why nothing (more) was delivered, when the drain was refused (gates, reset, busy).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ReportedError>,
}

#[derive(Serialize)]
struct ReportedError {
    message: String,
    hint: String,
    exit_code: u8,
}

pub fn run(args: NowArgs, home_flag: Option<&Path>, printer: &Printer) -> Result<ExitStatus> {
    let ctx = Context::load(home_flag)?;
    if let Some(path) = &args.report {
        // Before delivering: a report that cannot be written must not turn a done drain into a failure.
        kitty_sync::atomic_write::check_destination(path)?;
    }
    let mode = ctx.config.mode()?;
    ctx.check_delivery(mode)?;
    let timeout = args.timeout;
    let Some(mut receiver) = super::target::active_receiver(&ctx, mode, timeout, printer)? else {
        let note = format!("Event sync mode {mode}: events are retained locally; nothing is delivered in this mode.");
        let report = NowReport { mode: mode.display_name(), summary: None, note: Some(note.clone()), error: None };
        emit_report(&report, &args, printer)?;
        printer.line(note);
        return Ok(ExitStatus::Success);
    };
    let wait = args.wait;
    let refused = |e: kitty_sync::Error| -> Result<ExitStatus> {
        let error = ReportedError { message: e.to_string(), hint: e.hint().to_string(), exit_code: e.exit_code() };
        let report = NowReport { mode: mode.display_name(), summary: None, note: None, error: Some(error) };
        emit_report(&report, &args, printer)?;
        Err(e.into())
    };
    let lock = match lock::acquire(&ctx.home, wait, "`kitty-sync now`") {
        Ok(lock) => lock,
        Err(e) => return refused(e),
    };
    let mut store = Store::open(&ctx.home)?;
    let options = DrainOptions {
        limit: args.limit,
        batch_events: args.batch_events as usize,
        batch_bytes: args.batch_bytes as usize,
        retries: args.retries,
        redrain: args.redrain,
        ..DrainOptions::default()
    };
    let bar = crate::output::Progress::bar(printer, "delivering");
    let summary = drain(&mut store, &lock, receiver.as_mut(), &options, bar.is_visible(), &mut |done, total| {
        bar.update(done, total)
    });
    bar.finish();
    // Whatever the drain's outcome: a rotated token that could not be saved is said, and fails.
    let unsaved = receiver.finish();
    let summary = match summary {
        Ok(summary) => summary,
        Err(e) => {
            if let Err(u) = &unsaved {
                printer.warn(format!("{u} (hint: {})", u.hint()));
            }
            return refused(e);
        }
    };
    emit_report(
        &NowReport { mode: mode.display_name(), summary: Some(&summary), note: None, error: None },
        &args,
        printer,
    )?;
    print_failures(&summary, printer);
    if let Some(n) = summary.not_redeliverable.filter(|n| *n > 0) {
        printer.warn(format!("{n} event(s) were purged by gc and cannot be delivered again to this target"));
    }
    printer.line(final_line(&summary, mode.display_name()));
    unsaved?;
    exit_code(&summary, printer)
}

fn emit_report(report: &NowReport<'_>, args: &NowArgs, printer: &Printer) -> Result<()> {
    if printer.json {
        printer.json_doc(report);
    }
    if let Some(path) = &args.report {
        let text = serde_json::to_vec_pretty(report)?;
        write_atomically(path, &text, None)?;
    }
    Ok(())
}

fn print_failures(summary: &DrainSummary, printer: &Printer) {
    let shown = if printer.verbose > 0 { summary.failures.len() } else { 10 };
    for f in summary.failures.iter().take(shown) {
        let http = f.http_status.map(|s| format!(" HTTP {s}")).unwrap_or_default();
        let error = f.error.as_deref().unwrap_or("");
        printer.note(format!("  {} {}{http} {error}", f.event_id, f.outcome.as_str()));
    }
    let hidden = summary.failures.len().saturating_sub(shown);
    if hidden > 0 {
        printer.note(format!("  … and {hidden} more (use -v, `--json` or `--report PATH`)"));
    }
}

pub fn final_line(s: &DrainSummary, mode: &str) -> String {
    format!(
        "Delivered {}, duplicate {}, rejected {}, parked {}, transient {}, pending {} → {} ({mode}) in {}",
        s.delivered,
        s.duplicate,
        s.rejected,
        s.terminal_failed,
        s.transient,
        s.pending,
        s.target.canonical_url,
        human_duration(s.elapsed_ms)
    )
}

fn human_duration(ms: u64) -> String {
    if ms < 1000 { format!("{ms} ms") } else { format!("{:.2} s", ms as f64 / 1000.0) }
}

fn exit_code(summary: &DrainSummary, printer: &Printer) -> Result<ExitStatus> {
    match &summary.stop {
        Some(StopReason::Auth { error }) => {
            let hint = match summary.target.kind {
                TargetKind::Teamspace => {
                    "log in again with spec-kitty (`spec-kitty auth login`), then run `kitty-sync now`"
                }
                TargetKind::External => "check the token in the variable named by [event_sync] external_token_env",
            };
            Err(Error::auth_refused(format!("the receiver refused our credentials ({error}); delivery stopped"), hint)
                .into())
        }
        Some(StopReason::Transient { error, .. }) => {
            printer.warn(format!("delivery stopped after retries: {error}"));
            printer.note("hint: nothing was lost; run `kitty-sync now` again when the receiver is reachable");
            Ok(ExitStatus::Incomplete)
        }
        None if summary.complete() => Ok(ExitStatus::Success),
        None => {
            printer.note(
                "hint: some events were not delivered; `kitty-sync now` re-sends pending/transient ones, \
                 `kitty-sync retry --all-parked [--rejected]` requeues parked/rejected ones",
            );
            Ok(ExitStatus::Incomplete)
        }
    }
}
