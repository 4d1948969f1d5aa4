//! `kitty-sync inspect EVENT_ID` from the outside (§7): the stored envelope byte for byte, its
//! capture metadata, and read-only behaviour.

use crate::capture_support;

use std::path::Path;

use capture_support::*;
use serde_json::{Value, json};

fn inspect_json(home: &Path, id: &str) -> Value {
    json_ok(ks(home).args(["inspect", id, "--json"]))
}

#[test]
fn inspect_json_has_the_contract_keys_and_the_stored_envelope() {
    let home = tempfile::tempdir().unwrap();
    let output = ks(home.path())
        .args(["emit", "--type", "WPStatusChanged", "--payload", r#"{"to_lane":"done","txt":"naïve ☃"}"#])
        .args(["--coalesce-key", "wp01"])
        .output()
        .unwrap();
    let id = stdout(&output).trim().to_string();
    let doc = inspect_json(home.path(), &id);
    let mut keys: Vec<&str> = doc.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut expected = vec![
        "event_id",
        "event_type",
        "envelope",
        "payload_sha256",
        "payload_bytes",
        "captured_at",
        "coalesce_key",
        "coalesced_into",
        "drain_blocked_reason",
        "archived_at",
        "purged",
        "sources",
        "targets",
    ];
    expected.sort_unstable();
    assert_eq!(keys, expected);

    let bytes = stored(home.path(), &id).unwrap();
    assert_eq!(doc["event_id"], id.as_str());
    assert_eq!(doc["event_type"], "WPStatusChanged");
    assert_eq!(doc["envelope"], serde_json::from_slice::<Value>(&bytes).unwrap());
    assert_eq!(doc["envelope"]["payload"], json!({"to_lane": "done", "txt": "naïve ☃"}));
    assert_eq!(doc["payload_bytes"], bytes.len());
    let sha = doc["payload_sha256"].as_str().unwrap();
    assert!(sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{sha}");
    let captured_at = doc["captured_at"].as_str().unwrap();
    assert!(captured_at.starts_with("20") && captured_at.ends_with('Z'), "{captured_at}");
    assert_eq!(doc["coalesce_key"], "wp01");
    assert_eq!(doc["coalesced_into"], Value::Null);
    assert_eq!(doc["drain_blocked_reason"], "saas_disabled");
    assert_eq!(doc["archived_at"], Value::Null);
    assert_eq!(doc["purged"], false);
    assert_eq!(doc["sources"], json!([]));
    assert_eq!(doc["targets"], json!([]), "no delivery target known yet");
}

#[test]
fn inspect_shows_imported_bytes_verbatim() {
    let home = tempfile::tempdir().unwrap();
    // Python-style encoding: spaces after separators, \u escapes. inspect must not re-encode.
    let line =
        r#"{"event_id": "01KVYWRGJEV7CEZW6J7GXEBN16", "event_type": "X", "payload": {"t": "caf\u00e9", "n": 1.50}}"#;
    let file = home.path().join("one.jsonl");
    std::fs::write(&file, format!("{line}\n")).unwrap();
    json_ok(ks(home.path()).args(["emit", "--json", "--jsonl"]).arg(&file));
    let output = ks(home.path()).args(["inspect", "01KVYWRGJEV7CEZW6J7GXEBN16", "--json"]).output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert!(stdout(&output).contains(line), "the stored bytes appear as they are:\n{}", stdout(&output));
    let doc = parse_json(&output);
    assert_eq!(doc["payload_bytes"], line.len());
    assert_eq!(doc["drain_blocked_reason"], "saas_disabled");
}

#[test]
fn inspect_human_output() {
    let home = tempfile::tempdir().unwrap();
    write_config(home.path(), "[event_sync]\nmode = \"opt_out\"\n");
    let output = ks(home.path()).args(["emit", "--type", "Shared", "--payload", r#"{"k":"v"}"#]).output().unwrap();
    let id = stdout(&output).trim().to_string();
    let output = ks(home.path()).args(["inspect", &id]).output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    let text = stdout(&output);
    for needle in [id.as_str(), "Shared", "opt_out", "retained", "\"k\": \"v\""] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    assert!(stderr(&output).is_empty(), "{}", stderr(&output));
}

#[test]
fn unknown_or_invalid_ids_are_exit_2() {
    let home = tempfile::tempdir().unwrap();
    // No store at all yet.
    expect_error(ks(home.path()).args(["inspect", "01KVYWRGJEV7CEZW6J7GXEBN16"]), 2, &["01KVYWRGJEV7CEZW6J7GXEBN16"]);
    assert!(!home.path().join("event-sync").exists());
    ks(home.path()).args(["emit", "--type", "T"]).assert().success();
    expect_error(ks(home.path()).args(["inspect", "01KVYWRGJEV7CEZW6J7GXEBN16", "--json"]), 2, &["no event"]);
    for bad in ["nope", "01kvywrgjev7cezw6j7gxebn16", "01KVYWRGJEV7CEZW6J7GXEBN1"] {
        expect_error(ks(home.path()).args(["inspect", bad]), 2, &[bad]);
    }
}

#[test]
fn inspect_changes_nothing_in_an_existing_home() {
    let home = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        let output =
            ks(home.path()).args(["emit", "--type", "T", "--payload", &format!("{{\"i\":{i}}}")]).output().unwrap();
        ids.push(stdout(&output).trim().to_string());
    }
    let before = tree(home.path());
    for id in &ids {
        inspect_json(home.path(), id);
        ks(home.path()).args(["inspect", id]).assert().success();
    }
    let _ = ks(home.path()).args(["inspect", "01KVYWRGJEV7CEZW6J7GXEBN16"]).output().unwrap();
    assert_eq!(tree(home.path()), before);
}

#[test]
fn a_failing_command_under_json_still_prints_one_json_document() {
    let home = tempfile::tempdir().unwrap();
    let output = ks(home.path()).args(["inspect", "01KVYWRGJEV7CEZW6J7GXEBN16", "--json"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let doc: Value = serde_json::from_slice(&output.stdout).expect("exactly one JSON document on stdout");
    assert_eq!(doc["error"]["exit_code"], 2);
    assert!(doc["error"]["message"].as_str().unwrap().contains("01KVYWRGJEV7CEZW6J7GXEBN16"));
    assert!(!doc["error"]["hint"].as_str().unwrap().is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("error:") && stderr.contains("hint:"), "{stderr}");
}
