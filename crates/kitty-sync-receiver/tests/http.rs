//! The receiver as a peer sees it: a real server on 127.0.0.1:0, spoken to over HTTP, once
//! on SQLite and once on PostgreSQL (`both_stores!`).

#[path = "http/abuse.rs"]
mod abuse;
mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::num::NonZeroU64;
use std::time::{Duration, Instant};

use common::*;

both_stores!(
    plain_and_gzip_batches_are_stored_byte_for_byte,
    path_without_trailing_slash_and_gzip_without_header_are_accepted,
    duplicates_within_a_batch_and_across_a_restart,
    invalid_envelopes_are_rejected_in_request_order,
    malformed_bodies_answer_400_and_store_nothing,
    unsupported_encoding_unknown_path_and_wrong_method,
    body_and_event_limits,
    hundred_megabyte_bodies_are_refused_without_buffering,
    ten_thousand_events_in_one_batch,
    bearer_token_guards_batches_and_listing_but_not_health,
    fault_injection_fails_every_nth_batch_and_rejects_types,
    fail_status_is_configurable_and_delay_comes_after_the_commit,
    health_identity_follows_the_database,
    listing_pages_by_sequence,
    concurrent_clients_sending_the_same_ids_get_one_success_each,
    shutdown_lets_an_in_flight_batch_finish,
    envelopes_nested_deeper_than_capture_allows_are_rejected,
);
use kitty_sync_receiver::{BearerToken, Deployment, Faults, ServerConfig};
use serde_json::{Value, json};

fn plain_and_gzip_batches_are_stored_byte_for_byte(backend: Backend) {
    let receiver = Receiver::start(backend, ServerConfig::default());
    let first = envelope(&ulid(1), "A");
    let second = envelope(&ulid(2), "B");

    let reply = post_json(&receiver.batch_url(), &batch(std::slice::from_ref(&first)));
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json(), json!({"results": [{"event_id": ulid(1), "status": "success"}]}));
    assert_eq!(reply.header("content-type"), Some("application/json"));

    let reply = post_gzip(&receiver.batch_url(), &batch(std::slice::from_ref(&second)));
    assert_eq!(reply.statuses(), ["success"]);

    assert_eq!(receiver.envelopes(), vec![first.clone(), second.clone()]);
    // The listing embeds the stored bytes as they are.
    let listing = get(&format!("{}/api/v1/events/", receiver.url()), &[]);
    assert!(listing.body.contains(&first), "{}", listing.body);
    let events = listing.json()["events"].clone();
    assert_eq!(events[1]["envelope"]["payload"]["note"], "café");
    assert_eq!(events[0]["event_id"], ulid(1));
    let stats = receiver.stats();
    assert_eq!((stats.event_count, stats.batch_requests), (2, 2));
}

fn path_without_trailing_slash_and_gzip_without_header_are_accepted(backend: Backend) {
    let receiver = Receiver::start(backend, ServerConfig::default());
    let body = batch(&[envelope(&ulid(1), "A")]);
    let url = format!("{}/api/v1/events/batch", receiver.url());
    assert_eq!(post_json(&url, &body).statuses(), ["success"]);
    let reply = post(&receiver.batch_url(), &gzip(body.as_bytes()), &[]);
    assert_eq!(reply.statuses(), ["duplicate"]);
}

fn duplicates_within_a_batch_and_across_a_restart(backend: Backend) {
    let mut receiver = Receiver::start(backend, ServerConfig::default());
    let (a, b, c) = (envelope(&ulid(1), "A"), envelope(&ulid(2), "A"), envelope(&ulid(3), "A"));
    let reply = post_gzip(&receiver.batch_url(), &batch(&[a.clone(), a.clone(), b.clone()]));
    assert_eq!(reply.statuses(), ["success", "duplicate", "success"]);
    let instance = get(&format!("{}/api/v1/sync/health/", receiver.url()), &[]).json();

    receiver.restart(ServerConfig::default());
    let reply = post_gzip(&receiver.batch_url(), &batch(&[b, c, a]));
    assert_eq!(reply.statuses(), ["duplicate", "success", "duplicate"]);
    let again = get(&format!("{}/api/v1/sync/health/", receiver.url()), &[]).json();
    assert_eq!(instance["server_instance_id"], again["server_instance_id"]);
    assert_eq!(receiver.stats().event_count, 3);
}

fn invalid_envelopes_are_rejected_in_request_order(backend: Backend) {
    let receiver = Receiver::start(backend, ServerConfig::default());
    let id = ulid(9);
    let body = format!(
        r#"{{"events": [5, {{"event_type": "A"}}, {{"event_id": "nope", "event_type": "A"}},
            {{"event_id": 12, "event_type": "A"}}, {{"event_id": "{id}"}},
            {{"event_id": "{id}", "event_type": ""}}, [1], {}]}}"#,
        envelope(&id, "A")
    );
    let reply = post_json(&receiver.batch_url(), &body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let results = reply.json()["results"].as_array().unwrap().clone();
    let summary: Vec<(Value, String, String)> = results
        .iter()
        .map(|r| {
            let error = r["error"].as_str().unwrap_or("").to_string();
            (r["event_id"].clone(), r["status"].as_str().unwrap().to_string(), error)
        })
        .collect();
    let expected = [
        (Value::Null, "rejected", "not a JSON object"),
        (Value::Null, "rejected", "missing event_id"),
        (json!("nope"), "rejected", "invalid event_id"),
        (json!(12), "rejected", "invalid event_id"),
        (json!(id), "rejected", "missing event_type"),
        (json!(id), "rejected", "invalid event_type"),
        (Value::Null, "rejected", "not a JSON object"),
        (json!(id), "success", ""),
    ];
    assert_eq!(summary.len(), expected.len());
    for ((got_id, got_status, got_error), (id, status, error)) in summary.iter().zip(expected) {
        assert_eq!((got_id, got_status.as_str()), (&id, status), "{results:?}");
        assert!(got_error.starts_with(error), "{got_error:?} should start with {error:?}");
    }
    let stats = receiver.stats();
    assert_eq!(stats.event_count, 1);
}

fn malformed_bodies_answer_400_and_store_nothing(backend: Backend) {
    let receiver = Receiver::start(backend, ServerConfig::default());
    let good = batch(&[envelope(&ulid(1), "A")]);
    let mut truncated = gzip(good.as_bytes());
    truncated.truncate(truncated.len() / 2);
    let cases: Vec<(Vec<u8>, bool, &str)> = vec![
        (truncated, true, "malformed gzip body"),
        (b"{\"events\": [".to_vec(), false, "malformed JSON body"),
        (b"not json".to_vec(), false, "malformed JSON body"),
        (b"".to_vec(), false, "malformed JSON body"),
        (format!("[{}]", envelope(&ulid(1), "A")).into_bytes(), false, "request body must be a JSON object"),
        (b"{\"events\": {}}".to_vec(), false, "\"events\" must be a JSON array, got object"),
        (b"{\"events\": null}".to_vec(), false, "\"events\" must be a JSON array, got null"),
        (b"{\"event\": []}".to_vec(), false, "expected {\"events\": [...]}: missing field `events`"),
        (b"{\"events\": [1]}\xff".to_vec(), false, "request body is not UTF-8"),
        (format!("{good} trailing").into_bytes(), false, "malformed JSON body"),
    ];
    for (body, gzipped, error) in &cases {
        let mut headers = vec![("Content-Type", "application/json")];
        if *gzipped {
            headers.push(("Content-Encoding", "gzip"));
        }
        let reply = post(&receiver.batch_url(), body, &headers);
        assert_eq!(reply.status, 400, "{error}: {}", reply.body);
        let json = reply.json();
        assert!(json["error"].as_str().unwrap().starts_with(error), "{error}: {}", reply.body);
        assert_eq!(json["details"], json!([]));
    }
    let stats = receiver.stats();
    assert_eq!(stats.event_count, 0);
    assert_eq!(stats.batch_requests_by_status.get(&400), Some(&(cases.len() as u64)));
}

fn unsupported_encoding_unknown_path_and_wrong_method(backend: Backend) {
    let receiver = Receiver::start(backend, ServerConfig::default());
    let reply = post(&receiver.batch_url(), b"{}", &[("Content-Encoding", "br")]);
    assert_eq!(reply.status, 415);
    assert!(reply.json()["error"].as_str().unwrap().contains("\"br\""));
    let reply = get(&format!("{}/nope", receiver.url()), &[]);
    assert_eq!(reply.status, 404);
    assert!(reply.json()["error"].as_str().unwrap().contains("/nope"));
    let reply = get(&receiver.batch_url(), &[]);
    assert_eq!(reply.status, 405);
    assert_eq!(receiver.stats().event_count, 0);
}

fn body_and_event_limits(backend: Backend) {
    let config = ServerConfig { max_body_bytes: 4000, max_event_bytes: 400, ..ServerConfig::default() };
    let receiver = Receiver::start(backend, config);
    let small = envelope(&ulid(1), "A");
    let big = format!(r#"{{"event_id": "{}", "event_type": "A", "pad": "{}"}}"#, ulid(2), "x".repeat(500));

    // A lone oversized event: 413, with the event named.
    let reply = post_gzip(&receiver.batch_url(), &batch(std::slice::from_ref(&big)));
    assert_eq!(reply.status, 413, "{}", reply.body);
    let json = reply.json();
    assert!(json["error"].as_str().unwrap().contains("oversized"));
    assert_eq!(json["details"], json!([{"event_id": ulid(2), "error": "oversized"}]));

    // The same event among others: only it is rejected.
    let reply = post_gzip(&receiver.batch_url(), &batch(&[small.clone(), big.clone()]));
    assert_eq!(reply.statuses(), ["success", "rejected"]);
    assert_eq!(reply.json()["results"][1]["error"], "oversized");
    assert_eq!(reply.json()["results"][1]["event_id"], ulid(2));

    // Bodies over the limit, plain and as a gzip bomb: 413, nothing stored.
    let many: Vec<String> = (10..60).map(|n| envelope(&ulid(n), "A")).collect();
    let body = batch(&many);
    assert!(body.len() > 4000);
    let reply = post_json(&receiver.batch_url(), &body);
    assert_eq!(reply.status, 413, "{}", reply.body);
    assert!(reply.json()["error"].as_str().unwrap().contains("too large"));
    let reply = post_gzip(&receiver.batch_url(), &body);
    assert_eq!(reply.status, 413);
    let bomb = format!("{{\"events\": [], \"pad\": \"{}\"}}", " ".repeat(10_000_000));
    let reply = post_gzip(&receiver.batch_url(), &bomb);
    assert_eq!(reply.status, 413);

    let stats = receiver.stats();
    assert_eq!(stats.event_count, 1);
    assert_eq!(stats.batch_requests_by_status.get(&413), Some(&4));
}

fn hundred_megabyte_bodies_are_refused_without_buffering(backend: Backend) {
    let receiver = Receiver::start(backend, ServerConfig::default());
    const SIZE: u64 = 100 * 1024 * 1024;

    // Chunked, with no length announced.
    let started = Instant::now();
    let reader = std::io::repeat(b' ').take(SIZE);
    let response = agent().post(&receiver.batch_url()).send(ureq::SendBody::from_owned_reader(reader)).unwrap();
    assert_eq!(response.status().as_u16(), 413);

    // Announced with Content-Length and streamed from a raw socket.
    let mut stream = TcpStream::connect(receiver.addr()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "POST /api/v1/events/batch/ HTTP/1.1\r\nHost: x\r\nContent-Length: {SIZE}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    let chunk = vec![b' '; 1024 * 1024];
    for _ in 0..100 {
        if stream.write_all(&chunk).is_err() {
            break;
        }
    }
    let (status, text) = read_response(&mut stream);
    assert_eq!(status, 413, "{text}");

    // Announced and waiting for 100-continue: refused before any upload.
    let head = format!(
        "POST /api/v1/events/batch/ HTTP/1.1\r\nHost: x\r\nContent-Length: {SIZE}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    );
    let (status, _) = raw_exchange(receiver.addr(), head.as_bytes());
    assert_eq!(status, 413);
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(receiver.stats().event_count, 0);
}

fn ten_thousand_events_in_one_batch(backend: Backend) {
    let receiver = Receiver::start(backend, ServerConfig::default());
    let events: Vec<String> = (0..10_000).map(|n| envelope(&ulid(n), "A")).collect();
    let reply = post_gzip(&receiver.batch_url(), &batch(&events));
    assert_eq!(reply.status, 200);
    let statuses = reply.statuses();
    assert_eq!(statuses.len(), 10_000);
    assert!(statuses.iter().all(|s| s == "success"));
    assert_eq!(reply.json()["results"][9_999]["event_id"], ulid(9_999));
    assert_eq!(receiver.stats().event_count, 10_000);
}

fn bearer_token_guards_batches_and_listing_but_not_health(backend: Backend) {
    let config = ServerConfig { token: Some(BearerToken::new("s3cret")), ..ServerConfig::default() };
    let receiver = Receiver::start(backend, config);
    let body = batch(&[envelope(&ulid(1), "A")]);
    for headers in [vec![], vec![("Authorization", "Bearer wrong")], vec![("Authorization", "Basic s3cret")]] {
        let reply = post(&receiver.batch_url(), body.as_bytes(), &headers);
        assert_eq!(reply.status, 401, "{:?}", headers);
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
        assert!(!reply.body.contains("s3cret"));
    }
    assert_eq!(receiver.stats().event_count, 0);
    assert_eq!(receiver.stats().batch_requests_by_status.get(&401), Some(&3));

    let reply = post(&receiver.batch_url(), body.as_bytes(), &[("Authorization", "Bearer s3cret")]);
    assert_eq!(reply.statuses(), ["success"]);
    assert_eq!(get(&format!("{}/api/v1/events/", receiver.url()), &[]).status, 401);
    let listing = get(&format!("{}/api/v1/events/", receiver.url()), &[("Authorization", "Bearer s3cret")]);
    assert_eq!(listing.json()["events"].as_array().unwrap().len(), 1);
    assert_eq!(get(&format!("{}/api/v1/sync/health/", receiver.url()), &[]).status, 200);
}

fn fault_injection_fails_every_nth_batch_and_rejects_types(backend: Backend) {
    let faults = Faults {
        fail_every: NonZeroU64::new(2),
        reject_types: BTreeSet::from(["Blocked".to_string()]),
        ..Faults::default()
    };
    let receiver = Receiver::start(backend, ServerConfig { faults, ..ServerConfig::default() });
    let mut statuses = Vec::new();
    for n in 1..=4 {
        let reply = post_gzip(&receiver.batch_url(), &batch(&[envelope(&ulid(n), "A")]));
        if reply.status == 503 {
            assert_eq!(reply.header("retry-after"), Some("1"));
            assert!(reply.json()["error"].as_str().unwrap().contains("--fail-every 2"));
        }
        statuses.push(reply.status);
    }
    assert_eq!(statuses, [200, 503, 200, 503]);
    let stored: Vec<String> = receiver.envelopes();
    assert_eq!(stored, vec![envelope(&ulid(1), "A"), envelope(&ulid(3), "A")]);

    let reply = post_gzip(&receiver.batch_url(), &batch(&[envelope(&ulid(10), "Blocked"), envelope(&ulid(11), "A")]));
    assert_eq!(reply.statuses(), ["rejected", "success"]);
    assert!(reply.json()["results"][0]["error"].as_str().unwrap().contains("--reject-type Blocked"));
}

fn fail_status_is_configurable_and_delay_comes_after_the_commit(backend: Backend) {
    let faults = Faults { fail_every: NonZeroU64::new(1), fail_status: 500, ..Faults::default() };
    let receiver = Receiver::start(backend, ServerConfig { faults, ..ServerConfig::default() });
    let reply = post_gzip(&receiver.batch_url(), &batch(&[envelope(&ulid(1), "A")]));
    assert_eq!((reply.status, reply.header("retry-after")), (500, None));

    let faults = Faults { delay: Duration::from_millis(400), ..Faults::default() };
    let receiver = Receiver::start(backend, ServerConfig { faults, ..ServerConfig::default() });
    let short = ureq::Agent::config_builder().timeout_global(Some(Duration::from_millis(100))).build().new_agent();
    let timed_out = short.post(&receiver.batch_url()).send(batch(&[envelope(&ulid(1), "A")]));
    assert!(timed_out.is_err(), "the client should time out");
    // The batch is committed although its answer never arrived: a re-send is a duplicate.
    wait_for_events(&receiver, 1);
    let started = Instant::now();
    let reply = post_gzip(&receiver.batch_url(), &batch(&[envelope(&ulid(1), "A")]));
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(reply.statuses(), ["duplicate"]);
}

fn health_identity_follows_the_database(backend: Backend) {
    let deployment =
        Deployment { deployment_id: Some("dep-1".into()), environment_name: Some("ci".into()), git_sha: None };
    let mut receiver = Receiver::start(backend, ServerConfig { deployment, ..ServerConfig::default() });
    let health_url = |r: &Receiver| format!("{}/api/v1/sync/health/", r.url());
    let first = get(&health_url(&receiver), &[]).json();
    assert_eq!(first["status"], "ok");
    assert_eq!(first["deployment_id"], "dep-1");
    assert_eq!(first["environment_name"], "ci");
    assert_eq!(first["git_sha"], Value::Null);
    let id = first["server_instance_id"].as_str().unwrap().to_string();
    assert!(!id.is_empty());
    let no_slash = get(&format!("{}/api/v1/sync/health", receiver.url()), &[]).json();
    assert_eq!(no_slash["server_instance_id"], id.as_str());

    receiver.restart(ServerConfig::default());
    let same = get(&health_url(&receiver), &[]).json();
    assert_eq!(same["server_instance_id"], id.as_str());
    assert_eq!(same["deployment_id"], Value::Null);

    receiver.stop();
    receiver.place.wipe();
    receiver.restart(ServerConfig::default());
    let wiped = get(&health_url(&receiver), &[]).json();
    assert_ne!(wiped["server_instance_id"], id.as_str());
}

fn listing_pages_by_sequence(backend: Backend) {
    let receiver = Receiver::start(backend, ServerConfig::default());
    let events: Vec<String> = (0..25).map(|n| envelope(&ulid(n), "A")).collect();
    assert_eq!(post_gzip(&receiver.batch_url(), &batch(&events)).status, 200);
    let mut after = 0;
    let mut seen = Vec::new();
    loop {
        let page = get(&format!("{}/api/v1/events/?after={after}&limit=10", receiver.url()), &[]).json();
        let items = page["events"].as_array().unwrap().clone();
        let next = page["next_after"].as_i64().unwrap();
        if items.is_empty() {
            assert_eq!(next, after, "an empty page hands back the same cursor");
            break;
        }
        assert!(items.len() <= 10);
        for item in &items {
            assert!(item["seq"].as_i64().unwrap() > after);
            assert!(item["received_at"].as_str().unwrap().ends_with('Z'));
            seen.push(item["event_id"].as_str().unwrap().to_string());
        }
        assert_eq!(next, items.last().unwrap()["seq"].as_i64().unwrap());
        after = next;
    }
    let expected: Vec<String> = (0..25).map(ulid).collect();
    assert_eq!(seen, expected);
    let default_page = get(&format!("{}/api/v1/events", receiver.url()), &[]).json();
    assert_eq!(default_page["events"].as_array().unwrap().len(), 25);
    for bad in ["after=-1", "after=x", "limit=0", "limit=-5"] {
        let reply = get(&format!("{}/api/v1/events/?{bad}", receiver.url()), &[]);
        assert_eq!(reply.status, 400, "{bad}");
        assert!(reply.json()["error"].as_str().unwrap().starts_with("invalid"));
    }
}

fn concurrent_clients_sending_the_same_ids_get_one_success_each(backend: Backend) {
    let receiver = Receiver::start(backend, ServerConfig::default());
    let events: Vec<String> = (0..200).map(|n| envelope(&ulid(n), "A")).collect();
    let body = batch(&events);
    let url = receiver.batch_url();
    let replies: Vec<Vec<String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6).map(|_| scope.spawn(|| post_gzip(&url, &body).statuses())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for index in 0..events.len() {
        let successes = replies.iter().filter(|r| r[index] == "success").count();
        let duplicates = replies.iter().filter(|r| r[index] == "duplicate").count();
        assert_eq!((successes, duplicates), (1, 5), "event {index}");
    }
    let stats = receiver.stats();
    assert_eq!((stats.event_count, stats.batch_requests), (200, 6));
}

fn shutdown_lets_an_in_flight_batch_finish(backend: Backend) {
    let faults = Faults { delay: Duration::from_millis(500), ..Faults::default() };
    let mut receiver = Receiver::start(backend, ServerConfig { faults, ..ServerConfig::default() });
    let url = receiver.batch_url();
    let in_flight = std::thread::spawn(move || post_gzip(&url, &batch(&[envelope(&ulid(1), "A")])));
    // Committed, and now waiting out the delay: the answer is in flight.
    wait_for_events(&receiver, 1);
    receiver.stop();
    let reply = in_flight.join().unwrap();
    assert_eq!(reply.statuses(), ["success"]);
    // The database was closed cleanly: no WAL left behind.
    if let Place::Sqlite(db) = &receiver.place {
        assert!(!db.with_extension("db-wal").exists());
    }
    assert_eq!(receiver.stats().event_count, 1);
}

fn wait_for_events(receiver: &Receiver, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while receiver.stats().event_count < count {
        assert!(Instant::now() < deadline, "the batch was never committed");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn envelopes_nested_deeper_than_capture_allows_are_rejected(backend: Backend) {
    let receiver = Receiver::start(backend, ServerConfig::default());
    let deep = |levels: usize, n: u32| {
        format!(
            r#"{{"event_id": "{}", "event_type": "Deep", "payload": {}{}}}"#,
            ulid(n),
            "[".repeat(levels - 1),
            "]".repeat(levels - 1)
        )
    };
    let max = kitty_sync::envelope::MAX_JSON_DEPTH;
    let body = batch(&[deep(100_000, 1), deep(max + 1, 2), deep(max, 3), envelope(&ulid(4), "A")]);
    let reply = post_gzip(&receiver.batch_url(), &body);
    assert_eq!(reply.statuses(), ["rejected", "rejected", "success", "success"], "{}", reply.body);
    let results = reply.json()["results"].clone();
    assert_eq!(results[0]["event_id"], ulid(1));
    assert!(results[1]["error"].as_str().unwrap().contains(&format!("nested deeper than {max} levels")));
    assert_eq!(receiver.stats().event_count, 2);
}
