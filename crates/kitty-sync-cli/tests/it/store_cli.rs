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

/// `status` used to read the store with `immutable=1` whenever the WAL looked empty; a writer
/// that then committed and checkpointed changed the file under it: "malformed" errors, or
/// all-zero counts with exit 0. Here a writer (this process) captures and checkpoints
/// (TRUNCATE) in a tight loop, reopening now and then so the WAL files also come and go,
/// while `status --json` runs again and again: every run must succeed and see at least what
/// the previous run saw.
#[test]
fn read_only_commands_beside_a_checkpointing_writer() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let home = Home::new();
    home.run(&["mode", "local-retention"]).expect(0);
    home.capture(20, "Seed");
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(5);
    let (failure, rounds, runs) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| checkpointing_writer(home.path(), &stop));
        let (mut seen, mut runs, mut failure) = (0, 0, None);
        while failure.is_none() && Instant::now() < deadline && !writer.is_finished() {
            let run = home.run(&["status", "--json"]);
            let count = serde_json::from_str::<serde_json::Value>(&run.stdout)
                .ok()
                .and_then(|s| s["event_journal"]["retained_event_count"].as_u64());
            match count {
                Some(count) if run.code == 0 && count >= seen.max(20) => seen = count,
                _ => failure = Some(format!("run {runs} after {seen} events: {run:?}")),
            }
            runs += 1;
        }
        // Stopped before joining, so a failed run cannot leave the writer running forever.
        stop.store(true, Ordering::Relaxed);
        (failure, writer.join().unwrap(), runs)
    });
    assert_eq!(failure, None);
    assert!(rounds > 20 && runs > 20, "too little concurrency to mean anything: {rounds} writes, {runs} reads");
}

/// Captures one event at a time through the engine and checkpoints after each, until `stop`.
fn checkpointing_writer(home: &Path, stop: &std::sync::atomic::AtomicBool) -> u64 {
    use kitty_sync::event_journal::{CapturePolicy, Journal, NewEvent};
    let home = kitty_sync::home::Home::at(home);
    let config = home.load_config().unwrap();
    let credentials = home.read_credentials();
    let authority = kitty_sync::authority::TargetAuthority::for_home(&home, &config, &credentials).unwrap();
    let policy = CapturePolicy::new(&config, &authority, credentials.credentials()).unwrap();
    let mut rounds = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let mut store = kitty_sync::store::Store::open(&home).unwrap();
        let checkpointer = rusqlite::Connection::open(home.store_path()).unwrap();
        checkpointer.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
        for _ in 0..25 {
            let payload = serde_json::json!({ "pad": "x".repeat(3000), "round": rounds });
            let event = NewEvent { event_type: "W".into(), payload: Some(payload), ..NewEvent::default() };
            Journal::new(&mut store, policy.clone()).append(event).unwrap();
            checkpointer.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
            rounds += 1;
        }
        // The plain connection closes last: it checkpoints and deletes -wal and -shm.
        drop(store);
        drop(checkpointer);
    }
    rounds
}

/// Every `emit` process closed without a checkpoint and nothing else checkpointed: 1,000
/// emits left a 31.7 MB WAL (and 188 filled an 8 MiB disk). Now the WAL stays within about
/// `WAL_LIMIT_BYTES` plus one commit, and every event is still there.
#[test]
fn wal_stays_bounded_across_many_single_emits() {
    let home = Home::new();
    let emits = 80;
    for i in 0..emits {
        let payload = format!(r#"{{"n":{i},"pad":"{}"}}"#, "x".repeat(500));
        home.run(&["emit", "--type", "T", "--payload", &payload]).expect(0);
    }
    let wal = std::fs::metadata(sidecar(home.path(), "-wal")).map(|m| m.len()).unwrap_or(0);
    let bound = kitty_sync::store::WAL_LIMIT_BYTES + 256 * 1024;
    assert!(wal <= bound, "WAL {wal} bytes after {emits} emits (bound {bound})");
    assert_eq!(home.status()["event_journal"]["retained_event_count"], emits);
}
