//! `kitty-sync now`: drain the journal to the active target.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use kitty_sync::Error;
use kitty_sync::delivery::dispatcher::{DrainOptions, DrainSummary, StopReason};
use kitty_sync::delivery::fanout::{TargetOutcome, drain_all, overall_exit_code};
use kitty_sync::delivery::lock;
use kitty_sync::home::write_atomically;
use kitty_sync::store::Store;
use kitty_sync::targets_config::PRIMARY;
use serde::Serialize;

use super::{Context, fan};
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
    /// Deliver only to this target (repeatable; `primary` is the mode's target; default: every active target)
    #[arg(long = "target", value_name = "NAME")]
    targets: Vec<String>,
}

#[derive(Serialize)]
struct NowReport<'a> {
    mode: &'static str,
    /// The primary target's counts (§7 keys; zeros when it was not delivered to).
    #[serde(flatten)]
    summary: &'a DrainSummary,
    exit_code: u8,
    targets: &'a [TargetOutcome],
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
    /// Why nothing (more) was delivered, when the run was refused (busy) or a lone target blocked.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ReportedError>,
}

#[derive(Serialize)]
struct ReportedError {
    message: String,
    hint: String,
    exit_code: u8,
}

impl ReportedError {
    fn of(e: &Error) -> ReportedError {
        ReportedError { message: e.to_string(), hint: e.hint().to_string(), exit_code: e.exit_code() }
    }
}

pub fn run(args: NowArgs, home_flag: Option<&Path>, printer: &Printer) -> Result<ExitStatus> {
    let ctx = Context::load(home_flag)?;
    if let Some(path) = &args.report {
        // Before delivering: a report that cannot be written must not turn a done drain into a failure.
        kitty_sync::atomic_write::check_destination(path)?;
    }
    let mode = ctx.config.mode()?;
    let plan = fan::plan(&ctx, mode, &args.targets, args.timeout, printer)?;
    let primary_summary = plan.primary_summary();
    if plan.targets.is_empty() {
        let note = format!("Event sync mode {mode}: events are retained locally; nothing is delivered in this mode.");
        let report = NowReport {
            mode: mode.display_name(),
            summary: &primary_summary,
            exit_code: 0,
            targets: &[],
            note: Some(note.clone()),
            error: None,
        };
        emit_report(&report, &args, printer)?;
        printer.line(note);
        return Ok(ExitStatus::Success);
    }
    let lock = match lock::acquire(&ctx.home, args.wait, "`kitty-sync now`") {
        Ok(lock) => lock,
        Err(e) => {
            let report = NowReport {
                mode: mode.display_name(),
                summary: &primary_summary,
                exit_code: e.exit_code(),
                targets: &[],
                note: None,
                error: Some(ReportedError::of(&e)),
            };
            emit_report(&report, &args, printer)?;
            return Err(e.into());
        }
    };
    // Opened (and migrated) once here, before the targets' connections open side by side.
    drop(Store::open(&ctx.home)?);
    let options = DrainOptions {
        limit: args.limit,
        batch_events: args.batch_events as usize,
        batch_bytes: args.batch_bytes as usize,
        retries: args.retries,
        redrain: args.redrain,
        ..DrainOptions::default()
    };
    let has_primary = plan.has_primary;
    let bar = crate::output::Progress::bar(printer, "delivering");
    let outcomes = drain_all(&ctx.home, &lock, plan.targets, &options, bar.is_visible(), &mut |done, total| {
        bar.update(done, total)
    });
    bar.finish();
    let exit_code = overall_exit_code(&outcomes);
    let primary = outcomes.iter().find(|o| has_primary && o.name == PRIMARY).map(|o| &o.summary);
    let lone_error = match outcomes.as_slice() {
        [only] => only.error.as_ref(),
        _ => None,
    };
    let report = NowReport {
        mode: mode.display_name(),
        summary: primary.unwrap_or(&primary_summary),
        exit_code,
        targets: &outcomes,
        note: None,
        error: lone_error
            .filter(|e| matches!(e.exit_code(), 3 | 5) && primary.is_none_or(|p| p.batches == 0))
            .map(ReportedError::of),
    };
    emit_report(&report, &args, printer)?;
    for outcome in &outcomes {
        report_target(outcome, mode.display_name(), outcomes.len() > 1, printer);
    }
    finish(outcomes, exit_code)
}

/// One target's failures, warnings and final line.
fn report_target(outcome: &TargetOutcome, mode: &str, named: bool, printer: &Printer) {
    let summary = &outcome.summary;
    let ran = outcome.error.is_none() || summary.batches > 0;
    if ran {
        print_failures(summary, printer);
        if let Some(n) = summary.not_redeliverable.filter(|n| *n > 0) {
            printer.warn(format!("{n} event(s) were purged by gc and cannot be delivered again to this target"));
        }
        let label = if outcome.name == PRIMARY { mode.to_string() } else { outcome.name.clone() };
        printer.line(final_line(summary, &label));
    }
    if named && let Some(e) = &outcome.error {
        printer.warn(format!("target {}: {e} (hint: {})", outcome.name, e.hint()));
    }
    // A lone target that otherwise succeeded ends with this error instead (see `finish`).
    if let Some(u) = outcome.unsaved.as_ref().filter(|_| named || outcome.error.is_some()) {
        printer.warn(format!("{u} (hint: {})", u.hint()));
    }
    if let Some(StopReason::Transient { error, .. }) = &summary.stop {
        let who = if named { format!("target {}: ", outcome.name) } else { String::new() };
        printer.warn(format!("{who}delivery stopped after retries: {error}"));
        printer.note("hint: nothing was lost; run `kitty-sync now` again when the receiver is reachable");
    } else if outcome.exit_code == 4 {
        printer.note(
            "hint: some events were not delivered; `kitty-sync now` re-sends pending/transient ones, \
             `kitty-sync retry --all-parked [--rejected]` requeues parked/rejected ones",
        );
    }
}

/// The run's exit: a lone target's error is the process's error (its message and hint on
/// stderr); several targets end with the precedence of contract §9.
fn finish(outcomes: Vec<TargetOutcome>, exit_code: u8) -> Result<ExitStatus> {
    let single = outcomes.len() == 1;
    for outcome in outcomes {
        if let Some(u) = outcome.unsaved
            && single
            && outcome.error.is_none()
        {
            return Err(u.into());
        }
        if single && let Some(e) = outcome.error {
            return Err(e.into());
        }
    }
    Ok(match exit_code {
        0 => ExitStatus::Success,
        2 => ExitStatus::Usage,
        3 => ExitStatus::Blocked,
        4 => ExitStatus::Incomplete,
        5 => ExitStatus::Busy,
        _ => ExitStatus::Failure,
    })
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
