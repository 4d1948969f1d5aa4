//! Python store import, library level (contract §12): both fixture homes written by the real
//! spec-kitty 3.2.4 and 3.2.7 code, checked against their manifests, plus the merge rules
//! that only show over several runs.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;

use kitty_sync::authority::{AuthorityInputs, TargetAuthority};
use kitty_sync::delivery::retry::{RetrySelection, release_not_consented, requeue};
use kitty_sync::delivery::target::{self, TargetIdentity, TargetKind};
use kitty_sync::home::Home;
use kitty_sync::legacy::{self, MigrateOptions, MigrationReport, SourceKind};
use kitty_sync::store::Store;
use rusqlite::{Connection, params};
use serde_json::Value;
use sha2::{Digest, Sha256};

mod support;
use support::{copy_tree, shared_fixtures, unconsented_ids};

fn fixture(name: &str) -> PathBuf {
    shared_fixtures().join("python-stores").join(name)
}

fn manifest(name: &str) -> Value {
    serde_json::from_slice(&fs::read(fixture(name).join("manifest.json")).unwrap()).unwrap()
}

fn fixture_home(name: &str) -> (tempfile::TempDir, Home) {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixture(name).join("home"), &dir.path().join("home"));
    let home = Home::at(&dir.path().join("home"));
    (dir, home)
}

fn run(home: &Home) -> MigrationReport {
    let authority = TargetAuthority::resolve(&AuthorityInputs::default());
    legacy::migrate(home, &authority, &MigrateOptions::default(), &mut |_| {}).unwrap()
}

fn conn(home: &Home) -> Connection {
    Connection::open(home.store_path()).unwrap()
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

fn aliases(m: &Value) -> BTreeMap<String, String> {
    m["expected_import"]["row_id_vs_envelope_id_mismatches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["event_id"].as_str().unwrap().to_string(), x["envelope_event_id"].as_str().unwrap().to_string()))
        .collect()
}

/// event id → ledger status of the kitty-sync target with this URL and team.
fn ledger_of(home: &Home, url: &str, team: &str) -> BTreeMap<String, String> {
    let conn = conn(home);
    let mut stmt = conn
        .prepare(
            "SELECT e.event_id, l.status FROM ledger l JOIN events e ON e.seq = l.seq JOIN targets t ON t.id = l.target
             WHERE t.canonical_url = ?1 AND t.team_slug = ?2",
        )
        .unwrap();
    stmt.query_map(params![url, team], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
}

/// Checks the journal and every Python target's ledger against the manifest.
fn check_against_manifest(home: &Home, m: &Value) {
    let alias = aliases(m);
    let map = |id: &String| alias.get(id).cloned().unwrap_or_else(|| id.clone());
    let expected: BTreeSet<String> = strings(&m["expected_import"]["unique_event_ids"]).iter().map(map).collect();
    let journaled: BTreeSet<String> = {
        let conn = conn(home);
        let mut stmt = conn.prepare("SELECT event_id FROM events").unwrap();
        stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
    };
    assert_eq!(journaled, expected, "every event, under its envelope id");
    for (python_id, t) in m["expected_import"]["per_target"].as_object().unwrap() {
        let ledger = ledger_of(home, t["canonical_url"].as_str().unwrap(), t["team_slug"].as_str().unwrap());
        let status = |id: &String| ledger.get(&map(id)).map(String::as_str);
        for id in strings(&t["must_not_resend"]) {
            assert!(matches!(status(&id), Some("success" | "duplicate")), "{python_id}: {id} must not be re-sent");
        }
        for id in strings(&t["parked_terminal_failed"]) {
            assert_eq!(status(&id), Some("terminal_failed"), "{python_id}: {id} stays parked");
        }
        let not_resend: BTreeSet<String> = strings(&t["must_not_resend"]).iter().map(map).collect();
        for id in strings(&t["due"]).iter().filter(|id| !not_resend.contains(&map(id))) {
            assert!(matches!(status(id), None | Some("rejected")), "{python_id}: {id} is due, not {:?}", status(id));
        }
    }
}

fn file_digests(m: &Value, home: &Home) -> Vec<(String, String)> {
    m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let path = f["path"].as_str().unwrap();
            (path.to_string(), hex::encode(Sha256::digest(fs::read(home.root().join(path)).unwrap())))
        })
        .collect()
}

#[test]
fn spec_kitty_324_fixture_matches_its_manifest() {
    let m = manifest("public");
    let (_dir, home) = fixture_home("public");
    let report = run(&home);
    for (path, sha) in file_digests(&m, &home) {
        let want = m["files"].as_array().unwrap().iter().find(|f| f["path"] == path.as_str()).unwrap();
        assert_eq!(want["sha256"], sha.as_str(), "{path} byte for byte unchanged");
    }
    assert_eq!(report.totals.imported, 117);
    assert_eq!(report.totals.conflicts + report.totals.source_errors + report.totals.invalid_rows, 0);
    assert_eq!(report.totals.ledger_rows, 174);
    assert_eq!(report.totals.targets, 2);
    let kinds: Vec<SourceKind> = report.sources.iter().map(|s| s.kind).collect();
    assert_eq!(kinds, [SourceKind::Journal, SourceKind::Journal, SourceKind::Ledger]);
    let mut created: Vec<String> = report.targets_created.iter().map(|t| t.target_id.clone()).collect();
    created.sort();
    let mut python: Vec<String> =
        m["targets"].as_array().unwrap().iter().map(|t| t["target_id"].as_str().unwrap().to_string()).collect();
    python.sort();
    assert_eq!(created, python, "3.2.4's target ids follow the same rule");
    let mismatch = &m["expected_import"]["row_id_vs_envelope_id_mismatches"][0];
    assert_eq!(report.id_mismatches.len(), 1);
    assert_eq!(report.id_mismatches[0].row_id, mismatch["event_id"].as_str().unwrap());
    assert_eq!(report.id_mismatches[0].event_id, mismatch["envelope_event_id"].as_str().unwrap());
    check_against_manifest(&home, &m);
    // The rejection keeps its count: rejected by A 3+ times, held until `retry --rejected`.
    let rejected: i64 =
        conn(&home).query_row("SELECT reject_count FROM ledger WHERE status = 'rejected'", [], |r| r.get(0)).unwrap();
    assert_eq!(rejected, 4);
}

#[test]
fn spec_kitty_327_fixture_matches_its_manifest_and_holds_unconsented_events() {
    let m = manifest("public-327");
    let (_dir, home) = fixture_home("public-327");
    let report = run(&home);
    assert_eq!(report.totals.imported, 122);
    assert_eq!(report.totals.conflicts + report.totals.source_errors + report.totals.invalid_rows, 0);
    assert_eq!(report.totals.ledger_rows, 97);
    assert_eq!(report.totals.targets, 2);
    assert!(report.sources.iter().all(|s| s.kind == SourceKind::ProjectStore && s.scope_status.is_none()));
    check_against_manifest(&home, &m);
    let held = unconsented_ids(&m);
    assert_eq!(report.totals.not_consented, held.len() as u64);
    let stored: BTreeSet<String> = {
        let conn = conn(&home);
        let mut stmt =
            conn.prepare("SELECT event_id FROM events WHERE drain_blocked_reason = 'not_consented'").unwrap();
        stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
    };
    assert_eq!(stored, held);
    for target in m["targets"].as_array().unwrap() {
        let identity = TargetIdentity {
            kind: TargetKind::Teamspace,
            canonical_url: target["canonical_url"].as_str().unwrap().into(),
            team_slug: target["private_teamspace_id"].as_str().unwrap().into(),
            user_email: target["account_identity"].as_str().unwrap().into(),
        };
        assert!(target::find_exact(&conn(&home), &identity).unwrap().is_some(), "{identity:?}");
    }

    // Released per project; a re-import after a change to that store does not hold them again.
    let mut store = Store::open(&home).unwrap();
    let p2 = "a781258b-0c7f-4871-a308-ecada586e22a";
    let released = release_not_consented(&mut store, Some(p2)).unwrap();
    assert_eq!(released.released.len() as u64, report.sources[0].not_consented);
    drop(store);
    let db = home.root().join(format!("projects/{p2}/sync/sync.db"));
    Connection::open(&db).unwrap().execute_batch("CREATE TABLE touched (x)").unwrap();
    let again = run(&home);
    assert!(!again.sources[0].unchanged, "the store changed, so it is read again");
    assert_eq!(again.totals.imported, 0);
    let still_held: i64 = conn(&home)
        .query_row("SELECT count(*) FROM events WHERE drain_blocked_reason = 'not_consented'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(still_held as usize, held.len() - released.released.len());
}

#[test]
fn reruns_change_nothing_and_an_operator_retry_is_not_undone() {
    let (_dir, home) = fixture_home("public");
    let first = run(&home);
    let count = |sql: &str| -> i64 { conn(&home).query_row(sql, [], |r| r.get(0)).unwrap() };
    let before = (
        count("SELECT count(*) FROM events"),
        count("SELECT count(*) FROM ledger"),
        count("SELECT CAST(total(value) AS INTEGER) FROM target_stats"),
    );
    let again = run(&home);
    assert!(again.sources.iter().all(|s| s.unchanged));
    assert_eq!(again.totals.imported, 0);
    assert_eq!(again.totals.rows_read, first.totals.rows_read);
    assert_eq!(again.id_mismatches, first.id_mismatches);
    assert!(again.targets_created.is_empty());
    let after = (
        count("SELECT count(*) FROM events"),
        count("SELECT count(*) FROM ledger"),
        count("SELECT CAST(total(value) AS INTEGER) FROM target_stats"),
    );
    assert_eq!(before, after);

    // The operator retries the parked event; Python writes to its ledger again.
    let mut store = Store::open(&home).unwrap();
    let record = target::list(&observe(&home))
        .unwrap()
        .into_iter()
        .find(|t| t.identity.canonical_url.ends_with(":20004"))
        .unwrap();
    let lock = kitty_sync::delivery::lock::acquire(&home, std::time::Duration::ZERO, "test").unwrap();
    let retried = requeue(&mut store, &lock, &record, &[], RetrySelection { parked: true, rejected: false }).unwrap();
    assert_eq!(retried.requeued.len(), 1);
    drop(store);
    drop(lock);
    let ledger = Connection::open(home.root().join("delivery/ledger.db")).unwrap();
    ledger
        .execute("UPDATE delivery_ledger SET last_error = 'touched' WHERE status = 'success' AND rowid = 1", [])
        .unwrap();
    drop(ledger);
    let third = run(&home);
    assert!(!third.sources.iter().find(|s| s.kind == SourceKind::Ledger).unwrap().unchanged);
    let status: String = conn(&home)
        .query_row(
            "SELECT status FROM ledger l JOIN events e ON e.seq = l.seq WHERE e.event_id = ?1",
            [&retried.requeued[0]],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(status, "pending", "Python's old verdict does not re-park what the operator retried");
}

#[test]
fn a_userless_324_target_is_the_teamspace_target_of_any_user() {
    let (_dir, home) = fixture_home("public");
    run(&home);
    let conn = observe(&home);
    let as_user = |user: &str| TargetIdentity {
        kind: TargetKind::Teamspace,
        canonical_url: "http://127.0.0.1:20004".into(),
        team_slug: "tm-alice-private".into(),
        user_email: user.into(),
    };
    let found = target::find(&conn, &as_user("bob@example.com")).unwrap().unwrap();
    assert_eq!(found.identity.user_email, "");
    assert_eq!(found.target_id, "tgt_tm_alice_private_da509fe00cf78d9a2e292bdb86f33c60");
    let registered = target::register(&conn, &as_user("carol@example.com"), 1).unwrap();
    assert_eq!(registered.id, found.id, "no second target for another login");
    let other_team = TargetIdentity { team_slug: "other".into(), ..as_user("bob@example.com") };
    assert!(target::find(&conn, &other_team).unwrap().is_none());
}

#[test]
fn status_lists_python_stores_and_whether_they_were_imported() {
    let (_dir, home) = fixture_home("public-327");
    let authority = TargetAuthority::resolve(&AuthorityInputs::default());
    let before = legacy::legacy_queues_report(&home, &authority, None);
    assert_eq!(before.files.len(), 2);
    assert!(before.files.iter().all(|f| f.kind == SourceKind::ProjectStore && !f.migrated));
    assert_eq!(before.event_count, 122);
    assert_eq!(legacy::stores_not_imported(&home, &authority, None).len(), 2);
    run(&home);
    let store = Store::open_read_only(&home).unwrap();
    let after = legacy::legacy_queues_report(&home, &authority, store.as_ref());
    assert!(after.files.iter().all(|f| f.migrated), "{after:?}");
    assert!(legacy::stores_not_imported(&home, &authority, store.as_ref()).is_empty());
    let json = serde_json::to_value(&after.files[0]).unwrap();
    assert_eq!(json["kind"], "project_store");
    assert_eq!(json["scope_status"], Value::Null);
}

#[test]
fn a_source_that_fails_part_way_leaves_nothing_behind() {
    let (_dir, home) = fixture_home("public");
    // A journal whose second row's payload is an SQL NULL in a NOT NULL column cannot exist;
    // a page torn off the end can: keep the header, cut the file.
    let journal = home.root().join("event_journal/journal-tm-alice-private.db");
    let bytes = fs::read(&journal).unwrap();
    fs::write(&journal, &bytes[..bytes.len() - 4096]).unwrap();
    let report = run(&home);
    let broken = report.sources.iter().find(|s| s.path.ends_with("journal-tm-alice-private.db")).unwrap();
    assert!(broken.error.as_deref().is_some_and(|e| e.contains("truncated")), "{broken:?}");
    assert_eq!((broken.imported, broken.rows_read), (0, 0));
    assert_eq!(report.totals.imported, 20, "journal-local.db still imported");
    let journaled: i64 = conn(&home).query_row("SELECT count(*) FROM events", [], |r| r.get(0)).unwrap();
    assert_eq!(journaled, 20);
}

/// The counters status reads are kept by the import exactly as a full recount has them.
#[test]
fn imported_deliveries_keep_the_counters_exact() {
    for name in ["public", "public-327"] {
        let (_dir, home) = fixture_home(name);
        run(&home);
        let snapshot = |conn: &Connection| -> Vec<(String, i64)> {
            let mut stmt = conn
                .prepare(
                    "SELECT 'stats.' || key, value FROM stats
                     UNION ALL SELECT 'target.' || target || '.' || epoch || '.' || key, value FROM target_stats
                     UNION ALL SELECT 'event.' || seq, delivered_targets FROM events ORDER BY 1",
                )
                .unwrap();
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
        };
        let conn = conn(&home);
        let kept = snapshot(&conn);
        kitty_sync::store::stats::rebuild(&conn).unwrap();
        assert_eq!(kept, snapshot(&conn), "{name}");
    }
}

/// A connection of the test's own to the store file (the engine keeps its own to itself).
fn observe(home: &Home) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(home.store_path()).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    conn
}
