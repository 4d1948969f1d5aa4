//! The dispatcher in process and deterministically: a scripted receiver, a fake clock whose
//! sleeps are only recorded, regression tests of the defects of issue 10, and a model-based
//! property test over random reply sequences.

use std::collections::HashSet;
use std::time::Duration;

use proptest::prelude::*;

use super::backoff::{RETRY_AFTER_CAP, RetryAfter};
use super::dispatcher::{DrainOptions, DrainSummary, drain_paced};
use super::lock::{self, DrainLock};
use super::scripted::{EventAnswer, FakePacer, Reply, ScriptedReceiver};
use super::target::{self, TargetRecord};
use crate::event_journal::{CapturePolicy, Journal, NewEvent};
use crate::home::Home;
use crate::mode::EventSyncMode;
use crate::store::Store;
use crate::store::selection::{DueQuery, select_due, settled_sql};

struct Setup {
    _dir: tempfile::TempDir,
    store: Store,
    lock: DrainLock,
}

fn setup(events: usize) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::at(dir.path());
    let mut store = Store::open(&home).unwrap();
    let policy = CapturePolicy { mode: EventSyncMode::ExternalReceiver, ..CapturePolicy::default() };
    let mut journal = Journal::new(&mut store, policy);
    for i in 0..events {
        journal
            .append(NewEvent {
                event_type: "T".into(),
                payload: Some(serde_json::json!({ "i": i })),
                ..NewEvent::default()
            })
            .unwrap();
    }
    let lock = lock::acquire(&home, Duration::ZERO, "test").unwrap();
    Setup { _dir: dir, store, lock }
}

fn options(batch_events: usize, retries: u32) -> DrainOptions {
    DrainOptions { batch_events, retries, backoff_base: Duration::from_millis(100), ..DrainOptions::default() }
}

fn run(s: &mut Setup, receiver: &mut ScriptedReceiver, options: &DrainOptions, pacer: &mut FakePacer) -> DrainSummary {
    drain_paced(&mut s.store, &s.lock, receiver, options, pacer, false, &mut |_, _| {}).unwrap()
}

fn record(s: &Setup, receiver: &ScriptedReceiver) -> TargetRecord {
    use super::receiver::Receiver;
    target::find(s.store.conn(), receiver.identity()).unwrap().unwrap()
}

#[test]
fn a_scripted_drain_splits_on_413_and_records_what_the_receiver_said() {
    let mut s = setup(5);
    let answers = vec![EventAnswer::Success, EventAnswer::Duplicate, EventAnswer::Rejected];
    let mut receiver = ScriptedReceiver::new([Reply::Status(413, None), Reply::PerEvent(answers)]);
    let summary = run(&mut s, &mut receiver, &options(10, 0), &mut FakePacer::new());
    // 413 on five: the halves are sent on their own; the script answers the first (two
    // events: success, duplicate), the second (three) gets the default success.
    assert_eq!(receiver.posts, 3);
    assert_eq!((summary.delivered, summary.duplicate, summary.rejected), (4, 1, 0), "{summary:?}");
    assert_eq!(summary.selected, 5);
    assert!(ledger_delivered(&s.store, &record(&s, &receiver)).iter().all(|id| receiver.acknowledged.contains(id)));
}

/// Issue 10, defect 0: re-draining the same journal to a second and a third target after
/// the first holds everything delivers everything again and keeps every counter exact.
#[test]
fn second_and_third_target_after_the_first_has_everything() {
    let mut s = setup(40);
    for (i, url) in ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b", "http://127.0.0.1:9/c"].iter().enumerate() {
        let mut receiver = ScriptedReceiver::at(url, []);
        let summary = run(&mut s, &mut receiver, &options(7, 0), &mut FakePacer::new());
        assert_eq!((summary.selected, summary.delivered), (40, 40), "target {i}");
        assert_eq!(receiver.acknowledged.len(), 40);
    }
    let conn = s.store.conn();
    let live = crate::store::stats::journal_counters(conn).unwrap();
    let exclusive: i64 =
        conn.query_row("SELECT sum(value) FROM target_stats WHERE key = 'exclusive'", [], |r| r.get(0)).unwrap();
    assert_eq!((live.delivered_any, exclusive), (40, 0), "every event is on three targets, none exclusive");
    crate::store::stats::rebuild(conn).unwrap();
    assert_eq!(crate::store::stats::journal_counters(conn).unwrap(), live);
    let rebuilt: i64 =
        conn.query_row("SELECT sum(value) FROM target_stats WHERE key = 'exclusive'", [], |r| r.get(0)).unwrap();
    assert_eq!(rebuilt, exclusive);
}

/// Regression (issue 10, defect 2): a drain must not leave the caller's connection with
/// relaxed durability; captures through the same `Store` afterwards are fsynced.
#[test]
fn a_drain_leaves_captures_durable() {
    let mut s = setup(3);
    let full: i64 = s.store.conn().query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
    assert_eq!(full, 2, "stores open with synchronous=FULL");
    run(&mut s, &mut ScriptedReceiver::new([]), &options(10, 0), &mut FakePacer::new());
    let after: i64 = s.store.conn().query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
    assert_eq!(after, 2, "synchronous=FULL is back after the drain");
    // Also after a drain that stops with an error part-way.
    let mut failing = ScriptedReceiver::new([Reply::Transport]);
    let summary = run(&mut s, &mut failing, &options(10, 0), &mut FakePacer::new());
    assert!(summary.stop.is_none(), "nothing was due");
    let after: i64 = s.store.conn().query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
    assert_eq!(after, 2);
}

/// Regression (issue 10, defect 4): a 413 splits the batch, the left half then fails until
/// the drain stops; the right half was never sent and must be counted as pending.
#[test]
fn counts_add_up_when_a_split_half_stops_the_drain() {
    let mut s = setup(4);
    let script = [Reply::Status(413, None), Reply::Status(503, None), Reply::Status(503, None)];
    let mut receiver = ScriptedReceiver::new(script);
    let summary = run(&mut s, &mut receiver, &options(10, 1), &mut FakePacer::new());
    assert!(summary.stop.is_some());
    assert_eq!(summary.selected, 4);
    assert_eq!((summary.transient, summary.pending), (2, 2), "{summary:?}");
    assert_eq!(summary.counted(), summary.selected);
    // Nothing was lost: the next drain selects all four again.
    let next = run(&mut s, &mut receiver, &options(10, 1), &mut FakePacer::new());
    assert_eq!((next.selected, next.delivered), (4, 4));
}

/// Regression (issue 10, defect 7): `Retry-After` as an HTTP date is honoured, and capped.
#[test]
fn retry_after_dates_are_waited_for_up_to_the_cap() {
    let mut s = setup(1);
    let mut pacer = FakePacer::new();
    let soon = RetryAfter::At(pacer.now + Duration::from_secs(30));
    let much_later = RetryAfter::At(pacer.now + Duration::from_secs(86_400));
    let script = [Reply::Status(503, Some(soon)), Reply::Status(429, Some(much_later))];
    let mut receiver = ScriptedReceiver::new(script);
    let summary = run(&mut s, &mut receiver, &options(10, 3), &mut pacer);
    assert_eq!(summary.delivered, 1);
    assert_eq!(pacer.sleeps, vec![Duration::from_secs(30), RETRY_AFTER_CAP]);
}

fn answer() -> impl Strategy<Value = EventAnswer> {
    prop_oneof![
        4 => Just(EventAnswer::Success),
        1 => Just(EventAnswer::Duplicate),
        1 => Just(EventAnswer::Pending),
        1 => Just(EventAnswer::Rejected),
        1 => Just(EventAnswer::Omitted),
    ]
}

fn retry_after() -> impl Strategy<Value = Option<RetryAfter>> {
    prop_oneof![
        2 => Just(None),
        1 => (0u64..400).prop_map(|s| Some(RetryAfter::Delay(Duration::from_secs(s)))),
        1 => (0u64..400).prop_map(|s| Some(RetryAfter::At(FakePacer::new().now + Duration::from_secs(s)))),
    ]
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        4 => proptest::collection::vec(answer(), 1..5).prop_map(Reply::PerEvent),
        1 => Just(Reply::Status(413, None)),
        1 => Just(Reply::BadRequestNamingFirst),
        1 => Just(Reply::BadRequestNoDetails),
        1 => (prop_oneof![Just(500u16), Just(502), Just(503), Just(408), Just(429)], retry_after())
            .prop_map(|(status, after)| Reply::Status(status, after)),
        1 => Just(Reply::Transport),
        1 => Just(Reply::Status(401, None)),
        1 => Just(Reply::Status(422, None)),
    ]
}

/// Seqs of events the target has not settled (the one settled rule).
fn unsettled(store: &Store, record: &TargetRecord) -> HashSet<i64> {
    let sql = concat!(
        "SELECT e.seq FROM events e WHERE NOT EXISTS (SELECT 1 FROM ledger l
         WHERE l.target = ?1 AND l.epoch = ?2 AND l.seq = e.seq AND ",
        settled_sql!("l"),
        ")"
    );
    let mut stmt = store.conn().prepare(sql).unwrap();
    stmt.query_map([record.id, record.epoch], |r| r.get(0)).unwrap().map(|r| r.unwrap()).collect()
}

/// Event ids the ledger says the target holds.
fn ledger_delivered(store: &Store, record: &TargetRecord) -> Vec<String> {
    let mut stmt = store
        .conn()
        .prepare(
            "SELECT e.event_id FROM ledger l JOIN events e ON e.seq = l.seq
             WHERE l.target = ?1 AND l.epoch = ?2 AND l.status IN ('success', 'duplicate')",
        )
        .unwrap();
    stmt.query_map([record.id, record.epoch], |r| r.get(0)).unwrap().map(|r| r.unwrap()).collect()
}

fn check_invariants(s: &Setup, receiver: &ScriptedReceiver, summary: &DrainSummary, pacer: &FakePacer) {
    assert_eq!(summary.counted(), summary.selected, "outcome counts add up to `selected`: {summary:?}");
    let record = record(s, receiver);
    for id in ledger_delivered(&s.store, &record) {
        assert!(receiver.acknowledged.contains(&id), "ledger success for {id} the receiver never acknowledged");
    }
    let open = unsettled(&s.store, &record);
    if let Some(first_open) = open.iter().min() {
        assert!(record.due_from_seq <= *first_open, "frontier {} passed unsettled {first_open}", record.due_from_seq);
    }
    let query = DueQuery {
        target: record.id,
        epoch: record.epoch,
        team: None,
        types: None,
        from_seq: record.due_from_seq,
        limit: 1_000,
    };
    let next: HashSet<i64> = select_due(s.store.conn(), query).unwrap().into_iter().map(|e| e.seq).collect();
    assert_eq!(open, next, "every event is settled for the target or selected by the next drain");
    assert!(pacer.sleeps.iter().all(|d| *d <= RETRY_AFTER_CAP), "{:?}", pacer.sleeps);
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Any sequence of answers, over several drains: the invariants hold after every drain,
    /// and once the receiver accepts everything, one more drain settles every event.
    #[test]
    fn dispatcher_keeps_its_invariants(
        events in 1usize..24,
        batch_events in 1usize..7,
        retries in 0u32..3,
        drains in 1usize..4,
        script in proptest::collection::vec(reply(), 0..30),
    ) {
        let mut s = setup(events);
        let mut receiver = ScriptedReceiver::new(script);
        let mut pacer = FakePacer::new();
        let options = options(batch_events, retries);
        for _ in 0..drains {
            let summary = run(&mut s, &mut receiver, &options, &mut pacer);
            check_invariants(&s, &receiver, &summary, &pacer);
        }
        let mut accepting = ScriptedReceiver::new([]);
        accepting.acknowledged = receiver.acknowledged.clone();
        let summary = run(&mut s, &mut accepting, &options, &mut pacer);
        check_invariants(&s, &accepting, &summary, &pacer);
        prop_assert!(unsettled(&s.store, &record(&s, &accepting)).is_empty());
    }
}
