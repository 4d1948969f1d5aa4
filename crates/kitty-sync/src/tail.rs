//! The journal as a stream (`kitty-sync tail`): stored envelopes in capture order, read in
//! keyset pages (`seq > position`) so a reader can stop, resume, or follow new captures
//! without ever re-reading what it has seen. Read-only: the store is opened per page the way
//! every read-only command opens it, so no file is created and a store that appears later is
//! picked up.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OptionalExtension};

use crate::error::{Error, Result, StoreContext};
use crate::home::Home;
use crate::store::Store;

/// Archived events are included (their payload is still there); purged ones have no payload
/// row, and coalesced-away ones are never delivered, so neither belongs to the stream.
/// `+e.state` keeps the planner on the `seq` range instead of the state index.
const PAGE_SQL: &str = "SELECT e.seq, p.envelope FROM events AS e JOIN payloads AS p ON p.seq = e.seq
WHERE e.seq > ?1 AND +e.state <> 2 AND e.coalesced_into IS NULL";

/// How often a page read that raced a checkpoint is tried again before giving up.
const RACE_RETRIES: u32 = 20;

/// A position in the journal and the filter to apply from there on.
#[derive(Debug, Clone)]
pub struct JournalTail {
    home: Home,
    types: Vec<String>,
    position: i64,
}

impl JournalTail {
    /// Starts at the beginning of the journal, or right after `after` (an event id that must
    /// be in the journal: an unknown one is a usage error, never "start from the top").
    pub fn new(home: &Home, types: Vec<String>, after: Option<&str>) -> Result<JournalTail> {
        let position = match after {
            None => 0,
            Some(event_id) => seq_of(home, event_id)?,
        };
        Ok(JournalTail { home: home.clone(), types, position })
    }

    /// Appends up to `max` next envelopes, one per line, to `out` and moves past them.
    /// Returns how many were appended (0: nothing new yet).
    pub fn next_page(&mut self, out: &mut Vec<u8>, max: usize) -> Result<usize> {
        let start_len = out.len();
        for _ in 0..RACE_RETRIES {
            let before = FileState::of(&self.home.store_path());
            let Some(store) = Store::open_read_only(&self.home)? else {
                return Ok(0);
            };
            let (count, last) = read_page(store.conn(), self.position, &self.types, max, out)?;
            drop(store);
            // Without WAL frames the store is read as an immutable file (no lock, no -shm): a
            // writer that started and checkpointed meanwhile may have moved pages under the
            // read. Then the page is read again; with frames, SQLite's own locking applies.
            if before.wal_has_frames || FileState::of(&self.home.store_path()) == before {
                if let Some(last) = last {
                    self.position = last;
                }
                return Ok(count);
            }
            out.truncate(start_len);
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(Error::internal(
            "the store kept changing while it was read",
            "run `kitty-sync tail` again (with --after the last event id it printed)",
        ))
    }
}

fn seq_of(home: &Home, event_id: &str) -> Result<i64> {
    let unknown = || {
        Error::usage(
            format!("unknown event id {event_id:?}: it is not in this journal"),
            "pass an event_id that `kitty-sync tail` printed before, or omit --after to start from the first event",
        )
    };
    if !crate::envelope::is_valid_ulid(event_id) {
        return Err(unknown());
    }
    let Some(store) = Store::open_read_only(home)? else {
        return Err(unknown());
    };
    store
        .conn()
        .query_row("SELECT seq FROM events WHERE event_id = ?1", [event_id], |r| r.get(0))
        .optional()
        .ctx("cannot read the journal")?
        .ok_or_else(unknown)
}

/// One keyset page: envelopes after `after`, in capture order, written as lines.
fn read_page(
    conn: &Connection,
    after: i64,
    types: &[String],
    max: usize,
    out: &mut Vec<u8>,
) -> Result<(usize, Option<i64>)> {
    let mut sql = String::from(PAGE_SQL);
    if !types.is_empty() {
        let marks = vec!["?"; types.len()].join(", ");
        sql.push_str(&format!(" AND e.event_type IN ({marks})"));
    }
    sql.push_str(" ORDER BY e.seq LIMIT ?");
    let mut stmt = conn.prepare_cached(&sql).ctx("cannot read the journal")?;
    let mut params: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(types.len() + 2);
    params.push(&after);
    for t in types {
        params.push(t);
    }
    let limit = max as i64;
    params.push(&limit);
    let mut rows = stmt.query(params.as_slice()).ctx("cannot read the journal")?;
    let (mut count, mut last) = (0, None);
    while let Some(row) = rows.next().ctx("cannot read the journal")? {
        let seq: i64 = row.get(0).ctx("cannot read the journal")?;
        let envelope = row.get_ref(1).ctx("cannot read the journal")?;
        let bytes = envelope.as_bytes().map_err(|e| Error::store("cannot read the journal", e.into()))?;
        out.extend_from_slice(bytes);
        out.push(b'\n');
        count += 1;
        last = Some(seq);
    }
    Ok((count, last))
}

/// What a reader can see of the store files without opening them.
#[derive(Debug, PartialEq, Eq)]
struct FileState {
    db: Option<(u64, Option<SystemTime>)>,
    wal: Option<(u64, Option<SystemTime>)>,
    wal_has_frames: bool,
}

impl FileState {
    fn of(store: &Path) -> FileState {
        let stat = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.len(), m.modified().ok()));
        let wal = stat(Path::new(&format!("{}-wal", store.display())));
        FileState { db: stat(store), wal_has_frames: wal.is_some_and(|(len, _)| len > 0), wal }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_journal::{Journal, NewEvent};

    fn plan(conn: &Connection, types: usize) -> String {
        let mut sql = format!("EXPLAIN QUERY PLAN {PAGE_SQL}");
        if types > 0 {
            sql.push_str(" AND e.event_type IN (?)");
        }
        sql.push_str(" ORDER BY e.seq LIMIT 10");
        let mut stmt = conn.prepare(&sql).unwrap();
        let values: Vec<rusqlite::types::Value> =
            (0..stmt.parameter_count()).map(|i| if i == 0 { 0i64.into() } else { "T".to_string().into() }).collect();
        stmt.query_map(rusqlite::params_from_iter(values), |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<Vec<_>>>()
            .unwrap()
            .join("; ")
    }

    #[test]
    fn page_is_a_seq_range_scan_without_sorting() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&Home::at(dir.path())).unwrap();
        for types in [0, 1] {
            let plan = plan(store.conn(), types);
            assert!(plan.contains("USING INTEGER PRIMARY KEY (rowid>?)"), "{plan}");
            assert!(!plan.contains("TEMP B-TREE"), "{plan}");
        }
    }

    #[test]
    fn pages_resume_after_the_last_event_and_filter_types() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        let mut store = Store::open(&home).unwrap();
        let policy = crate::event_journal::policy::CapturePolicy::default();
        let mut journal = Journal::new(&mut store, policy);
        let mut ids = Vec::new();
        for i in 0..5 {
            let event_id = ulid::Ulid::generate().to_string();
            ids.push(event_id.clone());
            let event_type = if i % 2 == 0 { "A" } else { "B" }.to_string();
            journal.append(NewEvent { event_type, event_id: Some(event_id), ..Default::default() }).unwrap();
        }
        drop(journal);
        drop(store);
        let mut tail = JournalTail::new(&home, Vec::new(), None).unwrap();
        let mut out = Vec::new();
        assert_eq!(tail.next_page(&mut out, 2).unwrap(), 2);
        assert_eq!(tail.next_page(&mut out, 10).unwrap(), 3);
        assert_eq!(tail.next_page(&mut out, 10).unwrap(), 0);
        assert_eq!(String::from_utf8(out).unwrap().lines().count(), 5);
        let mut only_b = JournalTail::new(&home, vec!["B".into()], Some(&ids[0])).unwrap();
        let mut out = Vec::new();
        assert_eq!(only_b.next_page(&mut out, 10).unwrap(), 2);
        let unknown = JournalTail::new(&home, Vec::new(), Some("01ARZ3NDEKTSV4RRFFQ69G5FAV"));
        assert_eq!(unknown.unwrap_err().exit_code(), 2);
    }
}
