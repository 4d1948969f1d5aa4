//! The append-only journal. It stores envelopes exactly as captured and knows nothing about
//! delivery, except for one question coalescing must ask: "delivered anywhere yet?".

mod import;
pub mod policy;

use rusqlite::{OptionalExtension, Transaction, TransactionBehavior, params};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::envelope::{self, canonical_json};
use crate::error::{Error, Result, StoreContext};
use crate::store::Store;

pub use import::{ImportOptions, ImportProgress, ImportReport, LineError, MAX_LINE_BYTES};
pub use policy::{BlockedReason, CapturePolicy, TeamspaceGates};

/// The envelope schema version sent to Teamspace-compatible receivers.
pub const SCHEMA_VERSION: &str = "3.0.0";

/// Page cache during an import, in SQLite's negative-KiB notation (16 MiB). Measured on
/// 100k/400k-event imports: 2 MiB (the default) is 20–40% slower wall time (pages spilled
/// mid-transaction are read back), 64 MiB is no faster than 16 MiB but doubles peak RSS.
const IMPORT_CACHE_KIB: i64 = -16 * 1024;

/// An event a producer wants captured; the journal builds the envelope.
#[derive(Debug, Clone, Default)]
pub struct NewEvent {
    pub event_type: String,
    pub event_id: Option<String>,
    pub aggregate_id: Option<String>,
    pub aggregate_type: Option<String>,
    /// Must be a JSON object; `None` means `{}`.
    pub payload: Option<Value>,
    pub coalesce_key: Option<String>,
    pub occurred_at: Option<jiff::Timestamp>,
    pub project_uuid: Option<String>,
    pub local_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Journaled; `coalesced` earlier events are superseded by it.
    Captured { event_id: String, coalesced: u64 },
    /// The same event was already journaled; nothing changed.
    AlreadyPresent { event_id: String },
    /// Dropped by the opt-out rule and counted.
    Dropped { event_id: String },
}

/// What a row insert needs; the bytes are stored verbatim.
pub(crate) struct Row<'a> {
    pub event_id: &'a str,
    pub event_type: &'a str,
    pub bytes: &'a [u8],
    pub coalesce_key: Option<&'a str>,
    /// Capture time, epoch milliseconds.
    pub captured_at: i64,
    /// The team the event was captured under (`None`: deliverable to any team).
    pub capture_team: Option<&'a str>,
    pub blocked_reason: Option<&'a str>,
}

impl<'a> Row<'a> {
    /// A row captured now under `policy`.
    pub(crate) fn captured(
        policy: &'a CapturePolicy,
        event_id: &'a str,
        event_type: &'a str,
        bytes: &'a [u8],
        coalesce_key: Option<&'a str>,
    ) -> Row<'a> {
        Row {
            event_id,
            event_type,
            bytes,
            coalesce_key,
            captured_at: crate::clock::now_ms(),
            capture_team: policy.team.as_deref(),
            blocked_reason: policy.blocked_reason.map(BlockedReason::as_str),
        }
    }
}

pub(crate) enum Inserted {
    New { seq: i64 },
    Exists { envelope: Option<Vec<u8>>, sha256: Vec<u8> },
}

/// Journal operations over an open store, under one capture policy.
pub struct Journal<'s> {
    store: &'s mut Store,
    policy: CapturePolicy,
}

impl<'s> Journal<'s> {
    pub fn new(store: &'s mut Store, policy: CapturePolicy) -> Journal<'s> {
        Journal { store, policy }
    }

    pub fn policy(&self) -> &CapturePolicy {
        &self.policy
    }

    /// Captures one event. Durable (committed with `synchronous=FULL`) when this returns.
    pub fn append(&mut self, event: NewEvent) -> Result<AppendOutcome> {
        validate_new_event(&event)?;
        let event_id = event.event_id.clone().unwrap_or_else(|| ulid::Ulid::generate().to_string());
        let node_id = self.store.node_id()?;
        let policy = self.policy.clone();
        let tx = begin(self.store)?;
        if policy.drops(&event.event_type, event.local_only) {
            count_dropped(&tx, &event.event_type, 1)?;
            tx.commit().ctx("cannot commit")?;
            return Ok(AppendOutcome::Dropped { event_id });
        }
        if let Some(existing) = existing_envelope(&tx, &event_id)? {
            return compare_with_existing(&event, &event_id, &existing);
        }
        let lamport = tick_lamport(&tx, None)?;
        let envelope = build_envelope(&event, &event_id, &node_id, lamport, policy.team.as_deref());
        let bytes = canonical_json(&envelope).into_bytes();
        let row = Row::captured(&policy, &event_id, &event.event_type, &bytes, event.coalesce_key.as_deref());
        let Inserted::New { seq } = insert_row(&tx, &row)? else {
            return Err(Error::internal("event appeared during capture", "run the command again"));
        };
        let coalesced = match event.coalesce_key.as_deref() {
            Some(key) => coalesce(&tx, key, seq, &event_id)?,
            None => 0,
        };
        tx.commit().ctx("cannot commit the captured event")?;
        Ok(AppendOutcome::Captured { event_id, coalesced })
    }

    /// Imports JSON Lines; see [`ImportOptions`]. All or nothing unless `skip_invalid`.
    pub fn import(
        &mut self,
        reader: &mut dyn std::io::BufRead,
        options: &ImportOptions,
        progress: &mut dyn FnMut(ImportProgress),
    ) -> Result<ImportReport> {
        let policy = self.policy.clone();
        // The whole import is one transaction, so every page it touches stays dirty until the
        // commit. With SQLite's default 2 MiB cache those pages spill to the WAL mid-import and
        // are read back and written again when touched later. A larger cache for the import
        // only; it is a fixed cap, so memory stays bounded whatever the file size.
        let previous: i64 =
            self.store.conn().query_row("PRAGMA cache_size", [], |r| r.get(0)).ctx("cannot read cache_size")?;
        self.store.conn().pragma_update(None, "cache_size", IMPORT_CACHE_KIB).ctx("cannot set cache_size")?;
        let result = (|| {
            let tx = begin(self.store)?;
            let report = import::run(&tx, &policy, reader, options, progress)?;
            if report.committed {
                tx.commit().ctx("cannot commit the import")?;
            }
            Ok(report)
        })();
        // Best effort: a failure to restore only leaves a larger cache on this connection.
        let _ = self.store.conn().pragma_update(None, "cache_size", previous);
        result
    }
}

fn validate_new_event(event: &NewEvent) -> Result<()> {
    if event.event_type.trim().is_empty() {
        return Err(Error::usage("event type is empty", "pass a non-empty --type, e.g. --type WPStatusChanged"));
    }
    if let Some(id) = &event.event_id
        && !envelope::is_valid_ulid(id)
    {
        return Err(Error::usage(
            format!("invalid event id {id:?}: expected a 26-character ULID (Crockford base32, upper case)"),
            "omit --event-id to get a new ULID, or pass one like 01KVYWRGJEV7CEZW6J7GXEBN16",
        ));
    }
    if let Some(payload) = &event.payload {
        if !payload.is_object() {
            return Err(Error::usage("the payload must be a JSON object", "pass e.g. --payload '{\"key\":\"value\"}'"));
        }
        check_payload_nesting(canonical_json(payload).as_bytes(), "the payload")?;
    }
    Ok(())
}

/// A payload nests one level below the envelope, so it gets one level less than
/// [`envelope::MAX_JSON_DEPTH`]: the same limit `emit --jsonl` applies to whole envelopes.
pub fn check_payload_nesting(text: &[u8], what: &str) -> Result<()> {
    envelope::check_nesting(text, envelope::MAX_JSON_DEPTH - 1).map_err(|e| {
        Error::usage(
            format!("{what} is {e} inside a payload"),
            "flatten the payload (receivers refuse deeper JSON), or store the deep part as a string",
        )
    })
}

pub(crate) fn begin(store: &mut Store) -> Result<Transaction<'_>> {
    store.conn_mut().transaction_with_behavior(TransactionBehavior::Immediate).ctx("cannot start a write transaction")
}

fn build_envelope(event: &NewEvent, event_id: &str, node_id: &str, lamport: i64, team: Option<&str>) -> Value {
    let timestamp = event.occurred_at.unwrap_or_else(jiff::Timestamp::now);
    json!({
        "event_id": event_id,
        "event_type": event.event_type,
        "aggregate_id": event.aggregate_id.clone().unwrap_or_else(|| event_id.to_string()),
        "aggregate_type": event.aggregate_type,
        "payload": event.payload.clone().unwrap_or_else(|| Value::Object(Map::new())),
        "timestamp": format!("{timestamp:.6}"),
        "node_id": node_id,
        "lamport_clock": lamport,
        "team_slug": team.unwrap_or("local"),
        "project_uuid": event.project_uuid,
        "schema_version": SCHEMA_VERSION,
    })
}

/// A re-run of the same `emit` (same id and content) is `already_present`. Fields the journal
/// generated (clock, node, capture time when not given) are taken from the stored envelope
/// before comparing, so only what the producer said has to match.
fn compare_with_existing(event: &NewEvent, event_id: &str, existing: &[u8]) -> Result<AppendOutcome> {
    let conflict = || {
        Error::usage(
            format!("conflicting event_id {event_id}: the journal already holds different content under this id"),
            "use a new --event-id (or omit it); the stored event is never changed",
        )
    };
    let Ok(Value::Object(stored)) = serde_json::from_slice::<Value>(existing) else {
        return Err(conflict());
    };
    let lamport = stored.get("lamport_clock").and_then(Value::as_i64).unwrap_or_default();
    let node = stored.get("node_id").and_then(Value::as_str).unwrap_or_default().to_string();
    let team = stored.get("team_slug").and_then(Value::as_str).map(str::to_string);
    let mut candidate = build_envelope(event, event_id, &node, lamport, team.as_deref());
    if event.occurred_at.is_none()
        && let (Some(obj), Some(ts)) = (candidate.as_object_mut(), stored.get("timestamp"))
    {
        obj.insert("timestamp".into(), ts.clone());
    }
    if canonical_json(&candidate) == canonical_json(&Value::Object(stored)) {
        Ok(AppendOutcome::AlreadyPresent { event_id: event_id.to_string() })
    } else {
        Err(conflict())
    }
}

fn existing_envelope(tx: &Transaction<'_>, event_id: &str) -> Result<Option<Vec<u8>>> {
    // A correlated subquery, not a join: SQLite re-prepares the join form on every call
    // (its plan depends on the bound id), which costs more than the lookup itself.
    tx.prepare_cached(
        "SELECT coalesce((SELECT p.envelope FROM payloads p WHERE p.seq = e.seq), x'') FROM events e WHERE e.event_id = ?1",
    )
    .and_then(|mut s| s.query_row([event_id], |r| r.get(0)).optional())
    .ctx("cannot look up the event id")
}

/// Advances the per-home Lamport clock past `seen` (a clock value from an imported event)
/// or by one, and returns the new value.
pub(crate) fn tick_lamport(tx: &Transaction<'_>, seen: Option<i64>) -> Result<i64> {
    tx.prepare_cached(
        "UPDATE meta SET value = CAST(max(CAST(value AS INTEGER) + 1, coalesce(?1, 0)) AS TEXT)
         WHERE key = 'lamport_clock' RETURNING CAST(value AS INTEGER)",
    )
    .and_then(|mut s| s.query_row([seen], |r| r.get(0)))
    .ctx("cannot advance the Lamport clock")
}

pub(crate) fn count_dropped(tx: &Transaction<'_>, event_type: &str, n: u64) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO dropped_events (event_type, count) VALUES (?1, ?2)
         ON CONFLICT(event_type) DO UPDATE SET count = count + excluded.count",
    )
    .and_then(|mut s| s.execute(params![event_type, n as i64]))
    .map(|_| ())
    .ctx("cannot count the dropped event")
}

/// Inserts the row unless the id exists; then returns what is stored for comparison.
pub(crate) fn insert_row(tx: &Transaction<'_>, row: &Row<'_>) -> Result<Inserted> {
    let sha = Sha256::digest(row.bytes).to_vec();
    // Bulk import spends most of its time here, so two choices are about speed:
    // - no `RETURNING` (SQLite runs it as a trigger): `changes()` and `last_insert_rowid()`
    //   of this connection say the same;
    // - `OR IGNORE` rather than `ON CONFLICT(event_id) DO NOTHING`: with the `events`
    //   triggers, a statement that may abort needs a statement journal (a copy of every page
    //   it touches); one that ignores conflicts does not. It costs ~25% less CPU per row. The
    //   only conflict it can meet is a duplicate `event_id` (every NOT NULL column is bound
    //   to a value), and that is exactly the case handled below.
    let inserted = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO events (event_id, event_type, payload_bytes, captured_at, payload_sha256,
                                           capture_team, drain_blocked_reason, coalesce_key)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .and_then(|mut s| {
            s.execute(params![
                row.event_id,
                row.event_type,
                row.bytes.len() as i64,
                row.captured_at,
                sha,
                row.capture_team,
                row.blocked_reason,
                row.coalesce_key,
            ])
        })
        .ctx("cannot journal the event")?;
    if inserted == 1 {
        let seq = tx.last_insert_rowid();
        tx.prepare_cached("INSERT INTO payloads (seq, envelope) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![seq, row.bytes]))
            .ctx("cannot store the envelope")?;
        return Ok(Inserted::New { seq });
    }
    tx.prepare_cached(
        "SELECT (SELECT p.envelope FROM payloads p WHERE p.seq = e.seq), e.payload_sha256 FROM events e WHERE e.event_id = ?1",
    )
    .and_then(|mut s| s.query_row([row.event_id], |r| Ok(Inserted::Exists { envelope: r.get(0)?, sha256: r.get(1)? })))
    .ctx("cannot read the stored event")
}

/// Supersedes earlier retained events with the same key that no target has terminally
/// received. Returns how many were superseded.
pub(crate) fn coalesce(tx: &Transaction<'_>, key: &str, new_seq: i64, new_event_id: &str) -> Result<u64> {
    tx.prepare_cached(
        "UPDATE events SET coalesced_into = ?3
         WHERE coalesce_key = ?1 AND coalesced_into IS NULL AND seq < ?2 AND state = 0
           AND NOT EXISTS (SELECT 1 FROM ledger l WHERE l.seq = events.seq AND l.status IN ('success', 'duplicate'))",
    )
    .and_then(|mut s| s.execute(params![key, new_seq, new_event_id]))
    .map(|n| n as u64)
    .ctx("cannot coalesce")
}
