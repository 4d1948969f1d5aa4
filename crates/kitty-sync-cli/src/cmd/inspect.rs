//! `kitty-sync inspect EVENT_ID`.

use std::path::Path;

use anyhow::Result;
use clap::Args;
use kitty_sync::Error;
use kitty_sync::home::Home;
use kitty_sync::inspect::{EventInspection, inspect};
use kitty_sync::store::Store;

use crate::exit_status::ExitStatus;
use crate::output::Printer;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The event id (ULID)
    event_id: String,
}

pub fn run(args: InspectArgs, home_flag: Option<&Path>, printer: &Printer) -> Result<ExitStatus> {
    if !kitty_sync::envelope::is_valid_ulid(&args.event_id) {
        return Err(Error::usage(
            format!("invalid event id {:?}: expected a 26-character ULID", args.event_id),
            "copy the id from `kitty-sync emit` output or the envelope's event_id",
        )
        .into());
    }
    let home = Home::resolve(home_flag)?;
    let store = Store::open_read_only(&home)?;
    let event = inspect(store.as_ref(), &args.event_id)?;
    if printer.json {
        printer.json_doc(&event);
    } else {
        print_human(&event, printer);
    }
    Ok(ExitStatus::Success)
}

fn print_human(e: &EventInspection, printer: &Printer) {
    let row = |label: &str, value: String| printer.line(format!("{label:<22} {value}"));
    row("event id", e.event_id.clone());
    row("type", e.event_type.clone());
    row("captured at", e.captured_at.clone());
    row("payload", format!("{} bytes, sha256 {}", e.payload_bytes, e.payload_sha256));
    let state = if e.purged {
        "purged (payload removed by gc; history kept)".to_string()
    } else if let Some(at) = &e.archived_at {
        format!("archived at {at}")
    } else {
        "retained".to_string()
    };
    row("state", state);
    if let Some(reason) = &e.drain_blocked_reason {
        row("blocked at capture", reason.clone());
    }
    if let Some(key) = &e.coalesce_key {
        row("coalesce key", key.clone());
    }
    if let Some(by) = &e.coalesced_into {
        row("superseded by", format!("{by} (never delivered anywhere)"));
    }
    for source in &e.sources {
        row("migrated from", format!("{} ({})", source.source, source.path));
    }
    if e.targets.is_empty() {
        row("delivery", "no target known yet".into());
    }
    for target in &e.targets {
        let status = target.status.clone().unwrap_or_else(|| "never attempted".into());
        row("target", format!("{} [{}] {}: {status}", target.canonical_url, target.kind, target.target_id));
        for a in &target.attempts {
            let http = a.http_status.map(|s| format!(" HTTP {s}")).unwrap_or_default();
            let err = a.error.as_deref().map(|s| format!(" — {s}")).unwrap_or_default();
            let old = if a.superseded { " (before reset)" } else { "" };
            printer.line(format!("{:<22}   {} {}{http}{err}{old}", "", a.at, a.outcome));
        }
    }
    if let Some(envelope) = &e.envelope {
        printer.line("envelope:");
        let pretty = serde_json::from_str::<serde_json::Value>(envelope.get())
            .ok()
            .and_then(|v| serde_json::to_string_pretty(&v).ok())
            .unwrap_or_else(|| envelope.get().to_string());
        printer.line(pretty);
    }
}
