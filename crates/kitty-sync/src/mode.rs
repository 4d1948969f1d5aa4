//! Event sync modes (contract §5).

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventSyncMode {
    Teamspace,
    ExternalReceiver,
    LocalRetention,
    OptOut,
}

impl EventSyncMode {
    pub const ALL: [EventSyncMode; 4] = [
        EventSyncMode::Teamspace,
        EventSyncMode::ExternalReceiver,
        EventSyncMode::LocalRetention,
        EventSyncMode::OptOut,
    ];

    /// Case-insensitive, `-` and `_` equal, `trash` is an alias of `opt-out`.
    pub fn parse(token: &str) -> Result<Self> {
        let normal = token.trim().to_ascii_lowercase().replace('-', "_");
        match normal.as_str() {
            "teamspace" => Ok(EventSyncMode::Teamspace),
            "external_receiver" => Ok(EventSyncMode::ExternalReceiver),
            "local_retention" => Ok(EventSyncMode::LocalRetention),
            "opt_out" | "trash" => Ok(EventSyncMode::OptOut),
            _ => Err(Error::usage(
                format!("unknown event sync mode {token:?}"),
                "use one of: teamspace, external-receiver, local-retention, opt-out (alias: trash)",
            )),
        }
    }

    /// The form written to `config.toml`, shared with spec-kitty 3.2.4 (lower case, `_`).
    pub fn config_token(self) -> &'static str {
        match self {
            EventSyncMode::Teamspace => "teamspace",
            EventSyncMode::ExternalReceiver => "external_receiver",
            EventSyncMode::LocalRetention => "local_retention",
            EventSyncMode::OptOut => "opt_out",
        }
    }

    /// The printed form: upper case with `_`.
    pub fn display_name(self) -> &'static str {
        match self {
            EventSyncMode::Teamspace => "TEAMSPACE",
            EventSyncMode::ExternalReceiver => "EXTERNAL_RECEIVER",
            EventSyncMode::LocalRetention => "LOCAL_RETENTION",
            EventSyncMode::OptOut => "OPT_OUT",
        }
    }

    /// Whether this mode ever posts events anywhere.
    pub fn delivers(self) -> bool {
        matches!(self, EventSyncMode::Teamspace | EventSyncMode::ExternalReceiver)
    }
}

impl std::fmt::Display for EventSyncMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.display_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_forgiving() {
        assert_eq!(EventSyncMode::parse("EXTERNAL-receiver").unwrap(), EventSyncMode::ExternalReceiver);
        assert_eq!(EventSyncMode::parse("external_receiver").unwrap(), EventSyncMode::ExternalReceiver);
        assert_eq!(EventSyncMode::parse(" Local-Retention ").unwrap(), EventSyncMode::LocalRetention);
        assert_eq!(EventSyncMode::parse("trash").unwrap(), EventSyncMode::OptOut);
        assert_eq!(EventSyncMode::parse("OPT_OUT").unwrap(), EventSyncMode::OptOut);
        assert_eq!(EventSyncMode::parse("teamspace").unwrap(), EventSyncMode::Teamspace);
        let err = EventSyncMode::parse("cloud").unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.hint().contains("external-receiver"));
    }

    #[test]
    fn round_trips_through_config_token() {
        for mode in EventSyncMode::ALL {
            assert_eq!(EventSyncMode::parse(mode.config_token()).unwrap(), mode);
            assert_eq!(EventSyncMode::parse(mode.display_name()).unwrap(), mode);
        }
    }
}
