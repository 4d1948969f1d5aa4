//! Importing spec-kitty 3.2.4–3.2.7's Python stores (contract §12), end to end: copies of the
//! fixture homes the real Python code wrote, with their recorded targets re-pointed at
//! built-in receivers standing in for them; then `now` must send exactly what Python did not
//! deliver, keep parked and consent-held events back, and re-runs must change nothing.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use common::{Home, Receiver};
use rusqlite::{Connection, params};
use serde_json::Value;

const P1_327: &str = "c19b6058-574e-4dbc-bf64-46251b8fa120";

fn fixture(name: &str) -> PathBuf {
    common::shared_fixtures().join("python-stores").join(name)
}

fn manifest(name: &str) -> Value {
    serde_json::from_slice(&fs::read(fixture(name).join("manifest.json")).unwrap()).unwrap()
}

/// A home holding a copy of the fixture's `home/`, logged in to the fixture's Private
/// Teamspace as `user`, with Teamspace sync enabled.
fn home_from(name: &str, user: &str) -> Home {
    let mut home = Home::new();
    crate::common::copy_tree(&fixture(name).join("home"), home.path());
    home.write_credentials(&format!(
        "[tokens]\naccess = \"tok\"\nrefresh = \"r\"\n\n[user]\nusername = \"{user}\"\nteam_slug = \"tm-alice-private\"\n"
    ));
    home.set_env("SPEC_KITTY_ENABLE_SAAS_SYNC", "1");
    home
}

/// Rewrites, in a copy, every place Python recorded a receiver's URL (3.2.4 targets, 3.2.7
/// admissions and attempts) to the stand-in receiver's.
fn repoint(db: &Path, from: &str, to: &str) {
    let conn = Connection::open(db).unwrap();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (table, column) in [
        ("delivery_targets", "canonical_url"),
        ("project_target_admissions", "target_identity"),
        ("delivery_attempts", "payload_reference"),
    ] {
        if tables.iter().any(|t| t == table) {
            conn.execute(&format!("UPDATE {table} SET {column} = replace({column}, ?1, ?2)"), params![from, to])
                .unwrap();
        }
    }
}

/// sha256 of every source file, to prove the import never changed one.
fn sources_digest(home: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for dir in ["event_journal", "delivery", "projects"] {
        collect(&home.join(dir), &mut out);
    }
    out
}

fn collect(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            collect(&entry.path(), out);
        } else {
            out.insert(entry.path(), fs::read(entry.path()).unwrap());
        }
    }
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

/// The manifest's expectations for one Python target, with row keys that Python's coalescing
/// separated from their envelope mapped to the envelope id (the id kitty-sync journals).
struct Expect {
    all: BTreeSet<String>,
    not_resend: BTreeSet<String>,
    parked: BTreeSet<String>,
    /// Rejected by this target 3 times or more: held until `retry --rejected`.
    held_rejected: BTreeSet<String>,
    not_consented: BTreeSet<String>,
}

fn expect(m: &Value, python_target: &str) -> Expect {
    let alias: BTreeMap<String, String> = m["expected_import"]["row_id_vs_envelope_id_mismatches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["event_id"].as_str().unwrap().to_string(), x["envelope_event_id"].as_str().unwrap().to_string()))
        .collect();
    let map = |ids: BTreeSet<String>| -> BTreeSet<String> {
        ids.into_iter().map(|i| alias.get(&i).cloned().unwrap_or(i)).collect()
    };
    let t = &m["expected_import"]["per_target"][python_target];
    let held_rejected = m["ledger"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| {
            l["target_id"] == python_target && l["status"] == "rejected" && l["attempt_count"].as_i64() >= Some(3)
        })
        .map(|l| l["event_id"].as_str().unwrap().to_string())
        .collect();
    let not_consented = common::unconsented_ids(m);
    Expect {
        all: map(strings(&m["expected_import"]["unique_event_ids"])),
        not_resend: map(strings(&t["must_not_resend"])),
        parked: map(strings(&t["parked_terminal_failed"])),
        held_rejected: map(held_rejected),
        not_consented: map(not_consented),
    }
}

impl Expect {
    /// What a drain to this target must deliver: everything Python did not settle.
    fn deliverable(&self) -> BTreeSet<String> {
        let settled: BTreeSet<&String> =
            self.not_resend.iter().chain(&self.parked).chain(&self.held_rejected).chain(&self.not_consented).collect();
        self.all.iter().filter(|id| !settled.contains(id)).cloned().collect()
    }
}

fn ids(receiver: &Receiver) -> BTreeSet<String> {
    receiver.dump().ids().into_iter().collect()
}

#[test]
fn python_324_import_then_now_resends_nothing_python_delivered() {
    let m = manifest("public");
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Receiver::start(&dir.path().join("a.db"), &[]), Receiver::start(&dir.path().join("b.db"), &[]));
    // 3.2.4 recorded its Teamspace targets without a user: any logged-in user is the same target.
    let mut home = home_from("public", "someone-else@example.com");
    repoint(&home.path().join("delivery/targets.db"), "http://127.0.0.1:20004", &a.base());
    repoint(&home.path().join("delivery/targets.db"), "http://127.0.0.1:20005", &b.base());
    let before = sources_digest(home.path());

    let doc = home.run(&["migrate", "--json"]).expect(0).json();
    assert_eq!(sources_digest(home.path()), before, "sources are never modified");
    let totals = &doc["totals"];
    assert_eq!(
        (totals["sources"].as_u64(), totals["rows_read"].as_u64(), totals["imported"].as_u64()),
        (Some(3), Some(117), Some(117))
    );
    assert_eq!(
        (totals["ledger_rows"].as_u64(), totals["targets"].as_u64(), totals["not_consented"].as_u64()),
        (Some(174), Some(2), Some(0))
    );
    let kinds: Vec<&str> = doc["sources"].as_array().unwrap().iter().map(|s| s["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["journal", "journal", "ledger"]);
    let mismatch = &m["expected_import"]["row_id_vs_envelope_id_mismatches"][0];
    assert_eq!(doc["id_mismatches"].as_array().unwrap().len(), 1);
    assert_eq!(doc["id_mismatches"][0]["row_id"], mismatch["event_id"]);
    assert_eq!(doc["id_mismatches"][0]["event_id"], mismatch["envelope_event_id"]);
    assert_eq!(doc["id_mismatches"][0]["source"], "journal:journal-tm-alice-private.db");
    let created: BTreeSet<(String, String, String)> = doc["targets_created"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["canonical_url"].as_str().unwrap().into(),
                t["team_slug"].as_str().unwrap().into(),
                t["user_email"].as_str().unwrap().into(),
            )
        })
        .collect();
    let team = || "tm-alice-private".to_string();
    assert_eq!(created, BTreeSet::from([(a.base(), team(), String::new()), (b.base(), team(), String::new())]));

    // A: what Python delivered (or parked, or had rejected 3 times) is not sent again.
    home.set_env("SPEC_KITTY_SAAS_URL", &a.base());
    let expect_a = expect(&m, "tgt_tm_alice_private_da509fe00cf78d9a2e292bdb86f33c60");
    let (run, report) = home.now(&[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(ids(&a), expect_a.deliverable(), "A got exactly what Python had not delivered");
    assert_eq!(report["delivered"].as_u64(), Some(expect_a.deliverable().len() as u64));
    let (_, again) = home.now(&[]);
    assert_eq!(again["selected"], 0, "parked and held events stay put");

    // B, the other Python target.
    home.set_env("SPEC_KITTY_SAAS_URL", &b.base());
    let expect_b = expect(&m, "tgt_tm_alice_private_2b1c8bcbd833b42f6c11c8083fdfc52a");
    home.run(&["now", "--json"]).expect(0);
    assert_eq!(ids(&b), expect_b.deliverable());

    // Re-run: everything unchanged, nothing imported, nothing re-sent.
    let rerun = home.run(&["migrate", "--json"]).expect(0).json();
    assert_eq!(rerun["totals"]["imported"], 0);
    assert!(rerun["sources"].as_array().unwrap().iter().all(|s| s["unchanged"] == true));
    assert_eq!(rerun["targets_created"], serde_json::json!([]));
    assert_eq!(rerun["id_mismatches"], doc["id_mismatches"]);
    home.run(&["now", "--json"]).expect(0);
    assert_eq!(ids(&b), expect_b.deliverable());

    // Parked stays parked until the operator retries it.
    home.set_env("SPEC_KITTY_SAAS_URL", &a.base());
    home.run(&["retry", "--all-parked"]).expect(0);
    home.run(&["now", "--json"]).expect(0);
    let parked: BTreeSet<String> = expect_a.parked.clone();
    assert!(parked.is_subset(&ids(&a)), "retried parked events are delivered");

    let status = home.status();
    let files = status["legacy_queues"]["files"].as_array().unwrap();
    assert_eq!(files.len(), 3);
    assert!(files.iter().all(|f| f["migrated"] == true && f["kind"].is_string()), "{files:?}");
}

#[test]
fn python_327_consent_held_events_wait_for_retry_not_consented() {
    let m = manifest("public-327");
    let dir = tempfile::tempdir().unwrap();
    let a = Receiver::start(&dir.path().join("a.db"), &[]);
    let mut home = home_from("public-327", "alice@example.com");
    for project in ["a781258b-0c7f-4871-a308-ecada586e22a", P1_327] {
        repoint(&home.path().join(format!("projects/{project}/sync/sync.db")), "http://127.0.0.1:32004", &a.base());
    }
    let doc = home.run(&["migrate", "--json"]).expect(0).json();
    let expect_a = expect(&m, "tgt_1aedf69545f19b19eb172846098fcd51");
    assert_eq!(doc["totals"]["imported"], 122);
    assert_eq!(doc["totals"]["not_consented"].as_u64(), Some(expect_a.not_consented.len() as u64));
    assert!(doc["sources"].as_array().unwrap().iter().all(|s| s["kind"] == "project_store"));
    assert_eq!(doc["id_mismatches"][0]["source"], format!("project:{P1_327}"));
    let status = home.status();
    assert_eq!(
        status["event_journal"]["drain_blocked"]["not_consented"].as_u64(),
        Some(expect_a.not_consented.len() as u64)
    );

    home.set_env("SPEC_KITTY_SAAS_URL", &a.base());
    home.run(&["now", "--json"]).expect(0);
    let sent = ids(&a);
    assert_eq!(sent, expect_a.deliverable());
    assert!(sent.is_disjoint(&expect_a.not_consented), "never sent before consent");

    // Releasing one project's events lets exactly those go.
    let released = home.run(&["retry", "--not-consented", "--project", P1_327, "--json"]).expect(0).json();
    let released = strings(&released["released"]);
    assert!(!released.is_empty() && released.is_subset(&expect_a.not_consented));
    home.run(&["now", "--json"]).expect(0);
    let expected: BTreeSet<String> = expect_a.deliverable().union(&released).cloned().collect();
    assert_eq!(ids(&a), expected);
    // A re-import keeps the operator's release.
    home.run(&["migrate", "--json"]).expect(0);
    let (_, report) = home.now(&[]);
    assert_eq!(report["selected"], 0);
}

/// Appends a copy of the journal's first row under a new id (as the Python CLI would).
fn append_journal_row(db: &Path, new_id: &str) -> String {
    let conn = Connection::open(db).unwrap();
    let (id, payload): (String, Vec<u8>) = conn
        .query_row("SELECT event_id, payload FROM event_journal ORDER BY created_at LIMIT 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    let payload = String::from_utf8(payload).unwrap().replace(&id, new_id);
    conn.execute(
        "INSERT INTO event_journal (event_id, event_type, payload, occurred_at, created_at)
         VALUES (?1, 'WPStatusChanged', ?2, '2030-01-01T00:00:00+00:00', '2030-01-01T00:00:00+00:00')",
        params![new_id, payload.into_bytes()],
    )
    .unwrap();
    new_id.to_string()
}

#[test]
fn broken_sources_are_skipped_and_later_runs_import_only_what_is_new() {
    let dir = tempfile::tempdir().unwrap();
    let b = Receiver::start(&dir.path().join("b.db"), &[]);
    let mut home = home_from("public", "alice@example.com");
    repoint(&home.path().join("delivery/targets.db"), "http://127.0.0.1:20005", &b.base());
    fs::write(home.path().join("event_journal/journal-empty.db"), b"").unwrap();
    fs::write(home.path().join("event_journal/journal-junk.db"), b"not a database at all").unwrap();
    let project = home.path().join("projects/0b7e0b7e-0000-4000-8000-000000000001/sync");
    fs::create_dir_all(&project).unwrap();
    let local = fs::read(home.path().join("event_journal/journal-local.db")).unwrap();
    fs::write(project.join("sync.db"), &local[..local.len() / 2]).unwrap();

    let run = home.run(&["migrate", "--json"]);
    assert_eq!(run.code, 3, "source errors block cleanup: {}", run.stderr);
    assert!(run.stderr.contains("hint:"), "{}", run.stderr);
    let doc = run.json();
    assert_eq!(doc["totals"]["source_errors"], 3);
    assert_eq!(doc["totals"]["imported"], 117, "the readable sources are imported");
    let errors: Vec<&str> = doc["sources"].as_array().unwrap().iter().filter_map(|s| s["error"].as_str()).collect();
    assert!(errors.iter().any(|e| e.contains("empty file")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("not a SQLite database")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("truncated")), "{errors:?}");

    // The Python CLI goes on: one new event, which it then delivers to B.
    fs::remove_file(home.path().join("event_journal/journal-empty.db")).unwrap();
    fs::remove_file(home.path().join("event_journal/journal-junk.db")).unwrap();
    fs::remove_dir_all(home.path().join("projects")).unwrap();
    let journal = home.path().join("event_journal/journal-tm-alice-private.db");
    let delivered = append_journal_row(&journal, "01M8M7ZZZZZZZZZZZZZZZZZZZ1");
    let fresh = append_journal_row(&journal, "01M8M7ZZZZZZZZZZZZZZZZZZZ2");
    let ledger = Connection::open(home.path().join("delivery/ledger.db")).unwrap();
    ledger
        .execute(
            "INSERT INTO delivery_ledger (event_id, target_id, status, attempt_count) VALUES (?1, ?2, 'success', 1)",
            params![delivered, "tgt_tm_alice_private_2b1c8bcbd833b42f6c11c8083fdfc52a"],
        )
        .unwrap();
    drop(ledger);
    let doc = home.run(&["migrate", "--json"]).expect(0).json();
    assert_eq!(doc["totals"]["imported"], 2, "only the new rows");
    let by_kind = |kind: &str| {
        doc["sources"].as_array().unwrap().iter().filter(|s| s["kind"] == kind).cloned().collect::<Vec<_>>()
    };
    assert!(by_kind("journal").iter().any(|s| s["unchanged"] == true), "the untouched journal is not read again");
    assert_eq!(by_kind("ledger")[0]["unchanged"], false);

    home.set_env("SPEC_KITTY_SAAS_URL", &b.base());
    home.run(&["now", "--json"]).expect(0);
    let sent = ids(&b);
    assert!(sent.contains(&fresh) && !sent.contains(&delivered), "Python's new delivery is not repeated");
}

#[test]
fn dry_run_predicts_the_import_and_writes_nothing() {
    let home = home_from("public-327", "alice@example.com");
    let dry = home.run(&["migrate", "--dry-run", "--json"]).expect(0).json();
    assert!(!home.path().join("event-sync").exists(), "a dry run creates no store");
    assert_eq!(dry["dry_run"], true);
    let real = home.run(&["migrate", "--json"]).expect(0).json();
    for key in ["imported", "not_consented", "ledger_rows", "targets", "rows_read"] {
        assert_eq!(dry["totals"][key], real["totals"][key], "totals.{key}");
    }
    assert_eq!(dry["targets_created"], real["targets_created"]);
    assert_eq!(dry["id_mismatches"], real["id_mismatches"]);
}

#[test]
fn conflicts_across_python_sources_are_listed_and_resolvable() {
    let home = home_from("public", "alice@example.com");
    // A second journal holding one of the events with different content.
    let copy = home.path().join("event_journal/journal-zz-other.db");
    fs::copy(home.path().join("event_journal/journal-local.db"), &copy).unwrap();
    let conn = Connection::open(&copy).unwrap();
    let id: String = conn.query_row("SELECT event_id FROM event_journal LIMIT 1", [], |r| r.get(0)).unwrap();
    conn.execute("DELETE FROM event_journal WHERE event_id <> ?1", [&id]).unwrap();
    conn.execute("UPDATE event_journal SET payload = CAST(replace(CAST(payload AS TEXT), '\"event_type\"', '\"edited\": true, \"event_type\"') AS BLOB)", []).unwrap();
    drop(conn);
    let run = home.run(&["migrate", "--json"]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert_eq!(run.json()["totals"]["conflicts"], 1);
    let conflicts = home.run(&["migrate", "conflicts", "--json"]).expect(0).json();
    assert_eq!(conflicts["conflicts"][0]["event_id"], id.as_str());
    assert_eq!(conflicts["conflicts"][0]["source"], "journal:journal-zz-other.db");
    home.run(&["migrate", "resolve", &id, "--keep", "incoming"]).expect(0);
    assert!(home.stored_envelope(&id).contains("\"edited\": true"));
    home.run(&["migrate"]).expect(0);
}

#[test]
fn a_source_locked_by_a_writer_is_skipped_until_it_is_free() {
    let home = home_from("public", "alice@example.com");
    let journal = home.path().join("event_journal/journal-local.db");
    // The Python CLI in the middle of a write transaction (a real lock, held by this process).
    let writer = Connection::open(&journal).unwrap();
    writer.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let run = home.run(&["migrate", "--json"]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    let doc = run.json();
    let locked: Vec<&Value> = doc["sources"].as_array().unwrap().iter().filter(|s| !s["error"].is_null()).collect();
    assert_eq!(locked.len(), 1, "{doc}");
    assert!(locked[0]["path"].as_str().unwrap().ends_with("journal-local.db"));
    assert!(locked[0]["error"].as_str().unwrap().contains("locked"), "{doc}");
    assert_eq!(doc["totals"]["imported"], 97, "the other journal is imported");
    writer.execute_batch("COMMIT").unwrap();
    drop(writer);
    let doc = home.run(&["migrate", "--json"]).expect(0).json();
    assert_eq!(doc["totals"]["imported"], 20, "imported once free");
}
