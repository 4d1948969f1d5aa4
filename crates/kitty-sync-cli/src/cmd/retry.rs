//! `kitty-sync retry`: make parked (and rejected) events of the current target due again.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use kitty_sync::Error;
use kitty_sync::delivery::retry::{RetrySelection, requeue};
use kitty_sync::delivery::target;
use kitty_sync::store::Store;

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
}

pub fn run(args: RetryArgs, home_flag: Option<&Path>, printer: &Printer) -> Result<ExitStatus> {
    if args.event_ids.is_empty() && !args.all_parked && !args.rejected {
        return Err(Error::usage(
            "nothing to retry: name events, or pass --all-parked and/or --rejected",
            "e.g. `kitty-sync retry --all-parked` or `kitty-sync retry 01K... --rejected`",
        )
        .into());
    }
    let ctx = Context::load(home_flag)?;
    let mode = ctx.config.mode()?;
    let Some(receiver) = super::target::active_receiver(&ctx, mode, Duration::from_secs(5), printer)? else {
        return Err(Error::usage(
            format!("mode {mode} delivers nowhere, so there is no current target to retry for"),
            "switch to a delivering mode with `kitty-sync mode`",
        )
        .into());
    };
    let selection = RetrySelection { parked: args.all_parked || !args.event_ids.is_empty(), rejected: args.rejected };
    let mut store = Store::open(&ctx.home)?;
    let Some(record) = target::find(store.conn(), receiver.identity())? else {
        printer.line(format!("Nothing to retry: {} has never been drained to.", receiver.identity().canonical_url));
        return Ok(ExitStatus::Success);
    };
    let report = requeue(&mut store, &record, &args.event_ids, selection)?;
    if printer.json {
        printer.json_doc(&report);
    } else {
        for s in &report.skipped {
            let status = s.status.as_deref().unwrap_or("never attempted");
            printer.note(format!(
                "skipped {}: {status} (only parked{} events are retried)",
                s.event_id,
                if args.rejected { " or rejected" } else { "" }
            ));
        }
        printer.line(format!(
            "Requeued {} event(s) for {}; run `kitty-sync now` to deliver them.",
            report.requeued.len(),
            record.identity.canonical_url
        ));
    }
    Ok(ExitStatus::Success)
}
