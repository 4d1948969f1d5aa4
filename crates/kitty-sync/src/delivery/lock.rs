//! The home's drain lock: an exclusive lock on `event-sync/drain.lock`, released by the OS
//! when the process exits, however it exits.
//!
//! Every engine operation that changes delivery state (drain, retry, archive, gc, legacy
//! migration and conflict resolution) takes a `&DrainLock` for the store it changes, or
//! acquires one itself (cargo's `CacheLock` pattern: the entry point acquires, lower levels
//! require the proof). So no command can change delivery state beside a running drain.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::home::Home;
use crate::store::Store;

/// Proof that this process holds the drain lock of one home.
#[derive(Debug)]
pub struct DrainLock {
    _file: File,
    dir: PathBuf,
}

impl DrainLock {
    /// Fails unless this lock is the one of the home `store` lives in (a proof for another
    /// home proves nothing).
    pub fn guards(&self, store: &Store) -> Result<()> {
        let store_dir = store.path().parent().unwrap_or(Path::new(""));
        if same_dir(store_dir, &self.dir) {
            return Ok(());
        }
        Err(Error::internal(
            format!("the drain lock held is for {}, not for the store {}", self.dir.display(), store.path().display()),
            "report this as a bug",
        ))
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// For operations that can also run as a preview: a dry run changes nothing and needs no
/// lock; applying needs the proof.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    DryRun,
    Apply(&'a DrainLock),
}

impl Change<'_> {
    pub fn is_dry_run(self) -> bool {
        matches!(self, Change::DryRun)
    }
}

/// Takes the lock, waiting up to `wait` for another holder to finish. `what` names the
/// command for the busy message.
pub fn acquire(home: &Home, wait: Duration, what: &str) -> Result<DrainLock> {
    let dir = home.ensure_sync_dir()?;
    let path = home.drain_lock_path();
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io("cannot open the lock file", &path, e))?;
    // A wait too long to represent is a wait without end.
    let deadline = Instant::now().checked_add(wait);
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(DrainLock { _file: file, dir }),
            Err(std::fs::TryLockError::WouldBlock) if deadline.is_none_or(|d| Instant::now() < d) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::busy(
                    format!("another kitty-sync drain is running in {} ({what} needs it to finish)", dir.display()),
                    "wait for it to finish, or pass --wait SECS to wait for it",
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("cannot lock", &path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_busy_until_release() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        let first = acquire(&home, Duration::ZERO, "test").unwrap();
        let err = acquire(&home, Duration::from_millis(120), "test").unwrap_err();
        assert_eq!(err.exit_code(), 5);
        drop(first);
        acquire(&home, Duration::ZERO, "test").unwrap();
    }

    #[test]
    fn a_lock_proves_nothing_for_another_home() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (home_a, home_b) = (Home::at(a.path()), Home::at(b.path()));
        let lock = acquire(&home_a, Duration::ZERO, "test").unwrap();
        lock.guards(&Store::open(&home_a).unwrap()).unwrap();
        assert_eq!(lock.guards(&Store::open(&home_b).unwrap()).unwrap_err().exit_code(), 1);
    }

    #[test]
    fn an_endless_wait_does_not_overflow() {
        let dir = tempfile::tempdir().unwrap();
        acquire(&Home::at(dir.path()), Duration::MAX, "test").unwrap();
    }
}
