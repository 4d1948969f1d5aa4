//! Read-only opens: read the store correctly while other processes write and checkpoint it,
//! and never write or create a file (CONTRACT §2: `status`, `inspect`, … work on a read-only
//! home and leave it as it was).
//!
//! SQLite reads a WAL database consistently only through its WAL index (`-shm`), and a
//! connection that finds no `-wal`/`-shm` creates them when the directory is writable. Reading
//! the main file alone (`immutable=1`) is safe only while nobody can change it: a checkpoint
//! rewriting pages under the reader gives "malformed" errors or wrong counts. So:
//!
//! - `-wal` and `-shm` exist: `mode=ro&readonly_shm=1`, SQLite's read-only WAL protocol
//!   (3.22+): the index is mapped read-only, or rebuilt in heap memory from the WAL when no
//!   writer is attached, and the reader's WAL read lock keeps checkpoints from overwriting
//!   the pages it reads. Nothing is written.
//! - no `-wal`: no connection has the database open, because every connection to a WAL
//!   database keeps its `-wal` open and holds SQLite's SHARED lock (a read lock on bytes of
//!   the main file) from its first read until it closes. A whole-file write lock is granted
//!   only when no such lock is held, and while it is held no connection can start (its busy
//!   handler waits): the file cannot change, and `immutable=1` reads it creating nothing.
//! - the main file cannot be opened for writing (a read-only home): nobody running as this
//!   user can write it either; `immutable=1`.
//! - `-wal` without `-shm` (left by a crash): plain `mode=ro`, which rebuilds the index and
//!   may create `-shm`: reading every committed event comes first.
//!
//! Before looking at the sidecars a whole-file read lock is taken: it blocks the one
//! operation that deletes them (the last connection closing takes SQLite's EXCLUSIVE lock),
//! so they cannot vanish between the check and SQLite opening them. The locks are Linux
//! open-file-description locks: unlike POSIX record locks they conflict with SQLite's locks
//! even inside this process, and closing them never drops SQLite's own. The lock is held
//! until the connection is closed.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

use super::{BUSY_TIMEOUT, open_error, sidecar, uri};
use crate::error::{Error, Result, StoreContext};

/// A read-only connection, and the lock it relies on (dropped after the connection).
pub(super) struct Opened {
    pub conn: Connection,
    pub guard: Option<FileLock>,
}

pub(super) fn open(path: &Path) -> Result<Opened> {
    let deadline = Instant::now() + BUSY_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(opened) = attempt(path)? {
            return Ok(opened);
        }
        if Instant::now() >= deadline {
            return Err(Error::busy(
                format!("{} stayed locked by another process for {} s", path.display(), BUSY_TIMEOUT.as_secs()),
                "another kitty-sync process holds the store; run the command again when it finishes",
            ));
        }
        // A writer opening or closing the store holds it for milliseconds; back off a little
        // (with jitter, so two readers do not retry in lockstep).
        std::thread::sleep(pause + Duration::from_micros(rand::random_range(0..1000)));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// One try; `None` when another process holds a lock that stops this one for the moment.
fn attempt(path: &Path) -> Result<Option<Opened>> {
    let Some(lock) = FileLock::open(path)? else {
        // No locking here (not unix): read through the WAL, as SQLite would by default.
        return connect(path, "mode=ro").map(|conn| Some(Opened { conn, guard: None }));
    };
    if !lock.try_lock(LockKind::Shared)? {
        return Ok(None);
    }
    let wal = sidecar(path, "-wal").exists();
    let shm = sidecar(path, "-shm").exists();
    let query = match (wal, shm) {
        (true, true) => "mode=ro&readonly_shm=1",
        (true, false) => "mode=ro",
        (false, _) if !lock.writable => "mode=ro&immutable=1",
        (false, _) => {
            if !lock.try_lock(LockKind::Exclusive)? {
                return Ok(None);
            }
            "mode=ro&immutable=1"
        }
    };
    let conn = connect(path, query)?;
    Ok(Some(Opened { conn, guard: Some(lock) }))
}

fn connect(path: &Path, query: &str) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(uri::file_uri(path, query), flags).map_err(|e| open_error(path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT).ctx("cannot configure the store")?;
    Ok(conn)
}

#[derive(Clone, Copy)]
enum LockKind {
    Shared,
    Exclusive,
}

/// A lock on the whole store file, released when dropped.
pub(super) struct FileLock {
    file: File,
    /// Opened for writing, so an exclusive lock is possible.
    writable: bool,
}

impl FileLock {
    fn open(path: &Path) -> Result<Option<FileLock>> {
        if !cfg!(unix) {
            return Ok(None);
        }
        // Opening for writing writes nothing; it is what a write lock requires.
        let (file, writable) = match std::fs::OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => (file, true),
            Err(_) => (File::open(path).map_err(|e| Error::io("cannot open the store", path, e))?, false),
        };
        Ok(Some(FileLock { file, writable }))
    }

    /// Non-blocking; `false` when another process (or SQLite in this one) holds a
    /// conflicting lock.
    fn try_lock(&self, kind: LockKind) -> Result<bool> {
        sys::try_lock(&self.file, kind).map_err(|e| {
            Error::internal(
                format!("cannot lock the store: {e}"),
                "check that the file system supports file locks (a local disk does)",
            )
        })
    }
}

#[cfg(unix)]
mod sys {
    use std::fs::File;
    use std::os::fd::AsRawFd;

    use super::LockKind;

    /// Open-file-description locks where the OS has them (Linux), record locks elsewhere.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    const SET_LOCK: libc::c_int = libc::F_OFD_SETLK;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    const SET_LOCK: libc::c_int = libc::F_SETLK;

    pub(super) fn try_lock(file: &File, kind: LockKind) -> std::io::Result<bool> {
        // SAFETY: `flock` is a plain C struct; all-zero is a valid value (and l_pid must be 0
        // for OFD locks). Start 0 and length 0 cover the whole file, SQLite's lock bytes at
        // 1 GiB included, however large the file is.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = match kind {
            LockKind::Shared => libc::F_RDLCK,
            LockKind::Exclusive => libc::F_WRLCK,
        } as _;
        lock.l_whence = libc::SEEK_SET as _;
        // SAFETY: a valid descriptor owned by `file`, and a pointer to an initialised `flock`
        // that fcntl only reads during the call.
        if unsafe { libc::fcntl(file.as_raw_fd(), SET_LOCK, &lock) } == 0 {
            return Ok(true);
        }
        let error = std::io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EAGAIN | libc::EACCES) => Ok(false),
            _ => Err(error),
        }
    }
}

#[cfg(not(unix))]
mod sys {
    use std::fs::File;

    use super::LockKind;

    pub(super) fn try_lock(_file: &File, _kind: LockKind) -> std::io::Result<bool> {
        Ok(true)
    }
}
