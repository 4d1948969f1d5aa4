//! `kitty-sync mode [MODE] [--endpoint URL] [--token-env VAR]`.

use std::path::Path;

use anyhow::Result;
use clap::Args;
use kitty_sync::Error;
use kitty_sync::home::{set_config_string, try_edit_config};
use kitty_sync::mode::EventSyncMode;
use kitty_sync::target_url::{canonicalize, redact_url};
use serde::Serialize;

use super::Context;
use crate::exit_status::ExitStatus;
use crate::output::Printer;

#[derive(Args, Debug)]
pub struct ModeArgs {
    /// teamspace | external-receiver | local-retention | opt-out (alias: trash); omit to show
    mode: Option<String>,
    /// Receiver endpoint for external-receiver (the batch URL, posted to verbatim)
    #[arg(long, value_name = "URL", requires = "mode")]
    endpoint: Option<String>,
    /// Environment variable holding the external receiver's bearer token
    #[arg(long, value_name = "VAR", requires = "mode")]
    token_env: Option<String>,
}

#[derive(Serialize)]
struct ModeReport {
    mode: &'static str,
    delivers: bool,
    external_endpoint: Option<String>,
    external_token_env: Option<String>,
    local_only_types: Vec<String>,
}

pub fn run(args: ModeArgs, home_flag: Option<&Path>, printer: &Printer) -> Result<ExitStatus> {
    let ctx = Context::load(home_flag)?;
    let Some(token) = args.mode else {
        show(&ctx, printer)?;
        return Ok(ExitStatus::Success);
    };
    let mode = EventSyncMode::parse(&token)?;
    let endpoint = match &args.endpoint {
        Some(url) => Some(canonicalize(url)?.raw),
        None => None,
    };
    if let Some(var) = &args.token_env {
        kitty_sync::targets_config::validate_env_name(var)?;
    }
    if mode == EventSyncMode::ExternalReceiver {
        let effective = endpoint.clone().or_else(|| ctx.config.external_endpoint.clone());
        match effective {
            None => {
                return Err(Error::usage(
                    "external-receiver mode needs an endpoint",
                    "pass --endpoint URL, e.g. `kitty-sync mode external-receiver --endpoint http://127.0.0.1:8787/api/v1/events/batch/`",
                )
                .into());
            }
            Some(url) => {
                canonicalize(&url)?;
            }
        }
    }
    let config_path = ctx.home.config_path();
    try_edit_config(&config_path, |doc| {
        set_config_string(doc, &config_path, "event_sync", "mode", mode.config_token())?;
        if let Some(url) = &endpoint {
            set_config_string(doc, &config_path, "event_sync", "external_endpoint", url)?;
        }
        if let Some(var) = &args.token_env {
            set_config_string(doc, &config_path, "event_sync", "external_token_env", var)?;
        }
        Ok(())
    })?;
    if let Some(var) = &args.token_env
        && std::env::var_os(var).is_none()
    {
        printer.warn(format!("{var} is not set in this environment; set it before `kitty-sync now`"));
    }
    let after = Context::load(home_flag)?;
    printer.line(format!("Event sync mode set to {mode}"));
    show(&after, printer)?;
    Ok(ExitStatus::Success)
}

fn show(ctx: &Context, printer: &Printer) -> Result<()> {
    let mode = ctx.config.mode()?;
    let report = ModeReport {
        mode: mode.display_name(),
        delivers: mode.delivers(),
        // Shown, never stored: the endpoint's password and key-like query values are redacted.
        external_endpoint: ctx.config.external_endpoint.as_deref().map(redact_url),
        external_token_env: ctx.config.external_token_env.clone(),
        local_only_types: ctx.config.local_only_types.clone(),
    };
    if printer.json {
        printer.json_doc(&report);
        return Ok(());
    }
    printer.line(format!("{:<20} {}", "mode", report.mode));
    let target = match mode {
        EventSyncMode::Teamspace => {
            // The line below shows the resolved server URL: a SPEC_KITTY_SAAS_URL override
            // must be said (§4), as every command that uses the URL does.
            ctx.warn_authority(printer);
            format!("{} (Teamspace)", redact_url(&ctx.authority.resolved_server_url))
        }
        EventSyncMode::ExternalReceiver => {
            report.external_endpoint.clone().unwrap_or_else(|| "(no endpoint set)".into())
        }
        EventSyncMode::LocalRetention | EventSyncMode::OptOut => {
            "none (events are kept locally, never delivered)".into()
        }
    };
    printer.line(format!("{:<20} {target}", "delivers to"));
    if let Some(endpoint) = &report.external_endpoint {
        printer.line(format!("{:<20} {endpoint}", "external endpoint"));
    }
    if let Some(var) = &report.external_token_env {
        printer.line(format!("{:<20} ${var}", "token from"));
    }
    if !report.local_only_types.is_empty() {
        printer.line(format!("{:<20} {}", "local-only types", report.local_only_types.join(", ")));
    }
    Ok(())
}
