//! Daemon benchmark (plain main; prints numbers):
//! 1. capture → stored at the receiver: `kitty-sync emit` in a loop at ~100 events/s for 60 s
//!    while `kitty-sync daemon` delivers to a built-in receiver on loopback. Latency per event
//!    = the receiver's `received_at` − the envelope's `timestamp` (set by `emit` before its
//!    commit, so the figure includes the commit: an upper bound of commit → stored);
//! 2. the idle daemon: CPU (utime+stime from /proc/PID/stat) over 60 s with nothing to do, and
//!    its RSS before the load, after it, and after the idle minute.
//!
//! Run: `cargo bench -p kitty-sync-cli --bench daemon` (`-- --quick` for 10 s phases). Linux only
//! (reads /proc).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_kitty-sync");
const RATE_PER_SEC: u64 = 100;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let phase = Duration::from_secs(if quick { 10 } else { 60 });
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let db = dir.path().join("receiver.db");
    let (mut receiver, base) = start_receiver(&db);
    run(&home, &["mode", "external-receiver", "--endpoint", &format!("{base}/api/v1/events/batch/"), "-q"]);
    run(&home, &["emit", "--type", "Warmup", "-q"]);
    let mut daemon = Command::new(BIN)
        .arg("--home")
        .arg(&home)
        .args(["daemon", "-q"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("daemon");
    std::thread::sleep(Duration::from_secs(1));
    let rss_start = rss_kb(daemon.id());

    let sent = emit_loop(&home, phase);
    std::thread::sleep(Duration::from_secs(2));
    let mut latencies = latencies_ms(&db);
    latencies.sort_by(f64::total_cmp);
    let rss_loaded = rss_kb(daemon.id());
    println!(
        "load: {sent} emits in {} s ({:.0}/s), {} stored at the receiver",
        phase.as_secs(),
        sent as f64 / phase.as_secs_f64(),
        latencies.len()
    );
    println!(
        "capture → stored: median {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        pct(&latencies, 0.5),
        pct(&latencies, 0.9),
        pct(&latencies, 0.99),
        pct(&latencies, 1.0)
    );

    std::thread::sleep(Duration::from_secs(3));
    let ticks_before = cpu_ticks(daemon.id());
    let idle_started = Instant::now();
    std::thread::sleep(phase);
    let ticks = cpu_ticks(daemon.id()) - ticks_before;
    let hz = clock_ticks_per_sec();
    let cpu_pct = ticks as f64 / hz as f64 / idle_started.elapsed().as_secs_f64() * 100.0;
    let rss_idle = rss_kb(daemon.id());
    println!("idle {} s: {ticks} CPU ticks (1/{hz} s) = {cpu_pct:.3}% of one core", phase.as_secs());
    println!("RSS: {rss_start} KiB at start, {rss_loaded} KiB after the load, {rss_idle} KiB after the idle phase");
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = receiver.kill();
    let _ = receiver.wait();
}

/// `EMITTERS` threads, each running one `emit` after another on its share of the schedule,
/// so the rate holds even when one `emit` process takes longer than 1/RATE s. Returns the count.
fn emit_loop(home: &Path, phase: Duration) -> u64 {
    const EMITTERS: u64 = 4;
    let started = Instant::now();
    let threads: Vec<_> = (0..EMITTERS)
        .map(|lane| {
            let home = home.to_path_buf();
            std::thread::spawn(move || {
                let mut sent = 0u64;
                while started.elapsed() < phase {
                    let i = sent * EMITTERS + lane;
                    run(&home, &["emit", "--type", "Bench", "--payload", &format!("{{\"i\":{i}}}"), "-q"]);
                    sent += 1;
                    let next = started + Duration::from_micros(sent * EMITTERS * 1_000_000 / RATE_PER_SEC);
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                sent
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().expect("emitter")).sum()
}

fn latencies_ms(db: &Path) -> Vec<f64> {
    let out = Command::new(BIN).args(["receiver", "dump", "--json", "--db"]).arg(db).output().expect("dump");
    let dump: Value = serde_json::from_slice(&out.stdout).expect("dump json");
    let events = dump["events"].as_array().cloned().unwrap_or_default();
    events
        .iter()
        .filter(|e| e["event_type"] == "Bench")
        .filter_map(|e| {
            let received = parse(e["received_at"].as_str()?)?;
            let captured = parse(e["envelope"]["timestamp"].as_str()?)?;
            Some((received - captured) as f64 / 1000.0)
        })
        .collect()
}

/// RFC 3339 UTC → microseconds since the epoch.
fn parse(text: &str) -> Option<i64> {
    let ts: jiff::Timestamp = text.parse().ok()?;
    Some(ts.as_microsecond())
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}

fn start_receiver(db: &Path) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(["receiver", "serve", "--bind", "127.0.0.1:0", "--db"])
        .arg(db)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("receiver");
    let mut line = String::new();
    let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
    reader.read_line(&mut line).expect("first line");
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    let base = line.trim().strip_prefix("listening on ").expect("listening line").to_string();
    (child, base)
}

fn run(home: &Path, args: &[&str]) {
    let status = Command::new(BIN).arg("--home").arg(home).args(args).stdout(Stdio::null()).status().expect("run");
    assert!(status.success(), "kitty-sync {args:?} failed");
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let fields: Vec<&str> = stat.rsplit_once(')').expect("stat").1.split_whitespace().collect();
    // After the command name: state is field 3, utime 14 and stime 15 (1-based).
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn clock_ticks_per_sec() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}
