//! `kitty-sync migrate [--dry-run]`, `migrate conflicts`, `migrate resolve EVENT_ID --keep …`:
//! import spec-kitty's legacy queues (read-only) and settle the events whose versions disagree.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use comfy_table::{CellAlignment, Table, presets};
use kitty_sync::Error;
use kitty_sync::delivery::lock;
use kitty_sync::home::Home;
use kitty_sync::legacy::{
    self, ConflictEntry, Keep, MigrateOptions, MigrateProgress, MigrationReport, Resolution, SourceKind, SourceReport,
};
use kitty_sync::store::Store;
use serde::Serialize;

use super::Context;
use crate::exit_status::ExitStatus;
use crate::output::{Printer, Progress};

/// Below this many rows a migration takes well under a second: no bar.
const BAR_MIN_ROWS: u64 = 5_000;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct MigrateArgs {
    #[command(subcommand)]
    command: Option<MigrateCommand>,
    /// Report what the migration would do without writing anything
    #[arg(long)]
    dry_run: bool,
    /// Wait up to SECS for a running drain to finish
    #[arg(long, value_name = "SECS", default_value = "0", value_parser = crate::args::seconds)]
    wait: Duration,
}

#[derive(Subcommand, Debug)]
enum MigrateCommand {
    /// List the events whose legacy versions disagree with the journal
    Conflicts,
    /// Decide a conflict: keep the journal's version, or replace it with a legacy one
    Resolve(ResolveArgs),
}

#[derive(Args, Debug)]
struct ResolveArgs {
    /// The conflicting event's id (ULID)
    event_id: String,
    /// Which version to keep
    #[arg(long, value_enum)]
    keep: KeepArg,
    /// The source whose version to keep, when several conflict (e.g. unknown:adf30b8f7dd4874f)
    #[arg(long, value_name = "SOURCE")]
    source: Option<String>,
    /// Wait up to SECS for a running drain to finish
    #[arg(long, value_name = "SECS", default_value = "0", value_parser = crate::args::seconds)]
    wait: Duration,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum KeepArg {
    /// Keep the journal's bytes
    Journal,
    /// Replace the journal's bytes with the conflicting source's (only if never delivered)
    Incoming,
}

pub fn run(args: MigrateArgs, home_flag: Option<&Path>, printer: &Printer) -> Result<ExitStatus> {
    match args.command {
        None => run_migrate(MigrateOptions { dry_run: args.dry_run, lock_wait: args.wait }, home_flag, printer),
        Some(MigrateCommand::Conflicts) => run_conflicts(home_flag, printer),
        Some(MigrateCommand::Resolve(resolve)) => run_resolve(resolve, home_flag, printer),
    }
}

fn run_migrate(options: MigrateOptions, home_flag: Option<&Path>, printer: &Printer) -> Result<ExitStatus> {
    let ctx = Context::load(home_flag)?;
    // The scope digest that makes a source "known" comes from the server URL.
    ctx.warn_authority(printer);
    let mut bar: Option<Progress> = None;
    let mut on_progress = |p: MigrateProgress| {
        if printer.json || p.rows_total < BAR_MIN_ROWS {
            return;
        }
        bar.get_or_insert_with(|| Progress::bar(printer, "migrating")).update(p.rows_done, Some(p.rows_total));
    };
    let report = legacy::migrate(&ctx.home, &ctx.authority, &options, &mut on_progress)?;
    if let Some(bar) = &bar {
        bar.finish();
    }
    if printer.json {
        printer.json_doc(&report);
    } else {
        print_report(&report, &ctx.home, printer);
    }
    if report.blocked() {
        return Err(blocked_error(&report).into());
    }
    Ok(ExitStatus::Success)
}

fn blocked_error(report: &MigrationReport) -> Error {
    let t = &report.totals;
    let (mut reasons, mut hints) = (Vec::new(), Vec::new());
    let conflicts = report.unresolved_conflicts.max(t.conflicts);
    if conflicts > 0 {
        reasons.push(format!("{conflicts} unresolved migration conflict(s)"));
        hints.push(
            "review them with `kitty-sync migrate conflicts`, then `kitty-sync migrate resolve EVENT_ID --keep journal|incoming`",
        );
    }
    if t.source_errors > 0 {
        reasons.push(format!("{} unreadable source(s)", t.source_errors));
        hints.push("repair or restore the sources reported above, then run `kitty-sync migrate` again");
    }
    if t.invalid_rows > 0 {
        reasons.push(format!("{} invalid row(s) not imported", t.invalid_rows));
        hints.push("the rows listed above are not valid events; keep the legacy file if you need them");
    }
    let verb = if report.dry_run { "would stay blocked" } else { "is blocked" };
    let done = if report.dry_run { "nothing was written" } else { "everything else was migrated; re-running is safe" };
    Error::blocked(
        format!("cleanup of the legacy queues {verb}: {}; keep the legacy files", reasons.join(", ")),
        format!("{} ({done})", hints.join("; ")),
    )
}

fn print_report(report: &MigrationReport, home: &Home, printer: &Printer) {
    let root = std::path::absolute(home.root()).unwrap_or_else(|_| home.root().to_path_buf());
    let name = |path: &str| {
        Path::new(path).strip_prefix(&root).map(|p| p.display().to_string()).unwrap_or_else(|_| path.to_string())
    };
    let dry = if report.dry_run { " (dry run: nothing was written)" } else { "" };
    let (legacy, python): (Vec<&SourceReport>, Vec<&SourceReport>) =
        report.sources.iter().partition(|s| s.kind == SourceKind::LegacyQueue);
    if report.sources.is_empty() {
        printer.line(format!(
            "No legacy spec-kitty queues in {} (looked for queue.db and queues/queue-<hex>.db); nothing to migrate{dry}.",
            root.display()
        ));
    } else {
        if !legacy.is_empty() {
            printer.line(format!("Legacy queues in {}{dry}:", root.display()));
            for line in source_table(&legacy, &name).lines() {
                printer.line(line.trim_end());
            }
        }
        if !python.is_empty() {
            printer.line(format!("spec-kitty 3.2.4+ stores in {}{dry}:", root.display()));
            for line in python_table(&python, &name).lines() {
                printer.line(line.trim_end());
            }
        }
        print_invalid_rows(&report.sources, &name, printer);
        print_totals(report, printer);
        print_python_findings(report, printer);
    }
    for path in &report.ignored_files {
        printer.line(format!("Ignored (not a queue-<hex>.db name): {path}"));
    }
    if report.totals.conflicts > 0 {
        printer.line(
            "Conflicting versions were not imported (the journal keeps the first): see `kitty-sync migrate conflicts`.",
        );
    }
    if !report.sources.is_empty() {
        printer.line(format!("Note: {}", report.note));
    }
}

fn result_text(s: &SourceReport) -> String {
    match (&s.error, s.conflicts, s.invalid_rows) {
        (Some(e), _, _) => format!("error: {e}"),
        (None, 0, 0) if s.unchanged => "unchanged since the last import".to_string(),
        (None, 0, 0) if s.resolved_conflicts > 0 => format!("ok ({} resolved conflict(s))", s.resolved_conflicts),
        (None, 0, 0) => "ok".to_string(),
        (None, _, _) => "blocked".to_string(),
    }
}

fn python_table(sources: &[&SourceReport], name: &dyn Fn(&str) -> String) -> Table {
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_header(vec![
        "SOURCE",
        "KIND",
        "ROWS",
        "IMPORTED",
        "DEDUPED",
        "CONFLICTS",
        "INVALID",
        "LEDGER",
        "HELD",
        "RESULT",
    ]);
    for s in sources {
        table.add_row(vec![
            name(&s.path),
            s.kind.as_str().to_string(),
            s.rows_read.to_string(),
            s.imported.to_string(),
            s.deduped.to_string(),
            s.conflicts.to_string(),
            s.invalid_rows.to_string(),
            s.ledger_rows.to_string(),
            s.not_consented.to_string(),
            result_text(s),
        ]);
    }
    for index in 2..9 {
        if let Some(column) = table.column_mut(index) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}

fn print_python_findings(report: &MigrationReport, printer: &Printer) {
    for t in &report.targets_created {
        let user = if t.user_email.is_empty() { "any user".to_string() } else { t.user_email.clone() };
        printer.line(format!(
            "Created target {} for spec-kitty's {} (team {}, {user}).",
            t.target_id,
            t.canonical_url,
            if t.team_slug.is_empty() { "none" } else { &t.team_slug }
        ));
    }
    for m in &report.id_mismatches {
        printer.line(format!(
            "Row {} of {} holds event {}: journaled under the envelope's id.",
            m.row_id, m.source, m.event_id
        ));
    }
    if report.totals.not_consented > 0 {
        printer.line(format!(
            "{} event(s) captured before their project opted in are held (not_consented): they leave this machine \
             only after `kitty-sync retry --not-consented [--project UUID]`.",
            report.totals.not_consented
        ));
    }
}

fn source_table(sources: &[&SourceReport], name: &dyn Fn(&str) -> String) -> Table {
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_header(vec!["SOURCE", "SCOPE", "ROWS", "IMPORTED", "DEDUPED", "CONFLICTS", "INVALID", "BODY", "RESULT"]);
    for s in sources {
        let result = result_text(s);
        table.add_row(vec![
            name(&s.path),
            s.scope_status.map_or("-", |scope| scope.as_str()).to_string(),
            s.rows_read.to_string(),
            s.imported.to_string(),
            s.deduped.to_string(),
            s.conflicts.to_string(),
            s.invalid_rows.to_string(),
            s.body_upload_rows.to_string(),
            result,
        ]);
    }
    for index in 2..8 {
        if let Some(column) = table.column_mut(index) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}

fn print_invalid_rows(sources: &[SourceReport], name: &dyn Fn(&str) -> String, printer: &Printer) {
    for s in sources.iter().filter(|s| s.invalid_rows > 0) {
        printer.line(format!("Not imported from {} ({} row(s)):", name(&s.path), s.invalid_rows));
        for row in &s.invalid {
            let id = row.event_id.as_deref().map(|id| format!(" {id}")).unwrap_or_default();
            printer.line(format!("  row {}{id}: {}", row.row_id, row.reason));
        }
        let unlisted = s.invalid_rows.saturating_sub(s.invalid.len() as u64);
        if unlisted > 0 {
            printer.line(format!("  … and {unlisted} more (see --json for the first {})", s.invalid.len()));
        }
    }
}

fn print_totals(report: &MigrationReport, printer: &Printer) {
    let t = &report.totals;
    let would = if report.dry_run { "would be " } else { "" };
    printer.line(format!(
        "Total: {} source(s), {} row(s) read: {} {would}imported, {} deduped, {} conflict(s), {} invalid; \
         {} source error(s); {} body-upload row(s) counted, never imported.",
        t.sources, t.rows_read, t.imported, t.deduped, t.conflicts, t.invalid_rows, t.source_errors, t.body_upload_rows
    ));
    if report.sources.iter().any(|s| s.kind != SourceKind::LegacyQueue) {
        printer.line(format!(
            "Python delivery state: {} ledger row(s) for {} target(s) {would}applied; {} event(s) held for consent.",
            t.ledger_rows, t.targets, t.not_consented
        ));
    }
}

/// The contract's `migrate conflicts --json` document.
#[derive(Serialize)]
struct ConflictsDoc {
    conflicts: Vec<ConflictEntry>,
}

fn run_conflicts(home_flag: Option<&Path>, printer: &Printer) -> Result<ExitStatus> {
    let home = Home::resolve(home_flag)?;
    let store = Store::open_read_only(&home)?;
    let conflicts = legacy::list_conflicts(store.as_ref())?;
    if printer.json {
        printer.json_doc(&ConflictsDoc { conflicts });
        return Ok(ExitStatus::Success);
    }
    if conflicts.is_empty() {
        printer.line("No migration conflicts.");
        return Ok(ExitStatus::Success);
    }
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_header(vec!["EVENT ID", "SOURCE", "JOURNAL SHA256", "INCOMING SHA256", "DETECTED", "STATE"]);
    for c in &conflicts {
        table.add_row(vec![
            c.event_id.clone(),
            c.source.clone(),
            c.existing_sha256.get(..16).unwrap_or(&c.existing_sha256).to_string(),
            c.incoming_sha256.get(..16).unwrap_or(&c.incoming_sha256).to_string(),
            c.detected_at.clone(),
            if c.resolved { "resolved" } else { "OPEN" }.to_string(),
        ]);
    }
    for line in table.lines() {
        printer.line(line.trim_end());
    }
    let open = conflicts.iter().filter(|c| !c.resolved).count();
    printer.line(format!("{open} unresolved of {}.", conflicts.len()));
    if open > 0 {
        printer.line("Resolve with `kitty-sync migrate resolve EVENT_ID --keep journal|incoming [--source SOURCE]`.");
    }
    Ok(ExitStatus::Success)
}

fn run_resolve(args: ResolveArgs, home_flag: Option<&Path>, printer: &Printer) -> Result<ExitStatus> {
    let home = Home::resolve(home_flag)?;
    // Resolving needs an existing store; never create one for it.
    if Store::open_read_only(&home)?.is_none() {
        return Err(Error::usage(
            format!("no migration conflict for event {}: this home has no journal yet", args.event_id),
            "run `kitty-sync migrate` first; `kitty-sync migrate conflicts` lists the conflicts",
        )
        .into());
    }
    let lock = lock::acquire(&home, args.wait, "`kitty-sync migrate resolve`")?;
    let mut store = Store::open(&home)?;
    let keep = match args.keep {
        KeepArg::Journal => Keep::Journal,
        KeepArg::Incoming => Keep::Incoming,
    };
    let resolution = legacy::resolve(&mut store, &lock, &args.event_id, keep, args.source.as_deref())?;
    if printer.json {
        printer.json_doc(&resolution);
    } else {
        print_resolution(&resolution, printer);
    }
    Ok(ExitStatus::Success)
}

fn print_resolution(r: &Resolution, printer: &Printer) {
    match (&r.source, r.resolved) {
        (None, 0) => printer.line(format!("The conflicts of {} were already resolved; nothing changed.", r.event_id)),
        (None, n) => printer.line(format!("Kept the journal's version of {}; {n} conflict(s) resolved.", r.event_id)),
        (Some(source), n) => printer.line(format!(
            "The journal now holds the version of {} from {source} (canonical sha256 {}); {n} conflict(s) resolved. \
             The replaced version is kept in `kitty-sync migrate conflicts`.",
            r.event_id, r.journal_sha256
        )),
    }
}
