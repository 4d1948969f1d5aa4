//! `kitty-sync status [--json] [--check]`: read-only report.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use kitty_sync::daemon::report::{DaemonStatus, LagTarget};
use kitty_sync::delivery::receiver::Receiver;
use kitty_sync::delivery::retention::parse_duration_ms;
use kitty_sync::status::{CurrentDelivery, JournalSection, StatusReport, build};

use super::Context;
use crate::exit_status::ExitStatus;
use crate::output::Printer;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Exit 3 when something needs attention (conflicts, unreadable store, blocked delivery)
    #[arg(long)]
    check: bool,
    /// Also fail `ok`/`--check` when an active target's oldest undelivered event is older than this (e.g. 30s, 5m)
    #[arg(long, value_name = "DURATION")]
    max_lag: Option<String>,
}

pub fn run(args: StatusArgs, home_flag: Option<&Path>, printer: &Printer) -> Result<ExitStatus> {
    let ctx = Context::load(home_flag)?;
    let max_lag_ms = args.max_lag.as_deref().map(parse_duration_ms).transpose()?;
    let mode = ctx.config.mode()?;
    let receiver = super::target::active_receiver(&ctx, mode, Duration::from_secs(5), printer)?;
    if receiver.is_none() {
        ctx.warn_authority(printer);
    }
    let mut report =
        build(&ctx.home, &ctx.authority, &CurrentDelivery { mode, receiver: receiver.as_deref().map(|r| r as _) });
    active_targets(&mut report, &ctx);
    let lag_targets = lag_targets(receiver.as_deref().map(|r| r as &dyn Receiver), &ctx);
    kitty_sync::daemon::report::attach(&mut report, &ctx.home, &lag_targets, max_lag_ms);
    if printer.json {
        printer.json_doc(&report);
    } else {
        render(&report, &ctx, printer);
    }
    Ok(if args.check && !report.ok { ExitStatus::Blocked } else { ExitStatus::Success })
}

/// Every active target for `--max-lag`: the primary (if the mode delivers) and the enabled
/// named targets with their type filters.
fn lag_targets(primary: Option<&dyn Receiver>, ctx: &Context) -> Vec<LagTarget> {
    let primary =
        primary.map(|r| LagTarget { identity: r.identity().clone(), team: r.team().map(str::to_string), types: None });
    let named = ctx.config.named_targets.enabled().unwrap_or_default().into_iter().map(|t| LagTarget {
        identity: kitty_sync::target_report::named_identity(t),
        team: None,
        types: t.types.clone(),
    });
    primary.into_iter().chain(named).collect()
}

/// `delivery_targets.active`: what `target list` says of the active targets. A broken
/// `[[event_sync.targets]]` entry or an unreadable store is a problem of the report, not an
/// error of the command (status is read-only and always answers).
fn active_targets(report: &mut StatusReport, ctx: &Context) {
    // Quiet: the warnings the listing would repeat (authority, token variables) were given above.
    match super::targets::list(ctx, &Printer::new(true, true, 0)) {
        Ok(entries) => {
            report.delivery_targets.active = entries.into_iter().filter(|e| e.active).collect();
            blocked_named_targets(report, ctx);
        }
        Err(e) => {
            report.problems.push(kitty_sync::status::Problem {
                message: format!("the delivery targets cannot be listed: {e}"),
                hint: e.hint().to_string(),
            });
            report.ok = false;
            report.exit_code = 3;
        }
    }
}

/// An active named target whose receiver refuses our credentials makes `ok` false (a reset
/// one already does, for every known target).
fn blocked_named_targets(report: &mut StatusReport, ctx: &Context) {
    let Ok(named) = ctx.config.named_targets.enabled() else { return };
    for target in named {
        let identity = kitty_sync::target_report::named_identity(target);
        if let Ok(true) = kitty_sync::delivery::fanout::refuses_credentials(&ctx.home, &identity) {
            report.problems.push(kitty_sync::status::Problem {
                message: format!("target {} refuses our credentials (HTTP 401/403)", target.name),
                hint: format!(
                    "set the token in the variable named by target {}'s token_env in config.toml, then run `kitty-sync now`",
                    target.name
                ),
            });
            report.ok = false;
            report.exit_code = 3;
        }
    }
}

struct Style {
    color: bool,
}

impl Style {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.color { format!("\x1b[{code}m{text}\x1b[0m") } else { text.to_string() }
    }
}

fn bytes(n: i64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

pub fn render(r: &StatusReport, ctx: &Context, printer: &Printer) {
    let style = Style { color: printer.color };
    let row = |label: &str, value: String| printer.line(format!("{label:<16}{value}"));
    row("home", ctx.home.root().display().to_string());
    row("mode", r.mode.clone());
    let j = &r.event_journal;
    if r.store_readable {
        render_journal(j, &row);
    } else {
        // Zeros would read as "empty": the counts of a store that cannot be read are unknown.
        row("journal", style.paint("31", "unreadable (see below); nothing was changed"));
        row("", format!("store file {}", bytes(j.store_file_bytes as i64)));
    }
    render_targets(r, printer, &row);
    let l = &r.delivery_ledger;
    row(
        "delivered",
        format!(
            "{} to current target · {} to previous targets",
            l.delivered_current_target, l.delivered_previous_target
        ),
    );
    row("undelivered", format!("{} for the current target", l.undelivered_current_target));
    row(
        "ledger",
        format!(
            "{} pending · {} rejected · {} transient · {} parked",
            l.pending, l.rejected, l.transient, l.terminal_failed
        ),
    );
    if !j.drain_blocked.is_empty() {
        let parts: Vec<String> = j.drain_blocked.iter().map(|(k, v)| format!("{k} {v}")).collect();
        row("blocked", parts.join(" · "));
    }
    if !j.dropped_by_type.is_empty() {
        let parts: Vec<String> = j.dropped_by_type.iter().map(|(k, v)| format!("{k} {v}")).collect();
        row("dropped", parts.join(" · "));
    }
    render_legacy(r, &row);
    render_daemon(r.daemon.as_ref(), &row);
    match &j.gc_suggestion {
        Some(s) => row("gc", style.paint("33", &format!("suggested: {}", s.reason))),
        None => row("gc", "not needed".into()),
    }
    for warning in &r.target_authority.warnings {
        row("warning", style.paint("33", warning));
    }
    if r.ok {
        row("status", style.paint("32", "OK"));
    } else {
        row("status", style.paint("31", "ATTENTION"));
        for p in &r.problems {
            row("", format!("{} (hint: {})", p.message, p.hint));
        }
    }
}

fn render_journal(j: &JournalSection, row: &dyn Fn(&str, String)) {
    row(
        "journal",
        format!(
            "{} retained · {} archived · {} purged · {} coalesced · {} dropped",
            j.retained_event_count,
            j.archived_event_count,
            j.purged_event_count,
            j.coalesced_event_count,
            j.dropped_event_count
        ),
    );
    row(
        "",
        format!(
            "oldest retained {} · payloads {} · store file {}",
            j.oldest_retained_event_at.as_deref().unwrap_or("—"),
            bytes(j.journal_size_bytes),
            bytes(j.store_file_bytes as i64)
        ),
    );
}

fn render_targets(r: &StatusReport, printer: &Printer, row: &dyn Fn(&str, String)) {
    match &r.delivery_targets.current {
        Some(t) => {
            let seen = t
                .first_seen_at
                .as_deref()
                .map(|s| format!(", first seen {s}"))
                .unwrap_or_else(|| ", never drained".into());
            row("target", format!("{} ({}){seen}", t.canonical_url, t.kind.as_str_for_humans()));
        }
        None => row("target", "none (this mode delivers nowhere)".into()),
    }
    for t in &r.delivery_targets.previous {
        row(
            "previous",
            format!("{} ({}): {} delivered", t.canonical_url, t.kind.as_str_for_humans(), t.delivered_count),
        );
    }
    for t in r.delivery_targets.active.iter().filter(|t| t.name.as_deref() != Some(kitty_sync::targets_config::PRIMARY))
    {
        row(
            "named target",
            format!(
                "{} → {}: {} delivered, {} undelivered",
                t.name.as_deref().unwrap_or("?"),
                t.canonical_url,
                t.delivered_count,
                t.undelivered_count
            ),
        );
    }
    let _ = printer;
}

fn render_daemon(daemon: Option<&DaemonStatus>, row: &dyn Fn(&str, String)) {
    let Some(d) = daemon else {
        row("daemon", "never ran in this home (`kitty-sync daemon`)".into());
        return;
    };
    let s = &d.state;
    let line = match (&s.stopped_at, d.running) {
        (_, true) => format!("running (pid {}), heartbeat {}", s.pid, s.heartbeat_at),
        (Some(at), false) => format!("stopped at {at} (pid {})", s.pid),
        (None, false) => format!("NOT RUNNING (pid {}), last heartbeat {}", s.pid, s.heartbeat_at),
    };
    row("daemon", line);
    for t in &s.targets {
        let oldest = t.oldest_undelivered_at.as_deref().map(|at| format!(", oldest {at}")).unwrap_or_default();
        let error = t.last_error.as_deref().map(|e| format!(", last error: {e}")).unwrap_or_default();
        let state = t.state.as_str();
        row("", format!("{} {}: {state}, {} undelivered{oldest}{error}", t.name, t.canonical_url, t.undelivered_count));
    }
}

fn render_legacy(r: &StatusReport, row: &dyn Fn(&str, String)) {
    let m = &r.migration_conflicts;
    if m.count > 0 {
        row("migration", format!("{} unresolved conflict(s): `kitty-sync migrate conflicts`", m.count));
    }
    let q = &r.legacy_queues;
    let (queues, python): (Vec<_>, Vec<_>) = q.files.iter().partition(|f| !f.kind.is_python());
    if !queues.is_empty() {
        let migrated = queues.iter().filter(|f| f.migrated).count();
        let events: u64 = queues.iter().map(|f| f.event_count).sum();
        row("legacy queues", format!("{} file(s), {events} queued event(s), {migrated} migrated", queues.len()));
    }
    if !python.is_empty() {
        let imported = python.iter().filter(|f| f.migrated).count();
        let events: u64 = python.iter().map(|f| f.event_count).sum();
        row(
            "python stores",
            format!(
                "{} spec-kitty 3.2.4+ file(s), {events} event(s), {imported} imported and unchanged since",
                python.len()
            ),
        );
    }
    if !q.files.is_empty() {
        if q.files.iter().any(|f| !f.migrated) {
            row("", "run `kitty-sync migrate` to bring them into the journal".into());
        }
        for f in q.files.iter().filter(|f| f.error.is_some()) {
            row("", format!("cannot read {}: {}", f.path, f.error.as_deref().unwrap_or_default()));
        }
    }
}

trait KindText {
    fn as_str_for_humans(&self) -> &'static str;
}

impl KindText for kitty_sync::delivery::target::TargetKind {
    fn as_str_for_humans(&self) -> &'static str {
        self.as_str()
    }
}
