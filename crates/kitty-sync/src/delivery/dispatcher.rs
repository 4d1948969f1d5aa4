//! The drain: select what the target has not settled (keyset pages in capture order), post
//! byte- and count-bounded gzip batches, map the answers, record every outcome and attempt
//! in one transaction per batch. Nothing in the journal is ever deleted or modified here.

use std::io::Write;
use std::time::{Duration, Instant};

use rusqlite::params;
use serde::Serialize;

use super::receiver::Receiver;
use super::reset;
use super::target::{self, TargetKind, TargetRecord};
use super::wire::{HttpReply, Outcome, Verdict, map_reply};
use crate::error::{Error, Result, StoreContext};
use crate::store::Store;
use crate::store::selection::{DueEvent, DueQuery, select_due};

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
    /// A `Retry-After` longer than this stops the drain instead of waiting.
    pub max_retry_wait: Duration,
    /// Start a new epoch for the target first: every retained event is delivered again
    /// (after the server behind the URL was reset).
    pub redrain: bool,
}

impl Default for DrainOptions {
    fn default() -> Self {
        DrainOptions {
            limit: None,
            batch_events: 1000,
            batch_bytes: 512 * 1024,
            retries: 3,
            backoff_base: Duration::from_millis(500),
            max_retry_wait: Duration::from_secs(120),
            redrain: false,
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
    /// Transient failures outlasted the retries (exit 4).
    Transient { error: String },
    /// The receiver refused our credentials (exit 3).
    Auth { error: String },
}

/// The outcome of one drain, as counts of final per-event outcomes.
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
    /// The receiver's `Retry-After` when transient failures stopped the drain (the daemon's
    /// next attempt honours it).
    #[serde(skip)]
    pub retry_after: Option<Duration>,
}

impl DrainSummary {
    /// Every selected event ended delivered (success or duplicate).
    pub fn complete(&self) -> bool {
        self.stop.is_none() && self.delivered + self.duplicate == self.selected
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
    receiver: &mut dyn Receiver,
    options: &DrainOptions,
    count_total: bool,
    progress: ProgressFn<'_>,
) -> Result<DrainSummary> {
    check_gates(receiver)?;
    receiver.prepare()?;
    // Ledger commits need not reach the disk one by one: a ledger row lost in a crash only
    // means the event is sent again and the receiver answers `duplicate` (at-least-once).
    // Captured events never go through this connection, so their durability is untouched.
    store.conn().execute_batch("PRAGMA synchronous=NORMAL").ctx("cannot configure the store")?;
    let (record, not_redeliverable) = prepare_target(store, receiver, options)?;
    let total = if count_total { Some(count_due(store, &record, receiver.team())?) } else { None };
    progress(0, total);
    let team = receiver.team().map(str::to_string);
    let mut run = Run {
        store,
        receiver,
        options,
        target: record.clone(),
        summary: DrainSummary { not_redeliverable, ..empty_summary(&record) },
        frontier: Frontier::new(record.due_from_seq),
        progress,
        total,
        done: 0,
    };
    let started = Instant::now();
    run.walk(team.as_deref())?;
    run.summary.elapsed_ms = started.elapsed().as_millis() as u64;
    let frontier = run.frontier.position;
    if frontier > record.due_from_seq {
        target::set_due_from(run.store.conn(), record.id, record.due_from_seq, frontier)?;
    }
    Ok(run.summary)
}

/// Registers the target, records what its health endpoint says, and refuses to deliver to a
/// target whose server was replaced behind the same URL unless this is a re-drain.
fn prepare_target(
    store: &mut Store,
    receiver: &mut dyn Receiver,
    options: &DrainOptions,
) -> Result<(TargetRecord, Option<i64>)> {
    let now = crate::clock::now_ms();
    let record = target::register(store.conn(), receiver.identity(), now)?;
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

fn empty_summary(record: &TargetRecord) -> DrainSummary {
    DrainSummary {
        target: TargetSummary::of(record),
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
        retry_after: None,
    }
}

/// How many events are due (for a progress total only).
fn count_due(store: &Store, record: &TargetRecord, team: Option<&str>) -> Result<u64> {
    crate::store::selection::count_due(
        store.conn(),
        DueQuery { target: record.id, epoch: record.epoch, team, from_seq: record.due_from_seq, limit: 0 },
    )
}

/// The settled prefix: every event with a smaller seq needs nothing more from this target.
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
}

/// One event's final (or intermediate) result for the ledger.
struct Result1 {
    seq: i64,
    outcome: Outcome,
    http_status: Option<u16>,
    error: Option<String>,
}

struct Run<'a, 'p> {
    store: &'a mut Store,
    receiver: &'a mut dyn Receiver,
    options: &'a DrainOptions,
    target: TargetRecord,
    summary: DrainSummary,
    frontier: Frontier,
    progress: ProgressFn<'p>,
    total: Option<u64>,
    done: u64,
}

enum Sent {
    Verdict(Verdict, Option<u16>),
    /// Why the drain stops, and the HTTP status of the last answer (none for transport errors).
    Stopped(StopReason, Option<u16>),
}

impl Run<'_, '_> {
    /// Pages through the due events in capture order. While one batch is in flight (and
    /// recorded), the next is selected and compressed on a second, read-only connection:
    /// its selection starts past the current batch, so it does not depend on the answer.
    fn walk(&mut self, team: Option<&str>) -> Result<()> {
        let mut reader = Some(self.store.reader()?);
        let mut cursor = self.target.due_from_seq;
        let first = self.due_query(team, cursor, self.remaining_budget());
        let mut next = match (&reader, first) {
            (Some(conn), Some(query)) => prefetch(conn, query, self.options.batch_bytes)?,
            _ => None,
        };
        loop {
            let Some(Prepared { batch, body }) = next.take() else {
                return self.settle_tail(team, cursor);
            };
            let last_seq = batch.last().map(|e| e.seq).unwrap_or(cursor);
            cursor = last_seq + 1;
            self.summary.selected += batch.len() as u64;
            let following = self.due_query(team, cursor, self.remaining_budget());
            let batch_bytes = self.options.batch_bytes;
            let conn = reader.take();
            let (stop, fetched, conn) = std::thread::scope(|scope| {
                let handle = scope.spawn(move || {
                    let fetched = match (&conn, following) {
                        (Some(c), Some(query)) => prefetch(c, query, batch_bytes),
                        _ => Ok(None),
                    };
                    (fetched, conn)
                });
                let stop = self.deliver_prepared(&batch, Some(body));
                match handle.join() {
                    Ok((fetched, conn)) => (stop, fetched, conn),
                    Err(_) => {
                        (stop, Err(Error::internal("the batch prefetch failed", "run `kitty-sync now` again")), None)
                    }
                }
            });
            reader = conn;
            let stop = stop?;
            let first_open = self.first_unsettled(&batch)?;
            self.frontier.batch_done(last_seq, first_open);
            self.done += batch.len() as u64;
            (self.progress)(self.done, self.total);
            if let Some(reason) = stop {
                self.summary.stop = Some(reason);
                return Ok(());
            }
            next = fetched?;
        }
    }

    fn due_query<'t>(&self, team: Option<&'t str>, from_seq: i64, budget: u64) -> Option<DueQuery<'t>> {
        (budget > 0).then(|| DueQuery {
            target: self.target.id,
            epoch: self.target.epoch,
            team,
            from_seq,
            limit: budget.min(self.options.batch_events as u64) as i64,
        })
    }

    /// The walk found nothing more due from `cursor`. If everything before was settled too,
    /// move the high-water mark past the journal's end, judged in one read snapshot so an
    /// event appended meanwhile cannot be skipped.
    fn settle_tail(&mut self, team: Option<&str>, cursor: i64) -> Result<()> {
        if !self.frontier.contiguous || self.summary.stop.is_some() {
            return Ok(());
        }
        let tx = self.store.conn_mut().transaction().ctx("cannot start a read")?;
        let query = DueQuery { target: self.target.id, epoch: self.target.epoch, team, from_seq: cursor, limit: 1 };
        if select_due(&tx, query)?.is_empty() {
            let max_seq: i64 = tx
                .query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| r.get(0))
                .ctx("cannot read the journal")?;
            self.frontier.position = self.frontier.position.max(max_seq + 1);
        }
        tx.commit().ctx("cannot end a read")
    }

    fn remaining_budget(&self) -> u64 {
        match self.options.limit {
            Some(limit) => limit.saturating_sub(self.summary.selected),
            None => u64::MAX,
        }
    }

    /// Posts a batch and records what became of each event, splitting on 413 and bisecting
    /// a 400 without details. Returns why the drain must stop, if it must.
    fn deliver(&mut self, batch: &[DueEvent]) -> Result<Option<StopReason>> {
        self.deliver_prepared(batch, None)
    }

    /// [`Run::deliver`] with the batch body already compressed (when it was prefetched).
    fn deliver_prepared(&mut self, batch: &[DueEvent], body: Option<Vec<u8>>) -> Result<Option<StopReason>> {
        let ids: Vec<&str> = batch.iter().map(|e| e.event_id.as_str()).collect();
        let body = match body {
            Some(body) => body,
            None => encode_batch(batch)?,
        };
        let (verdict, status) = match self.send_with_retries(&body, batch, &ids)? {
            Sent::Stopped(reason, status) => {
                let error = match &reason {
                    StopReason::Transient { error } | StopReason::Auth { error } => error.clone(),
                };
                self.count_final(batch, Outcome::FailedTransient, status, Some(&error));
                return Ok(Some(reason));
            }
            Sent::Verdict(v, s) => (v, s),
        };
        match verdict {
            Verdict::PerEvent(outcomes) => {
                let results = batch
                    .iter()
                    .zip(outcomes)
                    .map(|(e, (outcome, error))| Result1 { seq: e.seq, outcome, http_status: status, error })
                    .collect::<Vec<_>>();
                self.finish(batch, results)
            }
            Verdict::TooLarge { error } if batch.len() == 1 => {
                let error = format!("oversized: {error}");
                self.finish_uniform(batch, Outcome::TerminalFailed, status, &error)
            }
            Verdict::TooLarge { .. } => self.deliver_halves(batch),
            Verdict::BadRequest { named: Some(named), error } => self.deliver_named(batch, &named, status, &error),
            Verdict::BadRequest { named: None, error } if batch.len() == 1 => {
                self.finish_uniform(batch, Outcome::Rejected, status, &error)
            }
            Verdict::BadRequest { named: None, .. } => self.deliver_halves(batch),
            Verdict::RejectAll { error } => self.finish_uniform(batch, Outcome::Rejected, status, &error),
            Verdict::Transient { .. } | Verdict::AuthFailed { .. } => {
                Err(Error::internal("unhandled batch verdict", "report this as a bug"))
            }
        }
    }

    fn deliver_halves(&mut self, batch: &[DueEvent]) -> Result<Option<StopReason>> {
        let (left, right) = batch.split_at(batch.len() / 2);
        if let Some(stop) = self.deliver(left)? {
            return Ok(Some(stop));
        }
        self.deliver(right)
    }

    /// 400 with details: the named events are rejected; the others are sent again.
    fn deliver_named(
        &mut self,
        batch: &[DueEvent],
        named: &std::collections::HashMap<String, String>,
        status: Option<u16>,
        error: &str,
    ) -> Result<Option<StopReason>> {
        let (bad, good): (Vec<DueEvent>, Vec<DueEvent>) =
            batch.iter().cloned().partition(|e| named.contains_key(&e.event_id));
        if bad.is_empty() {
            // Details that name none of our events are no details: find the culprit.
            return if batch.len() == 1 {
                self.finish_uniform(batch, Outcome::Rejected, status, error)
            } else {
                self.deliver_halves(batch)
            };
        }
        let results = bad
            .iter()
            .map(|e| Result1 {
                seq: e.seq,
                outcome: Outcome::Rejected,
                http_status: status,
                error: named.get(&e.event_id).cloned(),
            })
            .collect();
        if let Some(stop) = self.finish(&bad, results)? {
            return Ok(Some(stop));
        }
        if good.is_empty() { Ok(None) } else { self.deliver(&good) }
    }

    fn send_with_retries(&mut self, body: &[u8], batch: &[DueEvent], ids: &[&str]) -> Result<Sent> {
        let mut renewed = false;
        let mut attempt = 0u32;
        loop {
            self.summary.batches += 1;
            let (verdict, status) = match self.receiver.post_batch(body) {
                Ok(reply) => (map_reply(ids, &reply), Some(reply.status)),
                Err(e) => (Verdict::Transient { error: e.to_string(), retry_after: None }, None),
            };
            match verdict {
                Verdict::Transient { error, retry_after } => {
                    self.record(&uniform(batch, Outcome::FailedTransient, status, &error))?;
                    match self.backoff(attempt, retry_after) {
                        Some(delay) => std::thread::sleep(delay),
                        None => {
                            self.summary.retry_after = retry_after;
                            let reason = StopReason::Transient { error: describe(status, &error) };
                            return Ok(Sent::Stopped(reason, status));
                        }
                    }
                    attempt += 1;
                }
                Verdict::AuthFailed { error } => {
                    // Recorded first: a refresh that fails ends the drain with an error.
                    self.record(&uniform(batch, Outcome::FailedTransient, status, &error))?;
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

    /// The wait before the next try, or `None` when retries are exhausted or the server asks
    /// for longer than we are willing to wait.
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Option<Duration> {
        if attempt >= self.options.retries {
            return None;
        }
        let exponential = self.options.backoff_base.saturating_mul(1u32 << attempt.min(16));
        let jittered = exponential.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        let delay = match retry_after {
            Some(asked) => asked.max(jittered / 4),
            None => jittered,
        };
        (delay <= self.options.max_retry_wait).then_some(delay)
    }

    fn finish_uniform(
        &mut self,
        batch: &[DueEvent],
        outcome: Outcome,
        status: Option<u16>,
        error: &str,
    ) -> Result<Option<StopReason>> {
        let results = uniform(batch, outcome, status, error);
        self.finish(batch, results)
    }

    /// Records final results and counts them.
    fn finish(&mut self, batch: &[DueEvent], results: Vec<Result1>) -> Result<Option<StopReason>> {
        self.record(&results)?;
        for (event, r) in batch.iter().zip(&results) {
            self.count(&event.event_id, r.outcome, r.http_status, r.error.as_deref());
        }
        Ok(None)
    }

    fn count_final(&mut self, batch: &[DueEvent], outcome: Outcome, status: Option<u16>, error: Option<&str>) {
        for event in batch {
            self.count(&event.event_id, outcome, status, error);
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

    /// One transaction: the ledger row (upsert) and an attempt row per event.
    fn record(&mut self, results: &[Result1]) -> Result<()> {
        let (target, epoch) = (self.target.id, self.target.epoch);
        let now = crate::clock::now_ms();
        let tx = self.store.conn_mut().transaction().ctx("cannot start recording")?;
        {
            let mut upsert = tx.prepare_cached(UPSERT_LEDGER).ctx("cannot prepare ledger update")?;
            let mut attempt = tx.prepare_cached(INSERT_ATTEMPT).ctx("cannot prepare attempt insert")?;
            for r in results {
                let completed = r.outcome.is_settled().then_some(now);
                let rejected = i64::from(r.outcome == Outcome::Rejected);
                upsert
                    .execute(params![
                        target,
                        epoch,
                        r.seq,
                        r.outcome.as_str(),
                        rejected,
                        now,
                        completed,
                        r.http_status,
                        r.error
                    ])
                    .ctx("cannot record the delivery outcome")?;
                attempt
                    .execute(params![target, epoch, r.seq, now, r.outcome.as_str(), r.http_status, r.error])
                    .ctx("cannot record the attempt")?;
            }
        }
        // Selected events were not delivered to this target before, so every delivered
        // outcome here is a first delivery.
        let delivered: Vec<i64> = results.iter().filter(|r| r.outcome.is_delivered()).map(|r| r.seq).collect();
        crate::store::stats::note_delivered(&tx, target, epoch, &delivered)?;
        tx.commit().ctx("cannot commit delivery outcomes")
    }

    /// The first event of the batch not settled for the target after recording.
    fn first_unsettled(&self, batch: &[DueEvent]) -> Result<Option<i64>> {
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else { return Ok(None) };
        let mut stmt = self.store.conn().prepare_cached(FIRST_OPEN).ctx("cannot prepare")?;
        let seqs: std::collections::HashSet<i64> = stmt
            .query_map(params![self.target.id, self.target.epoch, first.seq, last.seq], |r| r.get(0))
            .ctx("cannot read the ledger")?
            .collect::<std::result::Result<_, _>>()
            .ctx("cannot read the ledger")?;
        Ok(batch.iter().map(|e| e.seq).find(|s| !seqs.contains(s)))
    }
}

/// Settled ledger rows in a seq range (success, duplicate, parked, or held after rejections).
const FIRST_OPEN: &str = "SELECT seq FROM ledger WHERE target = ?1 AND epoch = ?2 AND seq BETWEEN ?3 AND ?4
    AND (status IN ('success', 'duplicate', 'terminal_failed') OR (status = 'rejected' AND reject_count >= 3))";

/// A delivered row is never demoted; errors describe the latest attempt only.
const UPSERT_LEDGER: &str = "
INSERT INTO ledger (target, epoch, seq, status, attempt_count, reject_count, first_attempted_at, last_attempted_at,
                    completed_at, last_http_status, last_error)
VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6, ?6, ?7, ?8, ?9)
ON CONFLICT(target, epoch, seq) DO UPDATE SET
    status = CASE WHEN ledger.status IN ('success', 'duplicate') THEN ledger.status ELSE excluded.status END,
    attempt_count = ledger.attempt_count + 1,
    reject_count = ledger.reject_count + excluded.reject_count,
    last_attempted_at = excluded.last_attempted_at,
    completed_at = coalesce(ledger.completed_at, excluded.completed_at),
    last_http_status = excluded.last_http_status,
    last_error = excluded.last_error";

const INSERT_ATTEMPT: &str =
    "INSERT INTO attempts (target, epoch, seq, at, outcome, http_status, error) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";

fn uniform(batch: &[DueEvent], outcome: Outcome, http_status: Option<u16>, error: &str) -> Vec<Result1> {
    batch.iter().map(|e| Result1 { seq: e.seq, outcome, http_status, error: Some(error.to_string()) }).collect()
}

fn describe(status: Option<u16>, error: &str) -> String {
    match status {
        Some(s) if !error.contains(&s.to_string()) => format!("HTTP {s}: {error}"),
        _ => error.to_string(),
    }
}

/// A selected batch and its compressed body.
struct Prepared {
    batch: Vec<DueEvent>,
    body: Vec<u8>,
}

/// Selects the next page, cuts it to the byte bound and compresses it.
fn prefetch(conn: &rusqlite::Connection, query: DueQuery<'_>, batch_bytes: usize) -> Result<Option<Prepared>> {
    let page = select_due(conn, query)?;
    if page.is_empty() {
        return Ok(None);
    }
    let batch = cut_by_bytes(page, batch_bytes);
    let body = encode_batch(&batch)?;
    Ok(Some(Prepared { batch, body }))
}

/// Keeps the leading events whose `{"events":[...]}` body stays within `max_bytes` (at least one).
fn cut_by_bytes(mut page: Vec<DueEvent>, max_bytes: usize) -> Vec<DueEvent> {
    let mut size = br#"{"events":[]}"#.len();
    let mut keep = 0;
    for (i, e) in page.iter().enumerate() {
        let next = size + e.envelope.len() + usize::from(i > 0);
        if i > 0 && next > max_bytes {
            break;
        }
        size = next;
        keep = i + 1;
    }
    page.truncate(keep);
    page
}

/// `{"events":[...]}` with each stored envelope embedded byte for byte, gzip-compressed.
pub fn encode_batch(batch: &[DueEvent]) -> Result<Vec<u8>> {
    let raw: usize = batch.iter().map(|e| e.envelope.len() + 1).sum();
    let mut gz = flate2::write::GzEncoder::new(Vec::with_capacity(raw / 4 + 64), flate2::Compression::fast());
    let io = |e: std::io::Error| Error::internal(format!("cannot compress a batch: {e}"), "run again");
    gz.write_all(b"{\"events\":[").map_err(io)?;
    for (i, event) in batch.iter().enumerate() {
        if i > 0 {
            gz.write_all(b",").map_err(io)?;
        }
        gz.write_all(event.envelope.as_slice()).map_err(io)?;
    }
    gz.write_all(b"]}").map_err(io)?;
    gz.finish().map_err(io)
}

/// For tests and tools: decompresses a batch body.
pub fn decode_batch(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(body), &mut out)?;
    Ok(out)
}

impl HttpReply {
    /// A reply built in memory (tests, fault simulations).
    pub fn json(status: u16, body: &serde_json::Value) -> HttpReply {
        HttpReply { status, body: body.to_string().into_bytes(), retry_after: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: i64, size: usize) -> DueEvent {
        DueEvent { seq, event_id: format!("E{seq}"), envelope: vec![b'x'; size] }
    }

    #[test]
    fn byte_bound_keeps_at_least_one() {
        let page = vec![ev(1, 100), ev(2, 100), ev(3, 100)];
        assert_eq!(cut_by_bytes(page.clone(), 13 + 201).len(), 2);
        assert_eq!(cut_by_bytes(page.clone(), 10).len(), 1);
        assert_eq!(cut_by_bytes(page, 10_000).len(), 3);
    }

    #[test]
    fn encoded_body_embeds_envelopes_verbatim() {
        let batch = vec![
            DueEvent { seq: 1, event_id: "a".into(), envelope: br#"{"b": 1, "a": "\u00e9"}"#.to_vec() },
            DueEvent { seq: 2, event_id: "b".into(), envelope: br#"{"x":2}"#.to_vec() },
        ];
        let body = decode_batch(&encode_batch(&batch).unwrap()).unwrap();
        assert_eq!(body, br#"{"events":[{"b": 1, "a": "\u00e9"},{"x":2}]}"#.to_vec());
    }

    #[test]
    fn frontier_stops_at_first_open_event() {
        let mut f = Frontier::new(5);
        f.batch_done(10, None);
        assert_eq!(f.position, 11);
        f.batch_done(20, Some(14));
        assert_eq!(f.position, 14);
        f.batch_done(30, None);
        assert_eq!(f.position, 14, "a gap freezes the frontier for the rest of the drain");
    }
}
