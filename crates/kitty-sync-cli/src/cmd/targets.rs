//! `kitty-sync target list|add|remove|enable|disable`: named targets beside the mode's own
//! (contract §9). `list` is read-only; the others edit `config.toml` keeping comments.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use kitty_sync::Error;
use kitty_sync::home::try_edit_config;
use kitty_sync::target_report::{self, PrimaryTarget, TargetListEntry};
use kitty_sync::target_url::canonicalize;
use kitty_sync::targets_config::{self, NewTarget};
use serde::Serialize;

use super::Context;
use crate::exit_status::ExitStatus;
use crate::output::Printer;

#[derive(Subcommand, Debug)]
pub enum TargetCommand {
    /// Every active target (primary first, then named ones), then known inactive ones
    List,
    /// Add a named target (an external receiver) delivered beside the primary
    Add(AddArgs),
    /// Remove a named target from config.toml (its delivery history is kept)
    Remove(NameArg),
    /// Deliver to a disabled named target again
    Enable(NameArg),
    /// Stop delivering to a named target for now (its delivery history is kept)
    Disable(NameArg),
}

#[derive(Args, Debug)]
pub struct AddArgs {
    /// 1-32 lower-case letters, digits and '-' ("primary" is reserved)
    name: String,
    /// The receiver's batch URL, posted to verbatim (http:// only for loopback)
    #[arg(long, value_name = "URL")]
    endpoint: String,
    /// Environment variable holding the bearer token
    #[arg(long, value_name = "VAR")]
    token_env: Option<String>,
    /// Only events of this type go to the target (repeatable; default: every type)
    #[arg(long = "type", value_name = "TYPE")]
    types: Vec<String>,
    /// Add it disabled (enable later with `kitty-sync target enable NAME`)
    #[arg(long)]
    disabled: bool,
}

#[derive(Args, Debug)]
pub struct NameArg {
    /// The target's name, as `kitty-sync target list` shows it
    name: String,
}

#[derive(Serialize)]
struct ListReport<'a> {
    targets: &'a [TargetListEntry],
}

pub fn run(command: TargetCommand, home_flag: Option<&Path>, printer: &Printer) -> Result<ExitStatus> {
    let ctx = Context::load(home_flag)?;
    match command {
        TargetCommand::List => {
            let targets = list(&ctx, printer)?;
            if printer.json {
                printer.json_doc(&ListReport { targets: &targets });
            } else {
                render(&targets, printer);
            }
        }
        TargetCommand::Add(args) => add(&ctx, args, printer)?,
        TargetCommand::Remove(NameArg { name }) => {
            edit(&ctx, |doc, path| targets_config::remove(doc, path, &name))?;
            printer.line(format!(
                "Removed target {name}; its delivery history is kept (re-adding the same URL continues where it was)"
            ));
        }
        TargetCommand::Enable(NameArg { name }) => {
            edit(&ctx, |doc, path| targets_config::set_enabled(doc, path, &name, true))?;
            printer.line(format!("Enabled target {name}"));
        }
        TargetCommand::Disable(NameArg { name }) => {
            edit(&ctx, |doc, path| targets_config::set_enabled(doc, path, &name, false))?;
            printer.line(format!("Disabled target {name}; its delivery history is kept"));
        }
    }
    Ok(ExitStatus::Success)
}

/// The list, primary included when the mode delivers.
pub fn list(ctx: &Context, printer: &Printer) -> kitty_sync::Result<Vec<TargetListEntry>> {
    let named = ctx.config.named_targets.get()?;
    let mode = ctx.config.mode()?;
    let receiver = super::target::active_receiver(ctx, mode, Duration::from_secs(5), printer)?;
    let primary = receiver.as_deref().map(|r| PrimaryTarget { identity: r.identity(), team: r.team() });
    target_report::list(&ctx.home, primary, named)
}

fn add(ctx: &Context, args: AddArgs, printer: &Printer) -> Result<()> {
    let url = canonicalize(&args.endpoint)?;
    let mode = ctx.config.mode()?;
    if mode == kitty_sync::mode::EventSyncMode::ExternalReceiver
        && let Some(primary) = ctx.config.external_endpoint.as_deref().and_then(|e| canonicalize(e).ok())
        && primary.canonical == url.canonical
    {
        return Err(Error::usage(
            format!("{} is already the primary target (the external-receiver endpoint)", url.canonical),
            "one URL is one target: it is delivered already; add a different URL",
        )
        .into());
    }
    let new = NewTarget {
        name: args.name.clone(),
        endpoint: args.endpoint,
        token_env: args.token_env.clone(),
        types: args.types,
        enabled: !args.disabled,
    };
    edit(ctx, |doc, path| targets_config::add(doc, path, &new))?;
    let state = if args.disabled { "disabled" } else { "enabled" };
    printer.line(format!("Added target {} → {} ({state})", args.name, url.canonical));
    if let Some(var) = &args.token_env
        && std::env::var_os(var).is_none()
    {
        printer.warn(format!("{var} is not set in this environment; set it before `kitty-sync now`"));
    }
    Ok(())
}

fn edit(
    ctx: &Context,
    change: impl FnOnce(&mut toml_edit::DocumentMut, &Path) -> kitty_sync::Result<()>,
) -> kitty_sync::Result<()> {
    let path = ctx.home.config_path();
    try_edit_config(&path, |doc| change(doc, &path))
}

fn render(targets: &[TargetListEntry], printer: &Printer) {
    if targets.is_empty() {
        printer.line("No targets: the mode delivers nowhere and no named target is configured.");
        printer.line("Add one with `kitty-sync target add NAME --endpoint URL`, or set a mode with `kitty-sync mode`.");
        return;
    }
    for t in targets {
        let name = t.name.as_deref().unwrap_or("(not configured)");
        let state = match (t.active, t.enabled, t.name.is_some()) {
            (true, _, _) => "active",
            (false, false, true) => "disabled",
            _ => "inactive",
        };
        let types = t.types.as_ref().map(|types| format!(" · types {}", types.join(", "))).unwrap_or_default();
        printer.line(format!("{name:<16} {state:<9} {} [{}]{types}", t.canonical_url, t.kind.as_str()));
        printer.line(format!(
            "{:<16} delivered {} · undelivered {} · parked {} · rejected {}",
            "", t.delivered_count, t.undelivered_count, t.parked_count, t.rejected_count
        ));
        if let (Some(at), error) = (&t.last_failure_at, &t.last_error) {
            printer.line(format!("{:<16} last failure {at}: {}", "", error.as_deref().unwrap_or("(no detail)")));
        }
    }
}
