//! `kitty-sync target list|add|remove|enable|disable` (contract §9): named targets in
//! `config.toml`, edited with the operator's comments kept, and listed with ledger counts.

use serde_json::Value;

use crate::capture_support::tree;
use crate::common::{Home, Receiver, closed_endpoint};

const OPERATOR_CONFIG: &str = "# operator notes\n[sync]\nserver_url = \"https://teamspace.example.com\" # prod\n\n[event_sync]\nmode = \"local-retention\" # for now\n";

const ENTRY_KEYS: [&str; 14] = [
    "name",
    "enabled",
    "active",
    "kind",
    "target_id",
    "canonical_url",
    "types",
    "delivered_count",
    "undelivered_count",
    "parked_count",
    "rejected_count",
    "last_success_at",
    "last_failure_at",
    "last_error",
];

fn config(home: &Home) -> String {
    std::fs::read_to_string(home.path().join("config.toml")).unwrap()
}

fn targets(home: &Home) -> Vec<Value> {
    let run = home.run(&["target", "list", "--json"]).expect(0);
    let doc = run.json();
    assert_eq!(doc.as_object().unwrap().keys().collect::<Vec<_>>(), ["targets"]);
    let list = doc["targets"].as_array().unwrap().clone();
    for entry in &list {
        let keys: Vec<&str> = entry.as_object().unwrap().keys().map(String::as_str).collect();
        let mut expected = ENTRY_KEYS.to_vec();
        expected.sort();
        let mut keys_sorted = keys.clone();
        keys_sorted.sort();
        assert_eq!(keys_sorted, expected, "{entry:#}");
    }
    list
}

fn names(list: &[Value]) -> Vec<String> {
    list.iter().map(|t| t["name"].as_str().unwrap_or("null").to_string()).collect()
}

#[test]
fn add_enable_disable_remove_edit_config_keeping_comments() {
    let home = Home::new();
    std::fs::write(home.path().join("config.toml"), OPERATOR_CONFIG).unwrap();
    home.run(&["target", "add", "audit", "--endpoint", "http://127.0.0.1:9/api/v1/events/batch/", "--type", "A"])
        .expect(0);
    home.run(&[
        "target",
        "add",
        "archive-2",
        "--endpoint",
        "https://archive.example/in",
        "--token-env",
        "ARCHIVE_TOKEN",
    ])
    .expect(0);
    let text = config(&home);
    assert!(text.starts_with(OPERATOR_CONFIG), "{text}");
    assert!(text.contains("[[event_sync.targets]]\nname = \"audit\""), "{text}");

    home.run(&["target", "disable", "audit"]).expect(0);
    let list = targets(&home);
    assert_eq!(names(&list), ["archive-2", "audit"], "active first, then disabled");
    assert_eq!(list[0]["active"], true);
    assert_eq!(list[0]["types"], Value::Null);
    assert_eq!(list[1]["enabled"], false);
    assert_eq!(list[1]["active"], false);
    assert_eq!(list[1]["types"], serde_json::json!(["A"]));
    home.run(&["target", "enable", "audit"]).expect(0);
    assert_eq!(names(&targets(&home)), ["audit", "archive-2"], "config order");

    home.run(&["target", "remove", "audit"]).expect(0);
    home.run(&["target", "remove", "archive-2"]).expect(0);
    assert!(config(&home).starts_with(OPERATOR_CONFIG));
    assert!(!config(&home).contains("audit"));
    assert!(targets(&home).is_empty(), "local-retention delivers nowhere: no primary");
}

#[test]
fn invalid_and_duplicate_names_and_urls_are_usage_errors_leaving_the_file_alone() {
    let home = Home::new();
    std::fs::write(home.path().join("config.toml"), OPERATOR_CONFIG).unwrap();
    home.run(&["target", "add", "audit", "--endpoint", "https://a.example/x"]).expect(0);
    let before = config(&home);
    for (args, needle) in [
        (vec!["target", "add", "audit", "--endpoint", "https://b.example"], "already exists"),
        (vec!["target", "add", "other", "--endpoint", "HTTPS://A.EXAMPLE:443/x/"], "already the endpoint"),
        (vec!["target", "add", "Audit", "--endpoint", "https://b.example"], "invalid target name"),
        (vec!["target", "add", "primary", "--endpoint", "https://b.example"], "reserved"),
        (vec!["target", "add", "x", "--endpoint", "http://example.com/"], "loopback"),
        (vec!["target", "add", "x", "--endpoint", "not a url"], "invalid URL"),
        (vec!["target", "add", "x", "--endpoint", "https://b.example", "--token-env", "a token"], "token"),
        (vec!["target", "remove", "nope"], "no target named"),
        (vec!["target", "enable", "nope"], "no target named"),
    ] {
        let run = home.run(&args).expect(2);
        assert!(run.stderr.contains(needle) && run.stderr.contains("hint:"), "{args:?}: {}", run.stderr);
        assert_eq!(config(&home), before, "{args:?} changed config.toml");
    }
    let long = "a".repeat(33);
    home.run(&["target", "add", &long, "--endpoint", "https://b.example"]).expect(2);
}

#[test]
fn a_broken_entry_stops_target_commands_but_never_capture() {
    let home = Home::new();
    let broken = format!("{OPERATOR_CONFIG}\n[[event_sync.targets]]\nname = \"x\"\nendpoint = \"ftp://x\"\n");
    std::fs::write(home.path().join("config.toml"), &broken).unwrap();
    let run = home.run(&["target", "list"]).expect(2);
    assert!(run.stderr.contains("[[event_sync.targets]] entry 1") && run.stderr.contains("hint:"), "{}", run.stderr);
    home.emit("StillCaptured", "{}");
    home.run(&["target", "remove", "x"]).expect(0);
    assert_eq!(config(&home), OPERATOR_CONFIG);
}

#[test]
fn list_shows_primary_named_then_known_inactive_with_counts_and_creates_nothing() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let a = Receiver::start(&dir.path().join("a.db"), &[]);
    let b = Receiver::start(&dir.path().join("b.db"), &[]);
    home.external(&a.endpoint());
    home.capture(3, "A");
    home.capture(2, "B");
    home.now(&[]).0.expect(0);
    // A becomes an earlier primary; B is the primary now and has received nothing.
    home.external(&b.endpoint());
    let down = closed_endpoint();
    home.run(&["target", "add", "down", "--endpoint", &down, "--type", "B"]).expect(0);
    home.run(&["target", "add", "later", "--endpoint", "http://127.0.0.1:7/x", "--disabled"]).expect(0);

    let before = tree(home.path());
    let list = targets(&home);
    assert_eq!(tree(home.path()), before, "target list changed or created files");
    assert_eq!(names(&list), ["primary", "down", "later", "null"]);
    let (primary, down_entry, later, earlier) = (&list[0], &list[1], &list[2], &list[3]);
    assert_eq!(primary["canonical_url"], b.endpoint().trim_end_matches('/'));
    assert_eq!((primary["kind"].as_str(), primary["undelivered_count"].as_i64()), (Some("external"), Some(5)));
    assert_eq!(down_entry["undelivered_count"], 2, "only the target's types are undelivered for it");
    assert_eq!(later["active"], false);
    assert_eq!(earlier["canonical_url"], a.endpoint().trim_end_matches('/'));
    assert_eq!((earlier["active"].as_bool(), earlier["enabled"].as_bool()), (Some(false), Some(false)));
    assert_eq!((earlier["delivered_count"].as_i64(), earlier["undelivered_count"].as_i64()), (Some(5), Some(0)));
    assert!(earlier["last_success_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{earlier:#}");
    assert_eq!(earlier["target_id"], home.status()["delivery_targets"]["previous"][0]["target_id"]);

    // Re-adding A's URL as a named target continues where A was: same identity, same history.
    home.run(&["target", "add", "a-again", "--endpoint", &a.endpoint()]).expect(0);
    let list = targets(&home);
    assert_eq!(names(&list), ["primary", "down", "a-again", "later"]);
    assert_eq!((list[2]["delivered_count"].as_i64(), list[2]["undelivered_count"].as_i64()), (Some(5), Some(0)));
    assert_eq!(list[2]["target_id"], earlier["target_id"]);

    let human = home.run(&["target", "list"]).expect(0).stdout;
    assert!(human.contains("primary") && human.contains("a-again") && human.contains("undelivered 5"), "{human}");
}

#[test]
fn failures_show_when_and_why() {
    let home = Home::new();
    home.external(&closed_endpoint());
    home.emit("A", "{}");
    home.run(&["now", "--retries", "0", "--timeout", "2"]).expect(4);
    let list = targets(&home);
    assert_eq!(names(&list), ["primary"]);
    assert!(list[0]["last_failure_at"].as_str().is_some(), "{:#}", list[0]);
    assert!(list[0]["last_error"].as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(list[0]["last_success_at"], Value::Null);
    assert_eq!(list[0]["undelivered_count"], 1);
}
