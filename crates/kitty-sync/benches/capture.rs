//! Capture benchmark (plain `main`, `harness = false`): prints numbers that can be compared run
//! to run. `cargo bench -p kitty-sync --bench capture` (release build; every run uses a fresh
//! store in a temporary directory on the same disk as `$TMPDIR`).
//!
//! (a) single-event `Journal::append`, each call one durable commit (`synchronous=FULL`);
//! (b) `Journal::import` of 100,000 generated small events and of 25,000 real-looking events
//!     (the real fixture lines cycled with fresh ULIDs);
//! (c) `Journal::import` of the 953 real events;
//! (d) `emits`: the engine-level equivalent of that many `kitty-sync emit` processes: each
//!     iteration opens the store, appends one event and closes it, so (as with a new
//!     process) no connection survives from one event to the next; prints events/s and the
//!     WAL size at the end, which must stay bounded (≤ 8 MB for 10,000 emits).
//!
//! Environment: `CAPTURE_BENCH_APPENDS` (default 500) sets how many single appends to time;
//! `CAPTURE_BENCH_EMITS` (default 10,000) how many open-append-close rounds;
//! `KITTY_SYNC_REAL_EVENTS` points at another directory of `*.jsonl` files.

use std::io::BufReader;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kitty_sync::event_journal::{CapturePolicy, ImportOptions, ImportReport, Journal, NewEvent};
use kitty_sync::home::Home;
use kitty_sync::store::Store;

fn main() {
    // `cargo bench` passes `--bench`; other arguments select parts: append, small, real25k, real.
    let parts: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let wanted = |name: &str| parts.is_empty() || parts.iter().any(|p| p == name);
    let appends: usize = std::env::var("CAPTURE_BENCH_APPENDS").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    println!("kitty-sync capture benchmark ({} build)", if cfg!(debug_assertions) { "debug" } else { "release" });
    // Durable commits wait for the disk: on a shared machine, I/O pressure explains most of
    // the run-to-run spread, so it is printed next to the numbers.
    print_io_pressure("before");
    if wanted("append") {
        bench_append(appends);
    }
    if wanted("emits") {
        let emits = std::env::var("CAPTURE_BENCH_EMITS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
        bench_emits(emits);
    }
    if wanted("small") {
        bench_import("generated small events", &small_events(100_000), None);
    }
    let real = real_lines();
    if real.is_empty() {
        println!("real events: no fixture found (set KITTY_SYNC_REAL_EVENTS)");
        return;
    }
    if wanted("real25k") {
        bench_import("real-looking events (fixture lines, fresh ids)", &cycled(&real, 25_000), Some("WPStatusChanged"));
    }
    if wanted("real") {
        bench_import("real events (fixture as is)", &real.concat(), Some("WPStatusChanged"));
    }
    print_io_pressure("after");
}

/// Linux pressure-stall information for I/O (`some avg10` = % of the last 10 s in which some
/// task waited for I/O); silent where unavailable.
fn print_io_pressure(when: &str) {
    if let Ok(text) = std::fs::read_to_string("/proc/pressure/io")
        && let Some(line) = text.lines().next()
    {
        println!("I/O pressure {when}: {line}");
    }
}

fn fresh_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&Home::at(dir.path())).expect("open store");
    (dir, store)
}

fn bench_append(n: usize) {
    let (_dir, mut store) = fresh_store();
    let mut journal = Journal::new(&mut store, CapturePolicy::default());
    let mut latencies = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let event = sample_event(i);
        let t = Instant::now();
        journal.append(event).expect("append");
        latencies.push(t.elapsed());
    }
    let total = start.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "append (durable commit each): {n} events in {} → {:.0} events/s; latency median {} p90 {} p99 {} max {}",
        ms(total),
        n as f64 / total.as_secs_f64(),
        ms(pct(0.5)),
        ms(pct(0.9)),
        ms(pct(0.99)),
        ms(pct(1.0)),
    );
}

fn sample_event(i: usize) -> NewEvent {
    NewEvent {
        event_type: "WPStatusChanged".into(),
        aggregate_id: Some(format!("WP{:02}", i % 40)),
        aggregate_type: Some("WorkPackage".into()),
        payload: Some(serde_json::json!({"from_lane": "doing", "to_lane": "for_review", "n": i})),
        ..Default::default()
    }
}

/// What `emit` does per process, `n` times: open, append one event durably, close.
fn bench_emits(n: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = Home::at(dir.path());
    drop(Store::open(&home).expect("open store"));
    let wal = PathBuf::from(format!("{}-wal", home.store_path().display()));
    let (mut max_wal, start) = (0, Instant::now());
    for i in 0..n {
        let mut store = Store::open(&home).expect("open store");
        Journal::new(&mut store, CapturePolicy::default()).append(sample_event(i)).expect("append");
        drop(store);
        max_wal = max_wal.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
    }
    let total = start.elapsed();
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len() as f64 / 1e6).unwrap_or(0.0);
    println!(
        "emits (open, append, close): {n} in {} → {:.0} emits/s; WAL at the end {:.2} MB (largest {:.2} MB), database {:.2} MB",
        ms(total),
        n as f64 / total.as_secs_f64(),
        size(&wal),
        max_wal as f64 / 1e6,
        size(&home.store_path()),
    );
}

fn bench_import(label: &str, input: &[u8], default_type: Option<&str>) {
    let (dir, mut store) = fresh_store();
    // Read from a file as `emit --jsonl FILE` does, not from memory.
    let file = dir.path().join("input.jsonl");
    std::fs::write(&file, input).expect("write input");
    let options = ImportOptions { default_type: default_type.map(str::to_string), skip_invalid: false };
    let run = |store: &mut Store| -> (ImportReport, Duration, Option<Duration>) {
        let mut journal = Journal::new(store, CapturePolicy::default());
        let (t, cpu) = (Instant::now(), cpu_time());
        let mut reader = BufReader::with_capacity(256 * 1024, std::fs::File::open(&file).expect("open input"));
        let report = journal.import(&mut reader, &options, &mut |_| {}).expect("import");
        (report, t.elapsed(), cpu_time().zip(cpu).map(|(after, before)| after.saturating_sub(before)))
    };
    let (first, took, cpu) = run(&mut store);
    assert!(first.invalid.is_empty(), "{label}: {:?}", &first.invalid[..first.invalid.len().min(3)]);
    let (again, took_again, _) = run(&mut store);
    assert_eq!(again.already_present, first.captured, "{label}: re-import must be all already_present");
    let mb = input.len() as f64 / 1e6;
    let cpu = cpu.map(|c| format!(" (CPU {})", ms(c))).unwrap_or_default();
    println!(
        "import {label}: {} events, {mb:.1} MB in {}{cpu} → {:.0} events/s, {:.1} MB/s; re-import (all already present) {} → {:.0} events/s; store {:.1} MB",
        first.captured,
        ms(took),
        first.captured as f64 / took.as_secs_f64(),
        mb / took.as_secs_f64(),
        ms(took_again),
        again.already_present as f64 / took_again.as_secs_f64(),
        store.file_bytes() as f64 / 1e6,
    );
}

/// User + system CPU time of this process (Linux `/proc/self/stat`, 100 Hz ticks), so runs on
/// a busy machine can be told apart from slow code: wall time minus CPU time is waiting
/// (mostly for the disk's fsync).
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Small events like a hook would emit, with time-ordered ULIDs as producers generate them.
fn small_events(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 120);
    for i in 0..n {
        let line = format!(
            "{{\"event_id\":\"{}\",\"event_type\":\"WPStatusChanged\",\"aggregate_id\":\"WP{:02}\",\"payload\":{{\"to_lane\":\"done\",\"n\":{i}}}}}\n",
            ulid::Ulid::generate(),
            i % 40
        );
        out.extend_from_slice(line.as_bytes());
    }
    out
}

fn real_dir() -> PathBuf {
    std::env::var_os("KITTY_SYNC_REAL_EVENTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/real-events"))
}

/// Every line (with its `\n`) of the real fixture files, in file-name order.
fn real_lines() -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(real_dir()) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    let mut lines = Vec::new();
    for file in files {
        let bytes = std::fs::read(&file).expect("read fixture");
        lines.extend(bytes.split_inclusive(|b| *b == b'\n').map(<[u8]>::to_vec));
    }
    lines
}

/// `n` lines cycling through the real ones, each with its `event_id` value replaced by a fresh
/// ULID (same length, so every other byte is the real data).
fn cycled(real: &[Vec<u8>], n: usize) -> Vec<u8> {
    const KEY: &[u8] = b"\"event_id\": \"";
    let mut out = Vec::new();
    for line in real.iter().cycle().take(n) {
        let mut line = line.clone();
        if let Some(at) = line.windows(KEY.len()).position(|w| w == KEY) {
            let start = at + KEY.len();
            line[start..start + 26].copy_from_slice(ulid::Ulid::generate().to_string().as_bytes());
        }
        if !line.ends_with(b"\n") {
            line.push(b'\n');
        }
        out.extend_from_slice(&line);
    }
    out
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}
