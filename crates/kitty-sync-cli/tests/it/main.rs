//! The CLI's black-box tests, one binary (cargo's and uv's `tests/it` layout): one link step
//! instead of one per file, and shared helpers compiled once.
#![cfg(unix)]

#[macro_use]
mod status_support;
mod capture_support;
mod common;
mod snapshot;

mod bounds_cli;
mod completions_cli;
mod config_cli;
mod corrupt_store;
mod daemon_cli;
mod delivery_concurrency;
mod delivery_faults;
mod delivery_reset;
mod delivery_story;
mod delivery_teamspace;
mod disk_full;
mod doctor_cli;
mod emit_cli;
mod errors_cli;
mod fanout_cli;
mod hardening_cli;
mod inspect_cli;
mod migrate_cli;
mod migrate_python;
mod receiver_cli;
mod receiver_crash;
mod receiver_pg;
mod retention_cli;
mod status_cli;
mod store_cli;
mod tail_cli;
mod targets_cli;
