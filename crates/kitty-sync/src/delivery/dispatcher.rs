//! The drain, in four parts: selection (keyset pages of due events, [`super::batch`]),
//! sending (one batch to the receiver with retries, [`Sender`]), recording (ledger rows and
//! attempts, [`super::ledger`]) and backoff ([`super::backoff`]). This module walks the
//! journal in capture order, splits batches the receiver refuses, keeps the per-target
//! frontier and counts outcomes. Nothing in the journal is ever deleted or modified here.
//!
//! Everything about one target (its ledger key, frontier, counts) lives in [`TargetRun`],
//! apart from the reading of batches, so one batch can later be offered to several targets.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::backoff::{Backoff, Pacer, SystemPacer};
use super::batch::{SharedBatches, encode_batch, prefetch};
use super::ledger::{self, EventResult, LedgerKey};
use super::lock::DrainLock;
use super::receiver::Receiver;
use super::reset;
use super::target::{self, TargetKind, TargetRecord};
use super::wire::{Outcome, Verdict, map_reply};
use crate::error::{Error, Result, StoreContext};
use crate::store::Store;
use crate::store::selection::{DueEvent, DueQuery};

#[derive(Debug, Clone)]
pub struct DrainOptions {
    /// Deliver at most this many events.
    pub limit: Option<u64>,
    pub batch_events: usize,
    /// Uncompressed `{"events":[...]}` body size bound.
    pub batch_bytes: usize,
    /// Re-sends of a batch after a transient failure.
    pub retries: u32,
    /// First backoff step (doubles each retry, with jitter).
    pub backoff_base: Duration,
    /// Start a new epoch for the target first: every retained event is delivered again
    /// (after the server behind the URL was reset).
    pub redrain: bool,
    /// Only events of these types go to the target (contract §9); `None`: every type.
    pub types: Option<Vec<String>>,
    /// The batches of a fan-out run, shared by its targets (read and compressed once).
    pub shared: Option<Arc<SharedBatches>>,
}

impl Default for DrainOptions {
    fn default() -> Self {
        DrainOptions {
            limit: None,
            batch_events: 1000,
            batch_bytes: 512 * 1024,
            retries: 3,
            backoff_base: Duration::from_millis(500),
            redrain: false,
            types: None,
            shared: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetSummary {
    pub target_id: String,
    pub canonical_url: String,
    pub team_slug: String,
    pub user_email: String,
    pub kind: TargetKind,
}

impl TargetSummary {
    fn of(record: &TargetRecord) -> TargetSummary {
        TargetSummary {
            target_id: record.target_id.clone(),
            canonical_url: record.identity.canonical_url.clone(),
            team_slug: record.identity.team_slug.clone(),
            user_email: record.identity.user_email.clone(),
            kind: record.identity.kind,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub event_id: String,
    pub outcome: Outcome,
    pub http_status: Option<u16>,
    pub error: Option<String>,
}

/// Why a drain stopped before the selection was exhausted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// Transient failures outlasted the retries (exit 4). `retry_after`: how long the
    /// receiver last asked us to wait (capped), for callers that schedule the next drain.
    Transient { error: String, retry_after: Option<Duration> },
    /// The receiver refused our credentials (exit 3).
    Auth { error: String },
}

/// The outcome of one drain, as counts of final per-event outcomes. `pending` also counts
/// the selected events a stopped drain left unsent, so the counts always add up to `selected`.
#[derive(Debug, Clone, Serialize)]
pub struct DrainSummary {
    pub target: TargetSummary,
    pub selected: u64,
    pub delivered: u64,
    pub duplicate: u64,
    pub pending: u64,
    pub rejected: u64,
    pub transient: u64,
    pub terminal_failed: u64,
    pub batches: u64,
    pub elapsed_ms: u64,
    pub failures: Vec<Failure>,
    /// With `--redrain`: events whose payload gc purged, which cannot be delivered again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_redeliverable: Option<i64>,
    #[serde(skip)]
    pub stop: Option<StopReason>,
}

impl DrainSummary {
    fn empty(record: &TargetRecord) -> DrainSummary {
        DrainSummary::nothing(TargetSummary::of(record))
    }

    /// Zero counts for `target` (also for a target whose drain could not start).
    pub fn nothing(target: TargetSummary) -> DrainSummary {
        DrainSummary {
            target,
            selected: 0,
            delivered: 0,
            duplicate: 0,
            pending: 0,
            rejected: 0,
            transient: 0,
            terminal_failed: 0,
            batches: 0,
            elapsed_ms: 0,
            failures: Vec::new(),
            not_redeliverable: None,
            stop: None,
        }
    }

    /// Every selected event ended delivered (success or duplicate).
    pub fn complete(&self) -> bool {
        self.stop.is_none() && self.delivered + self.duplicate == self.selected
    }

    /// The sum of the outcome counts (equal to `selected` after every drain).
    pub fn counted(&self) -> u64 {
        self.delivered + self.duplicate + self.pending + self.rejected + self.transient + self.terminal_failed
    }
}

/// Failures kept in the summary (the counts stay exact beyond it).
const MAX_FAILURES_LISTED: usize = 1000;

/// Progress callback: (events settled or attempted so far, total due if counted).
pub type ProgressFn<'a> = &'a mut dyn FnMut(u64, Option<u64>);

/// Drains the journal to `receiver`. Gates are checked first: when one is closed nothing is
/// posted and a `Blocked` error names it.
pub fn drain(
    store: &mut Store,
    lock: &DrainLock,
    receiver: &mut dyn Receiver,
    options: &DrainOptions,
    count_total: bool,
    progress: ProgressFn<'_>,
) -> Result<DrainSummary> {
    drain_paced(store, lock, receiver, options, &mut SystemPacer, count_total, progress)
}

/// [`drain`] with the clock, the sleep and the jitter supplied by the caller.
pub fn drain_paced(
    store: &mut Store,
    lock: &DrainLock,
    receiver: &mut dyn Receiver,
    options: &DrainOptions,
    pacer: &mut dyn Pacer,
    count_total: bool,
    progress: ProgressFn<'_>,
) -> Result<DrainSummary> {
    lock.guards(store)?;
    check_gates(receiver)?;
    receiver.prepare()?;
    with_relaxed_sync(store, |store| {
        let (record, not_redeliverable) = prepare_target(store, receiver, options, pacer.now_ms())?;
        let types = options.types.as_deref().map(target::encode_types).transpose()?;
        let total =
            if count_total { Some(count_due(store, &record, receiver.team(), types.as_deref())?) } else { None };
        progress(0, total);
        let team = receiver.team().map(str::to_string);
        let mut run = Run {
            store,
            sender: Sender {
                receiver,
                pacer,
                backoff: Backoff { base: options.backoff_base, retries: options.retries },
            },
            options,
            target: TargetRun::new(record, not_redeliverable),
            progress,
            total,
            done: 0,
        };
        let started = Instant::now();
        run.walk(team.as_deref(), types.as_deref())?;
        run.target.summary.elapsed_ms = started.elapsed().as_millis() as u64;
        run.target.save_frontier(run.store)?;
        Ok(run.target.summary)
    })
}

/// Runs `f` with ledger commits that need not reach the disk one by one (a ledger row lost
/// in a crash only means the event is sent again and the receiver answers `duplicate`), then
/// puts the connection's durability back as it was, so captures through the same `Store`
/// afterwards are fsynced again whatever happened in between.
fn with_relaxed_sync<T>(store: &mut Store, f: impl FnOnce(&mut Store) -> Result<T>) -> Result<T> {
    let previous: i64 =
        store.conn().query_row("PRAGMA synchronous", [], |r| r.get(0)).ctx("cannot read the store settings")?;
    store.conn().execute_batch("PRAGMA synchronous=NORMAL").ctx("cannot configure the store")?;
    let result = f(store);
    let restored = store.conn().pragma_update(None, "synchronous", previous).ctx("cannot configure the store");
    let value = result?;
    restored?;
    Ok(value)
}

/// Registers the target, records what its health endpoint says, and refuses to deliver to a
/// target whose server was replaced behind the same URL unless this is a re-drain.
fn prepare_target(
    store: &mut Store,
    receiver: &mut dyn Receiver,
    options: &DrainOptions,
    now: i64,
) -> Result<(TargetRecord, Option<i64>)> {
    let record = target::register(store.conn(), receiver.identity(), now)?;
    let record = target::set_types(store.conn(), record, options.types.as_deref())?;
    let health = receiver.health();
    if options.redrain {
        let purged = reset::start_new_epoch(store.conn(), &record, health.as_ref())?;
        let fresh = target::register(store.conn(), receiver.identity(), now)?;
        return Ok((fresh, Some(purged)));
    }
    match &health {
        Some(meta) => {
            if let Some(reset) = reset::detect(&record.deployment, meta) {
                reset::save(store.conn(), record.id, &reset)?;
                return Err(reset::blocked_error(&record, &reset));
            }
            target::record_deployment(store.conn(), record.id, meta)?;
        }
        None => {
            if let Some(reset) = reset::load(store.conn(), record.id)? {
                return Err(reset::blocked_error(&record, &reset));
            }
        }
    }
    Ok((record, None))
}

fn check_gates(receiver: &dyn Receiver) -> Result<()> {
    let closed: Vec<_> = receiver.gates().into_iter().filter(|g| !g.satisfied).collect();
    if closed.is_empty() {
        return Ok(());
    }
    let reasons: Vec<&str> = closed.iter().map(|g| g.reason).collect();
    let messages: Vec<&str> = closed.iter().map(|g| g.message.as_str()).collect();
    let hints: Vec<&str> = closed.iter().map(|g| g.hint.as_str()).collect();
    Err(Error::gates_closed(
        reasons.iter().map(|r| r.to_string()).collect(),
        format!("delivery is blocked ({}): {}; nothing was posted", reasons.join(", "), messages.join("; ")),
        hints.join("; "),
    ))
}

/// How many events are due (for a progress total only).
fn count_due(store: &Store, record: &TargetRecord, team: Option<&str>, types: Option<&str>) -> Result<u64> {
    crate::store::selection::count_due(
        store.conn(),
        DueQuery { target: record.id, epoch: record.epoch, team, types, from_seq: record.due_from_seq, limit: 0 },
    )
}

/// The settled prefix: every event with a smaller seq needs nothing more from this target.
#[derive(Debug)]
struct Frontier {
    position: i64,
    contiguous: bool,
}

impl Frontier {
    fn new(position: i64) -> Frontier {
        Frontier { position, contiguous: true }
    }

    /// A batch (in seq order) ended; `first_open` is its first event left unsettled.
    fn batch_done(&mut self, last_seq: i64, first_open: Option<i64>) {
        if !self.contiguous {
            return;
        }
        match first_open {
            None => self.position = last_seq + 1,
            Some(seq) => {
                self.position = seq;
                self.contiguous = false;
            }
        }
    }

    /// Nothing is due past the walk's end: the mark may move to the journal's end.
    fn reached_end(&mut self, end: i64) {
        if self.contiguous {
            self.position = self.position.max(end);
        }
    }
}

/// One target's side of a drain: where it stands, and what became of its events.
struct TargetRun {
    record: TargetRecord,
    key: LedgerKey,
    frontier: Frontier,
    summary: DrainSummary,
}

impl TargetRun {
    fn new(record: TargetRecord, not_redeliverable: Option<i64>) -> TargetRun {
        TargetRun {
            key: LedgerKey { target: record.id, epoch: record.epoch },
            frontier: Frontier::new(record.due_from_seq),
            summary: DrainSummary { not_redeliverable, ..DrainSummary::empty(&record) },
            record,
        }
    }

    fn count(&mut self, event_id: &str, outcome: Outcome, http_status: Option<u16>, error: Option<&str>) {
        let s = &mut self.summary;
        match outcome {
            Outcome::Success => s.delivered += 1,
            Outcome::Duplicate => s.duplicate += 1,
            Outcome::Pending => s.pending += 1,
            Outcome::Rejected => s.rejected += 1,
            Outcome::FailedTransient => s.transient += 1,
            Outcome::TerminalFailed => s.terminal_failed += 1,
        }
        let failed = matches!(outcome, Outcome::Rejected | Outcome::FailedTransient | Outcome::TerminalFailed);
        if failed && s.failures.len() < MAX_FAILURES_LISTED {
            s.failures.push(Failure {
                event_id: event_id.to_string(),
                outcome,
                http_status,
                error: error.map(str::to_string),
            });
        }
    }

    /// Selected events that were never sent because the drain stopped first.
    fn count_unsent(&mut self, events: &[DueEvent]) {
        self.summary.pending += events.len() as u64;
    }

    /// Moves the stored high-water mark; compare-and-set against the mark the drain started
    /// at, so a lower mark set meanwhile wins.
    fn save_frontier(&self, store: &Store) -> Result<()> {
        if self.frontier.position > self.record.due_from_seq {
            target::set_due_from(store.conn(), self.record.id, self.record.due_from_seq, self.frontier.position)?;
        }
        Ok(())
    }
}

/// What became of sending one batch.
enum Sent {
    Verdict(Verdict, Option<u16>),
    /// Why the drain stops, and the HTTP status of the last answer (none for transport errors).
    Stopped(StopReason, Option<u16>),
}

/// Records a try that got no answer for the events: (when, HTTP status, error).
type FailedAttempt<'f> = &'f mut dyn FnMut(i64, Option<u16>, &str) -> Result<()>;

/// Posts one body to the receiver until it gets an answer that is not transient, the
/// retries run out, or the receiver refuses our credentials (after one renewal).
struct Sender<'a> {
    receiver: &'a mut dyn Receiver,
    pacer: &'a mut dyn Pacer,
    backoff: Backoff,
}

impl Sender<'_> {
    /// `failed_attempt(now_ms, http_status, error)` records each try that did not get an
    /// answer for the events, before any wait.
    fn send(&mut self, body: &[u8], ids: &[&str], posts: &mut u64, failed_attempt: FailedAttempt<'_>) -> Result<Sent> {
        let mut renewed = false;
        let mut attempt = 0u32;
        loop {
            *posts += 1;
            let (verdict, status) = match self.receiver.post_batch(body) {
                Ok(reply) => (map_reply(ids, &reply), Some(reply.status)),
                Err(e) => (Verdict::Transient { error: e.to_string(), retry_after: None }, None),
            };
            match verdict {
                Verdict::Transient { error, retry_after } => {
                    failed_attempt(self.pacer.now_ms(), status, &error)?;
                    let asked = retry_after.map(|r| r.wait_from(self.pacer.now()));
                    let jitter = self.pacer.jitter();
                    match self.backoff.delay(attempt, jitter, asked) {
                        Some(delay) => self.pacer.sleep(delay),
                        None => {
                            let error = describe(status, &error);
                            let reason = StopReason::Transient { error, retry_after: asked };
                            return Ok(Sent::Stopped(reason, status));
                        }
                    }
                    attempt += 1;
                }
                Verdict::AuthFailed { error } => {
                    // Recorded first: a refresh that fails ends the drain with an error.
                    failed_attempt(self.pacer.now_ms(), status, &error)?;
                    if !renewed && self.receiver.renew_auth()? {
                        renewed = true;
                        continue;
                    }
                    return Ok(Sent::Stopped(StopReason::Auth { error: describe(status, &error) }, status));
                }
                other => return Ok(Sent::Verdict(other, status)),
            }
        }
    }
}

struct Run<'a, 'p> {
    store: &'a mut Store,
    sender: Sender<'a>,
    options: &'a DrainOptions,
    target: TargetRun,
    progress: ProgressFn<'p>,
    total: Option<u64>,
    done: u64,
}

impl Run<'_, '_> {
    /// Pages through the due events in capture order. While one batch is in flight (and
    /// recorded), the next is selected and compressed on a second, read-only connection:
    /// its selection starts past the current batch, so it does not depend on the answer.
    fn walk(&mut self, team: Option<&str>, types: Option<&str>) -> Result<()> {
        let mut reader = Some(self.store.reader()?);
        let mut cursor = self.target.record.due_from_seq;
        let first = self.due_query(team, types, cursor, self.remaining_budget());
        let mut next = match (&reader, first) {
            (Some(conn), Some(query)) => {
                prefetch(conn, query, self.options.batch_bytes, self.options.shared.as_deref())?
            }
            _ => None,
        };
        loop {
            let Some(prepared) = next.take() else {
                return self.settle_tail(team, types, cursor);
            };
            let events = &prepared.events;
            let last_seq = events.last().map(|e| e.seq).unwrap_or(cursor);
            cursor = last_seq + 1;
            self.target.summary.selected += events.len() as u64;
            let following = self.due_query(team, types, cursor, self.remaining_budget());
            let batch_bytes = self.options.batch_bytes;
            let shared = self.options.shared.clone();
            let conn = reader.take();
            let (stop, fetched, conn) = std::thread::scope(|scope| {
                let handle = scope.spawn(move || {
                    let fetched = match (&conn, following) {
                        (Some(c), Some(query)) => prefetch(c, query, batch_bytes, shared.as_deref()),
                        _ => Ok(None),
                    };
                    (fetched, conn)
                });
                let stop = self.deliver(events, Some(&prepared.body));
                match handle.join() {
                    Ok((fetched, conn)) => (stop, fetched, conn),
                    Err(_) => {
                        (stop, Err(Error::internal("the batch prefetch failed", "run `kitty-sync now` again")), None)
                    }
                }
            });
            reader = conn;
            let stop = stop?;
            let settled = ledger::settled_between(self.store.conn(), self.target.key, events[0].seq, last_seq)?;
            let first_open = events.iter().map(|e| e.seq).find(|s| !settled.contains(s));
            self.target.frontier.batch_done(last_seq, first_open);
            self.done += events.len() as u64;
            (self.progress)(self.done, self.total);
            if let Some(reason) = stop {
                self.target.summary.stop = Some(reason);
                return Ok(());
            }
            next = fetched?;
        }
    }

    fn due_query<'t>(
        &self,
        team: Option<&'t str>,
        types: Option<&'t str>,
        from_seq: i64,
        budget: u64,
    ) -> Option<DueQuery<'t>> {
        (budget > 0).then(|| DueQuery {
            target: self.target.key.target,
            epoch: self.target.key.epoch,
            team,
            types,
            from_seq,
            limit: budget.min(self.options.batch_events as u64) as i64,
        })
    }

    /// The walk found nothing more due from `cursor`. If everything before was settled too,
    /// the high-water mark may move past the journal's end.
    fn settle_tail(&mut self, team: Option<&str>, types: Option<&str>, cursor: i64) -> Result<()> {
        if !self.target.frontier.contiguous || self.target.summary.stop.is_some() {
            return Ok(());
        }
        let key = self.target.key;
        let query = DueQuery { target: key.target, epoch: key.epoch, team, types, from_seq: cursor, limit: 1 };
        if let Some(end) = crate::store::selection::end_if_nothing_due(self.store.conn_mut(), query)? {
            self.target.frontier.reached_end(end);
        }
        Ok(())
    }

    fn remaining_budget(&self) -> u64 {
        match self.options.limit {
            Some(limit) => limit.saturating_sub(self.target.summary.selected),
            None => u64::MAX,
        }
    }

    /// Posts a batch (compressing it unless `body` is given) and records what became of each
    /// event, splitting on 413 and bisecting a 400 without details. Returns why the drain
    /// must stop, if it must.
    fn deliver(&mut self, batch: &[DueEvent], body: Option<&[u8]>) -> Result<Option<StopReason>> {
        let ids: Vec<&str> = batch.iter().map(|e| e.event_id.as_str()).collect();
        let encoded;
        let body = match body {
            Some(body) => body,
            None => {
                encoded = encode_batch(batch)?;
                encoded.as_slice()
            }
        };
        let (store, key) = (&mut *self.store, self.target.key);
        let mut record_failure = |now: i64, status: Option<u16>, error: &str| {
            ledger::record(store.conn_mut(), key, &uniform(batch, Outcome::FailedTransient, status, error), now)
        };
        let sent = self.sender.send(body, &ids, &mut self.target.summary.batches, &mut record_failure)?;
        let (verdict, status) = match sent {
            Sent::Stopped(reason, status) => {
                let error = match &reason {
                    StopReason::Transient { error, .. } | StopReason::Auth { error } => error.clone(),
                };
                for event in batch {
                    self.target.count(&event.event_id, Outcome::FailedTransient, status, Some(&error));
                }
                return Ok(Some(reason));
            }
            Sent::Verdict(v, s) => (v, s),
        };
        match verdict {
            Verdict::PerEvent(outcomes) => {
                let results = batch
                    .iter()
                    .zip(outcomes)
                    .map(|(e, (outcome, error))| EventResult { seq: e.seq, outcome, http_status: status, error })
                    .collect::<Vec<_>>();
                self.finish(batch, results)
            }
            Verdict::TooLarge { error } if batch.len() == 1 => {
                let error = format!("oversized: {error}");
                self.finish(batch, uniform(batch, Outcome::TerminalFailed, status, &error))
            }
            Verdict::TooLarge { .. } => self.deliver_halves(batch),
            Verdict::BadRequest { named: Some(named), error } => self.deliver_named(batch, &named, status, &error),
            Verdict::BadRequest { named: None, error } if batch.len() == 1 => {
                self.finish(batch, uniform(batch, Outcome::Rejected, status, &error))
            }
            Verdict::BadRequest { named: None, .. } => self.deliver_halves(batch),
            Verdict::RejectAll { error } => self.finish(batch, uniform(batch, Outcome::Rejected, status, &error)),
            Verdict::Transient { .. } | Verdict::AuthFailed { .. } => {
                Err(Error::internal("unhandled batch verdict", "report this as a bug"))
            }
        }
    }

    /// Sends each half on its own. When the first half stops the drain, the second is left
    /// unsent and counted as pending.
    fn deliver_halves(&mut self, batch: &[DueEvent]) -> Result<Option<StopReason>> {
        let (left, right) = batch.split_at(batch.len() / 2);
        if let Some(stop) = self.deliver(left, None)? {
            self.target.count_unsent(right);
            return Ok(Some(stop));
        }
        self.deliver(right, None)
    }

    /// 400 with details: the named events are rejected; the others are sent again.
    fn deliver_named(
        &mut self,
        batch: &[DueEvent],
        named: &HashMap<String, String>,
        status: Option<u16>,
        error: &str,
    ) -> Result<Option<StopReason>> {
        let (bad, good): (Vec<DueEvent>, Vec<DueEvent>) =
            batch.iter().cloned().partition(|e| named.contains_key(&e.event_id));
        if bad.is_empty() {
            // Details that name none of our events are no details: find the culprit.
            return if batch.len() == 1 {
                self.finish(batch, uniform(batch, Outcome::Rejected, status, error))
            } else {
                self.deliver_halves(batch)
            };
        }
        let results = bad
            .iter()
            .map(|e| EventResult {
                seq: e.seq,
                outcome: Outcome::Rejected,
                http_status: status,
                error: named.get(&e.event_id).cloned(),
            })
            .collect();
        self.finish(&bad, results)?;
        if good.is_empty() { Ok(None) } else { self.deliver(&good, None) }
    }

    /// Records final results and counts them.
    fn finish(&mut self, batch: &[DueEvent], results: Vec<EventResult>) -> Result<Option<StopReason>> {
        ledger::record(self.store.conn_mut(), self.target.key, &results, self.sender.pacer.now_ms())?;
        for (event, r) in batch.iter().zip(&results) {
            self.target.count(&event.event_id, r.outcome, r.http_status, r.error.as_deref());
        }
        Ok(None)
    }
}

fn uniform(batch: &[DueEvent], outcome: Outcome, http_status: Option<u16>, error: &str) -> Vec<EventResult> {
    batch.iter().map(|e| EventResult { seq: e.seq, outcome, http_status, error: Some(error.to_string()) }).collect()
}

fn describe(status: Option<u16>, error: &str) -> String {
    match status {
        Some(s) if !error.contains(&s.to_string()) => format!("HTTP {s}: {error}"),
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontier_stops_at_first_open_event() {
        let mut f = Frontier::new(5);
        f.batch_done(10, None);
        assert_eq!(f.position, 11);
        f.batch_done(20, Some(14));
        assert_eq!(f.position, 14);
        f.batch_done(30, None);
        assert_eq!(f.position, 14, "a gap freezes the frontier for the rest of the drain");
        f.reached_end(100);
        assert_eq!(f.position, 14);
    }
}
