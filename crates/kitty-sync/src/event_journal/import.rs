//! Bulk capture from JSON Lines. Streams line by line (memory bounded by the longest line),
//! stores each valid line's bytes verbatim, and runs in one transaction so an all-or-nothing
//! import that meets a bad line leaves the journal exactly as it was.

use std::collections::HashMap;

use rusqlite::Transaction;
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::{CapturePolicy, Inserted, Row, count_dropped, insert_row, tick_lamport};
use crate::envelope::{EnvelopeError, canonical_bytes, canonical_json, check_text, is_valid_ulid};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Added as `event_type` to lines that lack one (the only change ever made to a line).
    pub default_type: Option<String>,
    /// Write the valid lines and report the bad ones, instead of all or nothing.
    pub skip_invalid: bool,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ImportProgress {
    pub lines: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineError {
    pub line: u64,
    pub error: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub captured: u64,
    pub already_present: u64,
    pub dropped: u64,
    pub invalid: Vec<LineError>,
    /// False when the import was rolled back because of invalid lines.
    pub committed: bool,
    pub lines: u64,
}

enum LineOutcome {
    Captured,
    AlreadyPresent,
    Dropped,
}

const PROGRESS_EVERY: u64 = 2_000;

pub(super) fn run(
    tx: &Transaction<'_>,
    policy: &CapturePolicy,
    reader: &mut dyn std::io::BufRead,
    options: &ImportOptions,
    progress: &mut dyn FnMut(ImportProgress),
) -> Result<ImportReport> {
    let mut report = ImportReport::default();
    let mut dropped: HashMap<String, u64> = HashMap::new();
    let mut max_lamport: Option<i64> = None;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut seen = ImportProgress::default();
    loop {
        buf.clear();
        let (n, whole) = read_line(reader, &mut buf).map_err(|e| {
            Error::usage(
                format!("cannot read the input after line {}: {e}", seen.lines),
                "check that the file is complete (a .gz file must be a whole gzip stream) and readable",
            )
        })?;
        if n == 0 {
            break;
        }
        seen.lines += 1;
        seen.bytes += n as u64;
        if !whole {
            let error = format!("line longer than {MAX_LINE_BYTES} bytes (no event can be that large)");
            report.invalid.push(LineError { line: seen.lines, error });
            continue;
        }
        let line = trim_line(&buf, seen.lines == 1);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match import_line(tx, policy, options, line, &mut dropped, &mut max_lamport)? {
            Ok(LineOutcome::Captured) => report.captured += 1,
            Ok(LineOutcome::AlreadyPresent) => report.already_present += 1,
            Ok(LineOutcome::Dropped) => report.dropped += 1,
            Err(error) => report.invalid.push(LineError { line: seen.lines, error }),
        }
        if seen.lines % PROGRESS_EVERY == 0 {
            progress(seen);
        }
    }
    progress(seen);
    report.lines = seen.lines;
    report.committed = report.invalid.is_empty() || options.skip_invalid;
    if report.committed {
        for (event_type, n) in &dropped {
            count_dropped(tx, event_type, *n)?;
        }
        if report.captured > 0 {
            tick_lamport(tx, max_lamport)?;
        }
    } else {
        report.captured = 0;
        report.already_present = 0;
        report.dropped = 0;
    }
    Ok(report)
}

/// The longest line an import holds in memory: twice the built-in receiver's default body
/// limit, so no deliverable event is refused, while a hostile file without line breaks cannot
/// take all memory.
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// Reads one line into `buf`, at most [`MAX_LINE_BYTES`] of it; the rest of a longer line is
/// read and dropped. Returns the bytes consumed (0 at the end) and whether `buf` holds the
/// whole line.
fn read_line(reader: &mut dyn std::io::BufRead, buf: &mut Vec<u8>) -> std::io::Result<(usize, bool)> {
    use std::io::{BufRead, Read};
    let limit = MAX_LINE_BYTES as u64 + 1;
    let mut consumed = (&mut *reader).take(limit).read_until(b'\n', buf)?;
    if buf.len() <= MAX_LINE_BYTES || buf.ends_with(b"\n") {
        return Ok((consumed, true));
    }
    buf.clear();
    let mut rest = Vec::new();
    loop {
        rest.clear();
        let n = (&mut *reader).take(64 * 1024).read_until(b'\n', &mut rest)?;
        consumed += n;
        if n == 0 || rest.ends_with(b"\n") {
            return Ok((consumed, false));
        }
    }
}

/// Removes the line ending (and a UTF-8 byte-order mark on the first line).
fn trim_line(buf: &[u8], first: bool) -> &[u8] {
    let mut line = buf;
    if let Some(rest) = line.strip_suffix(b"\n") {
        line = rest;
    }
    if let Some(rest) = line.strip_suffix(b"\r") {
        line = rest;
    }
    if first && let Some(rest) = line.strip_prefix(b"\xEF\xBB\xBF") {
        line = rest;
    }
    // Whitespace around the object is not part of it: receivers store the JSON value alone,
    // and the journal must hold the same bytes they do.
    line.trim_ascii()
}

/// One line's verdict: `Ok(Err(text))` is a line error (reported, and fatal only to an
/// all-or-nothing import); `Err(_)` is a store failure that aborts the whole import, because
/// a database error says nothing about the line and must never be "skipped".
fn import_line(
    tx: &Transaction<'_>,
    policy: &CapturePolicy,
    options: &ImportOptions,
    line: &[u8],
    dropped: &mut HashMap<String, u64>,
    max_lamport: &mut Option<i64>,
) -> Result<std::result::Result<LineOutcome, String>> {
    let parsed = match parse_line(line, options) {
        Ok(parsed) => parsed,
        Err(error) => return Ok(Err(error)),
    };
    let bytes: &[u8] = parsed.patched.as_deref().unwrap_or(line);
    if policy.drops(&parsed.event_type, false) {
        *dropped.entry(parsed.event_type).or_default() += 1;
        return Ok(Ok(LineOutcome::Dropped));
    }
    let row = Row::captured(policy, &parsed.event_id, &parsed.event_type, bytes, None);
    match insert_row(tx, &row)? {
        Inserted::New { .. } => {
            if let Some(clock) = parsed.lamport_clock {
                *max_lamport = Some(max_lamport.map_or(clock, |m| m.max(clock)));
            }
            Ok(Ok(LineOutcome::Captured))
        }
        Inserted::Exists { envelope, sha256 } => {
            let same = match envelope {
                // Identical bytes (a re-import) need no canonicalisation.
                Some(stored) => stored == bytes || canonical_bytes(&stored) == canonical_bytes(bytes),
                // Purged by gc: only the hash of the stored bytes is left.
                None => Sha256::digest(bytes).as_slice() == sha256.as_slice(),
            };
            if same {
                Ok(Ok(LineOutcome::AlreadyPresent))
            } else {
                Ok(Err(format!(
                    "conflicting event_id {}: the journal already holds different content under this id (stored bytes kept)",
                    parsed.event_id
                )))
            }
        }
    }
}

/// What import needs from a valid line.
struct ParsedLine {
    event_id: String,
    event_type: String,
    /// The bytes to store when `--default-type` had to add `event_type`.
    patched: Option<Vec<u8>>,
    lamport_clock: Option<i64>,
}

/// Only the fields import looks at, borrowed from the line. Deserialising this instead of a
/// whole `Value` tree still validates the entire line as JSON (unknown fields are parsed and
/// skipped) but allocates nothing for the payload: the bulk-import hot path.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    event_id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    event_type: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    lamport_clock: Option<&'a RawValue>,
}

/// `None` only when the key is absent; an explicit `null` is `Some("null")`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<&'de RawValue>, D::Error> {
    <&RawValue as serde::Deserialize>::deserialize(d).map(Some)
}

fn parse_line(line: &[u8], options: &ImportOptions) -> std::result::Result<ParsedLine, String> {
    // The fast path below skips the fields it does not read without decoding them, so it
    // would accept invalid UTF-8 and any depth there; receivers refuse both, forever.
    check_text(line).map_err(|e| e.to_string())?;
    // Fast path for the common shape: an object whose `event_id` and `event_type` are plain
    // strings. Anything else (not an object, duplicate keys, a null or missing type, …) takes
    // the general path below, which decides exactly as before.
    let is_object = line.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if is_object && let Ok(head) = serde_json::from_slice::<Head<'_>>(line) {
        let as_string = |raw: Option<&RawValue>| raw.and_then(|r| serde_json::from_str::<String>(r.get()).ok());
        if let (Some(event_id), Some(event_type)) = (as_string(head.event_id), as_string(head.event_type))
            && is_valid_ulid(&event_id)
            && !event_type.trim().is_empty()
        {
            let lamport_clock = head.lamport_clock.and_then(|r| serde_json::from_str::<i64>(r.get()).ok());
            return Ok(ParsedLine { event_id, event_type, patched: None, lamport_clock });
        }
    }
    let mut value: Value =
        serde_json::from_slice(line).map_err(|e| EnvelopeError::InvalidJson(e.to_string()).to_string())?;
    let (event_id, event_type, patched) = identify(&mut value, line, options)?;
    let lamport_clock = value.get("lamport_clock").and_then(Value::as_i64);
    Ok(ParsedLine { event_id, event_type, patched, lamport_clock })
}

/// Validates identity; adds the default type when the line has none, returning the patched
/// bytes (the original bytes are otherwise kept untouched).
fn identify(
    value: &mut Value,
    line: &[u8],
    options: &ImportOptions,
) -> std::result::Result<(String, String, Option<Vec<u8>>), String> {
    let object = value.as_object_mut().ok_or_else(|| EnvelopeError::NotAnObject.to_string())?;
    let event_id = match object.get("event_id") {
        None | Some(Value::Null) => return Err(EnvelopeError::MissingEventId.to_string()),
        Some(Value::String(id)) if is_valid_ulid(id) => id.clone(),
        Some(Value::String(id)) => return Err(EnvelopeError::InvalidEventId(id.clone()).to_string()),
        Some(other) => return Err(EnvelopeError::InvalidEventId(other.to_string()).to_string()),
    };
    match object.get("event_type") {
        Some(Value::String(t)) if !t.trim().is_empty() => Ok((event_id, t.clone(), None)),
        Some(Value::String(_)) => Err(EnvelopeError::InvalidEventType.to_string()),
        Some(Value::Null) | None => {
            let Some(default) = options.default_type.clone() else {
                return Err(format!("{} (hint: pass --default-type TYPE to add one)", EnvelopeError::MissingEventType));
            };
            let had_key = object.contains_key("event_type");
            object.insert("event_type".into(), Value::String(default.clone()));
            let patched = if had_key { canonical_json(value).into_bytes() } else { insert_first_key(line, &default) };
            Ok((event_id, default, Some(patched)))
        }
        Some(_) => Err(EnvelopeError::InvalidEventType.to_string()),
    }
}

/// `{...}` → `{"event_type":"T",...}`, leaving every other byte as it was.
fn insert_first_key(line: &[u8], event_type: &str) -> Vec<u8> {
    let open = line.iter().position(|b| *b == b'{').unwrap_or(0);
    let key = format!("\"event_type\":{},", Value::String(event_type.to_string()));
    let mut out = Vec::with_capacity(line.len() + key.len());
    out.extend_from_slice(&line[..=open]);
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&line[open + 1..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_type_is_inserted_without_touching_other_bytes() {
        let line = br#"  {"event_id": "01KVYWRGJEV7CEZW6J7GXEBN16", "x": [1, 2]}"#;
        let out = insert_first_key(line, "WPStatusChanged");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"  {"event_type":"WPStatusChanged","event_id": "01KVYWRGJEV7CEZW6J7GXEBN16", "x": [1, 2]}"#
        );
        let parsed: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed["event_type"], "WPStatusChanged");
    }

    #[test]
    fn trims_line_endings_and_bom() {
        assert_eq!(trim_line(b"{}\r\n", false), b"{}");
        assert_eq!(trim_line(b"\xEF\xBB\xBF{}\n", true), b"{}");
        assert_eq!(trim_line(b"{}", false), b"{}");
        assert_eq!(trim_line(b"  {\"a\": 1}\t \n", false), b"{\"a\": 1}");
    }
}
