//! Legacy queue migration, library level: real spec-kitty-cli 3.2.3 fixtures plus small
//! legacy databases built here with the exact 3.2.3 DDL (reference §2.1).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use kitty_sync::authority::{AuthorityInputs, TargetAuthority};
use kitty_sync::event_journal::{CapturePolicy, ImportOptions, Journal};
use kitty_sync::home::{Credentials, Home};
use kitty_sync::legacy::{self, Keep, MigrateOptions, MigrationReport, ScopeStatus};
use kitty_sync::store::Store;
use rusqlite::{Connection, params};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// spec-kitty-cli 3.2.3's `OfflineQueue` schema, verbatim.
mod support;
use support::{copy_tree, shared_fixtures};

const DDL_323: &str = include_str!("data/spec_kitty_323_queue.sql");

const DIGEST_A: &str = "f7b048d5c00bc4e2";
const DIGEST_B: &str = "3a02fa36bdf7144d";
const DIGEST_C: &str = "adf30b8f7dd4874f";

fn fixture_dir() -> PathBuf {
    shared_fixtures().join("legacy-queues/public")
}

/// A temp dir holding a copy of the public fixture's `home/`.
fn fixture_home() -> (tempfile::TempDir, Home) {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixture_dir().join("home"), &dir.path().join("home"));
    let home = Home::at(&dir.path().join("home"));
    (dir, home)
}

fn manifest() -> Value {
    serde_json::from_slice(&fs::read(fixture_dir().join("manifest.json")).unwrap()).unwrap()
}

fn authority(user: Option<&str>, team: Option<&str>) -> TargetAuthority {
    let credentials = user.map(|u| Credentials {
        username: Some(u.to_string()),
        team_slug: team.map(str::to_string),
        ..Default::default()
    });
    TargetAuthority::resolve(&AuthorityInputs { credentials, ..Default::default() })
}

/// Alice on team-alpha at the default server: the fixture's scope A (`f7b048d5c00bc4e2`).
fn alice() -> TargetAuthority {
    authority(Some("alice@example.com"), Some("team-alpha"))
}

fn run(home: &Home, authority: &TargetAuthority, dry_run: bool) -> MigrationReport {
    legacy::migrate(home, authority, &MigrateOptions { dry_run, ..Default::default() }, &mut |_| {}).unwrap()
}

fn source<'r>(report: &'r MigrationReport, suffix: &str) -> &'r legacy::SourceReport {
    report.sources.iter().find(|s| s.path.contains(suffix)).unwrap_or_else(|| panic!("no source {suffix}"))
}

/// sha256 and mtime of every file under `dir` (to prove sources are untouched).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (String, std::time::SystemTime, u64)> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            if entry.file_name() != "event-sync" {
                out.extend(snapshot(&entry.path()));
            }
        } else {
            let bytes = fs::read(entry.path()).unwrap();
            out.insert(entry.path(), (hex::encode(Sha256::digest(&bytes)), meta.modified().unwrap(), meta.len()));
        }
    }
    out
}

fn store_conn(home: &Home) -> Connection {
    Connection::open(home.store_path()).unwrap()
}

fn stored_envelope(home: &Home, event_id: &str) -> Vec<u8> {
    store_conn(home)
        .query_row(
            "SELECT p.envelope FROM events e JOIN payloads p ON p.seq = e.seq WHERE e.event_id = ?1",
            [event_id],
            |r| r.get(0),
        )
        .unwrap()
}

fn count(home: &Home, sql: &str) -> i64 {
    store_conn(home).query_row(sql, [], |r| r.get(0)).unwrap()
}

// ---------------------------------------------------------------- building legacy queues

enum Data {
    Text(String),
    Blob(Vec<u8>),
}

struct LegacyRow {
    event_id: String,
    event_type: String,
    data: Data,
    timestamp: i64,
    coalesce_key: Option<String>,
}

fn row(event_id: &str, data: &str, timestamp: i64) -> LegacyRow {
    LegacyRow {
        event_id: event_id.to_string(),
        event_type: "WPStatusChanged".to_string(),
        data: Data::Text(data.to_string()),
        timestamp,
        coalesce_key: None,
    }
}

fn create_queue(path: &Path, rows: &[LegacyRow]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(DDL_323).unwrap();
    // One transaction: thousands of autocommit inserts would each wait for an fsync.
    conn.execute_batch("BEGIN").unwrap();
    insert_rows(&conn, rows);
    conn.execute_batch("COMMIT").unwrap();
}

fn insert_rows(conn: &Connection, rows: &[LegacyRow]) {
    for r in rows {
        let data: rusqlite::types::Value = match &r.data {
            Data::Text(t) => rusqlite::types::Value::Text(t.clone()),
            Data::Blob(b) => rusqlite::types::Value::Blob(b.clone()),
        };
        conn.execute(
            "INSERT INTO queue (event_id, event_type, data, timestamp, coalesce_key) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![r.event_id, r.event_type, data, r.timestamp, r.coalesce_key],
        )
        .unwrap();
    }
}

fn add_body_rows(path: &Path, queue: usize, failures: usize) {
    let conn = Connection::open(path).unwrap();
    for i in 0..queue {
        conn.execute(
            "INSERT INTO body_upload_queue (project_uuid, mission_slug, target_branch, mission_type, manifest_version,
                 artifact_path, content_hash, content_body, size_bytes, created_at)
             VALUES ('p', 'm', 'main', 'software-dev', '1', ?1, 'h', 'body', 4, 1.0)",
            [format!("a{i}.md")],
        )
        .unwrap();
    }
    for i in 0..failures {
        conn.execute(
            "INSERT INTO body_upload_failure_log (project_uuid, mission_slug, target_branch, mission_type,
                 manifest_version, artifact_path, content_hash, size_bytes, failure_reason, first_failed_at, last_failed_at)
             VALUES ('p', 'm', 'main', 'software-dev', '1', ?1, 'h', 4, 'too big', 1.0, 2.0)",
            [format!("f{i}.md")],
        )
        .unwrap();
    }
}

/// Python's `json.dumps` defaults: `", "`/`": "` separators, `ensure_ascii` (lower-case
/// `\uXXXX`, surrogate pairs above the BMP). Keys in the map's order.
fn py_json(value: &Value) -> String {
    match value {
        Value::String(s) => py_string(s),
        Value::Array(items) => format!("[{}]", items.iter().map(py_json).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter().map(|(k, v)| format!("{}: {}", py_string(k), py_json(v))).collect::<Vec<_>>().join(", ")
        ),
        other => other.to_string(),
    }
}

fn py_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Envelope keys in spec-kitty's insertion order (event_id first), as Python writes them.
fn py_envelope(event_id: &str, team: Option<&str>, payload: Value) -> String {
    let team = team.map(|t| format!("\"{t}\"")).unwrap_or_else(|| "null".into());
    format!(
        "{{\"event_id\": \"{event_id}\", \"event_type\": \"WPStatusChanged\", \"aggregate_id\": \"WP01\", \"payload\": {}, \
         \"lamport_clock\": 7, \"team_slug\": {team}}}",
        py_json(&payload)
    )
}

fn compact_envelope(event_id: &str, team: Option<&str>, payload: Value) -> String {
    json!({"event_id": event_id, "event_type": "WPStatusChanged", "aggregate_id": "WP01", "payload": payload,
           "lamport_clock": 7, "team_slug": team})
    .to_string()
}

const ID1: &str = "01KJP325TDMTQC21WEN42FYF3K";
const ID2: &str = "01KJP3ACJTFXJ39S5WKJJV6WCY";
const ID3: &str = "01KHX1VKX0AAXMCDWJC5BAAHHA";
const ID4: &str = "01KHX1ZC1QVCE088SN6HHHH9Y4";

fn scoped(home: &Home, digest: &str) -> PathBuf {
    home.root().join("queues").join(format!("queue-{digest}.db"))
}

fn new_home() -> (tempfile::TempDir, Home) {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::at(&dir.path().join("home"));
    fs::create_dir_all(home.root()).unwrap();
    (dir, home)
}

// ---------------------------------------------------------------- the public fixture

/// The manifest states 3.2.4's outcome. We match its per-source imported/deduped/conflicts,
/// the 95 unique events and the divergent ids. Deliberate differences (contract §7): the run
/// exits 3, not 1; provenance is `known:`/`unknown:<digest>`/`legacy:queue.db` (3.2.4's CLI
/// recorded everything as `unknown:`, see the manifest's `known_provenance_note`); and both
/// sides are canonicalised before comparing (same verdicts on this fixture).
#[test]
fn public_fixture_matches_the_manifest() {
    let (_dir, home) = fixture_home();
    let before = snapshot(home.root());
    let manifest = manifest();
    let expected = &manifest["expected_migration"];
    let report = run(&home, &alice(), false);

    let order: Vec<&str> = expected["sources_in_processing_order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["path"].as_str().unwrap().trim_start_matches("home/"))
        .collect();
    assert_eq!(report.sources.len(), order.len());
    for (got, want) in report.sources.iter().zip(expected["sources_in_processing_order"].as_array().unwrap()) {
        let rel = want["path"].as_str().unwrap().trim_start_matches("home/");
        assert!(got.path.ends_with(rel), "order: {} vs {rel}", got.path);
        assert_eq!(got.imported, want["imported"].as_u64().unwrap(), "{rel} imported");
        assert_eq!(got.deduped, want["deduped"].as_u64().unwrap(), "{rel} deduped");
        assert_eq!(got.conflicts, want["conflicts"].as_u64().unwrap(), "{rel} conflicts");
        assert_eq!(got.error.is_some(), want["error"].as_bool().unwrap(), "{rel} error");
        assert_eq!(got.invalid_rows, 0);
    }
    assert_eq!(report.totals.rows_read, expected["queue_rows_in_readable_sources"].as_u64().unwrap());
    assert_eq!(report.totals.imported, expected["unique_event_count"].as_u64().unwrap());
    assert_eq!(report.totals.deduped, expected["identical_duplicate_count"].as_u64().unwrap());
    assert_eq!(report.totals.conflicts, expected["divergent_conflict_count"].as_u64().unwrap());
    assert_eq!(report.totals.source_errors, 0);
    assert!(report.ignored_files.is_empty());
    assert!(report.cleanup_blocked, "conflicts block cleanup");
    assert_eq!(count(&home, "SELECT count(*) FROM events"), 95);

    // Scope status: A is the derived scope of alice/team-alpha.
    assert_eq!(source(&report, "queue.db").scope_status, Some(ScopeStatus::Legacy));
    assert_eq!(source(&report, "queue.db").digest, None);
    assert_eq!(source(&report, DIGEST_A).scope_status, Some(ScopeStatus::Known));
    assert_eq!(source(&report, DIGEST_B).scope_status, Some(ScopeStatus::Unknown));

    // Body-upload rows are counted, never imported.
    let body = &expected["body_upload_rows_expected_untouched"]["home/queues/queue-f7b048d5c00bc4e2.db"];
    let body_rows = body["body_upload_queue"].as_u64().unwrap() + body["body_upload_failure_log"].as_u64().unwrap();
    assert_eq!(source(&report, DIGEST_A).body_upload_rows, body_rows);
    assert_eq!(report.totals.body_upload_rows, body_rows);

    check_divergent(&home, expected);
    check_provenance(&home, expected);
    check_stored_bytes_equal_first_source_row(&home, &report);
    assert_eq!(
        snapshot(home.root()).into_iter().filter(|(p, _)| !p.starts_with(home.sync_dir())).collect::<BTreeMap<_, _>>(),
        before
    );
}

fn check_divergent(home: &Home, expected: &Value) {
    let conflicts = legacy::list_conflicts(Store::open_read_only(home).unwrap().as_ref()).unwrap();
    let mut ids: Vec<&str> = conflicts.iter().map(|c| c.event_id.as_str()).collect();
    ids.sort();
    let mut want: Vec<&str> =
        expected["divergent_conflict_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    want.sort();
    assert_eq!(ids, want);
    for d in expected["divergent_conflicts"].as_array().unwrap() {
        let c = conflicts.iter().find(|c| c.event_id == d["event_id"].as_str().unwrap()).unwrap();
        assert_eq!(c.source, format!("unknown:{DIGEST_C}"));
        // The divergent envelopes are ASCII, so Python's ensure_ascii canonical form and ours agree.
        assert_eq!(c.existing_sha256, d["existing_canonical_sha256"].as_str().unwrap());
        assert_eq!(c.incoming_sha256, d["incoming_canonical_sha256"].as_str().unwrap());
        assert!(!c.resolved);
        // The journal keeps the first version (from B).
        let stored = stored_envelope(home, &c.event_id);
        assert_eq!(hex::encode(Sha256::digest(&stored)), raw_sha_in(expected, &c.event_id, DIGEST_B));
    }
}

fn raw_sha_in<'a>(expected: &'a Value, event_id: &str, digest: &str) -> &'a str {
    expected["multi_source_event_ids"][event_id]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["path"].as_str().unwrap().contains(digest))
        .unwrap()["data_sha256"]
        .as_str()
        .unwrap()
}

fn check_provenance(home: &Home, expected: &Value) {
    let conn = store_conn(home);
    let sources_of = |id: &str| -> Vec<String> {
        let mut stmt = conn
            .prepare(
                "SELECT m.source FROM migration_provenance m JOIN events e ON e.seq = m.seq WHERE e.event_id = ?1
                 ORDER BY m.source",
            )
            .unwrap();
        stmt.query_map([id], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
    };
    for id in expected["identical_duplicate_event_ids"].as_array().unwrap() {
        assert_eq!(sources_of(id.as_str().unwrap()), vec![format!("known:{DIGEST_A}"), format!("unknown:{DIGEST_B}")]);
    }
    assert_eq!(sources_of("01KHX1VKX0AAXMCDWJC5BAAHHA"), vec!["legacy:queue.db".to_string()]);
    // A conflicting source is not provenance of the kept bytes.
    assert_eq!(sources_of(ID1), vec![format!("unknown:{DIGEST_B}")]);
    let bad: i64 = conn
        .query_row(
            "SELECT count(*) FROM migration_provenance WHERE source NOT LIKE 'known:%' AND source NOT LIKE 'unknown:%'
             AND source <> 'legacy:queue.db'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(bad, 0, "never a URL or a team");
    // Provenance hashes are the canonical JSON's.
    let (env, sha): (Vec<u8>, String) = conn
        .query_row(
            "SELECT p.envelope, m.payload_sha256 FROM migration_provenance m JOIN payloads p ON p.seq = m.seq LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(sha, kitty_sync::envelope::sha256_hex(&kitty_sync::envelope::canonical_bytes(&env)));
}

/// Every journal event's bytes equal the `data` of its first source row (processing order),
/// and its capture metadata comes from that row.
fn check_stored_bytes_equal_first_source_row(home: &Home, report: &MigrationReport) {
    let mut first: BTreeMap<String, (Vec<u8>, i64, Option<String>, String)> = BTreeMap::new();
    for s in &report.sources {
        let conn = Connection::open_with_flags(&s.path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let mut stmt =
            conn.prepare("SELECT event_id, CAST(data AS BLOB), timestamp, coalesce_key, event_type FROM queue ORDER BY timestamp, id").unwrap();
        let rows =
            stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))).unwrap();
        for r in rows {
            let (id, v) = r.unwrap();
            first.entry(id).or_insert(v);
        }
    }
    let conn = store_conn(home);
    let mut stmt = conn
        .prepare(
            "SELECT e.event_id, p.envelope, e.captured_at, e.coalesce_key, e.event_type, e.capture_team,
                    e.drain_blocked_reason, e.payload_sha256, e.payload_bytes
             FROM events e JOIN payloads p ON p.seq = e.seq",
        )
        .unwrap();
    let mut seen = 0;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, Vec<u8>>(7)?,
                r.get::<_, i64>(8)?,
            ))
        })
        .unwrap();
    for r in rows {
        let (id, bytes, captured_at, key, event_type, team, blocked, sha, len) = r.unwrap();
        let (data, ts, want_key, want_type) = &first[&id];
        assert_eq!(&bytes, data, "{id}: stored bytes are the source row's data");
        assert_eq!(captured_at, ts * 1000, "{id}");
        assert_eq!(&key, want_key, "{id}");
        assert_eq!(&event_type, want_type, "{id}");
        assert_eq!(blocked, None);
        assert_eq!(sha, Sha256::digest(data).to_vec());
        assert_eq!(len as usize, data.len());
        let envelope: Value = serde_json::from_slice(data).unwrap();
        let want_team = envelope["team_slug"].as_str().filter(|t| !t.is_empty() && *t != "local");
        assert_eq!(team.as_deref(), want_team, "{id}: capture team");
        seen += 1;
    }
    assert_eq!(seen, first.len());
}

#[test]
fn rerun_is_idempotent_and_conflicts_are_not_duplicated() {
    let (_dir, home) = fixture_home();
    let first = run(&home, &alice(), false);
    let clock_after_first: i64 = store_conn(&home)
        .query_row("SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'lamport_clock'", [], |r| r.get(0))
        .unwrap();
    let second = run(&home, &alice(), false);
    assert_eq!(second.totals.imported, 0);
    assert_eq!(second.totals.deduped, first.totals.imported + first.totals.deduped);
    assert_eq!(second.totals.conflicts, 2, "conflicts are re-detected");
    assert!(second.cleanup_blocked);
    assert_eq!(count(&home, "SELECT count(*) FROM events"), 95);
    assert_eq!(count(&home, "SELECT count(*) FROM migration_conflicts"), 2, "not duplicated");
    assert_eq!(count(&home, "SELECT count(*) FROM migration_provenance"), 99);
    assert_eq!(count(&home, "SELECT count(*) FROM migrated_sources"), 5);
    let clock: i64 = store_conn(&home)
        .query_row("SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'lamport_clock'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(clock, clock_after_first, "a re-run imports nothing and leaves the clock alone");
    let max_imported: i64 = store_conn(&home)
        .query_row("SELECT max(json_extract(CAST(p.envelope AS TEXT), '$.lamport_clock')) FROM payloads p", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(clock >= max_imported, "the Lamport clock moved past the imported events");
}

#[test]
fn dry_run_reports_the_real_outcome_and_writes_nothing() {
    let (_dir, home) = fixture_home();
    let before = snapshot(home.root());
    let dry = run(&home, &alice(), true);
    assert!(dry.dry_run);
    assert!(!home.sync_dir().exists(), "a dry run creates no store and no directory");
    assert_eq!(snapshot(home.root()), before);
    let real = run(&home, &alice(), false);
    assert_eq!(dry.totals, real.totals);
    for (d, r) in dry.sources.iter().zip(&real.sources) {
        assert_eq!(
            (d.imported, d.deduped, d.conflicts, d.rows_read),
            (r.imported, r.deduped, r.conflicts, r.rows_read)
        );
    }
    assert_eq!(dry.cleanup_blocked, real.cleanup_blocked);

    // Against an existing store: the store file does not change either.
    let store_before = fs::read(home.store_path()).unwrap();
    let wal = PathBuf::from(format!("{}-wal", home.store_path().display()));
    let wal_before = fs::read(&wal).ok();
    let dry = run(&home, &alice(), true);
    assert_eq!(dry.totals.imported, 0);
    assert_eq!(dry.totals.deduped, 99);
    assert_eq!(dry.totals.conflicts, 2);
    assert!(dry.cleanup_blocked);
    assert_eq!(fs::read(home.store_path()).unwrap(), store_before);
    assert_eq!(fs::read(&wal).ok(), wal_before);
}

#[test]
fn dry_run_counts_cross_source_duplicates_and_forgets_failed_sources() {
    let (_dir, home) = new_home();
    let a = py_envelope(ID1, None, json!({"x": 1}));
    let b = py_envelope(ID2, None, json!({"x": 2}));
    create_queue(&home.root().join("queue.db"), &[row(ID1, &a, 1)]);
    create_queue(&scoped(&home, "aa"), &[row(ID1, &a, 2), row(ID2, &b, 3)]);
    create_queue(&scoped(&home, "bb"), &[row(ID2, &py_envelope(ID2, None, json!({"x": 3})), 4)]);
    let dry = run(&home, &authority(None, None), true);
    let real = run(&home, &authority(None, None), false);
    assert_eq!(dry.totals, real.totals);
    assert_eq!((real.totals.imported, real.totals.deduped, real.totals.conflicts), (2, 1, 1));
}

// ---------------------------------------------------------------- canonical comparison

#[test]
fn python_encoding_and_compact_json_are_the_same_event() {
    let (_dir, home) = new_home();
    let payload = json!({"title": "café ☕ — naïve 😀", "n": 1.5, "nested": {"b": [1, 2], "a": null}});
    // The journal already holds the compact form (e.g. emitted through kitty-sync).
    let mut store = Store::open(&home).unwrap();
    let line = compact_envelope(ID1, Some("team-x"), payload.clone());
    let mut reader = std::io::Cursor::new(format!("{line}\n"));
    let imported = Journal::new(&mut store, CapturePolicy::default())
        .import(&mut reader, &ImportOptions::default(), &mut |_| {})
        .unwrap();
    assert_eq!(imported.captured, 1);
    drop(store);
    let python = py_envelope(ID1, Some("team-x"), payload.clone());
    assert!(python.contains("\\u00e9") && python.contains("\\ud83d\\ude00"), "{python}");
    // Two sources: Python-encoded, and compact with other key order.
    create_queue(&home.root().join("queue.db"), &[row(ID1, &python, 1)]);
    create_queue(&scoped(&home, "ab"), &[row(ID1, &line, 1)]);
    let report = run(&home, &authority(None, None), false);
    assert_eq!(report.totals.deduped, 2, "{report:?}");
    assert_eq!(report.totals.conflicts, 0);
    assert!(!report.cleanup_blocked);
    assert_eq!(stored_envelope(&home, ID1), line.as_bytes(), "the journal's first bytes are kept");
    assert_eq!(count(&home, "SELECT count(*) FROM migration_provenance"), 2);
}

#[test]
fn different_content_is_a_conflict_and_the_first_bytes_stay() {
    let (_dir, home) = new_home();
    let v1 = py_envelope(ID1, None, json!({"to_lane": "doing"}));
    let v2 = py_envelope(ID1, None, json!({"to_lane": "done"}));
    create_queue(&scoped(&home, "01"), &[row(ID1, &v1, 5)]);
    create_queue(&scoped(&home, "02"), &[row(ID1, &v2, 6)]);
    let report = run(&home, &authority(None, None), false);
    assert_eq!(source(&report, "queue-01.db").imported, 1);
    assert_eq!(source(&report, "queue-02.db").conflicts, 1);
    assert!(report.cleanup_blocked);
    assert_eq!(stored_envelope(&home, ID1), v1.as_bytes());
    // Read before the read-only store opens: while it is open, it may hold the file locked
    // against every other connection, this process's included.
    let incoming: Vec<u8> =
        store_conn(&home).query_row("SELECT incoming_envelope FROM migration_conflicts", [], |r| r.get(0)).unwrap();
    assert_eq!(incoming, v2.as_bytes(), "the incoming raw bytes are kept");
    let store = Store::open_read_only(&home).unwrap().unwrap();
    let summary = legacy::conflict_summary(&store).unwrap();
    assert_eq!(summary.count, 1);
    assert!(summary.cleanup_blocked);
    let c = &summary.conflicts[0];
    assert_eq!(c.source, "unknown:02");
    let canon = |s: &str| kitty_sync::envelope::sha256_hex(&kitty_sync::envelope::canonical_bytes(s.as_bytes()));
    assert_eq!(c.existing_sha256, canon(&v1));
    assert_eq!(c.incoming_sha256, canon(&v2));
    drop(store);
    run(&home, &authority(None, None), false);
    assert_eq!(count(&home, "SELECT count(*) FROM migration_conflicts"), 1);
}

#[test]
fn purged_events_compare_by_stored_hash() {
    let (_dir, home) = new_home();
    let v1 = py_envelope(ID1, None, json!({"a": 1}));
    create_queue(&scoped(&home, "01"), &[row(ID1, &v1, 5)]);
    run(&home, &authority(None, None), false);
    store_conn(&home).execute_batch("DELETE FROM payloads; UPDATE events SET state = 2, purged_at = 1;").unwrap();
    create_queue(&scoped(&home, "02"), &[row(ID1, &v1, 5)]);
    create_queue(&scoped(&home, "03"), &[row(ID1, &py_envelope(ID1, None, json!({"a": 2})), 5)]);
    let report = run(&home, &authority(None, None), false);
    assert_eq!(source(&report, "queue-02.db").deduped, 1);
    assert_eq!(source(&report, "queue-03.db").conflicts, 1);
}

// ---------------------------------------------------------------- rows and metadata

#[test]
fn rows_keep_their_bytes_metadata_and_team() {
    let (_dir, home) = new_home();
    let blob = py_envelope(ID2, Some("local"), json!({"b": true}));
    let rows = vec![
        LegacyRow {
            coalesce_key: Some("MissionDossierSnapshotComputed|p|m".into()),
            event_type: "MissionDossierSnapshotComputed".into(),
            ..row(ID1, &py_envelope(ID1, Some("team-beta"), json!({})), 1_771_575_301)
        },
        LegacyRow { data: Data::Blob(blob.clone().into_bytes()), ..row(ID2, "", 1_771_575_302) },
        row(ID3, &py_envelope(ID3, Some(""), json!({})), 1_771_575_300),
    ];
    create_queue(&home.root().join("queue.db"), &rows);
    let report = run(&home, &authority(None, None), false);
    assert_eq!(report.totals.imported, 3);
    let conn = store_conn(&home);
    let get = |id: &str| -> (i64, Option<String>, Option<String>, String, i64) {
        conn.query_row(
            "SELECT captured_at, capture_team, coalesce_key, event_type, seq FROM events WHERE event_id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .unwrap()
    };
    let (at, team, key, event_type, seq1) = get(ID1);
    assert_eq!(at, 1_771_575_301_000);
    assert_eq!(team.as_deref(), Some("team-beta"));
    assert_eq!(key.as_deref(), Some("MissionDossierSnapshotComputed|p|m"));
    assert_eq!(event_type, "MissionDossierSnapshotComputed", "event_type as stored in its column");
    let (_, team, ..) = get(ID2);
    assert_eq!(team, None, "\"local\" is no team");
    let (_, team, _, _, seq3) = get(ID3);
    assert_eq!(team, None);
    assert!(seq3 < seq1, "rows are read by (timestamp, id)");
    assert_eq!(stored_envelope(&home, ID2), blob.as_bytes(), "BLOB data stored verbatim");
}

#[test]
fn invalid_rows_are_reported_never_dropped_silently() {
    let (_dir, home) = new_home();
    let good = py_envelope(ID1, None, json!({}));
    let rows = vec![
        row(ID1, &good, 1),
        row(ID2, "not json {", 2),
        row(ID3, "[1, 2]", 3),
        row("not-a-ulid", &py_envelope("not-a-ulid", None, json!({})), 4),
        row(ID4, &py_envelope(ID3, None, json!({})), 5),
        row("01KHX2BZ29R6ZEF30V3YMD6JS1", "{\"event_type\": \"X\", \"v\": NaN}", 6),
    ];
    create_queue(&home.root().join("queue.db"), &rows);
    let report = run(&home, &authority(None, None), false);
    let s = &report.sources[0];
    assert_eq!(s.rows_read, 6);
    assert_eq!(s.imported, 1);
    assert_eq!(s.invalid_rows, 5);
    assert_eq!(s.invalid.len(), 5);
    let reasons: Vec<&str> = s.invalid.iter().map(|r| r.reason.as_str()).collect();
    assert!(reasons[0].contains("not valid JSON"), "{reasons:?}");
    assert!(reasons[1].contains("not a JSON object"), "{reasons:?}");
    assert!(reasons[2].contains("not a valid ULID"), "{reasons:?}");
    assert!(reasons[3].contains("differs"), "{reasons:?}");
    assert_eq!(s.invalid[0].event_id.as_deref(), Some(ID2));
    assert!(report.cleanup_blocked, "invalid rows block cleanup (exit 3)");
    assert_eq!(report.totals.invalid_rows, 5);
}

#[test]
fn body_upload_rows_are_counted_never_imported() {
    let (_dir, home) = new_home();
    let path = scoped(&home, "0b");
    create_queue(&path, &[row(ID1, &py_envelope(ID1, None, json!({})), 1)]);
    add_body_rows(&path, 2, 3);
    create_queue(&home.root().join("queue.db"), &[]);
    add_body_rows(&home.root().join("queue.db"), 1, 0);
    let report = run(&home, &authority(None, None), false);
    assert_eq!(source(&report, "queue-0b.db").body_upload_rows, 5);
    assert_eq!(report.totals.body_upload_rows, 6);
    assert_eq!(report.totals.imported, 1);
    assert_eq!(count(&home, "SELECT count(*) FROM events"), 1);
    assert!(!report.cleanup_blocked, "body-upload rows do not block");
    let status = legacy::legacy_queues_report(&home, &authority(None, None), None);
    assert_eq!(status.body_upload.body_upload_queue_count, 3);
    assert_eq!(status.body_upload.body_upload_failure_log_count, 3);
    assert_eq!(status.event_count, 1);
}

#[test]
fn queue_without_coalesce_key_column_is_tolerated() {
    let (_dir, home) = new_home();
    let path = home.root().join("queue.db");
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch(
        "CREATE TABLE queue (id INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT UNIQUE NOT NULL,
         event_type TEXT NOT NULL, data TEXT NOT NULL, timestamp INTEGER NOT NULL, retry_count INTEGER DEFAULT 0);",
    )
    .unwrap();
    conn.execute(
        "INSERT INTO queue (event_id, event_type, data, timestamp) VALUES (?1, 'T', ?2, 9)",
        params![ID1, py_envelope(ID1, None, json!({}))],
    )
    .unwrap();
    drop(conn);
    let report = run(&home, &authority(None, None), false);
    assert_eq!(report.totals.imported, 1);
    assert_eq!(report.totals.body_upload_rows, 0);
    assert!(!report.cleanup_blocked);
}

// ---------------------------------------------------------------- sources

#[test]
fn broken_sources_are_reported_and_the_others_migrate() {
    let (_dir, home) = new_home();
    let q = home.root().join("queues");
    fs::create_dir_all(&q).unwrap();
    create_queue(&home.root().join("queue.db"), &[row(ID1, &py_envelope(ID1, None, json!({})), 1)]);
    fs::write(q.join("queue-01.db"), b"").unwrap();
    fs::write(q.join("queue-02.db"), b"this is not a database at all, just text".repeat(200)).unwrap();
    // Truncated: a real queue cut in half.
    let full = q.join("queue-03.db");
    create_queue(
        &full,
        &(0..300).map(|i| row(&ulid(i), &py_envelope(&ulid(i), None, json!({"i": i})), i)).collect::<Vec<_>>(),
    );
    let bytes = fs::read(&full).unwrap();
    fs::write(&full, &bytes[..bytes.len() / 2]).unwrap();
    Connection::open(q.join("queue-04.db")).unwrap().execute_batch("CREATE TABLE other (x)").unwrap();
    create_queue(&q.join("queue-05.db"), &[]);
    fs::create_dir(q.join("queue-06.db")).unwrap();
    create_queue(&q.join("queue-07.db"), &[row(ID2, &py_envelope(ID2, None, json!({})), 2)]);
    let before = snapshot(home.root());

    let report = run(&home, &authority(None, None), false);
    let error = |d: &str| source(&report, &format!("queue-{d}.db")).error.clone();
    assert!(error("01").unwrap().contains("empty file"), "{:?}", error("01"));
    assert!(error("02").unwrap().contains("not a SQLite database"), "{:?}", error("02"));
    assert!(error("03").unwrap().contains("truncated"), "{:?}", error("03"));
    assert!(error("04").unwrap().contains("no `queue` table"), "{:?}", error("04"));
    assert_eq!(error("05"), None, "an empty queue is a source with 0 rows");
    assert_eq!(source(&report, "queue-05.db").rows_read, 0);
    assert!(error("06").unwrap().contains("not a regular file"), "{:?}", error("06"));
    assert_eq!(source(&report, "queue-07.db").imported, 1);
    assert_eq!(report.totals.imported, 2);
    assert_eq!(report.totals.source_errors, 5);
    assert!(report.cleanup_blocked);
    assert_eq!(
        snapshot(home.root()).into_iter().filter(|(p, _)| !p.starts_with(home.sync_dir())).collect::<BTreeMap<_, _>>(),
        before
    );
    let sidecars = fs::read_dir(&q).unwrap().filter(|e| {
        let name = e.as_ref().unwrap().file_name().to_string_lossy().into_owned();
        name.ends_with("-journal") || name.ends_with("-wal") || name.ends_with("-shm")
    });
    assert_eq!(sidecars.count(), 0, "SQLite created no file next to a source");

    // The status view reports the same without failing.
    let store = Store::open_read_only(&home).unwrap().unwrap();
    let status = legacy::legacy_queues_report(&home, &authority(None, None), Some(&store));
    assert_eq!(status.files.len(), 8);
    assert_eq!(status.event_count, 2);
    assert!(status.files.iter().find(|f| f.path.ends_with("queue-02.db")).unwrap().error.is_some());
    assert!(status.files.iter().find(|f| f.path.ends_with("queue-07.db")).unwrap().migrated);
}

fn ulid(i: i64) -> String {
    format!("01KJ{:022}", i)
}

#[test]
fn discovery_orders_sources_and_lists_ignored_files() {
    let (_dir, home) = new_home();
    let q = home.root().join("queues");
    create_queue(&q.join("queue-bb.db"), &[]);
    create_queue(&q.join("queue-0a.db"), &[]);
    create_queue(&home.root().join("queue.db"), &[]);
    for name in ["notes.txt", "queue-ABC.db", "queue-xyz.db", "queue-0a.db.bak", "queue-cc.db-journal"] {
        fs::write(q.join(name), b"x").unwrap();
    }
    fs::write(q.join("queue-bb.db-journal"), b"").unwrap();
    let found = legacy::discover(&home);
    let names: Vec<String> = found.sources.iter().map(|s| s.relative.clone()).collect();
    assert_eq!(names, ["queue.db", "queues/queue-0a.db", "queues/queue-bb.db"]);
    let ignored: Vec<String> =
        found.ignored_files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(ignored, ["notes.txt", "queue-0a.db.bak", "queue-ABC.db", "queue-cc.db-journal", "queue-xyz.db"]);
    let report = run(&home, &authority(None, None), false);
    assert_eq!(report.ignored_files.len(), 5);
    assert!(!report.cleanup_blocked, "ignored files do not block");
}

#[test]
fn no_legacy_queues_is_a_clean_no_op() {
    let (_dir, home) = new_home();
    let report = run(&home, &authority(None, None), false);
    assert!(report.sources.is_empty());
    assert!(!report.cleanup_blocked);
    assert!(!home.sync_dir().exists(), "nothing to migrate: no store created");
}

/// A queue left with a hot rollback journal (spec-kitty killed mid-write) is recovered in a
/// private copy: the committed rows migrate, the source and its journal stay untouched.
#[test]
fn hot_journal_is_recovered_in_a_copy() {
    let (_dir, home) = new_home();
    let work = tempfile::tempdir().unwrap();
    let live = work.path().join("live.db");
    create_queue(&live, &[row(ID1, &py_envelope(ID1, None, json!({})), 1)]);
    let conn = Connection::open(&live).unwrap();
    conn.execute_batch("PRAGMA cache_size = 1; BEGIN;").unwrap();
    let big: Vec<LegacyRow> =
        (0..400).map(|i| row(&ulid(i), &py_envelope(&ulid(i), None, json!({"pad": "x".repeat(2000)})), 5)).collect();
    insert_rows(&conn, &big);
    // Snapshot the crashed state: database file plus its hot journal.
    let path = scoped(&home, "aa");
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::copy(&live, &path).unwrap();
    let journal = PathBuf::from(format!("{}-journal", path.display()));
    fs::copy(format!("{}-journal", live.display()), &journal).unwrap();
    drop(conn);
    assert!(fs::metadata(&journal).unwrap().len() > 0);
    // Without its journal the file holds uncommitted pages: reading it in place would be wrong.
    let alone = work.path().join("alone.db");
    fs::copy(&path, &alone).unwrap();
    let in_place: rusqlite::Result<i64> =
        Connection::open(&alone).and_then(|c| c.query_row("SELECT count(*) FROM queue", [], |r| r.get(0)));
    assert!(!matches!(in_place, Ok(1)), "the fixture must be a real crash state: {in_place:?}");
    let before = snapshot(home.root());
    let report = run(&home, &authority(None, None), false);
    let s = source(&report, "queue-aa.db");
    assert_eq!(s.error, None, "{s:?}");
    assert_eq!((s.rows_read, s.imported), (1, 1), "only the committed row");
    assert_eq!(
        snapshot(home.root()).into_iter().filter(|(p, _)| !p.starts_with(home.sync_dir())).collect::<BTreeMap<_, _>>(),
        before
    );
    assert!(report.ignored_files.is_empty(), "the sidecar belongs to its queue");
}

#[test]
fn progress_reports_the_total() {
    let (_dir, home) = new_home();
    let rows: Vec<LegacyRow> = (0..2500).map(|i| row(&ulid(i), &py_envelope(&ulid(i), None, json!({})), i)).collect();
    create_queue(&home.root().join("queue.db"), &rows);
    let mut seen = Vec::new();
    legacy::migrate(&home, &authority(None, None), &MigrateOptions::default(), &mut |p| seen.push(p)).unwrap();
    assert!(seen.len() >= 3);
    assert!(seen.iter().all(|p| p.rows_total == 2500));
    assert_eq!(seen.last().unwrap().rows_done, 2500);
}

// ---------------------------------------------------------------- scope status

#[test]
fn provenance_names_follow_the_scope() {
    let (_dir, home) = new_home();
    let env = py_envelope(ID1, None, json!({}));
    create_queue(&home.root().join("queue.db"), &[row(ID1, &env, 1)]);
    create_queue(&scoped(&home, DIGEST_A), &[row(ID1, &env, 1)]);
    create_queue(&scoped(&home, DIGEST_B), &[row(ID1, &env, 1)]);
    let report = run(&home, &alice(), false);
    let names: Vec<&str> = report.sources.iter().map(|s| s.source.as_str()).collect();
    assert_eq!(names, ["legacy:queue.db", "unknown:3a02fa36bdf7144d", "known:f7b048d5c00bc4e2"]);
    // Without a user nothing is known (the derived scope names no scoped queue).
    let anonymous = run(&home, &authority(None, None), true);
    assert!(anonymous.sources.iter().all(|s| s.scope_status != Some(ScopeStatus::Known)));
    // Another team of the same user: A is unknown then.
    let other = run(&home, &authority(Some("alice@example.com"), Some("team-beta")), true);
    assert_eq!(source(&other, DIGEST_A).scope_status, Some(ScopeStatus::Unknown));
}

// ---------------------------------------------------------------- resolving

fn conflicted_home() -> (tempfile::TempDir, Home, String, String) {
    let (dir, home) = new_home();
    let v1 = py_envelope(ID1, Some("team-a"), json!({"v": 1}));
    let v2 = py_envelope(ID1, Some("team-b"), json!({"v": 2}));
    create_queue(&scoped(&home, "01"), &[row(ID1, &v1, 5)]);
    create_queue(&scoped(&home, "02"), &[row(ID1, &v2, 6)]);
    assert!(run(&home, &authority(None, None), false).cleanup_blocked);
    (dir, home, v1, v2)
}

#[test]
fn resolve_keep_journal_unblocks_and_stays_resolved() {
    let (_dir, home, v1, _) = conflicted_home();
    let mut store = Store::open(&home).unwrap();
    let r = legacy::resolve(&mut store, &drain_lock(&home), ID1, Keep::Journal, None).unwrap();
    assert_eq!((r.kept, r.resolved), ("journal", 1));
    let again = legacy::resolve(&mut store, &drain_lock(&home), ID1, Keep::Journal, None).unwrap();
    assert_eq!(again.resolved, 0, "idempotent");
    drop(store);
    assert_eq!(stored_envelope(&home, ID1), v1.as_bytes());
    let report = run(&home, &authority(None, None), false);
    assert!(!report.cleanup_blocked, "{report:?}");
    assert_eq!(source(&report, "queue-02.db").resolved_conflicts, 1);
    assert_eq!(source(&report, "queue-02.db").conflicts, 0);
    let list = legacy::list_conflicts(Store::open_read_only(&home).unwrap().as_ref()).unwrap();
    assert_eq!(list.len(), 1);
    assert!(list[0].resolved);
}

#[test]
fn resolve_keep_incoming_replaces_the_bytes_and_keeps_the_old_version() {
    let (_dir, home, v1, v2) = conflicted_home();
    let mut store = Store::open(&home).unwrap();
    let r = legacy::resolve(&mut store, &drain_lock(&home), ID1, Keep::Incoming, None).unwrap();
    assert_eq!(r.kept, "incoming");
    assert_eq!(r.source.as_deref(), Some("unknown:02"));
    drop(store);
    assert_eq!(stored_envelope(&home, ID1), v2.as_bytes());
    let (sha, len, team): (Vec<u8>, i64, Option<String>) = store_conn(&home)
        .query_row("SELECT payload_sha256, payload_bytes, capture_team FROM events WHERE event_id = ?1", [ID1], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!(sha, Sha256::digest(v2.as_bytes()).to_vec());
    assert_eq!(len as usize, v2.len());
    assert_eq!(team.as_deref(), Some("team-b"), "team isolation follows the new envelope");
    // The replaced version is filed under its source, resolved.
    let kept: Vec<u8> = store_conn(&home)
        .query_row("SELECT incoming_envelope FROM migration_conflicts WHERE source = 'unknown:01'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(kept, v1.as_bytes());
    // A re-run sees both sources decided.
    let report = run(&home, &authority(None, None), false);
    assert!(!report.cleanup_blocked, "{report:?}");
    assert_eq!(source(&report, "queue-01.db").resolved_conflicts, 1);
    assert_eq!(source(&report, "queue-02.db").deduped, 1);
    // And the operator can go back.
    let mut store = Store::open(&home).unwrap();
    let back = legacy::resolve(&mut store, &drain_lock(&home), ID1, Keep::Incoming, None).unwrap();
    assert_eq!(back.source.as_deref(), Some("unknown:01"));
    drop(store);
    assert_eq!(stored_envelope(&home, ID1), v1.as_bytes());
    assert!(!run(&home, &authority(None, None), false).cleanup_blocked);
}

#[test]
fn resolve_keep_incoming_preserves_emitted_bytes_under_journal() {
    let (_dir, home) = new_home();
    let mut store = Store::open(&home).unwrap();
    let line = compact_envelope(ID1, None, json!({"from": "emit"}));
    let mut reader = std::io::Cursor::new(line.clone());
    Journal::new(&mut store, CapturePolicy::default())
        .import(&mut reader, &ImportOptions::default(), &mut |_| {})
        .unwrap();
    drop(store);
    create_queue(&scoped(&home, "01"), &[row(ID1, &py_envelope(ID1, None, json!({"from": "legacy"})), 1)]);
    run(&home, &authority(None, None), false);
    let mut store = Store::open(&home).unwrap();
    legacy::resolve(&mut store, &drain_lock(&home), ID1, Keep::Incoming, None).unwrap();
    drop(store);
    let kept: Vec<u8> = store_conn(&home)
        .query_row(
            "SELECT incoming_envelope FROM migration_conflicts WHERE source = ?1",
            [legacy::JOURNAL_SOURCE],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(kept, line.as_bytes());
}

#[test]
fn resolve_keep_incoming_is_refused_after_a_terminal_delivery() {
    let (_dir, home, v1, _) = conflicted_home();
    store_conn(&home)
        .execute("INSERT INTO ledger (target, epoch, seq, status) SELECT 1, 0, seq, 'duplicate' FROM events", [])
        .unwrap();
    let mut store = Store::open(&home).unwrap();
    let err = legacy::resolve(&mut store, &drain_lock(&home), ID1, Keep::Incoming, None).unwrap_err();
    assert_eq!(err.exit_code(), 3, "{err}");
    assert!(err.hint().contains("--keep journal"));
    drop(store);
    assert_eq!(stored_envelope(&home, ID1), v1.as_bytes());
    assert_eq!(count(&home, "SELECT count(*) FROM migration_conflicts WHERE resolved_at IS NULL"), 1);
}

#[test]
fn resolve_errors_are_usage_errors() {
    let (_dir, home) = conflicted_home_three();
    let mut store = Store::open(&home).unwrap();
    assert_eq!(
        legacy::resolve(&mut store, &drain_lock(&home), "nope", Keep::Journal, None).unwrap_err().exit_code(),
        2
    );
    assert_eq!(
        legacy::resolve(&mut store, &drain_lock(&home), ID2, Keep::Journal, None).unwrap_err().exit_code(),
        2,
        "no conflict"
    );
    assert_eq!(
        legacy::resolve(&mut store, &drain_lock(&home), ID4, Keep::Journal, None).unwrap_err().exit_code(),
        2,
        "unknown id"
    );
    let ambiguous = legacy::resolve(&mut store, &drain_lock(&home), ID1, Keep::Incoming, None).unwrap_err();
    assert_eq!(ambiguous.exit_code(), 2);
    assert!(
        ambiguous.to_string().contains("unknown:02") && ambiguous.to_string().contains("unknown:03"),
        "{ambiguous}"
    );
    assert_eq!(
        legacy::resolve(&mut store, &drain_lock(&home), ID1, Keep::Incoming, Some("unknown:99"))
            .unwrap_err()
            .exit_code(),
        2,
        "unknown source"
    );
    let chosen = legacy::resolve(&mut store, &drain_lock(&home), ID1, Keep::Incoming, Some("unknown:03")).unwrap();
    assert_eq!(chosen.source.as_deref(), Some("unknown:03"));
    assert_eq!(chosen.resolved, 2, "both conflicts are settled");
}

fn conflicted_home_three() -> (tempfile::TempDir, Home) {
    let (dir, home) = new_home();
    create_queue(
        &scoped(&home, "01"),
        &[row(ID1, &py_envelope(ID1, None, json!({"v": 1})), 5), row(ID2, &py_envelope(ID2, None, json!({})), 5)],
    );
    create_queue(&scoped(&home, "02"), &[row(ID1, &py_envelope(ID1, None, json!({"v": 2})), 5)]);
    create_queue(&scoped(&home, "03"), &[row(ID1, &py_envelope(ID1, None, json!({"v": 3})), 5)]);
    run(&home, &authority(None, None), false);
    (dir, home)
}

// ---------------------------------------------------------------- status views

#[test]
fn status_views_on_the_fixture() {
    let (_dir, home) = fixture_home();
    let before = legacy::legacy_queues_report(&home, &alice(), None);
    assert_eq!(before.files.len(), 5);
    assert_eq!(before.event_count, 101);
    assert!(before.files.iter().all(|f| !f.migrated && f.error.is_none()));
    assert_eq!(before.body_upload.body_upload_queue_count, 3);
    assert_eq!(before.body_upload.body_upload_failure_log_count, 2);
    let a = before.files.iter().find(|f| f.digest.as_deref() == Some(DIGEST_A)).unwrap();
    assert_eq!((a.scope_status, a.body_upload_count, a.event_count), (Some(ScopeStatus::Known), 5, 20));
    let json = serde_json::to_value(&before).unwrap();
    assert_eq!(json.as_object().unwrap().keys().collect::<Vec<_>>(), ["event_count", "files"]);
    let file_keys: Vec<&String> = json["files"][0].as_object().unwrap().keys().collect();
    assert_eq!(file_keys, ["body_upload_count", "digest", "event_count", "kind", "migrated", "path", "scope_status"]);
    assert!(!home.sync_dir().exists(), "read-only");

    run(&home, &alice(), false);
    let store = Store::open_read_only(&home).unwrap().unwrap();
    let after = legacy::legacy_queues_report(&home, &alice(), Some(&store));
    assert!(after.files.iter().all(|f| f.migrated));
    let summary = legacy::conflict_summary(&store).unwrap();
    assert_eq!(summary.count, 2);
    assert!(summary.cleanup_blocked);
    let json = serde_json::to_value(&summary).unwrap();
    let keys: Vec<&String> = json["conflicts"][0].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["detected_at", "event_id", "existing_sha256", "incoming_sha256", "source"]);
}

/// Odd home paths (URI metacharacters, spaces, non-ASCII) and odd payloads: a near-1 MB
/// envelope and one with a lone surrogate escape (Python writes those for undecodable names).
#[test]
fn odd_paths_and_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::at(&dir.path().join("hé llo?#%20 x").join("home"));
    let big = py_envelope(ID1, None, json!({"body": "ü€😀".repeat(80_000)}));
    assert!(big.len() > 900_000, "{}", big.len());
    let lone = format!(
        "{{\"event_id\": \"{ID2}\", \"event_type\": \"MissionDossierArtifactIndexed\", \"payload\": {{\"path\": \"caf\\udce9.md\"}}, \"team_slug\": \"t\"}}"
    );
    create_queue(&scoped(&home, "0c"), &[row(ID1, &big, 1), row(ID2, &lone, 2)]);
    let before = snapshot(home.root());
    let report = run(&home, &authority(None, None), false);
    assert_eq!(report.totals.imported, 2, "{report:?}");
    assert_eq!(stored_envelope(&home, ID1), big.as_bytes());
    assert_eq!(stored_envelope(&home, ID2), lone.as_bytes());
    let again = run(&home, &authority(None, None), false);
    assert_eq!(again.totals.deduped, 2, "both compare equal to themselves on a re-run");
    assert!(!again.cleanup_blocked);
    assert_eq!(
        snapshot(home.root()).into_iter().filter(|(p, _)| !p.starts_with(home.sync_dir())).collect::<BTreeMap<_, _>>(),
        before
    );
}

/// The drain lock a resolution needs (taken and released around each call).
fn drain_lock(home: &Home) -> kitty_sync::delivery::lock::DrainLock {
    kitty_sync::delivery::lock::acquire(home, std::time::Duration::ZERO, "test").unwrap()
}
