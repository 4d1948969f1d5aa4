//! `kitty-sync emit`: capture one event, or many from JSON Lines (optionally gzip).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{ArgGroup, Args};
use kitty_sync::Error;
use kitty_sync::event_journal::{AppendOutcome, CapturePolicy, ImportOptions, ImportReport, Journal, NewEvent};
use kitty_sync::store::Store;
use serde::Serialize;

use super::Context;
use crate::exit_status::ExitStatus;
use crate::output::Printer;

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("source").required(true).args(["event_type", "jsonl"])))]
pub struct EmitArgs {
    /// Event type of a single event
    #[arg(long = "type", value_name = "TYPE")]
    event_type: Option<String>,
    #[arg(long, value_name = "ID", conflicts_with = "jsonl")]
    aggregate_id: Option<String>,
    #[arg(long, value_name = "T", conflicts_with = "jsonl")]
    aggregate_type: Option<String>,
    /// Payload as a JSON object (default {})
    #[arg(long, value_name = "JSON", conflicts_with_all = ["payload_file", "jsonl"])]
    payload: Option<String>,
    /// Read the payload JSON object from a file
    #[arg(long, value_name = "PATH", conflicts_with = "jsonl")]
    payload_file: Option<PathBuf>,
    /// Use this event id (ULID) instead of a new one; re-running with the same content is a no-op
    #[arg(long, value_name = "ULID", conflicts_with = "jsonl")]
    event_id: Option<String>,
    /// Supersede earlier undelivered events with the same key
    #[arg(long, value_name = "KEY", conflicts_with = "jsonl")]
    coalesce_key: Option<String>,
    /// When the event happened (RFC 3339; default now)
    #[arg(long, value_name = "RFC3339", conflicts_with = "jsonl")]
    occurred_at: Option<String>,
    #[arg(long, value_name = "UUID", conflicts_with = "jsonl")]
    project_uuid: Option<String>,
    /// Under opt-out mode, drop this event instead of journaling it
    #[arg(long, conflicts_with = "jsonl")]
    local_only: bool,
    /// Import JSON Lines from PATH (gzip detected automatically) or - for stdin
    #[arg(long, value_name = "PATH|-")]
    jsonl: Option<String>,
    /// Event type for lines that have none
    // `conflicts_with` as well as `requires`: clap waives a requirement on `--jsonl` when an
    // argument conflicting with it (`--type`) is present, which silently ignored these flags.
    #[arg(long, value_name = "TYPE", requires = "jsonl", conflicts_with = "event_type")]
    default_type: Option<String>,
    /// Write the valid lines and report the invalid ones (default: all or nothing)
    #[arg(long, requires = "jsonl", conflicts_with = "event_type")]
    skip_invalid: bool,
}

/// The contract's `emit --json` document.
#[derive(Serialize, Default)]
struct EmitReport {
    captured: u64,
    already_present: u64,
    coalesced: u64,
    dropped: u64,
    invalid: Vec<kitty_sync::event_journal::LineError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_ids: Option<Vec<String>>,
}

pub fn run(args: EmitArgs, home_flag: Option<&Path>, printer: &Printer) -> Result<ExitStatus> {
    let ctx = Context::load(home_flag)?;
    let policy = ctx.capture_policy(printer)?;
    match args.jsonl.clone() {
        Some(source) => run_import(&args, &source, &ctx, policy, printer),
        None => run_single(args, &ctx, policy, printer),
    }
}

fn run_single(args: EmitArgs, ctx: &Context, policy: CapturePolicy, printer: &Printer) -> Result<ExitStatus> {
    let event = new_event(args)?;
    let mut store = Store::open(&ctx.home)?;
    let mut journal = Journal::new(&mut store, policy);
    let outcome = journal.append(event)?;
    let mut report = EmitReport::default();
    let event_id = match &outcome {
        AppendOutcome::Captured { event_id, coalesced } => {
            report.captured = 1;
            report.coalesced = *coalesced;
            event_id.clone()
        }
        AppendOutcome::AlreadyPresent { event_id } => {
            report.already_present = 1;
            printer.note(format!("{event_id} is already in the journal with the same content; nothing changed"));
            event_id.clone()
        }
        AppendOutcome::Dropped { event_id } => {
            report.dropped = 1;
            printer.note(format!(
                "dropped {event_id}: local-only event under opt-out mode (counted in `kitty-sync status`)"
            ));
            event_id.clone()
        }
    };
    if report.coalesced > 0 {
        printer
            .note(format!("superseded {} earlier undelivered event(s) with the same coalesce key", report.coalesced));
    }
    if printer.json {
        report.event_ids = Some(vec![event_id]);
        printer.json_doc(&report);
    } else {
        printer.essential(&event_id);
    }
    Ok(ExitStatus::Success)
}

fn new_event(args: EmitArgs) -> Result<NewEvent> {
    let payload = match (&args.payload, &args.payload_file) {
        (Some(text), _) => Some(parse_payload(text, "--payload")?),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::usage(
                    format!("cannot read --payload-file {}: {e}", path.display()),
                    "check the path and its permissions",
                )
            })?;
            Some(parse_payload(&text, &format!("--payload-file {}", path.display()))?)
        }
        (None, None) => None,
    };
    let occurred_at = match &args.occurred_at {
        Some(text) => Some(kitty_sync::clock::parse_rfc3339(text).ok_or_else(|| {
            Error::usage(
                format!("invalid --occurred-at {text:?}: not an RFC 3339 timestamp"),
                "use e.g. 2026-11-24T10:15:00Z or 2026-11-24T11:15:00+01:00",
            )
        })?),
        None => None,
    };
    Ok(NewEvent {
        event_type: args.event_type.unwrap_or_default(),
        event_id: args.event_id,
        aggregate_id: args.aggregate_id,
        aggregate_type: args.aggregate_type,
        payload,
        coalesce_key: args.coalesce_key,
        occurred_at,
        project_uuid: args.project_uuid.map(|u| validate_uuid(&u)).transpose()?,
        local_only: args.local_only,
    })
}

/// `8-4-4-4-12` hex digits, kept as given (receivers join on this text).
fn validate_uuid(text: &str) -> Result<String> {
    let groups: Vec<&str> = text.split('-').collect();
    let lengths_ok = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]);
    if lengths_ok && groups.iter().all(|g| g.chars().all(|c| c.is_ascii_hexdigit())) {
        return Ok(text.to_string());
    }
    Err(Error::usage(
        format!("invalid --project-uuid {text:?}: expected a UUID like 8a4a7da6-a97c-4bb4-893a-b31664abfee4"),
        "pass the project's UUID, or omit --project-uuid (project_uuid is then null)",
    )
    .into())
}

fn parse_payload(text: &str, what: &str) -> Result<serde_json::Value> {
    // Before parsing: beyond the limit, serde_json's own error would only say "recursion limit".
    kitty_sync::event_journal::check_payload_nesting(text.as_bytes(), what)?;
    serde_json::from_str(text).map_err(|e| {
        Error::usage(
            format!("{what} is not valid JSON: {e}"),
            "pass a JSON object, e.g. --payload '{\"key\":\"value\"}'",
        )
        .into()
    })
}

fn run_import(
    args: &EmitArgs,
    source: &str,
    ctx: &Context,
    policy: CapturePolicy,
    printer: &Printer,
) -> Result<ExitStatus> {
    let mut reader = open_input(source)?;
    let options = ImportOptions { default_type: args.default_type.clone(), skip_invalid: args.skip_invalid };
    let mut store = Store::open(&ctx.home)?;
    let bar = crate::output::Progress::lines(printer, "importing");
    let report = Journal::new(&mut store, policy).import(&mut reader, &options, &mut |p| bar.set(p.lines))?;
    bar.finish();
    print_import(&report, printer);
    if report.committed {
        return Ok(ExitStatus::Success);
    }
    Err(Error::usage(
        format!("{} invalid line(s) in {source}; nothing was written", report.invalid.len()),
        "fix the lines listed above, or pass --skip-invalid to import the valid lines only",
    )
    .into())
}

fn print_import(report: &ImportReport, printer: &Printer) {
    if printer.json {
        printer.json_doc(&EmitReport {
            captured: report.captured,
            already_present: report.already_present,
            coalesced: 0,
            dropped: report.dropped,
            invalid: report.invalid.clone(),
            event_ids: None,
        });
    } else {
        for bad in &report.invalid {
            printer.warn(format!("line {}: {}", bad.line, bad.error));
        }
        printer.line(format!(
            "Captured {}, already present {}, dropped {}, invalid {}",
            report.captured,
            report.already_present,
            report.dropped,
            report.invalid.len()
        ));
    }
}

/// Opens PATH or stdin, transparently decompressing gzip (detected by its magic bytes).
fn open_input(source: &str) -> Result<Box<dyn BufRead>> {
    let raw: Box<dyn Read> = if source == "-" {
        Box::new(std::io::stdin())
    } else {
        let file = File::open(source).map_err(|e| {
            Error::usage(
                format!("cannot read {source}: {e}"),
                "check that the file exists and is readable (use - for stdin)",
            )
        })?;
        if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            return Err(
                Error::usage(format!("cannot read {source}: it is a directory"), "pass a JSON Lines file").into()
            );
        }
        Box::new(file)
    };
    let mut raw = NamedRead { inner: raw, what: format!("cannot read {source}") };
    // Read the two magic bytes before deciding: a pipe may deliver the first byte alone, and
    // `BufRead::fill_buf` would then show only one.
    let mut magic = [0u8; 2];
    let mut got = 0;
    while got < magic.len() {
        match raw.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::usage(e.to_string(), "check that the input is readable").into()),
        }
    }
    let input = std::io::Cursor::new(magic[..got].to_vec()).chain(raw);
    let buffered = BufReader::with_capacity(256 * 1024, input);
    if magic[..got] == [0x1f, 0x8b] {
        let gz = flate2::bufread::MultiGzDecoder::new(buffered);
        let named = NamedRead { inner: gz, what: format!("{source}: invalid or truncated gzip data") };
        return Ok(Box::new(BufReader::with_capacity(256 * 1024, named)));
    }
    Ok(Box::new(buffered))
}

/// Puts the input's name into read errors, so a failure half-way through (a truncated .gz,
/// an I/O error) names the file instead of "the input".
struct NamedRead<R> {
    inner: R,
    what: String,
}

impl<R: Read> Read for NamedRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).map_err(|e| std::io::Error::new(e.kind(), format!("{} ({e})", self.what)))
    }
}
