//! Issue 4, receiver faults from the outside: every fault ends with the right ledger states,
//! nothing lost, the right exit code and a useful message.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{FakeResponse, FakeServer, Home, Receiver, attempt_outcomes, closed_endpoint};
use serde_json::json;

#[test]
fn every_other_batch_503_is_retried_until_all_are_delivered() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&dir.path().join("r.db"), &["--fail-every", "2"]);
    let ids = home.capture(6, "Flaky");
    home.external(&receiver.endpoint());
    let (run, report) = home.now(&["--batch-events", "3", "--retries", "1"]);
    run.expect(0);
    assert_eq!(report["delivered"], 6);
    assert_eq!(report["batches"], 3, "two batches, one of them posted twice: {report:#}");
    let dump = receiver.dump();
    assert_eq!(dump.ids(), ids);
    assert_eq!((dump.requests_with(200), dump.requests_with(503)), (2, 1));
    // The second batch's events show the transient attempt, then the success.
    let inspection = home.inspect(&ids[4]);
    assert_eq!(attempt_outcomes(&inspection, &receiver.base()), vec!["failed_transient", "success"]);
    let attempts = &common::target_of(&inspection, &receiver.base())["attempts"];
    assert_eq!(attempts[0]["http_status"], 503);
    assert_eq!(attempts[1]["http_status"], 200);
    assert_eq!(attempt_outcomes(&home.inspect(&ids[0]), &receiver.base()), vec!["success"]);
    let status = home.status();
    assert_eq!(status["delivery_ledger"]["transient"], 0);
    assert_eq!(status["delivery_ledger"]["delivered_current_target"], 6);
}

#[test]
fn retry_after_of_a_429_is_honoured() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    // The receiver sends `Retry-After: 1` with its 429s; our own backoff would wait ≤ 0.5 s.
    let receiver = Receiver::start(&dir.path().join("r.db"), &["--fail-every", "2", "--fail-status", "429"]);
    let ids = home.capture(4, "Throttled");
    home.external(&receiver.endpoint());
    let (run, report) = home.now(&["--batch-events", "2", "--retries", "1"]);
    run.expect(0);
    assert_eq!(report["delivered"], 4);
    assert!(report["elapsed_ms"].as_u64().unwrap() >= 1000, "waited for Retry-After: {report:#}");
    assert_eq!(receiver.dump().requests_with(429), 1);
    let inspection = home.inspect(&ids[3]);
    assert_eq!(attempt_outcomes(&inspection, &receiver.base()), vec!["failed_transient", "success"]);
    assert_eq!(common::target_of(&inspection, &receiver.base())["attempts"][0]["http_status"], 429);
}

/// Issue 10, defect 7: `Retry-After` as an HTTP date is honoured (the drain waits until then).
#[test]
fn retry_after_as_an_http_date_is_honoured() {
    let home = Home::new();
    let ids = home.capture(2, "Dated");
    let refused = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&refused);
    let server = FakeServer::start(move |request| {
        if !request.is_batch() {
            return FakeResponse::text(404, "no such page");
        }
        if counter.fetch_add(1, Ordering::SeqCst) > 0 {
            return FakeResponse::all_success(request);
        }
        let at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3);
        let mut reply = FakeResponse::json(503, &json!({ "error": "maintenance" }));
        reply.headers.push(("Retry-After".into(), at.strftime("%a, %d %b %Y %H:%M:%S GMT").to_string()));
        reply
    });
    home.external(&server.endpoint());
    let (run, report) = home.now(&["--retries", "1"]);
    run.expect(0);
    assert_eq!(report["delivered"], 2);
    // Our own first backoff step is at most 0.5 s; the date asked for 2–3 s.
    assert!(report["elapsed_ms"].as_u64().unwrap() >= 1900, "waited for the date: {report:#}");
    assert_eq!(refused.load(Ordering::SeqCst), 2);
    assert_eq!(attempt_outcomes(&home.inspect(&ids[0]), &server.base()), vec!["failed_transient", "success"]);
}

#[test]
fn connection_refused_loses_nothing_and_the_next_run_delivers() {
    let home = Home::new();
    let ids = home.capture(5, "Offline");
    let endpoint = closed_endpoint();
    home.external(&endpoint);
    let (run, report) = home.now(&["--retries", "1"]);
    let run = run.expect(4);
    assert_eq!((report["delivered"].clone(), report["transient"].clone()), (json!(0), json!(5)));
    assert_eq!(report["failures"].as_array().unwrap().len(), 5);
    assert!(run.stderr.contains("hint:"), "{}", run.stderr);
    for id in &ids {
        assert_eq!(home.ledger_status(id, "http://127.0.0.1").as_deref(), Some("failed_transient"));
    }
    // Two attempts each (the try and one retry), none of them a content rejection.
    assert_eq!(attempt_outcomes(&home.inspect(&ids[0]), "http://127.0.0.1"), vec!["failed_transient"; 2]);
    let status = home.status();
    assert_eq!(status["delivery_ledger"]["transient"], 5);
    assert_eq!(status["delivery_ledger"]["rejected"], 0);
    assert_eq!(status["delivery_ledger"]["undelivered_current_target"], 5);
    assert_eq!(status["event_journal"]["retained_event_count"], 5);

    // A receiver on that very port now: the next run delivers everything.
    let dir = tempfile::tempdir().unwrap();
    let bind = endpoint.trim_start_matches("http://").split('/').next().unwrap().to_string();
    let receiver = Receiver::start_with(&dir.path().join("r.db"), &bind, &[], &[]);
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["delivered"], 5);
    assert_eq!(receiver.dump().ids(), ids);
    assert_eq!(home.status()["delivery_ledger"]["transient"], 0);
}

#[test]
fn a_slow_receiver_past_the_timeout_is_transient() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&dir.path().join("r.db"), &["--delay-ms", "3000"]);
    let ids = home.capture(3, "Slow");
    home.external(&receiver.endpoint());
    let started = std::time::Instant::now();
    let (run, report) = home.now(&["--timeout", "1", "--retries", "0"]);
    run.expect(4);
    // Without the 1 s timeout this takes over 6 s (3 s for health, 3 s for the batch).
    assert!(started.elapsed() < std::time::Duration::from_millis(5000), "the timeout was applied");
    assert_eq!(report["transient"], 3);
    let failure = &report["failures"][0];
    assert_eq!(failure["outcome"], "failed_transient");
    assert!(failure["error"].as_str().unwrap().contains("timeout"), "{failure:#}");
    assert_eq!(home.ledger_status(&ids[0], &receiver.base()).as_deref(), Some("failed_transient"));
}

#[test]
fn rejected_events_are_resent_three_times_then_held_until_retry_rejected() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&dir.path().join("r.db"), &["--reject-type", "Poison"]);
    let good = home.capture(4, "Fine");
    let bad = home.capture(2, "Poison");
    home.external(&receiver.endpoint());

    for round in 1..=3 {
        let (run, report) = home.now(&["--retries", "0"]);
        run.expect(4);
        assert_eq!(report["rejected"], 2, "round {round}: {report:#}");
        assert_eq!(report["delivered"], if round == 1 { 4 } else { 0 });
        assert_eq!(report["failures"][0]["outcome"], "rejected");
        assert!(report["failures"][0]["error"].as_str().unwrap().contains("Poison"), "{report:#}");
        assert_eq!(receiver.dump().batch_requests, round);
    }
    // Held: a fourth run does not send them again.
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["selected"], 0);
    assert_eq!(receiver.dump().batch_requests, 3, "held events are not re-sent");
    assert_eq!(home.ledger_status(&bad[0], &receiver.base()).as_deref(), Some("rejected"));
    assert_eq!(attempt_outcomes(&home.inspect(&bad[1]), &receiver.base()), vec!["rejected"; 3]);
    assert_eq!(home.status()["delivery_ledger"]["rejected"], 2);

    // `retry` without --rejected leaves them alone; with it they are due again.
    let run = home.run(&["retry", &bad[0]]).expect(0);
    assert!(run.stdout.contains("Requeued 0"), "{}", run.stdout);
    assert_eq!(home.now(&[]).1["selected"], 0);
    home.run(&["retry", "--rejected"]).expect(0);
    let (run, report) = home.now(&[]);
    run.expect(4);
    assert_eq!((report["selected"].clone(), report["rejected"].clone()), (json!(2), json!(2)));
    assert_eq!(receiver.dump().batch_requests, 4);
    assert_eq!(receiver.dump().ids(), good, "only the good ones are stored");
}

#[test]
fn one_oversized_event_is_parked_and_the_others_delivered() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&dir.path().join("r.db"), &["--max-event-bytes", "2000"]);
    let before = home.capture(5, "Small");
    let big = home.emit("Big", &format!("{{\"blob\": \"{}\"}}", "x".repeat(5000)));
    let after = home.capture(5, "Small");
    home.external(&receiver.endpoint());

    let (run, report) = home.now(&["--retries", "0"]);
    run.expect(4);
    assert_eq!((report["delivered"].clone(), report["terminal_failed"].clone()), (json!(10), json!(1)));
    assert_eq!(report["failures"][0]["event_id"], big.as_str());
    assert!(report["failures"][0]["error"].as_str().unwrap().contains("oversized"), "{report:#}");
    let mut all = before.clone();
    all.extend(after.iter().cloned());
    assert_eq!(receiver.dump().ids(), all);
    assert_eq!(home.ledger_status(&big, &receiver.base()).as_deref(), Some("terminal_failed"));
    let status = home.status();
    assert_eq!(status["delivery_ledger"]["terminal_failed"], 1);
    assert_eq!(status["terminal_failures"]["events"][0]["event_id"], big.as_str());

    // Parked: not selected again until an operator's retry.
    let requests = receiver.dump().batch_requests;
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["selected"], 0);
    assert_eq!(receiver.dump().batch_requests, requests);
    let run = home.run(&["retry", "--all-parked"]).expect(0);
    assert!(run.stdout.contains("Requeued 1"), "{}", run.stdout);
    assert_eq!(home.ledger_status(&big, &receiver.base()).as_deref(), Some("pending"));
    // Due again: alone in its batch it gets 413 and is parked again.
    let (run, report) = home.now(&["--retries", "0"]);
    run.expect(4);
    assert_eq!((report["selected"].clone(), report["terminal_failed"].clone()), (json!(1), json!(1)));
    assert_eq!(report["failures"][0]["http_status"], 413);
    assert_eq!(
        attempt_outcomes(&home.inspect(&big), &receiver.base()),
        vec!["terminal_failed", "terminal_failed"],
        "history is kept"
    );
}

#[test]
fn a_413_for_the_whole_body_splits_the_batch() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    // Each envelope is ~160 bytes: a 12-event body is far over 700 bytes, 3 events are not.
    let receiver = Receiver::start(&dir.path().join("r.db"), &["--max-body-bytes", "700"]);
    let ids = home.capture(12, "Chunky");
    home.external(&receiver.endpoint());
    let (run, report) = home.now(&["--retries", "0"]);
    run.expect(0);
    assert_eq!((report["delivered"].clone(), report["terminal_failed"].clone()), (json!(12), json!(0)));
    let dump = receiver.dump();
    assert_eq!(dump.ids(), ids);
    assert!(dump.requests_with(413) >= 1, "{:#}", dump.json);
    assert_eq!(dump.requests_with(200) + dump.requests_with(413), report["batches"].as_u64().unwrap());
}

#[test]
fn a_401_stops_with_exit_3_and_a_hint_then_the_right_token_delivers() {
    let mut home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let env = [("KS_EXTERNAL_TOKEN_R", "s3cret-r")];
    let receiver = Receiver::start_env(&dir.path().join("r.db"), &["--token-env", "KS_EXTERNAL_TOKEN_R"], &env);
    let ids = home.capture(3, "Guarded");
    home.run(&["mode", "external-receiver", "--endpoint", &receiver.endpoint(), "--token-env", "KS_MY_TOKEN"])
        .expect(0);

    // Token variable missing: a warning, the 401, exit 3 with a hint.
    let run = home.run(&["now", "--retries", "0"]).expect(3);
    assert!(run.stderr.contains("KS_MY_TOKEN"), "{}", run.stderr);
    assert!(run.stderr.contains("401") && run.stderr.contains("hint:"), "{}", run.stderr);
    // A wrong token: the same.
    home.set_env("KS_MY_TOKEN", "wrong");
    let run = home.run(&["now", "--json"]).expect(3);
    let report = run.json();
    assert_eq!(report["delivered"], 0);
    assert_eq!(report["failures"][0]["http_status"], 401, "{report:#}");
    assert!(!run.stdout.contains("wrong") && !run.stderr.contains("wrong"), "no secrets in output");
    assert_eq!(receiver.dump().event_count, 0);
    assert_eq!(receiver.dump().requests_with(401), 2);
    assert_eq!(home.ledger_status(&ids[0], &receiver.base()).as_deref(), Some("failed_transient"));

    home.set_env("KS_MY_TOKEN", "s3cret-r");
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["delivered"], 3);
    assert_eq!(receiver.dump().ids(), ids);
}

#[test]
fn a_400_with_details_rejects_only_the_named_event() {
    let home = Home::new();
    let ids = home.capture(6, "Checked");
    let bad = ids[2].clone();
    let culprit = bad.clone();
    let server = FakeServer::start(move |request| {
        if !request.is_batch() {
            return FakeResponse::text(404, "no such page");
        }
        if request.event_ids().contains(&culprit) {
            let details = json!([{ "event_id": culprit, "detail": "aggregate_id is not allowed here" }]);
            return FakeResponse::json(400, &json!({ "error": "validation failed", "details": details.to_string() }));
        }
        FakeResponse::all_success(request)
    });
    home.external(&server.endpoint());
    let (run, report) = home.now(&["--retries", "0"]);
    run.expect(4);
    assert_eq!((report["delivered"].clone(), report["rejected"].clone()), (json!(5), json!(1)));
    assert_eq!(report["failures"][0]["event_id"], bad.as_str());
    assert_eq!(report["failures"][0]["error"], "aggregate_id is not allowed here");
    assert_eq!(report["failures"][0]["http_status"], 400);
    let batches = server.batches();
    assert_eq!(batches.len(), 2, "the batch, then the others re-sent once");
    assert_eq!(batches[1].event_ids(), ids.iter().filter(|id| **id != bad).cloned().collect::<Vec<_>>());
    assert_eq!(home.ledger_status(&bad, &server.base()).as_deref(), Some("rejected"));
    assert_eq!(home.ledger_status(&ids[0], &server.base()).as_deref(), Some("success"));
}

#[test]
fn a_400_without_details_is_bisected_to_the_bad_event() {
    let home = Home::new();
    let ids = home.capture(8, "Checked");
    let bad = ids[5].clone();
    let culprit = bad.clone();
    let server = FakeServer::start(move |request| {
        if !request.is_batch() {
            return FakeResponse::text(404, "no such page");
        }
        if request.event_ids().contains(&culprit) {
            return FakeResponse::json(400, &json!({ "error": "bad request" }));
        }
        FakeResponse::all_success(request)
    });
    home.external(&server.endpoint());
    let (run, report) = home.now(&["--retries", "0"]);
    run.expect(4);
    assert_eq!((report["delivered"].clone(), report["rejected"].clone()), (json!(7), json!(1)), "{report:#}");
    assert_eq!(report["failures"].as_array().unwrap().len(), 1);
    assert_eq!(report["failures"][0]["event_id"], bad.as_str());
    // 8 → 4+4 → (4 ok) 2+2 → (2 ok) 1+1: 1 + 2 + 2 + 2 = 7 posts, every good event sent once.
    let batches = server.batches();
    assert_eq!(batches.len(), 7, "{:?}", batches.iter().map(|b| b.event_ids().len()).collect::<Vec<_>>());
    let accepted: Vec<String> =
        batches.iter().filter(|b| !b.event_ids().contains(&bad)).flat_map(|b| b.event_ids()).collect();
    assert_eq!(accepted.len(), 7, "each good event accepted exactly once");
    assert_eq!(home.ledger_status(&bad, &server.base()).as_deref(), Some("rejected"));
    for id in ids.iter().filter(|id| **id != bad) {
        assert_eq!(home.ledger_status(id, &server.base()).as_deref(), Some("success"));
    }
}

#[test]
fn a_garbage_200_body_is_transient_and_loses_nothing() {
    let home = Home::new();
    let ids = home.capture(3, "Garbled");
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let server = FakeServer::start(move |request| {
        if !request.is_batch() {
            return FakeResponse::text(404, "no such page");
        }
        // Garbage first (HTML, then JSON without results), then a proper answer.
        match counter.fetch_add(1, Ordering::SeqCst) {
            0 => FakeResponse::text(200, "<html><body>Welcome to nginx!</body></html>"),
            1 => FakeResponse::json(200, &json!({ "ok": true })),
            _ => FakeResponse::all_success(request),
        }
    });
    home.external(&server.endpoint());
    let (run, report) = home.now(&["--retries", "0"]);
    run.expect(4);
    assert_eq!(report["transient"], 3);
    assert_eq!(report["rejected"], 0, "a garbage body is never a content verdict");
    assert_eq!(home.ledger_status(&ids[0], &server.base()).as_deref(), Some("failed_transient"));
    let (run, report) = home.now(&["--retries", "0"]);
    run.expect(4);
    assert_eq!(report["transient"], 3);
    let (run, report) = home.now(&["--retries", "0"]);
    run.expect(0);
    assert_eq!(report["delivered"], 3);
    assert_eq!(
        attempt_outcomes(&home.inspect(&ids[1]), &server.base()),
        vec!["failed_transient", "failed_transient", "success"]
    );
}

#[test]
fn a_413_caused_by_one_large_event_parks_only_that_event() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    // A proxy-style body limit: any body holding the large event is refused with 413.
    let receiver = Receiver::start(&dir.path().join("r.db"), &["--max-body-bytes", "3000"]);
    let before = home.capture(6, "Small");
    let big = home.emit("Big", &format!("{{\"blob\": \"{}\"}}", "y".repeat(4000)));
    let after = home.capture(6, "Small");
    home.external(&receiver.endpoint());
    let (run, report) = home.now(&["--retries", "0"]);
    run.expect(4);
    assert_eq!((report["delivered"].clone(), report["terminal_failed"].clone()), (json!(12), json!(1)), "{report:#}");
    assert_eq!(report["failures"].as_array().unwrap().len(), 1);
    assert_eq!(report["failures"][0]["event_id"], big.as_str());
    assert_eq!(report["failures"][0]["http_status"], 413);
    assert!(report["failures"][0]["error"].as_str().unwrap().starts_with("oversized"), "{report:#}");
    let mut all = before;
    all.extend(after);
    let mut stored = receiver.dump().ids();
    stored.sort();
    all.sort();
    assert_eq!(stored, all);
    assert_eq!(home.ledger_status(&big, &receiver.base()).as_deref(), Some("terminal_failed"));
    // The drain went on past it, and a re-run has nothing to do.
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["selected"], 0);
}

#[test]
fn pending_and_missing_results_are_sent_again_by_the_next_run() {
    let home = Home::new();
    let ids = home.capture(4, "Queued");
    let (queued, missing) = (ids[1].clone(), ids[3].clone());
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let (queued_id, missing_id) = (queued.clone(), missing.clone());
    let server = FakeServer::start(move |request| {
        let (queued, missing) = (&queued_id, &missing_id);
        if !request.is_batch() {
            return FakeResponse::text(404, "no such page");
        }
        if counter.fetch_add(1, Ordering::SeqCst) > 0 {
            return FakeResponse::all_success(request);
        }
        let results: Vec<serde_json::Value> = request
            .event_ids()
            .into_iter()
            .filter(|id| id != missing)
            .map(|id| {
                let status = if id == *queued { "queued" } else { "accepted" };
                json!({"event_id": id, "status": status})
            })
            .collect();
        FakeResponse::json(200, &json!({ "results": results }))
    });
    home.external(&server.endpoint());
    let (run, report) = home.now(&[]);
    run.expect(4);
    assert_eq!((report["delivered"].clone(), report["pending"].clone()), (json!(2), json!(2)), "{report:#}");
    assert_eq!(home.ledger_status(&queued, &server.base()).as_deref(), Some("pending"));
    assert_eq!(home.ledger_status(&missing, &server.base()).as_deref(), Some("pending"));
    assert_eq!(home.status()["delivery_ledger"]["pending"], 2);
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["delivered"], 2);
    assert_eq!(server.batches()[1].event_ids(), vec![queued, missing]);
}
