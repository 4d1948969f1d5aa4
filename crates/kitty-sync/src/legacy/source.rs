//! Discovery of spec-kitty's legacy queue files and strictly read-only access to them.
//!
//! Sources are opened with SQLite's `immutable=1` URI flag: SQLite then takes no lock and
//! never creates a `-journal`, `-wal` or `-shm` file next to the source, so neither its bytes
//! nor its mtime can change. A source that still has a non-empty `-journal` or `-wal`
//! (spec-kitty was interrupted mid-write) would read inconsistently that way, so it is copied
//! with its sidecar into a private temporary directory and SQLite recovers the copy there.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use serde::Serialize;

use crate::authority::TargetAuthority;
use crate::home::Home;

/// The unscoped legacy queue, relative to the home.
pub const LEGACY_QUEUE: &str = "queue.db";
/// The directory of scoped legacy queues, relative to the home.
pub const QUEUES_DIR: &str = "queues";

/// How a source relates to the current target authority (contract §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeStatus {
    /// Its digest is the one derived from the current server, user and team.
    Known,
    /// A scoped queue of some other (server, user, team); the scope cannot be recovered.
    Unknown,
    /// The unscoped `queue.db`.
    Legacy,
}

impl ScopeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeStatus::Known => "known",
            ScopeStatus::Unknown => "unknown",
            ScopeStatus::Legacy => "legacy",
        }
    }
}

/// What a source file is (contract §12 `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// spec-kitty ≤ 3.2.3 `queue.db` / `queues/queue-<hex>.db`.
    LegacyQueue,
    /// 3.2.4+ `event_journal/journal-<token>.db`.
    Journal,
    /// 3.2.4+ `delivery/ledger.db` with its `delivery/targets.db`.
    Ledger,
    /// 3.2.7 `projects/<uuid>/sync/sync.db`: events, consent and delivery state of one project.
    ProjectStore,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::LegacyQueue => "legacy_queue",
            SourceKind::Journal => "journal",
            SourceKind::Ledger => "ledger",
            SourceKind::ProjectStore => "project_store",
        }
    }

    pub fn is_python(self) -> bool {
        self != SourceKind::LegacyQueue
    }
}

/// One discovered source file: a legacy queue or one of the Python stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// Absolute path (symlinks not resolved).
    pub path: PathBuf,
    /// Path relative to the home: `queue.db` or `queues/queue-<digest>.db`. Used as the key
    /// of `migrated_sources` so a moved home keeps its migration record.
    pub relative: String,
    /// The hex digest of a scoped queue; `None` for `queue.db` and the Python stores.
    pub digest: Option<String>,
    pub kind: SourceKind,
}

impl SourceFile {
    pub(crate) fn legacy(path: PathBuf, relative: String, digest: Option<String>) -> SourceFile {
        SourceFile { path, relative, digest, kind: SourceKind::LegacyQueue }
    }

    /// The §7 scope of a legacy queue; `None` for the Python stores, which have no scope digest.
    pub fn scope(&self, authority: &TargetAuthority) -> Option<ScopeStatus> {
        (!self.kind.is_python()).then(|| self.scope_status(authority))
    }

    pub fn scope_status(&self, authority: &TargetAuthority) -> ScopeStatus {
        match &self.digest {
            None => ScopeStatus::Legacy,
            // Without a user the authority derives no scoped queue at all (queue.db), so no
            // digest can be "known" (spec-kitty 3.2.4 got this wrong, reference §9.2 item 4).
            Some(d) if authority.user_id.is_some() && *d == authority.derived_digest() => ScopeStatus::Known,
            Some(_) => ScopeStatus::Unknown,
        }
    }

    /// The provenance name recorded per (event, source): never a URL or a team, because the
    /// scope behind a digest cannot be recovered.
    pub fn provenance(&self, authority: &TargetAuthority) -> String {
        match self.kind {
            SourceKind::Journal => {
                let name = self.relative.rsplit('/').next().unwrap_or(&self.relative);
                return format!("journal:{name}");
            }
            SourceKind::ProjectStore => return format!("project:{}", self.digest_key()),
            SourceKind::Ledger => return format!("ledger:{}", self.relative),
            SourceKind::LegacyQueue => {}
        }
        match (&self.digest, self.scope_status(authority)) {
            (Some(d), ScopeStatus::Known) => format!("known:{d}"),
            (Some(d), _) => format!("unknown:{d}"),
            (None, _) => format!("legacy:{LEGACY_QUEUE}"),
        }
    }

    /// The digest as stored in `migrated_sources` (a NOT NULL column); a project store's uuid.
    pub(crate) fn digest_key(&self) -> &str {
        self.digest.as_deref().unwrap_or(if self.kind.is_python() { "python" } else { "legacy" })
    }

    pub fn display_path(&self) -> String {
        self.path.display().to_string()
    }
}

/// What is in the home: sources in migration order, and files in `queues/` that are not queues.
#[derive(Debug, Clone, Default)]
pub struct Discovery {
    pub sources: Vec<SourceFile>,
    pub ignored_files: Vec<PathBuf>,
    /// `queues/` exists but cannot be listed: its queues cannot be migrated.
    pub dir_error: Option<(PathBuf, String)>,
}

/// Finds `queue.db`, then `queues/queue-<hex>.db` sorted by digest. Never fails: a `queues/`
/// directory that cannot be listed is reported in `dir_error`.
pub fn discover(home: &Home) -> Discovery {
    let root = std::path::absolute(home.root()).unwrap_or_else(|_| home.root().to_path_buf());
    let mut discovery = discover_legacy(&root);
    discovery.sources.extend(super::python::discover(&root));
    discovery
}

fn discover_legacy(root: &Path) -> Discovery {
    let mut discovery = Discovery::default();
    let legacy = root.join(LEGACY_QUEUE);
    if fs::symlink_metadata(&legacy).is_ok() {
        discovery.sources.push(SourceFile::legacy(legacy, LEGACY_QUEUE.to_string(), None));
    }
    let dir = root.join(QUEUES_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return discovery,
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => return discovery,
        Err(e) => {
            discovery.dir_error = Some((dir, format!("cannot list the directory: {e}")));
            return discovery;
        }
    };
    let mut scoped = Vec::new();
    let mut other = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                discovery.dir_error = Some((dir.clone(), format!("cannot list the directory: {e}")));
                continue;
            }
        };
        let name = entry.file_name();
        match name.to_str().and_then(queue_digest) {
            Some(digest) => scoped.push(SourceFile::legacy(
                entry.path(),
                format!("{QUEUES_DIR}/queue-{digest}.db"),
                Some(digest.to_string()),
            )),
            None => other.push((name.to_string_lossy().into_owned(), entry.path())),
        }
    }
    scoped.sort_by(|a, b| a.digest.cmp(&b.digest));
    other.sort();
    // SQLite sidecars of a discovered queue belong to it (see `open`), they are not "other files".
    let is_sidecar = |name: &str| {
        ["-journal", "-wal", "-shm"]
            .iter()
            .any(|suffix| name.strip_suffix(suffix).and_then(queue_digest).is_some_and(|d| scoped_has(&scoped, d)))
    };
    discovery.ignored_files = other.into_iter().filter(|(name, _)| !is_sidecar(name)).map(|(_, path)| path).collect();
    discovery.sources.extend(scoped);
    discovery
}

fn scoped_has(scoped: &[SourceFile], digest: &str) -> bool {
    scoped.iter().any(|s| s.digest.as_deref() == Some(digest))
}

/// `queue-<lowercase hex>.db` → the digest (spec-kitty 3.2.4's `^queue-([0-9a-f]+)\.db$`).
pub fn queue_digest(name: &str) -> Option<&str> {
    let digest = name.strip_prefix("queue-")?.strip_suffix(".db")?;
    let hex = !digest.is_empty() && digest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    hex.then_some(digest)
}

/// Which optional columns the source's `queue` table has (older queues lack `coalesce_key`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueLayout {
    has_id: bool,
    has_timestamp: bool,
    has_coalesce_key: bool,
}

/// An open, validated legacy queue.
pub(crate) struct OpenSource {
    pub conn: Connection,
    layout: QueueLayout,
    pub queue_rows: u64,
    pub body_upload_queue_rows: u64,
    pub body_upload_failure_log_rows: u64,
    _copy: Option<TempCopy>,
}

/// Opens a source read-only and checks it is a spec-kitty queue. The error is the reason, for
/// the operator, why this source cannot be migrated.
pub(crate) fn open(file: &SourceFile) -> Result<Opened, String> {
    if file.kind.is_python() {
        return super::python::open(file).map(Opened::Python);
    }
    let (conn, copy) = open_db(&file.path)?;
    probe(conn, copy).map(Opened::Queue)
}

/// An open source of any kind.
pub(crate) enum Opened {
    Queue(OpenSource),
    Python(super::python::PythonSource),
}

impl Opened {
    /// Rows the import reads (queue rows, journal rows, or ledger rows).
    pub fn rows(&self) -> u64 {
        match self {
            Opened::Queue(q) => q.queue_rows,
            Opened::Python(p) => p.event_rows + p.ledger_rows,
        }
    }

    /// Events the file holds (0 for a ledger).
    pub fn event_rows(&self) -> u64 {
        match self {
            Opened::Queue(q) => q.queue_rows,
            Opened::Python(p) => p.event_rows,
        }
    }

    pub fn body_upload_counts(&self) -> (u64, u64) {
        match self {
            Opened::Queue(q) => (q.body_upload_queue_rows, q.body_upload_failure_log_rows),
            Opened::Python(_) => (0, 0),
        }
    }

    pub fn body_upload_rows(&self) -> u64 {
        let (queue, log) = self.body_upload_counts();
        queue + log
    }
}

/// Opens any SQLite source read-only (see the module comment); the error is the reason.
pub(crate) fn open_db(path: &Path) -> Result<(Connection, Option<TempCopy>), String> {
    let meta = fs::metadata(path).map_err(|e| format!("cannot read the file: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".to_string());
    }
    check_header(path, meta.len())?;
    if write_locked(path) {
        return Err("locked: another process (spec-kitty?) is writing it right now; \
                    run `kitty-sync migrate` again once it is done"
            .to_string());
    }
    if has_pending_sidecar(path) {
        let copy = TempCopy::of(path).map_err(|e| format!("cannot make a private copy to recover it: {e}"))?;
        let conn = open_copy(&copy.db).map_err(|e| describe(&e))?;
        Ok((conn, Some(copy)))
    } else {
        Ok((open_immutable(path).map_err(|e| describe(&e))?, None))
    }
}

fn probe(conn: Connection, copy: Option<TempCopy>) -> Result<OpenSource, String> {
    let tables = table_names(&conn).map_err(|e| describe(&e))?;
    if !tables.iter().any(|t| t == "queue") {
        return Err("no `queue` table: not a spec-kitty queue".to_string());
    }
    let columns = column_names(&conn, "queue").map_err(|e| describe(&e))?;
    let missing: Vec<&str> =
        ["event_id", "event_type", "data"].into_iter().filter(|c| !columns.iter().any(|have| have == c)).collect();
    if !missing.is_empty() {
        return Err(format!("the `queue` table has no {} column", missing.join(", ")));
    }
    let has = |name: &str| columns.iter().any(|c| c == name);
    let layout =
        QueueLayout { has_id: has("id"), has_timestamp: has("timestamp"), has_coalesce_key: has("coalesce_key") };
    let count = |table: &str| -> Result<u64, String> {
        if !tables.iter().any(|t| t == table) {
            return Ok(0);
        }
        conn.query_row(&format!("SELECT count(*) FROM \"{table}\""), [], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
            .map_err(|e| describe(&e))
    };
    let queue_rows = count("queue")?;
    let body_upload_queue_rows = count("body_upload_queue")?;
    let body_upload_failure_log_rows = count("body_upload_failure_log")?;
    Ok(OpenSource { conn, layout, queue_rows, body_upload_queue_rows, body_upload_failure_log_rows, _copy: copy })
}

pub(crate) fn table_names(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name FROM sqlite_master WHERE type = 'table'")?;
    let names = stmt.query_map([], |r| r.get::<_, String>(0))?;
    names.collect()
}

pub(crate) fn column_names(conn: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(&format!("PRAGMA table_info(\"{table}\")"))?;
    let names = stmt.query_map([], |r| r.get::<_, String>(1))?;
    names.collect()
}

/// The operator-facing reason for a SQLite error on a source.
pub(crate) fn describe(e: &rusqlite::Error) -> String {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => format!("not a SQLite database ({e})"),
        Some(rusqlite::ErrorCode::DatabaseCorrupt) => format!("damaged or truncated database ({e})"),
        _ => format!("cannot read the database: {e}"),
    }
}

const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";
const HEADER_LEN: usize = 100;

/// Rejects zero-byte, non-SQLite and truncated files from the 100-byte header alone, with a
/// precise reason (SQLite itself may only notice a truncation when it reads a missing page).
pub(crate) fn check_header(path: &Path, len: u64) -> Result<(), String> {
    if len == 0 {
        return Err("empty file (0 bytes): not a SQLite database".to_string());
    }
    let mut header = Vec::with_capacity(HEADER_LEN);
    fs::File::open(path)
        .and_then(|f| f.take(HEADER_LEN as u64).read_to_end(&mut header))
        .map_err(|e| format!("cannot read the file: {e}"))?;
    if !header.starts_with(SQLITE_MAGIC) {
        return Err(format!("not a SQLite database ({len} bytes without the SQLite header)"));
    }
    if header.len() < HEADER_LEN {
        return Err(format!("truncated: {len} bytes, shorter than a SQLite header"));
    }
    let be32 = |at: usize| u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536u64,
        n => u64::from(n),
    };
    // The in-header page count is valid only when "version-valid-for" equals the change counter.
    let pages = if be32(92) == be32(24) { u64::from(be32(28)) } else { 0 };
    let expected = page_size.saturating_mul(pages);
    if expected > len {
        return Err(format!("truncated: {len} bytes, but its header describes {expected} bytes"));
    }
    Ok(())
}

/// Whether a live process holds SQLite's write lock on the database right now (a transaction
/// of the Python CLI in progress): its file may be half-written, so the source is skipped
/// this time. Asked with POSIX `F_GETLK`, which takes no lock and changes nothing.
/// Rollback-journal mode: RESERVED, PENDING and EXCLUSIVE are write locks on the lock bytes at
/// 1 GiB of the database file; WAL mode: the writer holds the write lock on byte 120 of `-shm`.
#[cfg(unix)]
fn write_locked(path: &Path) -> bool {
    const PENDING_BYTE: i64 = 0x4000_0000;
    const WAL_WRITE_LOCK: i64 = 120;
    lock_conflict(path, PENDING_BYTE, 512) || lock_conflict(&sidecar(path, "-shm"), WAL_WRITE_LOCK, 1)
}

#[cfg(not(unix))]
fn write_locked(_path: &Path) -> bool {
    false
}

/// Would a read lock on `len` bytes at `start` conflict with another process's write lock?
#[cfg(unix)]
fn lock_conflict(path: &Path, start: i64, len: i64) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(file) = fs::File::open(path) else { return false };
    // SAFETY: `flock` is a plain C struct for which all-zero bytes are a valid value.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_RDLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = start as libc::off_t;
    lock.l_len = len as libc::off_t;
    // SAFETY: the descriptor is open for the duration of the call and `lock` is a valid,
    // exclusively borrowed `flock`; F_GETLK only writes into it.
    let asked = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut lock) };
    asked == 0 && lock.l_type != libc::F_UNLCK as libc::c_short
}

pub(crate) fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

fn has_pending_sidecar(path: &Path) -> bool {
    ["-journal", "-wal"].iter().any(|s| fs::metadata(sidecar(path, s)).is_ok_and(|m| m.is_file() && m.len() > 0))
}

fn open_immutable(path: &Path) -> rusqlite::Result<Connection> {
    let uri = crate::store::uri::file_uri(path, "mode=ro&immutable=1");
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    Connection::open_with_flags(uri, flags)
}

fn open_copy(path: &Path) -> rusqlite::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    // The first read rolls back a hot journal (or replays a WAL) in the copy.
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0))?;
    Ok(conn)
}

/// A private copy of a source and its sidecars, removed on drop.
pub(crate) struct TempCopy {
    dir: PathBuf,
    db: PathBuf,
}

impl TempCopy {
    fn of(path: &Path) -> std::io::Result<TempCopy> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("kitty-sync-legacy-{}-{n}", std::process::id()));
            match fs::create_dir(&dir) {
                Ok(()) => break dir,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        };
        let copy = TempCopy { db: dir.join("queue.db"), dir };
        copy.fill(path)?;
        Ok(copy)
    }

    fn fill(&self, path: &Path) -> std::io::Result<()> {
        copy_writable(path, &self.db)?;
        for suffix in ["-journal", "-wal"] {
            let side = sidecar(path, suffix);
            if side.is_file() {
                copy_writable(&side, &sidecar(&self.db, suffix))?;
            }
        }
        Ok(())
    }
}

/// `fs::copy` keeps the source's (often read-only) mode; the copy must be writable for SQLite
/// to recover it.
fn copy_writable(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::copy(from, to)?;
    let mut perms = fs::metadata(to)?.permissions();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        perms.set_mode(0o600);
    }
    #[cfg(not(unix))]
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    fs::set_permissions(to, perms)
}

impl Drop for TempCopy {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One `queue` row, borrowed from the source's cursor.
pub(crate) struct RawRow<'a> {
    pub id: i64,
    pub event_id: Option<&'a str>,
    pub event_type: Option<&'a str>,
    /// The `data` column's bytes, TEXT or BLOB alike.
    pub data: Option<&'a [u8]>,
    /// Legacy enqueue time in epoch seconds.
    pub timestamp: Option<f64>,
    pub coalesce_key: Option<&'a str>,
}

/// Why reading rows stopped: the source failed (its reason), or the consumer did.
pub(crate) enum ReadStop<E> {
    Source(String),
    Consumer(E),
}

/// Calls `f` for every `queue` row in (`timestamp`, `id`) order, streaming (memory is bounded
/// by the largest row).
pub(crate) fn for_each_row<E>(
    source: &OpenSource,
    mut f: impl FnMut(&RawRow<'_>) -> Result<(), E>,
) -> Result<(), ReadStop<E>> {
    let layout = source.layout;
    let id = if layout.has_id { "\"id\"" } else { "rowid" };
    let timestamp = if layout.has_timestamp { "\"timestamp\"" } else { "NULL" };
    let coalesce = if layout.has_coalesce_key { "\"coalesce_key\"" } else { "NULL" };
    let sql = format!(
        "SELECT {id}, \"event_id\", \"event_type\", \"data\", {timestamp}, {coalesce} FROM \"queue\" ORDER BY {timestamp}, {id}"
    );
    let source_err = |e: rusqlite::Error| ReadStop::Source(describe(&e));
    let mut stmt = source.conn.prepare(&sql).map_err(source_err)?;
    let mut rows = stmt.query([]).map_err(source_err)?;
    while let Some(row) = rows.next().map_err(source_err)? {
        let raw = raw_row(row).map_err(source_err)?;
        f(&raw).map_err(ReadStop::Consumer)?;
    }
    Ok(())
}

fn raw_row<'a>(row: &'a rusqlite::Row<'_>) -> rusqlite::Result<RawRow<'a>> {
    let text = |v: ValueRef<'a>| match v {
        ValueRef::Text(t) => std::str::from_utf8(t).ok(),
        _ => None,
    };
    Ok(RawRow {
        id: match row.get_ref(0)? {
            ValueRef::Integer(i) => i,
            _ => 0,
        },
        event_id: text(row.get_ref(1)?),
        event_type: text(row.get_ref(2)?),
        data: match row.get_ref(3)? {
            ValueRef::Text(b) | ValueRef::Blob(b) => Some(b),
            _ => None,
        },
        timestamp: match row.get_ref(4)? {
            ValueRef::Integer(i) => Some(i as f64),
            ValueRef::Real(f) if f.is_finite() => Some(f),
            _ => None,
        },
        coalesce_key: text(row.get_ref(5)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_names() {
        assert_eq!(queue_digest("queue-f7b048d5c00bc4e2.db"), Some("f7b048d5c00bc4e2"));
        assert_eq!(queue_digest("queue-abc.db"), Some("abc"));
        assert_eq!(queue_digest("queue-ABC.db"), None);
        assert_eq!(queue_digest("queue-.db"), None);
        assert_eq!(queue_digest("queue-xyz.db"), None);
        assert_eq!(queue_digest("queue-abc.db-journal"), None);
        assert_eq!(queue_digest("notes.txt"), None);
    }
}
