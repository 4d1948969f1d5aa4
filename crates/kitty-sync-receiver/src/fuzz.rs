//! Bounded fuzzing of the receiver's request parsing: any body bytes, either encoding,
//! damaged gzip, deep nesting. `KITTY_SYNC_FUZZ_CASES=N` sets the cases per property.
//! Properties: no panic and no stack overflow; a refused body stores nothing and says why;
//! an accepted one answers once per event.

use std::collections::BTreeSet;
use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;
use jiff::Timestamp;
use proptest::prelude::*;
use proptest::test_runner::Config;

use crate::ReceiverStore;
use crate::batch::{self, Rules};
use crate::body::{self, DecodeError, Encoding};
use crate::store::sqlite::SqliteStore;

const MAX_BODY: usize = 64 * 1024;

fn cases() -> Config {
    let cases = std::env::var("KITTY_SYNC_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(96);
    Config { cases, failure_persistence: None, ..Config::default() }
}

fn event() -> impl Strategy<Value = String> {
    let id = "[0-7][0-9A-HJKMNP-TV-Z]{25}";
    prop_oneof![
        (id, "[A-Za-z]{1,6}").prop_map(|(id, t)| format!(r#"{{"event_id":"{id}","event_type":"{t}"}}"#)),
        (id, 0usize..400).prop_map(|(id, depth)| {
            format!(r#"{{"event_id":"{id}","event_type":"D","p":{}{}}}"#, "{\"a\":[".repeat(depth), "]}".repeat(depth))
        }),
        Just(r#"{"event_id":"01KVYWRGJEV7CEZW6J7GXEBN16","event_type":"A","event_id":null}"#.to_string()),
        Just("[[[[]]]]".to_string()),
        Just("\"\\ud800\"".to_string()),
        "[ -~&&[^\"\\\\]]{0,12}".prop_map(|s| format!("\"{s}\"")),
        Just("1e999".to_string()),
    ]
}

fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(event(), 0..8)
            .prop_map(|events| format!(r#"{{"events":[{}]}}"#, events.join(",")).into_bytes()),
        prop::collection::vec(any::<u8>(), 0..300),
        (0usize..100_000).prop_map(|depth| ("[".repeat(depth) + &"]".repeat(depth)).into_bytes()),
        (0usize..100_000).prop_map(|depth| format!(r#"{{"events":[{}]}}"#, "[".repeat(depth)).into_bytes()),
        "[ -~]{0,80}".prop_map(String::into_bytes),
    ]
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn any_body_in_any_encoding(
        raw in body_bytes(),
        gzipped in any::<bool>(),
        header_says_gzip in any::<bool>(),
        cut in any::<prop::sample::Index>(),
        flip in any::<Option<(prop::sample::Index, u8)>>(),
    ) {
        let mut wire = if gzipped { gzip(&raw) } else { raw.clone() };
        if let Some((at, mask)) = flip.filter(|_| gzipped && !wire.is_empty()) {
            let at = at.index(wire.len());
            wire[at] ^= mask | 1;
            wire.truncate(at.max(cut.index(wire.len() + 1)));
        }
        let encoding = if header_says_gzip { Encoding::Gzip } else { Encoding::Identity };
        let json = match body::decode(encoding, wire, MAX_BODY) {
            Ok(json) => json,
            Err(DecodeError::TooLarge) => return Ok(()),
            Err(DecodeError::Malformed(text)) => {
                prop_assert!(text.starts_with("malformed gzip body"), "{}", text);
                return Ok(());
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("r.db")).unwrap();
        let types = BTreeSet::new();
        let rules = Rules { max_event_bytes: 16 * 1024, reject_types: &types };
        match judge_and_store(&store, &rules, &json) {
            Ok(answer) => {
                let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
                let results = answer["results"].as_array().unwrap();
                let stored = store.stats().unwrap().event_count as usize;
                let successes = results.iter().filter(|r| r["status"] == "success").count();
                prop_assert_eq!(stored, successes);
                for result in results.iter().filter(|r| r["status"] == "rejected") {
                    prop_assert!(!result["error"].as_str().unwrap_or_default().is_empty(), "{}", result);
                }
            }
            Err(failure) => {
                prop_assert!(matches!(failure.status, 400 | 413), "{:?}", failure);
                prop_assert!(!failure.error.is_empty());
                prop_assert_eq!(store.stats().unwrap().event_count, 0);
            }
        }
    }
}

/// The server's path for one decoded body on a blocking store: judge, store what was
/// accepted, answer.
fn judge_and_store(store: &SqliteStore, rules: &Rules<'_>, json: &[u8]) -> Result<Vec<u8>, batch::Failure> {
    let mut judged = batch::judge_body(rules, json, Timestamp::now())?;
    let borrowed: Vec<_> = judged.events.iter().map(crate::store::EventRow::borrowed).collect();
    let stored = store.ingest(&judged.record, &borrowed);
    drop(borrowed);
    judged.events.clear();
    match stored {
        Ok(ingested) => batch::respond(judged, ingested),
        Err(e) => Err(batch::ingest_failure(&judged, &e)),
    }
}
