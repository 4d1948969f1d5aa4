//! The journal as a stream (`kitty-sync tail`): stored envelopes in capture order, read in
//! keyset pages (`seq > position`) so a reader can stop, resume, or follow new captures
//! without ever re-reading what it has seen. Read-only: the store is opened per page the way
//! every read-only command opens it, so no file is created and a store that appears later is
//! picked up.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension};

use crate::error::{Error, Result, StoreContext};
use crate::home::Home;
use crate::store::Store;

/// Archived events are included (their payload is still there); purged ones have no payload
/// row, and coalesced-away ones are never delivered, so neither belongs to the stream.
/// `+e.state` keeps the planner on the `seq` range instead of the state index.
macro_rules! stream_sql {
    ($seq:literal) => {
        concat!(
            "SELECT e.seq, p.envelope FROM events AS e JOIN payloads AS p ON p.seq = e.seq
WHERE e.seq ",
            $seq,
            " ?1 AND +e.state <> 2 AND e.coalesced_into IS NULL"
        )
    };
}
const PAGE_SQL: &str = stream_sql!(">");
/// One journal position, for stepping over a damaged range.
const ROW_SQL: &str = stream_sql!("=");

/// How often a page read that raced a checkpoint is tried again before giving up.
const RACE_RETRIES: u32 = 20;
/// Positions read one at a time after a damaged page before paging is tried again: SQLite
/// can often still reach the rows behind a broken page through the tree above it.
const RESCUE_WINDOW: i64 = 4096;

/// A position in the journal and the filter to apply from there on.
#[derive(Debug, Clone)]
pub struct JournalTail {
    home: Home,
    types: Vec<String>,
    position: i64,
    damage: Damage,
}

/// Journal positions SQLite could not read (a damaged page), stepped over so that every
/// event it can still read is exported.
#[derive(Debug, Clone, Default)]
struct Damage {
    unreadable: u64,
    first: Option<String>,
}

impl Damage {
    fn seen(&self) -> bool {
        self.first.is_some()
    }

    fn note(&mut self, what: String) {
        self.first.get_or_insert(what);
    }
}

impl JournalTail {
    /// Starts at the beginning of the journal, or right after `after` (an event id that must
    /// be in the journal: an unknown one is a usage error, never "start from the top").
    pub fn new(home: &Home, types: Vec<String>, after: Option<&str>) -> Result<JournalTail> {
        let position = match after {
            None => 0,
            Some(event_id) => seq_of(home, event_id)?,
        };
        Ok(JournalTail { home: home.clone(), types, position, damage: Damage::default() })
    }

    /// Appends up to `max` next envelopes, one per line, to `out` and moves past them.
    /// Returns how many were appended (0: nothing new yet). Damaged pages are stepped over;
    /// [`JournalTail::damage`] tells afterwards whether any were.
    pub fn next_page(&mut self, out: &mut Vec<u8>, max: usize) -> Result<usize> {
        let start_len = out.len();
        for _ in 0..RACE_RETRIES {
            let before = FileState::of(&self.home.store_path());
            let mut cursor = Cursor { position: self.position, count: 0, damage: self.damage.clone() };
            let Some(store) = open(&self.home, !before.wal_has_frames, &mut cursor.damage)? else {
                return Ok(0);
            };
            cursor.fill(store.conn(), &self.types, max, out)?;
            drop(store);
            // Without WAL frames the store is read as an immutable file (no lock, no -shm): a
            // writer that started and checkpointed meanwhile may have moved pages under the
            // read. Then the page is read again; with frames, SQLite's own locking applies.
            if before.wal_has_frames || FileState::of(&self.home.store_path()) == before {
                self.position = cursor.position;
                self.damage = cursor.damage;
                return Ok(cursor.count);
            }
            out.truncate(start_len);
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(Error::internal(
            "the store kept changing while it was read",
            "run `kitty-sync tail` again (with --after the last event id it printed)",
        ))
    }

    /// The error to end with when damaged pages were stepped over: everything readable was
    /// printed, but the export is not the whole journal.
    pub fn damage(&self) -> Option<Error> {
        let first = self.damage.first.as_ref()?;
        let count = match self.damage.unreadable {
            0 => String::new(),
            n => format!("{n} journal position(s) could not be read; "),
        };
        Some(Error::StoreUnusable {
            message: format!(
                "the store is damaged ({count}first: {first}); every event SQLite could still read was printed"
            ),
            hint: crate::error::disk::CORRUPT_HINT.to_string(),
        })
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

/// The store, also when a damaged page keeps it from being identified: the journal's own
/// tables may still be readable.
/// `settled`: no WAL frames, so no checkpoint can be growing the file while its header is
/// compared with its length.
fn open(home: &Home, settled: bool, damage: &mut Damage) -> Result<Option<Store>> {
    // SQLite may read the pages a truncation cut off as if the journal simply ended there.
    let path = home.store_path();
    if let Some(len) = std::fs::metadata(&path).ok().map(|m| m.len()).filter(|len| settled && *len > 0)
        && let Err(reason) = crate::legacy::check_header(&path, len)
    {
        damage.note(format!("{}: {reason}", path.display()));
    }
    match Store::open_read_only(home) {
        Err(e) if e.hint() == crate::error::disk::CORRUPT_HINT => {
            damage.note(e.to_string());
            Store::open_damaged(home).map_err(|_| e)
        }
        other => other,
    }
}

/// SQLite's own verdict, or a value of a type the schema never stores: a damaged page that
/// still parses as one.
fn is_corrupt(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
    ) || matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase))
}

/// `base` (a stream query) with the type filter, its parameters after `?1`.
fn filtered(base: &str, types: &[String]) -> String {
    let mut sql = String::from(base);
    if !types.is_empty() {
        let marks = vec!["?"; types.len()].join(", ");
        sql.push_str(&format!(" AND e.event_type IN ({marks})"));
    }
    sql
}

/// The highest journal position, from whichever table SQLite can still reach the end of.
fn last_seq(conn: &Connection) -> Option<i64> {
    ["SELECT max(seq) FROM events", "SELECT max(seq) FROM payloads"]
        .iter()
        .find_map(|sql| conn.query_row(sql, [], |r| r.get::<_, Option<i64>>(0)).ok().flatten())
}

/// The one field of an envelope the type filter needs when its event row is unreadable.
#[derive(serde::Deserialize)]
struct EventType {
    event_type: String,
}

/// One page being read: where it stands, how much it printed, what it stepped over.
struct Cursor {
    position: i64,
    count: usize,
    damage: Damage,
}

impl Cursor {
    /// Pages forward until `max` envelopes are out or the journal ends, stepping over a
    /// damaged range one position at a time.
    fn fill(&mut self, conn: &Connection, types: &[String], max: usize, out: &mut Vec<u8>) -> Result<()> {
        while let Some(broken) = self.read_page(conn, types, max, out)? {
            self.damage.note(format!("after journal position {}: {broken}", self.position));
            let last = last_seq(conn);
            let end = self.position.saturating_add(RESCUE_WINDOW).min(last.unwrap_or(i64::MAX));
            self.step_over(conn, types, end, max, out)?;
            // Without a known end, what lies after the window cannot be told from nothing.
            if self.count >= max || last.is_none_or(|last| self.position >= last) {
                break;
            }
        }
        Ok(())
    }

    /// One keyset page. A damaged page ends it early and is returned (what was read before
    /// it stays); any other failure is an error.
    fn read_page(
        &mut self,
        conn: &Connection,
        types: &[String],
        max: usize,
        out: &mut Vec<u8>,
    ) -> Result<Option<rusqlite::Error>> {
        let sql = filtered(PAGE_SQL, types) + " ORDER BY e.seq LIMIT ?";
        let limit = (max - self.count) as i64;
        let position = self.position;
        let mut params: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(types.len() + 2);
        params.push(&position);
        params.extend(types.iter().map(|t| t as &dyn rusqlite::ToSql));
        params.push(&limit);
        let mut read = || -> rusqlite::Result<()> {
            let mut stmt = conn.prepare_cached(&sql)?;
            let mut rows = stmt.query(params.as_slice())?;
            while let Some(row) = rows.next()? {
                self.emit(row.get(0)?, row.get_ref(1)?, out);
            }
            Ok(())
        };
        match read() {
            Ok(()) => Ok(None),
            Err(e) if is_corrupt(&e) => Ok(Some(e)),
            Err(e) => Err(Error::store("cannot read the journal", e)),
        }
    }

    /// Reads the positions after the current one up to `end` one by one, counting those
    /// SQLite cannot read.
    fn step_over(
        &mut self,
        conn: &Connection,
        types: &[String],
        end: i64,
        max: usize,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let sql = filtered(ROW_SQL, types);
        let mut stmt = conn.prepare_cached(&sql).map_err(|e| Error::store("cannot read the journal", e))?;
        while self.position < end && self.count < max {
            let seq = self.position + 1;
            let mut params: Vec<&dyn rusqlite::ToSql> = vec![&seq];
            params.extend(types.iter().map(|t| t as &dyn rusqlite::ToSql));
            let row = stmt.query_row(params.as_slice(), |r| Ok(r.get_ref(1)?.as_bytes().map(<[u8]>::to_vec)));
            match row {
                Ok(Ok(bytes)) => self.emit(seq, ValueRef::Blob(&bytes), out),
                Ok(Err(_)) => self.unreadable(seq, "the stored envelope is not text"),
                Err(rusqlite::Error::QueryReturnedNoRows) => self.position = seq,
                Err(e) if is_corrupt(&e) => self.payload_only(conn, seq, types, &e, out)?,
                Err(e) => return Err(Error::store("cannot read the journal", e)),
            }
        }
        Ok(())
    }

    /// A position whose event row is on a damaged page may still have its envelope on a
    /// readable one. Without the row, whether the event was coalesced away cannot be told: a
    /// superseded envelope in the export costs less than a lost one.
    fn payload_only(
        &mut self,
        conn: &Connection,
        seq: i64,
        types: &[String],
        broken: &rusqlite::Error,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let found = conn
            .prepare_cached("SELECT envelope FROM payloads WHERE seq = ?1")
            .and_then(|mut stmt| stmt.query_row([seq], |r| Ok(r.get_ref(0)?.as_bytes().map(<[u8]>::to_vec))));
        let bytes = match found {
            Ok(Ok(bytes)) => bytes,
            Err(e) if !is_corrupt(&e) && e != rusqlite::Error::QueryReturnedNoRows => {
                return Err(Error::store("cannot read the journal", e));
            }
            _ => {
                self.unreadable(seq, &broken.to_string());
                return Ok(());
            }
        };
        let wanted = types.is_empty()
            || serde_json::from_slice::<EventType>(&bytes).is_ok_and(|e| types.contains(&e.event_type));
        self.damage.note(format!("journal position {seq}: {broken}"));
        if wanted {
            self.emit(seq, ValueRef::Blob(&bytes), out);
        }
        self.position = seq;
        Ok(())
    }

    /// Appends one envelope and moves past it. Once damage was seen, SQLite may hand back
    /// garbage in place of an envelope: that is counted, never printed.
    fn emit(&mut self, seq: i64, envelope: ValueRef<'_>, out: &mut Vec<u8>) {
        let Ok(bytes) = envelope.as_bytes() else {
            return self.unreadable(seq, "the stored envelope is not text");
        };
        if self.damage.seen() && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_err() {
            return self.unreadable(seq, "the stored envelope is not JSON");
        }
        self.position = seq;
        out.extend_from_slice(bytes);
        out.push(b'\n');
        self.count += 1;
    }

    fn unreadable(&mut self, seq: i64, why: &str) {
        self.position = seq;
        self.damage.unreadable += 1;
        self.damage.note(format!("journal position {seq}: {why}"));
    }
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
