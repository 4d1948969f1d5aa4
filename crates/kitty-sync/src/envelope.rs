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
}

/// The deepest nesting of arrays and objects an envelope may have, the envelope object itself
/// counting as one level. Capture and the built-in receiver apply the same number, which is
/// also serde_json's recursion limit: what one side accepts the other (and common JSON
/// parsers reading the receiver's listing) can read back.
pub const MAX_JSON_DEPTH: usize = 128;

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
    fn non_json_is_its_own_canonical_form() {
        assert_eq!(canonical_bytes(b"not json"), b"not json");
    }
}
