//! A built-in receiver killed with SIGKILL mid-batch (after its commit but before its answer,
//! and at arbitrary points of the request and commit path), restarted on the same database
//! and port: `now` re-runs converge, every event is stored exactly once, none is lost.

use std::time::Duration;

use rusqlite::Connection;

use crate::common::{Home, Receiver, finish};

#[track_caller]
fn assert_converged(home: &Home, receiver: &Receiver, ids: &[String]) {
    // Bounded: a few re-runs, each of which only meets a healthy receiver.
    let converged = (0..5).any(|_| home.now(&[]).0.code == 0);
    assert!(converged, "now never converged");
    let stored = receiver.dump();
    let mut stored_ids = stored.ids();
    stored_ids.sort();
    let mut expected = ids.to_vec();
    expected.sort();
    assert_eq!(stored_ids, expected, "every event stored exactly once, none lost");
    let ledger = &home.status()["delivery_ledger"];
    assert_eq!(ledger["delivered_current_target"], ids.len(), "{ledger}");
    assert_eq!(ledger["transient"], 0, "{ledger}");
    let conn = Connection::open(&receiver.db).unwrap();
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
}

#[test]
fn killed_after_its_commit_before_its_answer() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let mut receiver = Receiver::start(&db, &["--delay-ms", "5000"]);
    let bind = receiver.addr.clone();
    let home = Home::new();
    home.external(&receiver.endpoint());
    let ids = home.capture(10, "Crash");
    let now = home.spawn(&["now", "--json", "--retries", "0"]);
    crate::common::wait_until(Duration::from_secs(20), "the batch to be committed", || {
        receiver.dump().event_count == 10
    });
    // Committed and now sleeping out --delay-ms: the client has no answer yet.
    receiver.stop();
    let run = finish(now, Duration::from_secs(30));
    assert_eq!(run.code, 4, "the unanswered batch is transient: {}\n{}", run.stdout, run.stderr);
    let receiver = Receiver::start_with(&db, &bind, &[], &[]);
    let (run, report) = home.now(&[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(report["duplicate"], 10, "the re-sent batch was already stored: {report}");
    assert_converged(&home, &receiver, &ids);
}

#[test]
fn killed_at_random_points_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let mut receiver = Receiver::start(&db, &[]);
    let bind = receiver.addr.clone();
    let home = Home::new();
    home.external(&receiver.endpoint());
    let ids = home.capture(1500, "Load");
    let now = home.spawn(&["now", "--json", "--batch-events", "25", "--retries", "8"]);
    // Kills at varied moments; every other restart delays its answers, so some kills land
    // between commit and answer, the rest anywhere in reading, parsing and committing.
    for round in 0..10u64 {
        std::thread::sleep(Duration::from_millis(40 + 23 * (round % 5)));
        receiver.stop();
        let delay = if round % 2 == 0 { "30" } else { "0" };
        receiver = Receiver::start_with(&db, &bind, &["--delay-ms", delay], &[]);
    }
    let run = finish(now, Duration::from_secs(120));
    assert!(matches!(run.code, 0 | 4), "{}\n{}", run.stdout, run.stderr);
    assert_converged(&home, &receiver, &ids);
}
