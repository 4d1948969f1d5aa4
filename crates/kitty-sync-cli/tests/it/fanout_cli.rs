//! Fan-out (contract §9): one journal delivered to the primary and named targets side by side.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{Home, Receiver, closed_endpoint, finish, kill9, wait_until};

fn add(home: &Home, name: &str, endpoint: &str, extra: &[&str]) {
    let mut args = vec!["target", "add", name, "--endpoint", endpoint];
    args.extend_from_slice(extra);
    home.run(&args).expect(0);
}

/// The `targets[]` entry called `name` of a `now --json` report.
#[track_caller]
fn entry<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["targets"]
        .as_array()
        .and_then(|t| t.iter().find(|e| e["name"] == name))
        .unwrap_or_else(|| panic!("no target {name} in {report:#}"))
}

fn ids(receiver: &Receiver) -> BTreeSet<String> {
    receiver.dump().ids().into_iter().collect()
}

/// `n` events of `event_type` through `emit` (not `--jsonl`, which this checkout's gc cannot open after).
fn emit_n(home: &Home, n: usize, event_type: &str) -> Vec<String> {
    (0..n).map(|i| home.emit(event_type, &format!("{{\"i\":{i}}}"))).collect()
}

#[test]
fn a_and_b_at_once_then_a_third_catches_up_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        Receiver::start(&dir.path().join("a.db"), &[]),
        Receiver::start(&dir.path().join("b.db"), &[]),
        Receiver::start(&dir.path().join("c.db"), &[]),
    );
    let home = Home::new();
    home.external(&a.endpoint());
    add(&home, "bee", &b.endpoint(), &[]);
    let events: BTreeSet<String> = home.capture(30, "T").into_iter().collect();

    let (run, report) = home.now(&["--batch-events", "7"]);
    run.expect(0);
    assert_eq!(report["exit_code"], 0);
    // The §7 keys still describe the primary.
    assert_eq!(report["delivered"], 30, "{report:#}");
    assert_eq!(report["target"]["canonical_url"], entry(&report, "primary")["target"]["canonical_url"]);
    assert_eq!(entry(&report, "bee")["delivered"], 30);
    assert_eq!(entry(&report, "bee")["blocked"], Value::Null);
    assert_eq!((ids(&a), ids(&b)), (events.clone(), events.clone()));

    add(&home, "sea", &c.endpoint(), &[]);
    let a_requests = a.dump().batch_requests;
    let run = home.run(&["now"]).expect(0);
    assert_eq!(run.stdout.lines().filter(|l| l.starts_with("Delivered ")).count(), 3, "{}", run.stdout);
    assert!(run.stdout.contains("Delivered 30, duplicate 0") && run.stdout.contains("(sea)"), "{}", run.stdout);
    assert_eq!(ids(&c), events);
    assert_eq!(a.dump().batch_requests, a_requests, "the others had nothing to send");

    // Only the named target; an unknown name is a usage error.
    home.capture(2, "T");
    let (run, report) = home.now(&["--target", "sea"]);
    run.expect(0);
    assert_eq!(report["targets"].as_array().unwrap().len(), 1);
    assert_eq!(entry(&report, "sea")["delivered"], 2);
    assert_eq!(report["delivered"], 0, "the primary was not delivered to: zeros");
    assert_eq!(ids(&a).len(), 30);
    let run = home.run(&["now", "--target", "nope"]).expect(2);
    assert!(run.stderr.contains("hint:"), "{}", run.stderr);
}

#[test]
fn type_filters_narrow_selection_status_and_retention() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Receiver::start(&dir.path().join("a.db"), &[]), Receiver::start(&dir.path().join("b.db"), &[]));
    let home = Home::new();
    home.external(&a.endpoint());
    add(&home, "only-x", &b.endpoint(), &["--type", "X"]);
    let xs: BTreeSet<String> = emit_n(&home, 3, "X").into_iter().collect();
    emit_n(&home, 4, "Y");

    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(entry(&report, "only-x")["selected"], 3);
    assert_eq!(entry(&report, "primary")["delivered"], 7);
    assert_eq!(ids(&b), xs, "events of other types are never sent to a typed target");

    let status = home.status();
    let active = status["delivery_targets"]["active"].as_array().unwrap();
    assert_eq!(active.len(), 2, "{status:#}");
    assert_eq!(active[1]["name"], "only-x");
    assert_eq!(active[1]["undelivered_count"], 0, "Y events are not undelivered for it");
    assert_eq!(status["ok"], true);

    // Every event reached every target that wants it: gc purges all seven.
    let gc = home.run(&["gc", "--json"]).expect(0).json();
    assert_eq!(gc["purged"], 7, "{gc:#}");
}

#[test]
fn gc_and_archive_wait_for_exactly_the_targets_that_want_an_event() {
    let dir = tempfile::tempdir().unwrap();
    let a = Receiver::start(&dir.path().join("a.db"), &[]);
    let home = Home::new();
    home.external(&a.endpoint());
    add(&home, "down-x", &closed_endpoint(), &["--type", "X"]);
    emit_n(&home, 2, "X");
    emit_n(&home, 3, "Y");
    let (run, report) = home.now(&["--retries", "0"]);
    run.expect(4);
    assert_eq!(entry(&report, "down-x")["exit_code"], 4);
    assert_eq!(entry(&report, "primary")["delivered"], 5);

    // Y events are everywhere they go; X events still wait for down-x.
    let dry = home.run(&["archive", "--dry-run", "--json"]).expect(0).json();
    assert_eq!(dry["archived"], 3, "{dry:#}");
    let gc = home.run(&["gc", "--json"]).expect(0).json();
    assert_eq!(gc["purged"], 3, "{gc:#}");
    // Removed from config, it keeps its history and its filter: X events still wait.
    home.run(&["target", "remove", "down-x"]).expect(0);
    let gc = home.run(&["gc", "--json"]).expect(0).json();
    assert_eq!(gc["purged"], 0, "{gc:#}");
    assert_eq!(home.status()["event_journal"]["retained_event_count"], 2);
}

#[test]
fn a_target_refusing_connections_never_stops_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Receiver::start(&dir.path().join("a.db"), &[]), Receiver::start(&dir.path().join("b.db"), &[]));
    let home = Home::new();
    home.external(&a.endpoint());
    add(&home, "down", &closed_endpoint(), &[]);
    add(&home, "bee", &b.endpoint(), &[]);
    let events: BTreeSet<String> = home.capture(40, "T").into_iter().collect();

    let started = Instant::now();
    let (run, report) = home.now(&["--batch-events", "10", "--retries", "1", "--timeout", "5"]);
    let run = run.expect(4);
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    assert_eq!(report["exit_code"], 4);
    assert_eq!((ids(&a), ids(&b)), (events.clone(), events));
    let down = entry(&report, "down");
    assert_eq!(down["exit_code"], 4);
    assert_eq!(down["delivered"], 0);
    assert!(down["transient"].as_u64().unwrap() > 0, "{down:#}");
    assert_eq!(entry(&report, "bee")["exit_code"], 0);
    assert!(run.stderr.contains("target down"), "{}", run.stderr);
}

#[test]
fn a_blocked_target_exits_3_while_the_others_are_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let a = Receiver::start(&dir.path().join("a.db"), &[]);
    let locked =
        Receiver::start_env(&dir.path().join("l.db"), &["--token-env", "KS_FANOUT_RT"], &[("KS_FANOUT_RT", "right")]);
    let mut home = Home::new();
    home.set_env("KS_FANOUT_WRONG", "wrong");
    home.external(&a.endpoint());
    add(&home, "locked", &locked.endpoint(), &["--token-env", "KS_FANOUT_WRONG"]);
    home.capture(5, "T");

    let (run, report) = home.now(&[]);
    run.expect(3);
    assert_eq!(report["exit_code"], 3);
    assert_eq!(entry(&report, "primary")["delivered"], 5);
    assert_eq!(ids(&a).len(), 5);
    let blocked = &entry(&report, "locked")["blocked"];
    assert_eq!(blocked["reason"], "auth_refused", "{report:#}");
    assert!(blocked["hint"].as_str().unwrap().contains("token_env"));
    assert_eq!(locked.dump().event_count, 0);
    let status = home.run(&["status", "--check", "--json"]).expect(3).json();
    assert_eq!(status["ok"], false);
}

#[test]
fn removing_and_re_adding_a_target_continues_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Receiver::start(&dir.path().join("a.db"), &[]), Receiver::start(&dir.path().join("b.db"), &[]));
    let home = Home::new();
    home.external(&a.endpoint());
    add(&home, "bee", &b.endpoint(), &[]);
    home.capture(4, "T");
    home.now(&[]).0.expect(0);
    home.run(&["target", "remove", "bee"]).expect(0);
    home.capture(3, "T");
    let (_, report) = home.now(&[]);
    assert_eq!(report["targets"].as_array().unwrap().len(), 1);
    assert_eq!(b.dump().event_count, 4);

    add(&home, "bee-again", &b.endpoint(), &[]);
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(entry(&report, "bee-again")["selected"], 3, "only what it missed: {report:#}");
    assert_eq!(b.dump().event_count, 7);
    assert_eq!(b.dump().requests_with(200), 2);
}

#[test]
fn kill_9_during_a_fan_out_drain_then_now_delivers_every_event_once_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let a = Receiver::start(&dir.path().join("a.db"), &["--delay-ms", "60"]);
    let b = Receiver::start(&dir.path().join("b.db"), &["--delay-ms", "90"]);
    let home = Home::new();
    home.external(&a.endpoint());
    add(&home, "bee", &b.endpoint(), &[]);
    let events: BTreeSet<String> = home.capture(300, "T").into_iter().collect();

    let mut child = home.spawn(&["now", "--batch-events", "10"]);
    wait_until(Duration::from_secs(30), "both targets received something", || {
        a.dump().event_count > 20 && b.dump().event_count > 20
    });
    kill9(&mut child);
    assert!(b.dump().event_count < 300, "the drain was interrupted");

    let run = finish(home.spawn(&["now", "--json", "--batch-events", "50"]), Duration::from_secs(60));
    assert_eq!(run.code, 0, "{}", run.stderr);
    for receiver in [&a, &b] {
        let dump = receiver.dump();
        assert_eq!(dump.event_count, 300);
        assert_eq!(dump.ids().len(), 300, "each event stored exactly once");
        assert_eq!(ids(receiver), events);
    }
    let report = run.json();
    for name in ["primary", "bee"] {
        let e = entry(&report, name);
        assert_eq!(e["selected"], e["delivered"].as_u64().unwrap() + e["duplicate"].as_u64().unwrap(), "{e:#}");
    }
}

#[test]
fn demo_shows_two_targets_at_once_then_a_third_catching_up_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let output = crate::common::bin().env("TMPDIR", tmp.path()).arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    let line = |prefix: &str| stdout.lines().find(|l| l.trim_start().starts_with(prefix)).map(str::to_string);
    assert!(line("A: Delivered 3,").is_some() && line("B: Delivered 3,").is_some(), "{stdout}");
    assert!(line("C: Delivered 15,").is_some(), "{stdout}");
    assert!(line("A, B: nothing to send").is_some(), "{stdout}");
    assert!(stdout.lines().count() <= 40, "under a screen: {stdout}");
}

#[test]
fn a_narrowed_filter_never_lets_gc_purge_what_another_target_still_needs() {
    let dir = tempfile::tempdir().unwrap();
    let b = Receiver::start(&dir.path().join("b.db"), &[]);
    let home = Home::new();
    home.run(&["mode", "local-retention"]).expect(0);
    add(&home, "wide", &closed_endpoint(), &[]);
    add(&home, "narrow", &b.endpoint(), &[]);
    emit_n(&home, 2, "X");
    emit_n(&home, 2, "Y");
    let (run, report) = home.now(&["--retries", "0"]);
    run.expect(4);
    assert_eq!(entry(&report, "narrow")["delivered"], 4);
    // narrow now only takes X; it keeps its Y deliveries from before.
    home.run(&["target", "remove", "narrow"]).expect(0);
    add(&home, "narrow", &b.endpoint(), &["--type", "X"]);
    // wide has none of the four: nothing may be purged or archived, Y included.
    let dry = home.run(&["archive", "--dry-run", "--json"]).expect(0).json();
    assert_eq!(dry["archived"], 0, "{dry:#}");
    let gc = home.run(&["gc", "--json"]).expect(0).json();
    assert_eq!(gc["purged"], 0, "gc purged what `wide` has not received: {gc:#}");
}
