//! The capture API for Rust producers: `Journal::append` and `Journal::import`, plus property
//! tests of the import invariants (bytes stored unchanged, nothing lost, idempotent re-import).

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::OnceLock;

use kitty_sync::event_journal::{
    AppendOutcome, BlockedReason, CapturePolicy, ImportOptions, ImportReport, Journal, NewEvent,
};
use kitty_sync::home::Home;
use kitty_sync::mode::EventSyncMode;
use kitty_sync::store::Store;
use proptest::prelude::*;
use serde_json::{Value, json};

const ID_A: &str = "01KVYWRGJEV7CEZW6J7GXEBN16";

/// A fresh store. Creating one runs every schema migration with durable commits, which made
/// the property tests slow; so the first is built once and later ones start as copies of it.
fn store() -> (tempfile::TempDir, Store) {
    static TEMPLATE: OnceLock<(tempfile::TempDir, Vec<u8>)> = OnceLock::new();
    let (_, bytes) = TEMPLATE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        drop(Store::open(&home).unwrap());
        let bytes = std::fs::read(home.store_path()).unwrap();
        (dir, bytes)
    });
    let dir = tempfile::tempdir().unwrap();
    let home = Home::at(dir.path());
    home.ensure_sync_dir().unwrap();
    std::fs::write(home.store_path(), bytes).unwrap();
    let store = Store::open(&home).unwrap();
    (dir, store)
}

fn event(event_type: &str) -> NewEvent {
    NewEvent { event_type: event_type.into(), ..Default::default() }
}

fn import(store: &mut Store, input: &[u8], options: &ImportOptions) -> kitty_sync::Result<ImportReport> {
    Journal::new(store, CapturePolicy::default()).import(&mut Cursor::new(input), options, &mut |_| {})
}

fn skip_invalid() -> ImportOptions {
    ImportOptions { default_type: None, skip_invalid: true }
}

/// A connection of the test's own to the store file: the engine keeps its connection to
/// itself, so the tests look (and meddle) from outside, like another process would.
fn raw(store: &Store) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    conn
}

/// `(event_id, stored bytes)` in capture order.
fn rows(store: &Store) -> Vec<(String, Vec<u8>)> {
    let conn = raw(store);
    let mut stmt = conn
        .prepare("SELECT e.event_id, p.envelope FROM events e JOIN payloads p ON p.seq = e.seq ORDER BY e.seq")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
}

fn column(store: &Store, event_id: &str, column: &str) -> Option<String> {
    raw(store).query_row(&format!("SELECT {column} FROM events WHERE event_id = ?1"), [event_id], |r| r.get(0)).unwrap()
}

fn envelope(store: &Store, event_id: &str) -> Value {
    let bytes: Vec<u8> = raw(store)
        .query_row(
            "SELECT p.envelope FROM events e JOIN payloads p ON p.seq = e.seq WHERE e.event_id = ?1",
            [event_id],
            |r| r.get(0),
        )
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn captured_id(outcome: AppendOutcome) -> String {
    match outcome {
        AppendOutcome::Captured { event_id, .. } => event_id,
        other => panic!("expected Captured, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// append

#[test]
fn append_builds_the_envelope_and_is_idempotent_by_id() {
    let (_dir, mut store) = store();
    let mut journal = Journal::new(&mut store, CapturePolicy::default());
    let new = NewEvent {
        event_type: "WPStatusChanged".into(),
        event_id: Some(ID_A.into()),
        aggregate_id: Some("WP01".into()),
        payload: Some(json!({"to_lane": "done"})),
        ..Default::default()
    };
    assert_eq!(journal.append(new.clone()).unwrap(), AppendOutcome::Captured { event_id: ID_A.into(), coalesced: 0 });
    assert_eq!(journal.append(new.clone()).unwrap(), AppendOutcome::AlreadyPresent { event_id: ID_A.into() });
    let other = NewEvent { payload: Some(json!({"to_lane": "doing"})), ..new };
    let err = journal.append(other).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("conflicting event_id"), "{err}");
    let generated = captured_id(journal.append(event("T")).unwrap());
    assert_ne!(generated, ID_A);

    let a = envelope(&store, ID_A);
    assert_eq!(a["payload"], json!({"to_lane": "done"}));
    assert_eq!(a["team_slug"], "local");
    assert_eq!(a["aggregate_id"], "WP01");
    let b = envelope(&store, &generated);
    assert_eq!(b["payload"], json!({}));
    assert!(b["lamport_clock"].as_i64() > a["lamport_clock"].as_i64());
    assert_eq!(a["node_id"], b["node_id"]);
    assert_eq!(rows(&store).len(), 2);
}

#[test]
fn append_rejects_bad_input_as_usage_errors() {
    let (_dir, mut store) = store();
    let mut journal = Journal::new(&mut store, CapturePolicy::default());
    for bad in [
        NewEvent { event_type: " ".into(), ..Default::default() },
        NewEvent { event_type: "T".into(), event_id: Some("nope".into()), ..Default::default() },
        NewEvent { event_type: "T".into(), payload: Some(json!([1])), ..Default::default() },
    ] {
        assert_eq!(journal.append(bad).unwrap_err().exit_code(), 2);
    }
    assert!(rows(&store).is_empty());
}

#[test]
fn append_records_policy_and_drops_only_under_opt_out() {
    let (_dir, mut store) = store();
    let opt_out = CapturePolicy {
        mode: EventSyncMode::OptOut,
        local_only_types: ["Local".to_string()].into(),
        team: Some("team-x".into()),
        blocked_reason: Some(BlockedReason::OptOut),
    };
    let mut journal = Journal::new(&mut store, opt_out);
    assert!(matches!(journal.append(event("Local")).unwrap(), AppendOutcome::Dropped { .. }));
    let flagged = NewEvent { local_only: true, ..event("Shared") };
    assert!(matches!(journal.append(flagged).unwrap(), AppendOutcome::Dropped { .. }));
    let kept = captured_id(journal.append(event("Shared")).unwrap());
    assert_eq!(rows(&store).len(), 1);
    assert_eq!(column(&store, &kept, "drain_blocked_reason").as_deref(), Some("opt_out"));
    assert_eq!(column(&store, &kept, "capture_team").as_deref(), Some("team-x"));
    assert_eq!(envelope(&store, &kept)["team_slug"], "team-x");
    let dropped: i64 = raw(&store).query_row("SELECT sum(count) FROM dropped_events", [], |r| r.get(0)).unwrap();
    assert_eq!(dropped, 2);
}

#[test]
fn coalescing_skips_events_already_delivered_somewhere() {
    let (_dir, mut store) = store();
    let keyed = |key: &str| NewEvent { coalesce_key: Some(key.into()), ..event("Progress") };
    let first = captured_id(Journal::new(&mut store, CapturePolicy::default()).append(keyed("k")).unwrap());
    let delivered = captured_id(Journal::new(&mut store, CapturePolicy::default()).append(keyed("k")).unwrap());
    // `delivered` superseded `first`; now pretend a target terminally received `delivered`.
    raw(&store)
        .execute_batch(&format!(
            "INSERT INTO targets (id, target_id, kind, canonical_url, first_seen_at, last_seen_at)
               VALUES (1, 't1', 'external', 'https://a.example', 0, 0);
             INSERT INTO ledger (target, epoch, seq, status)
               SELECT 1, 0, seq, 'success' FROM events WHERE event_id = '{delivered}';"
        ))
        .unwrap();
    let outcome = Journal::new(&mut store, CapturePolicy::default()).append(keyed("k")).unwrap();
    let AppendOutcome::Captured { event_id: last, coalesced } = outcome else { panic!("{outcome:?}") };
    assert_eq!(coalesced, 0, "a delivered event stays deliverable");
    assert_eq!(column(&store, &first, "coalesced_into"), Some(delivered.clone()));
    assert_eq!(column(&store, &delivered, "coalesced_into"), None);
    assert_eq!(column(&store, &last, "coalesced_into"), None);
    let other = Journal::new(&mut store, CapturePolicy::default()).append(keyed("other")).unwrap();
    assert!(matches!(other, AppendOutcome::Captured { coalesced: 0, .. }));
}

// ---------------------------------------------------------------------------------------------
// import

#[test]
fn import_is_all_or_nothing_without_skip_invalid() {
    let (_dir, mut store) = store();
    Journal::new(&mut store, CapturePolicy::default()).append(event("Before")).unwrap();
    let before = rows(&store);
    let input =
        format!("{{\"event_id\":\"{ID_A}\",\"event_type\":\"A\"}}\n{{\"event_id\":\"bad\",\"event_type\":\"A\"}}\n");
    let report = import(&mut store, input.as_bytes(), &ImportOptions::default()).unwrap();
    assert!(!report.committed);
    assert_eq!((report.captured, report.already_present), (0, 0));
    assert_eq!(report.invalid.len(), 1);
    assert_eq!(report.invalid[0].line, 2);
    assert_eq!(rows(&store), before);

    let report = import(&mut store, input.as_bytes(), &skip_invalid()).unwrap();
    assert!(report.committed);
    assert_eq!(report.captured, 1);
    assert_eq!(rows(&store).len(), 2);
}

#[test]
fn import_default_type_changes_nothing_but_the_missing_key() {
    let (_dir, mut store) = store();
    let options = ImportOptions { default_type: Some("WPStatusChanged".into()), skip_invalid: false };
    let line = format!(r#"{{"at": "2026-01-01T00:00:00+00:00", "event_id": "{ID_A}", "to_lane": "done", "x": 1.50}}"#);
    let report = import(&mut store, format!("{line}\n").as_bytes(), &options).unwrap();
    assert_eq!(report.captured, 1);
    let expected = format!("{{\"event_type\":\"WPStatusChanged\",{}", &line[1..]);
    assert_eq!(rows(&store)[0].1, expected.as_bytes());
    // An explicit null type counts as missing too.
    let null_type = format!(r#"{{"event_id": "{}", "event_type": null}}"#, "01KVYWRGJEV7CEZW6J7GXEBN17");
    let report = import(&mut store, null_type.as_bytes(), &options).unwrap();
    assert_eq!(report.captured, 1);
    assert_eq!(envelope(&store, "01KVYWRGJEV7CEZW6J7GXEBN17")["event_type"], "WPStatusChanged");
}

#[test]
fn import_advances_the_lamport_clock_past_imported_events() {
    let (_dir, mut store) = store();
    let input = format!("{{\"event_id\":\"{ID_A}\",\"event_type\":\"A\",\"lamport_clock\":41}}\n");
    import(&mut store, input.as_bytes(), &ImportOptions::default()).unwrap();
    let id = captured_id(Journal::new(&mut store, CapturePolicy::default()).append(event("T")).unwrap());
    assert!(envelope(&store, &id)["lamport_clock"].as_i64().unwrap() > 41);
}

#[test]
fn import_under_opt_out_drops_and_blocks() {
    let (_dir, mut store) = store();
    let policy = CapturePolicy {
        mode: EventSyncMode::OptOut,
        local_only_types: ["Local".to_string()].into(),
        team: None,
        blocked_reason: Some(BlockedReason::OptOut),
    };
    let input = format!(
        "{{\"event_id\":\"{ID_A}\",\"event_type\":\"Local\"}}\n{{\"event_id\":\"01KVYWRGJEV7CEZW6J7GXEBN17\",\"event_type\":\"Shared\"}}\n"
    );
    let report = Journal::new(&mut store, policy)
        .import(&mut Cursor::new(input.as_bytes()), &ImportOptions::default(), &mut |_| {})
        .unwrap();
    assert_eq!((report.captured, report.dropped), (1, 1));
    assert_eq!(column(&store, "01KVYWRGJEV7CEZW6J7GXEBN17", "drain_blocked_reason").as_deref(), Some("opt_out"));
}

#[test]
fn a_store_failure_aborts_the_import_instead_of_becoming_a_line_error() {
    let (_dir, mut store) = store();
    // Make every journal insert fail inside SQLite (a stand-in for disk full or I/O errors).
    // A trigger in the schema, so the store's own connection meets it too.
    raw(&store)
        .execute_batch(
            "CREATE TRIGGER fail_inserts BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;",
        )
        .unwrap();
    let input = format!("{{\"event_id\":\"{ID_A}\",\"event_type\":\"A\"}}\n");
    let err = import(&mut store, input.as_bytes(), &skip_invalid()).unwrap_err();
    assert_eq!(err.exit_code(), 1, "a store failure is exit 1, never a skipped line: {err}");
    raw(&store).execute_batch("DROP TRIGGER fail_inserts;").unwrap();
    assert!(rows(&store).is_empty());
    // The connection is still usable afterwards.
    assert_eq!(import(&mut store, input.as_bytes(), &skip_invalid()).unwrap().captured, 1);
}

#[test]
fn import_progress_reports_lines_and_bytes() {
    let (_dir, mut store) = store();
    let input: String =
        (0..5000).map(|i| format!("{{\"event_id\":\"{}\",\"event_type\":\"T\"}}\n", ulid_for(i))).collect();
    let mut last = None;
    Journal::new(&mut store, CapturePolicy::default())
        .import(&mut Cursor::new(input.as_bytes()), &ImportOptions::default(), &mut |p| last = Some(p))
        .unwrap();
    let last = last.unwrap();
    assert_eq!((last.lines, last.bytes), (5000, input.len() as u64));
}

// ---------------------------------------------------------------------------------------------
// Property tests

fn ulid_for(n: usize) -> String {
    format!("01KPRPTEST{n:016}")
}

/// How a line is written: producers differ (Rust compact, Python `json.dumps` with spaces and
/// `\u` escapes, arbitrary key order).
#[derive(Debug, Clone, Copy)]
struct Style {
    spaces: bool,
    ascii_only: bool,
    reverse_keys: bool,
}

fn write_string(s: &str, ascii_only: bool, out: &mut String) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ascii_only && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_json(value: &Value, style: Style, out: &mut String) {
    let (colon, comma) = if style.spaces { (": ", ", ") } else { (":", ",") };
    match value {
        Value::Object(map) => {
            out.push('{');
            let mut entries: Vec<_> = map.iter().collect();
            if style.reverse_keys {
                entries.reverse();
            }
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(comma);
                }
                write_string(k, style.ascii_only, out);
                out.push_str(colon);
                write_json(v, style, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(comma);
                }
                write_json(v, style, out);
            }
            out.push(']');
        }
        Value::String(s) => write_string(s, style.ascii_only, out),
        other => out.push_str(&other.to_string()),
    }
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1.0e9f64..1.0e9).prop_map(|f| json!(f)),
        "\\PC{0,12}".prop_map(Value::String),
        prop::sample::select(vec!["café", "日本語", "🐱 emoji", "quote \" back\\slash", "tab\tnew\nline", ""])
            .prop_map(|s| Value::String(s.to_string())),
    ]
}

fn json_payload() -> impl Strategy<Value = Value> {
    let value = json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    prop::collection::btree_map("[a-zé_]{1,8}", value, 0..5).prop_map(|m| Value::Object(m.into_iter().collect()))
}

fn style() -> impl Strategy<Value = Style> {
    (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(spaces, ascii_only, reverse_keys)| Style {
        spaces,
        ascii_only,
        reverse_keys,
    })
}

/// A base event: its payload and whether its lines carry `event_type`.
type Base = (Value, bool);
/// A line: which base event, whether its content is altered (a conflicting duplicate), how it
/// is written, whether it ends with CRLF, whether a blank line follows.
type LineSpec = (usize, bool, Style, bool, bool);

fn scenario() -> impl Strategy<Value = (Vec<Base>, Vec<LineSpec>)> {
    prop::collection::vec((json_payload(), any::<bool>()), 1..6).prop_flat_map(|bases| {
        let n = bases.len();
        let line = (0..n, prop::bool::weighted(0.2), style(), any::<bool>(), prop::bool::weighted(0.1));
        (Just(bases), prop::collection::vec(line, 1..25))
    })
}

/// The envelope object of line `index` (the value the journal should consider).
fn line_value(bases: &[Base], (base, altered, ..): &LineSpec, index: usize) -> Value {
    let (payload, typed) = &bases[*base];
    let mut object = serde_json::Map::new();
    object.insert("event_id".into(), json!(ulid_for(*base)));
    if *typed {
        object.insert("event_type".into(), json!("Typed"));
    }
    object.insert("payload".into(), payload.clone());
    if *altered {
        object.insert("altered_at_line".into(), json!(index));
    }
    Value::Object(object)
}

struct Expected {
    input: Vec<u8>,
    /// Stored bytes per event id, from the first line that carried it.
    stored: HashMap<String, Vec<u8>>,
    captured: u64,
    already_present: u64,
    /// 1-based line numbers of conflicting duplicates.
    conflicts: Vec<u64>,
}

fn expected(bases: &[Base], lines: &[LineSpec]) -> Expected {
    let mut input = Vec::new();
    let mut line_no = 0u64;
    let mut first: HashMap<String, Value> = HashMap::new();
    let mut exp =
        Expected { input: Vec::new(), stored: HashMap::new(), captured: 0, already_present: 0, conflicts: vec![] };
    for (index, spec) in lines.iter().enumerate() {
        let value = line_value(bases, spec, index);
        let mut text = String::new();
        write_json(&value, spec.2, &mut text);
        line_no += 1;
        let id = value["event_id"].as_str().unwrap().to_string();
        // What the journal stores: the line, plus the default type when it had none.
        let mut effective = value.clone();
        let bytes = if value.get("event_type").is_some() {
            text.clone().into_bytes()
        } else {
            effective.as_object_mut().unwrap().insert("event_type".into(), json!("Default"));
            format!("{{\"event_type\":\"Default\",{}", &text[1..]).into_bytes()
        };
        match first.get(&id) {
            None => {
                first.insert(id.clone(), effective);
                exp.stored.insert(id, bytes);
                exp.captured += 1;
            }
            Some(existing) if *existing == effective => exp.already_present += 1,
            Some(_) => exp.conflicts.push(line_no),
        }
        input.extend_from_slice(text.as_bytes());
        input.extend_from_slice(if spec.3 { b"\r\n" } else { b"\n" });
        if spec.4 {
            input.extend_from_slice(b"   \n");
            line_no += 1;
        }
    }
    exp.input = input;
    exp
}

fn options(skip: bool) -> ImportOptions {
    ImportOptions { default_type: Some("Default".into()), skip_invalid: skip }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// With `--skip-invalid`: every valid line is captured or already present (none lost), the
    /// stored bytes are the first line's bytes unchanged, conflicts are reported by line, and
    /// importing the same input again changes nothing.
    #[test]
    fn import_keeps_bytes_loses_nothing_and_is_idempotent((bases, lines) in scenario()) {
        let exp = expected(&bases, &lines);
        let (_dir, mut store) = store();
        let report = import(&mut store, &exp.input, &options(true)).unwrap();
        prop_assert!(report.committed);
        prop_assert_eq!(report.captured, exp.captured);
        prop_assert_eq!(report.already_present, exp.already_present);
        let invalid: Vec<u64> = report.invalid.iter().map(|l| l.line).collect();
        prop_assert_eq!(&invalid, &exp.conflicts);
        prop_assert!(report.invalid.iter().all(|l| l.error.contains("conflicting event_id")));
        prop_assert_eq!(report.captured + report.already_present + report.invalid.len() as u64, lines.len() as u64);

        let stored = rows(&store);
        prop_assert_eq!(stored.len(), exp.stored.len());
        for (id, bytes) in &stored {
            prop_assert_eq!(Some(bytes), exp.stored.get(id), "stored bytes of {}", id);
        }

        let again = import(&mut store, &exp.input, &options(true)).unwrap();
        prop_assert_eq!(again.captured, 0);
        prop_assert_eq!(again.already_present, exp.captured + exp.already_present);
        prop_assert_eq!(again.invalid, report.invalid);
        prop_assert_eq!(rows(&store), stored);
    }

    /// Without `--skip-invalid`: a conflicting duplicate anywhere leaves the journal exactly as
    /// it was; otherwise the outcome equals the skip-invalid one.
    #[test]
    fn all_or_nothing_import_commits_everything_or_nothing((bases, lines) in scenario()) {
        let exp = expected(&bases, &lines);
        let (_dir, mut store) = store();
        Journal::new(&mut store, CapturePolicy::default()).append(event("Before")).unwrap();
        let before = rows(&store);
        let report = import(&mut store, &exp.input, &options(false)).unwrap();
        if exp.conflicts.is_empty() {
            prop_assert!(report.committed);
            prop_assert_eq!(report.captured, exp.captured);
            prop_assert_eq!(rows(&store).len(), before.len() + exp.stored.len());
        } else {
            prop_assert!(!report.committed);
            prop_assert_eq!((report.captured, report.already_present), (0, 0));
            prop_assert_eq!(rows(&store), before);
        }
    }

    /// Arbitrary bytes never panic the importer and never half-write: either the report says
    /// what was captured or the journal is unchanged.
    #[test]
    fn arbitrary_input_never_panics(input in prop::collection::vec(any::<u8>(), 0..400)) {
        let (_dir, mut store) = store();
        let report = import(&mut store, &input, &ImportOptions::default()).unwrap();
        prop_assert_eq!(rows(&store).len() as u64, if report.committed { report.captured } else { 0 });
    }
}
