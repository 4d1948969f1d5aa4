//! Wakes the daemon when the store changes: every commit appends to `kitty-sync.db-wal`, so a
//! watch on `event-sync/` sees captures from any process without polling.

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};

use crate::error::{Error, Result};
use crate::home::{Home, STORE_FILE};

/// Calls `changed` on every write to the store's files; the watch ends when the watcher drops.
pub fn store_changes(home: &Home, changed: impl Fn() + Send + 'static) -> Result<RecommendedWatcher> {
    let dir = home.sync_dir();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let writes = event.kind.is_create()
            || event.kind.is_modify()
            || matches!(event.kind, EventKind::Access(AccessKind::Close(AccessMode::Write)));
        // The daemon's own state file lives here too; only the store counts.
        let store =
            event.paths.iter().any(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(STORE_FILE)));
        if writes && store {
            changed();
        }
    })
    .map_err(unavailable)?;
    watcher.watch(&dir, RecursiveMode::NonRecursive).map_err(unavailable)?;
    Ok(watcher)
}

fn unavailable(e: notify::Error) -> Error {
    Error::internal(
        format!("cannot watch the store for new captures ({e}); falling back to the poll timer"),
        "raise the inotify limits (fs.inotify.max_user_watches) or pass a shorter --poll-ms",
    )
}
