//! The one SQLite store under `event-sync/`: journal, targets, ledger and migration audit
//! change together in one transaction. WAL so appends from other processes proceed while a
//! drain reads; `synchronous=FULL` so an acknowledged commit survives a machine crash.

mod read_only;
pub mod schema;
pub mod selection;
pub mod stats;
pub(crate) mod uri;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use crate::error::{Error, Result, StoreContext};
use crate::home::Home;

/// How long a writer waits for another process's transaction before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The WAL is folded into the database and truncated when a writer closes the store and
/// finds it larger than this. Small enough that the next process rebuilds its index quickly,
/// large enough that one emit in ~30 pays for the checkpoint.
pub const WAL_LIMIT_BYTES: u64 = 1 << 20;

/// `journal_size_limit`: what a WAL that SQLite restarts (in a long-lived writer) is trimmed
/// to. Above the ~4.1 MB at which the automatic checkpoint (1,000 pages) runs, so a writer
/// that keeps committing reuses its WAL instead of growing the file again after every
/// restart (appending costs more per durable commit than overwriting); after a transaction
/// larger than this (a big import, gc), the file shrinks back.
const WAL_KEEP_BYTES: u64 = 6 << 20;

const FORMAT_KEY: &str = "store_format";
const FORMAT_VALUE: &str = "kitty-sync/1";
/// Any kitty-sync, including a newer one with another format.
const FORMAT_FAMILY: &str = "kitty-sync/";

/// What [`Store::identify`] found.
enum Found {
    /// No tables yet: a new store (or none at all for a read-only open).
    Empty,
    Ours,
}

pub struct Store {
    // Declared before `_guard`: fields drop in order, and the connection must close before
    // the lock that made reading it safe is released.
    conn: Connection,
    path: PathBuf,
    writer: bool,
    _guard: Option<read_only::FileLock>,
}

impl Drop for Store {
    fn drop(&mut self) {
        if self.writer {
            self.truncate_wal_if_large();
        }
    }
}

impl Store {
    /// Opens the store for writing, creating the home, `event-sync/` and the database as
    /// needed, and brings the schema up to date.
    pub fn open(home: &Home) -> Result<Store> {
        home.ensure_sync_dir()?;
        let path = home.store_path();
        crate::error::disk::remember_store_dir(home.sync_dir().as_path());
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&path, flags).map_err(|e| open_error(&path, e))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| open_error(&path, e))?;
        let mut store = Store { conn, path, writer: false, _guard: None };
        // Reads only: a file that is not (yet) known to be a kitty-sync store is refused
        // before anything (WAL mode, auto_vacuum, the version stamp) is written to it.
        store.identify()?;
        store.configure_writer()?;
        store.writer = true;
        store.migrate()?;
        Ok(store)
    }

    /// Opens an existing store without creating or changing any file. `None` when the home
    /// has no store yet. Safe while other processes write (see `read_only`). Close it before
    /// opening another connection to the store in the same process: it may hold the file
    /// locked against every other connection (this process's too), and SQLite maps a file's
    /// WAL index once per process, read-only here.
    pub fn open_read_only(home: &Home) -> Result<Option<Store>> {
        let path = home.store_path();
        if !path.exists() {
            return Ok(None);
        }
        crate::error::disk::remember_store_dir(home.sync_dir().as_path());
        let opened = read_only::open(&path)?;
        let store = Store { conn: opened.conn, path, writer: false, _guard: opened.guard };
        match store.identify()? {
            Found::Empty => Ok(None),
            Found::Ours => Ok(Some(store)),
        }
    }

    /// Opens a store that could not be identified because it is damaged, only to export what
    /// SQLite can still read (`kitty-sync tail`): read-only, and only if the journal's tables
    /// are there.
    pub fn open_damaged(home: &Home) -> Result<Option<Store>> {
        let path = home.store_path();
        if !path.exists() {
            return Ok(None);
        }
        let opened = read_only::open(&path)?;
        let store = Store { conn: opened.conn, path, writer: false, _guard: opened.guard };
        for table in ["events", "payloads"] {
            if !store.has_table(table)? {
                return Err(not_our_store(&store.path));
            }
        }
        Ok(Some(store))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    // The raw connection stays inside the engine: callers get typed operations, so the
    // rules (settled, due, locks, durability) cannot be bypassed with ad-hoc SQL.
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(crate) fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// A second, read-only connection to the same store (for reading ahead while this
    /// connection writes).
    pub fn reader(&self) -> Result<Connection> {
        let uri = uri::file_uri(&self.path, "mode=ro");
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&uri, flags).map_err(|e| open_error(&self.path, e))?;
        conn.busy_timeout(BUSY_TIMEOUT).ctx("cannot configure the store")?;
        Ok(conn)
    }

    /// Size of the database file plus its WAL, in bytes.
    pub fn file_bytes(&self) -> u64 {
        let main = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        let wal = std::fs::metadata(sidecar(&self.path, "-wal")).map(|m| m.len()).unwrap_or(0);
        main + wal
    }

    fn configure_writer(&self) -> Result<()> {
        let page_count: i64 =
            self.conn.query_row("PRAGMA page_count", [], |r| r.get(0)).map_err(|e| open_error(&self.path, e))?;
        if page_count == 0 {
            // Only for a brand-new file, before anything (even WAL mode) writes page 1: new
            // stores give freed pages back incrementally, so gc never has to rewrite the
            // whole file. On an existing store the pragma would rewrite page 1 on every open.
            self.conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL").map_err(|e| open_error(&self.path, e))?;
        }
        let mode: String =
            self.conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(|e| open_error(&self.path, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::StoreUnusable {
                message: format!("{}: cannot switch the store to WAL mode (got {mode})", self.path.display()),
                hint: "the file system may not support shared memory (e.g. a network share); move the home to a local disk".into(),
            });
        }
        self.conn
            .execute_batch(&format!(
                "PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF; PRAGMA temp_store=MEMORY;
                 PRAGMA journal_size_limit={WAL_KEEP_BYTES};"
            ))
            .map_err(|e| open_error(&self.path, e))?;
        // Closing does not checkpoint (see `Drop`): the commit is already durable, a
        // checkpoint-and-delete at every close costs more fsyncs than the capture itself, and
        // `-wal`/`-shm` staying in place let read-only opens read through the WAL index.
        self.conn
            .set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .map(|_| ())
            .map_err(|e| open_error(&self.path, e))
    }

    /// Checkpoints the WAL into the database and truncates it once it has grown past
    /// [`WAL_LIMIT_BYTES`]. Needed because SQLite's own bounds do not work for processes that
    /// each write a little and exit (`emit`): the first connection of every process rebuilds
    /// the WAL index from the WAL and forgets what earlier processes checkpointed, so the WAL
    /// never restarts from its beginning (where `journal_size_limit` would trim it), every
    /// commit appends (1,000 emits: a 31.7 MB WAL), and each automatic checkpoint copies all
    /// of it again. Best effort and never waits: when a reader or writer is using the WAL the
    /// checkpoint stops short, and the next writer to close tries again.
    fn truncate_wal_if_large(&self) {
        let wal = std::fs::metadata(sidecar(&self.path, "-wal")).map(|m| m.len()).unwrap_or(0);
        if wal <= WAL_LIMIT_BYTES {
            return;
        }
        let _ = self.conn.busy_timeout(Duration::ZERO);
        let _ = self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    }

    fn user_version(&self) -> Result<i64> {
        self.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| open_error(&self.path, e))
    }

    fn has_table(&self, name: &str) -> Result<bool> {
        self.conn
            .query_row("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?1", [name], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
            .map_err(|e| open_error(&self.path, e))
    }

    /// What the file is, from reads alone. A kitty-sync store has a non-negative
    /// `user_version` and, from version 1 on, a `meta` table naming its format; a file
    /// without tables is a new store. Anything else is refused without being written to.
    fn identify(&self) -> Result<Found> {
        let version = self.user_version()?;
        if version == 0 && !self.has_any_table()? {
            return Ok(Found::Empty);
        }
        let format = self.format()?;
        if version <= 0 || !format.as_deref().is_some_and(|f| f.starts_with(FORMAT_FAMILY)) {
            return Err(not_our_store(&self.path));
        }
        if version > schema::LATEST_VERSION {
            return Err(Error::StoreUnusable {
                message: format!(
                    "{} was written by a newer kitty-sync (store schema {version}; this binary knows up to {})",
                    self.path.display(),
                    schema::LATEST_VERSION
                ),
                hint: "upgrade kitty-sync; nothing was changed".into(),
            });
        }
        match format.as_deref() {
            Some(FORMAT_VALUE) => Ok(Found::Ours),
            _ => Err(not_our_store(&self.path)),
        }
    }

    fn format(&self) -> Result<Option<String>> {
        if !self.has_table("meta")? {
            return Ok(None);
        }
        self.conn
            .query_row("SELECT value FROM meta WHERE key=?1", [FORMAT_KEY], |r| r.get(0))
            .optional()
            .map_err(|e| open_error(&self.path, e))
    }

    fn migrate(&mut self) -> Result<()> {
        if self.user_version()? == schema::LATEST_VERSION {
            return Ok(());
        }
        let path = self.path.clone();
        let tx =
            self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| open_error(&path, e))?;
        // Another process may have migrated while we waited for the write lock.
        let version: i64 =
            tx.query_row("PRAGMA user_version", [], |r| r.get(0)).ctx("cannot read the store version")?;
        // Re-checked under the write lock: whoever migrated meanwhile wrote a valid version.
        let done = usize::try_from(version).map_err(|_| not_our_store(&path))?;
        for (index, step) in schema::MIGRATIONS.iter().enumerate().skip(done) {
            tx.execute_batch(step).ctx(&format!("cannot apply store migration {}", index + 1))?;
        }
        if version == 0 {
            let node_id = new_node_id();
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2), ('node_id', ?3), ('lamport_clock', '0'), ('created_at', ?4)",
                rusqlite::params![FORMAT_KEY, FORMAT_VALUE, node_id, crate::clock::now_ms().to_string()],
            )
            .ctx("cannot initialise the store")?;
        }
        tx.pragma_update(None, "user_version", schema::LATEST_VERSION).ctx("cannot record the store version")?;
        tx.commit().ctx("cannot commit the store migration")
    }

    fn has_any_table(&self) -> Result<bool> {
        self.conn
            .query_row("SELECT count(*) FROM sqlite_master WHERE type='table'", [], |r| r.get::<_, i64>(0))
            .map(|n| n > 0)
            .map_err(|e| open_error(&self.path, e))
    }

    /// A value from the `meta` table.
    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        self.conn
            .prepare_cached("SELECT value FROM meta WHERE key=?1")
            .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
            .ctx("cannot read store metadata")
    }

    /// This home's stable node id (12 hex characters), created with the store.
    pub fn node_id(&self) -> Result<String> {
        self.meta("node_id")?.ok_or_else(|| not_our_store(&self.path))
    }
}

fn new_node_id() -> String {
    let bytes: [u8; 6] = rand::random();
    hex::encode(bytes)
}

/// `<store>-wal`, `<store>-shm`: built from the path's bytes (`display()` is lossy).
pub(crate) fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// Exit 2, like any input file that is not what it should be: the operator put (or left) a
/// foreign file where the store belongs; nothing is wrong with the disk or the database.
fn not_our_store(path: &Path) -> Error {
    Error::usage(
        format!("{} is not a kitty-sync store", path.display()),
        "move the file aside (kitty-sync never writes to it); a new store is created on the next capture",
    )
}

fn open_error(path: &Path, e: rusqlite::Error) -> Error {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) | Some(rusqlite::ErrorCode::DatabaseCorrupt) => Error::StoreUnusable {
            message: format!("{} is damaged or not a database: {e}", path.display()),
            hint: crate::error::disk::CORRUPT_HINT.into(),
        },
        Some(rusqlite::ErrorCode::CannotOpen)
        | Some(rusqlite::ErrorCode::ReadOnly)
        | Some(rusqlite::ErrorCode::PermissionDenied)
            if crate::error::disk::store_condition(&e).is_none() =>
        {
            Error::Store {
                context: format!("cannot open the store {}", path.display()),
                hint: format!("check that {} and its directory are readable and writable", path.display()),
                source: e,
            }
        }
        _ => Error::store(format!("cannot open the store {}", path.display()), e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        let node = Store::open(&home).unwrap().node_id().unwrap();
        assert_eq!(node.len(), 12);
        assert_eq!(Store::open(&home).unwrap().node_id().unwrap(), node, "node id is stable");
        let ro = Store::open_read_only(&home).unwrap().unwrap();
        assert_eq!(ro.node_id().unwrap(), node);
    }

    #[test]
    fn read_only_open_of_missing_store_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(&dir.path().join("nope"));
        assert!(Store::open_read_only(&home).unwrap().is_none());
        assert!(!dir.path().join("nope").exists());
    }

    /// A store whose `user_version` was then set to `version` from outside.
    fn store_stamped(version: i64) -> (tempfile::TempDir, Home) {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        drop(Store::open(&home).unwrap());
        let conn = Connection::open(home.store_path()).unwrap();
        conn.pragma_update(None, "user_version", version).unwrap();
        drop(conn);
        (dir, home)
    }

    #[test]
    fn newer_schema_is_refused() {
        let (_dir, home) = store_stamped(99);
        let err = Store::open(&home).err().unwrap();
        assert!(err.to_string().contains("newer kitty-sync"), "{err}");
        assert!(Store::open_read_only(&home).err().unwrap().to_string().contains("newer"));
    }

    #[test]
    fn garbage_file_is_refused_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        home.ensure_sync_dir().unwrap();
        std::fs::write(home.store_path(), vec![b'x'; 4096]).unwrap();
        let err = Store::open(&home).err().unwrap();
        assert_eq!(err.exit_code(), 1);
        assert!(err.to_string().contains("not a database"), "{err}");
        assert_eq!(std::fs::read(home.store_path()).unwrap(), vec![b'x'; 4096]);
    }

    /// Every byte of the file and the absence of sidecars, for "refused untouched".
    fn snapshot(home: &Home) -> (Vec<u8>, bool) {
        let wal = sidecar(&home.store_path(), "-wal");
        (std::fs::read(home.store_path()).unwrap(), wal.exists())
    }

    #[test]
    fn foreign_sqlite_file_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        home.ensure_sync_dir().unwrap();
        let conn = Connection::open(home.store_path()).unwrap();
        conn.execute_batch("CREATE TABLE other(x); PRAGMA user_version = 7;").unwrap();
        drop(conn);
        let before = snapshot(&home);
        let err = Store::open(&home).err().unwrap();
        assert!(err.to_string().contains("not a kitty-sync store"), "{err}");
        assert_eq!(err.exit_code(), 2);
        assert_eq!(snapshot(&home), before, "not switched to WAL, not re-stamped");
        assert_eq!(Store::open_read_only(&home).err().unwrap().exit_code(), 2);
    }

    #[test]
    fn negative_user_version_is_not_a_store() {
        let (_dir, home) = store_stamped(-1);
        let before = snapshot(&home);
        for err in [Store::open(&home).err().unwrap(), Store::open_read_only(&home).err().unwrap()] {
            assert!(err.to_string().contains("not a kitty-sync store"), "{err}");
            assert_eq!(err.exit_code(), 2);
        }
        assert_eq!(snapshot(&home), before, "never stamped as current");
    }
}
