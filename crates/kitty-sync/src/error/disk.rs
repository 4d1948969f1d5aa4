//! Naming what the filesystem refused. SQLite reports a full disk as "database or disk is
//! full" at best and as a bare "disk I/O error" when the failing write was to its shared
//! memory or a sync; the operator needs the condition and its fix, never advice to restore
//! a backup over good data.

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Hint for a store SQLite found damaged.
pub const CORRUPT_HINT: &str = "the store is damaged: keep a copy of event-sync/ before anything else, then run \
     `kitty-sync doctor` to see what can still be read; `kitty-sync tail > rescue.jsonl` exports the readable events \
     (re-import them into a fresh home with `kitty-sync emit --jsonl rescue.jsonl`)";

/// A condition of the filesystem that the operator fixes outside kitty-sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskCondition {
    Full,
    QuotaExceeded,
    ReadOnly,
    PermissionDenied,
}

impl DiskCondition {
    pub fn of_io(error: &std::io::Error) -> Option<DiskCondition> {
        match error.kind() {
            ErrorKind::StorageFull => Some(DiskCondition::Full),
            ErrorKind::QuotaExceeded => Some(DiskCondition::QuotaExceeded),
            ErrorKind::ReadOnlyFilesystem => Some(DiskCondition::ReadOnly),
            ErrorKind::PermissionDenied => Some(DiskCondition::PermissionDenied),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            DiskCondition::Full => "disk full: no space left on the device",
            DiskCondition::QuotaExceeded => "disk quota exceeded",
            DiskCondition::ReadOnly => "read-only filesystem",
            DiskCondition::PermissionDenied => "permission denied",
        }
    }

    /// The fix, naming `place` (the file or directory that could not be written).
    pub fn hint(self, place: &Path) -> String {
        let place = place.display();
        let kept = "nothing captured before was lost";
        match self {
            DiskCondition::Full => {
                format!("disk full: free space on the filesystem holding {place}, then run the command again; {kept}")
            }
            DiskCondition::QuotaExceeded => format!(
                "disk quota exceeded: free space within your quota on the filesystem holding {place} (or have it \
                 raised), then run the command again; {kept}"
            ),
            DiskCondition::ReadOnly => format!(
                "read-only filesystem: {place} is on a filesystem mounted read-only; remount it read-write or use a \
                 writable home (--home or SPEC_KITTY_HOME), then run the command again"
            ),
            DiskCondition::PermissionDenied => format!(
                "permission denied: make {place} (and its directory) readable and writable for this user, then run \
                 the command again"
            ),
        }
    }
}

/// The directory of the store opened last in this process: where a failed SQLite write went.
static STORE_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Records where the store lives, so that its I/O errors can be explained.
pub(crate) fn remember_store_dir(dir: &Path) {
    if let Ok(mut slot) = STORE_DIR.lock() {
        *slot = Some(dir.to_path_buf());
    }
}

/// The disk condition behind a SQLite error, and the directory it concerns. A full disk is
/// certain from its code; the other I/O failures are asked of the filesystem by a small
/// probe write next to the store, because SQLite keeps the `errno` to itself.
pub(crate) fn store_condition(error: &rusqlite::Error) -> Option<(DiskCondition, PathBuf)> {
    use rusqlite::ErrorCode;
    let dir = STORE_DIR.lock().ok().and_then(|slot| slot.clone());
    let code = error.sqlite_error_code()?;
    if code == ErrorCode::DiskFull {
        return Some((DiskCondition::Full, dir.unwrap_or_else(|| PathBuf::from("the kitty-sync home"))));
    }
    let probing = matches!(
        code,
        ErrorCode::SystemIoFailure | ErrorCode::ReadOnly | ErrorCode::CannotOpen | ErrorCode::PermissionDenied
    );
    if !probing {
        return None;
    }
    let dir = dir?;
    probe(&dir).map(|condition| (condition, dir))
}

/// Writes and syncs 64 KiB in `dir` (then removes it): what a commit needs at least.
fn probe(dir: &Path) -> Option<DiskCondition> {
    let path = dir.join(format!(".kitty-sync-probe-{}", std::process::id()));
    let result = std::fs::OpenOptions::new().write(true).create_new(true).open(&path).and_then(|mut file| {
        let written = file.write_all(&[0u8; 64 * 1024]).and_then(|()| file.sync_all());
        let _ = std::fs::remove_file(&path);
        written
    });
    result.err().as_ref().and_then(DiskCondition::of_io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_name_the_condition_and_the_fix() {
        let full = std::io::Error::from_raw_os_error(28);
        let condition = DiskCondition::of_io(&full).unwrap();
        assert_eq!(condition, DiskCondition::Full);
        let hint = condition.hint(Path::new("/h/event-sync"));
        assert!(hint.starts_with("disk full: free space on the filesystem holding /h/event-sync"), "{hint}");
        assert_eq!(DiskCondition::of_io(&std::io::Error::from_raw_os_error(30)), Some(DiskCondition::ReadOnly));
        assert_eq!(DiskCondition::of_io(&std::io::Error::from_raw_os_error(13)), Some(DiskCondition::PermissionDenied));
        #[cfg(target_os = "linux")]
        assert_eq!(DiskCondition::of_io(&std::io::Error::from_raw_os_error(122)), Some(DiskCondition::QuotaExceeded));
        assert_eq!(DiskCondition::of_io(&std::io::Error::from_raw_os_error(5)), None);
    }

    #[test]
    fn a_full_sqlite_is_disk_full() {
        let error = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL), None);
        let store_error = crate::Error::store("cannot commit", error);
        assert!(store_error.to_string().contains("disk full"), "{store_error}");
        assert!(store_error.hint().starts_with("disk full: free space"), "{}", store_error.hint());
    }
}
