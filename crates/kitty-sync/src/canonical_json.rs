//! Canonical JSON straight from bytes, for every place that compares stored or incoming
//! envelopes (import dedup, migration, conflict hashes). The migration's hot loop parses every
//! legacy envelope once to validate it and hash its canonical form. Parsing into `serde_json::Value` allocates a `String` for every key and
//! string; this borrowed tree only allocates for strings that contain escapes, which roughly
//! halves the cost of a typical envelope.
//!
//! The bytes it produces must be exactly [`crate::envelope::canonical_json`]'s — the journal's
//! one definition of "the same event". It mirrors that function rule for rule (keys sorted by
//! bytes, last duplicate key wins, strings and numbers written by serde_json's compact
//! serializer), and the tests compare the two on generated and hand-written inputs.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Number;

/// A JSON value borrowing its strings from the input where it can.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Json<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    Object(BTreeMap<Cow<'a, str>, Json<'a>>),
}

impl<'a> Json<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Json<'a>, serde_json::Error> {
        serde_json::from_slice(data)
    }

    pub fn as_object(&self) -> Option<&BTreeMap<Cow<'a, str>, Json<'a>>> {
        match self {
            Json::Object(map) => Some(map),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Json::Number(n) => n.as_i64(),
            _ => None,
        }
    }

    /// Appends the canonical form (as `canonical_json` writes it) to `out`.
    pub fn write_canonical(&self, out: &mut Vec<u8>) {
        match self {
            Json::Null => out.extend_from_slice(b"null"),
            Json::Bool(true) => out.extend_from_slice(b"true"),
            Json::Bool(false) => out.extend_from_slice(b"false"),
            Json::Number(n) => write_serde(n, out),
            Json::String(s) => write_serde(s.as_ref(), out),
            Json::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    item.write_canonical(out);
                }
                out.push(b']');
            }
            Json::Object(map) => {
                // A BTreeMap of `str` keys iterates in byte order: the order canonical_json sorts to.
                out.push(b'{');
                for (i, (key, item)) in map.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_serde(key.as_ref(), out);
                    out.push(b':');
                    item.write_canonical(out);
                }
                out.push(b'}');
            }
        }
    }

    /// The canonical form as text, for messages.
    pub fn to_canonical_string(&self) -> String {
        let mut out = Vec::new();
        self.write_canonical(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// serde_json's compact serializer, as `canonical_json` uses for strings and numbers. Writing
/// a string or a finite number into a `Vec` cannot fail.
fn write_serde<T: serde::Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    let _ = serde_json::to_writer(&mut *out, value);
}

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Json<'de>, E> {
        // As serde_json's Value does: a non-finite number becomes null.
        Ok(Number::from_f64(v).map_or(Json::Null, Json::Number))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v.to_string())))
    }

    fn visit_string<E>(self, v: String) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v)))
    }

    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_none<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let mut object = BTreeMap::new();
        while let Some(Key(key)) = map.next_key()? {
            // Last duplicate wins, as in serde_json's Value.
            object.insert(key, map.next_value()?);
        }
        Ok(Json::Object(object))
    }
}

/// An object key, borrowed when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::canonical_json;
    use proptest::prelude::*;
    use serde_json::Value;

    fn ours(data: &[u8]) -> Option<Vec<u8>> {
        let parsed = Json::parse(data).ok()?;
        let mut out = Vec::new();
        parsed.write_canonical(&mut out);
        Some(out)
    }

    fn theirs(data: &[u8]) -> Option<Vec<u8>> {
        serde_json::from_slice::<Value>(data).ok().map(|v| canonical_json(&v).into_bytes())
    }

    #[test]
    fn agrees_with_canonical_json_on_hand_written_inputs() {
        let cases: &[&[u8]] = &[
            br#"{"b": 1, "a": [true, false, null], "c": {"z": "x", "y": -0.0}}"#,
            br#"{"k": "caf\u00e9 \ud83d\ude00 \"q\" \\ \n \t \u0001 \u007f \u2028", "caf\u00e9": 1}"#,
            br#"{"dup": 1, "dup": 2, "Dup": 3, "\u00e9": 4, "e": 5, "": 6}"#,
            br#"{"n": [0, -1, 1.5, 1e300, -1e-300, 12345678901234567890, 123456789012345678901234, 1E2, 2.50]}"#,
            br#"  [ {"a" : {"b" : [ ] , "c" : { } } } ]  "#,
            br#""just a string""#,
            br#"42"#,
            b"{\"raw\": \"\xc3\xa9\xf0\x9f\x98\x80\"}",
            br#"{"big": 18446744073709551615, "neg": -9223372036854775808, "over": -9223372036854775809}"#,
        ];
        for case in cases {
            assert_eq!(ours(case), theirs(case), "{}", String::from_utf8_lossy(case));
            assert!(ours(case).is_some());
        }
        for bad in [&b"{\"a\": NaN}"[..], b"{\"a\": \"\\udce9\"}", b"{", b"", b"{\"a\":1}x"] {
            assert_eq!(ours(bad), None);
            assert_eq!(theirs(bad), None);
        }
    }

    #[test]
    fn reads_identity_fields() {
        let data =
            br#"{"event_id": "01KJP325TDMTQC21WEN42FYF3K", "lamport_clock": 7, "f": 1.5, "team_slug": "t\u00e9"}"#;
        let parsed = Json::parse(data).unwrap();
        let object = parsed.as_object().unwrap();
        assert_eq!(object["event_id"].as_str(), Some("01KJP325TDMTQC21WEN42FYF3K"));
        assert!(matches!(&object["event_id"], Json::String(Cow::Borrowed(_))), "no allocation without escapes");
        assert_eq!(object["team_slug"].as_str(), Some("té"));
        assert_eq!(object["lamport_clock"].as_i64(), Some(7));
        assert_eq!(object["f"].as_i64(), None);
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::String),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec(("\\PC{0,6}", inner), 0..6)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    /// Python's `json.dumps` defaults: `", "`/`": "` separators and `\uXXXX` for non-ASCII.
    fn python_style(value: &Value) -> String {
        match value {
            Value::String(s) => {
                let mut out = String::from("\"");
                for c in s.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                            let mut units = [0u16; 2];
                            for unit in c.encode_utf16(&mut units) {
                                out.push_str(&format!("\\u{unit:04x}"));
                            }
                        }
                        c => out.push(c),
                    }
                }
                out.push('"');
                out
            }
            Value::Array(items) => format!("[{}]", items.iter().map(python_style).collect::<Vec<_>>().join(", ")),
            Value::Object(map) => format!(
                "{{{}}}",
                map.iter()
                    .rev()
                    .map(|(k, v)| format!("{}: {}", python_style(&Value::String(k.clone())), python_style(v)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            other => other.to_string(),
        }
    }

    proptest! {
        #[test]
        fn agrees_with_canonical_json(value in arb_json()) {
            let compact = serde_json::to_vec(&value).unwrap();
            prop_assert_eq!(ours(&compact), theirs(&compact));
            let python = python_style(&value);
            prop_assert_eq!(ours(python.as_bytes()), theirs(python.as_bytes()));
            prop_assert_eq!(ours(python.as_bytes()), ours(&compact));
        }
    }
}
