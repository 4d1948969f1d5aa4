//! Migration conflicts: listing them (`migrate conflicts`, `status`) and resolving them
//! (`migrate resolve EVENT_ID --keep journal|incoming`).
//!
//! A conflict row is an alternative version of an event, kept byte for byte. Resolving with
//! `incoming` swaps the journal's bytes for one of them and files the replaced version as a
//! resolved conflict row in turn, so no version is ever lost and a re-run of the migration
//! sees every source as decided (it never re-opens a settled conflict).

use rusqlite::{OptionalExtension, Transaction, params};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::migrate::capture_team;
use crate::clock::rfc3339_ms;
use crate::delivery::lock::DrainLock;
use crate::envelope::{canonical_bytes, is_valid_ulid, sha256_hex};
use crate::error::{Error, Result, StoreContext};
use crate::event_journal::begin;
use crate::store::Store;

/// Source name of a conflict row that preserves journal bytes no legacy source had (e.g.
/// captured by `emit`) when `--keep incoming` replaced them.
pub const JOURNAL_SOURCE: &str = "journal";

/// One row of `migrate conflicts --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConflictEntry {
    pub event_id: String,
    pub source: String,
    pub existing_sha256: String,
    pub incoming_sha256: String,
    /// RFC 3339 UTC.
    pub detected_at: String,
    pub resolved: bool,
}

/// An unresolved conflict, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpenConflict {
    pub event_id: String,
    pub source: String,
    pub existing_sha256: String,
    pub incoming_sha256: String,
    pub detected_at: String,
}

/// The contract's `status.migration_conflicts` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConflictSummary {
    /// Unresolved conflicts.
    pub count: u64,
    /// True while any conflict is unresolved: the legacy files must not be cleaned up.
    pub cleanup_blocked: bool,
    pub conflicts: Vec<OpenConflict>,
}

/// Every conflict, resolved or not, oldest first. No store → none.
pub fn list_conflicts(store: Option<&Store>) -> Result<Vec<ConflictEntry>> {
    let Some(store) = store else { return Ok(Vec::new()) };
    let mut stmt = store
        .conn()
        .prepare(
            "SELECT event_id, source, existing_sha256, incoming_sha256, detected_at, resolved_at IS NOT NULL
             FROM migration_conflicts ORDER BY detected_at, id",
        )
        .ctx("cannot read migration conflicts")?;
    let rows = stmt
        .query_map([], |r| {
            Ok(ConflictEntry {
                event_id: r.get(0)?,
                source: r.get(1)?,
                existing_sha256: r.get(2)?,
                incoming_sha256: r.get(3)?,
                detected_at: rfc3339_ms(r.get(4)?),
                resolved: r.get(5)?,
            })
        })
        .ctx("cannot read migration conflicts")?;
    rows.collect::<std::result::Result<_, _>>().ctx("cannot read migration conflicts")
}

/// Unresolved conflicts for `status` (metadata only; envelopes are not read).
pub fn conflict_summary(store: &Store) -> Result<ConflictSummary> {
    let mut stmt = store
        .conn()
        .prepare(
            "SELECT event_id, source, existing_sha256, incoming_sha256, detected_at
             FROM migration_conflicts WHERE resolved_at IS NULL ORDER BY detected_at, id",
        )
        .ctx("cannot read migration conflicts")?;
    let rows = stmt
        .query_map([], |r| {
            Ok(OpenConflict {
                event_id: r.get(0)?,
                source: r.get(1)?,
                existing_sha256: r.get(2)?,
                incoming_sha256: r.get(3)?,
                detected_at: rfc3339_ms(r.get(4)?),
            })
        })
        .ctx("cannot read migration conflicts")?;
    let conflicts: Vec<OpenConflict> =
        rows.collect::<std::result::Result<_, _>>().ctx("cannot read migration conflicts")?;
    let count = conflicts.len() as u64;
    Ok(ConflictSummary { count, cleanup_blocked: count > 0, conflicts })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Keep the journal's bytes; mark the event's conflicts resolved.
    Journal,
    /// Replace the journal's bytes with a conflicting source's version.
    Incoming,
}

/// What `migrate resolve` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resolution {
    pub event_id: String,
    /// `journal` or `incoming`.
    pub kept: &'static str,
    /// The source whose version is now in the journal (`incoming` only).
    pub source: Option<String>,
    /// Conflict rows this call marked resolved.
    pub resolved: u64,
    /// SHA-256 of the canonical JSON the journal holds afterwards.
    pub journal_sha256: String,
}

/// Resolved-by labels stored in `migration_conflicts.resolution`.
const KEPT_JOURNAL: &str = "kept_journal";
const KEPT_INCOMING: &str = "kept_incoming";
const SUPERSEDED: &str = "superseded";

#[derive(Debug, Clone)]
struct ConflictRow {
    id: i64,
    source: String,
    source_path: String,
    incoming_sha256: String,
    resolved: bool,
}

/// The journal's current version of an event.
struct Current {
    seq: i64,
    state: i64,
    envelope: Option<Vec<u8>>,
    event_type: String,
}

/// Replacing journal bytes decides what a drain sends, so it needs the drain lock: a batch
/// with the old bytes is never in flight while "delivered anywhere?" is answered.
pub fn resolve(
    store: &mut Store,
    lock: &DrainLock,
    event_id: &str,
    keep: Keep,
    source: Option<&str>,
) -> Result<Resolution> {
    lock.guards(store)?;
    if !is_valid_ulid(event_id) {
        return Err(Error::usage(
            format!("invalid event id {event_id:?}: expected a 26-character ULID"),
            "copy the id from `kitty-sync migrate conflicts`",
        ));
    }
    let tx = begin(store)?;
    let rows = conflict_rows(&tx, event_id)?;
    if rows.is_empty() {
        return Err(Error::usage(
            format!("no migration conflict for event {event_id}"),
            "`kitty-sync migrate conflicts` lists the events that have one",
        ));
    }
    let current = current(&tx, event_id)?;
    let current_sha = current.envelope.as_deref().map(|b| sha256_hex(&canonical_bytes(b)));
    let resolution = match keep {
        Keep::Journal => keep_journal(&tx, event_id, current_sha.unwrap_or_default())?,
        Keep::Incoming => keep_incoming(&tx, event_id, &rows, &current, current_sha.as_deref(), source)?,
    };
    tx.commit().ctx("cannot commit the resolution")?;
    Ok(resolution)
}

fn conflict_rows(tx: &Transaction<'_>, event_id: &str) -> Result<Vec<ConflictRow>> {
    let mut stmt = tx
        .prepare(
            "SELECT id, source, source_path, incoming_sha256, resolved_at IS NOT NULL
             FROM migration_conflicts WHERE event_id = ?1 ORDER BY id",
        )
        .ctx("cannot read migration conflicts")?;
    let rows = stmt
        .query_map([event_id], |r| {
            Ok(ConflictRow {
                id: r.get(0)?,
                source: r.get(1)?,
                source_path: r.get(2)?,
                incoming_sha256: r.get(3)?,
                resolved: r.get(4)?,
            })
        })
        .ctx("cannot read migration conflicts")?;
    rows.collect::<std::result::Result<_, _>>().ctx("cannot read migration conflicts")
}

fn current(tx: &Transaction<'_>, event_id: &str) -> Result<Current> {
    tx.query_row(
        "SELECT e.seq, e.state, p.envelope, e.event_type FROM events e LEFT JOIN payloads p ON p.seq = e.seq
         WHERE e.event_id = ?1",
        [event_id],
        |r| Ok(Current { seq: r.get(0)?, state: r.get(1)?, envelope: r.get(2)?, event_type: r.get(3)? }),
    )
    .optional()
    .ctx("cannot read the event")?
    .ok_or_else(|| {
        Error::internal(
            format!("event {event_id} has migration conflicts but is not in the journal"),
            "run `kitty-sync migrate` again to re-import it",
        )
    })
}

fn keep_journal(tx: &Transaction<'_>, event_id: &str, journal_sha256: String) -> Result<Resolution> {
    let resolved = tx
        .execute(
            "UPDATE migration_conflicts SET resolved_at = ?2, resolution = ?3 WHERE event_id = ?1 AND resolved_at IS NULL",
            params![event_id, crate::clock::now_ms(), KEPT_JOURNAL],
        )
        .ctx("cannot resolve the conflict")?;
    Ok(Resolution {
        event_id: event_id.to_string(),
        kept: "journal",
        source: None,
        resolved: resolved as u64,
        journal_sha256,
    })
}

/// Picks the conflict row whose version goes into the journal.
fn choose<'r>(
    event_id: &str,
    rows: &'r [ConflictRow],
    current_sha: Option<&str>,
    wanted: Option<&str>,
) -> Result<&'r ConflictRow> {
    let listing = || rows.iter().map(|r| format!("{} ({})", r.source, short(&r.incoming_sha256))).collect::<Vec<_>>();
    if let Some(wanted) = wanted {
        return rows.iter().find(|r| r.source == wanted || r.source_path == wanted).ok_or_else(|| {
            Error::usage(
                format!(
                    "event {event_id} has no conflict from source {wanted:?}; its sources: {}",
                    listing().join(", ")
                ),
                "pass one of the listed sources to --source",
            )
        });
    }
    // Versions other than the one the journal already holds; prefer an unresolved row.
    let mut candidates: Vec<&ConflictRow> =
        rows.iter().filter(|r| Some(r.incoming_sha256.as_str()) != current_sha).collect();
    candidates.sort_by_key(|r| r.resolved);
    let first = candidates.first().copied();
    let distinct = candidates.iter().any(|r| first.is_some_and(|f| f.incoming_sha256 != r.incoming_sha256));
    match first {
        Some(row) if !distinct => Ok(row),
        Some(_) => Err(Error::usage(
            format!("event {event_id} has several conflicting versions: {}", listing().join(", ")),
            format!("choose one: kitty-sync migrate resolve {event_id} --keep incoming --source SOURCE"),
        )),
        None => Err(Error::usage(
            format!("the journal already holds the incoming version of {event_id}"),
            format!("run `kitty-sync migrate resolve {event_id} --keep journal` to close the conflict"),
        )),
    }
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

fn keep_incoming(
    tx: &Transaction<'_>,
    event_id: &str,
    rows: &[ConflictRow],
    current: &Current,
    current_sha: Option<&str>,
    wanted: Option<&str>,
) -> Result<Resolution> {
    let chosen = choose(event_id, rows, current_sha, wanted)?;
    refuse_if_delivered(tx, event_id, current)?;
    let Some(old_bytes) = current.envelope.as_deref() else {
        return Err(Error::internal(format!("event {event_id} has no stored envelope"), "run `kitty-sync status`"));
    };
    let old_sha = current_sha.unwrap_or_default();
    let new_bytes: Vec<u8> = tx
        .query_row("SELECT incoming_envelope FROM migration_conflicts WHERE id = ?1", [chosen.id], |r| r.get(0))
        .ctx("cannot read the incoming envelope")?;
    let new_sha = sha256_hex(&canonical_bytes(&new_bytes));
    let now = crate::clock::now_ms();
    preserve_replaced(tx, event_id, current.seq, old_bytes, old_sha, &new_sha, now)?;
    replace_envelope(tx, current, &new_bytes)?;
    let resolved = mark_incoming(tx, event_id, chosen.id, &new_sha, now)?;
    if chosen.source != JOURNAL_SOURCE {
        tx.execute(
            "INSERT OR IGNORE INTO migration_provenance (seq, source, source_path, payload_sha256, recorded_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![current.seq, chosen.source, chosen.source_path, new_sha, now],
        )
        .ctx("cannot record migration provenance")?;
    }
    Ok(Resolution {
        event_id: event_id.to_string(),
        kept: "incoming",
        source: Some(chosen.source.clone()),
        resolved,
        journal_sha256: new_sha,
    })
}

/// `--keep incoming` must not rewrite what a target already acknowledged: the receiver would
/// hold one version and the journal another.
fn refuse_if_delivered(tx: &Transaction<'_>, event_id: &str, current: &Current) -> Result<()> {
    let delivered: bool = tx
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM ledger WHERE seq = ?1 AND status IN ('success', 'duplicate'))",
            [current.seq],
            |r| r.get(0),
        )
        .ctx("cannot read the delivery ledger")?;
    let hint = format!("keep the delivered version with `kitty-sync migrate resolve {event_id} --keep journal`");
    if delivered {
        return Err(Error::conflict_unresolved(
            format!("event {event_id} was already delivered to a target; its journal bytes cannot be replaced"),
            hint,
        ));
    }
    if current.state != 0 || current.envelope.is_none() {
        return Err(Error::conflict_unresolved(
            format!("event {event_id} is archived or purged; its journal bytes cannot be replaced"),
            hint,
        ));
    }
    Ok(())
}

/// Files the version being replaced as a resolved conflict row of every source that had it (or
/// of `journal` when none did), so it stays recoverable and re-runs see those sources decided.
fn preserve_replaced(
    tx: &Transaction<'_>,
    event_id: &str,
    seq: i64,
    old_bytes: &[u8],
    old_sha: &str,
    new_sha: &str,
    now: i64,
) -> Result<()> {
    let holders: Vec<(String, String)> = {
        let mut stmt = tx
            .prepare("SELECT source, source_path FROM migration_provenance WHERE seq = ?1 AND payload_sha256 = ?2")
            .ctx("cannot read migration provenance")?;
        let rows = stmt
            .query_map(params![seq, old_sha], |r| Ok((r.get(0)?, r.get(1)?)))
            .ctx("cannot read migration provenance")?;
        rows.collect::<std::result::Result<_, _>>().ctx("cannot read migration provenance")?
    };
    let file = |source: &str, path: &str| {
        tx.execute(
            "INSERT OR IGNORE INTO migration_conflicts (event_id, source, source_path, existing_sha256, incoming_sha256,
                                                         incoming_envelope, detected_at, resolved_at, resolution)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8)",
            params![event_id, source, path, new_sha, old_sha, old_bytes, now, SUPERSEDED],
        )
        .ctx("cannot preserve the replaced version")
    };
    for (source, path) in &holders {
        file(source, path)?;
    }
    let kept: bool = tx
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM migration_conflicts WHERE event_id = ?1 AND incoming_sha256 = ?2)",
            params![event_id, old_sha],
            |r| r.get(0),
        )
        .ctx("cannot read migration conflicts")?;
    if !kept {
        file(JOURNAL_SOURCE, "")?;
    }
    Ok(())
}

fn replace_envelope(tx: &Transaction<'_>, current: &Current, bytes: &[u8]) -> Result<()> {
    let envelope = serde_json::from_slice::<Value>(bytes).ok();
    let object = envelope.as_ref().and_then(Value::as_object);
    let event_type = match object.and_then(|o| o.get("event_type")) {
        Some(Value::String(t)) if !t.trim().is_empty() => t.clone(),
        _ => current.event_type.clone(),
    };
    // The capture team follows the envelope, so team isolation holds for the new version.
    let team = object.and_then(capture_team);
    tx.execute("UPDATE payloads SET envelope = ?2 WHERE seq = ?1", params![current.seq, bytes])
        .ctx("cannot replace the envelope")?;
    tx.execute(
        "UPDATE events SET event_type = ?2, payload_bytes = ?3, payload_sha256 = ?4, capture_team = ?5 WHERE seq = ?1",
        params![current.seq, event_type, bytes.len() as i64, Sha256::digest(bytes).to_vec(), team],
    )
    .ctx("cannot replace the envelope")?;
    Ok(())
}

fn mark_incoming(tx: &Transaction<'_>, event_id: &str, chosen: i64, new_sha: &str, now: i64) -> Result<u64> {
    let chosen_changed = tx
        .execute(
            "UPDATE migration_conflicts SET resolved_at = ?2, resolution = ?3, existing_sha256 = ?4
             WHERE id = ?1 AND (resolved_at IS NULL OR resolution IS NOT ?3)",
            params![chosen, now, KEPT_INCOMING, new_sha],
        )
        .ctx("cannot resolve the conflict")?;
    let others = tx
        .execute(
            "UPDATE migration_conflicts SET resolved_at = ?3, resolution = ?4
             WHERE event_id = ?1 AND id <> ?2 AND resolved_at IS NULL",
            params![event_id, chosen, now, SUPERSEDED],
        )
        .ctx("cannot resolve the conflicts")?;
    tx.execute("UPDATE migration_conflicts SET existing_sha256 = ?2 WHERE event_id = ?1", params![event_id, new_sha])
        .ctx("cannot update the conflicts")?;
    Ok((chosen_changed + others) as u64)
}
