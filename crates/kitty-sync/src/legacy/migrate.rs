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

use super::source::{self, Discovery, OpenSource, RawRow, ReadStop, ScopeStatus, SourceFile};
use crate::authority::TargetAuthority;
use crate::canonical_json::Json;
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
    /// Unresolved conflicts in the journal after this run (earlier runs' included).
    #[serde(skip)]
    pub unresolved_conflicts: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceReport {
    pub path: String,
    /// Hex digest of a scoped queue; null for `queue.db`.
    pub digest: Option<String>,
    pub scope_status: ScopeStatus,
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
    /// The provenance name (`known:<digest>`, `unknown:<digest>`, `legacy:queue.db`).
    #[serde(skip)]
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvalidRow {
    /// The legacy row's `id`.
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
}

impl SourceReport {
    fn new(file: &SourceFile, authority: &TargetAuthority) -> SourceReport {
        SourceReport::blank(file, file.scope_status(authority), file.provenance(authority))
    }

    fn blank(file: &SourceFile, scope_status: ScopeStatus, source: String) -> SourceReport {
        SourceReport {
            path: file.display_path(),
            digest: file.digest.clone(),
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
        self.error = Some(reason);
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

    fn finish(dry_run: bool, sources: Vec<SourceReport>, discovery: &Discovery, unresolved_conflicts: u64) -> Self {
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
        }
        let cleanup_blocked =
            unresolved_conflicts > 0 || totals.conflicts > 0 || totals.source_errors > 0 || totals.invalid_rows > 0;
        MigrationReport {
            dry_run,
            sources,
            ignored_files: discovery.ignored_files.iter().map(|p| p.display().to_string()).collect(),
            totals,
            cleanup_blocked,
            note: NOTE,
            unresolved_conflicts,
        }
    }
}

/// Migrates every legacy queue of `home` into its journal (or, with `dry_run`, reports what
/// that would do). Source problems are reported per source; only store failures are errors.
pub fn migrate(
    home: &Home,
    authority: &TargetAuthority,
    options: &MigrateOptions,
    progress: &mut dyn FnMut(MigrateProgress),
) -> Result<MigrationReport> {
    let discovery = source::discover(home);
    let mut probes: Vec<Probe> = discovery
        .sources
        .iter()
        .map(|file| Probe {
            report: SourceReport::new(file, authority),
            file: file.clone(),
            opened: source::open(&file.path),
        })
        .collect();
    if let Some((dir, reason)) = &discovery.dir_error {
        probes.push(Probe::unlistable(dir, reason));
    }
    let mut ticker = Ticker {
        progress,
        state: MigrateProgress {
            rows_done: 0,
            rows_total: probes.iter().filter_map(|p| p.opened.as_ref().ok()).map(|o| o.queue_rows).sum(),
        },
    };
    let report = if options.dry_run {
        run_dry(home, probes, &discovery, &mut ticker)?
    } else {
        run_real(home, probes, &discovery, &mut ticker, options.lock_wait)?
    };
    (ticker.progress)(ticker.state);
    Ok(report)
}

struct Probe {
    file: SourceFile,
    opened: std::result::Result<OpenSource, String>,
    report: SourceReport,
}

impl Probe {
    /// `queues/` could not be listed: reported like a source that cannot be read.
    fn unlistable(dir: &std::path::Path, reason: &str) -> Probe {
        let file = SourceFile { path: dir.to_path_buf(), relative: source::QUEUES_DIR.to_string(), digest: None };
        let report = SourceReport::blank(&file, ScopeStatus::Unknown, String::new());
        Probe { file, opened: Err(reason.to_string()), report }
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
    ticker: &mut Ticker<'_>,
    lock_wait: std::time::Duration,
) -> Result<MigrationReport> {
    let readable = probes.iter().any(|p| p.opened.is_ok());
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
    let mut reports = Vec::with_capacity(probes.len());
    for probe in probes {
        let Probe { file, opened, mut report } = probe;
        let opened = match opened {
            Ok(opened) => opened,
            Err(reason) => {
                reports.push(report.failed(reason));
                continue;
            }
        };
        report.body_upload_rows = opened.body_upload_rows();
        let Some(store) = store.as_mut() else {
            return Err(Error::internal("the store was not opened", "run the command again"));
        };
        let tx = begin(store)?;
        let mut sink = TxSink { tx: &tx, now, imported_lamport: None };
        match import_source(&mut sink, opened, &mut report, ticker) {
            Ok(()) => {
                let imported_lamport = sink.imported_lamport;
                finish_source(&tx, &file, &report, now, imported_lamport)?;
                tx.commit().ctx("cannot commit the migrated source")?;
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
    Ok(MigrationReport::finish(false, reports, discovery, unresolved))
}

fn run_dry(home: &Home, probes: Vec<Probe>, discovery: &Discovery, ticker: &mut Ticker<'_>) -> Result<MigrationReport> {
    let store = Store::open_read_only(home)?;
    let unresolved = match &store {
        Some(store) => unresolved_conflicts(store)?,
        None => 0,
    };
    let mut sink = DrySink { store: store.as_ref(), ..DrySink::default() };
    let mut reports = Vec::with_capacity(probes.len());
    for probe in probes {
        let Probe { opened, mut report, .. } = probe;
        let opened = match opened {
            Ok(opened) => opened,
            Err(reason) => {
                reports.push(report.failed(reason));
                continue;
            }
        };
        report.body_upload_rows = opened.body_upload_rows();
        sink.begin_source();
        match import_source(&mut sink, opened, &mut report, ticker) {
            Ok(()) => {}
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
    Ok(MigrationReport::finish(true, reports, discovery, unresolved))
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
) -> Result<()> {
    // Like a JSON Lines import: the home's Lamport clock moves past every imported event's.
    if let Some(ImportedLamport(seen)) = imported_lamport {
        tick_lamport(tx, seen)?;
    }
    tx.prepare_cached(
        "INSERT INTO migrated_sources (path, digest, migrated_at, rows_read) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(path) DO UPDATE SET digest = excluded.digest, migrated_at = excluded.migrated_at,
                                         rows_read = excluded.rows_read",
    )
    .and_then(|mut s| s.execute(params![file.relative, file.digest_key(), now, report.rows_read as i64]))
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
}

/// Imports one source. Two threads: one reads the source and does the CPU work (JSON parse,
/// canonical form, SHA-256), the caller's thread writes; on two cores they overlap.
fn import_source(
    sink: &mut dyn Sink,
    opened: OpenSource,
    report: &mut SourceReport,
    ticker: &mut Ticker<'_>,
) -> std::result::Result<(), ReadStop<Error>> {
    let (sender, receiver) = std::sync::mpsc::sync_channel::<Vec<Item>>(BATCHES_IN_FLIGHT);
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || read_source(&opened, &sender));
        let written = write_items(sink, &receiver, report, ticker);
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

/// Reads and validates every row. `Err` is the reason the source cannot be read.
fn read_source(opened: &OpenSource, out: &std::sync::mpsc::SyncSender<Vec<Item>>) -> std::result::Result<(), String> {
    let mut batch = Vec::with_capacity(BATCH_ROWS);
    let mut bytes = 0;
    let mut scratch = Vec::new();
    let result = source::for_each_row(opened, |raw| {
        bytes += raw.data.map_or(0, <[u8]>::len);
        batch.push(match prepare(raw, &mut scratch) {
            Ok(row) => Item::Row(row),
            Err(reason) => {
                Item::Invalid(InvalidRow { row_id: raw.id, event_id: raw.event_id.map(str::to_string), reason })
            }
        });
        if batch.len() >= BATCH_ROWS || bytes >= BATCH_BYTES {
            bytes = 0;
            out.send(std::mem::replace(&mut batch, Vec::with_capacity(BATCH_ROWS))).map_err(|_| Closed)?;
        }
        Ok(())
    });
    match result {
        Ok(()) => {
            // A closed channel here means the writer failed; it reports that itself.
            let _ = out.send(batch);
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
    ticker: &mut Ticker<'_>,
) -> Result<()> {
    let source_name = report.source.clone();
    let source_path = report.path.clone();
    for batch in batches {
        for item in batch {
            report.rows_read += 1;
            ticker.row();
            match item {
                Item::Invalid(row) => report.invalid_row(row),
                Item::Row(row) => apply(sink, &row.incoming(&source_name, &source_path), report)?,
            }
        }
    }
    Ok(())
}

fn apply(sink: &mut dyn Sink, incoming: &Incoming<'_>, report: &mut SourceReport) -> Result<()> {
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
    let (facts, canonical_sha256) = parse_envelope(data, event_id, scratch)?;
    // `event_type` as stored in its column; the envelope's only if the column is blank.
    let event_type = match (raw.event_type.filter(|t| !t.trim().is_empty()), facts.event_type) {
        (Some(column), _) => column.to_string(),
        (None, Some(envelope)) => envelope,
        (None, None) => return Err("no event_type".to_string()),
    };
    Ok(Prepared {
        event_id: event_id.to_string(),
        event_type,
        bytes: data.to_vec(),
        canonical_sha256,
        coalesce_key: raw.coalesce_key.map(str::to_string),
        captured_at: captured_at(raw.timestamp),
        team: facts.team,
        lamport: facts.lamport,
    })
}

/// What the migration reads from an envelope besides its bytes.
#[derive(Debug)]
struct Facts {
    event_type: Option<String>,
    team: Option<String>,
    lamport: Option<i64>,
}

/// Checks the envelope is an object carrying the row's event id, and reads its facts.
fn facts(envelope: &Json<'_>, event_id: &str) -> std::result::Result<Facts, String> {
    let object = envelope.as_object().ok_or("data is not a JSON object")?;
    match object.get("event_id") {
        Some(Json::String(inner)) if inner == event_id => {}
        Some(other) => {
            return Err(format!(
                "the envelope's event_id {} differs from the row's {event_id}",
                other.to_canonical_string()
            ));
        }
        None => return Err("the envelope has no event_id".to_string()),
    }
    Ok(Facts {
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
    event_id: &str,
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
            blocked_reason: None,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_the_canonical_json_hash() {
        let data = br#"{"event_id": "01KJP325TDMTQC21WEN42FYF3K", "b": [1, 2.5, -3, 1e300], "a": {"z": "caf\u00e9 \ud83d\ude00", "y": null}, "c": "\"\\\n"}"#;
        let (_, sha) = parse_envelope(data, "01KJP325TDMTQC21WEN42FYF3K", &mut Vec::new()).unwrap();
        let expected: [u8; 32] = Sha256::digest(canonical_bytes(data)).into();
        assert_eq!(sha, expected);
    }

    #[test]
    fn lone_surrogates_are_an_event_whose_canonical_form_is_its_bytes() {
        let data = br#"{"event_id": "01KJP325TDMTQC21WEN42FYF3K", "path": "caf\udce9.md", "ok": "\ud83d\ude00", "lit": "\\udce9"}"#;
        assert!(serde_json::from_slice::<Value>(data).is_err(), "serde_json cannot decode it");
        let (_, sha) = parse_envelope(data, "01KJP325TDMTQC21WEN42FYF3K", &mut Vec::new()).unwrap();
        let copy = replace_surrogate_escapes(data).unwrap();
        let value: Value = serde_json::from_slice(&copy).unwrap();
        assert_eq!(value["lit"], "\\udce9", "an escaped backslash is not an escape");
        assert_eq!(value["path"], "caf\u{fffd}.md");
        let expected: [u8; 32] = Sha256::digest(canonical_bytes(data)).into();
        assert_eq!(sha, expected, "agrees with canonical_bytes of the stored bytes");
        assert!(parse_envelope(b"{\"v\": NaN}", "x", &mut Vec::new()).unwrap_err().contains("not valid JSON"));
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
