//! The one way kitty-sync replaces a file (config, credentials, reports, daemon state): a temp
//! file beside the destination, owner-only from its first byte, fsync, rename, fsync of the
//! directory. Readers see the old or the new file, never a torn one; a symlink keeps pointing
//! where it pointed (its target is replaced); anything that is not a regular file is refused.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};

/// Symlinks followed before giving up (the kernel's own limit).
const MAX_SYMLINKS: usize = 40;

/// A temp file this old and not locked was left by a killed writer: a live writer locks its
/// temp file right after creating it, long before this.
const LEFTOVER_AGE: Duration = Duration::from_secs(1);

/// Replaces `path` with `bytes`. The new file gets `mode`, else the old file's mode, else
/// 0600. Through a symlink, the link's final target is replaced and the link kept.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<()> {
    write_atomically_with(path, mode, |file| file.write_all(bytes).map_err(|e| Error::io("cannot write", path, e)))
}

/// [`write_atomically`] for content produced by `write` (streamed into the temp file). When
/// `write` fails, the temp file is removed and `path` is untouched.
pub fn write_atomically_with<T>(
    path: &Path,
    mode: Option<u32>,
    write: impl FnOnce(&mut File) -> Result<T>,
) -> Result<T> {
    let target = resolve_destination(path)?;
    let keep_mode = fs::metadata(&target).ok().map(|m| permission_bits(&m));
    remove_leftovers(&target);
    let (tmp, mut file) = create_temp(&target).map_err(|e| Error::io("cannot write", path, e))?;
    let result = write(&mut file).and_then(|value| {
        commit(&file, &tmp, &target, mode.or(keep_mode)).map_err(|e| Error::io("cannot write", path, e))?;
        Ok(value)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Makes the written temp file durable and puts it in place of `target`.
fn commit(file: &File, tmp: &Path, target: &Path, mode: Option<u32>) -> std::io::Result<()> {
    set_mode(file, mode)?;
    file.sync_all()?;
    fs::rename(tmp, target)?;
    if let Ok(dir) = File::open(parent_dir(target)) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Checks, before any work is done, that [`write_atomically`] can later write `path`: its
/// directory exists and takes new files, and it is a regular file or absent. Exit 2 otherwise.
pub fn check_destination(path: &Path) -> Result<()> {
    let target = resolve_destination(path)?;
    let dir = parent_dir(&target);
    let unusable = |why: String| {
        Error::usage(
            format!("cannot write {}: {why}", path.display()),
            "pass a path in an existing, writable directory (nothing was done)",
        )
    };
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(unusable(format!("{} is not a directory", dir.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(unusable(format!("the directory {} does not exist", dir.display())));
        }
        Err(e) => return Err(unusable(format!("{}: {e}", dir.display()))),
    }
    // The only reliable test of "can create files here" (permissions, ACLs, read-only mounts,
    // root) is to create one.
    let (tmp, _file) = create_temp(&target).map_err(|e| unusable(format!("{}: {e}", dir.display())))?;
    let _ = fs::remove_file(tmp);
    Ok(())
}

/// Follows symlinks to the file that will really be replaced. A missing final target is
/// fine (it is created); a directory, device, FIFO or socket is refused.
fn resolve_destination(path: &Path) -> Result<PathBuf> {
    let mut current = path.to_path_buf();
    for _ in 0..MAX_SYMLINKS {
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let link = fs::read_link(&current).map_err(|e| Error::io("cannot read the symlink", &current, e))?;
                current = parent_dir(&current).join(link);
            }
            Ok(meta) if meta.is_file() => return Ok(current),
            Ok(meta) => return Err(not_regular(path, &current, &meta)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(current),
            Err(e) => return Err(Error::io("cannot inspect", &current, e)),
        }
    }
    Err(Error::usage(
        format!("cannot write {}: too many levels of symbolic links", path.display()),
        "point the path (or its symlink) at a regular file",
    ))
}

fn not_regular(path: &Path, target: &Path, meta: &fs::Metadata) -> Error {
    let what = if meta.is_dir() { "a directory" } else { "not a regular file (a device, FIFO or socket)" };
    let through = if target == path { String::new() } else { format!(" (via symlink to {})", target.display()) };
    Error::usage(
        format!("cannot write {}{through}: it is {what}", path.display()),
        "kitty-sync only replaces regular files; pass the path of a regular file or of a new one",
    )
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn temp_prefix(target: &Path) -> String {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
    format!(".{name}.tmp-")
}

/// A new, unique, owner-only file beside `target`, locked for as long as it is open so that
/// [`remove_leftovers`] can tell it from the leftover of a killed writer.
fn create_temp(target: &Path) -> std::io::Result<(PathBuf, File)> {
    let dir = parent_dir(target);
    let prefix = temp_prefix(target);
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    loop {
        let suffix: u64 = rand::random();
        let tmp = dir.join(format!("{prefix}{}-{suffix:016x}", std::process::id()));
        match options.open(&tmp) {
            Ok(file) => {
                file.lock()?;
                return Ok((tmp, file));
            }
            // Taken by someone else (or planted): never write through a name we did not create.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Removes temp files of `target` that a killed writer left behind: old enough and not
/// locked by a live writer. Best effort: a leftover that cannot be removed is harmless (it
/// is owner-only) and retried on the next write.
fn remove_leftovers(target: &Path) {
    let prefix = temp_prefix(target);
    let Ok(entries) = fs::read_dir(parent_dir(target)) else { return };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        let old = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).is_some_and(|age| age >= LEFTOVER_AGE);
        if !old || !meta.is_file() {
            continue;
        }
        if let Ok(file) = File::open(entry.path())
            && file.try_lock().is_ok()
        {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(unix)]
fn permission_bits(meta: &fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

#[cfg(not(unix))]
fn permission_bits(_meta: &fs::Metadata) -> u32 {
    0o600
}

#[cfg(unix)]
fn set_mode(file: &File, mode: Option<u32>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match mode {
        Some(bits) if bits != 0o600 => file.set_permissions(fs::Permissions::from_mode(bits)),
        _ => Ok(()),
    }
}

#[cfg(not(unix))]
fn set_mode(_file: &File, _mode: Option<u32>) -> std::io::Result<()> {
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn new_files_are_owner_only_and_old_modes_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomically(&path, b"one", None).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_atomically(&path, b"two", None).unwrap();
        assert_eq!((fs::read(&path).unwrap(), mode_of(&path)), (b"two".to_vec(), 0o644));
        write_atomically(&path, b"three", Some(0o600)).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left");
    }

    #[test]
    fn symlinks_are_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        fs::create_dir(&real).unwrap();
        fs::write(real.join("config.toml"), "old").unwrap();
        let link = dir.path().join("config.toml");
        symlink("real/config.toml", &link).unwrap();
        write_atomically(&link, b"new", None).unwrap();
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(fs::read(real.join("config.toml")).unwrap(), b"new");
        let dangling = dir.path().join("dangling");
        symlink("real/created", &dangling).unwrap();
        write_atomically(&dangling, b"x", None).unwrap();
        assert_eq!(fs::read(real.join("created")).unwrap(), b"x");
    }

    #[test]
    fn non_regular_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for path in [Path::new("/dev/null"), dir.path()] {
            assert_eq!(write_atomically(path, b"x", None).unwrap_err().exit_code(), 2);
            assert_eq!(check_destination(path).unwrap_err().exit_code(), 2);
        }
        let link = dir.path().join("null");
        symlink("/dev/null", &link).unwrap();
        assert_eq!(write_atomically(&link, b"x", None).unwrap_err().exit_code(), 2);
        let missing = dir.path().join("no/such/report.json");
        assert_eq!(check_destination(&missing).unwrap_err().exit_code(), 2);
        check_destination(&dir.path().join("report.json")).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "the check leaves nothing behind");
    }

    #[test]
    fn leftovers_of_killed_writers_are_removed_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials");
        let stale = dir.path().join(".credentials.tmp-1-00");
        fs::write(&stale, "tokens").unwrap();
        let past = SystemTime::now() - Duration::from_secs(60);
        File::options().write(true).open(&stale).unwrap().set_modified(past).unwrap();
        let live = dir.path().join(".credentials.tmp-2-00");
        let held = File::create(&live).unwrap();
        held.set_modified(past).unwrap();
        held.lock().unwrap();
        write_atomically(&path, b"new", Some(0o600)).unwrap();
        assert!(!stale.exists(), "the killed writer's temp file is removed");
        assert!(live.exists(), "a live writer's temp file is kept");
    }
}
