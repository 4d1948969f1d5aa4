//! One daemon per home: an exclusive lock on `event-sync/daemon.lock` holding the owner's pid,
//! released by the OS however the daemon exits (kill -9 included).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::home::Home;

pub const LOCK_FILE: &str = "daemon.lock";

#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

pub fn acquire(home: &Home) -> Result<InstanceLock> {
    let path = home.ensure_sync_dir()?.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io("cannot open the daemon lock file", &path, e))?;
    match file.try_lock() {
        Ok(()) => {
            let pid = std::process::id().to_string();
            file.set_len(0)
                .and_then(|()| file.seek(SeekFrom::Start(0)))
                .and_then(|_| file.write_all(pid.as_bytes()))
                .map_err(|e| Error::io("cannot write the daemon lock file", &path, e))?;
            Ok(InstanceLock { _file: file })
        }
        Err(std::fs::TryLockError::WouldBlock) => Err(running_elsewhere(&mut file, home)),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io("cannot lock", &path, e)),
    }
}

fn running_elsewhere(file: &mut File, home: &Home) -> Error {
    let pid = owner_pid(file).map(|p| format!("pid {p}")).unwrap_or_else(|| "pid unknown".into());
    Error::busy(
        format!("a kitty-sync daemon is already running for {} ({pid})", home.root().display()),
        "one daemon per home delivers every target; stop it first (SIGTERM) if you want to restart it",
    )
}

/// The owner writes its pid right after locking; give it a moment if we looked in between.
fn owner_pid(file: &mut File) -> Option<u32> {
    for _ in 0..10 {
        let mut text = String::new();
        if file.seek(SeekFrom::Start(0)).is_ok()
            && file.read_to_string(&mut text).is_ok()
            && let Ok(pid) = text.trim().parse()
        {
            return Some(pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_daemon_is_busy_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        let first = acquire(&home).unwrap();
        let err = acquire(&home).unwrap_err();
        assert_eq!(err.exit_code(), 5);
        assert!(err.to_string().contains(&format!("pid {}", std::process::id())), "{err}");
        drop(first);
        acquire(&home).unwrap();
    }
}
