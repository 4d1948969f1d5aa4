//! `event-sync/daemon.json`: what the daemon last said about itself (contract §10). The daemon
//! writes it atomically; `status`, `doctor` and `/health` read it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::atomic_write::write_atomically;
use crate::clock::{now_ms, parse_rfc3339};
use crate::error::{Error, Result};
use crate::home::Home;

pub const STATE_FILE: &str = "daemon.json";

/// A heartbeat older than this means the daemon died or hangs.
pub const HEARTBEAT_LIMIT_MS: i64 = 15_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonState {
    pub pid: u32,
    pub version: String,
    pub started_at: String,
    pub heartbeat_at: String,
    pub targets: Vec<TargetState>,
    /// Set by a clean stop (SIGTERM/SIGINT) only: a state without it and without a live
    /// daemon means the daemon died.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Idle,
    Delivering,
    Backoff,
    Blocked,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Delivering => "delivering",
            Phase::Backoff => "backoff",
            Phase::Blocked => "blocked",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetState {
    pub name: String,
    pub target_id: String,
    pub canonical_url: String,
    pub state: Phase,
    pub last_success_at: Option<String>,
    pub last_failure_at: Option<String>,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<String>,
    pub undelivered_count: i64,
    pub oldest_undelivered_at: Option<String>,
}

impl DaemonState {
    /// Every target is idle or delivering (the `/health` 200 rule).
    pub fn healthy(&self) -> bool {
        self.targets.iter().all(|t| matches!(t.state, Phase::Idle | Phase::Delivering))
    }

    /// The process is alive and its heartbeat is recent: a daemon that died, or hangs and no
    /// longer renews its heartbeat, is not running.
    pub fn is_running(&self, now_ms: i64) -> bool {
        let fresh =
            parse_rfc3339(&self.heartbeat_at).is_some_and(|beat| now_ms - beat.as_millisecond() <= HEARTBEAT_LIMIT_MS);
        self.stopped_at.is_none() && fresh && pid_alive(self.pid)
    }
}

pub fn state_path(home: &Home) -> PathBuf {
    home.sync_dir().join(STATE_FILE)
}

pub fn write(home: &Home, state: &DaemonState) -> Result<()> {
    let path = state_path(home);
    let bytes = serde_json::to_vec_pretty(state)
        .map_err(|e| Error::internal(format!("cannot encode the daemon state: {e}"), "report this as a bug"))?;
    write_atomically(&path, &bytes, None)
}

/// The last state written, `None` when no daemon ever ran in this home. Never creates anything.
pub fn read(home: &Home) -> Result<Option<DaemonState>> {
    let path = state_path(home);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("cannot read the daemon state", &path, e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        Error::internal(
            format!("the daemon state {} is not valid ({e})", path.display()),
            "restart the daemon (`kitty-sync daemon`); it rewrites the file",
        )
    })
}

/// Whether a process with this id exists (a zombie does not count: it is dead, only unreaped).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = libc::pid_t::try_from(pid) else { return false };
    if raw <= 0 {
        return false;
    }
    // SAFETY: signal 0 delivers nothing; kill only checks that the process exists.
    let exists =
        unsafe { libc::kill(raw, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && !is_zombie(pid)
}

#[cfg(target_os = "linux")]
fn is_zombie(pid: u32) -> bool {
    // The state letter follows the parenthesised command name, which may itself hold ')'.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

#[cfg(not(target_os = "linux"))]
fn is_zombie(_pid: u32) -> bool {
    false
}

/// Renders a wall-clock time for the state document.
pub fn stamp(ms: i64) -> String {
    crate::clock::rfc3339_ms(ms)
}

pub fn now_stamp() -> String {
    stamp(now_ms())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(pid: u32, heartbeat_ms: i64) -> DaemonState {
        DaemonState {
            pid,
            version: "0".into(),
            started_at: stamp(heartbeat_ms),
            heartbeat_at: stamp(heartbeat_ms),
            targets: Vec::new(),
            stopped_at: None,
        }
    }

    #[test]
    fn running_needs_a_live_pid_and_a_fresh_heartbeat() {
        let now = now_ms();
        assert!(state(std::process::id(), now).is_running(now));
        assert!(!state(std::process::id(), now - HEARTBEAT_LIMIT_MS - 1).is_running(now));
        assert!(!state(0, now).is_running(now));
        let mut stopped = state(std::process::id(), now);
        stopped.stopped_at = Some(stamp(now));
        assert!(!stopped.is_running(now));
    }

    #[test]
    fn round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        assert!(read(&home).unwrap().is_none());
        home.ensure_sync_dir().unwrap();
        write(&home, &state(7, 0)).unwrap();
        assert_eq!(read(&home).unwrap().unwrap().pid, 7);
    }
}
