//! Issue 4, the main stories from the outside: capture → deliver to A → switch to B →
//! deliver the same bytes again → re-run posts nothing; Teamspace against a built-in
//! receiver; gates; non-delivering modes; `--report`, `--limit`, `--batch-events`; `demo`.

use crate::common;

use std::collections::BTreeMap;

use common::{Home, Receiver, bin};
use serde_json::{Value, json};

/// Every stored envelope on the receiver equals the journal's bytes for that event.
fn assert_byte_identical(home: &Home, receiver: &Receiver, ids: &[String]) {
    let held = receiver.dump().by_id();
    assert_eq!(held.len(), ids.len(), "receiver holds {:?}", held.keys());
    for id in ids {
        let journal = home.stored_envelope(id);
        assert_eq!(held.get(id), Some(&journal), "envelope of {id} differs between the journal and {}", receiver.addr);
    }
}

#[test]
fn external_a_then_b_delivers_the_same_bytes_and_a_rerun_posts_nothing() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let a = Receiver::start(&dir.path().join("a.db"), &[]);
    let b = Receiver::start(&dir.path().join("b.db"), &[]);
    // Story 3 as well: no credentials file at all, Teamspace sync never enabled.
    assert!(!home.path().join("credentials").exists());
    let ids = home.capture(25, "WorkPackageUpdated");

    home.external(&a.endpoint());
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["mode"], "EXTERNAL_RECEIVER");
    assert_eq!((report["selected"].clone(), report["delivered"].clone()), (json!(25), json!(25)));
    assert_eq!(report["target"]["kind"], "external");
    assert_eq!(a.dump().event_count, 25);
    assert_byte_identical(&home, &a, &ids);
    assert_eq!(home.status()["event_journal"]["retained_event_count"], 25, "delivery never removes events");

    home.external(&b.endpoint());
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["delivered"], 25);
    assert_byte_identical(&home, &b, &ids);
    let a_dump = a.dump();
    let b_dump = b.dump();
    assert_eq!(a_dump.by_id(), b_dump.by_id(), "A and B hold the same bytes");
    assert_eq!(a_dump.ids(), ids, "capture order");
    assert_eq!(b_dump.ids(), ids, "capture order");

    // A re-run on B posts nothing.
    let before = b.dump().batch_requests;
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!((report["selected"].clone(), report["batches"].clone()), (json!(0), json!(0)));
    assert_eq!(b.dump().batch_requests, before);
    // The human run says so too.
    let run = home.run(&["now"]).expect(0);
    assert!(
        run.stdout.contains("Delivered 0, duplicate 0, rejected 0, parked 0, transient 0, pending 0 →"),
        "{}",
        run.stdout
    );
    assert_eq!(b.dump().batch_requests, before);

    let status = home.status();
    assert_eq!(status["delivery_ledger"]["delivered_current_target"], 25);
    assert_eq!(status["delivery_ledger"]["delivered_previous_target"], 25);
    assert_eq!(status["delivery_ledger"]["undelivered_current_target"], 0);
    assert_eq!(status["delivery_targets"]["previous"].as_array().unwrap().len(), 1);
    assert_eq!(status["event_journal"]["retained_event_count"], 25);
    // Per event: one success row for each target.
    let inspection = home.inspect(&ids[7]);
    assert_eq!(common::attempt_outcomes(&inspection, &a.base()), vec!["success"]);
    assert_eq!(common::attempt_outcomes(&inspection, &b.base()), vec!["success"]);
}

fn teamspace_credentials(team: Option<&str>, token: Option<&str>) -> String {
    let mut text = String::new();
    if let Some(token) = token {
        text.push_str(&format!("[tokens]\naccess = \"{token}\"\n"));
    }
    text.push_str("[user]\nusername = \"u@example.com\"\n");
    if let Some(team) = team {
        text.push_str(&format!("team_slug = \"{team}\"\n"));
    }
    text
}

#[test]
fn teamspace_against_built_in_receivers_with_the_override_url() {
    let mut home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let token_env = [("KS_TEAMSPACE_TOKEN", "tok-teamspace-1")];
    let a = Receiver::start_env(&dir.path().join("a.db"), &["--token-env", "KS_TEAMSPACE_TOKEN"], &token_env);
    let b = Receiver::start_env(&dir.path().join("b.db"), &["--token-env", "KS_TEAMSPACE_TOKEN"], &token_env);
    home.write_credentials(&teamspace_credentials(Some("team-a"), Some("tok-teamspace-1")));
    let ids = home.capture(12, "MissionCreated");

    home.set_env("SPEC_KITTY_ENABLE_SAAS_SYNC", "1");
    home.set_env("SPEC_KITTY_SAAS_URL", &a.base());
    let (run, report) = home.now(&[]);
    let run = run.expect(0);
    assert_eq!(report["mode"], "TEAMSPACE");
    assert_eq!(report["target"]["kind"], "teamspace");
    assert_eq!(report["target"]["team_slug"], "team-a");
    assert_eq!(report["target"]["user_email"], "u@example.com");
    assert_eq!(report["target"]["canonical_url"], a.base());
    assert_eq!(report["delivered"], 12);
    // The override is announced on stderr, naming both URLs and the variable.
    let warning = run.stderr.lines().find(|l| l.contains("SPEC_KITTY_SAAS_URL")).unwrap_or_default();
    assert!(warning.contains(&a.base()) && warning.contains("https://spec-kitty-dev.fly.dev"), "{}", run.stderr);
    assert!(!run.stderr.contains("tok-teamspace-1") && !run.stdout.contains("tok-teamspace-1"), "no secrets");
    assert_eq!(a.dump().requests_with(401), 0, "the bearer token was accepted");
    assert_byte_identical(&home, &a, &ids);

    // "Switch to B": a different Teamspace server is a different target.
    home.set_env("SPEC_KITTY_SAAS_URL", &b.base());
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["delivered"], 12);
    assert_byte_identical(&home, &b, &ids);
    assert_eq!(a.dump().by_id(), b.dump().by_id());

    let before = b.dump().batch_requests;
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["selected"], 0);
    assert_eq!(b.dump().batch_requests, before, "a re-run posts nothing");

    // The same through `kitty-sync server URL` instead of the override: no warning then.
    home.unset_env("SPEC_KITTY_SAAS_URL");
    home.run(&["server", &a.base()]).expect(0);
    let more = home.capture(3, "MissionCreated");
    let (run, report) = home.now(&[]);
    let run = run.expect(0);
    assert_eq!(report["delivered"], 3);
    assert!(!run.stderr.contains("SPEC_KITTY_SAAS_URL"), "{}", run.stderr);
    assert!(a.dump().by_id().contains_key(&more[2]));
    // Configured A, overridden to B: one warning naming both URLs, and B is the target.
    home.set_env("SPEC_KITTY_SAAS_URL", &format!("{}/", b.base()));
    let extra = home.capture(1, "MissionCreated");
    let (run, report) = home.now(&[]);
    let run = run.expect(0);
    assert_eq!(report["target"]["canonical_url"], b.base());
    let warnings: Vec<&str> = run.stderr.lines().filter(|l| l.contains("SPEC_KITTY_SAAS_URL")).collect();
    assert_eq!(warnings.len(), 1, "{}", run.stderr);
    assert!(warnings[0].contains(&a.base()) && warnings[0].contains(&b.base()), "{}", run.stderr);
    assert!(b.dump().by_id().contains_key(&extra[0]));
    home.unset_env("SPEC_KITTY_SAAS_URL");
    assert_eq!(home.status()["event_journal"]["retained_event_count"], 16);
}

/// One blocked gate: capture records the reason, `now` posts nothing and exits 3 naming the
/// gate, status reports it, and once the blocker clears the same events are delivered.
fn gate_story(reason: &str, credentials: &str, enable: bool, fixed_credentials: &str) {
    let mut home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&dir.path().join("r.db"), &[]);
    home.write_credentials(credentials);
    home.set_env("SPEC_KITTY_SAAS_URL", &receiver.base());
    if enable {
        home.set_env("SPEC_KITTY_ENABLE_SAAS_SYNC", "1");
    }
    let ids = home.capture(4, "Blocked");
    assert_eq!(home.inspect(&ids[0])["drain_blocked_reason"], reason);
    let status = home.status();
    assert_eq!(status["event_journal"]["drain_blocked"], json!({ reason: 4 }), "{status:#}");
    assert_eq!(status["ok"], false);
    home.run(&["status", "--check"]).expect(3);

    let run = home.run(&["now"]).expect(3);
    assert!(run.stderr.contains(reason), "the message names the gate: {}", run.stderr);
    assert!(run.stderr.contains("hint:"), "{}", run.stderr);
    assert!(run.stderr.contains("nothing was posted"), "{}", run.stderr);
    let run = home.run(&["now", "--json"]).expect(3);
    assert!(run.stdout.trim().is_empty() || run.json().is_object(), "{}", run.stdout);
    assert_eq!(receiver.dump().batch_requests, 0, "nothing posted");
    assert_eq!(home.status()["event_journal"]["retained_event_count"], 4, "retained while blocked");
    assert_eq!(home.inspect(&ids[3])["drain_blocked_reason"], reason);

    // The blocker clears.
    home.write_credentials(fixed_credentials);
    home.set_env("SPEC_KITTY_ENABLE_SAAS_SYNC", "true");
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["delivered"], 4);
    assert_eq!(receiver.dump().ids(), ids);
    let status = home.status();
    assert_eq!(status["ok"], true, "{status:#}");
    assert_eq!(status["delivery_ledger"]["undelivered_current_target"], 0);
    assert_eq!(status["event_journal"]["drain_blocked"], json!({}), "delivered events are no longer blocked");
    // The capture-time reason is history and stays on the event.
    assert_eq!(home.inspect(&ids[0])["drain_blocked_reason"], reason);
}

#[test]
fn teamspace_gate_saas_disabled() {
    let good = teamspace_credentials(Some("team-a"), Some("tok"));
    gate_story("saas_disabled", &good, false, &good);
}

#[test]
fn teamspace_gate_missing_auth() {
    let good = teamspace_credentials(Some("team-a"), Some("tok"));
    gate_story("missing_auth", &teamspace_credentials(Some("team-a"), None), true, &good);
}

#[test]
fn teamspace_gate_missing_team() {
    let good = teamspace_credentials(Some("team-a"), Some("tok"));
    gate_story("missing_team", &teamspace_credentials(None, Some("tok")), true, &good);
}

#[test]
fn non_delivering_modes_say_so_and_exit_0() {
    for (mode, shown) in [("local-retention", "LOCAL_RETENTION"), ("opt-out", "OPT_OUT")] {
        let home = Home::new();
        home.capture(2, "Kept");
        home.run(&["mode", mode]).expect(0);
        let run = home.run(&["now"]).expect(0);
        assert!(run.stdout.contains("nothing is delivered"), "{mode}: {}", run.stdout);
        let (run, report) = home.now(&[]);
        run.expect(0);
        assert_eq!(report["mode"], shown, "{report:#}");
        assert_eq!(home.status()["event_journal"]["retained_event_count"], 2);
    }
}

#[test]
fn events_captured_under_opt_out_are_delivered_once_the_mode_allows() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&dir.path().join("r.db"), &[]);
    home.run(&["mode", "opt-out"]).expect(0);
    let ids = home.capture(3, "Withheld");
    assert_eq!(home.inspect(&ids[0])["drain_blocked_reason"], "opt_out");
    home.run(&["now"]).expect(0);
    assert_eq!(receiver.dump().batch_requests, 0);
    home.external(&receiver.endpoint());
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["delivered"], 3);
    assert_eq!(receiver.dump().ids(), ids);
}

#[test]
fn coalesced_events_are_skipped_but_ones_delivered_somewhere_stay_deliverable() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let a = Receiver::start(&dir.path().join("a.db"), &[]);
    let b = Receiver::start(&dir.path().join("b.db"), &[]);
    let emit = |n: u32| -> String {
        let payload = format!("{{\"n\": {n}}}");
        let run = home.run(&["emit", "--type", "Progress", "--coalesce-key", "wp01", "--payload", &payload]).expect(0);
        run.stdout.trim().to_string()
    };
    let first = emit(1);
    let second = emit(2);
    assert!(home.inspect(&first)["coalesced_into"].is_string());
    home.external(&a.endpoint());
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["selected"], 1, "the superseded event is never delivered: {report:#}");
    assert_eq!(a.dump().ids(), vec![second.clone()]);
    // Delivered to A: a later event with the same key does not take it away from B.
    let third = emit(3);
    home.external(&b.endpoint());
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["delivered"], 2, "{report:#}");
    assert_eq!(b.dump().ids(), vec![second, third]);
    assert_eq!(home.status()["event_journal"]["retained_event_count"], 3, "coalescing never deletes");
}

#[test]
fn report_limit_and_batch_sizes() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&dir.path().join("r.db"), &[]);
    let ids = home.capture(25, "Sized");
    home.external(&receiver.endpoint());

    // --limit: at most N this run, exit 0; --report equals --json.
    let report_path = dir.path().join("report.json");
    let (run, report) = home.now(&["--limit", "7", "--report", report_path.to_str().unwrap()]);
    run.expect(0);
    assert_eq!((report["selected"].clone(), report["delivered"].clone()), (json!(7), json!(7)));
    let written: Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(written, report, "--report writes the same JSON as --json");
    for key in ["mode", "target", "selected", "delivered", "duplicate", "pending", "rejected", "transient"] {
        assert!(report.get(key).is_some(), "{key} missing from {report:#}");
    }
    for key in ["terminal_failed", "batches", "elapsed_ms", "failures"] {
        assert!(report.get(key).is_some(), "{key} missing from {report:#}");
    }
    assert_eq!(receiver.dump().ids(), ids[..7].to_vec());

    // --report without --json: the human line on stdout, the document in the file.
    let (run, report) = {
        let run = home.run(&["now", "--batch-events", "10", "--report", report_path.to_str().unwrap()]).expect(0);
        let report: Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
        (run, report)
    };
    assert!(run.stdout.contains("Delivered 18,"), "{}", run.stdout);
    assert_eq!(report["selected"], 18);
    assert_eq!(report["batches"], 2, "ceil(18 / 10)");
    let dump = receiver.dump();
    assert_eq!(dump.ids(), ids);
    assert_eq!(dump.batch_requests, 1 + 2);

    // --batch-events on a fresh target: batches = ceil(N / 10), and the receiver agrees.
    let other = Receiver::start(&dir.path().join("o.db"), &[]);
    home.external(&other.endpoint());
    let (run, report) = home.now(&["--batch-events", "10"]);
    run.expect(0);
    assert_eq!(report["batches"], 3);
    assert_eq!(other.dump().batch_requests, 3);
    // --batch-bytes bounds the uncompressed body: each odd envelope is ~160 bytes.
    let third = Receiver::start(&dir.path().join("t.db"), &[]);
    home.external(&third.endpoint());
    let (run, report) = home.now(&["--batch-bytes", "1000"]);
    run.expect(0);
    let batches = report["batches"].as_u64().unwrap();
    assert!(batches >= 5, "{report:#}");
    assert_eq!(third.dump().batch_requests, batches);
    assert_eq!(third.dump().ids(), ids);
}

#[test]
fn demo_tells_the_story_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let output = bin().env("TMPDIR", tmp.path()).env("HOME", home.path()).arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let lower = stdout.to_lowercase();
    for word in ["captured", "retained"] {
        assert!(lower.contains(word), "the story mentions {word:?}:\n{stdout}");
    }
    assert!(stdout.contains("Delivered"), "{stdout}");
    assert!(stdout.lines().count() <= 60, "under a screen or so:\n{stdout}");
    let left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("kitty-sync-demo-"))
        .collect();
    assert!(left.is_empty(), "demo left {left:?} behind");
    let mut homes = BTreeMap::new();
    for entry in std::fs::read_dir(home.path()).unwrap() {
        homes.insert(entry.unwrap().file_name(), ());
    }
    assert!(homes.is_empty(), "demo must not touch the real home: {homes:?}");
}

#[test]
fn progress_goes_to_a_terminal_only() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&dir.path().join("r.db"), &[]);
    home.capture(6, "Shown");
    home.external(&receiver.endpoint());
    // Not a terminal: stderr stays clean, stdout has the summary line only.
    let run = home.run(&["now", "--batch-events", "2"]).expect(0);
    assert!(!run.stderr.contains("delivering"), "{}", run.stderr);
    assert_eq!(run.stdout.lines().count(), 1, "{}", run.stdout);
    assert!(run.stdout.starts_with("Delivered 6, duplicate 0, rejected 0, parked 0, transient 0, pending 0 → "));
    assert!(run.stdout.contains("(EXTERNAL_RECEIVER) in "), "{}", run.stdout);

    // On a terminal (util-linux `script` provides one), a progress bar is drawn.
    if std::process::Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped the terminal half: no `script` command");
        return;
    }
    home.capture(6, "Shown");
    let command = format!("{} --home {} now --batch-events 2", common::BIN, home.path().display());
    let output = bin_script(&command);
    assert!(output.contains("delivering"), "{output}");
    assert!(output.contains("6/6"), "{output}");
    assert!(output.contains("Delivered 6,"), "{output}");
}

fn bin_script(command: &str) -> String {
    let mut script = std::process::Command::new("script");
    script.args(["-qec", command, "/dev/null"]).stdin(std::process::Stdio::null());
    for name in common::HOST_ENV {
        script.env_remove(name);
    }
    let output = script.output().unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}
