//! Reading the trigger-maintained counters, and rebuilding them from the rows (after a
//! re-drain starts a new epoch, and in tests that check the triggers).

use std::collections::HashMap;

use rusqlite::{Connection, params};

use crate::error::{Result, StoreContext};

/// Journal-wide counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalCounters {
    pub retained: i64,
    pub retained_bytes: i64,
    pub archived: i64,
    pub purged: i64,
    pub coalesced: i64,
    /// Distinct events terminally delivered to at least one target (current epochs).
    pub delivered_any: i64,
}

/// [`journal_counters`] of a store.
pub fn journal_counters_of(store: &crate::store::Store) -> Result<JournalCounters> {
    journal_counters(store.conn())
}

pub fn journal_counters(conn: &Connection) -> Result<JournalCounters> {
    let mut stmt = conn.prepare_cached("SELECT key, value FROM stats").ctx("cannot read counters")?;
    let map: HashMap<String, i64> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .ctx("cannot read counters")?
        .collect::<std::result::Result<_, _>>()
        .ctx("cannot read counters")?;
    let get = |k: &str| map.get(k).copied().unwrap_or(0);
    Ok(JournalCounters {
        retained: get("retained"),
        retained_bytes: get("retained_bytes"),
        archived: get("archived"),
        purged: get("purged"),
        coalesced: get("coalesced"),
        delivered_any: get("delivered_any"),
    })
}

/// One target's ledger counts for one epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetCounters {
    pub success: i64,
    pub duplicate: i64,
    pub pending: i64,
    pub failed_transient: i64,
    pub rejected: i64,
    pub terminal_failed: i64,
    /// Events whose only terminal delivery is to this target.
    pub exclusive: i64,
}

impl TargetCounters {
    pub fn delivered(&self) -> i64 {
        self.success + self.duplicate
    }

    pub fn rows(&self) -> i64 {
        self.success + self.duplicate + self.pending + self.failed_transient + self.rejected + self.terminal_failed
    }
}

pub fn target_counters(conn: &Connection, target: i64, epoch: i64) -> Result<TargetCounters> {
    let mut stmt = conn
        .prepare_cached("SELECT key, value FROM target_stats WHERE target = ?1 AND epoch = ?2")
        .ctx("cannot read target counters")?;
    let mut c = TargetCounters::default();
    let rows = stmt
        .query_map(params![target, epoch], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .ctx("cannot read target counters")?;
    for row in rows {
        let (key, value) = row.ctx("cannot read target counters")?;
        match key.as_str() {
            "success" => c.success = value,
            "duplicate" => c.duplicate = value,
            "pending" => c.pending = value,
            "failed_transient" => c.failed_transient = value,
            "rejected" => c.rejected = value,
            "terminal_failed" => c.terminal_failed = value,
            "exclusive" => c.exclusive = value,
            _ => {}
        }
    }
    Ok(c)
}

/// Counts first terminal deliveries to `target` (current `epoch`) of the events `seqs`, which
/// must not have been delivered to that target before: `delivered_targets` of each event,
/// `delivered_any`, and the `exclusive` counters (an event's only delivery so far was to
/// another target → that target loses it; no delivery so far → this target gains it).
/// Call it in the transaction that writes the ledger rows.
pub fn note_delivered(conn: &Connection, target: i64, epoch: i64, seqs: &[i64]) -> Result<()> {
    if seqs.is_empty() {
        return Ok(());
    }
    let list = serde_json::to_string(seqs).unwrap_or_else(|_| "[]".into());
    conn.execute("DROP TABLE IF EXISTS temp.newly_delivered", []).ctx("cannot count deliveries")?;
    conn.execute(
        "CREATE TEMP TABLE newly_delivered AS
         SELECT e.seq AS seq, e.delivered_targets AS before FROM json_each(?1) j JOIN events e ON e.seq = j.value",
        [&list],
    )
    .ctx("cannot count deliveries")?;
    conn.execute(NOTE_OTHERS_SQL, params![target]).ctx("cannot count deliveries")?;
    conn.execute(
        "UPDATE target_stats SET value = value + (SELECT count(*) FROM temp.newly_delivered WHERE before = 0)
         WHERE target = ?1 AND epoch = ?2 AND key = 'exclusive'",
        params![target, epoch],
    )
    .ctx("cannot count deliveries")?;
    conn.execute(
        "UPDATE stats SET value = value + (SELECT count(*) FROM temp.newly_delivered WHERE before = 0)
         WHERE key = 'delivered_any'",
        [],
    )
    .ctx("cannot count deliveries")?;
    conn.execute(
        "UPDATE events SET delivered_targets = delivered_targets + 1 WHERE seq IN (SELECT seq FROM temp.newly_delivered)",
        [],
    )
    .ctx("cannot count deliveries")?;
    conn.execute("DROP TABLE temp.newly_delivered", []).ctx("cannot count deliveries")?;
    Ok(())
}

/// Events delivered to exactly one other target until now stop being exclusive to it.
///
/// The batch drives the join (`CROSS JOIN` fixes the loop order, unary `+` keeps the status
/// test off the index): one ledger primary-key probe per batch event and other target. Left
/// to the planner, this walked every delivered ledger row of each other target per batch,
/// which made re-draining to a new target quadratic in the journal.
const NOTE_OTHERS_SQL: &str = "
UPDATE target_stats SET value = value - (
    SELECT count(*) FROM temp.newly_delivered AS n CROSS JOIN ledger AS l
    WHERE n.before = 1 AND l.target = target_stats.target AND l.epoch = target_stats.epoch AND l.seq = n.seq
      AND +l.status IN ('success', 'duplicate'))
WHERE key = 'exclusive' AND target <> ?1
  AND epoch = (SELECT t.epoch FROM targets t WHERE t.id = target_stats.target)";

/// Recomputes every counter from the rows. O(journal); used when an epoch changes.
pub fn rebuild(conn: &Connection) -> Result<()> {
    conn.execute_batch(REBUILD_SQL).ctx("cannot rebuild the store counters")
}

const REBUILD_SQL: &str = "
UPDATE events SET delivered_targets = (
    SELECT count(*) FROM ledger l JOIN targets t ON t.id = l.target AND t.epoch = l.epoch
    WHERE l.seq = events.seq AND l.status IN ('success', 'duplicate'));
UPDATE stats SET value = CASE key
    WHEN 'retained' THEN (SELECT count(*) FROM events WHERE state = 0)
    WHEN 'retained_bytes' THEN (SELECT coalesce(sum(payload_bytes), 0) FROM events WHERE state = 0)
    WHEN 'archived' THEN (SELECT count(*) FROM events WHERE state = 1)
    WHEN 'purged' THEN (SELECT count(*) FROM events WHERE state = 2)
    WHEN 'coalesced' THEN (SELECT count(*) FROM events WHERE coalesced_into IS NOT NULL)
    WHEN 'delivered_any' THEN (SELECT count(*) FROM events WHERE delivered_targets > 0)
    ELSE value END;
DELETE FROM target_stats;
INSERT INTO target_stats (target, epoch, key)
    SELECT t.id, t.epoch, k.column1 FROM targets t, (VALUES ('success'), ('duplicate'), ('pending'),
        ('failed_transient'), ('rejected'), ('terminal_failed'), ('exclusive')) AS k;
INSERT INTO target_stats (target, epoch, key, value)
    SELECT target, epoch, status, count(*) FROM ledger GROUP BY target, epoch, status
    ON CONFLICT(target, epoch, key) DO UPDATE SET value = excluded.value;
INSERT INTO target_stats (target, epoch, key, value)
    SELECT l.target, l.epoch, 'exclusive', count(*) FROM ledger l
    JOIN targets t ON t.id = l.target AND t.epoch = l.epoch
    JOIN events e ON e.seq = l.seq
    WHERE l.status IN ('success', 'duplicate') AND e.delivered_targets = 1
    GROUP BY l.target, l.epoch
    ON CONFLICT(target, epoch, key) DO UPDATE SET value = excluded.value;
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::home::Home;
    use crate::store::Store;
    use proptest::prelude::*;

    /// Every counter, as a comparable snapshot.
    fn snapshot(conn: &Connection) -> (JournalCounters, Vec<(i64, i64, String, i64)>) {
        let mut stmt = conn.prepare("SELECT target, epoch, key, value FROM target_stats ORDER BY 1, 2, 3").unwrap();
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).unwrap();
        (journal_counters(conn).unwrap(), rows.map(|r| r.unwrap()).collect())
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16),
        Deliver {
            seq: u8,
            target: u8,
            status: u8,
        },
        State {
            seq: u8,
            state: u8,
        },
        Coalesce(u8),
        /// gc's purge, which adjusts the counters itself instead of through the trigger.
        Purge(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u16..2000).prop_map(Op::Insert),
            (1u8..30, 1u8..4, 0u8..6).prop_map(|(seq, target, status)| Op::Deliver { seq, target, status }),
            (1u8..30, 0u8..3).prop_map(|(seq, state)| Op::State { seq, state }),
            (1u8..30).prop_map(Op::Coalesce),
            (1u8..30).prop_map(Op::Purge),
        ]
    }

    const STATUSES: [&str; 6] = ["success", "duplicate", "pending", "failed_transient", "rejected", "terminal_failed"];

    fn apply(conn: &Connection, op: &Op, next: &mut i64) {
        match op {
            Op::Insert(bytes) => {
                *next += 1;
                conn.execute(
                    "INSERT INTO events (seq, event_id, event_type, payload_bytes, captured_at, payload_sha256)
                     VALUES (?1, printf('E%d', ?1), 'T', ?2, 0, x'00')",
                    params![*next, i64::from(*bytes)],
                )
                .unwrap();
            }
            Op::Deliver { seq, target, status } => {
                let (seq, target, status) = (i64::from(*seq), i64::from(*target), STATUSES[usize::from(*status)]);
                let before: Option<String> = conn
                    .query_row(
                        "SELECT status FROM ledger WHERE target = ?1 AND epoch = 0 AND seq = ?2",
                        params![target, seq],
                        |r| r.get(0),
                    )
                    .ok();
                let was_delivered = matches!(before.as_deref(), Some("success" | "duplicate"));
                // The dispatcher's rules: a delivered row is never demoted, and first
                // deliveries are counted by note_delivered in the same transaction.
                let inserted = conn.execute(
                    "INSERT INTO ledger (target, epoch, seq, status) SELECT ?1, 0, ?2, ?3 WHERE EXISTS (SELECT 1 FROM events WHERE seq = ?2)
                     ON CONFLICT(target, epoch, seq) DO UPDATE SET status = CASE WHEN ledger.status IN ('success', 'duplicate') THEN ledger.status ELSE excluded.status END",
                    params![target, seq, status],
                )
                .unwrap();
                if inserted > 0 && !was_delivered && matches!(status, "success" | "duplicate") {
                    note_delivered(conn, target, 0, &[seq]).unwrap();
                }
            }
            Op::State { seq, state } => {
                conn.execute(
                    "UPDATE events SET state = ?2 WHERE seq = ?1",
                    params![i64::from(*seq), i64::from(*state)],
                )
                .unwrap();
            }
            Op::Coalesce(seq) => {
                conn.execute("UPDATE events SET coalesced_into = 'X' WHERE seq = ?1", [i64::from(*seq)]).unwrap();
            }
            Op::Purge(seq) => {
                let seq = i64::from(*seq);
                crate::delivery::retention::purge_range(
                    conn,
                    seq,
                    seq + 2,
                    &crate::delivery::retention::Needed { untyped: 0, typed: None, exact: None },
                    1,
                )
                .unwrap();
            }
        }
    }

    /// Virtual-machine steps of `NOTE_OTHERS_SQL` for one 100-event batch of a new target,
    /// with `others` events already delivered to another target (and, from `third` on, to a
    /// second one as well).
    fn note_others_steps(others: i64) -> i32 {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&Home::at(dir.path())).unwrap();
        let conn = store.conn();
        conn.execute_batch(&format!(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {others})
             INSERT INTO events (seq, event_id, event_type, payload_bytes, captured_at, payload_sha256)
                 SELECT x, 'E' || x, 'T', 10, 0, x'00' FROM c;
             INSERT INTO targets (id, target_id, kind, canonical_url, first_seen_at, last_seen_at)
                 VALUES (1, 'a', 'external', 'a', 0, 0), (2, 'b', 'external', 'b', 0, 0), (3, 'c', 'external', 'c', 0, 0);
             INSERT INTO ledger (target, epoch, seq, status) SELECT 1, 0, seq, 'success' FROM events;
             INSERT INTO ledger (target, epoch, seq, status) SELECT 2, 0, seq, 'duplicate' FROM events WHERE seq % 2 = 0;
             UPDATE events SET delivered_targets = 1 + (seq % 2 = 0);
             CREATE TEMP TABLE newly_delivered AS
                 SELECT seq, delivered_targets AS before FROM events WHERE seq BETWEEN 1000 AND 1099;"
        ))
        .unwrap();
        let mut stmt = conn.prepare(NOTE_OTHERS_SQL).unwrap();
        stmt.execute([3]).unwrap();
        stmt.get_status(rusqlite::StatementStatus::VmStep)
    }

    /// Regression (issue 10, defect 0): the per-batch bookkeeping of a drain to a new target
    /// must not grow with what other targets already hold.
    #[test]
    fn counting_a_batch_costs_the_same_whatever_other_targets_hold() {
        let small = note_others_steps(2_000);
        let large = note_others_steps(40_000);
        assert!(large <= small + small / 10, "steps grew with the ledger: {small} at 2k, {large} at 40k");
    }

    #[test]
    fn note_delivered_keeps_exclusive_counts_for_a_second_and_third_target() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&Home::at(dir.path())).unwrap();
        let conn = store.conn();
        conn.execute_batch(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 10)
             INSERT INTO events (seq, event_id, event_type, payload_bytes, captured_at, payload_sha256)
                 SELECT x, 'E' || x, 'T', 10, 0, x'00' FROM c;
             INSERT INTO targets (id, target_id, kind, canonical_url, first_seen_at, last_seen_at)
                 VALUES (1, 'a', 'external', 'a', 0, 0), (2, 'b', 'external', 'b', 0, 0), (3, 'c', 'external', 'c', 0, 0);",
        )
        .unwrap();
        let deliver = |target: i64, seqs: &[i64]| {
            for seq in seqs {
                conn.execute(
                    "INSERT INTO ledger (target, epoch, seq, status) VALUES (?1, 0, ?2, 'success')",
                    [target, *seq],
                )
                .unwrap();
            }
            note_delivered(conn, target, 0, seqs).unwrap();
        };
        deliver(1, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        deliver(2, &[1, 2, 3, 4, 5, 6]);
        deliver(3, &[5, 6, 7, 8]);
        let exclusive = |t| target_counters(conn, t, 0).unwrap().exclusive;
        assert_eq!((exclusive(1), exclusive(2), exclusive(3)), (2, 0, 0), "9 and 10 only reached target 1");
        let live = snapshot(conn);
        rebuild(conn).unwrap();
        assert_eq!(live, snapshot(conn));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// The triggers keep exactly the counts a full recomputation finds.
        #[test]
        fn triggers_agree_with_rebuild(ops in proptest::collection::vec(op(), 1..120)) {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&Home::at(dir.path())).unwrap();
            let conn = store.conn();
            for id in 1..=3 {
                conn.execute(
                    "INSERT INTO targets (id, target_id, kind, canonical_url, first_seen_at, last_seen_at) VALUES (?1, printf('t%d', ?1), 'external', printf('u%d', ?1), 0, 0)",
                    [id],
                ).unwrap();
            }
            let mut next = 0;
            conn.execute_batch("BEGIN").unwrap();
            for op in &ops {
                apply(conn, op, &mut next);
            }
            conn.execute_batch("COMMIT").unwrap();
            let live = snapshot(conn);
            rebuild(conn).unwrap();
            prop_assert_eq!(live, snapshot(conn));
        }
    }
}
