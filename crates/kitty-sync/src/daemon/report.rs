//! The daemon as `status` reports it (contract §10): its last state plus whether it is running,
//! and the checks that make `status --check` fail: a daemon that died (or hangs) without a
//! clean stop, and a target further behind than `--max-lag`.

use serde::Serialize;

use super::backlog::backlog;
use super::state::{self, DaemonState, Phase, TargetState};
use crate::clock::{now_ms, rfc3339_ms};
use crate::delivery::target::TargetIdentity;
use crate::error::Result;
use crate::home::Home;
use crate::status::{Problem, StatusReport};
use crate::store::Store;

#[derive(Debug, Clone, Serialize)]
pub struct DaemonStatus {
    #[serde(flatten)]
    pub state: DaemonState,
    pub running: bool,
}

/// Adds the `daemon` section and its problems to a status report. Read-only.
pub fn attach(report: &mut StatusReport, home: &Home, active: &[LagTarget], max_lag_ms: Option<i64>) {
    let mut problems = Vec::new();
    match state::read(home) {
        Ok(Some(state)) => {
            let running = state.is_running(now_ms());
            if !running && state.stopped_at.is_none() {
                problems.push(not_running(&state));
            }
            if running {
                problems.extend(state.targets.iter().filter_map(failing));
            }
            report.daemon = Some(DaemonStatus { state, running });
        }
        Ok(None) => report.daemon = None,
        Err(e) => problems.push(Problem { message: e.to_string(), hint: e.hint().to_string() }),
    }
    if let Some(max_lag_ms) = max_lag_ms {
        match lagging(home, active, max_lag_ms) {
            Ok(found) => problems.extend(found),
            Err(e) => problems.push(Problem { message: e.to_string(), hint: e.hint().to_string() }),
        }
    }
    if !problems.is_empty() {
        report.ok = false;
        report.exit_code = 3;
        report.problems.extend(problems);
    }
}

fn not_running(state: &DaemonState) -> Problem {
    Problem {
        message: format!(
            "the daemon (pid {}) is not running and did not stop cleanly; last heartbeat {}",
            state.pid, state.heartbeat_at
        ),
        hint: "start it again (`kitty-sync daemon`, or restart its service); nothing captured meanwhile is lost".into(),
    }
}

/// A target the running daemon cannot deliver to (the `/health` 503 rule): never healthy.
fn failing(target: &TargetState) -> Option<Problem> {
    if matches!(target.state, Phase::Idle | Phase::Delivering) {
        return None;
    }
    let next = target.next_attempt_at.as_deref().map(|at| format!("; next attempt {at}")).unwrap_or_default();
    Some(Problem {
        message: format!(
            "the daemon cannot deliver to {} ({}): {} failure(s) in a row, last error: {}{next}",
            target.name,
            target.canonical_url,
            target.consecutive_failures,
            target.last_error.as_deref().unwrap_or("unknown")
        ),
        hint: match target.state {
            Phase::Blocked => {
                "fix what the error names (credentials, gates, a reset target); the daemon retries by itself"
            }
            _ => "check that the target is reachable; the daemon keeps retrying with backoff and nothing is lost",
        }
        .into(),
    })
}

/// An active target as `--max-lag` judges it: its identity, Teamspace team and type filter.
pub struct LagTarget {
    pub identity: TargetIdentity,
    pub team: Option<String>,
    pub types: Option<Vec<String>>,
}

/// Active targets whose oldest undelivered event was captured longer ago than `max_lag_ms`.
fn lagging(home: &Home, active: &[LagTarget], max_lag_ms: i64) -> Result<Vec<Problem>> {
    let Some(store) = Store::open_read_only(home)? else { return Ok(Vec::new()) };
    let now = now_ms();
    let mut problems = Vec::new();
    for target in active {
        let b = backlog(&store, &target.identity, target.team.as_deref(), target.types.as_deref())?;
        let Some(oldest) = b.oldest_undelivered_ms.filter(|oldest| now - oldest > max_lag_ms) else { continue };
        problems.push(Problem {
            message: format!(
                "{} is behind: {} undelivered, the oldest captured at {} ({} s ago, more than --max-lag allows)",
                target.identity.canonical_url,
                b.undelivered_count,
                rfc3339_ms(oldest),
                (now - oldest) / 1000
            ),
            hint: "check that the daemon runs (`kitty-sync status`) and the target is reachable; `kitty-sync now` delivers at once".into(),
        });
    }
    Ok(problems)
}
