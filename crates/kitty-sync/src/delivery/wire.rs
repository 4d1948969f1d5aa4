//! The batch protocol's response mapping (contract §8), as pure functions: an HTTP reply for
//! a batch becomes one verdict, and per-event statuses become ledger outcomes.

use std::collections::HashMap;

pub use super::backoff::RetryAfter;

use serde::Serialize;
use serde_json::Value;

/// Ledger outcome vocabulary (exact strings of the contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Duplicate,
    Pending,
    FailedTransient,
    Rejected,
    TerminalFailed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Duplicate => "duplicate",
            Outcome::Pending => "pending",
            Outcome::FailedTransient => "failed_transient",
            Outcome::Rejected => "rejected",
            Outcome::TerminalFailed => "terminal_failed",
        }
    }

    /// Terminal success: the target holds the event.
    pub fn is_delivered(self) -> bool {
        matches!(self, Outcome::Success | Outcome::Duplicate)
    }

    /// Final for this target whatever happened before: delivered, or parked. (Rejections
    /// settle only by count: see [`crate::store::selection::is_settled`].)
    pub fn is_terminal(self) -> bool {
        matches!(self, Outcome::Success | Outcome::Duplicate | Outcome::TerminalFailed)
    }
}

/// What came back from one POST.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub body: Vec<u8>,
    pub retry_after: Option<RetryAfter>,
}

impl HttpReply {
    /// A reply built in memory (tests, fault simulations).
    pub fn json(status: u16, body: &Value) -> HttpReply {
        HttpReply { status, body: body.to_string().into_bytes(), retry_after: None }
    }
}

/// What the dispatcher must do with a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// One outcome (with error text) per event, in batch order.
    PerEvent(Vec<(Outcome, Option<String>)>),
    /// Retry the whole batch later; never a content verdict.
    Transient { error: String, retry_after: Option<RetryAfter> },
    /// 401/403: stop the drain.
    AuthFailed { error: String },
    /// 413 or "too large"/"oversized": split (a single event is parked).
    TooLarge { error: String },
    /// 400: reject the named events; without usable details, bisect.
    BadRequest { named: Option<HashMap<String, String>>, error: String },
    /// Any other 4xx: a content verdict on every event of the batch.
    RejectAll { error: String },
}

/// Maps a reply for a batch of `event_ids` (in order).
pub fn map_reply(event_ids: &[&str], reply: &HttpReply) -> Verdict {
    let body: Option<Value> = serde_json::from_slice(&reply.body).ok();
    let error_text = body_error(body.as_ref()).unwrap_or_else(|| format!("HTTP {}", reply.status));
    let status = reply.status;
    if (200..300).contains(&status) {
        return map_success(event_ids, body.as_ref());
    }
    if status == 413 || mentions_oversize(&error_text) {
        return Verdict::TooLarge { error: error_text };
    }
    match status {
        400 => Verdict::BadRequest { named: details(body.as_ref()), error: error_text },
        401 | 403 => Verdict::AuthFailed { error: error_text },
        408 | 429 => Verdict::Transient { error: error_text, retry_after: reply.retry_after },
        501 => Verdict::RejectAll { error: error_text },
        // Guards, not ranges: the specific codes above take precedence over their class.
        s if (500..=599).contains(&s) => Verdict::Transient { error: error_text, retry_after: reply.retry_after },
        s if (400..=499).contains(&s) => Verdict::RejectAll { error: error_text },
        _ => Verdict::Transient { error: format!("unexpected HTTP {status} ({error_text})"), retry_after: None },
    }
}

fn body_error(body: Option<&Value>) -> Option<String> {
    let obj = body?.as_object()?;
    ["error", "detail", "message"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_str))
        .map(str::to_string)
        .filter(|s| !s.trim().is_empty())
}

fn mentions_oversize(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    lower.contains("too large") || lower.contains("oversized")
}

fn map_success(event_ids: &[&str], body: Option<&Value>) -> Verdict {
    let Some(results) = body.and_then(|b| b.get("results")).and_then(Value::as_array) else {
        return Verdict::Transient { error: "non-batch response (no 'results' list)".into(), retry_after: None };
    };
    let mut by_id: HashMap<&str, &Value> = HashMap::new();
    for entry in results {
        if let Some(id) = entry.get("event_id").and_then(Value::as_str) {
            by_id.insert(id, entry);
        }
    }
    let outcomes = event_ids
        .iter()
        .map(|id| match by_id.get(id) {
            None => (Outcome::Pending, None),
            Some(entry) => map_event_status(entry),
        })
        .collect();
    Verdict::PerEvent(outcomes)
}

fn map_event_status(entry: &Value) -> (Outcome, Option<String>) {
    let status = entry.get("status").and_then(Value::as_str).unwrap_or("").trim().to_ascii_lowercase();
    let error = ["error_message", "error"]
        .iter()
        .find_map(|k| entry.get(*k).and_then(Value::as_str))
        .filter(|s| !s.trim().is_empty())
        .map(str::to_string);
    match status.as_str() {
        "success" | "accepted" | "warning" => (Outcome::Success, None),
        "duplicate" => (Outcome::Duplicate, None),
        "pending" | "queued" => (Outcome::Pending, None),
        _ => {
            let error = error.unwrap_or_else(|| format!("unknown per-event status {status:?}"));
            let outcome = if mentions_oversize(&error) { Outcome::TerminalFailed } else { Outcome::Rejected };
            (outcome, Some(error))
        }
    }
}

/// 400 `details`: a list (or a JSON string holding a list) of `{event_id, detail|error|reason}`.
fn details(body: Option<&Value>) -> Option<HashMap<String, String>> {
    let raw = body?.get("details")?;
    let parsed;
    let list = match raw {
        Value::Array(items) => items,
        Value::String(text) => {
            parsed = serde_json::from_str::<Value>(text).ok()?;
            parsed.as_array()?
        }
        _ => return None,
    };
    let named: HashMap<String, String> = list
        .iter()
        .filter_map(|item| {
            let id = item.get("event_id")?.as_str()?.to_string();
            let reason = ["detail", "error", "reason"]
                .iter()
                .find_map(|k| item.get(*k).and_then(Value::as_str))
                .unwrap_or("rejected by the receiver (400)")
                .to_string();
            Some((id, reason))
        })
        .collect();
    (!named.is_empty()).then_some(named)
}

/// `Retry-After`: seconds or an HTTP date (see [`RetryAfter`]).
pub fn parse_retry_after(value: &str) -> Option<RetryAfter> {
    RetryAfter::parse(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reply(status: u16, body: Value) -> HttpReply {
        HttpReply { status, body: body.to_string().into_bytes(), retry_after: None }
    }

    #[test]
    fn per_event_statuses() {
        let ids = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
        let body = json!({"results": [
            {"event_id": "a", "status": "success"}, {"event_id": "b", "status": "Accepted"},
            {"event_id": "c", "status": "warning"}, {"event_id": "d", "status": "duplicate"},
            {"event_id": "e", "status": "queued"}, {"event_id": "f", "status": "rejected", "error_message": "bad", "error": "x"},
            {"event_id": "g", "status": "weird"}, {"event_id": "h", "status": "rejected", "error": "oversized"},
            "not an object"
        ]});
        let Verdict::PerEvent(out) = map_reply(&ids, &reply(200, body)) else { panic!() };
        let outcomes: Vec<Outcome> = out.iter().map(|o| o.0).collect();
        assert_eq!(
            outcomes,
            vec![
                Outcome::Success,
                Outcome::Success,
                Outcome::Success,
                Outcome::Duplicate,
                Outcome::Pending,
                Outcome::Rejected,
                Outcome::Rejected,
                Outcome::TerminalFailed,
                Outcome::Pending
            ]
        );
        assert_eq!(out[5].1.as_deref(), Some("bad"));
        assert!(out[6].1.as_deref().unwrap().contains("weird"));
    }

    #[test]
    fn batch_level_statuses() {
        let ids = ["a"];
        assert!(matches!(map_reply(&ids, &reply(200, json!({"ok": true}))), Verdict::Transient { .. }));
        let garbage = HttpReply { status: 200, body: b"<html>".to_vec(), retry_after: None };
        assert!(matches!(map_reply(&ids, &garbage), Verdict::Transient { .. }));
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(matches!(map_reply(&ids, &reply(s, json!({}))), Verdict::Transient { .. }), "{s}");
        }
        assert!(matches!(map_reply(&ids, &reply(501, json!({}))), Verdict::RejectAll { .. }));
        assert!(matches!(map_reply(&ids, &reply(401, json!({}))), Verdict::AuthFailed { .. }));
        assert!(matches!(map_reply(&ids, &reply(403, json!({}))), Verdict::AuthFailed { .. }));
        assert!(matches!(map_reply(&ids, &reply(413, json!({}))), Verdict::TooLarge { .. }));
        assert!(matches!(
            map_reply(&ids, &reply(500, json!({"error": "Payload too large"}))),
            Verdict::TooLarge { .. }
        ));
        assert!(matches!(map_reply(&ids, &reply(404, json!({}))), Verdict::RejectAll { .. }));
        assert!(
            matches!(map_reply(&ids, &reply(422, json!({"error": "nope"}))), Verdict::RejectAll { error } if error == "nope")
        );
        assert!(matches!(map_reply(&ids, &reply(302, json!({}))), Verdict::Transient { .. }));
    }

    #[test]
    fn bad_request_details() {
        let ids = ["a", "b"];
        let listed = reply(400, json!({"error": "invalid", "details": [{"event_id": "a", "detail": "no type"}, 5]}));
        let Verdict::BadRequest { named: Some(named), .. } = map_reply(&ids, &listed) else { panic!() };
        assert_eq!(named.get("a").map(String::as_str), Some("no type"));
        let as_string = reply(400, json!({"details": "[{\"event_id\": \"b\", \"reason\": \"r\"}]"}));
        let Verdict::BadRequest { named: Some(named), .. } = map_reply(&ids, &as_string) else { panic!() };
        assert_eq!(named.get("b").map(String::as_str), Some("r"));
        for body in [json!({"error": "x"}), json!({"details": "plain text"}), json!({"details": []})] {
            assert!(matches!(map_reply(&ids, &reply(400, body)), Verdict::BadRequest { named: None, .. }));
        }
    }

    #[test]
    fn retry_after_seconds_or_http_date() {
        use std::time::Duration;
        assert_eq!(parse_retry_after(" 7 "), Some(RetryAfter::Delay(Duration::from_secs(7))));
        let at = std::time::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(RetryAfter::At(at)));
        assert_eq!(parse_retry_after("later"), None);
    }
}
