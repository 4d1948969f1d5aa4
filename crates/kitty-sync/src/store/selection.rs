//! "Undelivered for target T in capture order": the one query every drain pages through.
//!
//! It is a range scan of the `events` primary key from a keyset position (`seq >= ?`), with
//! one primary-key probe into `ledger` per candidate; it never sorts and never materialises
//! the journal, so a page costs the same at a million events as at ten.

use rusqlite::{Connection, params};

use crate::delivery::wire::Outcome;
use crate::error::{Result, StoreContext};

/// A rejected event is re-sent until the same target has rejected it this many times.
pub const REJECT_LIMIT: i64 = 3;

/// The settled rows that are no delivery: parked, or held after [`REJECT_LIMIT`] rejections
/// (undelivered until an operator's `retry`). Part of [`settled_sql!`], spelled once.
macro_rules! held_sql {
    ($l:literal) => {
        concat!(
            "(",
            $l,
            ".status = 'terminal_failed' OR (",
            $l,
            ".status = 'rejected' AND ",
            $l,
            ".reject_count >= 3))"
        )
    };
}
pub(crate) use held_sql;

/// THE settled rule: an event needs nothing more from a target (until an operator's
/// `retry`) once that target's ledger row says success, duplicate or parked, or rejected
/// [`REJECT_LIMIT`] times. [`is_settled`] is the same rule for a row in hand; a test keeps
/// the two equal.
///
/// `settled_sql!("l")` is the predicate over the ledger row aliased `l`, as a literal so
/// it can be part of `const` statements.
macro_rules! settled_sql {
    ($l:literal) => {
        concat!("(", $l, ".status IN ('success', 'duplicate') OR ", $crate::store::selection::held_sql!($l), ")")
    };
}
pub(crate) use settled_sql;

/// Retained, not coalesced away, and held for the target (`?1`, epoch `?2`).
/// INDEXED BY: the planner otherwise walks the target's whole ledger by primary key.
const HELD_FROM: &str = concat!(
    "FROM ledger l INDEXED BY ledger_by_status JOIN events e ON e.seq = l.seq
     WHERE l.target = ?1 AND l.epoch = ?2 AND l.status IN ('terminal_failed', 'rejected') AND ",
    held_sql!("l"),
    " AND e.state = 0 AND e.coalesced_into IS NULL"
);

/// How many retained events are held for the target: (count, smallest seq).
pub fn held(conn: &Connection, target: i64, epoch: i64) -> Result<(i64, Option<i64>)> {
    conn.prepare_cached(&format!("SELECT count(*), min(l.seq) {HELD_FROM}"))
        .and_then(|mut s| s.query_row(params![target, epoch], |r| Ok((r.get(0)?, r.get(1)?))))
        .ctx("cannot read the ledger")
}

/// [`settled_sql!`] for a ledger row in hand.
pub fn is_settled(outcome: Outcome, reject_count: i64) -> bool {
    outcome.is_terminal() || (outcome == Outcome::Rejected && reject_count >= REJECT_LIMIT)
}

/// What "due" means, shared by the selection and the count: retained, not coalesced away,
/// and no settled ledger row of the current epoch. `?1` is the keyset position, `?2`/`?3`
/// the target and epoch.
macro_rules! due_where {
    ($($team:tt)*) => {
        concat!(
            "WHERE e.seq >= ?1
  AND +e.state = 0  -- unary + keeps the planner on the seq range, not the state index
  AND e.coalesced_into IS NULL
  -- Python captured it before its project opted in (contract §12): no target until the
  -- operator runs `retry --not-consented`; the only stored reason that blocks selection.
  AND e.drain_blocked_reason IS NOT 'not_consented'",
            $($team)*,
            "
  AND NOT EXISTS (
      SELECT 1 FROM ledger AS l
      WHERE l.target = ?2 AND l.epoch = ?3 AND l.seq = e.seq AND ",
            settled_sql!("l"),
            ")"
        )
    };
}

/// Team isolation and type filters as their own statements rather than `?4 IS NULL OR ...`:
/// a parameter that decides a term makes SQLite re-plan on every bind, and the plan proven by
/// the tests must be the one that runs. `?5` is the team, `?6` the type filter (a JSON array).
macro_rules! select_page {
    ($columns:literal, $($extra:tt)*) => {
        concat!(
            "SELECT ", $columns, " FROM events AS e JOIN payloads AS p ON p.seq = e.seq\n",
            due_where!($($extra)*),
            "\nORDER BY e.seq LIMIT ?4"
        )
    };
}
macro_rules! count_due {
    ($($extra:tt)*) => {
        concat!("SELECT count(*) FROM events AS e\n", due_where!($($extra)*))
    };
}
macro_rules! team_term {
    () => {
        "\n  AND (e.capture_team IS NULL OR e.capture_team = ?5)"
    };
}
macro_rules! types_term {
    () => {
        "\n  AND +e.event_type IN (SELECT value FROM json_each(?6))"
    };
}
pub const SELECT_DUE_SQL: &str = select_page!("e.seq, e.event_id, p.envelope", "");
pub const SELECT_DUE_TEAM_SQL: &str = select_page!("e.seq, e.event_id, p.envelope", team_term!());
pub const SELECT_DUE_TYPES_SQL: &str = select_page!("e.seq, e.event_id, p.envelope", types_term!());
pub const SELECT_DUE_TEAM_TYPES_SQL: &str =
    select_page!("e.seq, e.event_id, p.envelope", concat!(team_term!(), types_term!()));
// Heads: the page without the bytes, enough to cut a batch and to recognise the same batch
// selected for another target (`length()` of a blob reads no content).
pub const SELECT_HEADS_SQL: &str = select_page!("e.seq, e.event_id, length(p.envelope)", "");
pub const SELECT_HEADS_TEAM_SQL: &str = select_page!("e.seq, e.event_id, length(p.envelope)", team_term!());
pub const SELECT_HEADS_TYPES_SQL: &str = select_page!("e.seq, e.event_id, length(p.envelope)", types_term!());
pub const SELECT_HEADS_TEAM_TYPES_SQL: &str =
    select_page!("e.seq, e.event_id, length(p.envelope)", concat!(team_term!(), types_term!()));
pub const COUNT_DUE_SQL: &str = count_due!("");
pub const COUNT_DUE_TEAM_SQL: &str = count_due!(team_term!());
pub const COUNT_DUE_TYPES_SQL: &str = count_due!(types_term!());
pub const COUNT_DUE_TEAM_TYPES_SQL: &str = count_due!(concat!(team_term!(), types_term!()));

/// The statement for a query's team and type filter, from one of the four `(plain, team,
/// types, both)` variants, and its named parameters.
fn statement(
    query: &DueQuery<'_>,
    variants: [&'static str; 4],
) -> (&'static str, Vec<(&'static str, rusqlite::types::Value)>) {
    let mut values: Vec<(&'static str, rusqlite::types::Value)> =
        vec![("?1", query.from_seq.into()), ("?2", query.target.into()), ("?3", query.epoch.into())];
    if let Some(team) = query.team {
        values.push(("?5", team.to_string().into()));
    }
    if let Some(types) = query.types {
        values.push(("?6", types.to_string().into()));
    }
    let sql = match (query.team.is_some(), query.types.is_some()) {
        (false, false) => variants[0],
        (true, false) => variants[1],
        (false, true) => variants[2],
        (true, true) => variants[3],
    };
    (sql, values)
}

fn bind<'v>(values: &'v [(&'static str, rusqlite::types::Value)]) -> Vec<(&'static str, &'v dyn rusqlite::ToSql)> {
    values.iter().map(|(k, v)| (*k, v as &dyn rusqlite::ToSql)).collect()
}

/// How many events are due from `query.from_seq` on (`limit` is ignored).
pub fn count_due(conn: &Connection, query: DueQuery<'_>) -> Result<u64> {
    let (sql, values) =
        statement(&query, [COUNT_DUE_SQL, COUNT_DUE_TEAM_SQL, COUNT_DUE_TYPES_SQL, COUNT_DUE_TEAM_TYPES_SQL]);
    conn.prepare_cached(sql)
        .and_then(|mut s| s.query_row(bind(&values).as_slice(), |r| r.get::<_, i64>(0)))
        .map(|n| n as u64)
        .ctx("cannot count due events")
}

/// One event due for delivery, before its bytes are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueHead {
    pub seq: i64,
    pub event_id: String,
    pub envelope_len: usize,
}

/// The due page of [`select_due`] without the stored bytes.
pub fn select_due_heads(conn: &Connection, query: DueQuery<'_>) -> Result<Vec<DueHead>> {
    let read = |r: &rusqlite::Row<'_>| {
        Ok(DueHead { seq: r.get(0)?, event_id: r.get(1)?, envelope_len: r.get::<_, i64>(2)?.max(0) as usize })
    };
    page(
        conn,
        &query,
        [SELECT_HEADS_SQL, SELECT_HEADS_TEAM_SQL, SELECT_HEADS_TYPES_SQL, SELECT_HEADS_TEAM_TYPES_SQL],
        read,
    )
}

/// One keyset page of due rows through the statement variant for the query's filters.
fn page<T>(
    conn: &Connection,
    query: &DueQuery<'_>,
    variants: [&'static str; 4],
    read: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>> {
    let (sql, mut values) = statement(query, variants);
    values.push(("?4", query.limit.into()));
    let rows: rusqlite::Result<Vec<T>> =
        conn.prepare_cached(sql).and_then(|mut s| s.query_map(bind(&values).as_slice(), read)?.collect());
    rows.ctx("cannot select due events")
}

/// The stored bytes of `heads`, in their order (one primary-key read each).
pub fn load_envelopes(conn: &Connection, heads: &[DueHead]) -> Result<Vec<DueEvent>> {
    let mut stmt =
        conn.prepare_cached("SELECT envelope FROM payloads WHERE seq = ?1").ctx("cannot read the journal")?;
    heads
        .iter()
        .map(|h| {
            let envelope = stmt.query_row([h.seq], |r| r.get(0)).ctx("cannot read the journal")?;
            Ok(DueEvent { seq: h.seq, event_id: h.event_id.clone(), envelope })
        })
        .collect()
}

/// One event due for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueEvent {
    pub seq: i64,
    pub event_id: String,
    pub envelope: Vec<u8>,
}

/// Which target, and where the page starts.
#[derive(Debug, Clone, Copy)]
pub struct DueQuery<'a> {
    pub target: i64,
    pub epoch: i64,
    /// The Teamspace team of the target; `None` for targets without team isolation.
    pub team: Option<&'a str>,
    /// The target's type filter as a JSON array of event types; `None` for every type.
    pub types: Option<&'a str>,
    pub from_seq: i64,
    pub limit: i64,
}

pub fn select_due(conn: &Connection, query: DueQuery<'_>) -> Result<Vec<DueEvent>> {
    let read = |r: &rusqlite::Row<'_>| Ok(DueEvent { seq: r.get(0)?, event_id: r.get(1)?, envelope: r.get(2)? });
    page(conn, &query, [SELECT_DUE_SQL, SELECT_DUE_TEAM_SQL, SELECT_DUE_TYPES_SQL, SELECT_DUE_TEAM_TYPES_SQL], read)
}

/// In one read snapshot: when nothing is due from `query.from_seq` on, the seq just past the
/// journal's end (so an event appended meanwhile cannot be skipped); `None` otherwise.
pub fn end_if_nothing_due(conn: &mut Connection, query: DueQuery<'_>) -> Result<Option<i64>> {
    let tx = conn.transaction().ctx("cannot start a read")?;
    let end = if select_due(&tx, DueQuery { limit: 1, ..query })?.is_empty() {
        let max_seq: i64 = tx
            .query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| r.get(0))
            .ctx("cannot read the journal")?;
        Some(max_seq + 1)
    } else {
        None
    };
    tx.commit().ctx("cannot end a read")?;
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::home::Home;
    use crate::store::Store;
    use rusqlite::params;

    fn plan(conn: &Connection, sql: &str) -> Vec<String> {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let count = stmt.parameter_count();
        let values: Vec<rusqlite::types::Value> = (0..count)
            .map(|i| match i {
                4 => "team".to_string().into(),
                5 => r#"["T"]"#.to_string().into(),
                _ => 1i64.into(),
            })
            .collect();
        stmt.query_map(rusqlite::params_from_iter(values), |r| r.get::<_, String>(3))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    }

    #[test]
    fn selection_is_a_keyset_range_scan_with_index_probes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&Home::at(dir.path())).unwrap();
        let heads = [SELECT_HEADS_SQL, SELECT_HEADS_TEAM_SQL, SELECT_HEADS_TYPES_SQL, SELECT_HEADS_TEAM_TYPES_SQL];
        for sql in [SELECT_DUE_SQL, SELECT_DUE_TEAM_SQL, SELECT_DUE_TYPES_SQL, SELECT_DUE_TEAM_TYPES_SQL]
            .into_iter()
            .chain(heads)
        {
            let steps = plan(store.conn(), sql);
            let joined = steps.join("\n");
            // The journal is walked by its primary key from the keyset position...
            assert!(steps.iter().any(|s| s.starts_with("SEARCH e USING INTEGER PRIMARY KEY (rowid>?)")), "{joined}");
            // ...each candidate's payload and ledger row are primary-key probes...
            assert!(steps.iter().any(|s| s.starts_with("SEARCH p USING INTEGER PRIMARY KEY (rowid=?)")), "{joined}");
            assert!(
                steps.iter().any(|s| s.contains("SEARCH l USING PRIMARY KEY (target=? AND epoch=? AND seq=?)")),
                "{joined}"
            );
            // ...and nothing is scanned in full or sorted.
            // (The type filter's own list is the only scan: a few names, once per statement.)
            assert!(!steps.iter().any(|s| s.starts_with("SCAN") && !s.contains("json_each")), "{joined}");
            assert!(!joined.contains("TEMP B-TREE"), "{joined}");
        }
    }

    #[test]
    fn settled_rule_in_sql_equals_the_rule_in_rust() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&Home::at(dir.path())).unwrap();
        let outcomes = [
            Outcome::Success,
            Outcome::Duplicate,
            Outcome::Pending,
            Outcome::FailedTransient,
            Outcome::Rejected,
            Outcome::TerminalFailed,
        ];
        let sql = concat!("SELECT ", settled_sql!("l"), " FROM (SELECT ?1 AS status, ?2 AS reject_count) AS l");
        for outcome in outcomes {
            for rejects in 0..=REJECT_LIMIT + 1 {
                let in_sql: bool =
                    store.conn().query_row(sql, params![outcome.as_str(), rejects], |r| r.get(0)).unwrap();
                assert_eq!(in_sql, is_settled(outcome, rejects), "{outcome:?} rejected {rejects} times");
            }
        }
    }

    fn seed(store: &Store, n: i64) {
        let conn = store.conn();
        for seq in 1..=n {
            conn.execute(
                "INSERT INTO events (seq, event_id, event_type, payload_bytes, captured_at, payload_sha256, capture_team)
                 VALUES (?1, printf('01K%023d', ?1), 'T', 2, 0, x'00', CASE WHEN ?1 % 5 = 0 THEN 'other' ELSE NULL END)",
                [seq],
            )
            .unwrap();
            conn.execute("INSERT INTO payloads (seq, envelope) VALUES (?1, CAST('{}' AS BLOB))", [seq]).unwrap();
        }
    }

    #[test]
    fn selection_skips_settled_coalesced_isolated_and_held_events() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&Home::at(dir.path())).unwrap();
        seed(&store, 13);
        let conn = store.conn();
        conn.execute_batch(
            "INSERT INTO targets (id, target_id, kind, canonical_url, first_seen_at, last_seen_at) VALUES (1, 't1', 'external', 'https://a', 0, 0);
             INSERT INTO ledger (target, epoch, seq, status) VALUES (1, 0, 1, 'success'), (1, 0, 2, 'duplicate'),
                (1, 0, 3, 'terminal_failed'), (1, 0, 4, 'failed_transient'), (1, 0, 6, 'pending'),
                (1, 0, 7, 'success'), (1, 1, 8, 'success');
             INSERT INTO ledger (target, epoch, seq, status, reject_count) VALUES (1, 0, 9, 'rejected', 2), (1, 0, 11, 'rejected', 3);
             UPDATE events SET coalesced_into = 'x' WHERE seq = 12;
             UPDATE events SET drain_blocked_reason = 'saas_disabled' WHERE seq = 4;
             UPDATE events SET drain_blocked_reason = 'not_consented' WHERE seq = 13;
             UPDATE events SET state = 1 WHERE seq = 6;",
        )
        .unwrap();
        let seqs = |team: Option<&str>, from: i64, limit: i64| -> Vec<i64> {
            select_due(conn, DueQuery { target: 1, epoch: 0, team, types: None, from_seq: from, limit })
                .unwrap()
                .into_iter()
                .map(|e| e.seq)
                .collect()
        };
        // 1-3,7 settled; 6 archived; 11 held after 3 rejections; 12 coalesced away;
        // 8's success belongs to another epoch; 5 and 10 belong to team "other"; 13 waits for
        // consent (4's capture-time reason does not block).
        assert_eq!(seqs(None, 0, 100), vec![4, 5, 8, 9, 10]);
        assert_eq!(seqs(Some("mine"), 0, 100), vec![4, 8, 9]);
        assert_eq!(seqs(Some("other"), 0, 100), vec![4, 5, 8, 9, 10]);
        // Keyset pages.
        assert_eq!(seqs(None, 0, 2), vec![4, 5]);
        assert_eq!(seqs(None, 6, 2), vec![8, 9]);
        assert_eq!(seqs(None, 11, 2), Vec::<i64>::new());
    }
}
