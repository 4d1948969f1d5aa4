//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`, so a batch's
//! commit is on disk before the response goes out. One writer connection (writes are
//! serialised anyway) and one reader, so listing never waits behind an ingest.

use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params};

use super::group::GroupCommit;
use super::{BatchRecord, EventRow, Ingested, NewEvent, ReceiverStore, StoreError, StoreStats, StoredEvent};

/// `PRAGMA application_id` of a receiver database ("ksrv"): tells it apart from any other
/// SQLite file, the kitty-sync journal included, before anything is written to it.
const APPLICATION_ID: i64 = 0x6b73_7276;
const SCHEMA_VERSION: i64 = 1;
/// Long enough to ride out another process's commit, short enough to answer 503 while the
/// client is still waiting.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Keeps the WAL file from staying large after a burst.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// `seq` is a plain rowid, not AUTOINCREMENT: rows are never deleted, so max+1 never reuses a
/// number, and a duplicate (ON CONFLICT DO NOTHING) leaves no gap as AUTOINCREMENT would.
const SCHEMA: &str = "
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE requests (
    id          INTEGER PRIMARY KEY,
    received_at TEXT NOT NULL,
    http_status INTEGER NOT NULL,
    event_count INTEGER,
    success     INTEGER NOT NULL DEFAULT 0,
    duplicate   INTEGER NOT NULL DEFAULT 0,
    rejected    INTEGER NOT NULL DEFAULT 0,
    error       TEXT
);
CREATE TABLE events (
    seq         INTEGER PRIMARY KEY,
    event_id    TEXT NOT NULL UNIQUE,
    event_type  TEXT NOT NULL,
    received_at TEXT NOT NULL,
    request_id  INTEGER NOT NULL REFERENCES requests(id),
    envelope    TEXT NOT NULL
);
";

pub struct SqliteStore {
    instance_id: String,
    /// `None` for a read-only store.
    writer: Option<Mutex<Connection>>,
    group: GroupCommit<Job, JobResult>,
    reader: Mutex<Connection>,
}

enum Layout {
    /// A new, empty file: ours to initialise.
    Empty,
    Receiver,
}

impl SqliteStore {
    /// Opens the receiver database at `path`, creating it (and its `server_instance_id`) when
    /// the file does not exist or is empty. The parent directory must exist.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        check_directory(path)?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let writer = Connection::open_with_flags(path, flags).map_err(backend("cannot open the receiver database"))?;
        writer.busy_timeout(BUSY_TIMEOUT).map_err(backend("cannot configure the database"))?;
        // Identify the file before changing anything in it.
        let layout = classify(&writer, path)?;
        enable_wal(&writer)?;
        if matches!(layout, Layout::Empty) {
            create_schema(&writer, path)?;
        }
        let instance_id = read_instance_id(&writer, path)?;
        let reader = open_reader(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        Ok(SqliteStore {
            instance_id,
            writer: Some(Mutex::new(writer)),
            group: GroupCommit::new(),
            reader: Mutex::new(reader),
        })
    }

    /// Opens an existing receiver database without writing to it; never creates a file.
    pub fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        if !path.is_file() {
            return Err(StoreError::Missing { path: path.to_path_buf() });
        }
        let reader = open_snapshot_reader(path)?;
        match classify(&reader, path)? {
            Layout::Receiver => {}
            Layout::Empty => return Err(StoreError::NotAReceiverDatabase { path: path.to_path_buf() }),
        }
        let instance_id = read_instance_id(&reader, path)?;
        Ok(SqliteStore { instance_id, writer: None, group: GroupCommit::new(), reader: Mutex::new(reader) })
    }

    fn writer(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        let writer = self.writer.as_ref().ok_or(StoreError::ReadOnly)?;
        // A panic while holding the lock dropped its transaction, which rolled back: the
        // connection is still consistent, so poisoning is not an error here.
        Ok(writer.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// One transaction (one fsync) for every batch in `jobs`, each inside its own savepoint:
    /// a batch that fails rolls back alone, and a failed commit fails them all.
    fn commit_group(&self, jobs: &[Job]) -> Vec<JobResult> {
        let fail_all = |context, e: &rusqlite::Error| jobs.iter().map(|_| Err(describe(context, e))).collect();
        let mut conn = match self.writer() {
            Ok(conn) => conn,
            Err(_) => return jobs.iter().map(|_| Err(StoreError::ReadOnly)).collect(),
        };
        let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => return fail_all("cannot start a transaction", &e),
        };
        let mut results: Vec<JobResult> = Vec::with_capacity(jobs.len());
        for job in jobs {
            let result = ingest_in_savepoint(&mut tx, job);
            // Some errors (disk full, I/O) make SQLite roll back the whole transaction; going on
            // would run the next savepoints in autocommit mode, committing them one by one.
            if let Err(e) = &result
                && tx.is_autocommit()
            {
                let text = e.to_string();
                return jobs
                    .iter()
                    .map(|_| {
                        Err(StoreError::Backend {
                            context: "the batch transaction was rolled back",
                            source: text.clone().into(),
                        })
                    })
                    .collect();
            }
            results.push(result);
        }
        match tx.commit() {
            Ok(()) => results,
            Err(e) => fail_all("cannot commit the batch", &e),
        }
    }

    fn reader(&self) -> MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ReceiverStore for SqliteStore {
    fn server_instance_id(&self) -> &str {
        &self.instance_id
    }

    fn ingest(&self, record: &BatchRecord, events: &[NewEvent<'_>]) -> Result<Vec<Ingested>, StoreError> {
        if self.writer.is_none() {
            return Err(StoreError::ReadOnly);
        }
        let job = Job { record: record.clone(), events: events.iter().map(EventRow::from).collect() };
        self.group.submit(
            job,
            |jobs| self.commit_group(&jobs),
            || {
                Err(StoreError::Backend {
                    context: "cannot commit the batch",
                    source: "the committing thread failed".into(),
                })
            },
        )
    }

    fn record_request(&self, record: &BatchRecord) -> Result<(), StoreError> {
        let mut conn = self.writer()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend("cannot start a transaction"))?;
        insert_request(&tx, record)?;
        tx.commit().map_err(backend("cannot record the batch request"))
    }

    fn events_after(&self, after: i64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, event_id, event_type, received_at, envelope FROM events
                 WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(backend("cannot prepare the event listing"))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(params![after, limit], |row| {
                Ok(StoredEvent {
                    seq: row.get(0)?,
                    event_id: row.get(1)?,
                    event_type: row.get(2)?,
                    received_at: row.get(3)?,
                    envelope: row.get(4)?,
                })
            })
            .map_err(backend("cannot list events"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(backend("cannot read an event"))
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        let mut conn = self.reader();
        // One read transaction: the counts describe a single snapshot.
        let tx = conn.transaction().map_err(backend("cannot start a read transaction"))?;
        let (event_count, last_seq) = tx
            .query_row("SELECT count(*), coalesce(max(seq), 0) FROM events", [], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?))
            })
            .map_err(backend("cannot count events"))?;
        let mut stats =
            StoreStats { event_count: u64::try_from(event_count).unwrap_or(0), last_seq, ..StoreStats::default() };
        {
            let mut stmt = tx
                .prepare("SELECT http_status, count(*) FROM requests GROUP BY http_status")
                .map_err(backend("cannot count batch requests"))?;
            let rows = stmt
                .query_map([], |row| Ok((row.get::<_, u16>(0)?, row.get::<_, i64>(1)?)))
                .map_err(backend("cannot count batch requests"))?;
            for row in rows {
                let (status, count) = row.map_err(backend("cannot count batch requests"))?;
                let count = u64::try_from(count).unwrap_or(0);
                stats.batch_requests += count;
                stats.batch_requests_by_status.insert(status, count);
            }
        }
        tx.finish().map_err(backend("cannot end a read transaction"))?;
        Ok(stats)
    }
}

/// A batch waiting for its group commit; owned, because another caller may commit it.
struct Job {
    record: BatchRecord,
    events: Vec<EventRow>,
}

type JobResult = Result<Vec<Ingested>, StoreError>;

fn ingest_in_savepoint(tx: &mut Transaction<'_>, job: &Job) -> JobResult {
    // Dropping an uncommitted savepoint rolls it back.
    let savepoint = tx.savepoint().map_err(backend("cannot start a savepoint"))?;
    let outcomes = insert_batch(&savepoint, job)?;
    savepoint.commit().map_err(backend("cannot release a savepoint"))?;
    Ok(outcomes)
}

fn insert_batch(conn: &Connection, job: &Job) -> JobResult {
    let request_id = insert_request(conn, &job.record)?;
    let received_at = format_timestamp(job.record.received_at);
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO events (event_id, event_type, received_at, request_id, envelope)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(event_id) DO NOTHING",
        )
        .map_err(backend("cannot prepare the event insert"))?;
    let mut outcomes = Vec::with_capacity(job.events.len());
    for event in &job.events {
        let changed = insert
            .execute(params![event.event_id, event.event_type, received_at, request_id, event.envelope])
            .map_err(backend("cannot store an event"))?;
        outcomes.push(if changed == 1 { Ingested::Stored } else { Ingested::Duplicate });
    }
    let stored = outcomes.iter().filter(|o| **o == Ingested::Stored).count();
    conn.execute(
        "UPDATE requests SET success = ?1, duplicate = ?2 WHERE id = ?3",
        params![stored as i64, (outcomes.len() - stored) as i64, request_id],
    )
    .map_err(backend("cannot record the batch request"))?;
    Ok(outcomes)
}

fn check_directory(path: &Path) -> Result<(), StoreError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => return Ok(()),
    };
    if dir.is_dir() { Ok(()) } else { Err(StoreError::MissingDirectory { dir: dir.to_path_buf() }) }
}

fn open_reader(path: &Path, access: OpenFlags) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, access | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(backend("cannot open the receiver database"))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(backend("cannot configure the database"))?;
    conn.pragma_update(None, "query_only", true).map_err(backend("cannot configure the database"))?;
    Ok(conn)
}

/// A read-only connection that leaves no trace. SQLite creates `-wal`/`-shm` files even for a
/// read-only connection; when no `-wal` exists, no process has the database open (a WAL
/// database keeps that file while open), so it is opened immutable and nothing is created.
fn open_snapshot_reader(path: &Path) -> Result<Connection, StoreError> {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    match immutable_uri(path) {
        Some(uri) if !Path::new(&wal).exists() => {
            let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
            let conn = Connection::open_with_flags(uri, flags).map_err(backend("cannot open the receiver database"))?;
            conn.pragma_update(None, "query_only", true).map_err(backend("cannot configure the database"))?;
            Ok(conn)
        }
        _ => open_reader(path, OpenFlags::SQLITE_OPEN_READ_ONLY),
    }
}

/// `file:` URI for `path` with `immutable=1`; `None` where the path cannot be expressed
/// simply (not UTF-8, or not Unix), which falls back to an ordinary read-only open.
fn immutable_uri(path: &Path) -> Option<String> {
    if !cfg!(unix) {
        return None;
    }
    let absolute = std::path::absolute(path).ok()?;
    let text = absolute.to_str()?;
    let mut uri = String::from("file:");
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'.' | b'_' | b'~' | b'-' => {
                uri.push(char::from(byte));
            }
            _ => uri.push_str(&format!("%{byte:02X}")),
        }
    }
    uri.push_str("?immutable=1");
    Some(uri)
}

fn classify(conn: &Connection, path: &Path) -> Result<Layout, StoreError> {
    let not_ours = || StoreError::NotAReceiverDatabase { path: path.to_path_buf() };
    let application_id: i64 = match conn.query_row("PRAGMA application_id", [], |r| r.get(0)) {
        Ok(id) => id,
        Err(e) if e.sqlite_error_code() == Some(ErrorCode::NotADatabase) => return Err(not_ours()),
        Err(e) => return Err(backend("cannot read the database header")(e)),
    };
    let version: i64 =
        conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(backend("cannot read the database header"))?;
    let objects: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
        .map_err(backend("cannot read the database schema"))?;
    if application_id == APPLICATION_ID {
        if version > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                database: path.display().to_string(),
                found: version,
                known: SCHEMA_VERSION,
            });
        }
        Ok(Layout::Receiver)
    } else if application_id == 0 && objects == 0 {
        Ok(Layout::Empty)
    } else {
        Err(not_ours())
    }
}

fn enable_wal(conn: &Connection) -> Result<(), StoreError> {
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(backend("cannot switch the database to WAL mode"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Backend {
            context: "cannot switch the database to WAL mode",
            source: format!("journal mode stayed {mode:?}").into(),
        });
    }
    // FULL: in WAL mode, NORMAL may lose the last commits on power loss, and the receiver
    // promises that an answered batch is durable.
    conn.pragma_update(None, "synchronous", "FULL").map_err(backend("cannot configure the database"))?;
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)
        .map_err(backend("cannot configure the database"))?;
    Ok(())
}

fn create_schema(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    conn.execute_batch("BEGIN IMMEDIATE").map_err(backend("cannot create the schema"))?;
    let result = create_schema_in_transaction(conn, path);
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    conn.execute_batch(end).map_err(backend("cannot create the schema"))?;
    result
}

fn create_schema_in_transaction(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    // Another process may have initialised the file between our check and our lock.
    if matches!(classify(conn, path)?, Layout::Receiver) {
        return Ok(());
    }
    conn.execute_batch(SCHEMA).map_err(backend("cannot create the schema"))?;
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('server_instance_id', ?1)",
        params![ulid::Ulid::generate().to_string()],
    )
    .map_err(backend("cannot create the schema"))?;
    conn.pragma_update(None, "application_id", APPLICATION_ID).map_err(backend("cannot create the schema"))?;
    conn.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(backend("cannot create the schema"))?;
    Ok(())
}

fn read_instance_id(conn: &Connection, path: &Path) -> Result<String, StoreError> {
    conn.query_row("SELECT value FROM meta WHERE key = 'server_instance_id'", [], |r| r.get(0))
        .optional()
        .map_err(backend("cannot read the server instance id"))?
        .ok_or_else(|| StoreError::NotAReceiverDatabase { path: path.to_path_buf() })
}

fn insert_request(conn: &Connection, record: &BatchRecord) -> Result<i64, StoreError> {
    conn.prepare_cached(
        "INSERT INTO requests (received_at, http_status, event_count, rejected, error)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            format_timestamp(record.received_at),
            record.http_status,
            record.event_count,
            record.rejected,
            record.error
        ])
    })
    .map_err(backend("cannot record the batch request"))?;
    Ok(conn.last_insert_rowid())
}

/// RFC 3339 UTC with a fixed six fractional digits, so stored times also sort as text.
pub(crate) fn format_timestamp(ts: jiff::Timestamp) -> String {
    format!("{ts:.6}")
}

fn backend(context: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |source| {
        if is_busy(&source) {
            StoreError::Busy { context, source: Box::new(source) }
        } else {
            StoreError::Backend { context, source: Box::new(source) }
        }
    }
}

/// The same error for each batch of a group (rusqlite errors cannot be cloned).
fn describe(context: &'static str, source: &rusqlite::Error) -> StoreError {
    let text: Box<dyn std::error::Error + Send + Sync> = source.to_string().into();
    if is_busy(source) {
        StoreError::Busy { context, source: text }
    } else {
        StoreError::Backend { context, source: text }
    }
}

fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(error.sqlite_error_code(), Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(status: u16) -> BatchRecord {
        BatchRecord {
            received_at: jiff::Timestamp::now(),
            http_status: status,
            event_count: Some(2),
            rejected: 0,
            error: None,
        }
    }

    const ID_A: &str = "01KVYWRGJEV7CEZW6J7GXEBN16";
    const ID_B: &str = "01KVYWRGJEV7CEZW6J7GXEBN17";

    fn event<'a>(id: &'a str, envelope: &'a str) -> NewEvent<'a> {
        NewEvent { event_id: id, event_type: "T", envelope }
    }

    #[test]
    fn duplicates_within_and_across_batches_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let store = SqliteStore::open(&path).unwrap();
        let first_id = store.server_instance_id().to_string();
        let out = store.ingest(&record(200), &[event(ID_A, "{\"a\": 1}"), event(ID_A, "{\"a\":2}")]).unwrap();
        assert_eq!(out, vec![Ingested::Stored, Ingested::Duplicate]);
        drop(store);

        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.server_instance_id(), first_id, "identity survives a restart");
        let out = store.ingest(&record(200), &[event(ID_B, "{}"), event(ID_A, "{}")]).unwrap();
        assert_eq!(out, vec![Ingested::Stored, Ingested::Duplicate]);
        let events = store.events_after(0, 10).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!((events[0].seq, events[1].seq), (1, 2), "duplicates leave no gaps");
        assert_eq!(events[0].envelope, "{\"a\": 1}", "first bytes kept verbatim");
        let stats = store.stats().unwrap();
        assert_eq!((stats.event_count, stats.batch_requests), (2, 2));
        assert_eq!(stats.last_seq, events[1].seq);
    }

    #[test]
    fn read_only_never_creates_and_refuses_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.db");
        assert!(matches!(SqliteStore::open_read_only(&missing), Err(StoreError::Missing { .. })));
        assert!(!missing.exists());

        let foreign = dir.path().join("foreign.db");
        Connection::open(&foreign).unwrap().execute_batch("CREATE TABLE x (y)").unwrap();
        assert!(matches!(SqliteStore::open(&foreign), Err(StoreError::NotAReceiverDatabase { .. })));
        let text = dir.path().join("text.db");
        std::fs::write(&text, "this is not sqlite, not even close, and long enough").unwrap();
        assert!(matches!(SqliteStore::open_read_only(&text), Err(StoreError::NotAReceiverDatabase { .. })));
        assert!(matches!(SqliteStore::open(&dir.path().join("nodir/r.db")), Err(StoreError::MissingDirectory { .. })));
    }

    #[test]
    fn wiped_database_gets_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let first = SqliteStore::open(&path).unwrap().server_instance_id().to_string();
        std::fs::remove_file(&path).unwrap();
        let second = SqliteStore::open(&path).unwrap().server_instance_id().to_string();
        assert_ne!(first, second);
        let ro = SqliteStore::open_read_only(&path).unwrap();
        assert_eq!(ro.server_instance_id(), second);
        assert!(matches!(ro.record_request(&record(401)), Err(StoreError::ReadOnly)));
        drop(ro);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("r.db")], "read-only left files behind");
    }

    #[test]
    fn read_only_open_of_odd_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("we?ird #%name.db");
        let store = SqliteStore::open(&path).unwrap();
        store.ingest(&record(200), &[event(ID_A, "{}")]).unwrap();
        // While the writer is open (WAL present) and after it closed (immutable).
        assert_eq!(SqliteStore::open_read_only(&path).unwrap().stats().unwrap().event_count, 1);
        drop(store);
        assert_eq!(SqliteStore::open_read_only(&path).unwrap().stats().unwrap().event_count, 1);
    }

    #[test]
    fn timestamps_have_fixed_precision() {
        let ts: jiff::Timestamp = "2026-01-02T03:04:05Z".parse().unwrap();
        assert_eq!(format_timestamp(ts), "2026-01-02T03:04:05.000000Z");
    }
}
