//! The store file from the outside: foreign or tampered files are refused untouched, any home
//! path the OS accepts works for every command, and read-only commands stay correct beside
//! writers.

use std::path::{Path, PathBuf};

use crate::assert_cli_snapshot;
use crate::common::Home;

fn store_path(home: &Path) -> PathBuf {
    home.join("event-sync").join("kitty-sync.db")
}

fn sidecar(home: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", store_path(home).display()))
}

/// A negative `user_version` used to be cast to a huge migration index: every migration was
/// skipped and the file stamped as current. A foreign SQLite file was switched to WAL first.
#[test]
fn negative_user_version_and_foreign_files_are_refused_untouched() {
    let home = Home::new();
    home.run(&["emit", "--type", "A"]).expect(0);
    let conn = rusqlite::Connection::open(store_path(home.path())).unwrap();
    conn.pragma_update(None, "user_version", -5).unwrap();
    drop(conn);
    let bytes = std::fs::read(store_path(home.path())).unwrap();
    for args in [&["emit", "--type", "A"][..], &["now"], &["gc"], &["inspect", "01KVYWRGJEV7CEZW6J7GXEBN16"]] {
        let run = home.run(args).expect(2);
        assert!(
            run.stderr.contains("not a kitty-sync store") && run.stderr.contains("hint:"),
            "{args:?}: {}",
            run.stderr
        );
    }
    assert_eq!(std::fs::read(store_path(home.path())).unwrap(), bytes);
    let status = home.run(&["status", "--json", "--check"]).expect(3).json();
    assert_eq!(status["ok"], false);
    let run = home.run(&["emit", "--type", "A"]);
    assert_cli_snapshot!(home.path(), run);

    // A foreign SQLite file (rollback journal, its own tables and version).
    std::fs::remove_file(store_path(home.path())).unwrap();
    let conn = rusqlite::Connection::open(store_path(home.path())).unwrap();
    conn.execute_batch("CREATE TABLE notes(x); PRAGMA user_version = 3;").unwrap();
    drop(conn);
    let bytes = std::fs::read(store_path(home.path())).unwrap();
    home.run(&["emit", "--type", "A"]).expect(2);
    assert_eq!(std::fs::read(store_path(home.path())).unwrap(), bytes, "not switched to WAL, not re-stamped");
    assert!(!sidecar(home.path(), "-wal").exists());
}

/// Home paths the OS accepts but a lossy `file:` URI does not: non-UTF-8 bytes (replaced by
/// U+FFFD, naming another directory) and a leading `//` (read as a URI authority). Capture
/// opened the store by path and worked; every later read failed, forever.
#[test]
fn odd_home_paths_work_for_every_command() {
    use std::os::unix::ffi::OsStrExt;
    let base = tempfile::tempdir().unwrap();
    let receiver = crate::common::Receiver::start(&base.path().join("receiver.db"), &[]);
    let non_utf8 = base.path().join(std::ffi::OsStr::from_bytes(b"caf\xe9 #1?"));
    let double_slash = PathBuf::from(format!("/{}", base.path().join("double").display()));
    for home in [non_utf8, double_slash] {
        let run = |args: &[&str]| {
            let mut command = crate::common::bin();
            command.arg("--home").arg(&home).args(args);
            crate::common::Run::from(command.output().unwrap())
        };
        run(&["mode", "external-receiver", "--endpoint", &receiver.endpoint()]).expect(0);
        let id = run(&["emit", "--type", "A"]).expect(0).stdout.trim().to_string();
        let status = run(&["status", "--json"]).expect(0).json();
        assert_eq!(status["event_journal"]["retained_event_count"], 1, "{home:?}");
        run(&["inspect", &id]).expect(0);
        let report = run(&["now", "--json"]).expect(0).json();
        assert_eq!(report["delivered"], 1, "{home:?}");
        run(&["gc", "--dry-run"]).expect(0);
    }
}
