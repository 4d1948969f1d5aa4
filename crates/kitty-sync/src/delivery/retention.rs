//! Retention: `archive` writes fully delivered events to a gzip JSON Lines file and marks
//! them archived; `gc` removes payload bytes of events every known target has (or that were
//! archived), keeping id, type, capture time, hash, size and all delivery history.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, TransactionBehavior, params};
use serde::Serialize;

use crate::atomic_write::write_atomically_with;
use crate::delivery::lock::Change;
use crate::delivery::target::{self, TargetIdentity};
use crate::error::{Error, Result, StoreContext};
use crate::home::Home;
use crate::store::Store;

#[derive(Debug, Clone, Serialize)]
pub struct ArchiveReport {
    pub dry_run: bool,
    pub archived: u64,
    /// The archive file (none when nothing was archived).
    pub out: Option<String>,
    /// Size of the archive file.
    pub bytes: u64,
    /// Why nothing could be archived, when that is the case.
    #[serde(skip)]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub purged: u64,
    pub purged_bytes: u64,
    /// Retained events left after gc.
    pub kept: u64,
    pub store_bytes_before: u64,
    pub store_bytes_after: u64,
    #[serde(skip)]
    pub note: Option<String>,
}

/// A named target active now (contract §9), with its type filter (`None`: every type).
#[derive(Debug, Clone)]
pub struct ActiveNamed {
    pub identity: TargetIdentity,
    pub types: Option<Vec<String>>,
}

/// How many targets must have an event before archive or gc may touch it: `untyped` targets
/// take every event; a typed target needs only the events of its types, so each typed target
/// listing an event's type adds one for that event (`typed`: their type lists concatenated, a
/// JSON array, `None` when no target is typed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needed {
    pub untyped: i64,
    pub typed: Option<String>,
    /// Target by target, for when the per-event count of delivering targets cannot be trusted:
    /// a typed target holds deliveries outside its current filter (the filter was narrowed),
    /// which the count would take for deliveries to another target.
    pub exact: Option<String>,
}

impl Needed {
    fn is_nobody(&self) -> bool {
        self.untyped == 0 && self.typed.is_none()
    }

    /// "delivered to every target that wants it", for the row aliased `alias` (with the dot,
    /// or empty); `count` is the placeholder bound to `untyped`. The type list is inlined as a
    /// quoted literal (it comes from config, quotes doubled), so every statement keeps its
    /// parameters.
    fn delivered_sql(&self, alias: &str, count: &str) -> String {
        if let Some(exact) = &self.exact {
            // `count` stays bound (every statement keeps its parameters) but decides nothing.
            // Qualified: inside the ledger subquery a bare `seq` would be the ledger's own.
            let outer = if alias.is_empty() { "events." } else { alias };
            return format!("({count} >= 0 AND {})", exact.replace("{alias}", outer));
        }
        match &self.typed {
            None => format!("{alias}delivered_targets >= {count}"),
            Some(json) => format!(
                "{alias}delivered_targets >= {count} + (SELECT count(*) FROM json_each('{}') WHERE value = {alias}event_type)",
                json.replace('\'', "''")
            ),
        }
    }
}

/// The targets an event must have reached before archive or gc may touch it (contract §9):
/// every registered target (narrowed by the type filter it was last delivered with), the
/// configured current target (`current`) and the active named targets, also before their first
/// drain registers them. Returns them, and the note to give when an unregistered current
/// target makes nothing eligible.
fn known_targets(
    store: &Store,
    current: Option<&TargetIdentity>,
    named: &[ActiveNamed],
) -> Result<(Needed, Option<String>)> {
    let registered = target::list(store.conn())?;
    let stored = target::stored_types(store.conn())?;
    let mut filters: Vec<Option<Vec<String>>> = Vec::new();
    // Every target, for the exact rule.
    let mut each: Vec<TargetWant> = Vec::new();
    for record in &registered {
        // Active now: the configured filter rules; otherwise the one it was last delivered with.
        let types = match named.iter().find(|n| n.identity == record.identity) {
            Some(active) => active.types.clone(),
            None => stored.iter().find(|(id, _)| *id == record.id).and_then(|(_, t)| t.clone()),
        };
        each.push((Some((record.id, record.epoch)), types.clone()));
        filters.push(types);
    }
    for active in named {
        if !registered.iter().any(|r| r.identity == active.identity) {
            each.push((None, active.types.clone()));
            filters.push(active.types.clone());
        }
    }
    let mut note = None;
    if let Some(identity) = current
        && target::find(store.conn(), identity)?.is_none()
    {
        each.push((None, None));
        filters.push(None);
        note = Some(format!(
            "the current target {} has not received any event yet; run `kitty-sync now` first",
            identity.canonical_url
        ));
    }
    let untyped = filters.iter().filter(|f| f.is_none()).count() as i64;
    let typed: Vec<&String> = filters.iter().flatten().flatten().collect();
    let typed = if filters.iter().all(Option::is_none) {
        None
    } else {
        Some(
            serde_json::to_string(&typed)
                .map_err(|e| Error::internal(format!("cannot encode types: {e}"), "report this as a bug"))?,
        )
    };
    let exact = if delivered_outside_filters(store, &each)? { Some(exact_sql(&each)?) } else { None };
    Ok((Needed { untyped, typed, exact }, note))
}

/// A target as archive and gc see it: its ledger key (target row, epoch) once registered, and
/// its type filter (`None`: every type).
type TargetWant = (Option<(i64, i64)>, Option<Vec<String>>);

/// Whether some typed target holds a delivery of a type its filter no longer takes.
fn delivered_outside_filters(store: &Store, each: &[TargetWant]) -> Result<bool> {
    for (key, types) in each {
        let (Some((id, epoch)), Some(types)) = (key, types) else { continue };
        let outside: bool = store
            .conn()
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM ledger l JOIN events e ON e.seq = l.seq
                 WHERE l.target = ?1 AND l.epoch = ?2 AND l.status IN ('success', 'duplicate')
                   AND e.event_type NOT IN (SELECT value FROM json_each(?3)))",
                params![id, epoch, encode_types(types)?],
                |r| r.get(0),
            )
            .ctx("cannot read the ledger")?;
        if outside {
            return Ok(true);
        }
    }
    Ok(false)
}

/// "Every target that wants the event has it", one term per target (`{alias}` stands for the
/// event row's alias).
fn exact_sql(each: &[TargetWant]) -> Result<String> {
    let terms = each
        .iter()
        .map(|(key, types)| {
            let has = match key {
                Some((id, epoch)) => format!(
                    "EXISTS (SELECT 1 FROM ledger l WHERE l.target = {id} AND l.epoch = {epoch} \
                     AND l.seq = {{alias}}seq AND l.status IN ('success', 'duplicate'))"
                ),
                None => "0".to_string(),
            };
            Ok(match types {
                None => has,
                Some(types) => format!(
                    "({{alias}}event_type NOT IN (SELECT value FROM json_each('{}')) OR {has})",
                    encode_types(types)?.replace('\'', "''")
                ),
            })
        })
        .collect::<Result<Vec<String>>>()?;
    Ok(format!("({})", terms.join(" AND ")))
}

fn encode_types(types: &[String]) -> Result<String> {
    serde_json::to_string(types)
        .map_err(|e| Error::internal(format!("cannot encode types: {e}"), "report this as a bug"))
}

/// Checks the lock proof of a real run; returns whether this is a dry run.
fn applying(store: &Store, change: Change<'_>) -> Result<bool> {
    match change {
        Change::DryRun => Ok(true),
        Change::Apply(lock) => lock.guards(store).map(|()| false),
    }
}

const NO_TARGET_NOTE: &str =
    "no delivery target is known yet, so no event is delivered everywhere; run `kitty-sync now` first";

/// Events delivered to every known target (current epochs), retained, captured before `cutoff`.
fn archivable_sql(needed: &Needed) -> String {
    format!(
        "SELECT e.seq, p.envelope FROM events e JOIN payloads p ON p.seq = e.seq
    WHERE e.state = 0 AND {} AND e.captured_at < ?2 AND e.seq <= ?3 ORDER BY e.seq",
        needed.delivered_sql("e.", "?1")
    )
}

/// Archives retained events that every known target has (`current`: the configured target,
/// which counts as known even before its first drain). The file is complete and fsynced
/// before any event is marked archived; an existing file is never overwritten.
pub fn archive(
    store: &mut Store,
    home: &Home,
    out: Option<&Path>,
    captured_before_ms: Option<i64>,
    current: Option<&TargetIdentity>,
    named: &[ActiveNamed],
    change: Change<'_>,
) -> Result<ArchiveReport> {
    let dry_run = applying(store, change)?;
    let (needed, unregistered_note) = known_targets(store, current, named)?;
    let targets = needed.untyped;
    let mut report = ArchiveReport { dry_run, archived: 0, out: None, bytes: 0, note: None };
    if needed.is_nobody() {
        report.note = Some(NO_TARGET_NOTE.into());
        return Ok(report);
    }
    if let Some(note) = unregistered_note {
        report.note = Some(note);
        return Ok(report);
    }
    let cutoff = captured_before_ms.unwrap_or(i64::MAX);
    let max_seq: i64 = store
        .conn()
        .query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| r.get(0))
        .ctx("cannot read the journal")?;
    let (n, bytes): (i64, i64) = store
        .conn()
        .query_row(
            &format!(
                "SELECT count(*), coalesce(sum(payload_bytes + 1), 0) FROM events
             WHERE state = 0 AND {} AND captured_at < ?2 AND seq <= ?3",
                needed.delivered_sql("", "?1")
            ),
            params![targets, cutoff, max_seq],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .ctx("cannot read the journal")?;
    if n == 0 {
        report.note = Some(match captured_before_ms {
            Some(_) => "no retained event captured before the cutoff is delivered to every known target".into(),
            None => "no retained event is delivered to every known target yet".into(),
        });
        return Ok(report);
    }
    if dry_run {
        report.archived = n as u64;
        // No file is written: the uncompressed size of the JSON Lines is the estimate.
        report.bytes = bytes as u64;
        return Ok(report);
    }
    let path = match out {
        Some(p) => p.to_path_buf(),
        None => default_archive_path(home)?,
    };
    if path.exists() {
        return Err(Error::usage(
            format!("{} already exists; an archive never overwrites a file", path.display()),
            "choose another --out path (or move the existing file aside)",
        ));
    }
    let (written, last_seq) = write_archive(store, &path, &needed, cutoff, max_seq)?;
    if written == 0 {
        // Only our own new file can be here (an existing one was refused above).
        let _ = std::fs::remove_file(&path);
        report.note = Some("no retained event is delivered to every known target yet".into());
        return Ok(report);
    }
    let now = crate::clock::now_ms();
    let marked = store
        .conn()
        .execute(
            &format!(
                "UPDATE events SET state = 1, archived_at = ?4
             WHERE state = 0 AND {} AND captured_at < ?2 AND seq <= ?3",
                needed.delivered_sql("", "?1")
            ),
            params![targets, cutoff, last_seq, now],
        )
        .ctx("cannot mark events archived")?;
    report.archived = marked as u64;
    report.bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    report.out = Some(path.display().to_string());
    Ok(report)
}

fn default_archive_path(home: &Home) -> Result<PathBuf> {
    let dir = home.sync_dir().join("archive");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("cannot create directory", &dir, e))?;
    let stamp = jiff::Timestamp::now().strftime("%Y%m%dT%H%M%S%.3fZ").to_string();
    Ok(dir.join(format!("archive-{stamp}.jsonl.gz")))
}

/// Streams the archivable envelopes to `path`, through the one atomic-write path (a temp
/// file, owner-only, fsynced, renamed; symlinks written through, non-regular files refused).
fn write_archive(store: &Store, path: &Path, needed: &Needed, cutoff: i64, max_seq: i64) -> Result<(u64, i64)> {
    let io = |e: std::io::Error| Error::io("cannot write the archive", path, e);
    write_atomically_with(path, None, |file| {
        let mut gz = flate2::write::GzEncoder::new(BufWriter::new(file), flate2::Compression::default());
        let mut stmt = store.conn().prepare(&archivable_sql(needed)).ctx("cannot read the journal")?;
        let mut rows = stmt.query(params![needed.untyped, cutoff, max_seq]).ctx("cannot read the journal")?;
        let (mut written, mut last_seq) = (0u64, 0i64);
        while let Some(row) = rows.next().ctx("cannot read the journal")? {
            let envelope: Vec<u8> = row.get(1).ctx("cannot read the journal")?;
            gz.write_all(&envelope).and_then(|_| gz.write_all(b"\n")).map_err(io)?;
            last_seq = row.get(0).ctx("cannot read the journal")?;
            written += 1;
        }
        gz.finish().and_then(|w| w.into_inner().map_err(|e| e.into_error())).map_err(io)?;
        Ok((written, last_seq))
    })
}

/// Journal rows (by seq) covered per purge transaction. Every commit costs an fsync and a WAL
/// checkpoint, so chunks are large (20,000-row chunks made gc of a million events take ~30 s);
/// other processes' appends wait at most one chunk (one to two seconds).
const GC_CHUNK: i64 = 500_000;

/// Page cache for gc's connection (KiB): index maintenance and VACUUM touch many pages.
const GC_CACHE_KIB: i64 = 65_536;

/// Purges payloads of events delivered to every known target or archived, then reclaims
/// the file space.
///
/// `current` is the configured target: before its first drain registers it, it has received
/// nothing, so only archived events are purged.
pub fn gc(
    store: &mut Store,
    current: Option<&TargetIdentity>,
    named: &[ActiveNamed],
    change: Change<'_>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<GcReport> {
    let dry_run = applying(store, change)?;
    let before = store.file_bytes();
    let (needed, unregistered_note) = known_targets(store, current, named)?;
    let targets = needed.untyped;
    let mut report = GcReport {
        dry_run,
        purged: 0,
        purged_bytes: 0,
        kept: 0,
        store_bytes_before: before,
        store_bytes_after: before,
        note: None,
    };
    if needed.is_nobody() {
        report.kept = retained(store)?;
        report.note = Some(NO_TARGET_NOTE.into());
        return Ok(report);
    }
    let (total, total_bytes): (i64, i64) = store
        .conn()
        .query_row(
            &format!(
                "SELECT count(*), coalesce(sum(payload_bytes), 0) FROM events
             WHERE state = 1 OR (state = 0 AND {})",
                needed.delivered_sql("", "?1")
            ),
            [targets],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .ctx("cannot read the journal")?;
    if total == 0 {
        report.kept = retained(store)?;
        report.note = Some(
            unregistered_note.unwrap_or_else(|| "no event is archived or delivered to every known target yet".into()),
        );
        return Ok(report);
    }
    if dry_run {
        report.purged = total as u64;
        report.purged_bytes = total_bytes as u64;
        // Archived events are not counted as retained: only retained ones leave `kept`.
        let retained_eligible: i64 = store
            .conn()
            .query_row(
                &format!("SELECT count(*) FROM events WHERE state = 0 AND {}", needed.delivered_sql("", "?1")),
                [targets],
                |r| r.get(0),
            )
            .ctx("cannot read the journal")?;
        report.kept = retained(store)?.saturating_sub(retained_eligible.max(0) as u64);
        return Ok(report);
    }
    store.conn().pragma_update(None, "cache_size", -GC_CACHE_KIB).ctx("cannot configure gc")?;
    let mut from = 0i64;
    loop {
        let (n, bytes, next) = purge_chunk(store, &needed, from)?;
        report.purged += n;
        report.purged_bytes += bytes;
        progress(report.purged, total as u64);
        match next {
            Some(seq) => from = seq,
            None => break,
        }
    }
    report.kept = retained(store)?;
    if report.purged > 0 {
        reclaim(store.conn())?;
    }
    report.store_bytes_after = store.file_bytes();
    Ok(report)
}

/// Purges one chunk of eligible events with seq ≥ `from`; returns (count, bytes, next seq).
fn purge_chunk(store: &mut Store, needed: &Needed, from: i64) -> Result<(u64, u64, Option<i64>)> {
    let now = crate::clock::now_ms();
    let tx = store.conn_mut().transaction_with_behavior(TransactionBehavior::Immediate).ctx("cannot start gc")?;
    let upper: Option<i64> = tx
        .query_row(
            "SELECT max(seq) FROM (SELECT seq FROM events WHERE seq >= ?1 ORDER BY seq LIMIT ?2)",
            params![from, GC_CHUNK],
            |r| r.get(0),
        )
        .ctx("cannot read the journal")?;
    let Some(upper) = upper else { return Ok((0, 0, None)) };
    let (n, bytes) = purge_range(&tx, from, upper, needed, now)?;
    tx.commit().ctx("cannot commit gc")?;
    Ok((n, bytes, Some(upper + 1)))
}

/// Purges the events with seq in `from..=upper` that are archived or delivered to at least
/// `targets` targets: deletes their payloads and marks them purged. The journal counters are
/// adjusted once for the whole range: the `events_state_changed` trigger skips a purge (state 2
/// set together with `purged_at`), because running it per row made gc several seconds slower
/// at a million events. Call inside a transaction. Returns (count, payload bytes).
pub(crate) fn purge_range(conn: &Connection, from: i64, upper: i64, needed: &Needed, now: i64) -> Result<(u64, u64)> {
    // Unary `+`: walk the seq range; with an index on `state` the planner would scan every
    // retained event once per chunk.
    let eligible =
        format!("seq BETWEEN ?1 AND ?2 AND (+state = 1 OR (+state = 0 AND {}))", needed.delivered_sql("", "?3"));
    let targets = needed.untyped;
    // The trigger skips exactly the rows whose purged_at goes from NULL to set: count those.
    let (retained, retained_bytes, archived, total, bytes): (i64, i64, i64, i64, i64) = conn
        .query_row(
            &format!(
                "SELECT count(*) FILTER (WHERE state = 0 AND purged_at IS NULL),
                        coalesce(sum(payload_bytes) FILTER (WHERE state = 0 AND purged_at IS NULL), 0),
                        count(*) FILTER (WHERE state = 1 AND purged_at IS NULL),
                        count(*), coalesce(sum(payload_bytes), 0)
                 FROM events WHERE {eligible}"
            ),
            params![from, upper, targets],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .ctx("cannot read the journal")?;
    if total == 0 {
        return Ok((0, 0));
    }
    conn.execute(
        &format!("DELETE FROM payloads WHERE seq IN (SELECT seq FROM events WHERE {eligible})"),
        params![from, upper, targets],
    )
    .ctx("cannot purge payloads")?;
    let n = conn
        .execute(
            &format!("UPDATE events SET state = 2, purged_at = ?4 WHERE {eligible}"),
            params![from, upper, targets, now],
        )
        .ctx("cannot mark events purged")?;
    conn.execute(
        "UPDATE stats SET value = value + CASE key
             WHEN 'retained' THEN -?1 WHEN 'retained_bytes' THEN -?2 WHEN 'archived' THEN -?3 ELSE ?1 + ?3 END
         WHERE key IN ('retained', 'retained_bytes', 'archived', 'purged')",
        params![retained, retained_bytes, archived],
    )
    .ctx("cannot update the journal counters")?;
    Ok((n as u64, bytes as u64))
}

/// Gives the freed pages back to the file system. A store in incremental auto-vacuum mode
/// moves only the pages after the new end of file; any other store gets one full VACUUM that
/// also switches it to incremental mode, so later gc runs cost what they free, not the whole
/// store (ledger and attempts rows never shrink).
fn reclaim(conn: &Connection) -> Result<()> {
    let mode: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)).ctx("cannot reclaim file space")?;
    if mode == 2 {
        // One result row per freed page: step it to the end.
        let mut stmt = conn.prepare("PRAGMA incremental_vacuum").ctx("cannot reclaim file space")?;
        let mut rows = stmt.query([]).ctx("cannot reclaim file space")?;
        while rows.next().ctx("cannot reclaim file space")?.is_some() {}
        drop(rows);
        stmt.finalize().ctx("cannot reclaim file space")?;
    } else {
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;").ctx("cannot reclaim file space")?;
    }
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").ctx("cannot reclaim file space")
}

fn retained(store: &Store) -> Result<u64> {
    Ok(crate::store::stats::journal_counters(store.conn())?.retained.max(0) as u64)
}

/// `30d`, `12h`, `15m`, `45s`, `2w` → milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<i64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: i64 = digits.parse().map_err(|_| bad_duration(text))?;
    let unit_ms: i64 = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 604_800_000,
        _ => return Err(bad_duration(text)),
    };
    n.checked_mul(unit_ms).ok_or_else(|| bad_duration(text))
}

fn bad_duration(text: &str) -> Error {
    Error::usage(format!("invalid duration {text:?}"), "use a number and a unit: 45s, 15m, 12h, 30d or 2w")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("30d").unwrap(), 30 * 86_400_000);
        assert_eq!(parse_duration_ms("2w").unwrap(), 14 * 86_400_000);
        assert_eq!(parse_duration_ms("45s").unwrap(), 45_000);
        for bad in ["", "d", "5y", "-1d", "1.5d"] {
            assert_eq!(parse_duration_ms(bad).unwrap_err().exit_code(), 2, "{bad}");
        }
    }
}
