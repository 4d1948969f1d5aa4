//! The migration itself: every legacy row becomes a journal event with its `data` bytes stored
//! verbatim, or is recorded as a duplicate, a conflict or an invalid row. Never silently dropped.
//!
//! One code path serves the real run and `--dry-run`: the per-row decisions go through a
//! [`Sink`]. The real sink writes inside one transaction per source; the dry-run sink reads the
//! store read-only and remembers this run's would-be inserts in memory, so a dry run reports
//! exactly what a real run would do (cross-source duplicates included) and writes nothing.

use std::collections::{HashMap, HashSet};

use rusqlite::{OptionalExtension, Transaction, params};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::python::{self, LedgerRow, NOT_CONSENTED, PyRow, RawEvent};
use super::source::{self, Discovery, Opened, RawRow, ReadStop, ScopeStatus, SourceFile, SourceKind};
use crate::authority::TargetAuthority;
use crate::canonical_json::Json;
use crate::delivery::target::{self, TargetIdentity};
use crate::envelope::{canonical_bytes, is_valid_ulid};
use crate::error::{Error, Result, StoreContext};
use crate::event_journal::{Inserted, Row, begin, insert_row, tick_lamport};
use crate::home::Home;
use crate::store::Store;

/// Printed with every migration report (contract §7).
pub const NOTE: &str = "Only events still queued in the legacy files were migrated: events the old queue had already \
     delivered and deleted cannot be recovered. The legacy files were read only and left unchanged.";

/// How many invalid rows a source report lists (all are counted).
pub const MAX_LISTED_INVALID_ROWS: usize = 100;

const PROGRESS_EVERY: u64 = 1_000;

/// Page cache of the store connection during a migration, in SQLite's negative-KiB notation.
const MIGRATION_CACHE_KIB: i64 = -64 * 1024;

#[derive(Debug, Clone, Copy, Default)]
pub struct MigrateOptions {
    /// Report what a real run would do; write nothing (not even a new store).
    pub dry_run: bool,
    /// How long a real run waits for a running drain to finish (it takes the drain lock).
    pub lock_wait: std::time::Duration,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrateProgress {
    pub rows_done: u64,
    pub rows_total: u64,
}

/// The contract's `migrate --json` document.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    pub dry_run: bool,
    pub sources: Vec<SourceReport>,
    pub ignored_files: Vec<String>,
    pub totals: Totals,
    /// The legacy files must not be cleaned up yet: unresolved conflicts (this run or earlier),
    /// source errors or invalid rows.
    pub cleanup_blocked: bool,
    pub note: &'static str,
    /// Python journal rows whose key differs from their envelope's `event_id`: journaled under
    /// the envelope's id (contract §12).
    pub id_mismatches: Vec<IdMismatch>,
    /// kitty-sync targets this run created for Python targets (a dry run: would create).
    pub targets_created: Vec<CreatedTarget>,
    /// Unresolved conflicts in the journal after this run (earlier runs' included).
    #[serde(skip)]
    pub unresolved_conflicts: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IdMismatch {
    /// The Python row's key.
    pub row_id: String,
    /// The envelope's id, under which the event is journaled.
    pub event_id: String,
    /// Provenance name of the source (`journal:<file name>`, `project:<uuid>`).
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CreatedTarget {
    pub target_id: String,
    pub canonical_url: String,
    pub team_slug: String,
    pub user_email: String,
}

impl CreatedTarget {
    fn of(identity: &TargetIdentity) -> CreatedTarget {
        CreatedTarget {
            target_id: identity.target_id(),
            canonical_url: identity.canonical_url.clone(),
            team_slug: identity.team_slug.clone(),
            user_email: identity.user_email.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceReport {
    pub path: String,
    pub kind: SourceKind,
    /// Hex digest of a scoped queue; null for `queue.db` and the Python stores.
    pub digest: Option<String>,
    /// Null for the Python stores (they have no scope digest).
    pub scope_status: Option<ScopeStatus>,
    pub rows_read: u64,
    pub imported: u64,
    pub deduped: u64,
    /// Rows whose content differs from the journal's and whose conflict is unresolved.
    pub conflicts: u64,
    pub body_upload_rows: u64,
    pub error: Option<String>,
    /// Rows that differ from the journal but whose conflict an operator already resolved
    /// (`migrate resolve`); they no longer block. Extra key: without it the counts of a re-run
    /// after a resolution would not add up to `rows_read`.
    pub resolved_conflicts: u64,
    /// Rows that are not importable events (not a JSON object, bad event id, ...). Extra key:
    /// they are never dropped silently.
    pub invalid_rows: u64,
    /// The first [`MAX_LISTED_INVALID_ROWS`] invalid rows with their reason.
    pub invalid: Vec<InvalidRow>,
    /// Python delivery-state rows read (3.2.4 ledger rows, 3.2.7 delivery attempts).
    pub ledger_rows: u64,
    /// Ledger rows naming an event or target no readable source holds (not applied).
    pub ledger_unmatched: u64,
    /// Events read that Python held for lack of project consent (imported `not_consented`).
    pub not_consented: u64,
    /// Python targets this source names.
    pub targets: u64,
    /// A Python store unchanged since its last import: not read again; its counts are those
    /// of that import (everything in it is already journaled).
    pub unchanged: bool,
    /// The provenance name (`known:<digest>`, `unknown:<digest>`, `legacy:queue.db`).
    #[serde(skip)]
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvalidRow {
    /// The source row's `id` (rowid for the Python stores).
    pub row_id: i64,
    pub event_id: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub sources: u64,
    pub rows_read: u64,
    pub imported: u64,
    pub deduped: u64,
    pub conflicts: u64,
    pub source_errors: u64,
    pub body_upload_rows: u64,
    pub resolved_conflicts: u64,
    pub invalid_rows: u64,
    pub ledger_rows: u64,
    /// Distinct Python targets over all sources.
    pub targets: u64,
    pub not_consented: u64,
}

impl SourceReport {
    fn new(file: &SourceFile, authority: &TargetAuthority) -> SourceReport {
        SourceReport::blank(file, file.scope(authority), file.provenance(authority))
    }

    fn blank(file: &SourceFile, scope_status: Option<ScopeStatus>, source: String) -> SourceReport {
        SourceReport {
            path: file.display_path(),
            kind: file.kind,
            digest: if file.kind == SourceKind::ProjectStore { None } else { file.digest.clone() },
            scope_status,
            rows_read: 0,
            imported: 0,
            deduped: 0,
            conflicts: 0,
            body_upload_rows: 0,
            error: None,
            resolved_conflicts: 0,
            invalid_rows: 0,
            invalid: Vec::new(),
            ledger_rows: 0,
            ledger_unmatched: 0,
            not_consented: 0,
            targets: 0,
            unchanged: false,
            source,
        }
    }

    /// A source that failed part-way contributes nothing (its transaction was rolled back).
    fn failed(mut self, reason: String) -> SourceReport {
        self.rows_read = 0;
        self.imported = 0;
        self.deduped = 0;
        self.conflicts = 0;
        self.resolved_conflicts = 0;
        self.invalid_rows = 0;
        self.invalid.clear();
        self.ledger_rows = 0;
        self.ledger_unmatched = 0;
        self.not_consented = 0;
        self.error = Some(reason);
        self
    }

    /// Whether a later run may skip this source while its files stay unchanged: everything
    /// in it was applied (no conflict, invalid row or unmatched ledger row to look at again).
    fn clean(&self) -> bool {
        self.error.is_none() && self.conflicts == 0 && self.invalid_rows == 0 && self.ledger_unmatched == 0
    }

    fn summary(&self) -> Summary {
        Summary {
            rows_read: self.rows_read,
            ledger_rows: self.ledger_rows,
            not_consented: self.not_consented,
            targets: self.targets,
            resolved_conflicts: self.resolved_conflicts,
            clean: self.clean(),
            target_ids: Vec::new(),
        }
    }

    fn unchanged(mut self, summary: &Summary) -> SourceReport {
        self.rows_read = summary.rows_read;
        self.deduped = summary.rows_read.saturating_sub(summary.resolved_conflicts);
        self.resolved_conflicts = summary.resolved_conflicts;
        self.ledger_rows = summary.ledger_rows;
        self.not_consented = summary.not_consented;
        self.targets = summary.targets;
        self.unchanged = true;
        self
    }

    fn invalid_row(&mut self, row: InvalidRow) {
        self.invalid_rows += 1;
        if self.invalid.len() < MAX_LISTED_INVALID_ROWS {
            self.invalid.push(row);
        }
    }
}

impl MigrationReport {
    /// Whether the command should exit 3.
    pub fn blocked(&self) -> bool {
        self.cleanup_blocked
    }

    fn finish(dry_run: bool, sources: Vec<SourceReport>, discovery: &Discovery, python: PythonOutcome) -> Self {
        let PythonOutcome { unresolved_conflicts, id_mismatches, targets_created, distinct_targets } = python;
        let mut totals = Totals { sources: sources.len() as u64, ..Totals::default() };
        for s in &sources {
            totals.rows_read += s.rows_read;
            totals.imported += s.imported;
            totals.deduped += s.deduped;
            totals.conflicts += s.conflicts;
            totals.source_errors += u64::from(s.error.is_some());
            totals.body_upload_rows += s.body_upload_rows;
            totals.resolved_conflicts += s.resolved_conflicts;
            totals.invalid_rows += s.invalid_rows;
            totals.ledger_rows += s.ledger_rows;
            totals.not_consented += s.not_consented;
        }
        totals.targets = distinct_targets;
        let cleanup_blocked =
            unresolved_conflicts > 0 || totals.conflicts > 0 || totals.source_errors > 0 || totals.invalid_rows > 0;
        MigrationReport {
            dry_run,
            sources,
            ignored_files: discovery.ignored_files.iter().map(|p| p.display().to_string()).collect(),
            totals,
            cleanup_blocked,
            note: NOTE,
            id_mismatches,
            targets_created,
            unresolved_conflicts,
        }
    }
}

/// Migrates every legacy queue and Python store of `home` into its journal (or, with
/// `dry_run`, reports what that would do). Source problems are reported per source; only
/// store failures are errors.
pub fn migrate(
    home: &Home,
    authority: &TargetAuthority,
    options: &MigrateOptions,
    progress: &mut dyn FnMut(MigrateProgress),
) -> Result<MigrationReport> {
    let discovery = source::discover(home);
    let records = {
        let store = Store::open_read_only(home)?;
        store.as_ref().map(Records::load).transpose()?.unwrap_or_default()
    };
    let mut probes: Vec<Probe> = discovery.sources.iter().map(|file| Probe::of(file, authority, &records)).collect();
    if let Some((dir, reason)) = &discovery.dir_error {
        probes.push(Probe::unlistable(dir, reason));
    }
    let mut ticker = Ticker {
        progress,
        state: MigrateProgress {
            rows_done: 0,
            rows_total: probes
                .iter()
                .filter_map(|p| match &p.input {
                    Input::Open(o) => Some(o.rows()),
                    _ => None,
                })
                .sum(),
        },
    };
    let report = if options.dry_run {
        run_dry(home, probes, &discovery, &records, &mut ticker)?
    } else {
        run_real(home, probes, &discovery, &records, &mut ticker, options.lock_wait)?
    };
    (ticker.progress)(ticker.state);
    Ok(report)
}

/// What earlier runs recorded about the Python stores: fingerprint and counts per source,
/// and the id mismatches found in each.
#[derive(Default)]
struct Records {
    sources: HashMap<String, (Option<String>, Option<Summary>)>,
    aliases: HashMap<String, Vec<IdMismatch>>,
}

impl Records {
    fn load(store: &Store) -> Result<Records> {
        let conn = store.conn();
        let mut records = Records::default();
        let mut stmt = conn
            .prepare("SELECT path, fingerprint, summary FROM migrated_sources WHERE kind <> 'legacy_queue'")
            .ctx("cannot read the migrated sources")?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, Option<String>>(2)?))
            })
            .ctx("cannot read the migrated sources")?;
        for row in rows {
            let (path, fingerprint, summary) = row.ctx("cannot read the migrated sources")?;
            let summary = summary.and_then(|s| serde_json::from_str::<Summary>(&s).ok());
            records.sources.insert(path, (fingerprint, summary));
        }
        let mut stmt = conn
            .prepare(
                "SELECT a.alias, e.event_id, a.source FROM migration_aliases a JOIN events e ON e.seq = a.seq
                 ORDER BY a.source, e.seq",
            )
            .ctx("cannot read the id mismatches")?;
        let rows = stmt
            .query_map([], |r| Ok(IdMismatch { row_id: r.get(0)?, event_id: r.get(1)?, source: r.get(2)? }))
            .ctx("cannot read the id mismatches")?;
        for row in rows {
            let m = row.ctx("cannot read the id mismatches")?;
            records.aliases.entry(m.source.clone()).or_default().push(m);
        }
        Ok(records)
    }

    /// The recorded import of an unchanged, cleanly imported Python store.
    fn unchanged(&self, file: &SourceFile, fingerprint: &str) -> Option<&Summary> {
        match self.sources.get(&file.relative) {
            Some((Some(seen), Some(summary))) if seen == fingerprint && summary.clean => Some(summary),
            _ => None,
        }
    }
}

/// The counts of one Python store's import, kept in `migrated_sources.summary`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
struct Summary {
    rows_read: u64,
    ledger_rows: u64,
    not_consented: u64,
    targets: u64,
    resolved_conflicts: u64,
    clean: bool,
    #[serde(default)]
    target_ids: Vec<String>,
}

/// What a run found beyond the per-source counts.
#[derive(Default)]
struct PythonOutcome {
    unresolved_conflicts: u64,
    id_mismatches: Vec<IdMismatch>,
    targets_created: Vec<CreatedTarget>,
    distinct_targets: u64,
}

impl PythonOutcome {
    fn collect(reports: &[SourceReport], records: &Records, run: RunFindings, unresolved_conflicts: u64) -> Self {
        let mut id_mismatches = Vec::new();
        let mut target_ids: HashSet<String> = run.target_ids;
        for report in reports.iter().filter(|r| r.unchanged) {
            id_mismatches.extend(records.aliases.get(&report.source).cloned().unwrap_or_default());
        }
        for summary in run.unchanged_summaries {
            target_ids.extend(summary.target_ids);
        }
        id_mismatches.extend(run.id_mismatches);
        PythonOutcome {
            unresolved_conflicts,
            id_mismatches,
            targets_created: run.targets_created,
            distinct_targets: target_ids.len() as u64,
        }
    }
}

/// Python facts one run gathered while importing.
#[derive(Default)]
struct RunFindings {
    id_mismatches: Vec<IdMismatch>,
    targets_created: Vec<CreatedTarget>,
    target_ids: HashSet<String>,
    unchanged_summaries: Vec<Summary>,
}

enum Input {
    Open(Box<Opened>),
    /// A Python store unchanged since a clean import: nothing to read.
    Unchanged(Summary),
    Failed(String),
}

impl Input {
    /// The source to read; a failed or unchanged one is reported right away instead.
    fn into_opened(
        self,
        report: SourceReport,
        reports: &mut Vec<SourceReport>,
        findings: &mut RunFindings,
    ) -> Option<(Opened, SourceReport)> {
        match self {
            Input::Open(opened) => Some((*opened, report)),
            Input::Failed(reason) => {
                reports.push(report.failed(reason));
                None
            }
            Input::Unchanged(summary) => {
                reports.push(report.unchanged(&summary));
                findings.unchanged_summaries.push(summary);
                None
            }
        }
    }
}

struct Probe {
    file: SourceFile,
    input: Input,
    /// Python stores: the files' fingerprint now (recorded after the import).
    fingerprint: Option<String>,
    report: SourceReport,
}

impl Probe {
    fn of(file: &SourceFile, authority: &TargetAuthority, records: &Records) -> Probe {
        let report = SourceReport::new(file, authority);
        let fingerprint = file.kind.is_python().then(|| python::fingerprint(file));
        let input = match fingerprint.as_deref().and_then(|f| records.unchanged(file, f)) {
            Some(summary) => Input::Unchanged(summary.clone()),
            None => match source::open(file) {
                Ok(opened) => Input::Open(Box::new(opened)),
                Err(reason) => Input::Failed(reason),
            },
        };
        Probe { file: file.clone(), input, fingerprint, report }
    }

    /// `queues/` could not be listed: reported like a source that cannot be read.
    fn unlistable(dir: &std::path::Path, reason: &str) -> Probe {
        let file = SourceFile::legacy(dir.to_path_buf(), source::QUEUES_DIR.to_string(), None);
        let report = SourceReport::blank(&file, Some(ScopeStatus::Unknown), String::new());
        Probe { file, input: Input::Failed(reason.to_string()), fingerprint: None, report }
    }
}

struct Ticker<'p> {
    progress: &'p mut dyn FnMut(MigrateProgress),
    state: MigrateProgress,
}

impl Ticker<'_> {
    fn row(&mut self) {
        self.state.rows_done += 1;
        if self.state.rows_done.is_multiple_of(PROGRESS_EVERY) {
            (self.progress)(self.state);
        }
    }
}

fn run_real(
    home: &Home,
    probes: Vec<Probe>,
    discovery: &Discovery,
    records: &Records,
    ticker: &mut Ticker<'_>,
    lock_wait: std::time::Duration,
) -> Result<MigrationReport> {
    let readable = probes.iter().any(|p| matches!(p.input, Input::Open(_)));
    // Imported events become due for delivery: never beside a running drain.
    let _lock =
        if readable { Some(crate::delivery::lock::acquire(home, lock_wait, "`kitty-sync migrate`")?) } else { None };
    // Nothing to import: do not create a store just to say so.
    let mut store = if readable { Some(Store::open(home)?) } else { Store::open_read_only(home)? };
    if let Some(store) = &store {
        // One transaction per source touches many pages; with SQLite's default 2 MiB cache
        // they would spill to the WAL mid-source and be written twice. A fixed cap, so memory
        // stays bounded; this connection is ours and closes with the migration.
        store.conn().pragma_update(None, "cache_size", MIGRATION_CACHE_KIB).ctx("cannot size the page cache")?;
    }
    let now = crate::clock::now_ms();
    let mut findings = RunFindings::default();
    let mut reports = Vec::with_capacity(probes.len());
    for probe in probes {
        let Probe { file, input, fingerprint, report } = probe;
        let Some((opened, mut report)) = input.into_opened(report, &mut reports, &mut findings) else { continue };
        report.body_upload_rows = opened.body_upload_rows();
        let Some(store) = store.as_mut() else {
            return Err(Error::internal("the store was not opened", "run the command again"));
        };
        let tx = begin(store)?;
        let mut sink = TxSink::new(&tx, now);
        let mut found = SourceFindings::default();
        sink.begin_targets(python_targets(&opened), &mut found)?;
        match import_source(&mut sink, opened, &mut report, &mut found, ticker) {
            Ok(()) => {
                sink.finish()?;
                let imported_lamport = sink.imported_lamport;
                report.targets = found.target_ids.len() as u64;
                finish_source(&tx, &file, &report, now, imported_lamport, fingerprint.as_deref(), &found)?;
                tx.commit().ctx("cannot commit the migrated source")?;
                found.merge_into(&mut findings);
            }
            // The transaction rolls back on drop: nothing from a failed source is kept.
            Err(ReadStop::Source(reason)) => report = report.failed(reason),
            Err(ReadStop::Consumer(e)) => return Err(e),
        }
        reports.push(report);
    }
    let unresolved = match &store {
        Some(store) => unresolved_conflicts(store)?,
        None => 0,
    };
    let outcome = PythonOutcome::collect(&reports, records, findings, unresolved);
    Ok(MigrationReport::finish(false, reports, discovery, outcome))
}

fn python_targets(opened: &Opened) -> &[TargetIdentity] {
    match opened {
        Opened::Python(p) => &p.targets,
        Opened::Queue(_) => &[],
    }
}

/// What one source contributed beyond its counts; kept only if the source commits.
#[derive(Default)]
pub(crate) struct SourceFindings {
    id_mismatches: Vec<IdMismatch>,
    targets_created: Vec<CreatedTarget>,
    target_ids: HashSet<String>,
}

impl SourceFindings {
    fn merge_into(self, run: &mut RunFindings) {
        run.id_mismatches.extend(self.id_mismatches);
        run.targets_created.extend(self.targets_created);
        run.target_ids.extend(self.target_ids);
    }
}

fn run_dry(
    home: &Home,
    probes: Vec<Probe>,
    discovery: &Discovery,
    records: &Records,
    ticker: &mut Ticker<'_>,
) -> Result<MigrationReport> {
    let store = Store::open_read_only(home)?;
    let unresolved = match &store {
        Some(store) => unresolved_conflicts(store)?,
        None => 0,
    };
    let mut sink = DrySink { store: store.as_ref(), ..DrySink::default() };
    let mut findings = RunFindings::default();
    let mut reports = Vec::with_capacity(probes.len());
    for probe in probes {
        let Probe { input, report, .. } = probe;
        let Some((opened, mut report)) = input.into_opened(report, &mut reports, &mut findings) else { continue };
        report.body_upload_rows = opened.body_upload_rows();
        sink.begin_source();
        let mut found = SourceFindings::default();
        sink.begin_targets(python_targets(&opened), &mut found)?;
        match import_source(&mut sink, opened, &mut report, &mut found, ticker) {
            Ok(()) => {
                report.targets = found.target_ids.len() as u64;
                found.merge_into(&mut findings);
            }
            Err(ReadStop::Source(reason)) => {
                // A real run would roll this source back: forget what it would have added.
                sink.rollback_source();
                report = report.failed(reason);
            }
            Err(ReadStop::Consumer(e)) => return Err(e),
        }
        reports.push(report);
    }
    let unresolved = unresolved + sink.conflicts.len() as u64 - sink.known_unresolved;
    let outcome = PythonOutcome::collect(&reports, records, findings, unresolved);
    Ok(MigrationReport::finish(true, reports, discovery, outcome))
}

/// Unresolved conflicts in the store (from this run or earlier).
pub(crate) fn unresolved_conflicts(store: &Store) -> Result<u64> {
    store
        .conn()
        .query_row("SELECT count(*) FROM migration_conflicts WHERE resolved_at IS NULL", [], |r| r.get::<_, i64>(0))
        .map(|n| n.max(0) as u64)
        .ctx("cannot count migration conflicts")
}

fn finish_source(
    tx: &Transaction<'_>,
    file: &SourceFile,
    report: &SourceReport,
    now: i64,
    imported_lamport: Option<ImportedLamport>,
    fingerprint: Option<&str>,
    found: &SourceFindings,
) -> Result<()> {
    // Like a JSON Lines import: the home's Lamport clock moves past every imported event's.
    if let Some(ImportedLamport(seen)) = imported_lamport {
        tick_lamport(tx, seen)?;
    }
    let summary = file.kind.is_python().then(|| {
        let mut summary = report.summary();
        summary.target_ids = found.target_ids.iter().cloned().collect();
        serde_json::to_string(&summary).unwrap_or_default()
    });
    tx.prepare_cached(
        "INSERT INTO migrated_sources (path, digest, migrated_at, rows_read, kind, fingerprint, summary)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT(path) DO UPDATE SET digest = excluded.digest, migrated_at = excluded.migrated_at,
                                         rows_read = excluded.rows_read, kind = excluded.kind,
                                         fingerprint = excluded.fingerprint, summary = excluded.summary",
    )
    .and_then(|mut s| {
        s.execute(params![
            file.relative,
            file.digest_key(),
            now,
            report.rows_read as i64,
            file.kind.as_str(),
            fingerprint,
            summary
        ])
    })
    .map(|_| ())
    .ctx("cannot record the migrated source")
}

/// A validated legacy row, ready for the journal.
pub(crate) struct Incoming<'a> {
    pub event_id: &'a str,
    pub event_type: &'a str,
    /// The source row's `data`, stored verbatim.
    pub bytes: &'a [u8],
    pub canonical_sha256: [u8; 32],
    pub coalesce_key: Option<&'a str>,
    pub captured_at: i64,
    pub capture_team: Option<&'a str>,
    pub lamport: Option<i64>,
    /// `not_consented` for events Python held for lack of project consent.
    pub blocked_reason: Option<&'static str>,
    pub source: &'a str,
    pub source_path: &'a str,
}

/// What the journal holds under an event id.
pub(crate) enum Existing {
    /// The stored envelope bytes.
    Bytes(Vec<u8>),
    /// Purged by gc: only the SHA-256 of the stored bytes is left.
    Purged(Vec<u8>),
    /// Added earlier in this dry run: its canonical SHA-256.
    Canonical([u8; 32]),
}

pub(crate) enum Found {
    /// Inserted (the dry run has no sequence number to give).
    New(Option<i64>),
    Existing(Existing),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConflictState {
    Unresolved,
    Resolved,
}

/// Where the per-row decisions land: the store (real run) or nowhere (dry run).
pub(crate) trait Sink {
    /// Inserts the event unless its id is already journaled; then returns what is stored.
    fn insert(&mut self, row: &Incoming<'_>) -> Result<Found>;
    /// Records that `row`'s source holds the journaled event (`seq` when already known).
    fn provenance(&mut self, row: &Incoming<'_>, seq: Option<i64>) -> Result<()>;
    fn conflict(&mut self, row: &Incoming<'_>, existing_sha256: &str) -> Result<ConflictState>;
    /// Registers the source's Python targets (or checks which exist, in a dry run).
    fn begin_targets(&mut self, targets: &[TargetIdentity], found: &mut SourceFindings) -> Result<()>;
    /// Applies one Python delivery state; `false` when no journaled event has that key.
    fn ledger(&mut self, row: &LedgerRow) -> Result<bool>;
    /// Keeps a Python row key that differs from its envelope's id resolvable (ledger rows).
    fn alias(&mut self, row_key: &str, row: &Incoming<'_>) -> Result<()>;
    /// An already journaled event that a Python store says was never consented: hold it,
    /// unless it was delivered, attempted or released already.
    fn hold(&mut self, row: &Incoming<'_>) -> Result<()>;
}

/// Rows travel from the reader thread to the writer in batches of at most this many rows or
/// bytes: few channel hand-offs, and memory stays bounded with near-1 MB payloads.
const BATCH_ROWS: usize = 512;
const BATCH_BYTES: usize = 4 << 20;
/// Batches in flight between the two threads.
const BATCHES_IN_FLIGHT: usize = 2;

/// One source row after validation on the reader thread.
enum Item {
    Row(Prepared),
    Invalid(InvalidRow),
    Ledger(LedgerRow),
    /// A Python ledger row naming a target the source does not identify.
    Unmatched,
}

/// Imports one source. Two threads: one reads the source and does the CPU work (JSON parse,
/// canonical form, SHA-256), the caller's thread writes; on two cores they overlap.
fn import_source(
    sink: &mut dyn Sink,
    opened: Opened,
    report: &mut SourceReport,
    found: &mut SourceFindings,
    ticker: &mut Ticker<'_>,
) -> std::result::Result<(), ReadStop<Error>> {
    let (sender, receiver) = std::sync::mpsc::sync_channel::<Vec<Item>>(BATCHES_IN_FLIGHT);
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || read_source(&opened, &sender));
        let written = write_items(sink, &receiver, report, found, ticker);
        // Stopping early (a store error) closes the channel, which stops the reader.
        drop(receiver);
        let read = reader.join().map_err(|_| {
            ReadStop::Consumer(Error::internal("the legacy queue reader stopped unexpectedly", "run the command again"))
        })?;
        written.map_err(ReadStop::Consumer)?;
        read.map_err(ReadStop::Source)
    })
}

/// The writer stopped listening; the reader just stops.
struct Closed;

/// Batches items for the writer thread.
struct Batcher<'o> {
    out: &'o std::sync::mpsc::SyncSender<Vec<Item>>,
    batch: Vec<Item>,
    bytes: usize,
}

impl Batcher<'_> {
    fn push(&mut self, item: Item, bytes: usize) -> std::result::Result<(), Closed> {
        self.bytes += bytes;
        self.batch.push(item);
        if self.batch.len() >= BATCH_ROWS || self.bytes >= BATCH_BYTES {
            self.bytes = 0;
            self.out.send(std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH_ROWS))).map_err(|_| Closed)?;
        }
        Ok(())
    }
}

/// Reads and validates every row. `Err` is the reason the source cannot be read.
fn read_source(opened: &Opened, out: &std::sync::mpsc::SyncSender<Vec<Item>>) -> std::result::Result<(), String> {
    let mut batcher = Batcher { out, batch: Vec::with_capacity(BATCH_ROWS), bytes: 0 };
    let mut scratch = Vec::new();
    let result = match opened {
        Opened::Queue(queue) => source::for_each_row(queue, |raw| {
            let item = match prepare(raw, &mut scratch) {
                Ok(row) => Item::Row(row),
                Err(reason) => {
                    Item::Invalid(InvalidRow { row_id: raw.id, event_id: raw.event_id.map(str::to_string), reason })
                }
            };
            batcher.push(item, raw.data.map_or(0, <[u8]>::len))
        }),
        Opened::Python(store) => python::read(store, |row| {
            let (item, bytes) = match row {
                PyRow::Event(raw) => {
                    let bytes = raw.bytes.as_ref().map_or(0, Vec::len);
                    let (row_id, key) = (raw.row_id, raw.row_key.clone());
                    let item = match prepare_python(raw, &mut scratch) {
                        Ok(row) => Item::Row(row),
                        Err(reason) => Item::Invalid(InvalidRow { row_id, event_id: key, reason }),
                    };
                    (item, bytes)
                }
                PyRow::Ledger(row) => (Item::Ledger(row), 64),
                PyRow::Unmatched => (Item::Unmatched, 0),
            };
            batcher.push(item, bytes)
        }),
    };
    match result {
        Ok(()) => {
            // A closed channel here means the writer failed; it reports that itself.
            let _ = out.send(batcher.batch);
            Ok(())
        }
        Err(ReadStop::Source(reason)) => Err(reason),
        Err(ReadStop::Consumer(Closed)) => Ok(()),
    }
}

fn write_items(
    sink: &mut dyn Sink,
    batches: &std::sync::mpsc::Receiver<Vec<Item>>,
    report: &mut SourceReport,
    found: &mut SourceFindings,
    ticker: &mut Ticker<'_>,
) -> Result<()> {
    let source_name = report.source.clone();
    let source_path = report.path.clone();
    for batch in batches {
        for item in batch {
            ticker.row();
            match item {
                Item::Invalid(row) => {
                    report.rows_read += 1;
                    report.invalid_row(row);
                }
                Item::Row(row) => {
                    report.rows_read += 1;
                    let incoming = row.incoming(&source_name, &source_path);
                    apply(sink, &incoming, report)?;
                    if let Some(row_key) = &row.row_key {
                        sink.alias(row_key, &incoming)?;
                        found.id_mismatches.push(IdMismatch {
                            row_id: row_key.clone(),
                            event_id: row.event_id.clone(),
                            source: source_name.clone(),
                        });
                    }
                }
                Item::Ledger(row) => {
                    report.ledger_rows += 1;
                    if !sink.ledger(&row)? {
                        report.ledger_unmatched += 1;
                    }
                }
                Item::Unmatched => {
                    report.ledger_rows += 1;
                    report.ledger_unmatched += 1;
                }
            }
        }
    }
    Ok(())
}

fn apply(sink: &mut dyn Sink, incoming: &Incoming<'_>, report: &mut SourceReport) -> Result<()> {
    report.not_consented += u64::from(incoming.blocked_reason.is_some());
    let existing = match sink.insert(incoming)? {
        Found::New(seq) => {
            sink.provenance(incoming, seq)?;
            report.imported += 1;
            return Ok(());
        }
        Found::Existing(existing) => existing,
    };
    let (same, existing_sha256) = compare(&existing, incoming);
    if same {
        sink.provenance(incoming, None)?;
        if incoming.blocked_reason.is_some() {
            sink.hold(incoming)?;
        }
        report.deduped += 1;
        return Ok(());
    }
    match sink.conflict(incoming, &existing_sha256)? {
        ConflictState::Unresolved => report.conflicts += 1,
        ConflictState::Resolved => report.resolved_conflicts += 1,
    }
    Ok(())
}

/// Same event? Both sides are canonicalised (spec-kitty 3.2.4 canonicalised only the incoming
/// side, so a Python-encoded envelope never matched its own compact form — reference §9.2
/// item 2). Returns the verdict and the existing side's SHA-256 for a conflict row.
fn compare(existing: &Existing, incoming: &Incoming<'_>) -> (bool, String) {
    match existing {
        Existing::Bytes(stored) => {
            let sha: [u8; 32] = Sha256::digest(canonical_bytes(stored)).into();
            (sha == incoming.canonical_sha256, hex::encode(sha))
        }
        Existing::Purged(stored_sha) => {
            // Only the stored bytes' hash is left: byte-identical is the best test possible.
            let same = Sha256::digest(incoming.bytes).as_slice() == stored_sha.as_slice();
            (same, hex::encode(stored_sha))
        }
        Existing::Canonical(sha) => (*sha == incoming.canonical_sha256, hex::encode(sha)),
    }
}

/// A row that passed validation, owned so it can cross to the writer thread.
struct Prepared {
    event_id: String,
    event_type: String,
    /// The source row's `data`, byte for byte.
    bytes: Vec<u8>,
    canonical_sha256: [u8; 32],
    coalesce_key: Option<String>,
    captured_at: i64,
    team: Option<String>,
    lamport: Option<i64>,
    blocked_reason: Option<&'static str>,
    /// A Python row key that differs from the envelope's `event_id`.
    row_key: Option<String>,
}

impl Prepared {
    fn incoming<'b>(&'b self, source: &'b str, source_path: &'b str) -> Incoming<'b> {
        Incoming {
            event_id: &self.event_id,
            event_type: &self.event_type,
            bytes: &self.bytes,
            canonical_sha256: self.canonical_sha256,
            coalesce_key: self.coalesce_key.as_deref(),
            captured_at: self.captured_at,
            capture_team: self.team.as_deref(),
            lamport: self.lamport,
            blocked_reason: self.blocked_reason,
            source,
            source_path,
        }
    }
}

/// Legacy `timestamp` is the enqueue time in epoch seconds; a missing one means "now".
fn captured_at(timestamp: Option<f64>) -> i64 {
    match timestamp {
        Some(seconds) if seconds.abs() < 1e14 => (seconds * 1000.0).round() as i64,
        _ => crate::clock::now_ms(),
    }
}

/// Validates a row; the error is the reason it is not imported. `scratch` is a reusable
/// buffer for the canonical form.
fn prepare(raw: &RawRow<'_>, scratch: &mut Vec<u8>) -> std::result::Result<Prepared, String> {
    let data = raw.data.ok_or("the data column is NULL or not text")?;
    let event_id = match raw.event_id {
        Some(id) if is_valid_ulid(id) => id,
        Some(id) => return Err(format!("event_id {id:?} is not a valid ULID")),
        None => return Err("the event_id column is NULL or not text".to_string()),
    };
    let (facts, canonical_sha256) = parse_envelope(data, Some(event_id), scratch)?;
    let event_type = event_type(raw.event_type, facts.event_type)?;
    Ok(Prepared {
        event_id: event_id.to_string(),
        event_type,
        bytes: data.to_vec(),
        canonical_sha256,
        coalesce_key: raw.coalesce_key.map(str::to_string),
        captured_at: captured_at(raw.timestamp),
        team: facts.team,
        lamport: facts.lamport,
        blocked_reason: None,
        row_key: None,
    })
}

/// `event_type` as stored in its column; the envelope's only if the column is blank.
fn event_type(column: Option<&str>, envelope: Option<String>) -> std::result::Result<String, String> {
    match (column.filter(|t| !t.trim().is_empty()), envelope) {
        (Some(column), _) => Ok(column.to_string()),
        (None, Some(envelope)) => Ok(envelope),
        (None, None) => Err("no event_type".to_string()),
    }
}

/// A Python journal row. The envelope's `event_id` is the event's identity (receivers dedupe
/// on it); a row key that disagrees (3.2.4/3.2.7 coalescing) is kept as an alias.
fn prepare_python(raw: RawEvent, scratch: &mut Vec<u8>) -> std::result::Result<Prepared, String> {
    let data = raw.bytes?;
    let (facts, canonical_sha256) = parse_envelope(&data, None, scratch)?;
    let event_id = match facts.event_id {
        Some(id) if is_valid_ulid(&id) => id,
        Some(id) => return Err(format!("the envelope's event_id {id:?} is not a valid ULID")),
        None => return Err("the envelope has no event_id".to_string()),
    };
    let event_type = event_type(raw.event_type.as_deref(), facts.event_type)?;
    let row_key = raw.row_key.filter(|key| *key != event_id);
    Ok(Prepared {
        event_id,
        event_type,
        bytes: data,
        canonical_sha256,
        coalesce_key: raw.coalesce_key,
        captured_at: raw.created_at.unwrap_or_else(crate::clock::now_ms),
        team: facts.team,
        lamport: facts.lamport,
        blocked_reason: raw.not_consented.then_some(NOT_CONSENTED),
        row_key,
    })
}

/// What the migration reads from an envelope besides its bytes.
#[derive(Debug)]
struct Facts {
    /// The envelope's `event_id` (read only when the row's id is not imposed).
    event_id: Option<String>,
    event_type: Option<String>,
    team: Option<String>,
    lamport: Option<i64>,
}

/// Checks the envelope is an object (carrying the row's event id when `expected` is given),
/// and reads its facts.
fn facts(envelope: &Json<'_>, expected: Option<&str>) -> std::result::Result<Facts, String> {
    let object = envelope.as_object().ok_or("data is not a JSON object")?;
    let inner = object.get("event_id");
    if let Some(event_id) = expected {
        match inner {
            Some(Json::String(inner)) if inner == event_id => {}
            Some(other) => {
                return Err(format!(
                    "the envelope's event_id {} differs from the row's {event_id}",
                    other.to_canonical_string()
                ));
            }
            None => return Err("the envelope has no event_id".to_string()),
        }
    }
    Ok(Facts {
        event_id: inner.and_then(Json::as_str).map(str::to_string),
        event_type: object
            .get("event_type")
            .and_then(Json::as_str)
            .filter(|t| !t.trim().is_empty())
            .map(str::to_string),
        team: object.get("team_slug").and_then(Json::as_str).and_then(team_of),
        lamport: object.get("lamport_clock").and_then(Json::as_i64),
    })
}

/// Parses and checks `data`; returns its facts and the SHA-256 of its canonical form.
///
/// Python's `json.dumps` writes a lone surrogate (e.g. from a `surrogateescape`d file name) as
/// a `\udcXX` escape: valid JSON text that no Rust string can hold. Such a row is still an
/// event: its facts are read from a copy with those escapes replaced, and its canonical form
/// is its raw bytes, exactly as [`canonical_bytes`] treats undecodable bytes, so a later
/// comparison with the stored bytes agrees.
fn parse_envelope(
    data: &[u8],
    event_id: Option<&str>,
    scratch: &mut Vec<u8>,
) -> std::result::Result<(Facts, [u8; 32]), String> {
    let error = match Json::parse(data) {
        Ok(envelope) => {
            let facts = facts(&envelope, event_id)?;
            scratch.clear();
            envelope.write_canonical(scratch);
            return Ok((facts, Sha256::digest(scratch.as_slice()).into()));
        }
        Err(e) => e,
    };
    let copy = replace_surrogate_escapes(data).ok_or_else(|| format!("data is not valid JSON: {error}"))?;
    let envelope = Json::parse(&copy).map_err(|_| format!("data is not valid JSON: {error}"))?;
    Ok((facts(&envelope, event_id)?, Sha256::digest(data).into()))
}

/// A copy of `data` with every `\uD800`–`\uDFFF` escape replaced by `\uFFFD` (same length);
/// `None` when there is none.
fn replace_surrogate_escapes(data: &[u8]) -> Option<Vec<u8>> {
    let mut copy = data.to_vec();
    let mut replaced = false;
    let mut i = 0;
    while i + 1 < copy.len() {
        if copy[i] != b'\\' {
            i += 1;
            continue;
        }
        // An escape: `\\` and friends are two bytes, `\uXXXX` six.
        let is_surrogate = copy[i + 1] == b'u'
            && copy.get(i + 2..i + 6).is_some_and(|hex| {
                std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u16::from_str_radix(h, 16).ok())
                    .is_some_and(|u| (0xD800..=0xDFFF).contains(&u))
            });
        if is_surrogate {
            copy[i + 2..i + 6].copy_from_slice(b"fffd");
            replaced = true;
            i += 6;
        } else {
            i += 2;
        }
    }
    replaced.then_some(copy)
}

/// The team a legacy event belongs to, for team isolation: its envelope's `team_slug`, unless
/// that is missing, blank or spec-kitty's "local" placeholder (then deliverable to any team).
pub(crate) fn capture_team(envelope: &serde_json::Map<String, Value>) -> Option<String> {
    envelope.get("team_slug").and_then(Value::as_str).and_then(team_of)
}

fn team_of(team_slug: &str) -> Option<String> {
    (!team_slug.trim().is_empty() && team_slug != "local").then(|| team_slug.to_string())
}

/// The largest Lamport clock among a source's imported events (`None`: they carry none).
#[derive(Debug, Clone, Copy)]
struct ImportedLamport(Option<i64>);

/// Writes into the store, inside the source's transaction.
struct TxSink<'t, 'c> {
    tx: &'t Transaction<'c>,
    now: i64,
    /// `Some` once an event was imported.
    imported_lamport: Option<ImportedLamport>,
    /// Per Python target of the source: the kitty-sync (target, epoch) rows that stand for it.
    targets: Vec<Vec<(i64, i64)>>,
    /// (target, epoch) → events that became terminally delivered there in this source.
    delivered: HashMap<(i64, i64), Vec<i64>>,
    /// The last ledger row's event key and sequence number (a 3.2.4 ledger lists one event's
    /// rows together).
    last_key: Option<(String, Option<i64>)>,
}

impl<'t, 'c> TxSink<'t, 'c> {
    fn new(tx: &'t Transaction<'c>, now: i64) -> Self {
        TxSink { tx, now, imported_lamport: None, targets: Vec::new(), delivered: HashMap::new(), last_key: None }
    }

    /// Counts the first terminal deliveries the ledger rows of this source recorded (the
    /// status counters and "delivered anywhere" that drains keep the same way).
    fn finish(&mut self) -> Result<()> {
        let delivered = std::mem::take(&mut self.delivered);
        if delivered.is_empty() {
            return Ok(());
        }
        count_imported_deliveries(self.tx, &delivered)
    }

    /// The journaled event a Python ledger key names: its id, or a row key recorded as alias.
    fn seq_of(&mut self, key: &str) -> Result<Option<i64>> {
        if let Some((last, seq)) = &self.last_key
            && last == key
        {
            return Ok(*seq);
        }
        let seq = self
            .tx
            .prepare_cached(
                "SELECT seq FROM events WHERE event_id = ?1
                 UNION ALL SELECT seq FROM migration_aliases WHERE alias = ?1 LIMIT 1",
            )
            .and_then(|mut s| s.query_row([key], |r| r.get::<_, i64>(0)).optional())
            .ctx("cannot look up the event id")?;
        self.last_key = Some((key.to_string(), seq));
        Ok(seq)
    }

    /// Writes Python's state for (event, target) without ever undoing a terminal success, and
    /// without overriding a state kitty-sync already holds (e.g. a parked event the operator
    /// retried): only a Python success/duplicate upgrades an existing row.
    fn write_ledger(&mut self, target: (i64, i64), seq: i64, row: &LedgerRow, status: &'static str) -> Result<()> {
        let success = status == "success" || status == "duplicate";
        let reject_count = if status == "rejected" { row.attempt_count } else { 0 };
        let completed = (status != "rejected").then_some(row.last_at).flatten();
        let inserted = self
            .tx
            .prepare_cached(
                "INSERT OR IGNORE INTO ledger (target, epoch, seq, status, attempt_count, reject_count, first_attempted_at,
                                               last_attempted_at, completed_at, last_http_status, last_error)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    target.0,
                    target.1,
                    seq,
                    status,
                    row.attempt_count,
                    reject_count,
                    row.first_at,
                    row.last_at,
                    completed,
                    row.http_status,
                    row.error
                ])
            })
            .ctx("cannot import the delivery state")?;
        let newly_delivered = match (inserted, success) {
            (1, true) => true,
            (_, true) => {
                self.tx
                    .prepare_cached(
                        "UPDATE ledger SET status = ?4, completed_at = ?5
                         WHERE target = ?1 AND epoch = ?2 AND seq = ?3 AND status NOT IN ('success', 'duplicate')",
                    )
                    .and_then(|mut s| s.execute(params![target.0, target.1, seq, status, completed]))
                    .ctx("cannot import the delivery state")?
                    == 1
            }
            _ => false,
        };
        if newly_delivered {
            self.delivered.entry(target).or_default().push(seq);
        }
        Ok(())
    }
}

/// Counts the first terminal deliveries a source's ledger rows recorded, for several targets at
/// once and set-based (the drain's per-batch `note_delivered` grows with each target's ledger
/// per call, which a 300,000-row import cannot afford): per event the number of targets that
/// terminally received it, "delivered anywhere", and per target the events it alone received.
fn count_imported_deliveries(tx: &Transaction<'_>, delivered: &HashMap<(i64, i64), Vec<i64>>) -> Result<()> {
    let pairs: Vec<(i64, i64)> =
        delivered.iter().flat_map(|((target, _), seqs)| seqs.iter().map(move |seq| (*seq, *target))).collect();
    let list = serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".into());
    tx.execute_batch(
        "DROP TABLE IF EXISTS temp.imported_delivery; DROP TABLE IF EXISTS temp.imported_counts;
         CREATE TEMP TABLE imported_delivery (seq INTEGER NOT NULL, target INTEGER NOT NULL,
                                              PRIMARY KEY (seq, target)) WITHOUT ROWID;",
    )
    .ctx("cannot count the imported deliveries")?;
    tx.execute(
        "INSERT OR IGNORE INTO temp.imported_delivery (seq, target)
         SELECT j.value ->> 0, j.value ->> 1 FROM json_each(?1) j",
        [&list],
    )
    .ctx("cannot count the imported deliveries")?;
    tx.execute_batch(IMPORTED_COUNTS_SQL).ctx("cannot count the imported deliveries")
}

/// `before` = terminal deliveries an event had before this source, `added` = targets this
/// source delivered it to (all first deliveries in the targets' current epochs).
const IMPORTED_COUNTS_SQL: &str = "
CREATE TEMP TABLE imported_counts (seq INTEGER PRIMARY KEY, added INTEGER NOT NULL, before INTEGER NOT NULL);
INSERT INTO temp.imported_counts (seq, added, before)
    SELECT d.seq, count(*), (SELECT e.delivered_targets FROM events e WHERE e.seq = d.seq)
    FROM temp.imported_delivery d GROUP BY d.seq;
CREATE INDEX temp.imported_counts_by_before ON imported_counts (before, added);
-- Its only delivery so far: now exclusive to the one target that received it.
UPDATE target_stats SET value = value + (
    SELECT count(*) FROM temp.imported_counts c JOIN temp.imported_delivery d ON d.seq = c.seq
    WHERE c.before = 0 AND c.added = 1 AND d.target = target_stats.target)
WHERE key = 'exclusive' AND epoch = (SELECT t.epoch FROM targets t WHERE t.id = target_stats.target);
-- Was exclusive to another target: no longer.
UPDATE target_stats SET value = value - (
    SELECT count(*) FROM temp.imported_counts c
    JOIN ledger l ON l.target = target_stats.target AND l.epoch = target_stats.epoch AND l.seq = c.seq
    WHERE c.before = 1 AND l.status IN ('success', 'duplicate')
      AND NOT EXISTS (SELECT 1 FROM temp.imported_delivery d WHERE d.seq = c.seq AND d.target = l.target))
WHERE key = 'exclusive' AND epoch = (SELECT t.epoch FROM targets t WHERE t.id = target_stats.target);
UPDATE stats SET value = value + (SELECT count(*) FROM temp.imported_counts WHERE before = 0) WHERE key = 'delivered_any';
UPDATE events SET delivered_targets = delivered_targets + (SELECT c.added FROM temp.imported_counts c WHERE c.seq = events.seq)
WHERE seq IN (SELECT seq FROM temp.imported_counts);
DROP TABLE temp.imported_counts;
DROP TABLE temp.imported_delivery;
";

/// The kitty-sync target rows a Python target stands for: its own identity, and for a 3.2.4
/// Teamspace target recorded without a user, every Teamspace target of the same server and
/// team (contract §12: the same target whatever user is logged in). Returns whether the
/// identity's own row was created.
fn python_target_rows(tx: &Transaction<'_>, identity: &TargetIdentity, now: i64) -> Result<(Vec<(i64, i64)>, bool)> {
    let (record, created) = target::register_exact(tx, identity, now)?;
    let mut rows = vec![(record.id, record.epoch)];
    if identity.user_email.is_empty() && !identity.team_slug.is_empty() {
        let mut stmt = tx
            .prepare_cached(
                "SELECT id, epoch FROM targets
                 WHERE canonical_url = ?1 AND team_slug = ?2 AND user_email <> '' AND kind = 'teamspace'",
            )
            .ctx("cannot read delivery targets")?;
        let others = stmt
            .query_map(params![identity.canonical_url, identity.team_slug], |r| Ok((r.get(0)?, r.get(1)?)))
            .ctx("cannot read delivery targets")?;
        for other in others {
            rows.push(other.ctx("cannot read delivery targets")?);
        }
    }
    Ok((rows, created))
}

impl Sink for TxSink<'_, '_> {
    fn insert(&mut self, row: &Incoming<'_>) -> Result<Found> {
        let journal_row = Row {
            event_id: row.event_id,
            event_type: row.event_type,
            bytes: row.bytes,
            coalesce_key: row.coalesce_key,
            captured_at: row.captured_at,
            capture_team: row.capture_team,
            blocked_reason: row.blocked_reason,
        };
        // No coalescing on import: a legacy event is older than what the journal holds, and
        // superseding by insertion order could hide a newer event. Nothing is ever lost.
        match insert_row(self.tx, &journal_row)? {
            Inserted::New { seq } => {
                let seen = self.imported_lamport.and_then(|l| l.0);
                let max = match (seen, row.lamport) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                self.imported_lamport = Some(ImportedLamport(max));
                Ok(Found::New(Some(seq)))
            }
            Inserted::Exists { envelope: Some(bytes), .. } => Ok(Found::Existing(Existing::Bytes(bytes))),
            Inserted::Exists { envelope: None, sha256 } => Ok(Found::Existing(Existing::Purged(sha256))),
        }
    }

    fn provenance(&mut self, row: &Incoming<'_>, seq: Option<i64>) -> Result<()> {
        let sha = hex::encode(row.canonical_sha256);
        let done = match seq {
            Some(seq) => self
                .tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO migration_provenance (seq, source, source_path, payload_sha256, recorded_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .and_then(|mut s| s.execute(params![seq, row.source, row.source_path, sha, self.now])),
            None => self
                .tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO migration_provenance (seq, source, source_path, payload_sha256, recorded_at)
                     SELECT seq, ?2, ?3, ?4, ?5 FROM events WHERE event_id = ?1",
                )
                .and_then(|mut s| s.execute(params![row.event_id, row.source, row.source_path, sha, self.now])),
        };
        done.map(|_| ()).ctx("cannot record migration provenance")
    }

    fn conflict(&mut self, row: &Incoming<'_>, existing_sha256: &str) -> Result<ConflictState> {
        let incoming_sha256 = hex::encode(row.canonical_sha256);
        let known: Option<(i64, String, Option<i64>)> = self
            .tx
            .prepare_cached(
                "SELECT id, incoming_sha256, resolved_at FROM migration_conflicts WHERE event_id = ?1 AND source = ?2",
            )
            .and_then(|mut s| {
                s.query_row(params![row.event_id, row.source], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).optional()
            })
            .ctx("cannot read migration conflicts")?;
        match known {
            // Re-detected on a re-run: the row is not duplicated and a resolution stands.
            Some((_, sha, Some(_))) if sha == incoming_sha256 => Ok(ConflictState::Resolved),
            Some((id, sha, None)) if sha == incoming_sha256 => {
                self.tx
                    .prepare_cached("UPDATE migration_conflicts SET existing_sha256 = ?2 WHERE id = ?1")
                    .and_then(|mut s| s.execute(params![id, existing_sha256]))
                    .ctx("cannot update the migration conflict")?;
                Ok(ConflictState::Unresolved)
            }
            // The source now holds yet another version: it needs a new decision.
            Some((id, _, _)) => {
                self.tx
                    .prepare_cached(
                        "UPDATE migration_conflicts SET source_path = ?2, existing_sha256 = ?3, incoming_sha256 = ?4,
                                incoming_envelope = ?5, detected_at = ?6, resolved_at = NULL, resolution = NULL
                         WHERE id = ?1",
                    )
                    .and_then(|mut s| {
                        s.execute(params![id, row.source_path, existing_sha256, incoming_sha256, row.bytes, self.now])
                    })
                    .ctx("cannot update the migration conflict")?;
                Ok(ConflictState::Unresolved)
            }
            None => {
                self.tx
                    .prepare_cached(
                        "INSERT INTO migration_conflicts (event_id, source, source_path, existing_sha256, incoming_sha256,
                                                          incoming_envelope, detected_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            row.event_id,
                            row.source,
                            row.source_path,
                            existing_sha256,
                            incoming_sha256,
                            row.bytes,
                            self.now
                        ])
                    })
                    .ctx("cannot record the migration conflict")?;
                Ok(ConflictState::Unresolved)
            }
        }
    }

    fn begin_targets(&mut self, targets: &[TargetIdentity], found: &mut SourceFindings) -> Result<()> {
        for identity in targets {
            let (rows, created) = python_target_rows(self.tx, identity, self.now)?;
            if created {
                found.targets_created.push(CreatedTarget::of(identity));
            }
            found.target_ids.insert(identity.target_id());
            self.targets.push(rows);
        }
        Ok(())
    }

    fn ledger(&mut self, row: &LedgerRow) -> Result<bool> {
        // A state with no terminal meaning leaves the event due: nothing to write.
        let Some(status) = row.status else { return Ok(true) };
        let Some(seq) = self.seq_of(&row.event_key)? else { return Ok(false) };
        let rows = self.targets.get(row.target).cloned().unwrap_or_default();
        for target in rows {
            self.write_ledger(target, seq, row, status)?;
        }
        Ok(true)
    }

    fn alias(&mut self, row_key: &str, row: &Incoming<'_>) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT OR REPLACE INTO migration_aliases (alias, source, seq)
                 SELECT ?1, ?2, seq FROM events WHERE event_id = ?3",
            )
            .and_then(|mut s| s.execute(params![row_key, row.source, row.event_id]))
            .map(|_| ())
            .ctx("cannot record the row's id")
    }

    fn hold(&mut self, row: &Incoming<'_>) -> Result<()> {
        self.tx
            .prepare_cached(
                "UPDATE events SET drain_blocked_reason = ?2
                 WHERE event_id = ?1 AND drain_blocked_reason IS NOT ?2 AND delivered_targets = 0
                   AND NOT EXISTS (SELECT 1 FROM ledger l WHERE l.seq = events.seq)
                   AND NOT EXISTS (SELECT 1 FROM consent_releases r WHERE r.seq = events.seq)",
            )
            .and_then(|mut s| s.execute(params![row.event_id, NOT_CONSENTED]))
            .map(|_| ())
            .ctx("cannot hold the event")
    }
}

/// Reads the store (if any) and keeps this run's would-be inserts in memory.
#[derive(Default)]
struct DrySink<'s> {
    store: Option<&'s Store>,
    /// event id → canonical SHA-256 of what this run would have inserted.
    added: HashMap<String, [u8; 32]>,
    /// (event id, source) conflicts this run would have recorded.
    conflicts: HashSet<(String, String)>,
    /// What the current source added, to forget it if the source fails (like a rollback).
    source_added: Vec<String>,
    source_conflicts: Vec<(String, String)>,
    /// How many of `conflicts` are already unresolved rows of the store (for the current source).
    known_unresolved: u64,
    source_known_unresolved: u64,
    /// Targets this dry run would create (a real run registers each once).
    targets_created: HashSet<String>,
}

impl DrySink<'_> {
    fn begin_source(&mut self) {
        self.source_added.clear();
        self.source_conflicts.clear();
        self.source_known_unresolved = 0;
    }

    fn rollback_source(&mut self) {
        for id in self.source_added.drain(..) {
            self.added.remove(&id);
        }
        for key in self.source_conflicts.drain(..) {
            self.conflicts.remove(&key);
        }
        self.known_unresolved -= self.source_known_unresolved;
        self.source_known_unresolved = 0;
    }

    fn remember_conflict(&mut self, key: (String, String), known_unresolved: bool) -> ConflictState {
        if self.conflicts.insert(key.clone()) {
            self.source_conflicts.push(key);
            self.known_unresolved += u64::from(known_unresolved);
            self.source_known_unresolved += u64::from(known_unresolved);
        }
        ConflictState::Unresolved
    }

    fn stored(&self, event_id: &str) -> Result<Option<Existing>> {
        let Some(store) = self.store else { return Ok(None) };
        store
            .conn()
            // A correlated subquery, not a join: with a bound id SQLite re-plans a join on every
            // call, which costs more than the lookup.
            .prepare_cached(
                "SELECT (SELECT p.envelope FROM payloads p WHERE p.seq = e.seq), e.payload_sha256 FROM events e
                 WHERE e.event_id = ?1",
            )
            .and_then(|mut s| {
                s.query_row([event_id], |r| {
                    Ok(match r.get::<_, Option<Vec<u8>>>(0)? {
                        Some(bytes) => Existing::Bytes(bytes),
                        None => Existing::Purged(r.get(1)?),
                    })
                })
                .optional()
            })
            .ctx("cannot look up the event id")
    }
}

impl Sink for DrySink<'_> {
    fn insert(&mut self, row: &Incoming<'_>) -> Result<Found> {
        if let Some(sha) = self.added.get(row.event_id) {
            return Ok(Found::Existing(Existing::Canonical(*sha)));
        }
        if let Some(existing) = self.stored(row.event_id)? {
            return Ok(Found::Existing(existing));
        }
        self.added.insert(row.event_id.to_string(), row.canonical_sha256);
        self.source_added.push(row.event_id.to_string());
        Ok(Found::New(None))
    }

    fn provenance(&mut self, _row: &Incoming<'_>, _seq: Option<i64>) -> Result<()> {
        Ok(())
    }

    fn conflict(&mut self, row: &Incoming<'_>, _existing_sha256: &str) -> Result<ConflictState> {
        let key = (row.event_id.to_string(), row.source.to_string());
        if self.conflicts.contains(&key) {
            return Ok(ConflictState::Unresolved);
        }
        let Some(store) = self.store else {
            return Ok(self.remember_conflict(key, false));
        };
        let known: Option<(String, Option<i64>)> = store
            .conn()
            .prepare_cached(
                "SELECT incoming_sha256, resolved_at FROM migration_conflicts WHERE event_id = ?1 AND source = ?2",
            )
            .and_then(|mut s| s.query_row(params![row.event_id, row.source], |r| Ok((r.get(0)?, r.get(1)?))).optional())
            .ctx("cannot read migration conflicts")?;
        let incoming = hex::encode(row.canonical_sha256);
        match known {
            Some((sha, Some(_))) if sha == incoming => Ok(ConflictState::Resolved),
            Some((sha, None)) if sha == incoming => Ok(self.remember_conflict(key, true)),
            _ => Ok(self.remember_conflict(key, false)),
        }
    }

    fn begin_targets(&mut self, targets: &[TargetIdentity], found: &mut SourceFindings) -> Result<()> {
        for identity in targets {
            let exists = match self.store {
                Some(store) => target::find_exact(store.conn(), identity)?.is_some(),
                None => false,
            };
            if !exists && self.targets_created.insert(identity.target_id()) {
                found.targets_created.push(CreatedTarget::of(identity));
            }
            found.target_ids.insert(identity.target_id());
        }
        Ok(())
    }

    fn ledger(&mut self, _row: &LedgerRow) -> Result<bool> {
        Ok(true)
    }

    fn alias(&mut self, _row_key: &str, _row: &Incoming<'_>) -> Result<()> {
        Ok(())
    }

    fn hold(&mut self, _row: &Incoming<'_>) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_the_canonical_json_hash() {
        let data = br#"{"event_id": "01KJP325TDMTQC21WEN42FYF3K", "b": [1, 2.5, -3, 1e300], "a": {"z": "caf\u00e9 \ud83d\ude00", "y": null}, "c": "\"\\\n"}"#;
        let (_, sha) = parse_envelope(data, Some("01KJP325TDMTQC21WEN42FYF3K"), &mut Vec::new()).unwrap();
        let expected: [u8; 32] = Sha256::digest(canonical_bytes(data)).into();
        assert_eq!(sha, expected);
    }

    #[test]
    fn lone_surrogates_are_an_event_whose_canonical_form_is_its_bytes() {
        let data = br#"{"event_id": "01KJP325TDMTQC21WEN42FYF3K", "path": "caf\udce9.md", "ok": "\ud83d\ude00", "lit": "\\udce9"}"#;
        assert!(serde_json::from_slice::<Value>(data).is_err(), "serde_json cannot decode it");
        let (_, sha) = parse_envelope(data, Some("01KJP325TDMTQC21WEN42FYF3K"), &mut Vec::new()).unwrap();
        let copy = replace_surrogate_escapes(data).unwrap();
        let value: Value = serde_json::from_slice(&copy).unwrap();
        assert_eq!(value["lit"], "\\udce9", "an escaped backslash is not an escape");
        assert_eq!(value["path"], "caf\u{fffd}.md");
        let expected: [u8; 32] = Sha256::digest(canonical_bytes(data)).into();
        assert_eq!(sha, expected, "agrees with canonical_bytes of the stored bytes");
        assert!(parse_envelope(b"{\"v\": NaN}", Some("x"), &mut Vec::new()).unwrap_err().contains("not valid JSON"));
        assert!(replace_surrogate_escapes(b"{\"a\": \"\\u00e9\"}").is_none());
    }

    #[test]
    fn legacy_seconds_become_milliseconds() {
        assert_eq!(captured_at(Some(1_771_575_301.0)), 1_771_575_301_000);
        assert_eq!(captured_at(Some(1.5)), 1_500);
        let now = crate::clock::now_ms();
        assert!(captured_at(None) >= now);
        assert!(captured_at(Some(f64::MAX)) >= now, "absurd values fall back to now");
    }
}
