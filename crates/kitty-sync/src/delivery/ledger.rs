//! Recording what became of each event for one target: the ledger row (upsert) and an
//! attempt row per event, plus the delivery counters, in one transaction per call.

use std::collections::HashSet;

use rusqlite::{Connection, params};

use super::wire::Outcome;
use crate::error::{Result, StoreContext};
use crate::store::selection::settled_sql;

/// Which ledger a result belongs to: a target in its current epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerKey {
    pub target: i64,
    pub epoch: i64,
}

/// One event's result of one attempt.
#[derive(Debug, Clone)]
pub struct EventResult {
    pub seq: i64,
    pub outcome: Outcome,
    pub http_status: Option<u16>,
    pub error: Option<String>,
}

/// A delivered row is never demoted; errors describe the latest attempt only.
const UPSERT_LEDGER: &str = "
INSERT INTO ledger (target, epoch, seq, status, attempt_count, reject_count, first_attempted_at, last_attempted_at,
                    completed_at, last_http_status, last_error)
VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6, ?6, ?7, ?8, ?9)
ON CONFLICT(target, epoch, seq) DO UPDATE SET
    status = CASE WHEN ledger.status IN ('success', 'duplicate') THEN ledger.status ELSE excluded.status END,
    attempt_count = ledger.attempt_count + 1,
    reject_count = ledger.reject_count + excluded.reject_count,
    last_attempted_at = excluded.last_attempted_at,
    completed_at = coalesce(ledger.completed_at, excluded.completed_at),
    last_http_status = excluded.last_http_status,
    last_error = excluded.last_error";

const INSERT_ATTEMPT: &str =
    "INSERT INTO attempts (target, epoch, seq, at, outcome, http_status, error) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";

/// Settled ledger rows of a seq range.
const SETTLED_IN_RANGE: &str = concat!(
    "SELECT seq FROM ledger AS l WHERE l.target = ?1 AND l.epoch = ?2 AND l.seq BETWEEN ?3 AND ?4 AND ",
    settled_sql!("l")
);

/// Records `results` in one transaction. Events delivered here for the first time are
/// counted too (selected events were not delivered to this target before).
pub fn record(conn: &mut Connection, key: LedgerKey, results: &[EventResult], now_ms: i64) -> Result<()> {
    let tx = conn.transaction().ctx("cannot start recording")?;
    {
        let mut upsert = tx.prepare_cached(UPSERT_LEDGER).ctx("cannot prepare ledger update")?;
        let mut attempt = tx.prepare_cached(INSERT_ATTEMPT).ctx("cannot prepare attempt insert")?;
        for r in results {
            let completed = r.outcome.is_terminal().then_some(now_ms);
            let rejected = i64::from(r.outcome == Outcome::Rejected);
            let status = r.outcome.as_str();
            upsert
                .execute(params![
                    key.target,
                    key.epoch,
                    r.seq,
                    status,
                    rejected,
                    now_ms,
                    completed,
                    r.http_status,
                    r.error
                ])
                .ctx("cannot record the delivery outcome")?;
            attempt
                .execute(params![key.target, key.epoch, r.seq, now_ms, status, r.http_status, r.error])
                .ctx("cannot record the attempt")?;
        }
    }
    let delivered: Vec<i64> = results.iter().filter(|r| r.outcome.is_delivered()).map(|r| r.seq).collect();
    crate::store::stats::note_delivered(&tx, key.target, key.epoch, &delivered)?;
    tx.commit().ctx("cannot commit delivery outcomes")
}

/// The seqs in `first..=last` that need nothing more from the target.
pub fn settled_between(conn: &Connection, key: LedgerKey, first: i64, last: i64) -> Result<HashSet<i64>> {
    let mut stmt = conn.prepare_cached(SETTLED_IN_RANGE).ctx("cannot prepare")?;
    let rows =
        stmt.query_map(params![key.target, key.epoch, first, last], |r| r.get(0)).ctx("cannot read the ledger")?;
    rows.collect::<std::result::Result<_, _>>().ctx("cannot read the ledger")
}
