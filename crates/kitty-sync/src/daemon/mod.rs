//! `kitty-sync daemon`: a loop around the same drain `now` runs, for every active target.
//!
//! It sleeps until the store changes (a filesystem watch on `event-sync/`: every commit writes
//! the `-wal` file) or a slow fallback timer fires, checks whether anything new was captured,
//! and drains the targets that are due, holding the drain lock only for that round. Each
//! target keeps its own backoff, so one that fails or is blocked never holds up another.
//! Nothing here is needed for safety: every batch is recorded in the ledger as it goes, so a
//! daemon killed at any moment loses nothing and the next one re-sends what is unsure.

pub mod backlog;
pub mod backoff;
pub mod health;
pub mod instance;
pub mod report;
pub mod state;
mod watch;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::clock::now_ms;
use crate::delivery::batch::SharedBatches;
use crate::delivery::dispatcher::{DrainOptions, DrainSummary, StopReason, drain};
use crate::delivery::lock::{self, DrainLock};
use crate::delivery::receiver::{Gate, Receiver, TransportError};
use crate::delivery::target::{DeploymentMetadata, TargetIdentity};
use crate::delivery::wire::HttpReply;
use crate::error::{ExitClass, Result, StoreContext};
use crate::home::Home;
use crate::store::Store;
use state::{DaemonState, Phase, TargetState, now_stamp, stamp};

/// How often the state file is rewritten (the contract asks for at least every 5 s).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// A delivery loop silent for longer than this hangs: the heartbeat is no longer renewed, so
/// `status` stops calling the daemon running. One request may legitimately take [`REQUEST_TIMEOUT`].
const HANG_LIMIT_MS: i64 = 45_000;
/// Per request; a shutdown waits for at most one request before abandoning it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Filesystem notifications come in bursts (WAL write, shm, checkpoint): gather them first.
const DEBOUNCE: Duration = Duration::from_millis(15);
/// When another drain holds the lock, look again this soon.
const BUSY_RETRY: Duration = Duration::from_millis(200);
/// Events per round and target, so a long backlog still lets other targets, `now --wait` and
/// a shutdown have their turn between rounds.
const ROUND_LIMIT: u64 = 5_000;
/// The backlog (undelivered count, oldest undelivered) is recounted at most this often while idle.
const BACKLOG_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub max_backoff: Duration,
    /// Fallback timer in case a filesystem notification is missed.
    pub poll: Duration,
}

/// One active target: its name (`primary` for the mode's target) and its receiver.
pub struct DaemonTarget {
    pub name: String,
    pub receiver: Box<dyn Receiver>,
    /// The target's type filter (contract §9); `None`: every type.
    pub types: Option<Vec<String>>,
}

/// What the daemon tells its operator, one line each.
pub enum Notice<'a> {
    Delivered {
        name: &'a str,
        summary: &'a DrainSummary,
    },
    Failed {
        name: &'a str,
        error: &'a str,
        retry_in: Duration,
        blocked: bool,
    },
    WatchUnavailable {
        error: &'a str,
    },
    /// `config.toml` or `credentials` changed: the targets were rebuilt.
    Reloaded {
        targets: usize,
    },
    /// The store or the lock could not be read this round; the loop goes on.
    Trouble {
        error: &'a str,
    },
}

enum Wake {
    StoreChanged,
    Stop,
}

/// What the delivery loop, the heartbeat, the health responder and the signal handler share.
pub struct Shared {
    home: Home,
    state: Mutex<DaemonState>,
    stop: AtomicBool,
    alive_ms: AtomicI64,
    wake: mpsc::Sender<Wake>,
}

impl Shared {
    pub fn snapshot(&self) -> DaemonState {
        self.lock_state().clone()
    }

    /// Asks the loop to stop after (or by abandoning) the request in flight.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.send(Wake::Stop);
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The final write of a clean stop.
    pub fn write_stopped(&self) -> Result<()> {
        let mut state = self.lock_state();
        let now = now_stamp();
        state.heartbeat_at = now.clone();
        state.stopped_at = Some(now);
        for t in &mut state.targets {
            if t.state == Phase::Delivering {
                t.state = Phase::Idle;
            }
        }
        state::write(&self.home, &state)
    }

    fn lock_state(&self) -> MutexGuard<'_, DaemonState> {
        // A panic elsewhere while holding the lock leaves plain data behind: keep using it.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn touch(&self) {
        self.alive_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Rewrites the state file; the heartbeat only moves while the loop shows signs of life.
    fn beat(&self) -> Result<()> {
        let now = now_ms();
        let mut state = self.lock_state();
        if state.stopped_at.is_some() {
            return Ok(());
        }
        if now - self.alive_ms.load(Ordering::Relaxed) <= HANG_LIMIT_MS {
            state.heartbeat_at = stamp(now);
        }
        state::write(&self.home, &state)
    }

    fn update_target(&self, index: usize, edit: impl FnOnce(&mut TargetState)) {
        if let Some(t) = self.lock_state().targets.get_mut(index) {
            edit(t);
        }
    }
}

struct Slot {
    name: String,
    receiver: Box<dyn Receiver>,
    types: Option<Vec<String>>,
    /// New captures (or unfinished work) that this target has not been offered yet.
    dirty: bool,
    failures: u32,
    next_attempt: Option<Instant>,
    backlog_at: Option<Instant>,
    /// The state after the last round; a change is written at once, not at the next beat.
    settled: Phase,
}

impl Slot {
    fn new(target: DaemonTarget) -> Slot {
        Slot {
            name: target.name,
            receiver: target.receiver,
            types: target.types,
            dirty: true,
            failures: 0,
            next_attempt: None,
            backlog_at: None,
            settled: Phase::Idle,
        }
    }

    fn ready(&self, now: Instant) -> bool {
        self.dirty && self.next_attempt.is_none_or(|at| at <= now)
    }
}

pub struct Daemon {
    shared: Arc<Shared>,
    store: Store,
    slots: Vec<Slot>,
    options: DaemonOptions,
    wake: mpsc::Receiver<Wake>,
    /// The highest journal `seq` seen when a round started: anything above it is new.
    seen_seq: i64,
    /// `config.toml` and `credentials` as they were when the targets were built.
    settings: Fingerprint,
}

/// Rebuilds the active targets from the settings as they are now.
pub type Reload<'a> = &'a mut dyn FnMut() -> Result<Vec<DaemonTarget>>;

type Fingerprint = [Option<(std::time::SystemTime, u64)>; 2];

fn settings_fingerprint(home: &Home) -> Fingerprint {
    let of = |path: std::path::PathBuf| std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
    [of(home.config_path()), of(home.credentials_path())]
}

impl Daemon {
    /// Opens the store, writes the first state and starts the heartbeat. The caller holds the
    /// [`instance::InstanceLock`].
    pub fn start(home: &Home, targets: Vec<DaemonTarget>, options: DaemonOptions) -> Result<Daemon> {
        let store = Store::open(home)?;
        let (sender, wake) = mpsc::channel();
        let now = now_stamp();
        let state = DaemonState {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: now.clone(),
            heartbeat_at: now,
            targets: targets.iter().map(initial_state).collect(),
            stopped_at: None,
        };
        let shared = Arc::new(Shared {
            home: home.clone(),
            state: Mutex::new(state),
            stop: AtomicBool::new(false),
            alive_ms: AtomicI64::new(now_ms()),
            wake: sender,
        });
        let slots = targets.into_iter().map(Slot::new).collect();
        let settings = settings_fingerprint(home);
        let mut daemon = Daemon { shared, store, slots, options, wake, seen_seq: 0, settings };
        daemon.refresh_backlogs(true)?;
        daemon.shared.beat()?;
        spawn_heartbeat(Arc::clone(&daemon.shared));
        Ok(daemon)
    }

    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Delivers until a stop is requested, then writes the stopped state. When `config.toml`
    /// or `credentials` change (a mode switch, a new target, a fresh login), the targets are
    /// rebuilt with `reload`, so a service never needs a restart for that.
    pub fn run(mut self, notice: &mut dyn FnMut(Notice<'_>), reload: Reload<'_>) -> Result<()> {
        let sender = self.shared.wake.clone();
        let _watcher = match watch::store_changes(&self.shared.home, move || {
            let _ = sender.send(Wake::StoreChanged);
        }) {
            Ok(watcher) => Some(watcher),
            Err(e) => {
                notice(Notice::WatchUnavailable { error: &e.to_string() });
                None
            }
        };
        while !self.shared.stopping() {
            self.shared.touch();
            // A store that is briefly unreadable (or a full disk) must not end the daemon: the
            // next wake tries again, and the heartbeat keeps saying it is alive.
            let pause = match self.round(notice) {
                // Another drain holds the lock: look again soon, but do not spin on it.
                Ok(true) => Some(BUSY_RETRY),
                Ok(false) => None,
                Err(e) => Some(trouble(notice, &e, self.options.poll)),
            };
            if let Err(e) = self.refresh_backlogs(false) {
                trouble(notice, &e, self.options.poll);
            }
            let wait = pause.unwrap_or_else(|| self.next_wait());
            let woke = match self.wake.recv_timeout(wait) {
                Ok(Wake::StoreChanged) => {
                    std::thread::sleep(DEBOUNCE);
                    if self.wake.try_iter().any(|w| matches!(w, Wake::Stop)) {
                        break;
                    }
                    self.note_new_captures()
                }
                Ok(Wake::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => self.note_new_captures(),
            };
            if let Err(e) = woke {
                trouble(notice, &e, self.options.poll);
            }
            self.reload_if_changed(reload, notice);
        }
        self.shared.write_stopped()
    }

    fn reload_if_changed(&mut self, reload: Reload<'_>, notice: &mut dyn FnMut(Notice<'_>)) {
        let now = settings_fingerprint(&self.shared.home);
        if now == self.settings {
            return;
        }
        self.settings = now;
        match reload() {
            Ok(targets) => {
                self.replace_targets(targets);
                notice(Notice::Reloaded { targets: self.slots.len() });
                if let Err(e) = self.refresh_backlogs(true).and_then(|()| self.shared.beat()) {
                    trouble(notice, &e, self.options.poll);
                }
            }
            // The targets built from the last good settings keep going.
            Err(e) => {
                trouble(notice, &e, self.options.poll);
            }
        }
    }

    /// New slots (due at once, no backoff); a target that stays keeps its history in the state.
    fn replace_targets(&mut self, targets: Vec<DaemonTarget>) {
        let mut state = self.shared.lock_state();
        let old = std::mem::take(&mut state.targets);
        state.targets = targets
            .iter()
            .map(|t| {
                let mut fresh = initial_state(t);
                if let Some(was) = old.iter().find(|o| o.name == fresh.name && o.target_id == fresh.target_id) {
                    fresh.last_success_at = was.last_success_at.clone();
                    fresh.last_failure_at = was.last_failure_at.clone();
                    fresh.last_error = was.last_error.clone();
                }
                fresh
            })
            .collect();
        drop(state);
        self.slots = targets.into_iter().map(Slot::new).collect();
    }

    /// Marks every target dirty when something was captured since the last round began.
    fn note_new_captures(&mut self) -> Result<()> {
        let top = self.top_seq()?;
        if top > self.seen_seq {
            for slot in &mut self.slots {
                slot.dirty = true;
            }
        }
        Ok(())
    }

    fn top_seq(&self) -> Result<i64> {
        self.store
            .conn()
            .query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| r.get(0))
            .ctx("cannot read the journal")
    }

    /// Delivers to every ready target under one hold of the drain lock. `true` when another
    /// drain had the lock.
    fn round(&mut self, notice: &mut dyn FnMut(Notice<'_>)) -> Result<bool> {
        let now = Instant::now();
        if !self.slots.iter().any(|s| s.ready(now)) {
            return Ok(false);
        }
        let lock = match lock::acquire(&self.shared.home, Duration::ZERO, "the daemon") {
            Ok(lock) => lock,
            Err(e) if e.class() == ExitClass::Busy => return Ok(true),
            Err(e) => return Err(e),
        };
        self.seen_seq = self.top_seq()?;
        // Targets taking the same events this round share their reads and compressed bodies.
        let batches = Arc::new(SharedBatches::default());
        for index in 0..self.slots.len() {
            if self.shared.stopping() {
                break;
            }
            if self.slots[index].ready(Instant::now()) {
                self.deliver(&lock, &batches, index, notice)?;
            }
        }
        Ok(false)
    }

    fn deliver(
        &mut self,
        lock: &DrainLock,
        batches: &Arc<SharedBatches>,
        index: usize,
        notice: &mut dyn FnMut(Notice<'_>),
    ) -> Result<()> {
        self.shared.update_target(index, |t| t.state = Phase::Delivering);
        let shared = Arc::clone(&self.shared);
        let slot = &mut self.slots[index];
        let options = DrainOptions {
            limit: Some(ROUND_LIMIT),
            retries: 0,
            types: slot.types.clone(),
            shared: Some(Arc::clone(batches)),
            ..DrainOptions::default()
        };
        let mut guarded = Guarded { inner: slot.receiver.as_mut(), shared: &shared };
        let result = drain(&mut self.store, lock, &mut guarded, &options, false, &mut |_, _| shared.touch());
        let unsaved = slot.receiver.finish();
        let outcome = match (result, unsaved) {
            (Ok(summary), Ok(())) => Outcome::from_summary(summary),
            (Ok(_), Err(e)) | (Err(e), _) => Outcome::Failed {
                error: format!("{e} (hint: {})", e.hint()),
                retry_after: None,
                blocked: e.class() == ExitClass::Blocked,
            },
        };
        self.settle(index, outcome, notice);
        self.refresh_backlog(index)
    }

    /// Records a round's outcome in the target's schedule and state.
    fn settle(&mut self, index: usize, outcome: Outcome, notice: &mut dyn FnMut(Notice<'_>)) {
        let max_backoff = self.options.max_backoff;
        let slot = &mut self.slots[index];
        let now = now_stamp();
        let before = slot.settled;
        slot.settled = match &outcome {
            Outcome::Done(_) => Phase::Idle,
            Outcome::Failed { blocked: true, .. } => Phase::Blocked,
            Outcome::Failed { .. } => Phase::Backoff,
        };
        let phase = slot.settled;
        match outcome {
            Outcome::Done(summary) => {
                slot.failures = 0;
                slot.next_attempt = None;
                // A round cut short by its limit leaves work behind: go on at once.
                slot.dirty = summary.selected >= ROUND_LIMIT;
                if summary.selected > 0 {
                    notice(Notice::Delivered { name: &slot.name, summary: &summary });
                }
                self.shared.update_target(index, |t| {
                    t.state = Phase::Idle;
                    t.last_success_at = Some(now);
                    t.consecutive_failures = 0;
                    t.next_attempt_at = None;
                });
            }
            Outcome::Failed { error, retry_after, blocked } => {
                slot.failures = slot.failures.saturating_add(1);
                let wait = backoff::delay(slot.failures, retry_after, max_backoff);
                slot.next_attempt = Some(Instant::now() + wait);
                slot.dirty = true;
                notice(Notice::Failed { name: &slot.name, error: &error, retry_in: wait, blocked });
                let failures = slot.failures;
                self.shared.update_target(index, |t| {
                    t.state = phase;
                    t.last_failure_at = Some(now);
                    t.consecutive_failures = failures;
                    t.last_error = Some(error);
                    t.next_attempt_at = Some(stamp(now_ms() + wait.as_millis() as i64));
                });
            }
        }
        if phase != before {
            // Health changed: readers of the file (`status`) learn it now. A failed write is
            // retried by the next heartbeat.
            let _ = self.shared.beat();
        }
    }

    fn refresh_backlogs(&mut self, force: bool) -> Result<()> {
        for index in 0..self.slots.len() {
            let due = self.slots[index].backlog_at.is_none_or(|at| at.elapsed() >= BACKLOG_EVERY);
            if force || due {
                self.refresh_backlog(index)?;
            }
        }
        Ok(())
    }

    fn refresh_backlog(&mut self, index: usize) -> Result<()> {
        let slot = &mut self.slots[index];
        let b = backlog::backlog(&self.store, slot.receiver.identity(), slot.receiver.team(), slot.types.as_deref())?;
        slot.backlog_at = Some(Instant::now());
        self.shared.update_target(index, |t| {
            t.undelivered_count = b.undelivered_count;
            t.oldest_undelivered_at = b.oldest_undelivered_ms.map(stamp);
        });
        Ok(())
    }

    /// Until the next target leaves backoff, or the fallback timer.
    fn next_wait(&self) -> Duration {
        let now = Instant::now();
        let mut wait = self.options.poll.min(BACKLOG_EVERY);
        for slot in self.slots.iter().filter(|s| s.dirty) {
            let until = slot.next_attempt.map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
            wait = wait.min(until);
        }
        wait
    }
}

enum Outcome {
    Done(Box<DrainSummary>),
    Failed { error: String, retry_after: Option<Duration>, blocked: bool },
}

impl Outcome {
    fn from_summary(summary: DrainSummary) -> Outcome {
        match &summary.stop {
            None => Outcome::Done(Box::new(summary)),
            Some(StopReason::Transient { error, retry_after }) => {
                Outcome::Failed { error: error.clone(), retry_after: *retry_after, blocked: false }
            }
            Some(StopReason::Auth { error }) => Outcome::Failed {
                error: format!("the receiver refused our credentials ({error})"),
                retry_after: None,
                blocked: true,
            },
        }
    }
}

/// Reports a round-level failure; returns how long to pause before the next round.
fn trouble(notice: &mut dyn FnMut(Notice<'_>), error: &crate::Error, pause: Duration) -> Duration {
    notice(Notice::Trouble { error: &format!("{error} (hint: {})", error.hint()) });
    pause
}

fn initial_state(target: &DaemonTarget) -> TargetState {
    let identity = target.receiver.identity();
    TargetState {
        name: target.name.clone(),
        target_id: identity.target_id(),
        canonical_url: identity.canonical_url.clone(),
        state: Phase::Idle,
        last_success_at: None,
        last_failure_at: None,
        consecutive_failures: 0,
        last_error: None,
        next_attempt_at: None,
        undelivered_count: 0,
        oldest_undelivered_at: None,
    }
}

fn spawn_heartbeat(shared: Arc<Shared>) {
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(HEARTBEAT_EVERY);
            // A failed write is retried on the next beat; a state that stays old makes
            // `status` report the daemon as not running, which is the honest answer.
            let _ = shared.beat();
        }
    });
}

/// The receiver as the daemon hands it to the drain: once a stop is requested no new request
/// starts, so shutdown waits for at most the one in flight. Every request is a sign of life.
struct Guarded<'a> {
    inner: &'a mut dyn Receiver,
    shared: &'a Shared,
}

impl Receiver for Guarded<'_> {
    fn identity(&self) -> &TargetIdentity {
        self.inner.identity()
    }
    fn batch_url(&self) -> &str {
        self.inner.batch_url()
    }
    fn gates(&self) -> Vec<Gate> {
        self.inner.gates()
    }
    fn team(&self) -> Option<&str> {
        self.inner.team()
    }
    fn prepare(&mut self) -> Result<()> {
        self.inner.prepare()
    }
    fn post_batch(&mut self, gzip_body: &[u8]) -> std::result::Result<HttpReply, TransportError> {
        if self.shared.stopping() {
            return Err(TransportError("not sent: the daemon is stopping".into()));
        }
        self.shared.touch();
        let reply = self.inner.post_batch(gzip_body);
        self.shared.touch();
        reply
    }
    fn renew_auth(&mut self) -> Result<bool> {
        self.inner.renew_auth()
    }
    fn health(&mut self) -> Option<DeploymentMetadata> {
        self.inner.health()
    }
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
