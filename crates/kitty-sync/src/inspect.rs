//! One event in full: stored envelope, capture metadata, provenance, and per known target
//! its ledger state and every attempt.

use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::clock::rfc3339_ms;
use crate::error::{Error, Result, StoreContext};
use crate::store::Store;

#[derive(Debug, Serialize)]
pub struct EventInspection {
    pub event_id: String,
    pub event_type: String,
    /// The stored envelope, byte for byte; `None` once purged.
    pub envelope: Option<Box<RawValue>>,
    pub payload_sha256: String,
    pub payload_bytes: i64,
    pub captured_at: String,
    pub coalesce_key: Option<String>,
    pub coalesced_into: Option<String>,
    pub drain_blocked_reason: Option<String>,
    pub archived_at: Option<String>,
    pub purged: bool,
    pub sources: Vec<Provenance>,
    pub targets: Vec<TargetState>,
}

#[derive(Debug, Serialize)]
pub struct Provenance {
    pub source: String,
    pub path: String,
    pub recorded_at: String,
}

#[derive(Debug, Serialize)]
pub struct TargetState {
    pub target_id: String,
    pub kind: String,
    pub canonical_url: String,
    /// Ledger status for the target's current epoch; `None` when never attempted.
    pub status: Option<String>,
    pub attempts: Vec<Attempt>,
}

#[derive(Debug, Serialize)]
pub struct Attempt {
    pub at: String,
    pub outcome: String,
    pub http_status: Option<i64>,
    pub error: Option<String>,
    /// True for attempts recorded before the target was re-drained after a reset.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub superseded: bool,
}

struct EventRow {
    seq: i64,
    inspection: EventInspection,
}

/// Looks an event up by id. Unknown ids are a usage error (exit 2).
pub fn inspect(store: Option<&Store>, event_id: &str) -> Result<EventInspection> {
    let unknown = || {
        Error::usage(
            format!("no event with id {event_id} in the journal"),
            "check the id (26-character ULID); `kitty-sync status` shows what the journal holds",
        )
    };
    let store = store.ok_or_else(unknown)?;
    let EventRow { seq, mut inspection } = read_event(store, event_id)?.ok_or_else(unknown)?;
    inspection.sources = read_sources(store, seq)?;
    inspection.targets = read_targets(store, seq)?;
    Ok(inspection)
}

fn read_event(store: &Store, event_id: &str) -> Result<Option<EventRow>> {
    let sql = "SELECT e.seq, e.event_id, e.event_type, p.envelope, e.payload_sha256, e.payload_bytes, e.captured_at,
                      e.coalesce_key, e.coalesced_into, e.drain_blocked_reason, e.archived_at, e.state
               FROM events e LEFT JOIN payloads p ON p.seq = e.seq WHERE e.event_id = ?1";
    store
        .conn()
        .query_row(sql, [event_id], |r| {
            let envelope: Option<Vec<u8>> = r.get(3)?;
            let sha: Vec<u8> = r.get(4)?;
            let archived: Option<i64> = r.get(10)?;
            Ok(EventRow {
                seq: r.get(0)?,
                inspection: EventInspection {
                    event_id: r.get(1)?,
                    event_type: r.get(2)?,
                    envelope: envelope.and_then(|bytes| raw_json(&bytes)),
                    payload_sha256: hex::encode(sha),
                    payload_bytes: r.get(5)?,
                    captured_at: rfc3339_ms(r.get(6)?),
                    coalesce_key: r.get(7)?,
                    coalesced_into: r.get(8)?,
                    drain_blocked_reason: r.get(9)?,
                    archived_at: archived.map(rfc3339_ms),
                    purged: r.get::<_, i64>(11)? == 2,
                    sources: Vec::new(),
                    targets: Vec::new(),
                },
            })
        })
        .optional()
        .ctx("cannot read the event")
}

fn raw_json(bytes: &[u8]) -> Option<Box<RawValue>> {
    let text = std::str::from_utf8(bytes).ok()?;
    RawValue::from_string(text.trim().to_string()).ok()
}

fn read_sources(store: &Store, seq: i64) -> Result<Vec<Provenance>> {
    let mut stmt = store
        .conn()
        .prepare_cached("SELECT source, source_path, recorded_at FROM migration_provenance WHERE seq = ?1 ORDER BY recorded_at, source")
        .ctx("cannot read provenance")?;
    let rows = stmt
        .query_map([seq], |r| Ok(Provenance { source: r.get(0)?, path: r.get(1)?, recorded_at: rfc3339_ms(r.get(2)?) }))
        .ctx("cannot read provenance")?;
    rows.collect::<std::result::Result<_, _>>().ctx("cannot read provenance")
}

fn read_targets(store: &Store, seq: i64) -> Result<Vec<TargetState>> {
    let mut stmt = store
        .conn()
        .prepare_cached(
            "SELECT t.id, t.target_id, t.kind, t.canonical_url, t.epoch, l.status
             FROM targets t LEFT JOIN ledger l ON l.target = t.id AND l.epoch = t.epoch AND l.seq = ?1
             ORDER BY t.first_seen_at, t.id",
        )
        .ctx("cannot read targets")?;
    let rows = stmt
        .query_map([seq], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(4)?,
                TargetState {
                    target_id: r.get(1)?,
                    kind: r.get(2)?,
                    canonical_url: r.get(3)?,
                    status: r.get(5)?,
                    attempts: Vec::new(),
                },
            ))
        })
        .ctx("cannot read targets")?;
    let mut targets = Vec::new();
    for row in rows {
        let (id, epoch, mut state) = row.ctx("cannot read targets")?;
        state.attempts = read_attempts(store, seq, id, epoch)?;
        targets.push(state);
    }
    Ok(targets)
}

fn read_attempts(store: &Store, seq: i64, target: i64, epoch: i64) -> Result<Vec<Attempt>> {
    let mut stmt = store
        .conn()
        .prepare_cached(
            "SELECT at, outcome, http_status, error, epoch FROM attempts WHERE seq = ?1 AND target = ?2 ORDER BY id",
        )
        .ctx("cannot read attempts")?;
    let rows = stmt
        .query_map(params![seq, target], |r| {
            Ok(Attempt {
                at: rfc3339_ms(r.get(0)?),
                outcome: r.get(1)?,
                http_status: r.get(2)?,
                error: r.get(3)?,
                superseded: r.get::<_, i64>(4)? < epoch,
            })
        })
        .ctx("cannot read attempts")?;
    rows.collect::<std::result::Result<_, _>>().ctx("cannot read attempts")
}
