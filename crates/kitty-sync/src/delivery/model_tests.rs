//! The dispatcher in process and deterministically: a scripted receiver and a fake clock
//! whose sleeps are only recorded.

use std::time::Duration;

use super::dispatcher::{DrainOptions, DrainSummary, drain_paced};
use super::scripted::{EventAnswer, FakePacer, Reply, ScriptedReceiver};
use super::target::{self, TargetRecord};
use crate::event_journal::{CapturePolicy, Journal, NewEvent};
use crate::home::Home;
use crate::mode::EventSyncMode;
use crate::store::Store;


struct Setup {
    _dir: tempfile::TempDir,
    store: Store,
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
    Setup { _dir: dir, store }
}

fn options(batch_events: usize, retries: u32) -> DrainOptions {
    DrainOptions { batch_events, retries, backoff_base: Duration::from_millis(100), ..DrainOptions::default() }
}

fn run(s: &mut Setup, receiver: &mut ScriptedReceiver, options: &DrainOptions, pacer: &mut FakePacer) -> DrainSummary {
    drain_paced(&mut s.store, receiver, options, pacer, false, &mut |_, _| {}).unwrap()
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
