pub mod completions;
pub mod daemon;
pub mod demo;
pub mod doctor;
pub mod emit;
pub mod fan;
pub mod inspect;
pub mod migrate;
pub mod mode;
pub mod now;
pub mod retention;
pub mod retry;
pub mod server;
pub mod status;
pub mod tail;
pub mod target;
pub mod targets;

use std::path::Path;

use kitty_sync::authority::TargetAuthority;
use kitty_sync::event_journal::CapturePolicy;
use kitty_sync::home::{Config, CredentialsFile, Home};
use kitty_sync::mode::EventSyncMode;

use crate::output::Printer;

/// The settings of this process, resolved once (ripgrep's `HiArgs`): the home, its config,
/// `credentials` read once with one failure policy, and the one target authority. Commands
/// take what they need from here instead of reading files again.
pub struct Context {
    pub home: Home,
    pub config: Config,
    pub credentials: CredentialsFile,
    pub authority: TargetAuthority,
}

impl Context {
    pub fn load(home_flag: Option<&Path>) -> kitty_sync::Result<Context> {
        let home = Home::resolve(home_flag)?;
        let config = home.load_config()?;
        let credentials = home.read_credentials();
        let authority = TargetAuthority::for_home(&home, &config, &credentials)?;
        Ok(Context { home, config, credentials, authority })
    }

    /// Prints the authority's warnings (override, unreadable credentials) once, before any
    /// network call, for commands that use the server URL.
    pub fn warn_authority(&self, printer: &Printer) {
        for warning in &self.authority.warnings {
            printer.warn(warning);
        }
    }

    /// What capture needs. Capture never stops for `credentials`: an unreadable file is a
    /// warning, and the events are captured as if it were absent.
    pub fn capture_policy(&self, printer: &Printer) -> kitty_sync::Result<CapturePolicy> {
        if let Some(warning) = self.credentials.warning() {
            printer.warn(warning);
        }
        CapturePolicy::new(&self.config, &self.authority, self.credentials.credentials())
    }

    /// Delivery to Teamspace stops (exit 2, naming file and line) when `credentials` cannot be
    /// read; other modes go on.
    pub fn check_delivery(&self, mode: EventSyncMode) -> kitty_sync::Result<()> {
        match mode {
            EventSyncMode::Teamspace => self.credentials.require_readable(),
            _ => Ok(()),
        }
    }
}
