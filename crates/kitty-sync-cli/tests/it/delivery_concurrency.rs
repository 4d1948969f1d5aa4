//! Issue 4, concurrent processes and crashes: one drain per home (exit 5 or `--wait`),
//! capture during a drain, and `kill -9` of `now` at random moments.

use crate::common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Home, Receiver, finish, kill9, wait_until};

#[test]
fn two_drains_at_once_one_is_busy_or_waits_and_emit_is_never_blocked() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    // 400 ms before every response (health included); the first drain holds the lock ~1.2 s.
    let receiver = Receiver::start(&dir.path().join("r.db"), &["--delay-ms", "400"]);
    let ids = home.capture(6, "Busy");
    home.external(&receiver.endpoint());

    let first = home.spawn(&["now", "--batch-events", "3", "--json"]);
    // The first drain has posted (so it holds the lock) once the receiver stored a batch.
    wait_until(Duration::from_secs(10), "the first batch", || receiver.dump().batch_requests >= 1);

    let busy = home.run(&["now"]);
    assert_eq!(busy.code, 5, "{busy:?}");
    assert!(busy.stderr.contains("another kitty-sync drain") && busy.stderr.contains("hint:"), "{}", busy.stderr);
    assert!(busy.stderr.contains("--wait"), "{}", busy.stderr);

    // Capture is never blocked by a drain, and what it captured is durable.
    let started = Instant::now();
    let late = home.emit("CapturedDuringDrain", r#"{"late": true}"#);
    assert!(started.elapsed() < Duration::from_secs(3), "emit waited for the drain: {:?}", started.elapsed());

    // A second drain that waits gets its turn after the first.
    let waiter = home.spawn(&["now", "--wait", "20", "--json"]);
    let first = finish(first, Duration::from_secs(20)).expect(0);
    let waiter = finish(waiter, Duration::from_secs(20)).expect(0);
    let (a, b) = (first.json(), waiter.json());
    let delivered = a["delivered"].as_u64().unwrap() + b["delivered"].as_u64().unwrap();
    assert_eq!(delivered, 7, "the six, and the late one exactly once:\n{a:#}\n{b:#}");
    let mut all = ids.clone();
    all.push(late.clone());
    assert_eq!(receiver.dump().ids().into_iter().collect::<BTreeSet<_>>(), all.into_iter().collect());
    assert_eq!(home.status()["delivery_ledger"]["undelivered_current_target"], 0);
    assert_eq!(home.inspect(&late)["event_type"], "CapturedDuringDrain");
}

/// A small xorshift generator, seeded from the clock (printed so a failure can be replayed).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn kill_9_of_now_at_random_moments_then_now_again_delivers_exactly_once() {
    let seed = std::env::var("KS_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    eprintln!("kill -9 rounds with KS_KILL_SEED={seed}");
    let mut rng = Rng(seed);
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&dir.path().join("r.db"), &["--delay-ms", "150"]);
    let mut ids = home.capture(24, "Crash");
    home.external(&receiver.endpoint());

    for round in 0..3 {
        if round == 1 {
            // New events arrive between crashes too.
            ids.extend(home.capture(6, "Crash"));
        }
        let mut child = home.spawn(&["now", "--batch-events", "4", "--retries", "0"]);
        std::thread::sleep(Duration::from_millis(100 + rng.below(900)));
        kill9(&mut child);
        // The store stays readable and consistent after every kill.
        let status = home.status();
        assert_eq!(status["event_journal"]["retained_event_count"], if round == 0 { 24 } else { 30 });
    }
    let (run, report) = home.now(&["--batch-events", "4"]);
    run.expect(0);
    let dump = receiver.dump();
    let stored: Vec<String> = dump.ids();
    let distinct: BTreeSet<String> = stored.iter().cloned().collect();
    assert_eq!(stored.len(), 30, "{report:#}");
    assert_eq!(distinct.len(), 30, "each event stored exactly once");
    assert_eq!(dump.event_count, 30);
    assert_eq!(distinct, ids.iter().cloned().collect::<BTreeSet<_>>(), "none lost, nothing foreign");
    // Byte-identical, and the ledger agrees with the receiver.
    for (id, envelope) in &dump.envelopes {
        assert_eq!(&home.stored_envelope(id), envelope);
        let status = home.ledger_status(id, &receiver.base());
        assert!(matches!(status.as_deref(), Some("success" | "duplicate")), "{id}: {status:?}");
    }
    let status = home.status();
    assert_eq!(status["delivery_ledger"]["undelivered_current_target"], 0, "{status:#}");
    assert_eq!(status["delivery_ledger"]["delivered_current_target"], 30);
    assert_eq!(status["delivery_ledger"]["transient"], 0);
    assert_eq!(status["delivery_ledger"]["pending"], 0);
    assert_eq!(status["delivery_targets"]["current"]["delivered_count"], 30);
    // A last run has nothing to do.
    let before = receiver.dump().batch_requests;
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["selected"], 0);
    assert_eq!(receiver.dump().batch_requests, before);
}

/// Issue 10, defect 1: the running drain itself parks an event; an operator's `retry` of it
/// while that drain still runs must neither be lost to the drain's frontier nor race it: it
/// is refused as busy (exit 5), or waits with `--wait` and then makes the event due.
#[test]
fn retry_during_a_drain_is_busy_or_waits_and_is_never_lost() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&dir.path().join("r.db"), &["--max-event-bytes", "2000", "--delay-ms", "250"]);
    let big = home.emit("Big", &format!("{{\"blob\": \"{}\"}}", "x".repeat(5000)));
    home.capture(6, "Later");
    home.external(&receiver.endpoint());

    // One event per batch: the drain parks the big one first (413 alone), then goes on.
    let drain = home.spawn(&["now", "--batch-events", "1", "--retries", "0", "--json"]);
    wait_until(Duration::from_secs(20), "the drain to park the big event", || {
        let targets = home.inspect(&big)["targets"].clone();
        targets.as_array().is_some_and(|t| t.iter().any(|t| t["status"] == "terminal_failed"))
    });
    let busy = home.run(&["retry", &big]);
    assert_eq!(busy.code, 5, "{busy:?}");
    assert!(busy.stderr.contains("hint:") && busy.stderr.contains("--wait"), "{}", busy.stderr);
    // Replacing journal bytes is refused the same way while a batch may be in flight.
    let resolve = home.run(&["migrate", "resolve", &big, "--keep", "incoming"]);
    assert_eq!(resolve.code, 5, "{resolve:?}");
    let waited = home.run(&["retry", &big, "--wait", "30"]).expect(0);
    assert!(waited.stdout.contains("Requeued 1"), "{}", waited.stdout);
    let first = finish(drain, Duration::from_secs(30));
    assert_eq!(first.code, 4, "{first:?}");
    assert_eq!(first.json()["delivered"], 6);

    // The requeued event is due: the next drain selects it (and parks it again: 413 alone).
    assert_eq!(home.ledger_status(&big, &receiver.base()).as_deref(), Some("pending"));
    let (run, report) = home.now(&["--retries", "0"]);
    run.expect(4);
    assert_eq!(
        (report["selected"].clone(), report["terminal_failed"].clone()),
        (serde_json::json!(1), serde_json::json!(1))
    );
    assert_eq!(report["failures"][0]["event_id"], big.as_str());
}

#[test]
fn kill_9_after_the_receiver_stored_a_batch_then_now_again_gets_duplicates() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    // The receiver commits a batch, then waits 800 ms before answering: the kill lands
    // after the receiver stored the events but before we recorded anything.
    let receiver = Receiver::start(&dir.path().join("r.db"), &["--delay-ms", "800"]);
    let ids = home.capture(5, "Stored");
    home.external(&receiver.endpoint());
    let mut child = home.spawn(&["now"]);
    wait_until(Duration::from_secs(10), "the batch to be stored", || receiver.dump().event_count == 5);
    kill9(&mut child);
    assert_eq!(home.ledger_status(&ids[0], &receiver.base()), None, "nothing recorded before the answer");
    assert_eq!(home.status()["delivery_ledger"]["undelivered_current_target"], 5);

    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(
        (report["delivered"].clone(), report["duplicate"].clone()),
        (serde_json::json!(0), serde_json::json!(5))
    );
    let dump = receiver.dump();
    assert_eq!((dump.event_count, dump.batch_requests), (5, 2));
    assert_eq!(dump.ids(), ids);
    assert_eq!(home.ledger_status(&ids[4], &receiver.base()).as_deref(), Some("duplicate"));
    let status = home.status();
    assert_eq!(status["delivery_ledger"]["delivered_current_target"], 5, "duplicate is a terminal success");
    assert_eq!(status["delivery_ledger"]["undelivered_current_target"], 0);
}
