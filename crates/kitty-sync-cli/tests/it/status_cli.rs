//! `kitty-sync status` from the outside: the real binary, states built by real drains against
//! real built-in receivers (child processes on 127.0.0.1:0), JSON numbers checked against what
//! was done, read-only behaviour, `--check` exit codes, and insta snapshots of the reports.

use crate::status_support;

use serde_json::{Value, json};
use status_support::{ReceiverProcess, TestHome, envelopes, event_id, is_root, keys, sorted, tree};

const TOP_KEYS: [&str; 12] = [
    "ok",
    "exit_code",
    "mode",
    "target_authority",
    "event_journal",
    "delivery_targets",
    "delivery_ledger",
    "migration_conflicts",
    "terminal_failures",
    "body_upload_compatibility",
    "legacy_queues",
    // §10: the daemon's last state, null when no daemon ever ran in the home.
    "daemon",
];

const TARGET_KEYS: [&str; 10] = [
    "target_id",
    "kind",
    "canonical_url",
    "team_slug",
    "user_email",
    "delivered_count",
    "undelivered_count",
    "first_seen_at",
    "last_seen_at",
    "deployment",
];

/// Exactly the contract's keys and fields (§7 `status`).
fn assert_shape(s: &Value) {
    assert_eq!(keys(s), sorted(&TOP_KEYS), "{s:#}");
    assert!(s["ok"].is_boolean() && s["exit_code"].is_u64() && s["mode"].is_string());
    let authority = keys(&s["target_authority"]);
    for key in [
        "configured_server_url",
        "env_server_url",
        "override_mode",
        "resolved_server_url",
        "user_id",
        "team_slug",
        "derived_queue_scope",
        "queue_db_path",
        "active_queue_scope_status",
        "warnings",
    ] {
        assert!(authority.contains(&key.to_string()), "target_authority lacks {key}: {authority:?}");
    }
    assert!(s["target_authority"]["warnings"].is_array());
    assert_eq!(
        keys(&s["event_journal"]),
        sorted(&[
            "retained_event_count",
            "archived_event_count",
            "purged_event_count",
            "coalesced_event_count",
            "dropped_event_count",
            "oldest_retained_event_at",
            "journal_size_bytes",
            "store_file_bytes",
            "drain_blocked",
            "gc_suggested",
            "gc_suggestion",
        ])
    );
    assert!(s["event_journal"]["drain_blocked"].is_object());
    match &s["event_journal"]["gc_suggestion"] {
        Value::Null => assert_eq!(s["event_journal"]["gc_suggested"], false),
        g => {
            assert_eq!(keys(g), sorted(&["reason", "retained_event_count", "journal_size_bytes"]));
            assert_eq!(s["event_journal"]["gc_suggested"], true);
        }
    }
    // `active` is contract §9 (the `target list` entries of the active targets).
    assert_eq!(keys(&s["delivery_targets"]), sorted(&["active", "current", "previous"]));
    if !s["delivery_targets"]["current"].is_null() {
        let current = keys(&s["delivery_targets"]["current"]);
        assert_eq!(
            current.iter().filter(|k| *k != "reset_detected").cloned().collect::<Vec<_>>(),
            sorted(&TARGET_KEYS)
        );
    }
    for previous in s["delivery_targets"]["previous"].as_array().unwrap() {
        let mut expected = TARGET_KEYS.to_vec();
        expected.retain(|k| *k != "undelivered_count");
        let got: Vec<String> = keys(previous).into_iter().filter(|k| k != "reset_detected").collect();
        assert_eq!(got, sorted(&expected));
    }
    assert_eq!(
        keys(&s["delivery_ledger"]),
        sorted(&[
            "delivered_current_target",
            "delivered_previous_target",
            "undelivered_current_target",
            "pending",
            "rejected",
            "transient",
            "terminal_failed",
        ])
    );
    assert_eq!(keys(&s["migration_conflicts"]), sorted(&["count", "cleanup_blocked", "conflicts"]));
    for c in s["migration_conflicts"]["conflicts"].as_array().unwrap() {
        assert_eq!(keys(c), sorted(&["event_id", "source", "existing_sha256", "incoming_sha256", "detected_at"]));
    }
    assert_eq!(keys(&s["terminal_failures"]), sorted(&["count", "events"]));
    let failures = s["terminal_failures"]["events"].as_array().unwrap();
    assert!(failures.len() <= 100);
    for f in failures {
        assert_eq!(keys(f), sorted(&["event_id", "target_id", "last_error", "last_http_status"]));
    }
    assert_eq!(
        keys(&s["body_upload_compatibility"]),
        sorted(&["body_upload_queue_count", "body_upload_failure_log_count"])
    );
    assert_eq!(keys(&s["legacy_queues"]), sorted(&["files", "event_count"]));
    for f in s["legacy_queues"]["files"].as_array().unwrap() {
        let got = keys(f);
        for key in ["path", "digest", "scope_status", "event_count", "body_upload_count", "migrated"] {
            assert!(got.contains(&key.to_string()), "legacy file lacks {key}: {got:?}");
        }
    }
}

fn ledger(s: &Value) -> Value {
    s["delivery_ledger"].clone()
}

#[test]
fn empty_home_is_reported_and_never_created() {
    let h = TestHome::new();
    let human = h.ok(&["status"]);
    let (doc_text, doc) = h.json_text(0, &["status"]);
    assert!(!h.home.exists(), "status created the home");
    assert_shape(&doc);
    assert_eq!(doc["event_journal"]["retained_event_count"], 0);
    assert_eq!(doc["event_journal"]["oldest_retained_event_at"], Value::Null);
    assert_eq!(doc["delivery_targets"]["previous"], json!([]));
    // The default mode is teamspace; without SPEC_KITTY_ENABLE_SAAS_SYNC its gate is closed.
    assert_eq!(doc["mode"], "TEAMSPACE");
    assert_eq!((doc["ok"].clone(), doc["exit_code"].clone()), (json!(false), json!(3)));
    assert_eq!(h.run(&["status", "--check"]).status.code(), Some(3));
    assert_eq!(h.run(&["status", "--json", "--check"]).status.code(), Some(3));
    assert!(!h.home.exists(), "status --check created the home");
    snapshot!(&h, "empty_home_human", human);
    snapshot!(&h, "empty_home_json", doc_text);

    // A home that delivers nowhere has nothing to attend to: ok, --check exits 0.
    h.write_config("[event_sync]\nmode = \"local-retention\"\n");
    let before = tree(&h.home);
    let doc = h.json_code(0, &["status", "--check"]);
    assert_eq!((doc["ok"].clone(), doc["exit_code"].clone()), (json!(true), json!(0)));
    assert_eq!(doc["delivery_targets"]["current"], Value::Null);
    assert_eq!(tree(&h.home), before, "status wrote into the home");
}

/// The specification's scenario: 124 retained events delivered to a previous target, none to
/// the current one.
#[test]
fn scenario_124_delivered_to_previous_target_only() {
    let h = TestHome::new();
    let a = ReceiverProcess::start(h.dir.path(), "a", &[]);
    let b = ReceiverProcess::start(h.dir.path(), "b", &[]);
    h.mode_external(&a);
    let started = jiff::Timestamp::now();
    let lines = envelopes("A0", 1..125, "Scenario", 60);
    let journal_bytes: usize = lines.iter().map(String::len).sum();
    assert_eq!(h.emit_lines(&lines)["captured"], 124);
    let report = h.drain(0, &[]);
    assert_eq!(report["delivered"], 124);
    h.mode_external(&b);

    let human = h.ok(&["status"]);
    let (s_text, s) = h.json_text(0, &["status", "--check"]);
    assert_shape(&s);
    let j = &s["event_journal"];
    assert_eq!(j["retained_event_count"], 124);
    assert_eq!(j["journal_size_bytes"], journal_bytes);
    assert!(j["store_file_bytes"].as_u64().unwrap() >= h.store_bytes());
    let oldest: jiff::Timestamp = j["oldest_retained_event_at"].as_str().unwrap().parse().unwrap();
    assert!(oldest.as_millisecond() >= started.as_millisecond() - 1 && oldest <= jiff::Timestamp::now());
    assert_eq!(j["gc_suggested"], false);
    assert_eq!(
        ledger(&s),
        json!({"delivered_current_target": 0, "delivered_previous_target": 124, "undelivered_current_target": 124,
               "pending": 0, "rejected": 0, "transient": 0, "terminal_failed": 0})
    );
    let current = &s["delivery_targets"]["current"];
    assert_eq!(current["canonical_url"], format!("{}/api/v1/events/batch", b.url));
    assert_eq!((current["delivered_count"].clone(), current["undelivered_count"].clone()), (json!(0), json!(124)));
    assert_eq!(current["first_seen_at"], Value::Null, "B was never drained");
    let previous = s["delivery_targets"]["previous"].as_array().unwrap();
    assert_eq!(previous.len(), 1);
    assert_eq!(previous[0]["canonical_url"], format!("{}/api/v1/events/batch", a.url));
    assert_eq!(previous[0]["delivered_count"], 124);
    assert_eq!(previous[0]["target_id"], report["target"]["target_id"]);
    for (label, value) in [("retained", "124 retained"), ("oldest", j["oldest_retained_event_at"].as_str().unwrap())] {
        assert!(human.contains(value), "{label}: {human}");
    }
    assert!(human.contains("0 to current target · 124 to previous targets"), "{human}");
    assert!(human.contains("124 for the current target"), "{human}");
    snapshot!(&h, "scenario_124_human", human);
    snapshot!(&h, "scenario_124_json", s_text);

    // Deliver to the current target too: retained and delivered stay distinct numbers.
    assert_eq!(h.drain(0, &[])["delivered"], 124);
    let s = h.status();
    assert_eq!(s["event_journal"]["retained_event_count"], 124);
    assert_eq!(
        ledger(&s),
        json!({"delivered_current_target": 124, "delivered_previous_target": 124, "undelivered_current_target": 0,
               "pending": 0, "rejected": 0, "transient": 0, "terminal_failed": 0})
    );
    assert_eq!(s["delivery_targets"]["current"]["delivered_count"], 124);
    assert_eq!(s["delivery_targets"]["previous"][0]["delivered_count"], 124);
    assert_eq!(s["event_journal"]["gc_suggested"], false, "a small journal needs no gc");
    assert_eq!(b.stored_ids().len(), 124);
    assert_eq!(a.stored_ids().len(), 124);
}

/// Rejected, parked (oversized), transient (killed receiver) and drain-blocked counts.
#[test]
fn failures_and_blocked_counts() {
    let h = TestHome::new();
    // Captured under the default teamspace mode without SPEC_KITTY_ENABLE_SAAS_SYNC.
    let mut lines = envelopes("B0", 1..4, "Good", 40);
    lines.push(envelopes("B0", 4..5, "Bad", 40).remove(0));
    lines.push(envelopes("B0", 5..6, "Big", 6000).remove(0));
    h.emit_lines(&lines);
    let s = h.json_code(3, &["status", "--check"]);
    assert_eq!(s["event_journal"]["drain_blocked"], json!({"saas_disabled": 5}));
    assert_eq!(s["ok"], false);
    assert_eq!(s["delivery_ledger"]["undelivered_current_target"], 5);
    assert_eq!(h.run(&["now"]).status.code(), Some(3), "teamspace gate is closed");

    let mut r = ReceiverProcess::start(h.dir.path(), "r", &["--reject-type", "Bad", "--max-event-bytes", "2000"]);
    h.mode_external(&r);
    let report = h.drain(4, &[]);
    assert_eq!(
        (report["delivered"].clone(), report["rejected"].clone(), report["terminal_failed"].clone()),
        (json!(3), json!(1), json!(1))
    );
    // Two more rejections hold Bad (3 rejections by this target) so only the next event is due.
    assert_eq!(h.drain(4, &[])["rejected"], 1);
    assert_eq!(h.drain(4, &[])["rejected"], 1);
    assert_eq!(h.drain(0, &[])["selected"], 0);
    r.kill();
    h.emit_lines(&envelopes("B0", 6..7, "Good", 40));
    let report = h.drain(4, &["--retries", "0", "--timeout", "5"]);
    assert_eq!(report["transient"], 1, "{report:#}");

    let human = h.ok(&["status"]);
    let (s_text, s) = h.json_text(0, &["status", "--check"]);
    assert_shape(&s);
    assert_eq!(s["event_journal"]["retained_event_count"], 6);
    // Due again: the transient one; held: Bad (rejected 3 times) and Big (parked).
    assert_eq!(
        ledger(&s),
        json!({"delivered_current_target": 3, "delivered_previous_target": 0, "undelivered_current_target": 3,
               "pending": 0, "rejected": 1, "transient": 1, "terminal_failed": 1})
    );
    // Blocked at capture and received by no target yet: Bad and Big.
    assert_eq!(s["event_journal"]["drain_blocked"], json!({"saas_disabled": 2}));
    assert_eq!(s["terminal_failures"]["count"], 1);
    let parked = &s["terminal_failures"]["events"][0];
    assert_eq!(parked["event_id"], event_id("B0", 5));
    assert_eq!(parked["target_id"], s["delivery_targets"]["current"]["target_id"]);
    assert!(parked["last_error"].as_str().unwrap().contains("oversized"), "{parked}");
    assert!(human.contains("1 rejected · 1 transient · 1 parked"), "{human}");
    assert!(human.contains("saas_disabled 2"), "{human}");
    snapshot!(&h, "failures_human", human);
    snapshot!(&h, "failures_json", s_text);
}

#[test]
fn dropped_and_coalesced_counts() {
    let h = TestHome::new();
    h.write_config("[event_sync]\nmode = \"opt-out\"\nlocal_only_types = [\"Noise\"]\n");
    for args in [
        &["emit", "--type", "Noise"][..],
        &["emit", "--type", "Noise"],
        &["emit", "--type", "Fact", "--local-only"],
        &["emit", "--type", "Fact"],
        &["emit", "--type", "Progress", "--coalesce-key", "wp-1", "--payload", r#"{"p":1}"#],
        &["emit", "--type", "Progress", "--coalesce-key", "wp-1", "--payload", r#"{"p":2}"#],
        &["emit", "--type", "Progress", "--coalesce-key", "wp-1", "--payload", r#"{"p":3}"#],
    ] {
        h.ok(args);
    }
    let human = h.ok(&["status"]);
    let s = h.json_code(0, &["status", "--check"]);
    assert_shape(&s);
    let j = &s["event_journal"];
    assert_eq!(j["retained_event_count"], 4, "dropped events are not journaled: {j:#}");
    assert_eq!(j["dropped_event_count"], 3);
    assert_eq!(j["coalesced_event_count"], 2);
    // Fact and the latest Progress wait for a mode that delivers; the coalesced ones never will.
    assert_eq!(j["drain_blocked"], json!({"opt_out": 2}));
    assert_eq!(s["delivery_targets"]["current"], Value::Null);
    assert!(human.contains("Fact 1 · Noise 2"), "dropped per type: {human}");
    assert!(human.contains("2 coalesced · 3 dropped"), "{human}");
    assert!(human.contains("opt_out 2"), "{human}");

    let r = ReceiverProcess::start(h.dir.path(), "r", &[]);
    h.mode_external(&r);
    let s = h.status();
    assert_eq!(s["delivery_ledger"]["undelivered_current_target"], 2, "coalesced events are never due");
    assert_eq!(h.drain(0, &[])["delivered"], 2);
    let s = h.status();
    assert_eq!(s["event_journal"]["drain_blocked"], json!({}), "delivered events are no longer blocked");
    assert_eq!(s["event_journal"]["coalesced_event_count"], 2);
    assert_eq!(s["delivery_ledger"]["undelivered_current_target"], 0);
    assert_eq!(r.stored_ids().len(), 2);
}

/// Unresolved migration conflicts make `ok` false and `--check` exit 3.
#[test]
fn migration_conflict_fails_the_check() {
    let h = TestHome::new();
    h.write_config("[event_sync]\nmode = \"local-retention\"\n");
    let id = event_id("C0", 1);
    h.ok(&["emit", "--type", "A", "--event-id", &id, "--payload", r#"{"v":1}"#]);
    let queues = h.home.join("queues");
    std::fs::create_dir_all(&queues).unwrap();
    let legacy = rusqlite::Connection::open(queues.join("queue-0123456789abcdef.db")).unwrap();
    legacy
        .execute_batch(
            "CREATE TABLE IF NOT EXISTS queue (id INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT UNIQUE NOT NULL,
                event_type TEXT NOT NULL, data TEXT NOT NULL, timestamp INTEGER NOT NULL, retry_count INTEGER DEFAULT 0,
                coalesce_key TEXT);
             CREATE INDEX IF NOT EXISTS idx_timestamp ON queue(timestamp);",
        )
        .unwrap();
    let data = format!(r#"{{"event_id":"{id}","event_type":"A","payload":{{"v":2}}}}"#);
    legacy
        .execute("INSERT INTO queue (event_id, event_type, data, timestamp) VALUES (?1, 'A', ?2, 1)", [&id, &data])
        .unwrap();
    drop(legacy);
    let migrated = h.run(&["migrate"]);
    assert_eq!(migrated.status.code(), Some(3), "{}", status_support::text(&migrated.stderr));

    let s = h.json_code(3, &["status", "--check"]);
    assert_shape(&s);
    assert_eq!((s["ok"].clone(), s["exit_code"].clone()), (json!(false), json!(3)));
    assert_eq!(s["migration_conflicts"]["count"], 1);
    assert_eq!(s["migration_conflicts"]["cleanup_blocked"], true);
    let conflict = &s["migration_conflicts"]["conflicts"][0];
    assert_eq!(conflict["event_id"], id.as_str());
    assert_eq!(conflict["source"], "unknown:0123456789abcdef");
    assert_ne!(conflict["existing_sha256"], conflict["incoming_sha256"]);
    assert_eq!(s["legacy_queues"]["event_count"], 1);
    assert_eq!(s["legacy_queues"]["files"][0]["migrated"], true);
    let out = h.run(&["status", "--check"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(status_support::text(&out.stdout).contains("1 unresolved conflict(s)"));
}

/// A store that is not a database, or written by a newer schema: `ok:false`, exit 3 with
/// `--check`, a clear message, and nothing changed.
#[test]
fn unreadable_and_newer_stores_are_reported_untouched() {
    let h = TestHome::new();
    h.write_config("[event_sync]\nmode = \"local-retention\"\n");
    std::fs::create_dir_all(h.home.join("event-sync")).unwrap();
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(h.store_path(), &garbage).unwrap();
    let before = tree(&h.home);
    let s = h.json_code(3, &["status", "--check"]);
    assert_shape(&s);
    assert_eq!(s["ok"], false);
    assert_eq!(s["event_journal"]["store_file_bytes"], 8192);
    let out = h.run(&["status"]);
    assert_eq!(out.status.code(), Some(0), "without --check status reports and exits 0");
    let human = status_support::text(&out.stdout);
    assert!(human.contains("unreadable"), "{human}");
    assert!(human.contains("not a database"), "{human}");
    assert!(!human.contains("0 retained"), "an unreadable store is not an empty one: {human}");
    assert_eq!(tree(&h.home), before);
    assert_eq!(std::fs::read(h.store_path()).unwrap(), garbage);

    // A store written by a newer kitty-sync.
    std::fs::remove_file(h.store_path()).unwrap();
    h.ok(&["emit", "--type", "A"]);
    rusqlite::Connection::open(h.store_path()).unwrap().pragma_update(None, "user_version", 99).unwrap();
    let before = tree(&h.home);
    let bytes = std::fs::read(h.store_path()).unwrap();
    let s = h.json_code(3, &["status", "--check"]);
    assert_eq!(s["ok"], false);
    let out = h.run(&["status"]);
    let human = status_support::text(&out.stdout);
    assert!(human.contains("newer kitty-sync") && human.contains("upgrade kitty-sync"), "{human}");
    for args in [&["gc"][..], &["archive"]] {
        let out = h.run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = status_support::text(&out.stderr);
        assert!(err.contains("error:") && err.contains("newer") && err.contains("hint:"), "{err}");
    }
    assert_eq!(tree(&h.home), before);
    assert_eq!(std::fs::read(h.store_path()).unwrap(), bytes);
}

/// `status` writes nothing: the recursive listing (sizes, mtimes) is unchanged, and it works
/// on a home without write permission (run as `nobody` when the tests run as root).
#[test]
fn status_is_read_only() {
    let h = TestHome::new();
    let r = ReceiverProcess::start(h.dir.path(), "r", &[]);
    h.mode_external(&r);
    h.emit_lines(&envelopes("D0", 1..11, "T", 30));
    h.drain(0, &[]);
    h.emit_lines(&envelopes("D0", 11..13, "T", 30));
    let before = tree(&h.home);
    assert!(before.keys().any(|p| p.ends_with("kitty-sync.db")));
    let expected = h.status();
    h.ok(&["status"]);
    h.json_code(0, &["status", "--check"]);
    assert_eq!(tree(&h.home), before, "status changed the home");

    status_support::chmod_recursive(&h.home, false);
    let setpriv = std::path::Path::new("/usr/bin/setpriv");
    let out = if is_root() && setpriv.exists() {
        // Root ignores permissions: run as nobody so the read-only home is really read-only.
        status_support::chmod_recursive(h.dir.path(), false);
        std::fs::set_permissions(h.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
        let mut cmd = std::process::Command::new(setpriv);
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", status_support::BIN, "--home"])
            .arg(&h.home)
            .args(["status", "--json"])
            .env_remove("SPEC_KITTY_SAAS_URL")
            .env_remove("SPEC_KITTY_ENABLE_SAAS_SYNC")
            .env_remove("SPEC_KITTY_HOME");
        cmd.output().unwrap()
    } else {
        h.run(&["status", "--json"])
    };
    status_support::chmod_recursive(h.dir.path(), true);
    assert!(out.status.success(), "{}", status_support::text(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["ok"], true, "{got:#}");
    assert_eq!(got["event_journal"], expected["event_journal"]);
    assert_eq!(got["delivery_ledger"], expected["delivery_ledger"]);
    assert_eq!(got["delivery_ledger"]["undelivered_current_target"], 2);
    assert_eq!(tree(&h.home), before, "status changed the read-only home");
}

/// The GC suggestion needs ≥ 50 MiB of retained payloads AND every retained event delivered to
/// every known target (the current one included, even before its first drain).
#[test]
fn gc_suggestion_only_when_large_and_fully_delivered() {
    let h = TestHome::new();
    let a = ReceiverProcess::start(h.dir.path(), "a", &[]);
    let b = ReceiverProcess::start(h.dir.path(), "b", &[]);
    h.mode_external(&a);
    let lines = envelopes("E0", 0..600, "Blob", 90_000);
    let total: usize = lines.iter().map(String::len).sum();
    assert!(total >= 50 * 1024 * 1024);
    h.emit_lines(&lines);
    assert_eq!(h.status()["event_journal"]["gc_suggested"], false, "nothing delivered yet");
    assert_eq!(h.drain(0, &["--batch-bytes", "4000000"])["delivered"], 600);

    let s = h.status();
    let j = &s["event_journal"];
    assert_eq!(j["gc_suggested"], true, "{j:#}");
    assert_eq!(j["gc_suggestion"]["retained_event_count"], 600);
    assert_eq!(j["gc_suggestion"]["journal_size_bytes"], total);
    assert!(j["gc_suggestion"]["reason"].as_str().unwrap().contains("gc"));
    assert!(h.ok(&["status"]).contains("suggested:"));

    // A new current target that has received nothing yet: no suggestion.
    h.mode_external(&b);
    let s = h.status();
    assert_eq!(s["event_journal"]["gc_suggested"], false, "current target has 0 of 600");
    assert_eq!(s["delivery_ledger"]["undelivered_current_target"], 600);
    // It has some, not all: still none — and none either when looking from the first target.
    assert_eq!(h.drain(0, &["--limit", "5"])["delivered"], 5);
    assert_eq!(h.status()["event_journal"]["gc_suggested"], false);
    h.mode_external(&a);
    let s = h.status();
    assert_eq!(s["event_journal"]["gc_suggested"], false, "target B misses 595");
    assert!(h.ok(&["status"]).contains("not needed"));
}

/// Colour only on a terminal, and never under `NO_COLOR` (a pseudo-terminal through script(1)).
#[test]
fn colour_only_on_a_terminal_without_no_color() {
    let script = std::path::Path::new("/usr/bin/script");
    if !script.exists() {
        eprintln!("skipped: script(1) is not installed, so no pseudo-terminal is available");
        return;
    }
    let h = TestHome::new();
    h.write_config("[event_sync]\nmode = \"local-retention\"\n");
    let line = format!("{} --home {} status", status_support::BIN, h.home.display());
    let on_tty = |no_color: bool| {
        let mut cmd = std::process::Command::new(script);
        cmd.args(["-qec", &line, "/dev/null"]).env_remove("NO_COLOR").stdin(std::process::Stdio::null());
        if no_color {
            cmd.env("NO_COLOR", "1");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", status_support::text(&out.stderr));
        status_support::text(&out.stdout)
    };
    assert!(on_tty(false).contains("\u{1b}[32mOK\u{1b}[0m"), "{:?}", on_tty(false));
    assert!(!on_tty(true).contains('\u{1b}'));
    let piped = h.cmd(&["status"]).env_remove("NO_COLOR").output().unwrap();
    assert!(!status_support::text(&piped.stdout).contains('\u{1b}'), "no colour when stdout is not a terminal");
}
