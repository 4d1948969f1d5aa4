//! Retention benchmark (plain main; prints numbers that can be compared run to run):
//! a 1,000,000-event journal with 3 targets that have all received every event, then
//! 1. `kitty-sync status --json` through the release binary (median of 5; target ≤ 200 ms);
//! 2. `kitty-sync gc` purging every payload and reclaiming the space (target ≤ 10 s).
//!
//! The store is built through the engine's own schema in one transaction: the same columns the
//! journal (`event_journal::insert_row`) and the dispatcher (`UPSERT_LEDGER`, attempts) write,
//! with the counter triggers set aside during the bulk insert and the counters then rebuilt by
//! `store::stats::rebuild` (the same numbers the triggers keep; a proptest checks that).
//!
//! Both are measured on a store as `Store::open` creates it today and on one in incremental
//! auto-vacuum mode (see `run`).
//!
//! Run: `cargo bench -p kitty-sync-cli --bench retention` (add `-- --quick` for 100,000 events,
//! `-- --build-only` to build one store, keep it and print its path, for profiling).

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kitty_sync::delivery::receiver::{ExternalReceiver, HttpClient, Receiver};
use kitty_sync::delivery::target;
use kitty_sync::envelope::sha256_hex;
use kitty_sync::home::Home;
use kitty_sync::store::{Store, stats};
use rusqlite::params;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_kitty-sync");
const TARGETS: usize = 3;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let build_only = std::env::args().any(|a| a == "--build-only");
    let n: i64 = if quick { 100_000 } else { 1_000_000 };
    run(n, false, build_only);
    if !build_only {
        run(n, true, false);
    }
}

/// One store, as `Store::open` creates it (`incremental` false: its first gc includes a full
/// VACUUM that switches it to incremental auto-vacuum) or already in incremental auto-vacuum
/// mode (every store after its first gc; what a new store would be if `Store::open` set
/// `auto_vacuum = INCREMENTAL` before creating the schema).
fn run(n: i64, incremental: bool, build_only: bool) {
    let label = if incremental { "incremental auto-vacuum store" } else { "store as created today" };
    println!("--- {label}");
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");

    let started = Instant::now();
    build_store(&home, n, incremental);
    let store_path = home.join("event-sync").join("kitty-sync.db");
    println!(
        "built a {n}-event store with {TARGETS} targets fully delivered in {:.1} s ({} MB)",
        started.elapsed().as_secs_f64(),
        file_bytes(&store_path) / 1_000_000
    );
    if build_only {
        // For profiling (EXPLAIN QUERY PLAN, repeated runs): keep the home and stop here.
        println!("kept the home at {}", dir.keep().join("home").display());
        return;
    }

    let status = json(&home, &["status", "--json"]);
    assert_eq!(status["event_journal"]["retained_event_count"], n, "{status:#}");
    assert_eq!(status["delivery_ledger"]["delivered_current_target"], n);
    assert_eq!(status["delivery_ledger"]["undelivered_current_target"], 0);
    assert_eq!(status["delivery_targets"]["previous"].as_array().map(Vec::len), Some(TARGETS - 1));
    println!(
        "status --json ({n} events, {TARGETS} targets, gc_suggested {}): median of 5 {:.1} ms (target ≤ 200 ms)",
        status["event_journal"]["gc_suggested"],
        median_ms(&home, &["status", "--json"], 5)
    );
    println!("status (human): median of 5 {:.1} ms", median_ms(&home, &["status"], 5));

    let dry = time(|| {
        json(&home, &["gc", "--dry-run", "--json"]);
    });
    println!("gc --dry-run: {:.0} ms", ms(dry));
    let before = file_bytes(&store_path);
    let mut report = Value::Null;
    let gc = time(|| report = json(&home, &["gc", "--json"]));
    assert_eq!(report["purged"], n, "{report:#}");
    let after = file_bytes(&store_path);
    println!(
        "gc ({n} delivered events): {:.2} s (target ≤ 10 s); purged {} payload bytes; store file {} MB → {} MB",
        gc.as_secs_f64(),
        report["purged_bytes"],
        before / 1_000_000,
        after / 1_000_000
    );
    println!("status --json after gc: median of 5 {:.1} ms", median_ms(&home, &["status", "--json"], 5));
}

/// Three external targets; the first is the configured one.
fn endpoints() -> Vec<String> {
    (1..=TARGETS).map(|t| format!("http://127.0.0.1:9/t{t}/api/v1/events/batch/")).collect()
}

fn build_store(home: &Path, n: i64, incremental: bool) {
    let endpoints = endpoints();
    std::fs::create_dir_all(home.join("event-sync")).expect("home");
    if incremental {
        // auto_vacuum can only be chosen before the first table exists.
        let conn = rusqlite::Connection::open(home.join("event-sync").join("kitty-sync.db")).expect("db");
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode = WAL;").expect("auto_vacuum");
    }
    std::fs::write(
        home.join("config.toml"),
        format!("[event_sync]\nmode = \"external_receiver\"\nexternal_endpoint = \"{}\"\n", endpoints[0]),
    )
    .expect("config");
    // The store is created by the engine; the bulk fill goes through a connection of the
    // benchmark's own (the engine keeps its connection to itself).
    let home_dir = Home::at(home);
    drop(Store::open(&home_dir).expect("store"));
    let mut raw = rusqlite::Connection::open(home_dir.store_path()).expect("store connection");
    let now = kitty_sync::clock::now_ms();
    let mut targets = Vec::new();
    for endpoint in &endpoints {
        let receiver =
            ExternalReceiver::new(Some(endpoint), None, HttpClient::new(Duration::from_secs(1))).expect("endpoint");
        targets.push(target::register(&raw, receiver.identity(), now).expect("target"));
    }
    let conn = &mut raw;
    conn.execute_batch("PRAGMA synchronous=OFF").expect("pragma");
    // The counter triggers fire per row; set them aside, bulk insert, then rebuild the counters.
    let triggers: Vec<(String, String)> = {
        let mut stmt = conn.prepare("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").expect("triggers");
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).expect("triggers").map(|r| r.expect("trigger")).collect()
    };
    let tx = conn.transaction().expect("tx");
    for (name, _) in &triggers {
        tx.execute_batch(&format!("DROP TRIGGER \"{name}\"")).expect("drop trigger");
    }
    {
        let mut event = tx
            .prepare(
                "INSERT INTO events (seq, event_id, event_type, payload_bytes, captured_at, payload_sha256, capture_team,
                                     drain_blocked_reason, coalesce_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, NULL, NULL)",
            )
            .expect("prepare");
        let mut payload = tx.prepare("INSERT INTO payloads (seq, envelope) VALUES (?1, ?2)").expect("prepare");
        let filler = "x".repeat(180);
        for seq in 1..=n {
            let id = format!("01J{seq:023}");
            let envelope = format!(
                r#"{{"event_id":"{id}","event_type":"BenchEvent","aggregate_id":"agg-{}","payload":{{"n":{seq},"text":"{filler}"}},"timestamp":"2026-11-24T00:00:00Z"}}"#,
                seq % 97
            );
            let sha = unhex(&sha256_hex(envelope.as_bytes()));
            let captured_at = now - (n - seq);
            event
                .execute(params![seq, id, "BenchEvent", envelope.len() as i64, captured_at, sha])
                .expect("insert event");
            payload.execute(params![seq, envelope.as_bytes()]).expect("insert payload");
        }
    }
    for record in &targets {
        // The rows a successful drain writes: UPSERT_LEDGER's columns and one attempt each.
        tx.execute(
            "INSERT INTO ledger (target, epoch, seq, status, attempt_count, reject_count, first_attempted_at,
                                 last_attempted_at, completed_at, last_http_status, last_error)
             SELECT ?1, ?2, seq, 'success', 1, 0, ?3, ?3, ?3, 200, NULL FROM events ORDER BY seq",
            params![record.id, record.epoch, now],
        )
        .expect("ledger");
        tx.execute(
            "INSERT INTO attempts (target, epoch, seq, at, outcome, http_status, error)
             SELECT ?1, ?2, seq, ?3, 'success', 200, NULL FROM events ORDER BY seq",
            params![record.id, record.epoch, now],
        )
        .expect("attempts");
        // The settled high-water mark a completed drain leaves.
        tx.execute("UPDATE targets SET due_from_seq = ?2 WHERE id = ?1", params![record.id, n + 1]).expect("mark");
    }
    for (_, sql) in &triggers {
        tx.execute_batch(sql).expect("recreate trigger");
    }
    stats::rebuild(&tx).expect("rebuild counters");
    tx.commit().expect("commit");
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").expect("checkpoint");
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex")).collect()
}

fn command(home: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("SPEC_KITTY_SAAS_URL")
        .env_remove("SPEC_KITTY_ENABLE_SAAS_SYNC")
        .env_remove("SPEC_KITTY_HOME")
        .output()
        .expect("run kitty-sync")
}

fn json(home: &Path, args: &[&str]) -> Value {
    let out = command(home, args);
    assert!(out.status.success(), "kitty-sync {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("json")
}

fn file_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn time(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median_ms(home: &Path, args: &[&str], runs: usize) -> f64 {
    let mut samples: Vec<f64> = (0..runs)
        .map(|_| {
            ms(time(|| {
                let out = command(home, args);
                assert!(out.status.success(), "kitty-sync {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }))
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[runs / 2]
}
