//! Waking a reader when another process may have captured something, without polling hot:
//! file-system notifications on the store's directory (the database and its WAL), with a
//! slow timer as the safety net for file systems that do not notify.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use notify::event::ModifyKind;
use notify::{EventKind, RecursiveMode, Watcher};

use crate::home::{Home, STORE_FILE, SYNC_DIR};

/// Without a working notification, how often to look anyway.
const UNWATCHED_POLL: Duration = Duration::from_secs(1);
/// After a change, one more look this much later: a commit becomes visible to readers when
/// the WAL index (shared memory, which raises no notification) is updated, just after the
/// last WAL write that woke us.
const SETTLE: Duration = Duration::from_millis(150);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The store's files changed (or a directory on the way to them appeared).
    Changed,
    /// Nothing was noticed within the wait.
    Timeout,
    /// [`Waker::stop`] was called (a signal, the output went away).
    Stop,
}

/// Wakes a waiting [`StoreWatcher`] from another thread (e.g. a signal handler).
#[derive(Debug, Clone)]
pub struct Waker(Sender<Wake>);

impl Waker {
    pub fn stop(&self) {
        let _ = self.0.send(Wake::Stop);
    }
}

pub struct StoreWatcher {
    home: PathBuf,
    tx: Sender<Wake>,
    rx: Receiver<Wake>,
    watcher: Option<notify::RecommendedWatcher>,
    watching: Option<PathBuf>,
    recheck: bool,
}

impl StoreWatcher {
    /// Never fails: when notifications cannot be set up, waits fall back to a timer.
    pub fn new(home: &Home) -> StoreWatcher {
        let (tx, rx) = mpsc::channel();
        StoreWatcher { home: home.root().to_path_buf(), tx, rx, watcher: None, watching: None, recheck: false }
    }

    pub fn waker(&self) -> Waker {
        Waker(self.tx.clone())
    }

    /// Whether changes are noticed as they happen (else only by the timer).
    pub fn is_notified(&self) -> bool {
        self.watching.as_deref() == Some(self.home.join(SYNC_DIR).as_path())
    }

    /// Blocks until the store's files change, `idle` passes, or [`Waker::stop`]. A burst of
    /// changes is one wake.
    pub fn wait(&mut self, idle: Duration) -> Wake {
        self.ensure_watch();
        let mut timeout = if self.is_notified() { idle } else { idle.min(UNWATCHED_POLL) };
        if std::mem::take(&mut self.recheck) {
            timeout = timeout.min(SETTLE);
        }
        let wake = match self.rx.recv_timeout(timeout) {
            Ok(first) => self.rx.try_iter().fold(first, |seen, next| if next == Wake::Stop { next } else { seen }),
            Err(RecvTimeoutError::Timeout) => Wake::Timeout,
            Err(RecvTimeoutError::Disconnected) => Wake::Stop,
        };
        self.recheck = wake == Wake::Changed;
        wake
    }

    /// Watches `event-sync/` once it exists, else the home (to notice `event-sync/` appear).
    fn ensure_watch(&mut self) {
        let sync_dir = self.home.join(SYNC_DIR);
        let wanted = if sync_dir.is_dir() {
            sync_dir
        } else if self.home.is_dir() {
            self.home.clone()
        } else {
            return;
        };
        if self.watching.as_ref() == Some(&wanted) {
            return;
        }
        if self.watcher.is_none() {
            self.watcher = new_watcher(self.tx.clone());
        }
        let Some(watcher) = self.watcher.as_mut() else { return };
        if let Some(old) = self.watching.take() {
            let _ = watcher.unwatch(&old);
        }
        if watcher.watch(&wanted, RecursiveMode::NonRecursive).is_ok() {
            self.watching = Some(wanted);
        }
    }
}

fn new_watcher(tx: Sender<Wake>) -> Option<notify::RecommendedWatcher> {
    notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        // Opens, closes and metadata changes are no news: every read opens the WAL, and SQLite
        // (running as root) fchown()s it, so reacting to those would wake us by our own reads.
        // Lock files and `-shm` are not captures either.
        let news = matches!(event.kind, EventKind::Create(_) | EventKind::Remove(_))
            || matches!(event.kind, EventKind::Modify(kind) if !matches!(kind, ModifyKind::Metadata(_)));
        if !news || !event.paths.iter().any(|p| is_store_path(p)) {
            return;
        }
        let _ = tx.send(Wake::Changed);
    })
    .ok()
}

fn is_store_path(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else { return false };
    name == SYNC_DIR || name == STORE_FILE || name.strip_prefix(STORE_FILE) == Some("-wal")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_write_to_the_store_wakes_and_a_stop_wins() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        let mut watcher = StoreWatcher::new(&home);
        assert_eq!(watcher.wait(Duration::from_millis(10)), Wake::Timeout);
        std::fs::create_dir(home.sync_dir()).unwrap();
        assert_eq!(watcher.wait(Duration::from_secs(5)), Wake::Changed, "event-sync/ appearing is a change");
        assert_eq!(watcher.wait(Duration::from_millis(10)), Wake::Timeout);
        assert!(watcher.is_notified());
        let started = Instant::now();
        std::fs::write(home.sync_dir().join("drain.lock"), b"").unwrap();
        std::fs::write(home.store_path(), b"x").unwrap();
        assert_eq!(watcher.wait(Duration::from_secs(5)), Wake::Changed);
        assert!(started.elapsed() < Duration::from_secs(1));
        watcher.waker().stop();
        assert_eq!(watcher.wait(Duration::from_secs(5)), Wake::Stop);
    }
}
