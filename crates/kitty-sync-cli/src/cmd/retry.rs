//! `kitty-sync retry`: make parked (and rejected) events due again, for every active target or
//! those named with `--target`.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use kitty_sync::Error;
use kitty_sync::delivery::lock;
use kitty_sync::delivery::retry::{RetrySelection, release_not_consented, requeue_for};
use kitty_sync::store::Store;
use serde::Serialize;

use super::Context;
use crate::exit_status::ExitStatus;
use crate::output::Printer;

#[derive(Args, Debug)]
pub struct RetryArgs {
    /// Event ids to requeue (default: all in the selected states)
    event_ids: Vec<String>,
    /// Requeue every parked (terminal_failed) event of the current target
    #[arg(long)]
    all_parked: bool,
    /// Also requeue rejected events
    #[arg(long)]
    rejected: bool,
    /// Release events imported from spec-kitty 3.2.7 that were captured before their project
    /// opted in (held as not_consented): from now on they are delivered to every target
    #[arg(long)]
    not_consented: bool,
    /// With --not-consented: only the events of this project (its UUID)
    #[arg(long, value_name = "UUID", requires = "not_consented")]
    project: Option<String>,
    /// Wait up to SECS for a running drain to finish
    #[arg(long, value_name = "SECS", default_value = "0", value_parser = crate::args::seconds)]
    wait: Duration,
    /// Only for this target (repeatable; `primary` is the mode's target; default: every active target)
    #[arg(long = "target", value_name = "NAME")]
    targets: Vec<String>,
}

pub fn run(args: RetryArgs, home_flag: Option<&Path>, printer: &Printer) -> Result<ExitStatus> {
    if args.not_consented && args.event_ids.is_empty() && !args.all_parked && !args.rejected {
        return release(args.project.as_deref(), home_flag, printer);
    }
    if args.event_ids.is_empty() && !args.all_parked && !args.rejected {
        return Err(Error::usage(
            "nothing to retry: name events, or pass --all-parked, --rejected and/or --not-consented",
            "e.g. `kitty-sync retry --all-parked` or `kitty-sync retry 01K... --rejected`",
        )
        .into());
    }
    if args.not_consented {
        return Err(Error::usage(
            "--not-consented releases held events for every target; it cannot be combined with event ids, \
             --all-parked or --rejected",
            "run `kitty-sync retry --not-consented [--project UUID]` on its own",
        )
        .into());
    }
    let ctx = Context::load(home_flag)?;
    let mode = ctx.config.mode()?;
    let plan = super::fan::plan(&ctx, mode, &args.targets, Duration::from_secs(5), printer)?;
    if plan.targets.is_empty() {
        return Err(Error::usage(
            format!("mode {mode} delivers nowhere and no named target is active, so there is no target to retry for"),
            "switch to a delivering mode with `kitty-sync mode`, or add one with `kitty-sync target add`",
        )
        .into());
    }
    let selection = RetrySelection { parked: args.all_parked || !args.event_ids.is_empty(), rejected: args.rejected };
    let lock = lock::acquire(&ctx.home, args.wait, "`kitty-sync retry`")?;
    let mut store = Store::open(&ctx.home)?;
    let mut reports = Vec::new();
    for target in &plan.targets {
        let identity = target.receiver.identity();
        let report = requeue_for(&mut store, &lock, identity, &args.event_ids, selection)?;
        reports.push(TargetRetry { name: target.name.clone(), canonical_url: identity.canonical_url.clone(), report });
    }
    if printer.json {
        match reports.as_slice() {
            [only] => match &only.report {
                Some(report) => printer.json_doc(report),
                None => print_retry(only, args.rejected, printer),
            },
            _ => printer.json_doc(&serde_json::json!({ "targets": reports })),
        }
    } else {
        for r in &reports {
            print_retry(r, args.rejected, printer);
        }
    }
    Ok(ExitStatus::Success)
}

/// What `retry` did for one target (`report` is `None` when it was never drained to).
#[derive(Serialize)]
struct TargetRetry {
    name: String,
    canonical_url: String,
    #[serde(flatten)]
    report: Option<kitty_sync::delivery::retry::RetryReport>,
}

fn print_retry(r: &TargetRetry, rejected: bool, printer: &Printer) {
    let canonical_url = &r.canonical_url;
    let Some(report) = &r.report else {
        printer.line(format!("Nothing to retry: {canonical_url} has never been drained to."));
        return;
    };
    for s in &report.skipped {
        let status = s.status.as_deref().unwrap_or("never attempted");
        printer.note(format!(
            "skipped {}: {status} (only parked{} events are retried)",
            s.event_id,
            if rejected { " or rejected" } else { "" }
        ));
    }
    printer.line(format!(
        "Requeued {} event(s) for {}; run `kitty-sync now` to deliver them.",
        report.requeued.len(),
        canonical_url
    ));
}

/// `retry --not-consented [--project UUID]`: the operator's consent for events spec-kitty 3.2.7
/// held back. Needs no delivering mode: it changes no target's ledger.
fn release(project: Option<&str>, home_flag: Option<&Path>, printer: &Printer) -> Result<ExitStatus> {
    let home = kitty_sync::home::Home::resolve(home_flag)?;
    if Store::open_read_only(&home)?.is_none() {
        printer.line("Nothing to release: this home has no journal.");
        return Ok(ExitStatus::Success);
    }
    let mut store = Store::open(&home)?;
    let report = release_not_consented(&mut store, project)?;
    if printer.json {
        printer.json_doc(&report);
    } else {
        let scope = project.map(|p| format!(" of project {p}")).unwrap_or_default();
        printer.line(format!(
            "Released {} event(s){scope} captured before their project opted in; run `kitty-sync now` to deliver them.",
            report.released.len()
        ));
    }
    Ok(ExitStatus::Success)
}
