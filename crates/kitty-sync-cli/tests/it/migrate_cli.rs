//! `kitty-sync migrate`, `migrate conflicts`, `migrate resolve`, run as the real binary on a
//! copy of the public spec-kitty 3.2.3 fixture (never on /work/shared itself).

use std::fs;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::prelude::*;
use rusqlite::Connection;
use serde_json::Value;

fn fixture_home_dir() -> PathBuf {
    crate::common::shared_fixtures().join("legacy-queues/public/home")
}

fn fixture_home() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    crate::common::copy_tree(&fixture_home_dir(), &home);
    (dir, home)
}

/// The binary, isolated from the caller's environment.
fn ks(home: &Path) -> Command {
    let mut cmd = Command::cargo_bin("kitty-sync").unwrap();
    cmd.arg("--home").arg(home);
    for var in ["SPEC_KITTY_HOME", "SPEC_KITTY_SAAS_URL", "SPEC_KITTY_ENABLE_SAAS_SYNC"] {
        cmd.env_remove(var);
    }
    cmd
}

fn json_of(output: &std::process::Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!("stdout is not one JSON document ({e}): {}", String::from_utf8_lossy(&output.stdout))
    })
}

fn keys(value: &Value) -> Vec<&str> {
    value.as_object().unwrap().keys().map(String::as_str).collect()
}

fn sorted(mut v: Vec<&str>) -> Vec<&str> {
    v.sort_unstable();
    v
}

fn legacy_files(home: &Path) -> Vec<(PathBuf, Vec<u8>, std::time::SystemTime)> {
    let mut out = Vec::new();
    for path in
        [home.join("queue.db")].into_iter().chain(fs::read_dir(home.join("queues")).unwrap().map(|e| e.unwrap().path()))
    {
        let meta = fs::metadata(&path).unwrap();
        out.push((path.clone(), fs::read(&path).unwrap(), meta.modified().unwrap()));
    }
    out.sort();
    out
}

fn alice_credentials(home: &Path) {
    fs::write(
        home.join("credentials"),
        "[user]\nusername = \"alice@example.com\"\nteam_slug = \"team-alpha\"\n\n[server]\nurl = \"https://spec-kitty-dev.fly.dev\"\n",
    )
    .unwrap();
}

#[test]
fn migrate_json_on_the_public_fixture() {
    let (_dir, home) = fixture_home();
    alice_credentials(&home);
    let before = legacy_files(&home);
    let out = ks(&home).args(["migrate", "--json"]).output().unwrap();
    // Exit 3, not 3.2.4's 1: conflicts are a "blocked" outcome in our contract (§3).
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error:") && stderr.contains("hint:"), "{stderr}");
    let doc = json_of(&out);
    assert_eq!(
        sorted(keys(&doc)),
        sorted(vec![
            "dry_run",
            "sources",
            "ignored_files",
            "totals",
            "cleanup_blocked",
            "note",
            "id_mismatches",
            "targets_created"
        ])
    );
    assert_eq!(doc["dry_run"], false);
    assert_eq!(doc["cleanup_blocked"], true);
    assert!(doc["note"].as_str().unwrap().contains("cannot be recovered"));
    let totals = &doc["totals"];
    for key in ["sources", "rows_read", "imported", "deduped", "conflicts", "source_errors", "body_upload_rows"] {
        assert!(totals.get(key).is_some(), "totals.{key}");
    }
    assert_eq!(totals["sources"], 5);
    assert_eq!(totals["rows_read"], 101);
    assert_eq!(totals["imported"], 95);
    assert_eq!(totals["deduped"], 4);
    assert_eq!(totals["conflicts"], 2);
    assert_eq!(totals["source_errors"], 0);
    assert_eq!(totals["body_upload_rows"], 5);
    let sources = doc["sources"].as_array().unwrap();
    for key in
        ["path", "digest", "scope_status", "rows_read", "imported", "deduped", "conflicts", "body_upload_rows", "error"]
    {
        assert!(sources.iter().all(|s| s.get(key).is_some()), "sources[].{key}");
    }
    assert_eq!(sources[0]["scope_status"], "legacy");
    assert_eq!(sources[0]["digest"], Value::Null);
    let a = sources.iter().find(|s| s["digest"] == "f7b048d5c00bc4e2").unwrap();
    assert_eq!(a["scope_status"], "known");
    assert_eq!((a["imported"].as_u64(), a["deduped"].as_u64()), (Some(16), Some(4)));
    assert_eq!(legacy_files(&home), before, "sources are never modified");

    // Re-run: nothing new, same conflicts, still blocked.
    let again = json_of(&ks(&home).args(["migrate", "--json"]).output().unwrap());
    assert_eq!(again["totals"]["imported"], 0);
    assert_eq!(again["totals"]["deduped"], 99);
    assert_eq!(again["totals"]["conflicts"], 2);

    let conflicts = ks(&home).args(["migrate", "conflicts", "--json"]).output().unwrap();
    assert_eq!(conflicts.status.code(), Some(0));
    let doc = json_of(&conflicts);
    assert_eq!(keys(&doc), ["conflicts"]);
    let list = doc["conflicts"].as_array().unwrap();
    assert_eq!(list.len(), 2, "not duplicated by the re-run");
    assert_eq!(
        sorted(keys(&list[0])),
        sorted(vec!["event_id", "source", "existing_sha256", "incoming_sha256", "detected_at", "resolved"])
    );
    assert!(list[0]["detected_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(list[0]["source"], "unknown:adf30b8f7dd4874f");

    // Settle both: keep the journal for one, the incoming version for the other.
    ks(&home).args(["migrate", "resolve", "01KJP325TDMTQC21WEN42FYF3K", "--keep", "journal"]).assert().code(0);
    ks(&home)
        .args(["migrate", "resolve", "01KJP3ACJTFXJ39S5WKJJV6WCY", "--keep", "incoming"])
        .assert()
        .code(0)
        .stdout(predicate::str::contains("unknown:adf30b8f7dd4874f"));
    ks(&home).args(["migrate"]).assert().code(0).stdout(predicate::str::contains("resolved conflict"));
    assert_eq!(legacy_files(&home), before);
}

#[test]
fn dry_run_writes_nothing_and_predicts_the_run() {
    let (_dir, home) = fixture_home();
    let dry = ks(&home).args(["migrate", "--dry-run", "--json"]).output().unwrap();
    assert_eq!(dry.status.code(), Some(3));
    assert!(!home.join("event-sync").exists(), "a dry run creates no store");
    let dry = json_of(&dry);
    assert_eq!(dry["dry_run"], true);
    let real = json_of(&ks(&home).args(["migrate", "--json"]).output().unwrap());
    assert_eq!(dry["totals"], real["totals"]);
    assert_eq!(dry["cleanup_blocked"], real["cleanup_blocked"]);
}

#[test]
fn dry_run_of_a_fresh_home_creates_no_home() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("absent");
    ks(&home)
        .args(["migrate", "--dry-run"])
        .assert()
        .code(0)
        .stdout(predicate::str::contains("No legacy spec-kitty queues"));
    assert!(!home.exists());
    ks(&home)
        .args(["migrate", "conflicts", "--json"])
        .assert()
        .code(0)
        .stdout(predicate::str::contains("\"conflicts\": []"));
    assert!(!home.exists(), "listing conflicts is read-only");
}

#[test]
fn no_legacy_queues_is_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    let out = ks(dir.path()).args(["migrate", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let doc = json_of(&out);
    assert_eq!(doc["sources"], Value::Array(vec![]));
    assert_eq!(doc["cleanup_blocked"], false);
    assert!(!dir.path().join("event-sync").exists());
}

#[test]
fn human_report_has_a_table_totals_and_the_note() {
    let (_dir, home) = fixture_home();
    fs::write(home.join("queues").join("README.txt"), "not a queue").unwrap();
    fs::write(home.join("queues").join("queue-0000000000000bad.db"), b"garbage garbage garbage").unwrap();
    let out = ks(&home).arg("migrate").output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "SOURCE",
        "queues/queue-adf30b8f7dd4874f.db",
        "Total: 6 source(s), 101 row(s) read: 95 imported, 4 deduped, 2 conflict(s)",
        "1 source error(s)",
        "error: not a SQLite database",
        "Ignored (not a queue-<hex>.db name):",
        "README.txt",
        "cannot be recovered",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unreadable source") && stderr.contains("hint:"), "{stderr}");
    // --quiet keeps stdout empty; the error still says what to do.
    let quiet = ks(&home).args(["migrate", "-q"]).output().unwrap();
    assert_eq!(quiet.status.code(), Some(3));
    assert!(quiet.stdout.is_empty());
    assert!(String::from_utf8_lossy(&quiet.stderr).contains("hint:"));
}

#[test]
fn resolve_errors_and_refusals() {
    let (_dir, home) = fixture_home();
    ks(&home).args(["migrate", "resolve", "01KJP325TDMTQC21WEN42FYF3K", "--keep", "journal"]).assert().code(2);
    assert!(!home.join("event-sync").exists(), "a failed resolve creates no store");
    ks(&home).arg("migrate").assert().code(3);
    ks(&home).args(["migrate", "resolve", "not-an-id", "--keep", "journal"]).assert().code(2);
    ks(&home)
        .args(["migrate", "resolve", "01KHX1VKX0AAXMCDWJC5BAAHHA", "--keep", "journal"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("no migration conflict"));
    ks(&home).args(["migrate", "resolve", "01KJP325TDMTQC21WEN42FYF3K", "--keep", "both"]).assert().code(2);
    ks(&home).args(["migrate", "--dry-run", "conflicts"]).assert().code(2);

    // Once the journal's version was delivered somewhere, `incoming` is refused (exit 3).
    let store = home.join("event-sync").join("kitty-sync.db");
    Connection::open(&store)
        .unwrap()
        .execute(
            "INSERT INTO ledger (target, epoch, seq, status) SELECT 1, 0, seq, 'success' FROM events WHERE event_id = ?1",
            ["01KJP325TDMTQC21WEN42FYF3K"],
        )
        .unwrap();
    ks(&home)
        .args(["migrate", "resolve", "01KJP325TDMTQC21WEN42FYF3K", "--keep", "incoming"])
        .assert()
        .code(3)
        .stderr(predicate::str::contains("already delivered").and(predicate::str::contains("--keep journal")));
    let out = ks(&home)
        .args(["migrate", "resolve", "01KJP325TDMTQC21WEN42FYF3K", "--keep", "journal", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let doc = json_of(&out);
    assert_eq!(doc["kept"], "journal");
    assert_eq!(doc["resolved"], 1);
    let list = json_of(&ks(&home).args(["migrate", "conflicts", "--json"]).output().unwrap());
    let resolved: Vec<bool> =
        list["conflicts"].as_array().unwrap().iter().map(|c| c["resolved"].as_bool().unwrap()).collect();
    assert_eq!(resolved.iter().filter(|r| **r).count(), 1);
    ks(&home).args(["migrate", "conflicts"]).assert().code(0).stdout(predicate::str::contains("1 unresolved of 2"));
}
