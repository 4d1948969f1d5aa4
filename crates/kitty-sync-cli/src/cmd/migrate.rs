//! `kitty-sync migrate`: import spec-kitty's legacy queues (being written by a helper).

use std::path::Path;

use anyhow::Result;
use clap::Args;

use crate::output::Printer;

#[derive(Args, Debug)]
pub struct MigrateArgs {}

pub fn run(_args: MigrateArgs, _home_flag: Option<&Path>, _printer: &Printer) -> Result<u8> {
    Err(kitty_sync::Error::internal("migrate is not available in this build", "use a released kitty-sync").into())
}
