//! One drain (or gc/archive) per home at a time: an exclusive lock on `event-sync/drain.lock`,
//! released by the OS when the process exits, however it exits.

use std::fs::{File, OpenOptions};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::home::Home;

#[derive(Debug)]
pub struct DrainLock {
    _file: File,
}

/// Takes the lock, waiting up to `wait` for another holder to finish.
pub fn acquire(home: &Home, wait: Duration, what: &str) -> Result<DrainLock> {
    let dir = home.ensure_sync_dir()?;
    let path = home.drain_lock_path();
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io("cannot open the lock file", &path, e))?;
    let deadline = Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(DrainLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
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
}
