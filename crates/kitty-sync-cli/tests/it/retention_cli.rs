//! `kitty-sync archive` and `kitty-sync gc` from the outside: the real binary, states built by
//! real drains against real built-in receivers, archive round trip, store file size before and
//! after gc, history kept, the lock, and insta snapshots of the JSON reports.

use crate::status_support;

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use status_support::{ReceiverProcess, TestHome, envelopes, event_id, keys, sorted, text, tree};

const ARCHIVE_KEYS: [&str; 4] = ["dry_run", "archived", "out", "bytes"];
const GC_KEYS: [&str; 6] = ["dry_run", "purged", "purged_bytes", "kept", "store_bytes_before", "store_bytes_after"];

fn gunzip_lines(path: &Path) -> Vec<String> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()).read_to_string(&mut text).unwrap();
    text.lines().map(str::to_string).collect()
}

/// `--json` plus what the command said on stderr.
fn json_and_stderr(h: &TestHome, args: &[&str]) -> (Value, String) {
    let mut all = args.to_vec();
    all.push("--json");
    let out = h.run(&all);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out.stderr));
    (serde_json::from_slice(&out.stdout).unwrap(), text(&out.stderr))
}

#[test]
fn archive_round_trip_then_gc() {
    let h = TestHome::new();
    let r = ReceiverProcess::start(h.dir.path(), "r", &[]);
    h.mode_external(&r);
    let lines = envelopes("F0", 1..31, "Archived", 200);
    let payload_bytes: usize = lines.iter().map(String::len).sum();
    h.emit_lines(&lines);
    assert_eq!(h.drain(0, &[])["delivered"], 30);

    // Events captured just now are not older than an hour: nothing archived, and why.
    let (doc, err) = json_and_stderr(&h, &["archive", "--older-than", "1h"]);
    assert_eq!(doc, json!({"dry_run": false, "archived": 0, "out": null, "bytes": 0}));
    assert!(err.contains("Nothing archived"), "{err}");
    assert!(!h.home.join("event-sync/archive").exists(), "no archive file or directory for nothing");
    assert!(h.ok(&["archive", "--older-than", "1h"]).contains("Nothing archived"));
    assert_eq!(h.run(&["archive", "--older-than", "1y"]).status.code(), Some(2), "bad duration is a usage error");

    // --dry-run writes nothing.
    let before = tree(&h.home);
    let out = h.path("a.jsonl.gz");
    let out_arg = out.to_str().unwrap();
    let doc = h.json(&["archive", "--dry-run", "--out", out_arg]);
    assert_eq!(keys(&doc), sorted(&ARCHIVE_KEYS));
    assert_eq!(
        (doc["dry_run"].clone(), doc["archived"].clone(), doc["out"].clone()),
        (json!(true), json!(30), Value::Null)
    );
    assert!(!out.exists());
    assert_eq!(tree(&h.home), before, "archive --dry-run changed the home");
    assert_eq!(h.status()["event_journal"]["archived_event_count"], 0);

    let (doc_text, doc) = h.json_text(0, &["archive", "--out", out_arg]);
    assert_eq!(keys(&doc), sorted(&ARCHIVE_KEYS));
    assert_eq!(doc["archived"], 30);
    assert_eq!(doc["out"], out_arg);
    assert_eq!(doc["bytes"], std::fs::metadata(&out).unwrap().len());
    snapshot!(&h, "archive_json", doc_text);
    assert_eq!(gunzip_lines(&out), lines, "the archive holds the stored bytes, in capture order");
    let leftovers: Vec<_> = std::fs::read_dir(h.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary archive file left behind");
    let j = h.status()["event_journal"].clone();
    assert_eq!((j["retained_event_count"].clone(), j["archived_event_count"].clone()), (json!(0), json!(30)));
    let first = h.inspect(&event_id("F0", 1));
    assert!(first["archived_at"].is_string() && first["envelope"].is_object(), "archived keeps the payload: {first:#}");

    // Re-import: every event already present.
    let again = h.json(&["emit", "--jsonl", out_arg]);
    assert_eq!((again["captured"].clone(), again["already_present"].clone()), (json!(0), json!(30)));
    // Nothing new to archive: the existing file is left alone.
    let archive_bytes = std::fs::read(&out).unwrap();
    assert_eq!(h.json(&["archive", "--out", out_arg])["archived"], 0);
    assert_eq!(std::fs::read(&out).unwrap(), archive_bytes);

    let (dry_text, dry) = h.json_text(0, &["gc", "--dry-run"]);
    assert_eq!(keys(&dry), sorted(&GC_KEYS));
    assert_eq!(
        (dry["purged"].clone(), dry["purged_bytes"].clone(), dry["kept"].clone()),
        (json!(30), json!(payload_bytes), json!(0))
    );
    snapshot!(&h, "gc_dry_run_json", dry_text);
    let (doc_text, doc) = h.json_text(0, &["gc"]);
    assert_eq!(keys(&doc), sorted(&GC_KEYS));
    assert_eq!(
        (doc["dry_run"].clone(), doc["purged"].clone(), doc["kept"].clone()),
        (json!(false), json!(30), json!(0))
    );
    assert_eq!(doc["store_bytes_after"], h.store_bytes());
    snapshot!(&h, "gc_json", doc_text);

    // After gc purged the payloads the archive still re-imports as already present.
    let again = h.json(&["emit", "--jsonl", out_arg]);
    assert_eq!((again["captured"].clone(), again["already_present"].clone()), (json!(0), json!(30)));
    let first = h.inspect(&event_id("F0", 1));
    assert_eq!((first["purged"].clone(), first["envelope"].clone()), (json!(true), Value::Null));

    // The default location, under event-sync/archive/.
    h.emit_lines(&envelopes("F0", 31..36, "Archived", 10));
    h.drain(0, &[]);
    let (doc_text, doc) = h.json_text(0, &["archive"]);
    assert_eq!(doc["archived"], 5);
    let path = doc["out"].as_str().unwrap();
    assert!(path.starts_with(h.home.join("event-sync/archive/archive-").to_str().unwrap()), "{path}");
    assert!(path.ends_with(".jsonl.gz"));
    assert_eq!(gunzip_lines(Path::new(path)).len(), 5);
    snapshot!(&h, "archive_default_path_json", doc_text);
    // The first gc switched the store to incremental auto-vacuum; this one reclaims that way.
    let size = h.store_bytes();
    let human = h.ok(&["gc"]);
    assert!(human.contains("Purged payloads of 5 event(s)"), "{human}");
    assert!(h.store_bytes() <= size);
    assert_store_sound(&h);
    assert_eq!(h.status()["event_journal"]["purged_event_count"], 35);
}

/// The store passes SQLite's integrity check and is in incremental auto-vacuum mode after gc.
fn assert_store_sound(h: &TestHome) {
    let conn = rusqlite::Connection::open(h.store_path()).unwrap();
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
    let mode: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, 2, "incremental auto-vacuum");
}

/// An archive path that cannot be written, or that already exists: an error with a hint, and
/// nothing is marked archived.
#[test]
fn archive_refuses_unwritable_or_existing_out() {
    let h = TestHome::new();
    let r = ReceiverProcess::start(h.dir.path(), "r", &[]);
    h.mode_external(&r);
    h.emit_lines(&envelopes("G0", 1..4, "T", 20));
    h.drain(0, &[]);
    let blocker = h.path("not-a-dir");
    std::fs::write(&blocker, "x").unwrap();
    for out in [blocker.join("a.jsonl.gz"), h.path("missing-dir/a.jsonl.gz")] {
        let result = h.run(&["archive", "--out", out.to_str().unwrap()]);
        assert_ne!(result.status.code(), Some(0), "{out:?}");
        let err = text(&result.stderr);
        assert!(err.contains("error:") && err.contains("hint:"), "{err}");
        assert_eq!(h.status()["event_journal"]["archived_event_count"], 0);
    }
    let existing = h.path("precious.jsonl.gz");
    std::fs::write(&existing, "keep me").unwrap();
    let result = h.run(&["archive", "--out", existing.to_str().unwrap(), "--json"]);
    assert_eq!(result.status.code(), Some(2));
    let err = text(&result.stderr);
    assert!(err.contains("already exists") && err.contains("hint:"), "{err}");
    // --json: stdout still holds exactly one document, the error.
    let doc: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    assert_eq!(doc["error"]["exit_code"], 2);
    assert_eq!(std::fs::read_to_string(&existing).unwrap(), "keep me");
    assert_eq!(h.status()["event_journal"]["archived_event_count"], 0);
    // --older-than selects by capture time: the three are older than 1s, the new two are not.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    h.emit_lines(&envelopes("G0", 4..6, "T", 20));
    h.drain(0, &[]);
    let ok = h.path("ok.jsonl.gz");
    let doc = h.json(&["archive", "--older-than", "1s", "--out", ok.to_str().unwrap()]);
    assert_eq!(doc["archived"], 3);
    assert_eq!(gunzip_lines(&ok).len(), 3);
    let j = h.status()["event_journal"].clone();
    assert_eq!((j["archived_event_count"].clone(), j["retained_event_count"].clone()), (json!(3), json!(2)));
}

/// No target known yet: nothing is delivered anywhere, so nothing is archived or purged, and
/// the commands say why.
#[test]
fn nothing_to_do_without_a_known_target() {
    let h = TestHome::new();
    h.write_config("[event_sync]\nmode = \"local-retention\"\n");
    h.emit_lines(&envelopes("H0", 1..4, "T", 20));
    assert_eq!(h.run(&["now"]).status.code(), Some(0));
    let size = h.store_bytes();
    let (doc, err) = json_and_stderr(&h, &["archive"]);
    assert_eq!(doc, json!({"dry_run": false, "archived": 0, "out": null, "bytes": 0}));
    assert!(err.contains("no delivery target"), "{err}");
    let (doc, err) = json_and_stderr(&h, &["gc"]);
    assert_eq!(keys(&doc), sorted(&GC_KEYS));
    assert_eq!((doc["purged"].clone(), doc["kept"].clone()), (json!(0), json!(3)));
    assert!(err.contains("no delivery target"), "{err}");
    assert!(h.ok(&["archive"]).contains("Nothing archived: no delivery target"));
    assert!(h.ok(&["gc"]).contains("Nothing purged: no delivery target"));
    assert_eq!(h.store_bytes(), size);
    assert_eq!(h.status()["event_journal"]["retained_event_count"], 3);
    // A home without a journal: a usage error, and still nothing created.
    let empty = TestHome::new();
    for args in [&["gc"][..], &["archive"]] {
        let out = empty.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(text(&out.stderr).contains("hint:"));
    }
    assert!(!empty.home.exists());
}

/// The configured target counts as known before its first drain: switching targets never
/// archives or purges events the new target has not received.
#[test]
fn a_new_current_target_protects_its_undelivered_events() {
    let h = TestHome::new();
    let a = ReceiverProcess::start(h.dir.path(), "a", &[]);
    let b = ReceiverProcess::start(h.dir.path(), "b", &[]);
    let c = ReceiverProcess::start(h.dir.path(), "c", &[]);
    h.mode_external(&a);
    h.emit_lines(&envelopes("M0", 1..11, "T", 20));
    h.drain(0, &[]);
    h.mode_external(&b);
    let (doc, err) = json_and_stderr(&h, &["archive"]);
    assert_eq!(doc["archived"], 0);
    assert!(err.contains("current target") && err.contains(&b.url), "{err}");
    let (doc, err) = json_and_stderr(&h, &["gc"]);
    assert_eq!((doc["purged"].clone(), doc["kept"].clone()), (json!(0), json!(10)));
    assert!(err.contains("current target"), "{err}");
    assert_eq!(h.json(&["gc", "--dry-run"])["purged"], 0);

    assert_eq!(h.drain(0, &[])["delivered"], 10, "B still receives every event");
    assert_eq!(b.stored_ids().len(), 10);
    assert_eq!(h.json(&["archive", "--out", h.path("b.jsonl.gz").to_str().unwrap()])["archived"], 10);
    // Archived events are in a file: gc may purge them even before C's first drain.
    h.mode_external(&c);
    let doc = h.json(&["gc"]);
    assert_eq!((doc["purged"].clone(), doc["kept"].clone()), (json!(10), json!(0)));
}

#[test]
fn gc_purges_payloads_keeps_history_and_shrinks_the_store() {
    let h = TestHome::new();
    let r = ReceiverProcess::start(h.dir.path(), "r", &["--reject-type", "Keep"]);
    h.mode_external(&r);
    let mut lines = envelopes("J0", 1..41, "Blob", 100_000);
    let purgeable: usize = lines.iter().map(String::len).sum();
    let keep = envelopes("J0", 41..42, "Keep", 20).remove(0);
    lines.push(keep.clone());
    h.emit_lines(&lines);
    let report = h.drain(4, &["--batch-bytes", "4000000"]);
    assert_eq!((report["delivered"].clone(), report["rejected"].clone()), (json!(40), json!(1)));

    let id = event_id("J0", 7);
    let before_inspect = h.inspect(&id);
    assert!(before_inspect["envelope"].is_object());
    let size_before = h.store_bytes();
    let tree_before = tree(&h.home);
    let dry = h.json(&["gc", "--dry-run"]);
    assert_eq!(
        dry,
        json!({"dry_run": true, "purged": 40, "purged_bytes": purgeable, "kept": 1,
               "store_bytes_before": size_before, "store_bytes_after": size_before})
    );
    assert_eq!(tree(&h.home), tree_before, "gc --dry-run changed the home");

    let doc = h.json(&["gc"]);
    assert_eq!(keys(&doc), sorted(&GC_KEYS));
    assert_eq!(
        (doc["dry_run"].clone(), doc["purged"].clone(), doc["purged_bytes"].clone(), doc["kept"].clone()),
        (json!(false), json!(40), json!(purgeable), json!(1))
    );
    let size_after = h.store_bytes();
    assert_eq!(doc["store_bytes_before"], size_before);
    assert_eq!(doc["store_bytes_after"], size_after);
    assert!(size_after + 3_000_000 < size_before, "store file did not shrink: {size_before} → {size_after}");
    assert_store_sound(&h);

    // Identity, hash, size, capture time and every ledger row and attempt are kept.
    let after = h.inspect(&id);
    assert_eq!((after["purged"].clone(), after["envelope"].clone()), (json!(true), Value::Null));
    for key in ["event_id", "event_type", "payload_sha256", "payload_bytes", "captured_at", "targets"] {
        assert_eq!(after[key], before_inspect[key], "{key}");
    }
    assert_eq!(after["targets"][0]["status"], "success");
    assert_eq!(after["targets"][0]["attempts"].as_array().unwrap().len(), 1);
    let s = h.status();
    let j = &s["event_journal"];
    assert_eq!((j["retained_event_count"].clone(), j["purged_event_count"].clone()), (json!(1), json!(40)));
    assert_eq!(j["journal_size_bytes"], keep.len());
    assert_eq!(s["delivery_ledger"]["delivered_current_target"], 40);
    assert_eq!(s["delivery_ledger"]["rejected"], 1);
    let (again, err) = json_and_stderr(&h, &["gc"]);
    assert_eq!((again["purged"].clone(), again["kept"].clone()), (json!(0), json!(1)));
    assert!(err.contains("Nothing purged"), "{err}");

    // A purged event is never selected for delivery again.
    let fresh = ReceiverProcess::start(h.dir.path(), "fresh", &[]);
    h.mode_external(&fresh);
    let report = h.drain(0, &[]);
    assert_eq!((report["selected"].clone(), report["delivered"].clone()), (json!(1), json!(1)));
    assert_eq!(fresh.stored_ids(), vec![event_id("J0", 41)]);
}

/// gc (and archive) need the drain lock: exit 5 while a drain runs, or wait with --wait.
#[test]
fn gc_is_busy_during_a_drain_or_waits() {
    let h = TestHome::new();
    let slow = ReceiverProcess::start(h.dir.path(), "slow", &["--delay-ms", "3000"]);
    h.mode_external(&slow);
    h.emit_lines(&envelopes("K0", 1..4, "T", 20));
    let mut drain =
        h.cmd(&["now", "--json", "--wait", "30"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // The drain takes the lock first thing; then it waits for the slow receiver.
    let started = Instant::now();
    let mut busy = None;
    while started.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(300));
        let out = h.run(&["gc", "--json"]);
        if out.status.code() == Some(5) {
            busy = Some(out);
            break;
        }
    }
    let busy = busy.expect("gc never saw the drain's lock");
    let err = text(&busy.stderr);
    assert!(err.contains("error:") && err.contains("hint:") && err.contains("--wait"), "{err}");
    let doc: serde_json::Value = serde_json::from_slice(&busy.stdout).unwrap();
    assert_eq!(doc["error"]["exit_code"], 5);
    assert_eq!(h.run(&["archive"]).status.code(), Some(5));
    assert_eq!(h.status()["event_journal"]["purged_event_count"], 0);

    let doc = h.json(&["gc", "--wait", "60"]);
    assert_eq!(doc["purged"], 3, "gc waited for the drain, then purged what it delivered");
    let status = drain.wait().unwrap();
    assert!(status.success());
    let mut stdout = String::new();
    drain.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap()["delivered"], 3);
}
