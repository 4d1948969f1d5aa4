//! The batch protocol without HTTP: parse `{"events":[...]}`, judge each event, and, once the
//! store has taken the valid ones (in one call), build the per-event results in request order.

use std::collections::BTreeSet;

use jiff::Timestamp;
use kitty_sync::envelope::{self, EnvelopeError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::store::{BatchRecord, EventRow, Ingested, StoreError};

/// The per-event error of an event over `--max-event-bytes` in a batch of several.
pub(crate) const OVERSIZED: &str = "oversized";

/// A whole-batch refusal: nothing of the batch is stored.
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: u16,
    pub error: String,
    pub details: Vec<Value>,
    /// Events in the body, when it got that far.
    pub event_count: Option<u32>,
    /// Adds `Retry-After: 1` (the client may retry soon).
    pub retry_after: bool,
}

impl Failure {
    pub fn new(status: u16, error: impl Into<String>) -> Self {
        Failure { status, error: error.into(), details: Vec::new(), event_count: None, retry_after: false }
    }

    pub fn body(&self) -> Value {
        serde_json::json!({ "error": self.error, "details": self.details })
    }
}

/// What the batch endpoint needs to know about its configuration.
pub(crate) struct Rules<'a> {
    pub max_event_bytes: usize,
    pub reject_types: &'a BTreeSet<String>,
}

#[derive(Serialize)]
struct Results {
    results: Vec<EventResult>,
}

#[derive(Serialize)]
struct EventResult {
    event_id: Value,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

enum Verdict<'a> {
    Accept { event_id: String, event_type: String, envelope: &'a str },
    Reject { event_id: Value, error: String },
}

#[derive(Deserialize)]
struct Top<'a> {
    #[serde(borrow)]
    events: &'a RawValue,
}

/// A judged batch: what to store, and how to answer each event once it is stored.
pub(crate) struct Judged {
    pub record: BatchRecord,
    /// The accepted events, in request order.
    pub events: Vec<EventRow>,
    answers: Vec<Answer>,
}

/// The answer to one event, owned so the body can be dropped before storing.
enum Answer {
    Accept { event_id: String },
    Reject { event_id: Value, error: String },
}

/// Parses and judges one decoded batch body; nothing is stored yet.
pub(crate) fn judge_body(rules: &Rules<'_>, body: &[u8], received_at: Timestamp) -> Result<Judged, Failure> {
    let events = parse_events(body)?;
    let event_count = u32::try_from(events.len()).unwrap_or(u32::MAX);
    let verdicts = judge(&events, rules).map_err(|mut failure| {
        failure.event_count = Some(event_count);
        failure
    })?;
    let mut accepted = Vec::with_capacity(verdicts.len());
    let answers = verdicts
        .into_iter()
        .map(|verdict| match verdict {
            Verdict::Accept { event_id, event_type, envelope } => {
                accepted.push(EventRow { event_id: event_id.clone(), event_type, envelope: envelope.to_string() });
                Answer::Accept { event_id }
            }
            Verdict::Reject { event_id, error } => Answer::Reject { event_id, error },
        })
        .collect();
    let record = BatchRecord {
        received_at,
        http_status: 200,
        event_count: Some(event_count),
        rejected: event_count - accepted.len() as u32,
        error: None,
    };
    Ok(Judged { record, events: accepted, answers })
}

/// The JSON of the 200 response, once the store has answered for the accepted events.
pub(crate) fn respond(judged: Judged, ingested: Vec<Ingested>) -> Result<Vec<u8>, Failure> {
    let results = Results { results: merge(judged.answers, ingested) };
    serde_json::to_vec(&results).map_err(|e| Failure::new(500, format!("cannot encode the response: {e}")))
}

/// The answer when storing a judged batch failed: nothing of it was committed.
pub(crate) fn ingest_failure(judged: &Judged, error: &StoreError) -> Failure {
    Failure { event_count: judged.record.event_count, ..store_failure(error) }
}

/// The 5xx answer for a storage error; nothing was committed.
pub(crate) fn store_failure(error: &StoreError) -> Failure {
    match error {
        StoreError::Busy { .. } => Failure {
            retry_after: true,
            ..Failure::new(503, format!("receiver database is busy or unavailable, retry later: {error}"))
        },
        StoreError::Backend { .. } if disk_full(error) => Failure {
            retry_after: true,
            ..Failure::new(503, format!("receiver database disk is full, retry later: {error}"))
        },
        StoreError::TooManyEvents { .. } => Failure::new(413, format!("request body too large: {error}")),
        _ => Failure::new(500, format!("receiver storage failure: {error}")),
    }
}

/// SQLite's full-disk error, typed or (after a group commit shared it) as its fixed text.
fn disk_full(error: &StoreError) -> bool {
    let mut cause = std::error::Error::source(error);
    while let Some(current) = cause {
        if let Some(sqlite) = current.downcast_ref::<rusqlite::Error>() {
            return sqlite.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull);
        }
        if current.to_string().contains("database or disk is full") {
            return true;
        }
        cause = current.source();
    }
    false
}

fn bad_request(error: String) -> Failure {
    Failure::new(400, error)
}

fn parse_events(body: &[u8]) -> Result<Vec<&RawValue>, Failure> {
    let text = std::str::from_utf8(body)
        .map_err(|e| bad_request(format!("request body is not UTF-8 (invalid byte at offset {})", e.valid_up_to())))?;
    // Checked first: serde would also accept `[events]` for a struct.
    let kind = json_kind(text);
    if kind != "object" {
        return Err(not_an_object(text, kind));
    }
    let top: Top<'_> = serde_json::from_str(text).map_err(|e| top_level_error(&e))?;
    let kind = json_kind(top.events.get());
    if kind != "array" {
        return Err(bad_request(format!(
            "\"events\" must be a JSON array, got {kind}; expected {{\"events\": [...]}}"
        )));
    }
    serde_json::from_str(top.events.get()).map_err(|e| bad_request(format!("malformed \"events\" array: {e}")))
}

fn top_level_error(error: &serde_json::Error) -> Failure {
    use serde_json::error::Category;
    match error.classify() {
        Category::Syntax | Category::Eof | Category::Io => bad_request(format!("malformed JSON body: {error}")),
        Category::Data => bad_request(format!("expected {{\"events\": [...]}}: {error}")),
    }
}

fn not_an_object(text: &str, kind: &str) -> Failure {
    match serde_json::from_str::<serde::de::IgnoredAny>(text) {
        Err(error) => bad_request(format!("malformed JSON body: {error}")),
        Ok(_) => bad_request(format!("request body must be a JSON object {{\"events\": [...]}}, got {kind}")),
    }
}

/// The JSON type of a (valid) JSON text, from its first significant byte.
fn json_kind(text: &str) -> &'static str {
    match text.trim_start().bytes().next() {
        Some(b'{') => "object",
        Some(b'[') => "array",
        Some(b'"') => "string",
        Some(b't' | b'f') => "boolean",
        Some(b'n') => "null",
        Some(_) => "number",
        None => "nothing",
    }
}

fn judge<'a>(events: &[&'a RawValue], rules: &Rules<'_>) -> Result<Vec<Verdict<'a>>, Failure> {
    let alone = events.len() == 1;
    events.iter().map(|raw| judge_one(raw.get(), rules, alone)).collect()
}

fn judge_one<'a>(raw: &'a str, rules: &Rules<'_>, alone: bool) -> Result<Verdict<'a>, Failure> {
    // The same limit as capture (counted without recursion), so what one side accepts the other
    // can read back.
    if envelope::check_nesting(raw.as_bytes(), envelope::MAX_JSON_DEPTH).is_err() {
        let error = format!(
            "envelope nested deeper than {} levels of arrays and objects (kitty-sync emit refuses it too)",
            envelope::MAX_JSON_DEPTH
        );
        let event_id = if json_kind(raw) == "object" { head_event_id(raw) } else { Value::Null };
        return Ok(Verdict::Reject { event_id, error });
    }
    let value = match identity_fields(raw) {
        Ok(value) => value,
        Err(e) => {
            let error = EnvelopeError::InvalidJson(e.to_string()).to_string();
            return Ok(Verdict::Reject { event_id: Value::Null, error });
        }
    };
    let given_id = value.get("event_id").cloned().unwrap_or(Value::Null);
    if raw.len() > rules.max_event_bytes {
        return oversized(raw.len(), rules.max_event_bytes, given_id, alone);
    }
    let identity = match envelope::identity(&value) {
        Ok(identity) => identity,
        Err(e) => return Ok(Verdict::Reject { event_id: given_id, error: e.to_string() }),
    };
    if rules.reject_types.contains(&identity.event_type) {
        let error = format!(
            "event_type {:?} is refused by this receiver (rule: --reject-type {})",
            identity.event_type, identity.event_type
        );
        return Ok(Verdict::Reject { event_id: given_id, error });
    }
    Ok(Verdict::Accept { event_id: identity.event_id, event_type: identity.event_type, envelope: raw })
}

/// The two fields the receiver validates; the rest of the envelope is skipped, not built.
#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    event_id: Option<Value>,
    #[serde(default)]
    event_type: Option<Value>,
}

/// The event, reduced to what [`envelope::identity`] looks at. Non-objects and objects with
/// repeated identity keys take the full parse, so they are judged exactly as the journal
/// judges them (the last repeated key wins). Errors only on nesting deeper than serde's
/// recursion limit: the batch parser already accepted the text as JSON.
fn identity_fields(raw: &str) -> Result<Value, serde_json::Error> {
    if json_kind(raw) == "object"
        && let Ok(head) = serde_json::from_str::<Head>(raw)
    {
        let mut fields = serde_json::Map::new();
        if let Some(id) = head.event_id {
            fields.insert("event_id".to_string(), id);
        }
        if let Some(event_type) = head.event_type {
            fields.insert("event_type".to_string(), event_type);
        }
        return Ok(Value::Object(fields));
    }
    serde_json::from_str(raw)
}

/// The `event_id` of a too-deep envelope, for its `rejected` result, when it is a string
/// that comes before the deep part (serde skips other fields without recursing).
fn head_event_id(raw: &str) -> Value {
    match serde_json::from_str::<Head>(raw) {
        Ok(Head { event_id: Some(id @ Value::String(_)), .. }) => id,
        _ => Value::Null,
    }
}

fn oversized<'a>(size: usize, max: usize, event_id: Value, alone: bool) -> Result<Verdict<'a>, Failure> {
    if !alone {
        return Ok(Verdict::Reject { event_id, error: OVERSIZED.to_string() });
    }
    let error = format!("event too large (oversized): {size} bytes, the limit is {max} (--max-event-bytes)");
    Err(Failure {
        details: vec![serde_json::json!({ "event_id": event_id, "error": OVERSIZED })],
        ..Failure::new(413, error)
    })
}

fn merge(answers: Vec<Answer>, ingested: Vec<Ingested>) -> Vec<EventResult> {
    let mut ingested = ingested.into_iter();
    answers
        .into_iter()
        .map(|answer| match answer {
            Answer::Accept { event_id } => {
                // The store answers once per accepted event; a short answer would be a store
                // bug, reported as a rejection rather than a false success.
                let (status, error) = match ingested.next() {
                    Some(Ingested::Stored) => ("success", None),
                    Some(Ingested::Duplicate) => ("duplicate", None),
                    None => ("rejected", Some("receiver store returned no outcome".to_string())),
                };
                EventResult { event_id: Value::String(event_id), status, error }
            }
            Answer::Reject { event_id, error } => EventResult { event_id, status: "rejected", error: Some(error) },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(body: &str) -> Result<Vec<String>, String> {
        parse_events(body.as_bytes()).map(|v| v.iter().map(|r| r.get().to_string()).collect()).map_err(|f| f.error)
    }

    #[test]
    fn body_shapes() {
        assert_eq!(events(r#"{"events": [ {"a": 1} ,2]}"#).unwrap(), vec![r#"{"a": 1}"#, "2"]);
        assert_eq!(events(r#"{"events": [], "extra": 1}"#).unwrap(), Vec::<String>::new());
        assert!(events("{\"events\": [").unwrap_err().starts_with("malformed JSON body"));
        assert!(events("[]").unwrap_err().contains("got array"));
        assert!(events("[[]]").unwrap_err().contains("got array"));
        assert!(events(" 12").unwrap_err().contains("got number"));
        assert!(events("[1,").unwrap_err().starts_with("malformed JSON body"));
        assert!(events("").unwrap_err().starts_with("malformed JSON body"));
        assert!(events("{}").unwrap_err().contains("missing field `events`"));
        assert!(events(r#"{"events": {}}"#).unwrap_err().contains("got object"));
        assert!(events(r#"{"events": null}"#).unwrap_err().contains("got null"));
        assert!(events(r#"{"events": [], "events": []}"#).unwrap_err().contains("duplicate field"));
        assert!(events("{\"events\": []} x").unwrap_err().starts_with("malformed JSON body"));
        assert!(parse_events(b"\xff").unwrap_err().error.contains("not UTF-8"));
    }

    #[test]
    fn verdicts() {
        let types = BTreeSet::from(["Blocked".to_string()]);
        let rules = Rules { max_event_bytes: 80, reject_types: &types };
        let ok = r#"{"event_id":"01KVYWRGJEV7CEZW6J7GXEBN16","event_type":"A"}"#;
        assert!(matches!(judge_one(ok, &rules, false), Ok(Verdict::Accept { .. })));
        let blocked = r#"{"event_id":"01KVYWRGJEV7CEZW6J7GXEBN16","event_type":"Blocked"}"#;
        match judge_one(blocked, &rules, false) {
            Ok(Verdict::Reject { error, .. }) => assert!(error.contains("--reject-type")),
            _ => panic!("not rejected"),
        }
        match judge_one(r#"{"event_id":5,"event_type":"A"}"#, &rules, false) {
            Ok(Verdict::Reject { event_id, error }) => {
                assert_eq!(event_id, Value::from(5));
                assert!(error.contains("invalid event_id"));
            }
            _ => panic!("not rejected"),
        }
        let big = format!(r#"{{"event_id":"01KVYWRGJEV7CEZW6J7GXEBN16","event_type":"A","p":"{}"}}"#, "x".repeat(40));
        match judge_one(&big, &rules, false) {
            Ok(Verdict::Reject { error, .. }) => assert_eq!(error, OVERSIZED),
            _ => panic!("not rejected"),
        }
        let repeated = r#"{"event_id":"nope","event_type":"A","event_id":"01KVYWRGJEV7CEZW6J7GXEBN16"}"#;
        assert!(matches!(judge_one(repeated, &rules, false), Ok(Verdict::Accept { .. })), "last key wins");
        let escaped = r#"{"event\u005fid":"01KVYWRGJEV7CEZW6J7GXEBN16","event_type":"A"}"#;
        assert!(matches!(judge_one(escaped, &rules, false), Ok(Verdict::Accept { .. })));
        match judge_one(r#"{"event_id":null,"event_type":"A"}"#, &rules, false) {
            Ok(Verdict::Reject { event_id, error }) => {
                assert_eq!((event_id, error.as_str()), (Value::Null, "missing event_id"));
            }
            _ => panic!("not rejected"),
        }
        let deep = format!(
            r#"{{"event_id":"01KVYWRGJEV7CEZW6J7GXEBN16","event_type":"A","p":{}{}}}"#,
            "[".repeat(envelope::MAX_JSON_DEPTH - 1),
            "]".repeat(envelope::MAX_JSON_DEPTH - 1)
        );
        let rules_wide = Rules { max_event_bytes: 1 << 20, reject_types: &types };
        let accepted = judge_one(&deep, &rules_wide, false);
        assert!(matches!(accepted, Ok(Verdict::Accept { .. })), "MAX_JSON_DEPTH levels pass");
        let deeper = deep.replacen('[', "[[", 1).replacen(']', "]]", 1);
        match judge_one(&deeper, &rules_wide, false) {
            Ok(Verdict::Reject { event_id, error }) => {
                assert_eq!(event_id, "01KVYWRGJEV7CEZW6J7GXEBN16");
                let expected = format!("nested deeper than {}", envelope::MAX_JSON_DEPTH);
                assert!(error.contains(&expected), "{error}");
            }
            _ => panic!("not rejected"),
        }
        let failure = judge_one(&big, &rules, true).err().unwrap();
        assert_eq!(failure.status, 413);
        assert_eq!(failure.details[0]["event_id"], "01KVYWRGJEV7CEZW6J7GXEBN16");
    }
}
