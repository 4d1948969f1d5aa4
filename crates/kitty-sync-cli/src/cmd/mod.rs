pub mod completions;
pub mod demo;
pub mod doctor;
pub mod emit;
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
use kitty_sync::home::{Config, Home};

use crate::output::Printer;

/// Every command's shared start: the home, its config, and the one target authority.
pub struct Context {
    pub home: Home,
    pub config: Config,
    pub authority: TargetAuthority,
}

impl Context {
    pub fn load(home_flag: Option<&Path>) -> kitty_sync::Result<Context> {
        let home = Home::resolve(home_flag)?;
        let config = home.load_config()?;
        let authority = TargetAuthority::for_home(&home, &config)?;
        Ok(Context { home, config, authority })
    }

    /// Prints the authority's warnings (override, unreadable credentials) once, before any
    /// network call, for commands that use the server URL.
    pub fn warn_authority(&self, printer: &Printer) {
        for warning in &self.authority.warnings {
            printer.warn(warning);
        }
    }
}
