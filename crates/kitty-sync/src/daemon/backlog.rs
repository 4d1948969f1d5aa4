//! How far behind a target is: its undelivered count (the `status` definition) and the
//! capture time of its oldest undelivered event (what `--max-lag` compares).

use rusqlite::{OptionalExtension, params};

use crate::delivery::target::{self, TargetIdentity};
use crate::error::{Result, StoreContext};
use crate::status::undelivered;
use crate::store::Store;
use crate::store::selection::{DueQuery, select_due};
use crate::store::stats::journal_counters;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub undelivered_count: i64,
    /// Epoch milliseconds.
    pub oldest_undelivered_ms: Option<i64>,
}

pub fn backlog(store: &Store, identity: &TargetIdentity, team: Option<&str>) -> Result<Backlog> {
    let record = target::find(store.conn(), identity)?;
    let counters = journal_counters(store.conn())?;
    let undelivered_count = undelivered(store, record.as_ref(), team, &counters)?;
    if undelivered_count == 0 {
        return Ok(Backlog::default());
    }
    // A target never drained has no ledger rows: every retained event of its team is due.
    let (id, epoch, from_seq) = record.as_ref().map_or((-1, 0, 0), |r| (r.id, r.epoch, r.due_from_seq));
    let first_due =
        select_due(store.conn(), DueQuery { target: id, epoch, team, from_seq, limit: 1 })?.first().map(|e| e.seq);
    let first_stuck = match &record {
        Some(r) => first_stuck(store, r.id, r.epoch)?,
        None => None,
    };
    let oldest_seq = [first_due, first_stuck].into_iter().flatten().min();
    let oldest_undelivered_ms = match oldest_seq {
        Some(seq) => store
            .conn()
            .query_row("SELECT captured_at FROM events WHERE seq = ?1", [seq], |r| r.get(0))
            .optional()
            .ctx("cannot read the journal")?,
        None => None,
    };
    Ok(Backlog { undelivered_count, oldest_undelivered_ms })
}

/// The oldest event parked or held after rejections (undelivered until an operator retries).
fn first_stuck(store: &Store, target: i64, epoch: i64) -> Result<Option<i64>> {
    store
        .conn()
        .query_row(
            "SELECT min(l.seq) FROM ledger l INDEXED BY ledger_by_status JOIN events e ON e.seq = l.seq
             WHERE l.target = ?1 AND l.epoch = ?2 AND l.status IN ('terminal_failed', 'rejected')
               AND (l.status = 'terminal_failed' OR l.reject_count >= 3)
               AND e.state = 0 AND e.coalesced_into IS NULL",
            params![target, epoch],
            |r| r.get(0),
        )
        .ctx("cannot read the ledger")
}
