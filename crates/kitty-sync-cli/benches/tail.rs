//! `tail` benchmark (plain main; prints numbers that can be compared run to run): a journal of
//! 1,000,000 ~300-byte events captured with `emit --jsonl`, then `kitty-sync tail` of all of
//! them to /dev/null through the release binary (best and median of 3; target ≥ 200,000
//! events/s), and once more into a pipe to check the line count.
//!
//! Run: `cargo bench -p kitty-sync-cli --bench tail` (add `-- --quick` for 100,000 events).

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kitty-sync");

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n: u64 = if quick { 100_000 } else { 1_000_000 };
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let jsonl = dir.path().join("events.jsonl");
    write_events(&jsonl, n);
    kitty(&home).args(["mode", "local-retention", "-q"]).status().expect("mode");
    let started = Instant::now();
    let status = kitty(&home).args(["emit", "--jsonl"]).arg(&jsonl).arg("-q").status().expect("emit");
    assert!(status.success(), "emit --jsonl failed");
    println!("built a {n}-event journal with emit --jsonl in {:.1} s", started.elapsed().as_secs_f64());

    let mut runs: Vec<Duration> = (0..3).map(|_| tail_to_dev_null(&home)).collect();
    runs.sort();
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "tail of {n} events to /dev/null: best {:.2} s ({:.0} events/s), median {:.2} s ({:.0} events/s) (target ≥ 200,000 events/s)",
        runs[0].as_secs_f64(),
        rate(runs[0]),
        runs[1].as_secs_f64(),
        rate(runs[1])
    );

    let mut child = kitty(&home).arg("tail").stdout(Stdio::piped()).spawn().expect("tail");
    let lines = BufReader::new(child.stdout.take().expect("stdout")).lines().count() as u64;
    assert!(child.wait().expect("wait").success());
    assert_eq!(lines, n, "tail printed every event once");
}

fn kitty(home: &Path) -> Command {
    let mut command = Command::new(BIN);
    command.arg("--home").arg(home).env_remove("SPEC_KITTY_HOME").env_remove("SPEC_KITTY_SAAS_URL");
    command
}

fn tail_to_dev_null(home: &Path) -> Duration {
    let dev_null = std::fs::File::create("/dev/null").expect("/dev/null");
    let started = Instant::now();
    let status = kitty(home).arg("tail").stdout(dev_null).status().expect("tail");
    assert!(status.success());
    started.elapsed()
}

fn write_events(path: &Path, n: u64) {
    let mut out = BufWriter::new(std::fs::File::create(path).expect("jsonl"));
    for i in 0..n {
        // Distinct, valid ULIDs in increasing order.
        let id = format!("01J{i:023}");
        writeln!(
            out,
            r#"{{"event_id":"{id}","event_type":"Bench{}","aggregate_id":"agg-{}","payload":{{"n":{i},"text":"{}"}},"timestamp":"2026-11-24T00:00:00Z"}}"#,
            i % 5,
            i % 97,
            "x".repeat(160)
        )
        .expect("write");
    }
    out.flush().expect("flush");
}
