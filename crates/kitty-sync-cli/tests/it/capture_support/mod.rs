//! Helpers shared by the black-box CLI tests: run the real `kitty-sync` binary against a
//! temporary home with a clean environment, and look at what the store holds (read-only).

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use assert_cmd::Command;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde_json::Value;

/// Variables that would let the host's configuration leak into a test.
pub const HOST_ENV: [&str; 4] = ["SPEC_KITTY_SAAS_URL", "SPEC_KITTY_ENABLE_SAAS_SYNC", "SPEC_KITTY_HOME", "NO_COLOR"];

/// `kitty-sync --home HOME` with the host's spec-kitty variables removed.
pub fn ks(home: &Path) -> Command {
    let mut cmd = bare();
    cmd.arg("--home").arg(home);
    cmd
}

/// `kitty-sync` without `--home` (for home-resolution tests), host variables removed.
pub fn bare() -> Command {
    let mut cmd = Command::cargo_bin("kitty-sync").expect("the kitty-sync binary is built");
    for var in HOST_ENV {
        cmd.env_remove(var);
    }
    cmd
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs the command, expects exit 0, and parses stdout as exactly one JSON document.
pub fn json_ok(cmd: &mut Command) -> Value {
    let output = cmd.output().expect("run kitty-sync");
    assert_eq!(output.status.code(), Some(0), "stdout:\n{}\nstderr:\n{}", stdout(&output), stderr(&output));
    parse_json(&output)
}

pub fn parse_json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{}", stdout(output)))
}

/// Runs the command and expects failure with `code`, an `error:` line mentioning every one of
/// `needles` (case-insensitive) and a non-empty `hint:` line. Returns stderr.
pub fn expect_error(cmd: &mut Command, code: i32, needles: &[&str]) -> String {
    let output = cmd.output().expect("run kitty-sync");
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(code), "stdout:\n{}\nstderr:\n{err}", stdout(&output));
    assert!(!err.contains("panicked"), "{err}");
    let error_line =
        err.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("no error: line in\n{err}"));
    let text = err.to_lowercase();
    for needle in needles {
        assert!(text.contains(&needle.to_lowercase()), "stderr does not mention {needle:?}:\n{err}");
    }
    assert!(error_line.len() > "error: ".len());
    assert!(err.lines().any(|l| l.starts_with("hint: ") && l.trim().len() > "hint:".len()), "no hint: line in\n{err}");
    err
}

pub fn store_path(home: &Path) -> PathBuf {
    home.join("event-sync").join("kitty-sync.db")
}

/// A read-only connection to the home's store (never creates or changes it).
pub fn db(home: &Path) -> Connection {
    Connection::open_with_flags(store_path(home), OpenFlags::SQLITE_OPEN_READ_ONLY).expect("open the store read-only")
}

/// Journal rows; 0 when the store does not exist.
pub fn event_count(home: &Path) -> i64 {
    if !store_path(home).exists() {
        return 0;
    }
    db(home).query_row("SELECT count(*) FROM events", [], |r| r.get(0)).expect("count events")
}

/// The stored envelope bytes of one event.
pub fn stored(home: &Path, event_id: &str) -> Option<Vec<u8>> {
    db(home)
        .query_row(
            "SELECT p.envelope FROM events e JOIN payloads p ON p.seq = e.seq WHERE e.event_id = ?1",
            [event_id],
            |r| r.get(0),
        )
        .optional()
        .expect("read the envelope")
}

pub fn stored_json(home: &Path, event_id: &str) -> Value {
    let bytes = stored(home, event_id).unwrap_or_else(|| panic!("{event_id} is not journaled"));
    serde_json::from_slice(&bytes).expect("stored envelope is JSON")
}

/// One column of the `events` row, as text (NULL → None).
pub fn event_column(home: &Path, event_id: &str, column: &str) -> Option<String> {
    db(home)
        .query_row(&format!("SELECT {column} FROM events WHERE event_id = ?1"), [event_id], |r| r.get(0))
        .expect("read the event row")
}

/// Every stored envelope, in capture order.
pub fn all_envelopes(home: &Path) -> Vec<(String, Vec<u8>)> {
    let conn = db(home);
    let mut stmt = conn
        .prepare("SELECT e.event_id, p.envelope FROM events e JOIN payloads p ON p.seq = e.seq ORDER BY e.seq")
        .expect("prepare");
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).expect("query").map(|r| r.expect("row")).collect()
}

/// `^[0-9A-HJKMNP-TV-Z]{26}$`, first character at most 7.
pub fn is_ulid(text: &str) -> bool {
    text.len() == 26
        && text.as_bytes()[0] <= b'7'
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b.is_ascii_uppercase() && !matches!(b, b'I' | b'L' | b'O' | b'U')))
}

/// A fresh, valid ULID with a fixed prefix (deterministic for tests).
pub fn test_ulid(n: u64) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut id = String::from("01KTEST");
    let mut tail = Vec::new();
    let mut rest = n;
    for _ in 0..19 {
        tail.push(ALPHABET[(rest % 32) as usize]);
        rest /= 32;
    }
    tail.reverse();
    id.push_str(std::str::from_utf8(&tail).expect("ascii"));
    id
}

/// The real event logs shipped with the repository.
pub fn real_events_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/real-events")
}

pub fn real_event_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(real_events_dir())
        .expect("testdata/real-events exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "the three real event logs");
    files
}

/// Every entry under `dir` with a digest of its contents: compare two snapshots to prove a
/// command created, removed and changed nothing. SQLite's `-shm` file is the exception: it is
/// the WAL's shared-memory index, and every reader (even a read-only one) updates its read
/// marks there, so only its presence is compared.
pub fn tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    use std::hash::{Hash, Hasher};
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&path) else { continue };
        for entry in entries {
            let entry = entry.expect("dir entry");
            let p = entry.path();
            let rel = p.strip_prefix(dir).expect("under dir").to_path_buf();
            if entry.file_type().expect("file type").is_dir() {
                out.insert(rel, "dir".to_string());
                stack.push(p);
            } else if p.to_string_lossy().ends_with("-shm") {
                out.insert(rel, "shm (present)".to_string());
            } else {
                let bytes = std::fs::read(&p).expect("read file");
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                bytes.hash(&mut hasher);
                out.insert(rel, format!("{} bytes, hash {:016x}", bytes.len(), hasher.finish()));
            }
        }
    }
    out
}

/// Writes `credentials` (TOML) into the home.
pub fn write_credentials(home: &Path, text: &str) {
    std::fs::create_dir_all(home).expect("create home");
    std::fs::write(home.join("credentials"), text).expect("write credentials");
}

pub fn write_config(home: &Path, text: &str) {
    std::fs::create_dir_all(home).expect("create home");
    std::fs::write(home.join("config.toml"), text).expect("write config.toml");
}
