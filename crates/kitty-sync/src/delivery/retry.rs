//! The operator's explicit "try again": parked (and, on request, rejected) events of one
//! target become due again. Attempts history is kept; only the ledger state moves.

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use super::lock::DrainLock;
use super::target::{self, TargetIdentity, TargetRecord};
use crate::error::{Error, Result, StoreContext};
use crate::store::Store;

#[derive(Debug, Clone, Copy, Default)]
pub struct RetrySelection {
    pub parked: bool,
    pub rejected: bool,
}

impl RetrySelection {
    fn statuses(self) -> Vec<&'static str> {
        let mut s = Vec::new();
        if self.parked {
            s.push("terminal_failed");
        }
        if self.rejected {
            s.push("rejected");
        }
        s
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RetryReport {
    pub target_id: String,
    /// Events made due again.
    pub requeued: Vec<String>,
    /// Named events that were not in a retryable state for this target (with their state).
    pub skipped: Vec<SkippedEvent>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SkippedEvent {
    pub event_id: String,
    pub status: Option<String>,
}

const REQUEUE_NOTE: &str = "requeued by operator (kitty-sync retry)";

/// [`requeue`] for the target with this identity; `None` when it was never drained to.
pub fn requeue_for(
    store: &mut Store,
    lock: &DrainLock,
    identity: &TargetIdentity,
    event_ids: &[String],
    sel: RetrySelection,
) -> Result<Option<RetryReport>> {
    match target::find(store.conn(), identity)? {
        Some(record) => requeue(store, lock, &record, event_ids, sel).map(Some),
        None => Ok(None),
    }
}

/// Requeues `event_ids` (or, when empty, every event of the target in the selected states).
/// The drain lock guarantees no drain is between selecting and moving its frontier.
pub fn requeue(
    store: &mut Store,
    lock: &DrainLock,
    target: &TargetRecord,
    event_ids: &[String],
    sel: RetrySelection,
) -> Result<RetryReport> {
    lock.guards(store)?;
    let statuses = sel.statuses();
    let mut report = RetryReport { target_id: target.target_id.clone(), ..Default::default() };
    let tx = store.conn_mut().transaction().ctx("cannot start the retry")?;
    let mut min_seq: Option<i64> = None;
    let candidates: Vec<(i64, String, Option<String>)> = if event_ids.is_empty() {
        let mut stmt = tx
            .prepare(
                "SELECT l.seq, e.event_id, l.status FROM ledger l JOIN events e ON e.seq = l.seq
                 WHERE l.target = ?1 AND l.epoch = ?2 AND l.status IN (SELECT value FROM json_each(?3)) ORDER BY l.seq",
            )
            .ctx("cannot read the ledger")?;
        let json = serde_json::to_string(&statuses).unwrap_or_default();
        stmt.query_map(params![target.id, target.epoch, json], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .ctx("cannot read the ledger")?
            .collect::<std::result::Result<_, _>>()
            .ctx("cannot read the ledger")?
    } else {
        let mut out = Vec::new();
        for id in event_ids {
            let row: Option<(i64, Option<String>)> = tx
                .query_row(
                    "SELECT e.seq, l.status FROM events e
                     LEFT JOIN ledger l ON l.seq = e.seq AND l.target = ?2 AND l.epoch = ?3 WHERE e.event_id = ?1",
                    params![id, target.id, target.epoch],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .ctx("cannot read the journal")?;
            let (seq, status) = row.ok_or_else(|| {
                Error::usage(
                    format!("no event with id {id} in the journal"),
                    "check the id with `kitty-sync inspect ID`",
                )
            })?;
            out.push((seq, id.clone(), status));
        }
        out
    };
    for (seq, event_id, status) in candidates {
        let eligible = status.as_deref().is_some_and(|s| statuses.contains(&s));
        if !eligible {
            report.skipped.push(SkippedEvent { event_id, status });
            continue;
        }
        tx.execute(
            "UPDATE ledger SET status = 'pending', reject_count = 0, completed_at = NULL, last_error = ?4
             WHERE target = ?1 AND epoch = ?2 AND seq = ?3",
            params![target.id, target.epoch, seq, REQUEUE_NOTE],
        )
        .ctx("cannot requeue the event")?;
        min_seq = Some(min_seq.map_or(seq, |m: i64| m.min(seq)));
        report.requeued.push(event_id);
    }
    if let Some(seq) = min_seq {
        target::lower_due_from(&tx, target.id, seq)?;
    }
    tx.commit().ctx("cannot commit the retry")?;
    Ok(report)
}

/// What `retry --not-consented` released.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConsentRelease {
    /// The project the release was limited to, if any.
    pub project: Option<String>,
    /// Events that may now be delivered to every target.
    pub released: Vec<String>,
}

/// Releases events imported from spec-kitty 3.2.7 that were captured before their project
/// opted in (`not_consented`, contract §12): every target may select them from now on. The
/// operator's decision is recorded, so a later import of the same project store never holds
/// them back again. `project` limits the release to events imported from that project's store.
pub fn release_not_consented(store: &mut Store, project: Option<&str>) -> Result<ConsentRelease> {
    let project = project.map(|p| p.trim().to_ascii_lowercase());
    let tx = store.conn_mut().transaction().ctx("cannot start the release")?;
    let released: Vec<(i64, String)> = {
        let mut stmt = tx
            .prepare(
                "UPDATE events SET drain_blocked_reason = NULL
                 WHERE drain_blocked_reason = 'not_consented'
                   AND (?1 IS NULL OR seq IN (SELECT seq FROM migration_provenance WHERE lower(source) = 'project:' || ?1))
                 RETURNING seq, event_id",
            )
            .ctx("cannot release the events")?;
        stmt.query_map(params![project], |r| Ok((r.get(0)?, r.get(1)?)))
            .ctx("cannot release the events")?
            .collect::<std::result::Result<_, _>>()
            .ctx("cannot release the events")?
    };
    let now = crate::clock::now_ms();
    for (seq, _) in &released {
        tx.execute("INSERT OR REPLACE INTO consent_releases (seq, released_at) VALUES (?1, ?2)", params![seq, now])
            .ctx("cannot record the release")?;
    }
    // Drains may already have walked past these events: every target's settled mark must
    // come back to the first one released.
    if let Some(first) = released.iter().map(|(seq, _)| *seq).min() {
        tx.execute("UPDATE targets SET due_from_seq = min(due_from_seq, ?1)", params![first])
            .ctx("cannot update the targets' delivery positions")?;
    }
    tx.commit().ctx("cannot commit the release")?;
    let mut released: Vec<(i64, String)> = released;
    released.sort();
    Ok(ConsentRelease { project, released: released.into_iter().map(|(_, id)| id).collect() })
}
