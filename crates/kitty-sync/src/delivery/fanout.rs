//! Fan-out (contract §9): one journal delivered to several targets in one run.
//!
//! Each target gets its own drain on its own thread, with its own store connection, ledger
//! key, high-water mark and receiver; the threads share only the journal (WAL lets the
//! readers proceed side by side; ledger writes are short transactions that wait out each other
//! through the busy timeout). So a target that is down, slow, blocked or rejecting costs the
//! others nothing: they never wait for its answers, only for the store's write lock.
//!
//! Batches are shared without walking in lock-step: the first target to select a batch reads
//! its bytes and compresses it, and every target that selects the same events takes it from
//! [`SharedBatches`] (a fresh target catching up beside another, or several at once). A target
//! whose selection differs (type filter, earlier progress) or that falls far behind reads its
//! own, so the slowest target never paces the others.

use std::sync::Arc;

use serde::Serialize;

use super::batch::SharedBatches;
use super::dispatcher::{DrainOptions, DrainSummary, ProgressFn, StopReason, TargetSummary, drain};
use super::lock::DrainLock;
use super::receiver::Receiver;
use super::target::{TargetIdentity, TargetKind};
use crate::error::Error;
use crate::home::Home;
use crate::store::Store;

/// One target of a fan-out run.
pub struct FanTarget {
    /// `"primary"` for the mode's target, else the configured name.
    pub name: String,
    pub receiver: Box<dyn Receiver + Send>,
    /// Only these event types (`None`: every type).
    pub types: Option<Vec<String>>,
}

/// Why a target got nothing (more) this run, when it is blocked.
#[derive(Debug, Clone, Serialize)]
pub struct Blocked {
    pub reason: String,
    pub hint: String,
    /// The full message, for the operator's stderr.
    #[serde(skip)]
    pub message: String,
}

/// What one target's drain came to: the §7 counts plus why it was blocked and its own exit code.
#[derive(Debug, Serialize)]
pub struct TargetOutcome {
    pub name: String,
    #[serde(flatten)]
    pub summary: DrainSummary,
    pub blocked: Option<Blocked>,
    pub exit_code: u8,
    /// Why the target was blocked or failed (gates, reset, credentials, the store), for stderr.
    #[serde(skip)]
    pub error: Option<Error>,
    /// A rotated Teamspace token that could not be written back.
    #[serde(skip)]
    pub unsaved: Option<Error>,
}

/// Drains every target side by side and returns one outcome per target, in the given order.
/// A single target runs on this thread, with `progress`; several run on their own threads
/// without it.
pub fn drain_all(
    home: &Home,
    lock: &DrainLock,
    targets: Vec<FanTarget>,
    options: &DrainOptions,
    count_total: bool,
    progress: ProgressFn<'_>,
) -> Vec<TargetOutcome> {
    if targets.len() == 1 {
        return targets.into_iter().map(|t| drain_one(home, lock, t, options, count_total, progress)).collect();
    }
    // One read and one compression per batch for every target that selects the same events.
    let options = &DrainOptions { shared: Some(Arc::new(SharedBatches::default())), ..options.clone() };
    std::thread::scope(|scope| {
        let handles: Vec<_> = targets
            .into_iter()
            .map(|t| {
                let name = t.name.clone();
                let identity = t.receiver.identity().clone();
                let handle = scope.spawn(move || drain_one(home, lock, t, options, false, &mut |_, _| {}));
                (name, identity, handle)
            })
            .collect();
        handles
            .into_iter()
            .map(|(name, identity, handle)| {
                handle.join().unwrap_or_else(|_| {
                    let error = Error::internal("a target's delivery thread failed", "run `kitty-sync now` again");
                    failed(name, &identity, error)
                })
            })
            .collect()
    })
}

fn drain_one(
    home: &Home,
    lock: &DrainLock,
    mut target: FanTarget,
    options: &DrainOptions,
    count_total: bool,
    progress: ProgressFn<'_>,
) -> TargetOutcome {
    let identity = target.receiver.identity().clone();
    let options = DrainOptions { types: target.types.take(), ..options.clone() };
    let result = Store::open(home)
        .and_then(|mut store| drain(&mut store, lock, target.receiver.as_mut(), &options, count_total, progress));
    // Whatever the drain's outcome: a rotated token that could not be saved is said.
    let unsaved = target.receiver.finish().err();
    let mut outcome = match result {
        Ok(summary) => settled(target.name, summary),
        Err(e) => failed(target.name, &identity, e),
    };
    outcome.unsaved = unsaved;
    outcome
}

fn settled(name: String, summary: DrainSummary) -> TargetOutcome {
    let exit_code = match &summary.stop {
        Some(StopReason::Auth { error }) => {
            let hint = match summary.target.kind {
                TargetKind::Teamspace => {
                    "log in again with spec-kitty (`spec-kitty auth login`), then run `kitty-sync now`"
                }
                TargetKind::External if name == crate::targets_config::PRIMARY => {
                    "check the token in the variable named by [event_sync] external_token_env"
                }
                TargetKind::External => {
                    "check the token in the variable named by this target's token_env in config.toml"
                }
            };
            let message = format!("the receiver refused our credentials ({error}); delivery stopped");
            let error = Error::auth_refused(message.clone(), hint);
            return TargetOutcome {
                name,
                summary,
                blocked: Some(Blocked { reason: "auth_refused".into(), hint: hint.into(), message }),
                exit_code: 3,
                error: Some(error),
                unsaved: None,
            };
        }
        Some(StopReason::Transient { .. }) => 4,
        None if summary.complete() => 0,
        None => 4,
    };
    TargetOutcome { name, summary, blocked: None, exit_code, error: None, unsaved: None }
}

/// A target whose drain could not run (gates, reset, the store): nothing counted.
fn failed(name: String, identity: &TargetIdentity, error: Error) -> TargetOutcome {
    let summary = empty_summary(identity);
    let reason = match &error {
        Error::GatesClosed { reasons, .. } => Some(reasons.join(",")),
        Error::TargetReset { .. } => Some("target_reset".to_string()),
        Error::AuthRefused { .. } => Some("auth_refused".to_string()),
        Error::Blocked { .. } => Some("blocked".to_string()),
        _ => None,
    };
    let exit_code = error.exit_code();
    let blocked = reason.map(|reason| Blocked { reason, hint: error.hint().to_string(), message: error.to_string() });
    TargetOutcome { name, summary, blocked, exit_code, error: Some(error), unsaved: None }
}

/// The counts of a target nothing was selected for.
pub fn empty_summary(identity: &TargetIdentity) -> DrainSummary {
    DrainSummary::nothing(TargetSummary {
        target_id: identity.target_id(),
        canonical_url: identity.canonical_url.clone(),
        team_slug: identity.team_slug.clone(),
        user_email: identity.user_email.clone(),
        kind: identity.kind,
    })
}

/// The run's exit code (contract §9): 5 busy; else 3 when any target is blocked; else a
/// failure of the store or a bug; else 4 when any target is incomplete; else 0.
pub fn overall_exit_code(outcomes: &[TargetOutcome]) -> u8 {
    let codes = || outcomes.iter().map(|o| o.exit_code);
    [5u8, 3]
        .into_iter()
        .find(|c| codes().any(|x| x == *c))
        .or_else(|| codes().find(|c| !matches!(c, 0 | 4)))
        .or_else(|| codes().find(|c| *c == 4))
        .unwrap_or(0)
}

/// Whether the target's last word on some event still standing is a refusal of our
/// credentials (401/403): it is blocked until the token is fixed (contract §9, `status`).
pub fn refuses_credentials(home: &Home, identity: &TargetIdentity) -> crate::error::Result<bool> {
    use crate::error::StoreContext;
    let Some(store) = Store::open_read_only(home)? else { return Ok(false) };
    let Some(record) = super::target::find(store.conn(), identity)? else { return Ok(false) };
    // The status index narrows this to the target's standing transient failures.
    store
        .conn()
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM ledger WHERE target = ?1 AND epoch = ?2 AND status = 'failed_transient'
                 AND last_http_status IN (401, 403))",
            [record.id, record.epoch],
            |r| r.get::<_, bool>(0),
        )
        .ctx("cannot read the ledger")
}
