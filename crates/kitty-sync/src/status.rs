//! The status report (contract §7 `status`): a plain struct that serialises to the JSON
//! contract. Read-only; every number comes from a counter, an index seek or a range above a
//! target's settled high-water mark, never from reading payloads.

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use crate::authority::TargetAuthority;
use crate::clock::rfc3339_ms;
use crate::delivery::receiver::Receiver;
use crate::delivery::reset::{self, REDRAIN_HINT, ResetDetected};
use crate::delivery::target::{self, DeploymentMetadata, TargetIdentity, TargetKind, TargetRecord};
use crate::error::{Error, Result, StoreContext};
use crate::home::Home;
use crate::legacy::{self, BodyUploadCompatibility, ConflictSummary, LegacyQueuesReport};
use crate::mode::EventSyncMode;
use crate::store::Store;
use crate::store::selection::{DueQuery, count_due};
use crate::store::stats::{self, JournalCounters};

/// A GC suggestion needs at least this many retained payload bytes.
pub const GC_SUGGESTION_BYTES: i64 = 50 * 1024 * 1024;
const MAX_TERMINAL_FAILURES_LISTED: usize = 100;

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub ok: bool,
    pub exit_code: u8,
    pub mode: String,
    pub target_authority: TargetAuthority,
    pub event_journal: JournalSection,
    pub delivery_targets: TargetsSection,
    pub delivery_ledger: LedgerSection,
    pub migration_conflicts: ConflictSummary,
    pub terminal_failures: TerminalFailures,
    pub body_upload_compatibility: BodyUploadCompatibility,
    pub legacy_queues: LegacyQueuesReport,
    /// The daemon's last state (contract §10); `None` when no daemon ever ran here.
    pub daemon: Option<crate::daemon::report::DaemonStatus>,
    /// Why `ok` is false, for the human report.
    #[serde(skip)]
    pub problems: Vec<Problem>,
    /// False when a store exists but could not be read (the counts are then unknown, not 0).
    #[serde(skip)]
    pub store_readable: bool,
}

#[derive(Debug, Clone)]
pub struct Problem {
    pub message: String,
    pub hint: String,
}

#[derive(Debug, Default, Serialize)]
pub struct JournalSection {
    pub retained_event_count: i64,
    pub archived_event_count: i64,
    pub purged_event_count: i64,
    pub coalesced_event_count: i64,
    pub dropped_event_count: i64,
    pub oldest_retained_event_at: Option<String>,
    pub journal_size_bytes: i64,
    pub store_file_bytes: u64,
    pub drain_blocked: BTreeMap<String, i64>,
    /// Dropped counts per event type (opt-out rule).
    #[serde(skip)]
    pub dropped_by_type: BTreeMap<String, i64>,
    pub gc_suggested: bool,
    pub gc_suggestion: Option<GcSuggestion>,
}

#[derive(Debug, Serialize)]
pub struct GcSuggestion {
    pub reason: String,
    pub retained_event_count: i64,
    pub journal_size_bytes: i64,
}

#[derive(Debug, Default, Serialize)]
pub struct TargetsSection {
    pub current: Option<TargetEntry>,
    pub previous: Vec<TargetEntry>,
    /// The `target list` entries of the active targets (contract §9), filled by the caller
    /// that knows the configured named targets.
    pub active: Vec<crate::target_report::TargetListEntry>,
}

#[derive(Debug, Serialize)]
pub struct TargetEntry {
    pub target_id: String,
    pub kind: TargetKind,
    pub canonical_url: String,
    pub team_slug: String,
    pub user_email: String,
    pub delivered_count: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undelivered_count: Option<i64>,
    pub first_seen_at: Option<String>,
    pub last_seen_at: Option<String>,
    pub deployment: DeploymentMetadata,
    /// Set when `now` found the server behind this URL replaced (stable identity changed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset_detected: Option<ResetDetected>,
}

#[derive(Debug, Default, Serialize)]
pub struct LedgerSection {
    pub delivered_current_target: i64,
    pub delivered_previous_target: i64,
    pub undelivered_current_target: i64,
    pub pending: i64,
    pub rejected: i64,
    pub transient: i64,
    pub terminal_failed: i64,
}

#[derive(Debug, Default, Serialize)]
pub struct TerminalFailures {
    pub count: i64,
    pub events: Vec<TerminalFailure>,
}

#[derive(Debug, Serialize)]
pub struct TerminalFailure {
    pub event_id: String,
    pub target_id: String,
    pub last_error: Option<String>,
    pub last_http_status: Option<i64>,
}

/// What status needs to know about the configured delivery.
pub struct CurrentDelivery<'a> {
    pub mode: EventSyncMode,
    /// `None` for modes that deliver nowhere.
    pub receiver: Option<&'a dyn Receiver>,
}

/// Builds the report. Never writes; a store that cannot be read makes `ok` false.
pub fn build(home: &Home, authority: &TargetAuthority, current: &CurrentDelivery<'_>) -> StatusReport {
    let mut problems = Vec::new();
    let store = match Store::open_read_only(home) {
        Ok(store) => store,
        Err(e) => {
            problems.push(Problem { message: format!("the store cannot be read: {e}"), hint: e.hint().to_string() });
            None
        }
    };
    let mut report = StatusReport {
        ok: true,
        exit_code: 0,
        mode: current.mode.display_name().to_string(),
        target_authority: authority.clone(),
        event_journal: JournalSection::default(),
        delivery_targets: TargetsSection::default(),
        delivery_ledger: LedgerSection::default(),
        migration_conflicts: ConflictSummary::default(),
        terminal_failures: TerminalFailures::default(),
        body_upload_compatibility: BodyUploadCompatibility::default(),
        legacy_queues: legacy::legacy_queues_report(home, authority, store.as_ref()),
        daemon: None,
        problems: Vec::new(),
        store_readable: true,
    };
    report.body_upload_compatibility = report.legacy_queues.body_upload;
    let filled = match &store {
        Some(store) => fill_from_store(&mut report, store, current).map_err(|e| {
            problems.push(Problem { message: format!("the store cannot be read: {e}"), hint: e.hint().to_string() })
        }),
        None => Err(()),
    };
    if filled.is_err() {
        fill_current_without_store(&mut report, current);
        // A damaged or newer store still has a size; its counts are unknown.
        report.store_readable = problems.is_empty();
        report.event_journal.store_file_bytes = std::fs::metadata(home.store_path()).map(|m| m.len()).unwrap_or(0);
    }
    check_gates(current, &mut problems);
    let targets = report.delivery_targets.current.iter().chain(&report.delivery_targets.previous);
    for entry in targets {
        if let Some(reset) = &entry.reset_detected {
            problems.push(Problem {
                message: format!(
                    "{} was reset behind its URL ({})",
                    entry.canonical_url,
                    reset.changed_fields.join(", ")
                ),
                hint: format!("run `{REDRAIN_HINT}` with that target active to deliver every retained event again"),
            });
        }
    }
    if report.migration_conflicts.count > 0 {
        problems.push(Problem {
            message: format!("{} unresolved migration conflict(s)", report.migration_conflicts.count),
            hint: "review them with `kitty-sync migrate conflicts`, then `kitty-sync migrate resolve ID --keep journal|incoming`".into(),
        });
    }
    report.ok = problems.is_empty();
    report.exit_code = if report.ok { 0 } else { 3 };
    report.problems = problems;
    report
}

fn check_gates(current: &CurrentDelivery<'_>, problems: &mut Vec<Problem>) {
    let Some(receiver) = current.receiver else { return };
    for gate in receiver.gates().into_iter().filter(|g| !g.satisfied) {
        problems.push(Problem {
            message: format!("delivery blocked ({}): {}", gate.reason, gate.message),
            hint: gate.hint,
        });
    }
}

fn fill_from_store(report: &mut StatusReport, store: &Store, current: &CurrentDelivery<'_>) -> Result<()> {
    check_pages(store)?;
    let counters = stats::journal_counters(store.conn())?;
    report.event_journal = journal_section(store, &counters)?;
    report.migration_conflicts = legacy::conflict_summary(store)?;
    let targets = target::list(store.conn())?;
    let current_identity = current.receiver.map(|r| r.identity().clone());
    let current_record = match &current_identity {
        Some(id) => target::find(store.conn(), id)?,
        None => None,
    };
    let team = current.receiver.and_then(|r| r.team());
    let mut previous = Vec::new();
    let mut current_undelivered = None;
    for record in &targets {
        if Some(record) == current_record.as_ref() {
            continue;
        }
        previous.push(entry_for(store, record, None)?);
    }
    report.delivery_targets.previous = previous;
    if let Some(identity) = &current_identity {
        let undelivered = undelivered(store, current_record.as_ref(), team, &counters)?;
        current_undelivered = Some(undelivered);
        report.delivery_targets.current = Some(match &current_record {
            Some(record) => entry_for(store, record, Some(undelivered))?,
            None => unregistered_entry(identity, undelivered),
        });
        report.delivery_ledger = ledger_section(store, current_record.as_ref(), &counters, undelivered)?;
    } else {
        report.delivery_ledger.delivered_previous_target = counters.delivered_any;
    }
    report.terminal_failures = terminal_failures(store, &targets)?;
    report.event_journal.gc_suggestion = gc_suggestion(store, &targets, current_undelivered, &counters)?;
    report.event_journal.gc_suggested = report.event_journal.gc_suggestion.is_some();
    Ok(())
}

/// Stores up to this size get their pages checked by `status` (about 0.1 s per 70 MB); larger
/// ones are left to `kitty-sync doctor`, so status stays quick on any store.
const PAGE_CHECK_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// SQLite's structural check of every page: the counts below come from summary rows, which
/// would stay plausible over a damaged page; a damaged store is reported instead.
fn check_pages(store: &Store) -> Result<()> {
    if store.file_bytes() > PAGE_CHECK_MAX_BYTES {
        return Ok(());
    }
    let first: String =
        store.conn().query_row("PRAGMA quick_check(1)", [], |r| r.get(0)).ctx("cannot check the store")?;
    if first == "ok" {
        return Ok(());
    }
    let finding = first.replace("*** in database main ***", "").split_whitespace().collect::<Vec<_>>().join(" ");
    Err(Error::StoreUnusable {
        message: format!("{} is damaged: {finding}", store.path().display()),
        hint: crate::error::disk::CORRUPT_HINT.to_string(),
    })
}

fn fill_current_without_store(report: &mut StatusReport, current: &CurrentDelivery<'_>) {
    if let Some(receiver) = current.receiver {
        report.delivery_targets.current = Some(unregistered_entry(receiver.identity(), 0));
    }
}

fn journal_section(store: &Store, counters: &JournalCounters) -> Result<JournalSection> {
    let conn = store.conn();
    let oldest: Option<i64> = conn
        .query_row("SELECT captured_at FROM events WHERE state = 0 ORDER BY captured_at LIMIT 1", [], |r| r.get(0))
        .optional()
        .ctx("cannot read the journal")?;
    let dropped_by_type = pairs(store, "SELECT event_type, count FROM dropped_events")?;
    // INDEXED BY: without statistics the planner prefers `events_by_state (state=?)` and walks
    // every retained event (~0.2 s at a million); the partial index holds only blocked ones.
    let drain_blocked = pairs(
        store,
        "SELECT drain_blocked_reason, count(*) FROM events INDEXED BY events_by_blocked_reason
         WHERE drain_blocked_reason IS NOT NULL AND state = 0 AND delivered_targets = 0 AND coalesced_into IS NULL
         GROUP BY drain_blocked_reason",
    )?;
    Ok(JournalSection {
        retained_event_count: counters.retained,
        archived_event_count: counters.archived,
        purged_event_count: counters.purged,
        coalesced_event_count: counters.coalesced,
        dropped_event_count: dropped_by_type.values().sum(),
        oldest_retained_event_at: oldest.map(rfc3339_ms),
        journal_size_bytes: counters.retained_bytes,
        store_file_bytes: store.file_bytes(),
        drain_blocked,
        dropped_by_type,
        gc_suggested: false,
        gc_suggestion: None,
    })
}

fn pairs(store: &Store, sql: &str) -> Result<BTreeMap<String, i64>> {
    let mut stmt = store.conn().prepare(sql).ctx("cannot read the journal")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).ctx("cannot read the journal")?;
    rows.collect::<std::result::Result<_, _>>().ctx("cannot read the journal")
}

fn entry_for(store: &Store, record: &TargetRecord, undelivered: Option<i64>) -> Result<TargetEntry> {
    let counts = stats::target_counters(store.conn(), record.id, record.epoch)?;
    Ok(TargetEntry {
        target_id: record.target_id.clone(),
        kind: record.identity.kind,
        canonical_url: record.identity.canonical_url.clone(),
        team_slug: record.identity.team_slug.clone(),
        user_email: record.identity.user_email.clone(),
        delivered_count: counts.delivered(),
        undelivered_count: undelivered,
        first_seen_at: Some(rfc3339_ms(record.first_seen_at)),
        last_seen_at: Some(rfc3339_ms(record.last_seen_at)),
        deployment: record.deployment.clone(),
        reset_detected: reset::load(store.conn(), record.id)?,
    })
}

fn unregistered_entry(identity: &TargetIdentity, undelivered: i64) -> TargetEntry {
    TargetEntry {
        target_id: identity.target_id(),
        kind: identity.kind,
        canonical_url: identity.canonical_url.clone(),
        team_slug: identity.team_slug.clone(),
        user_email: identity.user_email.clone(),
        delivered_count: 0,
        undelivered_count: Some(undelivered),
        first_seen_at: None,
        last_seen_at: None,
        deployment: DeploymentMetadata::default(),
        reset_detected: None,
    }
}

fn ledger_section(
    store: &Store,
    record: Option<&TargetRecord>,
    counters: &JournalCounters,
    undelivered: i64,
) -> Result<LedgerSection> {
    let Some(record) = record else {
        return Ok(LedgerSection {
            delivered_previous_target: counters.delivered_any,
            undelivered_current_target: undelivered,
            ..Default::default()
        });
    };
    let c = stats::target_counters(store.conn(), record.id, record.epoch)?;
    Ok(LedgerSection {
        delivered_current_target: c.delivered(),
        delivered_previous_target: counters.delivered_any - c.exclusive,
        undelivered_current_target: undelivered,
        pending: c.pending,
        rejected: c.rejected,
        transient: c.failed_transient,
        terminal_failed: c.terminal_failed,
    })
}

/// Retained events (not coalesced away, of the target's team) that the target has not
/// received: those due above its high-water mark plus those parked or held below it.
pub fn undelivered(
    store: &Store,
    record: Option<&TargetRecord>,
    team: Option<&str>,
    counters: &JournalCounters,
) -> Result<i64> {
    let Some(record) = record else {
        return Ok(counters.retained - counters.coalesced - other_team_retained(store, team)?);
    };
    let due = count_due(
        store.conn(),
        DueQuery { target: record.id, epoch: record.epoch, team, types: None, from_seq: record.due_from_seq, limit: 0 },
    )?;
    let (held, _) = crate::store::selection::held(store.conn(), record.id, record.epoch)?;
    Ok(due as i64 + held)
}

fn other_team_retained(store: &Store, team: Option<&str>) -> Result<i64> {
    let Some(team) = team else { return Ok(0) };
    store
        .conn()
        .query_row(
            "SELECT count(*) FROM events WHERE capture_team IS NOT NULL AND capture_team <> ?1 AND state = 0
               AND coalesced_into IS NULL",
            [team],
            |r| r.get(0),
        )
        .ctx("cannot read the journal")
}

fn terminal_failures(store: &Store, targets: &[TargetRecord]) -> Result<TerminalFailures> {
    let mut out = TerminalFailures::default();
    let mut stmt = store
        .conn()
        .prepare_cached(
            // (target, epoch, status) yields the parked rows already in seq order.
            "SELECT e.event_id, l.last_error, l.last_http_status
             FROM ledger l INDEXED BY ledger_by_status JOIN events e ON e.seq = l.seq
             WHERE l.target = ?1 AND l.epoch = ?2 AND l.status = 'terminal_failed' ORDER BY l.seq LIMIT ?3",
        )
        .ctx("cannot read the ledger")?;
    for record in targets {
        out.count += stats::target_counters(store.conn(), record.id, record.epoch)?.terminal_failed;
        let room = MAX_TERMINAL_FAILURES_LISTED.saturating_sub(out.events.len());
        if room == 0 {
            continue;
        }
        let rows = stmt
            .query_map(params![record.id, record.epoch, room as i64], |r| {
                Ok(TerminalFailure {
                    event_id: r.get(0)?,
                    target_id: record.target_id.clone(),
                    last_error: r.get(1)?,
                    last_http_status: r.get(2)?,
                })
            })
            .ctx("cannot read the ledger")?;
        for row in rows {
            out.events.push(row.ctx("cannot read the ledger")?);
        }
    }
    Ok(out)
}

/// Suggested when the retained payloads are large and every known target has them all. The
/// current target counts as known even before its first drain registers it (`current_undelivered`
/// is its undelivered count): suggesting gc while it has not received the events would be wrong.
fn gc_suggestion(
    store: &Store,
    targets: &[TargetRecord],
    current_undelivered: Option<i64>,
    counters: &JournalCounters,
) -> Result<Option<GcSuggestion>> {
    if counters.retained_bytes < GC_SUGGESTION_BYTES || targets.is_empty() || current_undelivered.is_some_and(|n| n > 0)
    {
        return Ok(None);
    }
    for record in targets {
        let team = (record.identity.kind == TargetKind::Teamspace).then_some(record.identity.team_slug.as_str());
        if undelivered(store, Some(record), team, counters)? > 0 {
            return Ok(None);
        }
    }
    Ok(Some(GcSuggestion {
        reason: format!(
            "{} retained events ({} MiB of payloads) are delivered to every known target; `kitty-sync archive` then `kitty-sync gc` reclaims the space",
            counters.retained,
            counters.retained_bytes / (1024 * 1024)
        ),
        retained_event_count: counters.retained,
        journal_size_bytes: counters.retained_bytes,
    }))
}
