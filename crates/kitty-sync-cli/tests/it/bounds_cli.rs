//! Input that is valid for the OS or the shell but out of range for kitty-sync is refused when
//! it is given (exit 2 with a hint), never accepted and failed on later.

use crate::assert_cli_snapshot;
use crate::common::Home;

/// A huge `--wait`/`--timeout` used to overflow `Instant + Duration` and panic (exit 101).
#[test]
fn huge_wait_and_timeout_are_usage_errors() {
    let home = Home::new();
    home.run(&["emit", "--type", "A"]).expect(0);
    // A delivering mode, so `now` gets as far as its lock and its HTTP client.
    home.external("http://127.0.0.1:9/api/v1/events/batch/");
    let huge = ["1e19", "18446744073709551615", "1e300", "86401", "-1", "inf"];
    for value in huge {
        for args in [
            vec!["now", "--wait", value],
            vec!["now", "--timeout", value],
            vec!["archive", "--wait", value],
            vec!["gc", "--wait", value],
        ] {
            let run = home.run(&args).expect(2);
            assert!(run.stderr.contains("hint:"), "{args:?}: {}", run.stderr);
        }
    }
    home.run(&["now", "--timeout", "0"]).expect(2);
    let run = home.run(&["now", "--wait", "1e19"]);
    assert_cli_snapshot!(home.path(), run);
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

fn envelope_line(event_id: &str, payload: &str) -> Vec<u8> {
    format!(r#"{{"event_id":"{event_id}","event_type":"T","payload":{payload}}}"#).into_bytes()
}

/// Invalid UTF-8 inside a JSON string was captured (the fast path skipped unread fields
/// without decoding them) and then refused by every receiver, forever. Nesting beyond what
/// every JSON parser on the way accepts is refused the same way, with the same limit for
/// `--jsonl` and `--payload`/`--payload-file`.
#[test]
fn invalid_utf8_and_deep_nesting_are_refused_at_capture() {
    use kitty_sync::envelope::MAX_JSON_DEPTH;
    let home = Home::new();
    let receiver = crate::common::Receiver::start(&home.path().join("receiver.db"), &[]);
    home.external(&receiver.endpoint());
    let ids: Vec<String> = (0..4).map(|_| crate::common::new_event_id()).collect();
    // The envelope object is level 1 and "payload" level 2: the payload's own nesting may use
    // all the levels left.
    let lines = [
        envelope_line(&ids[0], r#"{"ok":true}"#),
        [
            &br#"{"event_id":""#[..],
            ids[1].as_bytes(),
            br#"","event_type":"T","payload":{"note":"caf"#,
            b"\xe9",
            br#""}}"#,
        ]
        .concat(),
        envelope_line(&ids[2], &nested(MAX_JSON_DEPTH - 1)),
        envelope_line(&ids[3], &nested(MAX_JSON_DEPTH)),
    ];
    let file = home.path().join("in.jsonl");
    std::fs::write(&file, lines.join(&b'\n')).unwrap();
    let run = home.run(&["emit", "--jsonl", file.to_str().unwrap(), "--json"]).expect(2);
    let invalid = &run.json()["invalid"];
    assert_eq!(invalid[0]["line"], 2, "{run:?}");
    assert!(invalid[0]["error"].as_str().unwrap().contains("UTF-8"), "{run:?}");
    assert_eq!(invalid[1]["line"], 4, "{run:?}");
    assert!(invalid[1]["error"].as_str().unwrap().contains("nested"), "{run:?}");
    assert_eq!(home.status()["event_journal"]["retained_event_count"], 0, "all or nothing");

    let run = home.run(&["emit", "--jsonl", file.to_str().unwrap(), "--skip-invalid", "--json"]).expect(0);
    assert_eq!(run.json()["captured"], 2, "{run:?}");
    assert_eq!(run.json()["invalid"].as_array().unwrap().len(), 2, "{run:?}");

    // The same limit for a single event's payload (text or file).
    let deepest_payload = format!(r#"{{"a":{}}}"#, nested(MAX_JSON_DEPTH - 2));
    let too_deep = format!(r#"{{"a":{}}}"#, nested(MAX_JSON_DEPTH - 1));
    home.run(&["emit", "--type", "T", "--payload", &deepest_payload]).expect(0);
    let run = home.run(&["emit", "--type", "T", "--payload", &too_deep]).expect(2);
    assert!(run.stderr.contains("nested") && run.stderr.contains("hint:"), "{}", run.stderr);
    assert_cli_snapshot!(home.path(), run);
    let payload_file = home.path().join("payload.json");
    std::fs::write(&payload_file, &too_deep).unwrap();
    home.run(&["emit", "--type", "T", "--payload-file", payload_file.to_str().unwrap()]).expect(2);

    // Everything captured is accepted by a receiver.
    let report = home.now(&[]).1;
    assert_eq!(report["delivered"], 3, "{report:#}");
}
