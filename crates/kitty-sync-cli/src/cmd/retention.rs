//! `kitty-sync archive` and `kitty-sync gc`: explicit, lock-protected retention commands.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use kitty_sync::Error;
use kitty_sync::delivery::lock::{self, Change};
use kitty_sync::delivery::receiver::{ExternalReceiver, HttpClient, Receiver, TeamspaceReceiver};
use kitty_sync::delivery::retention::{self, parse_duration_ms};
use kitty_sync::delivery::target::TargetIdentity;
use kitty_sync::home::Home;
use kitty_sync::mode::EventSyncMode;
use kitty_sync::store::Store;

use super::Context;
use crate::exit_status::ExitStatus;
use crate::output::Printer;

#[derive(Args, Debug)]
pub struct ArchiveArgs {
    /// Archive file (default: event-sync/archive/archive-<UTC timestamp>.jsonl.gz)
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
    /// Only events captured longer ago than this (e.g. 30d, 12h)
    #[arg(long, value_name = "DURATION")]
    older_than: Option<String>,
    /// Report what would be archived; write nothing
    #[arg(long)]
    dry_run: bool,
    /// Wait up to SECS for a running drain to finish
    #[arg(long, value_name = "SECS", default_value = "0", value_parser = crate::args::seconds)]
    wait: Duration,
}

#[derive(Args, Debug)]
pub struct GcArgs {
    /// Report what would be purged; change nothing
    #[arg(long)]
    dry_run: bool,
    /// Wait up to SECS for a running drain to finish
    #[arg(long, value_name = "SECS", default_value = "0", value_parser = crate::args::seconds)]
    wait: Duration,
}

/// The store for writing; for `--dry-run`, read-only (a dry run writes nothing, not even a
/// WAL file).
fn open_store(home: &Home, dry_run: bool) -> Result<Store> {
    let existing = Store::open_read_only(home)?;
    match existing {
        Some(store) if dry_run => Ok(store),
        Some(read_only) => {
            // Closed first: its whole-file read lock (held when no WAL file exists) would
            // keep the writer below from opening the store ("database is locked").
            drop(read_only);
            Ok(Store::open(home)?)
        }
        None => Err(Error::usage(
            format!("there is no journal in {} yet", home.root().display()),
            "capture events with `kitty-sync emit` first (or pass --home)",
        )
        .into()),
    }
}

/// The target the configured mode delivers to: it counts as a known target for archive and gc
/// even before its first drain, so switching targets never archives or purges events the new
/// target has not received. `None` for modes that deliver nowhere.
fn current_target(ctx: &Context, printer: &Printer) -> Result<Option<TargetIdentity>> {
    let client = HttpClient::new(Duration::from_secs(5));
    Ok(match ctx.config.mode()? {
        EventSyncMode::Teamspace => {
            ctx.warn_authority(printer);
            Some(TeamspaceReceiver::new(&ctx.home, &ctx.authority, &ctx.credentials, client)?.identity().clone())
        }
        EventSyncMode::ExternalReceiver => match ctx.config.external_endpoint.as_deref() {
            Some(endpoint) => Some(ExternalReceiver::new(Some(endpoint), None, client)?.identity().clone()),
            None => None,
        },
        EventSyncMode::LocalRetention | EventSyncMode::OptOut => None,
    })
}

/// The enabled named targets: known to archive and gc even before their first drain.
fn active_named(ctx: &Context) -> kitty_sync::Result<Vec<retention::ActiveNamed>> {
    Ok(ctx
        .config
        .named_targets
        .enabled()?
        .into_iter()
        .map(|t| retention::ActiveNamed {
            identity: kitty_sync::target_report::named_identity(t),
            types: t.types.clone(),
        })
        .collect())
}

pub fn archive(args: ArchiveArgs, home_flag: Option<&Path>, printer: &Printer) -> Result<ExitStatus> {
    let ctx = Context::load(home_flag)?;
    let home = &ctx.home;
    let cutoff = match &args.older_than {
        Some(text) => Some(kitty_sync::clock::now_ms() - parse_duration_ms(text)?),
        None => None,
    };
    let current = current_target(&ctx, printer)?;
    let named = active_named(&ctx)?;
    let mut store = open_store(home, args.dry_run)?;
    let lock = if args.dry_run { None } else { Some(lock::acquire(home, args.wait, "archive")?) };
    let change = lock.as_ref().map_or(Change::DryRun, Change::Apply);
    let report = retention::archive(&mut store, home, args.out.as_deref(), cutoff, current.as_ref(), &named, change)?;
    if printer.json {
        if let Some(note) = &report.note {
            printer.note(format!("Nothing archived: {note}."));
        }
        printer.json_doc(&report);
    } else {
        if let Some(note) = &report.note {
            printer.line(format!("Nothing archived: {note}."));
            return Ok(ExitStatus::Success);
        }
        let verb = if report.dry_run { "Would archive" } else { "Archived" };
        let out = report.out.as_deref().map(|o| format!(" to {o}")).unwrap_or_default();
        printer.line(format!("{verb} {} event(s){out} ({} bytes)", report.archived, report.bytes));
        if !report.dry_run && report.archived > 0 {
            printer.line("Payloads stay in the journal until `kitty-sync gc`.");
        }
    }
    Ok(ExitStatus::Success)
}

pub fn gc(args: GcArgs, home_flag: Option<&Path>, printer: &Printer) -> Result<ExitStatus> {
    let ctx = Context::load(home_flag)?;
    let home = &ctx.home;
    let current = current_target(&ctx, printer)?;
    let named = active_named(&ctx)?;
    let mut store = open_store(home, args.dry_run)?;
    let lock = if args.dry_run { None } else { Some(lock::acquire(home, args.wait, "gc")?) };
    let change = lock.as_ref().map_or(Change::DryRun, Change::Apply);
    let bar = crate::output::Progress::bar(printer, "purging");
    let report =
        retention::gc(&mut store, current.as_ref(), &named, change, &mut |done, total| bar.update(done, Some(total)));
    bar.finish();
    let report = report?;
    if printer.json {
        if let Some(note) = &report.note {
            printer.note(format!("Nothing purged: {note}."));
        }
        printer.json_doc(&report);
        return Ok(ExitStatus::Success);
    }
    if let Some(note) = &report.note {
        printer.line(format!("Nothing purged: {note}."));
        return Ok(ExitStatus::Success);
    }
    let verb = if report.dry_run { "Would purge" } else { "Purged" };
    printer.line(format!(
        "{verb} payloads of {} event(s) ({} bytes); {} retained event(s) kept",
        report.purged, report.purged_bytes, report.kept
    ));
    printer.line(format!("store file: {} → {} bytes", report.store_bytes_before, report.store_bytes_after));
    Ok(ExitStatus::Success)
}
