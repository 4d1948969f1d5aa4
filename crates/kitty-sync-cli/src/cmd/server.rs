//! `kitty-sync server [URL]`: show the target authority, or set `[sync] server_url`.

use std::path::Path;

use anyhow::Result;
use clap::Args;
use kitty_sync::authority::{OverrideMode, TargetAuthority, redact_scope};
use kitty_sync::home::{set_config_string, try_edit_config};
use kitty_sync::target_url::{canonicalize, redact_url};

use super::Context;
use crate::exit_status::ExitStatus;
use crate::output::Printer;

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// New server URL (https://, or http:// for loopback); omit to show the current target
    url: Option<String>,
}

pub fn run(args: ServerArgs, home_flag: Option<&Path>, printer: &Printer) -> Result<ExitStatus> {
    let ctx = Context::load(home_flag)?;
    let Some(url) = args.url else {
        ctx.warn_authority(printer);
        if printer.json {
            printer.json_doc(&ctx.authority);
        } else {
            print_authority(&ctx.authority, printer);
        }
        return Ok(ExitStatus::Success);
    };
    let target = canonicalize(&url)?;
    // The canonical form, not the raw text: it drops user info (a password in the URL must
    // not be stored in config.toml or echoed below), query and fragment (which would corrupt
    // every `{server}/api/...` URL built from it), and normalises case and default ports.
    let stored = target.canonical;
    let config_path = ctx.home.config_path();
    try_edit_config(&config_path, |doc| set_config_string(doc, &config_path, "sync", "server_url", &stored))?;
    let after = Context::load(home_flag)?;
    after.warn_authority(printer);
    if printer.json {
        printer.json_doc(&after.authority);
        return Ok(ExitStatus::Success);
    }
    printer.line(format!("Server set to {stored} (in {})", ctx.home.config_path().display()));
    if after.authority.override_mode == OverrideMode::ProcessOverride {
        printer.line(format!(
            "Note: SPEC_KITTY_SAAS_URL is set, so this process still targets {}",
            redact_url(&after.authority.resolved_server_url)
        ));
    }
    print_authority(&after.authority, printer);
    Ok(ExitStatus::Success)
}

pub fn print_authority(a: &TargetAuthority, printer: &Printer) {
    let or_unset = |v: &Option<String>| v.as_deref().map(redact_url).unwrap_or_else(|| "(not set)".into());
    let override_text = match a.override_mode {
        OverrideMode::None => "none",
        OverrideMode::ProcessOverride => "process_override (SPEC_KITTY_SAAS_URL wins)",
    };
    let status = serde_json::to_value(a.active_queue_scope_status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let rows = [
        ("resolved server", redact_url(&a.resolved_server_url)),
        ("configured", or_unset(&a.configured_server_url)),
        ("SPEC_KITTY_SAAS_URL", or_unset(&a.env_server_url)),
        ("override", override_text.to_string()),
        ("user", or_unset(&a.user_id)),
        ("team", or_unset(&a.team_slug)),
        ("queue scope", redact_scope(&a.derived_queue_scope)),
        ("legacy queue", a.queue_db_path.clone()),
        (
            "active scope",
            format!(
                "{status}{}",
                a.active_queue_scope.as_deref().map(|s| format!(" ({})", redact_scope(s))).unwrap_or_default()
            ),
        ),
    ];
    for (label, value) in rows {
        printer.line(format!("{label:<20} {value}"));
    }
}
