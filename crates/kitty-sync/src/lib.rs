//! kitty-sync engine: an append-only local event journal plus, per event and per delivery
//! target, a ledger of what was delivered. The engine is synchronous and never prints.

pub mod atomic_write;
pub mod authority;
mod canonical_json;
pub mod clock;
pub mod daemon;
pub mod delivery;
pub mod doctor;
pub mod envelope;
pub mod error;
pub mod event_journal;
pub mod home;
pub mod inspect;
pub mod legacy;
pub mod mode;
pub mod status;
pub mod store;
pub mod tail;
pub mod target_report;
pub mod target_url;
pub mod targets_config;
pub mod watch;

pub use error::{Error, ExitClass, Result};
