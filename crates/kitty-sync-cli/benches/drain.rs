//! Delivery benchmark (plain main; prints numbers that can be compared run to run):
//! 1. `kitty-sync now` draining 100,000 ~500-byte events to the built-in receiver on loopback,
//!    end to end through the release binary (wall time, peak RSS);
//! 2. the same journal re-drained to a second and then a third receiver after the first holds
//!    everything (a new target must cost what the first did, not grow with the ledger);
//! 3. `now` when everything is already delivered, at 100,000 and at 1,000,000 events.
//!
//! Run: `cargo bench -p kitty-sync-cli --bench drain` (add `-- --quick` for 20k / 200k).

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kitty_sync::delivery::receiver::{ExternalReceiver, HttpClient, Receiver};
use kitty_sync::delivery::target;
use kitty_sync::home::Home;
use kitty_sync::store::Store;
use kitty_sync_receiver::{ReceiverStore, RunningServer, ServerConfig, SqliteStore};

const BIN: &str = env!("CARGO_BIN_EXE_kitty-sync");

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (drain_n, big_n) = if quick { (20_000, 200_000) } else { (100_000, 1_000_000) };
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
    let store = Store::open(&home).expect("store");
    let receiver =
        ExternalReceiver::new(Some(endpoint), None, HttpClient::new(Duration::from_secs(5))).expect("receiver");
    let record = target::register(store.conn(), receiver.identity(), 0).expect("target");
    store
        .conn()
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
