//! Delivery benchmark (plain main; prints numbers that can be compared run to run):
//! 1. `kitty-sync now` draining 100,000 ~500-byte events to the built-in receiver on loopback,
//!    end to end through the release binary (wall time, peak RSS);
//! 2. the same journal re-drained to a second and then a third receiver after the first holds
//!    everything (a new target must cost what the first did, not grow with the ledger);
//! 3. `now` when everything is already delivered, at 100,000 and at 1,000,000 events.
//!
//! 4. fan-out (contract §9): the same 100,000 events to three receivers at once against one
//!    (≤ 2×); one of three targets refusing connections; a no-op `now` with 5 targets on
//!    1,000,000 events (≤ 50 ms).
//!
//! Run: `cargo bench -p kitty-sync-cli --bench drain` (add `-- --quick` for 20k / 200k,
//! `-- --fanout` for part 4 alone).

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kitty_sync::delivery::receiver::{ExternalReceiver, HttpClient, Receiver};
use kitty_sync::delivery::target;
use kitty_sync::home::Home;
use kitty_sync::store::Store;
use kitty_sync_receiver::{ReceiverStore, RunningServer, ServerConfig, SqliteStore};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_kitty-sync");

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (drain_n, big_n) = if quick { (20_000, 200_000) } else { (100_000, 1_000_000) };
    if std::env::args().any(|a| a == "--fanout") {
        return fanout(drain_n, big_n);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let receivers: Vec<BenchReceiver> =
        ["a", "b", "c"].iter().map(|name| BenchReceiver::start(dir.path(), name)).collect();

    let home = dir.path().join("home");
    let jsonl = dir.path().join("events.jsonl");
    write_events(&jsonl, drain_n, 0);
    let import = time(|| run(&home, &["emit", "--jsonl", path(&jsonl), "-q"]));
    println!("emit --jsonl {drain_n} events ({} MB): {:.0} ms", file_mb(&jsonl), ms(import));

    let mut first_wall = None;
    for (i, receiver) in receivers.iter().enumerate() {
        run(&home, &["mode", "external-receiver", "--endpoint", &receiver.endpoint, "-q"]);
        let (wall, rss_kb) = timed_with_rss(&home, &["now", "-q"]);
        let held = receiver.store.stats().expect("stats").event_count;
        let ratio =
            first_wall.map(|first: Duration| format!(", {:.2}x the first", wall.as_secs_f64() / first.as_secs_f64()));
        println!(
            "now → target {} ({}): drained {drain_n} events in {:.0} ms ({:.0} events/s{}), peak RSS {} MB; receiver holds {held}",
            i + 1,
            ["first", "second, the first holds everything", "third"][i],
            ms(wall),
            drain_n as f64 / wall.as_secs_f64(),
            ratio.unwrap_or_default(),
            rss_kb / 1024
        );
        assert_eq!(held, drain_n as u64, "every event delivered");
        first_wall.get_or_insert(wall);
    }
    let endpoint = receivers[2].endpoint.clone();
    println!("now (already delivered, {drain_n} events): median {:.1} ms", median_ms(&home, &["now", "-q"], 7));

    write_events(&jsonl, big_n - drain_n, drain_n);
    let import = time(|| run(&home, &["emit", "--jsonl", path(&jsonl), "-q"]));
    println!("emit --jsonl {} more events: {:.0} ms", big_n - drain_n, ms(import));
    mark_delivered_directly(&home, &endpoint);
    let first = time(|| run(&home, &["now", "-q"]));
    println!("now (first no-op drain after a direct ledger fill, {big_n} events): {:.0} ms", ms(first));
    println!("now (already delivered, {big_n} events): median {:.1} ms", median_ms(&home, &["now", "-q"], 7));
    println!(
        "status --json ({big_n} events, 1 target): median {:.1} ms",
        median_ms(&home, &["status", "--json", "-q"], 5)
    );
    drop(receivers);
    fanout(drain_n, big_n);
}

/// Fan-out (contract §9): one target vs three at once; one of three refusing connections;
/// a no-op `now` with 5 targets on the big journal.
fn fanout(drain_n: usize, big_n: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let jsonl = dir.path().join("events.jsonl");
    write_events(&jsonl, drain_n, 0);

    // 1. One target, then three at once.
    let one = BenchReceiver::start(dir.path(), "one");
    let single = dir.path().join("single");
    run(&single, &["emit", "--jsonl", path(&jsonl), "-q"]);
    run(&single, &["mode", "external-receiver", "--endpoint", &one.endpoint, "-q"]);
    let alone = time(|| run(&single, &["now", "-q"]));
    println!("now → 1 target: {drain_n} events in {:.0} ms", ms(alone));

    let three: Vec<BenchReceiver> = ["a", "b", "c"].iter().map(|n| BenchReceiver::start(dir.path(), n)).collect();
    let fan = dir.path().join("fan");
    run(&fan, &["emit", "--jsonl", path(&jsonl), "-q"]);
    run(&fan, &["mode", "external-receiver", "--endpoint", &three[0].endpoint, "-q"]);
    run(&fan, &["target", "add", "b", "--endpoint", &three[1].endpoint, "-q"]);
    run(&fan, &["target", "add", "c", "--endpoint", &three[2].endpoint, "-q"]);
    let (wall, report) = now_json(&fan, &[]);
    println!(
        "now → 3 targets at once: {drain_n} events each in {:.0} ms ({:.2}x the single target; per target {})",
        ms(wall),
        wall.as_secs_f64() / alone.as_secs_f64(),
        per_target(&report)
    );
    for r in &three {
        assert_eq!(r.store.stats().expect("stats").event_count, drain_n as u64, "every event delivered");
    }

    // 2. One of three refusing connections.
    let pair: Vec<BenchReceiver> = ["d", "e"].iter().map(|n| BenchReceiver::start(dir.path(), n)).collect();
    let two = dir.path().join("two");
    run(&two, &["emit", "--jsonl", path(&jsonl), "-q"]);
    run(&two, &["mode", "external-receiver", "--endpoint", &pair[0].endpoint, "-q"]);
    run(&two, &["target", "add", "e", "--endpoint", &pair[1].endpoint, "-q"]);
    let (pair_wall, pair_report) = now_json(&two, &[]);
    println!("now → 2 targets: {:.0} ms (per target {})", ms(pair_wall), per_target(&pair_report));
    let pair2: Vec<BenchReceiver> = ["f", "g"].iter().map(|n| BenchReceiver::start(dir.path(), n)).collect();
    let down = dir.path().join("down");
    run(&down, &["emit", "--jsonl", path(&jsonl), "-q"]);
    run(&down, &["mode", "external-receiver", "--endpoint", &pair2[0].endpoint, "-q"]);
    run(&down, &["target", "add", "g", "--endpoint", &pair2[1].endpoint, "-q"]);
    run(&down, &["target", "add", "down", "--endpoint", &closed_endpoint(), "-q"]);
    let (down_wall, down_report) = now_json(&down, &[]);
    println!(
        "now → same 2 targets + 1 refusing connections (default --retries 3): {:.0} ms overall (per target {})",
        ms(down_wall),
        per_target(&down_report)
    );

    // 3. No-op with 5 targets on a big journal.
    let five: Vec<BenchReceiver> =
        ["p", "q", "r", "s", "t"].iter().map(|n| BenchReceiver::start(dir.path(), n)).collect();
    let big = dir.path().join("big");
    write_events(&jsonl, big_n, 0);
    run(&big, &["emit", "--jsonl", path(&jsonl), "-q"]);
    run(&big, &["mode", "external-receiver", "--endpoint", &five[0].endpoint, "-q"]);
    for (i, r) in five.iter().enumerate().skip(1) {
        run(&big, &["target", "add", &format!("t{i}"), "--endpoint", &r.endpoint, "-q"]);
    }
    for r in &five {
        mark_delivered_directly(&big, &r.endpoint);
    }
    let first = time(|| run(&big, &["now", "-q"]));
    println!("now (first no-op after a direct ledger fill, {big_n} events, 5 targets): {:.0} ms", ms(first));
    println!("now (already delivered, {big_n} events, 5 targets): median {:.1} ms", median_ms(&big, &["now", "-q"], 7));
}

/// A built-in receiver in this process, on loopback.
struct BenchReceiver {
    _server: RunningServer,
    store: Arc<SqliteStore>,
    endpoint: String,
}

impl BenchReceiver {
    fn start(dir: &Path, name: &str) -> BenchReceiver {
        let store = Arc::new(SqliteStore::open(&dir.join(format!("receiver-{name}.db"))).expect("receiver db"));
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let server = RunningServer::start(addr, ServerConfig::default(), store.clone()).expect("receiver");
        let endpoint = format!("{}/api/v1/events/batch/", server.url());
        BenchReceiver { _server: server, store, endpoint }
    }
}

fn closed_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    format!("http://127.0.0.1:{port}/api/v1/events/batch/")
}

/// `now --json` (any exit code): wall time and the report.
fn now_json(home: &Path, extra: &[&str]) -> (Duration, Value) {
    let start = Instant::now();
    let output =
        Command::new(BIN).arg("--home").arg(home).args(["now", "--json"]).args(extra).output().expect("run kitty-sync");
    let wall = start.elapsed();
    (wall, serde_json::from_slice(&output.stdout).expect("now --json report"))
}

fn per_target(report: &Value) -> String {
    let targets = report["targets"].as_array().cloned().unwrap_or_default();
    targets
        .iter()
        .map(|t| format!("{} {} ms, exit {}", t["name"].as_str().unwrap_or("?"), t["elapsed_ms"], t["exit_code"]))
        .collect::<Vec<_>>()
        .join("; ")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// ~500-byte envelopes with valid, distinct ULIDs.
fn write_events(path: &Path, n: usize, offset: usize) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let filler = "x".repeat(330);
    for i in offset..offset + n {
        let id = format!("01J{:023}", i);
        writeln!(
            out,
            r#"{{"event_id":"{id}","event_type":"BenchEvent","aggregate_id":"agg-{}","payload":{{"n":{i},"text":"{filler}"}},"timestamp":"2026-11-24T00:00:00Z","lamport_clock":{i},"node_id":"bench0000000"}}"#,
            i % 97
        )
        .expect("write");
    }
    out.flush().expect("flush");
}

fn file_mb(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len() / 1_000_000).unwrap_or(0)
}

/// The state a completed drain leaves, written straight into the ledger (the receiver is not
/// asked to hold a million events).
fn mark_delivered_directly(home: &Path, endpoint: &str) {
    let home = Home::at(home);
    // The store is created by the engine; the bulk fill goes through a connection of the
    // benchmark's own (the engine keeps its connection to itself).
    drop(Store::open(&home).expect("store"));
    let conn = rusqlite::Connection::open(home.store_path()).expect("store connection");
    let receiver =
        ExternalReceiver::new(Some(endpoint), None, HttpClient::new(Duration::from_secs(5))).expect("receiver");
    let record = target::register(&conn, receiver.identity(), 0).expect("target");
    conn
        .execute(
            "INSERT INTO ledger (target, epoch, seq, status, attempt_count, first_attempted_at, last_attempted_at, completed_at, last_http_status)
             SELECT ?1, 0, seq, 'success', 1, 0, 0, 0, 200 FROM events WHERE true
             ON CONFLICT(target, epoch, seq) DO NOTHING",
            [record.id],
        )
        .expect("ledger fill");
}

fn run(home: &Path, args: &[&str]) {
    let status = Command::new(BIN)
        .arg("--home")
        .arg(home)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run kitty-sync");
    assert!(status.success(), "kitty-sync {args:?} failed: {status}");
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
    let mut samples: Vec<f64> = (0..runs).map(|_| ms(time(|| run(home, args)))).collect();
    samples.sort_by(f64::total_cmp);
    samples[runs / 2]
}

/// Wall time and peak RSS (KiB) through /usr/bin/time when present.
fn timed_with_rss(home: &Path, args: &[&str]) -> (Duration, u64) {
    let rss_file = home.with_extension("rss");
    let start = Instant::now();
    let status = if Path::new("/usr/bin/time").exists() {
        Command::new("/usr/bin/time")
            .args(["-f", "%M", "-o", path(&rss_file), BIN, "--home", path(home)])
            .args(args)
            .status()
    } else {
        Command::new(BIN).arg("--home").arg(home).args(args).status()
    }
    .expect("run");
    let wall = start.elapsed();
    assert!(status.success(), "kitty-sync {args:?} failed");
    let rss = std::fs::read_to_string(&rss_file).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    (wall, rss)
}
