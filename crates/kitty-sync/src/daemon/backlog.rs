//! How far behind a target is: its undelivered count (the `status` definition) and the
//! capture time of its oldest undelivered event (what `--max-lag` compares).

use rusqlite::OptionalExtension;

use crate::delivery::target::{self, TargetIdentity};
use crate::error::{Result, StoreContext};
use crate::status::undelivered;
use crate::store::Store;
use crate::store::selection::{DueQuery, count_due, held, select_due};
use crate::store::stats::journal_counters;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub undelivered_count: i64,
    /// Epoch milliseconds.
    pub oldest_undelivered_ms: Option<i64>,
}

/// `types`: the target's type filter (contract §9): events of other types are never
/// undelivered for it.
pub fn backlog(
    store: &Store,
    identity: &TargetIdentity,
    team: Option<&str>,
    types: Option<&[String]>,
) -> Result<Backlog> {
    let record = target::find(store.conn(), identity)?;
    let types = types.map(target::encode_types).transpose()?;
    // A target never drained has no ledger rows: every retained event of its team is due.
    let (id, epoch, from_seq) = record.as_ref().map_or((-1, 0, 0), |r| (r.id, r.epoch, r.due_from_seq));
    let due = DueQuery { target: id, epoch, team, types: types.as_deref(), from_seq, limit: 1 };
    let undelivered_count = match types {
        // Due for the filtered target, plus what is parked or held for it.
        Some(_) => count_due(store.conn(), due)? as i64 + held_of(store, record.as_ref())?.0,
        None => undelivered(store, record.as_ref(), team, &journal_counters(store.conn())?)?,
    };
    if undelivered_count == 0 {
        return Ok(Backlog::default());
    }
    let first_due = select_due(store.conn(), due)?.first().map(|e| e.seq);
    let first_stuck = held_of(store, record.as_ref())?.1;
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

/// Events parked or held after rejections for the target: (count, smallest seq).
fn held_of(store: &Store, record: Option<&target::TargetRecord>) -> Result<(i64, Option<i64>)> {
    match record {
        Some(r) => held(store.conn(), r.id, r.epoch),
        None => Ok((0, None)),
    }
}
