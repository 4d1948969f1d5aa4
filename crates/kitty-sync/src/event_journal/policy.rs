//! What capture decides before writing: drop (opt-out of a local-only type), or journal with
//! the reason the event could not be delivered at capture time.

use std::collections::HashSet;

use crate::authority::{TargetAuthority, saas_sync_enabled};
use crate::error::Result;
use crate::home::{Config, Credentials};
use crate::mode::EventSyncMode;

/// Why an event could not be delivered when it was captured (contract §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockedReason {
    OptOut,
    SaasDisabled,
    MissingAuth,
    MissingTeam,
}

impl BlockedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            BlockedReason::OptOut => "opt_out",
            BlockedReason::SaasDisabled => "saas_disabled",
            BlockedReason::MissingAuth => "missing_auth",
            BlockedReason::MissingTeam => "missing_team",
        }
    }
}

/// The capture-time view of mode, gates and identity. Gathered once per process.
#[derive(Debug, Clone)]
pub struct CapturePolicy {
    pub mode: EventSyncMode,
    pub local_only_types: HashSet<String>,
    /// The team the events are captured under (`None` when unknown).
    pub team: Option<String>,
    pub blocked_reason: Option<BlockedReason>,
}

impl Default for CapturePolicy {
    /// Local retention, no team: everything is journaled, nothing blocked.
    fn default() -> Self {
        CapturePolicy {
            mode: EventSyncMode::LocalRetention,
            local_only_types: HashSet::new(),
            team: None,
            blocked_reason: None,
        }
    }
}

/// The Teamspace gates as they stand, each a plain fact so callers can explain them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TeamspaceGates {
    pub saas_enabled: bool,
    pub auth_present: bool,
    pub team_known: bool,
}

impl TeamspaceGates {
    /// The one evaluation of the Teamspace gates, used by capture (the blocked reason it
    /// records) and by the Teamspace receiver (what a drain checks).
    pub fn evaluate(credentials: Option<&Credentials>, team: Option<&str>) -> TeamspaceGates {
        let now = jiff::Timestamp::now();
        let auth_present = credentials.is_some_and(|c| c.has_usable_access(now) || c.can_refresh(now));
        let team_known = team.is_some_and(|t| !t.is_empty());
        TeamspaceGates { saas_enabled: saas_sync_enabled(), auth_present, team_known }
    }

    /// The first failing gate in the contract's order.
    pub fn first_blocker(self) -> Option<BlockedReason> {
        if !self.saas_enabled {
            Some(BlockedReason::SaasDisabled)
        } else if !self.auth_present {
            Some(BlockedReason::MissingAuth)
        } else if !self.team_known {
            Some(BlockedReason::MissingTeam)
        } else {
            None
        }
    }
}

impl CapturePolicy {
    /// Mode, local-only types and gates from the settings read once by the caller.
    pub fn new(
        config: &Config,
        authority: &TargetAuthority,
        credentials: Option<&Credentials>,
    ) -> Result<CapturePolicy> {
        let mode = config.mode()?;
        let blocked_reason = match mode {
            EventSyncMode::OptOut => Some(BlockedReason::OptOut),
            EventSyncMode::Teamspace => {
                TeamspaceGates::evaluate(credentials, authority.team_slug.as_deref()).first_blocker()
            }
            EventSyncMode::ExternalReceiver | EventSyncMode::LocalRetention => None,
        };
        Ok(CapturePolicy {
            mode,
            local_only_types: config.local_only_types.iter().cloned().collect(),
            team: authority.team_slug.clone(),
            blocked_reason,
        })
    }

    /// Under opt-out, local-only events are dropped (and counted) instead of journaled.
    pub fn drops(&self, event_type: &str, local_only_flag: bool) -> bool {
        self.mode == EventSyncMode::OptOut && (local_only_flag || self.local_only_types.contains(event_type))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_order() {
        let all_on = TeamspaceGates { saas_enabled: true, auth_present: true, team_known: true };
        assert_eq!(all_on.first_blocker(), None);
        assert_eq!(
            TeamspaceGates { saas_enabled: false, auth_present: false, team_known: false }.first_blocker(),
            Some(BlockedReason::SaasDisabled)
        );
        assert_eq!(
            TeamspaceGates { auth_present: false, team_known: false, ..all_on }.first_blocker(),
            Some(BlockedReason::MissingAuth)
        );
        assert_eq!(TeamspaceGates { team_known: false, ..all_on }.first_blocker(), Some(BlockedReason::MissingTeam));
    }

    #[test]
    fn only_opt_out_drops() {
        let mut policy = CapturePolicy { local_only_types: ["Local".to_string()].into(), ..Default::default() };
        assert!(!policy.drops("Local", true));
        policy.mode = EventSyncMode::OptOut;
        assert!(policy.drops("Local", false));
        assert!(policy.drops("Other", true));
        assert!(!policy.drops("Other", false));
    }
}
