//! The event envelope: the minimal shape every event must have, and the canonical JSON form
//! used to decide whether two encodings describe the same event.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Why an envelope is not acceptable. The texts are shown to operators and returned by the
/// built-in receiver, so they name the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("not a JSON object")]
    NotAnObject,
    #[error("missing event_id")]
    MissingEventId,
    #[error("invalid event_id {0:?}: expected a 26-character ULID (Crockford base32)")]
    InvalidEventId(String),
    #[error("missing event_type")]
    MissingEventType,
    #[error("invalid event_type: expected a non-empty string")]
    InvalidEventType,
    #[error("invalid UTF-8 at byte {offset} (JSON text must be UTF-8; receivers refuse anything else)")]
    InvalidUtf8 { offset: usize },
    #[error("nested {depth} levels deep: at most {max} levels of arrays and objects are accepted")]
    TooDeep { depth: usize, max: usize },
}

/// The deepest nesting of arrays and objects an envelope may have; the envelope object
/// itself is level 1. It is the deepest serde_json's parser accepts by default (its
/// recursion limit of 128 refuses the 128th level), so every envelope the journal accepts can
/// be parsed by every reader on its way: canonical comparison, the dispatcher, the built-in
/// receiver. A payload given to `emit` may therefore nest one level less.
pub const MAX_JSON_DEPTH: usize = 127;

/// Checks what a JSON parser that skips unread fields does not: the text is UTF-8 (a skipped
/// string is never decoded) and nests at most [`MAX_JSON_DEPTH`] levels.
pub fn check_text(bytes: &[u8]) -> Result<(), EnvelopeError> {
    std::str::from_utf8(bytes).map_err(|e| EnvelopeError::InvalidUtf8 { offset: e.valid_up_to() })?;
    check_nesting(bytes, MAX_JSON_DEPTH)
}

/// Refuses JSON text whose arrays and objects nest deeper than `max` levels.
pub fn check_nesting(bytes: &[u8], max: usize) -> Result<(), EnvelopeError> {
    // Each level needs at least one byte: short texts cannot be too deep.
    if bytes.len() <= max {
        return Ok(());
    }
    match nesting_depth(bytes) {
        depth if depth > max => Err(EnvelopeError::TooDeep { depth, max }),
        _ => Ok(()),
    }
}

/// How deeply arrays and objects nest in JSON text (0 for a scalar). Brackets inside strings
/// do not count. For text that is not JSON the answer is only an estimate.
pub fn nesting_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in bytes {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// The two fields kitty-sync itself relies on; everything else is carried opaquely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeIdentity {
    pub event_id: String,
    pub event_type: String,
}

/// `^[0-9A-HJKMNP-TV-Z]{26}$` without a regex engine; the first character is at most `7`
/// because a ULID is 128 bits and 26 base32 digits hold 130.
pub fn is_valid_ulid(id: &str) -> bool {
    let bytes = id.as_bytes();
    bytes.len() == 26
        && bytes[0] <= b'7'
        && bytes
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'H' | b'J' | b'K' | b'M' | b'N' | b'P'..=b'T' | b'V'..=b'Z'))
}

/// Checks the envelope's identity fields. `event_type` may be absent only when the caller
/// supplies a default (as `emit --jsonl --default-type` does).
pub fn identity(value: &Value) -> Result<EnvelopeIdentity, EnvelopeError> {
    let object = value.as_object().ok_or(EnvelopeError::NotAnObject)?;
    let event_id = event_id_of(object)?;
    let event_type = match object.get("event_type") {
        None | Some(Value::Null) => return Err(EnvelopeError::MissingEventType),
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(_) => return Err(EnvelopeError::InvalidEventType),
    };
    Ok(EnvelopeIdentity { event_id, event_type })
}

fn event_id_of(object: &serde_json::Map<String, Value>) -> Result<String, EnvelopeError> {
    match object.get("event_id") {
        None | Some(Value::Null) => Err(EnvelopeError::MissingEventId),
        Some(Value::String(s)) if is_valid_ulid(s) => Ok(s.clone()),
        Some(Value::String(s)) => Err(EnvelopeError::InvalidEventId(s.clone())),
        Some(other) => Err(EnvelopeError::InvalidEventId(other.to_string())),
    }
}

/// Parses one line of JSON and validates its identity.
pub fn parse(bytes: &[u8]) -> Result<(Value, EnvelopeIdentity), EnvelopeError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| EnvelopeError::InvalidJson(e.to_string()))?;
    let id = identity(&value)?;
    Ok((value, id))
}

/// Canonical JSON: object keys sorted (by code point), no insignificant whitespace, UTF-8
/// without `\u` escapes for printable characters. Two envelopes are the same event exactly
/// when their canonical forms are equal, whatever encoder produced them (Python's
/// `json.dumps` with `ensure_ascii` and `", "` separators included).
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            // Sorted here rather than relying on serde_json's map being a BTreeMap: its
            // `preserve_order` feature, which any crate in the build graph can switch on,
            // would silently make this insertion order and break every identity check.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical_str(key, out);
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::String(text) => write_canonical_str(text, out),
        // Numbers, booleans and null: serde_json's compact form.
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// A JSON string with only the escapes JSON requires (UTF-8 kept as is).
fn write_canonical_str(text: &str, out: &mut String) {
    out.push_str(&serde_json::to_string(text).unwrap_or_default());
}

/// Canonical form of raw bytes; bytes that are not JSON are their own canonical form.
pub fn canonical_bytes(raw: &[u8]) -> Vec<u8> {
    // The borrowed parser writes exactly what `canonical_json` writes (tested there) without
    // allocating a string per key.
    match crate::canonical_json::Json::parse(raw) {
        Ok(value) => {
            let mut out = Vec::with_capacity(raw.len());
            value.write_canonical(&mut out);
            out
        }
        Err(_) => raw.to_vec(),
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ulid_rules() {
        assert!(is_valid_ulid("01KVYWRGJEV7CEZW6J7GXEBN16"));
        assert!(is_valid_ulid("7ZZZZZZZZZZZZZZZZZZZZZZZZZ"));
        assert!(!is_valid_ulid("8ZZZZZZZZZZZZZZZZZZZZZZZZZ"), "overflows 128 bits");
        assert!(!is_valid_ulid("01KVYWRGJEV7CEZW6J7GXEBN1"), "25 chars");
        assert!(!is_valid_ulid("01KVYWRGJEV7CEZW6J7GXEBN1I"), "I is not Crockford");
        assert!(!is_valid_ulid("01KVYWRGJEV7CEZW6J7GXEBN1L"), "L is not Crockford");
        assert!(!is_valid_ulid("01KVYWRGJEV7CEZW6J7GXEBN1O"), "O is not Crockford");
        assert!(!is_valid_ulid("01KVYWRGJEV7CEZW6J7GXEBN1U"), "U is not Crockford");
        assert!(!is_valid_ulid("01kvywrgjev7cezw6j7gxebn16"), "lower case");
    }

    #[test]
    fn identity_errors_name_the_field() {
        assert_eq!(identity(&json!([1])), Err(EnvelopeError::NotAnObject));
        assert_eq!(identity(&json!({"event_type": "X"})), Err(EnvelopeError::MissingEventId));
        assert!(matches!(
            identity(&json!({"event_id": "nope", "event_type": "X"})),
            Err(EnvelopeError::InvalidEventId(_))
        ));
        assert!(matches!(identity(&json!({"event_id": 5, "event_type": "X"})), Err(EnvelopeError::InvalidEventId(_))));
        let id = "01KVYWRGJEV7CEZW6J7GXEBN16";
        assert_eq!(identity(&json!({"event_id": id})), Err(EnvelopeError::MissingEventType));
        assert_eq!(identity(&json!({"event_id": id, "event_type": ""})), Err(EnvelopeError::InvalidEventType));
        assert_eq!(identity(&json!({"event_id": id, "event_type": "A"})).unwrap().event_type, "A");
    }

    #[test]
    fn python_encoding_has_the_same_canonical_form() {
        let python = br#"{"event_type": "X", "event_id": "01KVYWRGJEV7CEZW6J7GXEBN16", "payload": {"t": "caf\u00e9 \ud83d\ude00", "n": 1.5}}"#;
        let ours = "{\"event_id\":\"01KVYWRGJEV7CEZW6J7GXEBN16\",\"event_type\":\"X\",\"payload\":{\"n\":1.5,\"t\":\"café 😀\"}}";
        assert_eq!(canonical_bytes(python), ours.as_bytes());
    }

    #[test]
    fn canonical_form_sorts_nested_keys_and_matches_compact_serde() {
        let value = json!({"b": [{"z": 1, "a": null}, "x\"y\n\u{1}é"], "a": {"d": true, "c": -1.5e-7}, "é": 0, "E": 1});
        let expected =
            "{\"E\":1,\"a\":{\"c\":-1.5e-7,\"d\":true},\"b\":[{\"a\":null,\"z\":1},\"x\\\"y\\n\\u0001é\"],\"é\":0}";
        assert_eq!(canonical_json(&value), expected);
        assert_eq!(
            canonical_json(&value),
            serde_json::to_string(&value).unwrap(),
            "same as serde's sorted compact form"
        );
    }

    #[test]
    fn nesting_depth_ignores_strings_and_matches_serde_json() {
        assert_eq!(nesting_depth(b"1"), 0);
        assert_eq!(nesting_depth(br#"{"a":[1,{"b":"[[[{{{\"]]"}],"c":{}}"#), 3);
        let deepest = format!("{}{}", "[".repeat(MAX_JSON_DEPTH), "]".repeat(MAX_JSON_DEPTH));
        let deeper = format!("[{deepest}]");
        assert_eq!(check_text(deepest.as_bytes()), Ok(()));
        assert!(serde_json::from_str::<Value>(&deepest).is_ok(), "serde_json accepts the deepest we accept");
        assert_eq!(check_text(deeper.as_bytes()), Err(EnvelopeError::TooDeep { depth: 128, max: MAX_JSON_DEPTH }));
        assert!(serde_json::from_str::<Value>(&deeper).is_err(), "and refuses one level more");
    }

    #[test]
    fn invalid_utf8_is_refused_with_its_offset() {
        assert_eq!(check_text(b"{\"a\":\"caf\xe9\"}"), Err(EnvelopeError::InvalidUtf8 { offset: 9 }));
        assert_eq!(check_text("{\"a\":\"café\"}".as_bytes()), Ok(()));
    }

    #[test]
    fn non_json_is_its_own_canonical_form() {
        assert_eq!(canonical_bytes(b"not json"), b"not json");
    }
}
