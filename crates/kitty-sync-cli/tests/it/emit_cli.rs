//! `kitty-sync emit` from the outside: the real binary, a temporary home, and the store read
//! back read-only. Contract §5 and §7 (`emit`), issue 2 ("Capture", "Bad input").

use crate::capture_support;

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use capture_support::*;
use serde_json::{Value, json};

const ID_A: &str = "01KVYWRGJEV7CEZW6J7GXEBN16";

fn emit_json(home: &Path, args: &[&str]) -> Value {
    json_ok(ks(home).arg("emit").args(args).arg("--json"))
}

/// Emits one event and returns its id (the only stdout line).
fn emit_id(home: &Path, args: &[&str]) -> String {
    let output = ks(home).arg("emit").args(args).output().expect("run");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let out = stdout(&output);
    let id = out.trim().to_string();
    assert_eq!(out.lines().count(), 1, "one line: {out:?}");
    assert!(is_ulid(&id), "{id:?} is not a ULID");
    id
}

fn import_json(home: &Path, file: &Path, extra: &[&str]) -> Value {
    json_ok(ks(home).arg("emit").arg("--jsonl").arg(file).args(extra).arg("--json"))
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

/// What the store must hold for a real fixture line: the line itself, or, when it had no
/// `event_type`, exactly `"event_type":"WPStatusChanged",` inserted after the `{`.
fn expected_bytes(line: &[u8]) -> Vec<u8> {
    let value: Value = serde_json::from_slice(line).expect("fixture line is JSON");
    if value.get("event_type").is_some() {
        return line.to_vec();
    }
    assert_eq!(line[0], b'{');
    let mut out = b"{\"event_type\":\"WPStatusChanged\",".to_vec();
    out.extend_from_slice(&line[1..]);
    out
}

// ---------------------------------------------------------------------------------------------
// One event

#[test]
fn single_emit_prints_a_ulid_and_journals_the_envelope() {
    let home = tempfile::tempdir().unwrap();
    let before = jiff_now_ms();
    let id = emit_id(
        home.path(),
        &[
            "--type",
            "WPStatusChanged",
            "--aggregate-id",
            "WP01",
            "--aggregate-type",
            "WorkPackage",
            "--payload",
            r#"{"to_lane":"done","note":"café ☕","nested":{"n":null}}"#,
        ],
    );
    let after = jiff_now_ms();
    let envelope = stored_json(home.path(), &id);
    assert_eq!(envelope["event_id"], id.as_str());
    assert_eq!(envelope["event_type"], "WPStatusChanged");
    assert_eq!(envelope["aggregate_id"], "WP01");
    assert_eq!(envelope["aggregate_type"], "WorkPackage");
    assert_eq!(envelope["payload"], json!({"to_lane": "done", "note": "café ☕", "nested": {"n": null}}));
    assert_eq!(envelope["team_slug"], "local", "no credentials: team is \"local\"");
    assert_eq!(envelope["project_uuid"], Value::Null);
    let node = envelope["node_id"].as_str().unwrap();
    assert!(node.len() == 12 && node.bytes().all(|b| b.is_ascii_hexdigit()), "{node}");
    assert_eq!(envelope["lamport_clock"], 1, "the first event of a home");
    let timestamp = envelope["timestamp"].as_str().unwrap();
    assert!(timestamp.ends_with('Z'), "UTC: {timestamp}");
    let ms = rfc3339_ms(timestamp);
    assert!(before - 1000 <= ms && ms <= after + 1000, "{timestamp} is not the capture time");
}

#[test]
fn payload_defaults_to_empty_object_and_optional_fields_are_kept() {
    let home = tempfile::tempdir().unwrap();
    let id = emit_id(
        home.path(),
        &[
            "--type",
            "MissionCreated",
            "--project-uuid",
            "6f1c2b7e-3a52-4c1e-9d2f-0b8f5a1e2c3d",
            "--occurred-at",
            "2026-01-02T03:04:05.250+01:00",
        ],
    );
    let envelope = stored_json(home.path(), &id);
    assert_eq!(envelope["payload"], json!({}));
    assert_eq!(envelope["project_uuid"], "6f1c2b7e-3a52-4c1e-9d2f-0b8f5a1e2c3d");
    let timestamp = envelope["timestamp"].as_str().unwrap();
    assert!(timestamp.starts_with("2026-01-02T02:04:05.25") && timestamp.ends_with('Z'), "{timestamp}");
}

#[test]
fn node_id_is_stable_per_home_and_lamport_clock_strictly_increases() {
    let home = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let mut clocks = Vec::new();
    let mut nodes = Vec::new();
    for i in 0..4 {
        let id = emit_id(home.path(), &["--type", "T", "--payload", &format!("{{\"i\":{i}}}")]);
        let envelope = stored_json(home.path(), &id);
        clocks.push(envelope["lamport_clock"].as_i64().unwrap());
        nodes.push(envelope["node_id"].as_str().unwrap().to_string());
    }
    assert!(clocks.windows(2).all(|w| w[0] < w[1]), "{clocks:?}");
    assert!(nodes.iter().all(|n| *n == nodes[0]), "{nodes:?}");
    // An imported event carrying a higher clock pushes the home's clock past it (Lamport).
    let file = home.path().join("in.jsonl");
    std::fs::write(&file, format!("{{\"event_id\":\"{ID_A}\",\"event_type\":\"X\",\"lamport_clock\":500}}\n")).unwrap();
    import_json(home.path(), &file, &[]);
    let id = emit_id(home.path(), &["--type", "T"]);
    assert!(stored_json(home.path(), &id)["lamport_clock"].as_i64().unwrap() > 500);
    let elsewhere = emit_id(other.path(), &["--type", "T"]);
    assert_ne!(stored_json(other.path(), &elsewhere)["node_id"], nodes[0].as_str(), "another home, another node");
}

#[test]
fn team_slug_comes_from_credentials() {
    let home = tempfile::tempdir().unwrap();
    write_credentials(home.path(), "[user]\nusername = \"alice@example.com\"\nteam_slug = \"team-alpha\"\n");
    let id = emit_id(home.path(), &["--type", "T"]);
    assert_eq!(stored_json(home.path(), &id)["team_slug"], "team-alpha");
}

#[test]
fn emit_json_has_the_contract_shape() {
    let home = tempfile::tempdir().unwrap();
    let doc = emit_json(home.path(), &["--type", "T", "--event-id", ID_A]);
    insta::assert_json_snapshot!(doc, @r#"
    {
      "already_present": 0,
      "captured": 1,
      "coalesced": 0,
      "dropped": 0,
      "event_ids": [
        "01KVYWRGJEV7CEZW6J7GXEBN16"
      ],
      "invalid": []
    }
    "#);
}

#[test]
fn payload_file_is_read() {
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join("payload.json");
    std::fs::write(&file, "{\n  \"big\": \"ünïcödé\",\n  \"list\": [1, 2.5, null]\n}\n").unwrap();
    let id = emit_id(home.path(), &["--type", "T", "--payload-file", file.to_str().unwrap()]);
    assert_eq!(stored_json(home.path(), &id)["payload"], json!({"big": "ünïcödé", "list": [1, 2.5, null]}));
}

// ---------------------------------------------------------------------------------------------
// Idempotency and conflicts

#[test]
fn same_event_id_twice_is_already_present() {
    let home = tempfile::tempdir().unwrap();
    let args = ["--type", "T", "--event-id", ID_A, "--payload", r#"{"a":1,"b":[1,2]}"#];
    assert_eq!(emit_json(home.path(), &args)["captured"], 1);
    let bytes = stored(home.path(), ID_A).unwrap();
    // The same command again, and the same payload with other key order and whitespace.
    let again = emit_json(home.path(), &args);
    assert_eq!((again["captured"].as_u64(), again["already_present"].as_u64()), (Some(0), Some(1)));
    assert_eq!(again["event_ids"], json!([ID_A]));
    let reordered =
        emit_json(home.path(), &["--type", "T", "--event-id", ID_A, "--payload", r#"{ "b": [1, 2], "a": 1 }"#]);
    assert_eq!(reordered["already_present"], 1);
    // Human mode still prints the id (scripts rely on it) and exits 0.
    assert_eq!(emit_id(home.path(), &args), ID_A);
    assert_eq!(event_count(home.path()), 1);
    assert_eq!(stored(home.path(), ID_A).unwrap(), bytes, "stored bytes never change");
}

#[test]
fn same_event_id_with_other_content_is_a_conflict() {
    let home = tempfile::tempdir().unwrap();
    emit_json(home.path(), &["--type", "T", "--event-id", ID_A, "--payload", r#"{"a":1}"#]);
    let bytes = stored(home.path(), ID_A).unwrap();
    for args in [
        vec!["--type", "T", "--event-id", ID_A, "--payload", r#"{"a":2}"#],
        vec!["--type", "Other", "--event-id", ID_A, "--payload", r#"{"a":1}"#],
        vec!["--type", "T", "--event-id", ID_A, "--payload", r#"{"a":1}"#, "--aggregate-id", "X"],
    ] {
        expect_error(ks(home.path()).arg("emit").args(&args), 2, &["conflicting event_id", ID_A]);
    }
    assert_eq!(stored(home.path(), ID_A).unwrap(), bytes, "stored bytes never change");
    assert_eq!(event_count(home.path()), 1);
}

// ---------------------------------------------------------------------------------------------
// Bad single-event input: exit 2, error + hint, nothing journaled

#[test]
fn bad_single_event_input_is_a_usage_error() {
    let home = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--type", "T", "--payload", "{not json"], "--payload"),
        (&["--type", "T", "--payload", "[1,2]"], "json object"),
        (&["--type", "T", "--payload", "\"text\""], "json object"),
        (&["--type", "T", "--payload", "null"], "json object"),
        (&["--type", "T", "--occurred-at", "yesterday"], "--occurred-at"),
        (&["--type", "T", "--occurred-at", "2026-01-02T03:04:05"], "--occurred-at"),
        (&["--type", "T", "--event-id", "nope"], "nope"),
        (&["--type", "T", "--event-id", "01kvywrgjev7cezw6j7gxebn16"], "ulid"),
        (&["--type", "T", "--event-id", "01KVYWRGJEV7CEZW6J7GXEBN1U"], "ulid"),
        (&["--type", "T", "--event-id", "81KVYWRGJEV7CEZW6J7GXEBN16"], "ulid"),
        (&["--type", ""], "type"),
        (&["--type", "T", "--payload-file", "/nonexistent/payload.json"], "payload"),
    ];
    for (args, needle) in cases {
        expect_error(ks(home.path()).arg("emit").args(*args), 2, &[needle]);
    }
    let payload_dir = home.path().join("a-directory");
    std::fs::create_dir(&payload_dir).unwrap();
    expect_error(
        ks(home.path()).arg("emit").args(["--type", "T", "--payload-file"]).arg(&payload_dir),
        2,
        &["payload"],
    );
    assert_eq!(event_count(home.path()), 0);
}

#[test]
fn usage_errors_from_the_parser_are_exit_2() {
    let home = tempfile::tempdir().unwrap();
    let cases: &[&[&str]] = &[
        &[],
        &["--payload", "{}"],
        &["--type", "T", "--jsonl", "x.jsonl"],
        &["--type", "T", "--payload", "{}", "--payload-file", "p.json"],
        &["--type", "T", "--default-type", "X"],
        &["--type", "T", "--skip-invalid"],
        &["--jsonl", "-", "--event-id", ID_A],
        &["--jsonl", "-", "--coalesce-key", "k"],
        &["--jsonl", "-", "--local-only"],
    ];
    for args in cases {
        let output = ks(home.path()).arg("emit").args(*args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", stderr(&output));
    }
    assert!(!home.path().join("event-sync").exists());
}

// ---------------------------------------------------------------------------------------------
// Bulk import: the real event logs

#[test]
fn real_event_logs_import_byte_for_byte_and_reimport_is_a_no_op() {
    let home = tempfile::tempdir().unwrap();
    let files = real_event_files();
    let mut captured = 0;
    for file in &files {
        let doc = import_json(home.path(), file, &["--default-type", "WPStatusChanged"]);
        assert_eq!(doc["invalid"], json!([]), "{}", file.display());
        assert_eq!(doc["already_present"], 0);
        assert!(doc.get("event_ids").is_none(), "event_ids only for a single event: {doc}");
        captured += doc["captured"].as_u64().unwrap();
    }
    assert_eq!(captured, 953);
    assert_eq!(event_count(home.path()), 953);

    // Every line is stored as given (plus the default type where it was missing), in order.
    let stored_rows = all_envelopes(home.path());
    let mut rows = stored_rows.iter();
    let (mut with_type, mut without_type) = (0, 0);
    for file in &files {
        for line in std::fs::read(file).unwrap().split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let (id, bytes) = rows.next().expect("one row per line");
            let value: Value = serde_json::from_slice(line).unwrap();
            assert_eq!(value["event_id"], id.as_str());
            assert_eq!(*bytes, expected_bytes(line), "stored bytes of {id}");
            if value.get("event_type").is_some() { with_type += 1 } else { without_type += 1 }
        }
    }
    assert!(with_type > 0 && without_type > with_type, "{with_type} typed, {without_type} untyped");

    // Re-import: every event already present, nothing changes.
    for file in &files {
        let doc = import_json(home.path(), file, &["--default-type", "WPStatusChanged"]);
        assert_eq!(doc["captured"], 0);
        assert_eq!(doc["invalid"], json!([]));
        assert!(doc["already_present"].as_u64().unwrap() > 0);
    }
    assert_eq!(all_envelopes(home.path()), stored_rows);

    // Human summary.
    let output =
        ks(home.path()).args(["emit", "--default-type", "WPStatusChanged", "--jsonl"]).arg(&files[0]).output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert!(stdout(&output).contains("Captured 0, already present 512"), "{}", stdout(&output));
}

#[test]
fn lines_without_event_type_need_default_type() {
    let home = tempfile::tempdir().unwrap();
    let file = &real_event_files()[1];
    let output = ks(home.path()).args(["emit", "--json", "--jsonl"]).arg(file).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let doc = parse_json(&output);
    assert_eq!(doc["captured"], 0, "all or nothing: nothing counted as captured");
    let invalid = doc["invalid"].as_array().unwrap();
    assert!(!invalid.is_empty());
    assert!(invalid.iter().all(|i| i["error"].as_str().unwrap().contains("missing event_type")), "{invalid:?}");
    assert!(stderr(&output).contains("hint: "));
    assert_eq!(event_count(home.path()), 0);
}

#[test]
fn gzip_input_from_a_file_and_from_stdin() {
    let home = tempfile::tempdir().unwrap();
    let files = real_event_files();
    let gz = home.path().join("events.jsonl.gz");
    let plain = std::fs::read(&files[1]).unwrap();
    std::fs::write(&gz, gzip(&plain)).unwrap();
    assert_eq!(import_json(home.path(), &gz, &["--default-type", "WPStatusChanged"])["captured"], 121);

    let other = std::fs::read(&files[2]).unwrap();
    let doc = json_ok(
        ks(home.path())
            .args(["emit", "--jsonl", "-", "--default-type", "WPStatusChanged", "--json"])
            .write_stdin(gzip(&other)),
    );
    assert_eq!(doc["captured"], 320);
    // Plain stdin too.
    let doc = json_ok(
        ks(home.path())
            .args(["emit", "--jsonl", "-", "--default-type", "WPStatusChanged", "--json"])
            .write_stdin(other.clone()),
    );
    assert_eq!(doc["already_present"], 320);

    for line in plain.split(|b| *b == b'\n').chain(other.split(|b| *b == b'\n')).filter(|l| !l.is_empty()) {
        let id = serde_json::from_slice::<Value>(line).unwrap()["event_id"].as_str().unwrap().to_string();
        assert_eq!(stored(home.path(), &id).unwrap(), expected_bytes(line));
    }
}

#[test]
fn truncated_gzip_is_exit_2_and_writes_nothing() {
    let home = tempfile::tempdir().unwrap();
    emit_id(home.path(), &["--type", "Before"]);
    let all: Vec<u8> = real_event_files().iter().flat_map(|f| std::fs::read(f).unwrap()).collect();
    let compressed = gzip(&all);
    let truncated = home.path().join("cut.jsonl.gz");
    std::fs::write(&truncated, &compressed[..compressed.len() * 2 / 3]).unwrap();
    for extra in [&[][..], &["--skip-invalid"][..]] {
        let mut cmd = ks(home.path());
        cmd.args(["emit", "--default-type", "WPStatusChanged", "--jsonl"]).arg(&truncated).args(extra);
        expect_error(&mut cmd, 2, &["gzip"]);
    }
    assert_eq!(event_count(home.path()), 1, "nothing of the truncated file was written");
}

#[test]
fn missing_or_unreadable_input_is_exit_2() {
    let home = tempfile::tempdir().unwrap();
    let not_a_dir = home.path().join("file");
    std::fs::write(&not_a_dir, "x").unwrap();
    for path in [home.path().join("missing.jsonl"), home.path().to_path_buf(), not_a_dir.join("below-a-file.jsonl")] {
        expect_error(ks(home.path()).arg("emit").arg("--jsonl").arg(&path), 2, &[path.to_str().unwrap()]);
    }
    assert!(!home.path().join("event-sync").exists(), "nothing was created for unreadable input");
}

// ---------------------------------------------------------------------------------------------
// Bulk import: messy input

/// One messy file: (line text, expected error substring, or None for a valid/blank line).
fn messy_lines() -> Vec<(String, Option<&'static str>)> {
    let a = test_ulid(1);
    let b = test_ulid(2);
    let c = test_ulid(3);
    let d = test_ulid(4);
    vec![
        (format!(r#"{{"event_id":"{a}","event_type":"A","payload":{{"x":1}}}}"#), None),
        (String::new(), None),
        ("not json".into(), Some("invalid json")),
        ("[1,2]".into(), Some("not a json object")),
        (r#"{"event_type":"A"}"#.into(), Some("missing event_id")),
        (r#"{"event_id":"not-a-ulid","event_type":"A"}"#.into(), Some("invalid event_id")),
        (r#"{"event_id":12345,"event_type":"A"}"#.into(), Some("invalid event_id")),
        (format!(r#"{{"event_id":"{b}"}}"#), Some("missing event_type")),
        (format!(r#"{{"event_id":"{b}","event_type":""}}"#), Some("event_type")),
        // The same event again, then with other key order and whitespace: already present.
        (format!(r#"{{"event_id":"{a}","event_type":"A","payload":{{"x":1}}}}"#), None),
        (format!(r#"{{ "payload": {{ "x": 1 }}, "event_type": "A", "event_id": "{a}" }}"#), None),
        // The same id with other content: a conflict.
        (format!(r#"{{"event_id":"{a}","event_type":"A","payload":{{"x":2}}}}"#), Some("conflicting event_id")),
        (format!("{{\"event_id\":\"{c}\",\"event_type\":\"CRLF\"}}\r"), None),
        ("   \t ".into(), None),
        (format!(r#"{{"event_id":"{d}","event_type":"Last"}}"#), None),
    ]
}

fn write_messy(dir: &Path) -> std::path::PathBuf {
    let lines: Vec<String> = messy_lines().into_iter().map(|(l, _)| l).collect();
    let path = dir.join("messy.jsonl");
    // No newline after the last line.
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn expected_invalid() -> Vec<(u64, &'static str)> {
    messy_lines().into_iter().enumerate().filter_map(|(i, (_, e))| e.map(|e| (i as u64 + 1, e))).collect()
}

fn check_invalid(doc: &Value) {
    let invalid = doc["invalid"].as_array().unwrap();
    let expected = expected_invalid();
    assert_eq!(invalid.len(), expected.len(), "{invalid:#?}");
    for (got, (line, needle)) in invalid.iter().zip(expected) {
        assert_eq!(got["line"], line, "{got}");
        assert!(got["error"].as_str().unwrap().to_lowercase().contains(needle), "line {line}: {got}");
    }
}

#[test]
fn messy_input_without_skip_invalid_writes_nothing() {
    let home = tempfile::tempdir().unwrap();
    emit_id(home.path(), &["--type", "Before"]);
    let before = all_envelopes(home.path());
    let file = write_messy(home.path());

    let output = ks(home.path()).args(["emit", "--json", "--jsonl"]).arg(&file).output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let doc = parse_json(&output);
    check_invalid(&doc);
    assert_eq!((doc["captured"].as_u64(), doc["already_present"].as_u64()), (Some(0), Some(0)));
    let err = stderr(&output);
    assert!(err.contains("error: ") && err.contains("nothing was written") && err.contains("hint: "), "{err}");
    assert_eq!(all_envelopes(home.path()), before, "the journal is unchanged");

    // Human mode names every bad line by number.
    let output = ks(home.path()).args(["emit", "--jsonl"]).arg(&file).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    for (line, _) in expected_invalid() {
        assert!(err.contains(&format!("line {line}:")), "line {line} not named:\n{err}");
    }
    assert!(err.contains("--skip-invalid"), "the hint says how to proceed:\n{err}");
    assert_eq!(all_envelopes(home.path()), before);
}

#[test]
fn messy_input_with_skip_invalid_writes_the_valid_lines() {
    let home = tempfile::tempdir().unwrap();
    let file = write_messy(home.path());
    let doc = import_json(home.path(), &file, &["--skip-invalid"]);
    check_invalid(&doc);
    assert_eq!(doc["captured"], 3, "{doc}");
    assert_eq!(doc["already_present"], 2, "{doc}");
    assert_eq!(event_count(home.path()), 3);
    let lines = messy_lines();
    assert_eq!(stored(home.path(), &test_ulid(1)).unwrap(), lines[0].0.as_bytes(), "first bytes are kept");
    let crlf = stored(home.path(), &test_ulid(3)).unwrap();
    assert_eq!(crlf, lines[12].0.trim_end_matches('\r').as_bytes(), "line ending removed, nothing else");
    assert_eq!(stored(home.path(), &test_ulid(4)).unwrap(), lines[14].0.as_bytes());
    assert!(stored(home.path(), &test_ulid(2)).is_none());

    // Again: the valid ones are now all already present; the bad ones are still reported.
    let doc = import_json(home.path(), &file, &["--skip-invalid"]);
    check_invalid(&doc);
    assert_eq!((doc["captured"].as_u64(), doc["already_present"].as_u64()), (Some(0), Some(5)));
}

#[test]
fn conflicting_line_against_the_journal_keeps_the_stored_bytes() {
    let home = tempfile::tempdir().unwrap();
    emit_json(home.path(), &["--type", "T", "--event-id", ID_A, "--payload", r#"{"v":1}"#]);
    let bytes = stored(home.path(), ID_A).unwrap();
    let file = home.path().join("conflict.jsonl");
    std::fs::write(&file, format!("{{\"event_id\":\"{ID_A}\",\"event_type\":\"T\",\"payload\":{{\"v\":2}}}}\n"))
        .unwrap();
    let output = ks(home.path()).args(["emit", "--json", "--skip-invalid", "--jsonl"]).arg(&file).output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    let doc = parse_json(&output);
    assert_eq!(doc["invalid"][0]["line"], 1);
    assert!(doc["invalid"][0]["error"].as_str().unwrap().contains("conflicting event_id"));
    assert_eq!(stored(home.path(), ID_A).unwrap(), bytes);
}

#[test]
fn large_unicode_payloads_are_stored_byte_identical() {
    let home = tempfile::tempdir().unwrap();
    // ≈1 MB lines: raw multi-byte UTF-8, escaped \u sequences (Python's ensure_ascii style,
    // surrogate pairs included) and unusual spacing must all survive verbatim.
    let chunk = "héllo wörld — 日本語テキスト 🐱 ";
    let raw_text: String = chunk.repeat(1_000_000 / chunk.len());
    let escaped_text = "caf\\u00e9 \\ud83d\\ude00 ".repeat(40_000);
    let lines = [
        format!(
            r#"{{"event_id":"{}","event_type":"Big","payload":{{"text":"{raw_text}","n":[1,2.50,-0.0,1e3]}}}}"#,
            test_ulid(10)
        ),
        format!(r#"{{"event_type": "Big", "event_id": "{}", "payload": {{"text": "{escaped_text}"}}}}"#, test_ulid(11)),
    ];
    assert!(lines.iter().all(|l| l.len() > 900_000), "big lines");
    let file = home.path().join("big.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    assert_eq!(import_json(home.path(), &file, &[])["captured"], 2);
    assert_eq!(stored(home.path(), &test_ulid(10)).unwrap(), lines[0].as_bytes());
    assert_eq!(stored(home.path(), &test_ulid(11)).unwrap(), lines[1].as_bytes());
    // Re-import: already present (byte-identical and canonical comparison both hold).
    assert_eq!(import_json(home.path(), &file, &[])["already_present"], 2);
}

#[test]
fn empty_input_is_fine() {
    let home = tempfile::tempdir().unwrap();
    let doc = json_ok(ks(home.path()).args(["emit", "--jsonl", "-", "--json"]).write_stdin("\n\n"));
    assert_eq!((doc["captured"].as_u64(), doc["invalid"].as_array().map(Vec::len)), (Some(0), Some(0)));
}

// ---------------------------------------------------------------------------------------------
// Coalescing

#[test]
fn coalesce_key_supersedes_earlier_undelivered_events() {
    let home = tempfile::tempdir().unwrap();
    let first = emit_json(home.path(), &["--type", "Progress", "--coalesce-key", "wp01", "--payload", r#"{"p":1}"#]);
    assert_eq!(first["coalesced"], 0);
    let other_key = emit_id(home.path(), &["--type", "Progress", "--coalesce-key", "wp02"]);
    let no_key = emit_id(home.path(), &["--type", "Progress"]);
    let second = emit_json(home.path(), &["--type", "Progress", "--coalesce-key", "wp01", "--payload", r#"{"p":2}"#]);
    assert_eq!(second["coalesced"], 1);
    let third = emit_json(home.path(), &["--type", "Progress", "--coalesce-key", "wp01", "--payload", r#"{"p":3}"#]);
    assert_eq!(third["coalesced"], 1, "the first was already superseded");

    let id = |doc: &Value| doc["event_ids"][0].as_str().unwrap().to_string();
    let inspect = |event_id: &str| json_ok(ks(home.path()).args(["inspect", event_id, "--json"]));
    assert_eq!(inspect(&id(&first))["coalesced_into"], id(&second).as_str());
    assert_eq!(inspect(&id(&second))["coalesced_into"], id(&third).as_str());
    assert_eq!(inspect(&id(&third))["coalesced_into"], Value::Null);
    assert_eq!(inspect(&id(&third))["coalesce_key"], "wp01");
    assert_eq!(inspect(&other_key)["coalesced_into"], Value::Null);
    assert_eq!(inspect(&no_key)["coalesced_into"], Value::Null);
    // Superseded events keep their bytes: coalescing never modifies a payload.
    assert_eq!(stored_json(home.path(), &id(&first))["payload"], json!({"p": 1}));
    assert_eq!(event_count(home.path()), 5);

    let human = ks(home.path()).args(["inspect", &id(&first)]).output().unwrap();
    assert!(stdout(&human).contains(&id(&second)), "{}", stdout(&human));
}

// ---------------------------------------------------------------------------------------------
// Modes and gates at capture

#[test]
fn opt_out_drops_local_only_types_and_journals_the_rest_blocked() {
    let home = tempfile::tempdir().unwrap();
    write_config(home.path(), "[event_sync]\nmode = \"opt_out\"\nlocal_only_types = [\"LocalNote\", \"Heartbeat\"]\n");
    let dropped = emit_json(home.path(), &["--type", "LocalNote"]);
    assert_eq!((dropped["dropped"].as_u64(), dropped["captured"].as_u64()), (Some(1), Some(0)));
    let flagged = emit_json(home.path(), &["--type", "Shared", "--local-only"]);
    assert_eq!(flagged["dropped"], 1);
    assert_eq!(event_count(home.path()), 0, "dropped events are not journaled");

    let kept = emit_id(home.path(), &["--type", "Shared"]);
    assert_eq!(event_column(home.path(), &kept, "drain_blocked_reason").as_deref(), Some("opt_out"));

    let file = home.path().join("mixed.jsonl");
    std::fs::write(
        &file,
        format!(
            "{{\"event_id\":\"{}\",\"event_type\":\"Heartbeat\"}}\n{{\"event_id\":\"{}\",\"event_type\":\"Shared\"}}\n{{\"event_id\":\"{}\",\"event_type\":\"LocalNote\"}}\n",
            test_ulid(1),
            test_ulid(2),
            test_ulid(3)
        ),
    )
    .unwrap();
    let doc = import_json(home.path(), &file, &[]);
    assert_eq!((doc["captured"].as_u64(), doc["dropped"].as_u64()), (Some(1), Some(2)));
    assert_eq!(event_count(home.path()), 2);
    assert_eq!(event_column(home.path(), &test_ulid(2), "drain_blocked_reason").as_deref(), Some("opt_out"));
    let counts: Vec<(String, i64)> = db(home.path())
        .prepare("SELECT event_type, count FROM dropped_events ORDER BY event_type")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(counts, vec![("Heartbeat".into(), 1), ("LocalNote".into(), 2), ("Shared".into(), 1)]);
}

#[test]
fn local_only_outside_opt_out_is_journaled() {
    let home = tempfile::tempdir().unwrap();
    write_config(home.path(), "[event_sync]\nmode = \"local_retention\"\nlocal_only_types = [\"LocalNote\"]\n");
    let id = emit_id(home.path(), &["--type", "LocalNote", "--local-only"]);
    assert!(stored(home.path(), &id).is_some());
    assert_eq!(event_column(home.path(), &id, "drain_blocked_reason"), None);
}

fn blocked_reason(home: &Path, saas_env: Option<&str>) -> Option<String> {
    let mut cmd = ks(home);
    if let Some(value) = saas_env {
        cmd.env("SPEC_KITTY_ENABLE_SAAS_SYNC", value);
    }
    let output = cmd.args(["emit", "--type", "T"]).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    event_column(home, stdout(&output).trim(), "drain_blocked_reason")
}

#[test]
fn teamspace_capture_records_the_first_failing_gate() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    // Gate 1: sync disabled (whatever else is wrong).
    assert_eq!(blocked_reason(h, None).as_deref(), Some("saas_disabled"));
    assert_eq!(blocked_reason(h, Some("0")).as_deref(), Some("saas_disabled"));
    // Gate 2: no usable token (even when the team is known).
    assert_eq!(blocked_reason(h, Some("1")).as_deref(), Some("missing_auth"));
    write_credentials(h, "[user]\nusername = \"alice@example.com\"\nteam_slug = \"team-alpha\"\n");
    assert_eq!(blocked_reason(h, Some("true")).as_deref(), Some("missing_auth"));
    write_credentials(
        h,
        "[tokens]\naccess = \"tok\"\naccess_expires_at = \"2000-01-01T00:00:00+00:00\"\n[user]\nusername = \"alice@example.com\"\nteam_slug = \"team-alpha\"\n",
    );
    assert_eq!(blocked_reason(h, Some("yes")).as_deref(), Some("missing_auth"), "expired, not refreshable");
    // Gate 3: token but no team.
    write_credentials(h, "[tokens]\naccess = \"tok\"\n[user]\nusername = \"alice@example.com\"\n");
    assert_eq!(blocked_reason(h, Some("ON")).as_deref(), Some("missing_team"));
    // All gates pass: no reason, and the envelope carries the team.
    write_credentials(
        h,
        "[tokens]\naccess = \"tok\"\n[user]\nusername = \"alice@example.com\"\nteam_slug = \"team-alpha\"\n",
    );
    assert_eq!(blocked_reason(h, Some("y")), None);
    // An expired access token with a usable refresh token is refreshable: not blocked.
    write_credentials(
        h,
        "[tokens]\naccess = \"tok\"\naccess_expires_at = \"2000-01-01T00:00:00+00:00\"\nrefresh = \"r\"\n[user]\nusername = \"alice@example.com\"\nteam_slug = \"team-alpha\"\n",
    );
    assert_eq!(blocked_reason(h, Some("1")), None);
}

#[test]
fn external_receiver_and_local_retention_capture_unblocked() {
    for config in [
        "[event_sync]\nmode = \"external_receiver\"\nexternal_endpoint = \"http://127.0.0.1:9/api/v1/events/batch/\"\n",
        "[event_sync]\nmode = \"local-retention\"\n",
    ] {
        let home = tempfile::tempdir().unwrap();
        write_config(home.path(), config);
        assert_eq!(blocked_reason(home.path(), None), None, "{config}");
    }
}

#[test]
fn capture_is_not_stopped_by_missing_credentials_or_unreadable_credentials() {
    let home = tempfile::tempdir().unwrap();
    write_credentials(home.path(), "[tokens\naccess = \"sekrit-token\"\n");
    let output =
        ks(home.path()).env("SPEC_KITTY_ENABLE_SAAS_SYNC", "1").args(["emit", "--type", "T"]).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(!stderr(&output).contains("sekrit-token") && !stdout(&output).contains("sekrit-token"));
    assert_eq!(event_count(home.path()), 1);
}

// ---------------------------------------------------------------------------------------------
// Durability

#[test]
fn an_acknowledged_event_is_in_the_store_after_the_process_exits() {
    let home = tempfile::tempdir().unwrap();
    let id = emit_id(home.path(), &["--type", "Durable", "--payload", r#"{"k":"v"}"#]);
    // A fresh connection from another process's point of view (this test process).
    assert_eq!(stored_json(home.path(), &id)["payload"], json!({"k": "v"}));
}

#[test]
fn kill_9_during_a_bulk_import_leaves_nothing_or_everything() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let first = emit_id(h, &["--type", "Before"]);
    let lines = 30_000;
    let mut big = String::with_capacity(lines * 110);
    for i in 0..lines {
        big.push_str(&format!(
            "{{\"event_id\":\"{}\",\"event_type\":\"Bulk\",\"payload\":{{\"i\":{i},\"pad\":\"xxxxxxxxxxxxxxxxxxxx\"}}}}\n",
            test_ulid(i as u64 + 100)
        ));
    }
    let file = h.join("big.jsonl");
    std::fs::write(&file, big).unwrap();

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kitty-sync"))
        .arg("--home")
        .arg(h)
        .args(["emit", "--jsonl"])
        .arg(&file)
        .env_remove("SPEC_KITTY_HOME")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let _ = child.kill(); // SIGKILL on Unix
    let status = child.wait().unwrap();

    let count = event_count(h);
    assert!(count == 1 || count == 1 + lines as i64, "all or nothing, got {count} (status {status:?})");
    // The store is usable: a new capture works and earlier events are intact.
    let after = emit_id(h, &["--type", "After"]);
    assert!(stored(h, &first).is_some() && stored(h, &after).is_some());
    let doc = import_json(h, &file, &["--skip-invalid"]);
    assert_eq!(
        doc["captured"].as_u64().unwrap() + doc["already_present"].as_u64().unwrap(),
        lines as u64,
        "a re-run converges: {doc}"
    );
    assert_eq!(event_count(h), 2 + lines as i64);
}

// ---------------------------------------------------------------------------------------------

fn jiff_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Milliseconds since the epoch of an RFC 3339 UTC timestamp `YYYY-MM-DDTHH:MM:SS[.fff…]Z`.
fn rfc3339_ms(text: &str) -> i64 {
    let t = text.strip_suffix('Z').unwrap_or_else(|| panic!("not UTC: {text}"));
    let (date, time) = t.split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|p| p.parse().unwrap()).collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let h: Vec<i64> = hms.split(':').map(|p| p.parse().unwrap()).collect();
    let millis: i64 = format!("{frac:0<3}")[..3].parse().unwrap();
    // Days from civil (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 { (d[0] - 1, d[1] + 9) } else { (d[0], d[1] - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 24 + h[0]) * 60 + h[1]) * 60_000 + h[2] * 1000 + millis
}

#[test]
fn gzip_on_stdin_is_detected_when_the_first_byte_arrives_alone() {
    let home = tempfile::tempdir().unwrap();
    let line = format!("{{\"event_id\":\"{ID_A}\",\"event_type\":\"Slow\"}}\n");
    let compressed = gzip(line.as_bytes());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kitty-sync"))
        .arg("--home")
        .arg(home.path())
        .args(["emit", "--jsonl", "-", "--json"])
        .env_remove("SPEC_KITTY_HOME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&compressed[..1]).unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(150));
    stdin.write_all(&compressed[1..]).unwrap();
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(parse_json(&output)["captured"], 1);
    assert_eq!(stored(home.path(), ID_A).unwrap(), line.trim_end().as_bytes());
}

#[test]
fn project_uuid_must_be_a_uuid() {
    let home = tempfile::tempdir().unwrap();
    let bad = ks(home.path()).args(["emit", "--type", "A", "--project-uuid", "not-a-uuid"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("hint:"));
    assert!(!home.path().join("event-sync/kitty-sync.db").exists(), "nothing is captured or created");
    let uuid = "8a4a7da6-a97c-4bb4-893a-b31664abfee4";
    let doc = emit_json(home.path(), &["--type", "A", "--project-uuid", uuid]);
    let id = doc["event_ids"][0].as_str().unwrap().to_string();
    let shown = json_ok(ks(home.path()).args(["inspect", &id, "--json"]));
    assert_eq!(shown["envelope"]["project_uuid"], uuid);
}
