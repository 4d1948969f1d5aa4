//! The CLI's black-box tests, one binary (cargo's and uv's `tests/it` layout): one link step
//! instead of one per file, and shared helpers compiled once.
#![cfg(unix)]

#[macro_use]
mod status_support;
mod capture_support;
mod common;
mod snapshot;

mod completions_cli;
mod config_cli;
mod delivery_concurrency;
mod delivery_faults;
mod delivery_reset;
mod delivery_story;
mod delivery_teamspace;
mod doctor_cli;
mod emit_cli;
mod errors_cli;
mod inspect_cli;
mod migrate_cli;
mod receiver_cli;
mod retention_cli;
mod status_cli;
mod tail_cli;
mod targets_cli;
