//! spec-kitty-cli 3.2.4–3.2.7's Python stores (contract §12), read-only like the legacy queues
//! (same `immutable` opens and private recovery copies, see `source`):
//!
//! - 3.2.4+ `event_journal/journal-<token>.db`: table `event_journal` (`event_id` key, `payload`
//!   = the envelope bytes, `created_at`, `coalesce_key`);
//! - 3.2.4+ `delivery/ledger.db` (`delivery_ledger`: event × Python target state) with
//!   `delivery/targets.db` (`delivery_targets`: the identity behind each Python target id);
//! - 3.2.7 `projects/<uuid>/sync/sync.db`: `journal_entries` (`payload_json.payload` = base64 of
//!   the envelope bytes), `consent_epochs` (only `eligible` epochs were ever sent by Python),
//!   and delivery state in `delivery_attempts` + `delivery_results`, each attempt carrying its
//!   target's identity.
//!
//! Columns are looked up by name and optional ones may be missing, so later versions that
//! add columns still read. Nothing here decides dedupe, conflicts or ledger merging: rows go
//! to the one migration pipeline in `migrate`.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use rusqlite::Connection;
use rusqlite::types::ValueRef;
use serde_json::Value;

use super::source::{self, ReadStop, SourceFile, SourceKind, TempCopy, column_names, describe, table_names};
use crate::delivery::target::{TargetIdentity, TargetKind};
use crate::target_url::canonicalize;

pub const JOURNAL_DIR: &str = "event_journal";
pub const DELIVERY_DIR: &str = "delivery";
pub const PROJECTS_DIR: &str = "projects";
const LEDGER_DB: &str = "ledger.db";
const TARGETS_DB: &str = "targets.db";
const PROJECT_DB: &str = "sync/sync.db";

/// The reason kitty-sync holds an event Python captured before its project opted in.
pub const NOT_CONSENTED: &str = "not_consented";

/// Journals by file name, then project stores by uuid, then the 3.2.4 ledger (its rows refer
/// to events the journals hold, so those must be imported first).
pub(crate) fn discover(root: &Path) -> Vec<SourceFile> {
    let mut found = Vec::new();
    let mut journals: Vec<String> = list_names(&root.join(JOURNAL_DIR))
        .into_iter()
        .filter(|n| n.starts_with("journal-") && n.ends_with(".db") && n.len() > "journal-.db".len())
        .collect();
    journals.sort();
    for name in journals {
        found.push(python_file(root, format!("{JOURNAL_DIR}/{name}"), None, SourceKind::Journal));
    }
    let mut projects: Vec<String> = list_names(&root.join(PROJECTS_DIR))
        .into_iter()
        .filter(|n| {
            !n.starts_with('.') && fs::symlink_metadata(root.join(PROJECTS_DIR).join(n).join(PROJECT_DB)).is_ok()
        })
        .collect();
    projects.sort();
    for uuid in projects {
        let relative = format!("{PROJECTS_DIR}/{uuid}/{PROJECT_DB}");
        found.push(python_file(root, relative, Some(uuid), SourceKind::ProjectStore));
    }
    if fs::symlink_metadata(root.join(DELIVERY_DIR).join(LEDGER_DB)).is_ok() {
        found.push(python_file(root, format!("{DELIVERY_DIR}/{LEDGER_DB}"), None, SourceKind::Ledger));
    }
    found
}

fn python_file(root: &Path, relative: String, digest: Option<String>, kind: SourceKind) -> SourceFile {
    SourceFile { path: root.join(&relative), relative, digest, kind }
}

fn list_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    entries.filter_map(|e| e.ok()).filter_map(|e| e.file_name().to_str().map(str::to_string)).collect()
}

/// Size and modification time of every file the source is read from (with SQLite sidecars).
/// The sources are opened `immutable`, so only a writer (the Python CLI) changes it.
pub(crate) fn fingerprint(file: &SourceFile) -> String {
    let mut paths = vec![file.path.clone()];
    if file.kind == SourceKind::Ledger {
        paths.push(targets_path(&file.path));
    }
    let mut out = String::new();
    for path in paths {
        for suffix in ["", "-wal", "-journal"] {
            let p = source::sidecar(&path, suffix);
            if let Ok(meta) = fs::metadata(&p) {
                let modified = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                out.push_str(&format!("{suffix}:{}:{modified};", meta.len()));
            } else {
                out.push_str(&format!("{suffix}:-;"));
            }
        }
    }
    out
}

fn targets_path(ledger: &Path) -> PathBuf {
    ledger.with_file_name(TARGETS_DB)
}

/// An open, validated Python store.
pub(crate) struct PythonSource {
    conn: Connection,
    _copy: Option<TempCopy>,
    kind: SourceKind,
    /// Event rows (journal rows / journal entries).
    pub event_rows: u64,
    /// Ledger rows (3.2.4 ledger rows / 3.2.7 delivery attempts).
    pub ledger_rows: u64,
    /// Every Python target this source names, as kitty-sync identities.
    pub targets: Vec<TargetIdentity>,
    /// 3.2.4: Python target id → index in `targets`.
    target_ids: HashMap<String, usize>,
    /// 3.2.7: (origin, team, account) → index in `targets`; the admitted target, if any.
    target_keys: HashMap<(String, String, String), usize>,
    admitted: Option<usize>,
    /// SELECT list per table, with NULL for columns this version does not have.
    columns: HashMap<&'static str, String>,
}

/// One journal row as Python stored it.
pub(crate) struct RawEvent {
    /// The row's key (`event_id` / `entry_id`), which the envelope's id may contradict.
    pub row_key: Option<String>,
    pub row_id: i64,
    pub event_type: Option<String>,
    /// The envelope bytes Python stored (3.2.7: after base64 decoding), or why there are none.
    pub bytes: Result<Vec<u8>, String>,
    /// Capture time in epoch milliseconds.
    pub created_at: Option<i64>,
    pub coalesce_key: Option<String>,
    /// Captured in a 3.2.7 consent epoch that was never `eligible`: Python never sent it.
    pub not_consented: bool,
}

/// One (event, Python target) delivery state.
pub(crate) struct LedgerRow {
    /// The event as Python keyed it (a journal row key).
    pub event_key: String,
    /// Index into [`PythonSource::targets`].
    pub target: usize,
    /// kitty-sync's status for Python's state; `None` = still due (no terminal meaning).
    pub status: Option<&'static str>,
    pub attempt_count: i64,
    pub http_status: Option<i64>,
    pub error: Option<String>,
    pub first_at: Option<i64>,
    pub last_at: Option<i64>,
}

pub(crate) enum PyRow {
    Event(RawEvent),
    Ledger(LedgerRow),
    /// A ledger row naming a target or event the source does not identify.
    Unmatched,
}

/// Opens and validates a Python store; the error is the reason it cannot be imported.
pub(crate) fn open(file: &SourceFile) -> Result<PythonSource, String> {
    let (conn, copy) = source::open_db(&file.path)?;
    integrity(&conn)?;
    let mut src = PythonSource {
        conn,
        _copy: copy,
        kind: file.kind,
        event_rows: 0,
        ledger_rows: 0,
        targets: Vec::new(),
        target_ids: HashMap::new(),
        target_keys: HashMap::new(),
        admitted: None,
        columns: HashMap::new(),
    };
    match file.kind {
        SourceKind::Journal => probe_journal(&mut src)?,
        SourceKind::ProjectStore => probe_project(&mut src)?,
        SourceKind::Ledger => probe_ledger(&mut src, &targets_path(&file.path))?,
        SourceKind::LegacyQueue => return Err("not a Python store".to_string()),
    }
    Ok(src)
}

/// A damaged page may sit where a table scan never looks (an index); SQLite's own check
/// finds it before anything is imported.
fn integrity(conn: &Connection) -> Result<(), String> {
    let verdict: String = conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0)).map_err(|e| describe(&e))?;
    if verdict != "ok" {
        return Err(format!("damaged database (integrity check: {verdict})"));
    }
    Ok(())
}

fn count(conn: &Connection, table: &str) -> Result<u64, String> {
    conn.query_row(&format!("SELECT count(*) FROM \"{table}\""), [], |r| r.get::<_, i64>(0))
        .map(|n| n.max(0) as u64)
        .map_err(|e| describe(&e))
}

/// The SELECT list for `wanted` columns of `table`: each present column quoted, NULL for the
/// optional ones this version lacks. A missing required column is the source's error.
fn select_list(conn: &Connection, table: &str, required: &[&str], optional: &[&str]) -> Result<String, String> {
    let tables = table_names(conn).map_err(|e| describe(&e))?;
    if !tables.iter().any(|t| t == table) {
        return Err(format!("no `{table}` table: not the expected spec-kitty store"));
    }
    let have = column_names(conn, table).map_err(|e| describe(&e))?;
    let missing: Vec<&str> = required.iter().copied().filter(|c| !have.iter().any(|h| h == c)).collect();
    if !missing.is_empty() {
        return Err(format!("the `{table}` table has no {} column", missing.join(", ")));
    }
    let list: Vec<String> = required
        .iter()
        .chain(optional)
        .map(|c| if have.iter().any(|h| h == c) { format!("\"{c}\" AS \"{c}\"") } else { format!("NULL AS \"{c}\"") })
        .collect();
    Ok(list.join(", "))
}

const JOURNAL_REQUIRED: &[&str] = &["event_id", "payload"];
const JOURNAL_OPTIONAL: &[&str] = &["event_type", "created_at", "coalesce_key"];

fn probe_journal(src: &mut PythonSource) -> Result<(), String> {
    let list = select_list(&src.conn, "event_journal", JOURNAL_REQUIRED, JOURNAL_OPTIONAL)?;
    src.columns.insert("event_journal", list);
    src.event_rows = count(&src.conn, "event_journal")?;
    Ok(())
}

const ENTRIES_REQUIRED: &[&str] = &["entry_id", "payload_json"];
const ENTRIES_OPTIONAL: &[&str] = &["epoch_id", "capture_sequence", "created_at"];
const ATTEMPTS_REQUIRED: &[&str] = &["attempt_id", "payload_reference", "state"];
const ATTEMPTS_OPTIONAL: &[&str] = &["created_at"];

fn probe_project(src: &mut PythonSource) -> Result<(), String> {
    let entries = select_list(&src.conn, "journal_entries", ENTRIES_REQUIRED, ENTRIES_OPTIONAL)?;
    src.columns.insert("journal_entries", entries);
    src.event_rows = count(&src.conn, "journal_entries")?;
    let tables = table_names(&src.conn).map_err(|e| describe(&e))?;
    let has = |t: &str| tables.iter().any(|have| have == t);
    if has("consent_epochs") {
        select_list(&src.conn, "consent_epochs", &["epoch_id", "state"], &[])?;
    }
    if has("project_target_admissions") {
        let list = select_list(
            &src.conn,
            "project_target_admissions",
            &["target_identity", "account_identity", "private_teamspace_id"],
            &[],
        )?;
        let admitted: Option<(String, String, String)> = src
            .conn
            .query_row(&format!("SELECT {list} FROM project_target_admissions LIMIT 1"), [], |r| {
                Ok((r.get(0)?, r.get(2)?, r.get(1)?))
            })
            .map(Some)
            .or_else(|e| if e == rusqlite::Error::QueryReturnedNoRows { Ok(None) } else { Err(e) })
            .map_err(|e| describe(&e))?;
        if let Some(key) = admitted {
            src.admitted = Some(src.target_index(key));
        }
    }
    if has("delivery_attempts") {
        let list = select_list(&src.conn, "delivery_attempts", ATTEMPTS_REQUIRED, ATTEMPTS_OPTIONAL)?;
        src.columns.insert("delivery_attempts", list);
        src.ledger_rows = count(&src.conn, "delivery_attempts")?;
        let keys: Vec<(String, String, String)> = {
            let mut stmt = src
                .conn
                .prepare(&format!("SELECT DISTINCT {ATTEMPT_TARGET_SQL} FROM delivery_attempts"))
                .map_err(|e| describe(&e))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, Option<String>>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, Option<String>>(2)?))
                })
                .map_err(|e| describe(&e))?;
            rows.filter_map(|r| match r {
                Ok((Some(url), team, account)) => {
                    Some(Ok((url, team.unwrap_or_default(), account.unwrap_or_default())))
                }
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<rusqlite::Result<_>>()
            .map_err(|e| describe(&e))?
        };
        for key in keys {
            src.target_index(key);
        }
    }
    Ok(())
}

/// The target identity each 3.2.7 attempt records in its `payload_reference` JSON.
const ATTEMPT_TARGET_SQL: &str = "
    CASE WHEN json_valid(payload_reference) THEN json_extract(payload_reference, '$.target_identity') END,
    CASE WHEN json_valid(payload_reference) THEN json_extract(payload_reference, '$.private_teamspace_id') END,
    CASE WHEN json_valid(payload_reference) THEN json_extract(payload_reference, '$.account_identity') END";

const LEDGER_REQUIRED: &[&str] = &["event_id", "target_id", "status"];
const LEDGER_OPTIONAL: &[&str] =
    &["attempt_count", "last_http_status", "last_error", "first_attempted_at", "last_attempted_at"];

fn probe_ledger(src: &mut PythonSource, targets_db: &Path) -> Result<(), String> {
    let list = select_list(&src.conn, "delivery_ledger", LEDGER_REQUIRED, LEDGER_OPTIONAL)?;
    src.columns.insert("delivery_ledger", list);
    src.ledger_rows = count(&src.conn, "delivery_ledger")?;
    let (targets, _copy) = source::open_db(targets_db).map_err(|e| format!("delivery/{TARGETS_DB}: {e}"))?;
    integrity(&targets).map_err(|e| format!("delivery/{TARGETS_DB}: {e}"))?;
    let list =
        select_list(&targets, "delivery_targets", &["target_id", "canonical_url", "team_slug", "user_email"], &[])
            .map_err(|e| format!("delivery/{TARGETS_DB}: {e}"))?;
    let mut stmt =
        targets.prepare(&format!("SELECT {list} FROM delivery_targets ORDER BY rowid")).map_err(|e| describe(&e))?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                r.get::<_, Option<String>>(3)?.unwrap_or_default(),
            ))
        })
        .map_err(|e| describe(&e))?;
    for row in rows {
        let (id, url, team, user) = row.map_err(|e| describe(&e))?;
        let index = src.target_index((url, team, user));
        src.target_ids.insert(id, index);
    }
    Ok(())
}

impl PythonSource {
    /// The index of a Python-recorded (server URL, team, user) identity, added on first sight.
    fn target_index(&mut self, key: (String, String, String)) -> usize {
        if let Some(i) = self.target_keys.get(&key) {
            return *i;
        }
        let (url, team, user) = &key;
        // Python recorded the resolved Teamspace server; kitty-sync's Teamspace target for the
        // same server has the same canonical form (a URL it cannot parse is kept as recorded).
        let canonical =
            canonicalize(url).map(|u| u.canonical).unwrap_or_else(|_| url.trim_end_matches('/').to_string());
        self.targets.push(TargetIdentity {
            kind: TargetKind::Teamspace,
            canonical_url: canonical,
            team_slug: team.trim().to_string(),
            user_email: user.trim().to_string(),
        });
        let index = self.targets.len() - 1;
        self.target_keys.insert(key, index);
        index
    }
}

/// Calls `f` for every row: events in capture order, then ledger rows (by event).
pub(crate) fn read<E>(src: &PythonSource, mut f: impl FnMut(PyRow) -> Result<(), E>) -> Result<(), ReadStop<E>> {
    match src.kind {
        SourceKind::Journal => read_journal(src, &mut f),
        SourceKind::ProjectStore => {
            read_entries(src, &mut f)?;
            read_attempts(src, &mut f)
        }
        SourceKind::Ledger => read_ledger(src, &mut f),
        SourceKind::LegacyQueue => Ok(()),
    }
}

fn source_err<E>(e: rusqlite::Error) -> ReadStop<E> {
    ReadStop::Source(describe(&e))
}

fn text(v: ValueRef<'_>) -> Option<String> {
    match v {
        ValueRef::Text(t) => std::str::from_utf8(t).ok().map(str::to_string),
        _ => None,
    }
}

fn int(v: ValueRef<'_>) -> Option<i64> {
    match v {
        ValueRef::Integer(i) => Some(i),
        ValueRef::Text(t) => std::str::from_utf8(t).ok().and_then(|s| s.trim().parse().ok()),
        _ => None,
    }
}

/// Python's ISO timestamps (`2026-11-29T18:03:30.584919+00:00`) in epoch milliseconds.
fn time_ms(v: Option<&str>) -> Option<i64> {
    v.and_then(crate::clock::parse_rfc3339).map(|t| t.as_millisecond())
}

fn read_journal<E>(src: &PythonSource, f: &mut impl FnMut(PyRow) -> Result<(), E>) -> Result<(), ReadStop<E>> {
    let list = src.columns.get("event_journal").cloned().unwrap_or_default();
    // Insertion order is capture order (3.2.4 appends; coalescing rewrites a row in place), and
    // walking the table in it needs no sort of every payload.
    let sql = format!("SELECT rowid, {list} FROM event_journal ORDER BY rowid");
    let mut stmt = src.conn.prepare(&sql).map_err(source_err)?;
    let mut rows = stmt.query([]).map_err(source_err)?;
    while let Some(row) = rows.next().map_err(source_err)? {
        let bytes = match row.get_ref(2).map_err(source_err)? {
            ValueRef::Text(b) | ValueRef::Blob(b) => Ok(b.to_vec()),
            _ => Err("the payload column is NULL or not text".to_string()),
        };
        let created = text(row.get_ref(4).map_err(source_err)?);
        let event = RawEvent {
            row_key: text(row.get_ref(1).map_err(source_err)?),
            row_id: int(row.get_ref(0).map_err(source_err)?).unwrap_or_default(),
            event_type: text(row.get_ref(3).map_err(source_err)?),
            bytes,
            created_at: time_ms(created.as_deref()),
            coalesce_key: text(row.get_ref(5).map_err(source_err)?),
            not_consented: false,
        };
        f(PyRow::Event(event)).map_err(ReadStop::Consumer)?;
    }
    Ok(())
}

fn read_entries<E>(src: &PythonSource, f: &mut impl FnMut(PyRow) -> Result<(), E>) -> Result<(), ReadStop<E>> {
    let list = src.columns.get("journal_entries").cloned().unwrap_or_default();
    let have = column_names(&src.conn, "journal_entries").map_err(source_err)?;
    let has = |c: &str| have.iter().any(|h| h == c);
    let tables = table_names(&src.conn).map_err(source_err)?;
    // Only an `eligible` epoch was ever selected by Python's `sync now`; everything else
    // (capture_only, sealed before consent, unknown) stays on this machine until released.
    let eligible = if tables.iter().any(|t| t == "consent_epochs") && has("epoch_id") {
        "EXISTS (SELECT 1 FROM consent_epochs c WHERE c.epoch_id = j.epoch_id AND c.state = 'eligible')"
    } else {
        "0"
    };
    // Capture order, along the (project_uuid, capture_sequence) index: no sort of the payloads.
    let order =
        if has("project_uuid") && has("capture_sequence") { "j.project_uuid, j.capture_sequence" } else { "j.rowid" };
    let sql = format!("SELECT j.rowid, {list}, {eligible} FROM journal_entries AS j ORDER BY {order}");
    let mut stmt = src.conn.prepare(&sql).map_err(source_err)?;
    let mut rows = stmt.query([]).map_err(source_err)?;
    while let Some(row) = rows.next().map_err(source_err)? {
        let row_key = text(row.get_ref(1).map_err(source_err)?);
        let document = match row.get_ref(2).map_err(source_err)? {
            ValueRef::Text(b) | ValueRef::Blob(b) => Some(b),
            _ => None,
        };
        let entry = document.map(entry_facts).unwrap_or_else(|| EntryFacts::invalid("payload_json is NULL"));
        let column_created = text(row.get_ref(5).map_err(source_err)?);
        let event = RawEvent {
            row_key,
            row_id: int(row.get_ref(0).map_err(source_err)?).unwrap_or_default(),
            event_type: entry.event_type,
            bytes: entry.bytes,
            created_at: time_ms(entry.created_at.as_deref().or(column_created.as_deref())),
            coalesce_key: entry.coalesce_key,
            not_consented: int(row.get_ref(6).map_err(source_err)?) != Some(1),
        };
        f(PyRow::Event(event)).map_err(ReadStop::Consumer)?;
    }
    Ok(())
}

struct EntryFacts {
    bytes: Result<Vec<u8>, String>,
    event_type: Option<String>,
    created_at: Option<String>,
    coalesce_key: Option<String>,
}

impl EntryFacts {
    fn invalid(why: &str) -> EntryFacts {
        EntryFacts { bytes: Err(why.to_string()), event_type: None, created_at: None, coalesce_key: None }
    }
}

/// A 3.2.7 `payload_json` document: the envelope bytes are base64 in its `payload`.
fn entry_facts(document: &[u8]) -> EntryFacts {
    let Ok(Value::Object(doc)) = serde_json::from_slice::<Value>(document) else {
        return EntryFacts::invalid("payload_json is not a JSON object");
    };
    let field = |k: &str| doc.get(k).and_then(Value::as_str).map(str::to_string);
    let bytes = match doc.get("payload").and_then(Value::as_str) {
        Some(b64) => base64_decode(b64).ok_or_else(|| "payload_json.payload is not base64".to_string()),
        None => Err("payload_json has no payload".to_string()),
    };
    EntryFacts {
        bytes,
        event_type: field("event_type"),
        created_at: field("created_at"),
        coalesce_key: field("coalesce_key"),
    }
}

/// Standard base64 (padding optional, whitespace ignored).
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in text.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' | b'\n' | b'\r' | b' ' => continue,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn read_attempts<E>(src: &PythonSource, f: &mut impl FnMut(PyRow) -> Result<(), E>) -> Result<(), ReadStop<E>> {
    let Some(list) = src.columns.get("delivery_attempts") else { return Ok(()) };
    let tables = table_names(&src.conn).map_err(source_err)?;
    // The latest result per attempt, joined (results have no index on attempt_id: a
    // correlated lookup per attempt would scan them all each time).
    let results = if tables.iter().any(|t| t == "delivery_results") {
        "SELECT attempt_id, outcome, max(recorded_at) FROM delivery_results GROUP BY attempt_id"
    } else {
        "SELECT NULL AS attempt_id, NULL AS outcome WHERE 0"
    };
    let sql = format!(
        "SELECT {ATTEMPT_TARGET_SQL},
            CASE WHEN json_valid(payload_reference) THEN coalesce(
                CASE WHEN json_valid(json_extract(payload_reference, '$.payload_reference'))
                     THEN json_extract(json_extract(payload_reference, '$.payload_reference'), '$.event_id') END,
                json_extract(payload_reference, '$.native_identity')) END,
            a.state, r.outcome, a.created_at
         FROM (SELECT {list} FROM delivery_attempts) AS a LEFT JOIN ({results}) AS r ON r.attempt_id = a.attempt_id
         ORDER BY a.created_at, a.attempt_id"
    );
    let mut stmt = src.conn.prepare(&sql).map_err(source_err)?;
    let mut rows = stmt.query([]).map_err(source_err)?;
    while let Some(row) = rows.next().map_err(source_err)? {
        let get = |i: usize| row.get_ref(i).map(text).map_err(source_err::<E>);
        let (url, team, account) = (get(0)?, get(1)?, get(2)?);
        let target = match url {
            Some(url) => src.target_keys.get(&(url, team.unwrap_or_default(), account.unwrap_or_default())).copied(),
            None => src.admitted,
        };
        let (Some(target), Some(event_key)) = (target, get(3)?) else {
            f(PyRow::Unmatched).map_err(ReadStop::Consumer)?;
            continue;
        };
        let state = get(4)?.unwrap_or_default();
        let outcome = get(5)?;
        let at = time_ms(get(6)?.as_deref());
        let status = project_status(outcome.as_deref(), &state);
        let ledger = LedgerRow {
            event_key,
            target,
            status,
            attempt_count: 1,
            http_status: None,
            error: status
                .filter(|s| *s == "terminal_failed")
                .map(|_| format!("spec-kitty 3.2.7: {}", outcome.unwrap_or(state))),
            first_at: at,
            last_at: at,
        };
        f(PyRow::Ledger(ledger)).map_err(ReadStop::Consumer)?;
    }
    Ok(())
}

/// 3.2.7 results as its own ledger view maps them: delivered/duplicate are terminal success,
/// refused is parked; `unknown` (a 503 that may have stored), pending, retryable and anything
/// unrecognised stay due.
fn project_status(outcome: Option<&str>, attempt_state: &str) -> Option<&'static str> {
    match outcome.unwrap_or(attempt_state) {
        "delivered" | "succeeded" | "success" => Some("success"),
        "duplicate" => Some("duplicate"),
        "refused" | "terminal_unknown" | "terminal_failed" => Some("terminal_failed"),
        _ => None,
    }
}

/// 3.2.4 ledger statuses: success/duplicate terminal, terminal_failed parked, rejected with its
/// count; pending, failed_transient and anything else due.
fn ledger_status(status: &str) -> Option<&'static str> {
    match status {
        "success" => Some("success"),
        "duplicate" => Some("duplicate"),
        "terminal_failed" => Some("terminal_failed"),
        "rejected" => Some("rejected"),
        _ => None,
    }
}

fn read_ledger<E>(src: &PythonSource, f: &mut impl FnMut(PyRow) -> Result<(), E>) -> Result<(), ReadStop<E>> {
    let list = src.columns.get("delivery_ledger").cloned().unwrap_or_default();
    // By event, so the rows of one event (one per target) arrive together.
    let sql = format!("SELECT {list} FROM delivery_ledger ORDER BY event_id, target_id");
    let mut stmt = src.conn.prepare(&sql).map_err(source_err)?;
    let mut rows = stmt.query([]).map_err(source_err)?;
    while let Some(row) = rows.next().map_err(source_err)? {
        let get = |i: usize| row.get_ref(i).map(text).map_err(source_err::<E>);
        let target = get(1)?.and_then(|id| src.target_ids.get(&id).copied());
        let (Some(event_key), Some(target)) = (get(0)?, target) else {
            f(PyRow::Unmatched).map_err(ReadStop::Consumer)?;
            continue;
        };
        let status = ledger_status(&get(2)?.unwrap_or_default());
        let ledger = LedgerRow {
            event_key,
            target,
            status,
            attempt_count: int(row.get_ref(3).map_err(source_err)?).unwrap_or(1).max(1),
            http_status: int(row.get_ref(4).map_err(source_err)?),
            error: get(5)?,
            first_at: time_ms(get(6)?.as_deref()),
            last_at: time_ms(get(7)?.as_deref()),
        };
        f(PyRow::Ledger(ledger)).map_err(ReadStop::Consumer)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_python_output() {
        assert_eq!(base64_decode("eyJhIjoxfQ==").unwrap(), br#"{"a":1}"#);
        assert_eq!(base64_decode("eyJhIjoxfQ").unwrap(), br#"{"a":1}"#);
        assert!(base64_decode("e*").is_none());
    }

    #[test]
    fn python_states_map_to_the_contract() {
        assert_eq!(project_status(Some("delivered"), "succeeded"), Some("success"));
        assert_eq!(project_status(Some("unknown"), "unknown"), None);
        assert_eq!(project_status(Some("retryable_no_effect"), "x"), None);
        assert_eq!(project_status(Some("refused"), "refused"), Some("terminal_failed"));
        assert_eq!(project_status(None, "succeeded"), Some("success"));
        assert_eq!(ledger_status("failed_transient"), None);
        assert_eq!(ledger_status("rejected"), Some("rejected"));
    }
}
