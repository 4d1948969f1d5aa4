//! `kitty-sync tail`: the journal as JSON Lines, byte for byte, resumable, and `--follow`
//! printing new captures from other processes within a second.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::capture_support::tree;
use crate::common::{Home, Receiver, finish, odd_envelope};

fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

/// A `tail --follow` child whose stdout lines arrive on a channel.
fn follow(home: &Home, extra: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut args = vec!["tail", "--follow"];
    args.extend_from_slice(extra);
    let mut child = home.command(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let stdout: ChildStdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// SIGTERM, then the contract's clean end: exit 0, nothing on stderr.
fn stop_cleanly(child: Child) {
    std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let run = finish(child, Duration::from_secs(5));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.is_empty(), "{}", run.stderr);
}

/// A home whose mode delivers nowhere (captures are only journaled).
fn local_home() -> Home {
    let home = Home::new();
    home.run(&["mode", "local-retention"]).expect(0);
    home
}

#[test]
fn prints_stored_bytes_in_capture_order_skipping_purged_and_coalesced() {
    let home = Home::new();
    let receiver = Receiver::start(&home.path().join("r.db"), &[]);
    home.external(&receiver.endpoint());
    // Delivered, archived and purged by gc: gone from the stream.
    home.capture(2, "Purged");
    home.now(&[]).0.expect(0);
    home.run(&["archive"]).expect(0);
    home.run(&["gc"]).expect(0);
    // Delivered and archived: still in the stream.
    let ids: Vec<String> = (0..2).map(|_| crate::common::new_event_id()).collect();
    let archived_lines: Vec<String> = ids.iter().enumerate().map(|(i, id)| odd_envelope(id, "Archived", i)).collect();
    home.import(&archived_lines);
    home.now(&[]).0.expect(0);
    home.run(&["archive"]).expect(0);
    // Retained, and one coalesced away by a later capture with the same key.
    let retained = crate::common::new_event_id();
    let retained_line = odd_envelope(&retained, "Retained", 9);
    home.import(std::slice::from_ref(&retained_line));
    home.run(&["emit", "--type", "Settings", "--coalesce-key", "k"]).expect(0);
    let latest = home.run(&["emit", "--type", "Settings", "--coalesce-key", "k"]).expect(0).stdout.trim().to_string();

    let before = tree(home.path());
    let run = home.run(&["tail"]).expect(0);
    assert_eq!(tree(home.path()), before, "tail changed or created files");
    let printed = lines(&run.stdout);
    assert_eq!(printed.len(), 4, "{}", run.stdout);
    assert_eq!(printed[..2], archived_lines.iter().map(String::as_str).collect::<Vec<_>>()[..]);
    assert_eq!(printed[2], retained_line, "byte for byte, as imported");
    assert_eq!(printed[3], home.stored_envelope(&latest));
    assert!(run.stderr.is_empty(), "{}", run.stderr);
}

#[test]
fn after_type_and_limit_page_through_the_journal() {
    let home = local_home();
    let a = home.capture(3, "A");
    let b = home.capture(2, "B");
    let id_of = |line: &str| serde_json::from_str::<serde_json::Value>(line).unwrap()["event_id"].to_string();

    let first = home.run(&["tail", "--limit", "2"]).expect(0);
    assert_eq!(lines(&first.stdout).len(), 2);
    let last = serde_json::from_str::<serde_json::Value>(lines(&first.stdout)[1]).unwrap();
    let rest = home.run(&["tail", "--after", last["event_id"].as_str().unwrap()]).expect(0);
    let rest_ids: Vec<String> = lines(&rest.stdout).iter().map(|l| id_of(l)).collect();
    let expected: Vec<String> = [&a[2..], &b[..]].concat().iter().map(|id| format!("\"{id}\"")).collect();
    assert_eq!(rest_ids, expected);

    let only_b = home.run(&["tail", "--type", "B", "--type", "Nope"]).expect(0);
    assert_eq!(lines(&only_b.stdout).iter().map(|l| id_of(l)).collect::<Vec<_>>(), expected[1..]);

    let unknown = home.run(&["tail", "--after", "01ARZ3NDEKTSV4RRFFQ69G5FAV"]).expect(2);
    assert!(unknown.stderr.contains("unknown event id") && unknown.stderr.contains("hint:"), "{}", unknown.stderr);
    home.run(&["tail", "--after", "not-an-id"]).expect(2);
}

#[test]
fn without_a_store_prints_nothing_and_creates_nothing() {
    let home = Home::new();
    let missing = home.path().join("nothing-here");
    let run = crate::common::bin().arg("--home").arg(&missing).arg("tail").output().unwrap();
    assert_eq!(run.status.code(), Some(0));
    assert!(run.stdout.is_empty());
    assert!(!missing.exists(), "a read-only command created the home");
    let run = crate::common::bin()
        .arg("--home")
        .arg(&missing)
        .args(["tail", "--after", "01ARZ3NDEKTSV4RRFFQ69G5FAV"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
}

#[test]
fn follow_prints_new_captures_within_a_second_and_ends_cleanly_on_sigterm() {
    let home = local_home();
    let old = home.capture(1, "Old");
    let (child, lines) = follow(&home, &["--type", "New", "--type", "Old"]);
    let first = lines.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(first.contains(&old[0]), "{first}");

    let mut latencies = Vec::new();
    for _ in 0..5 {
        home.emit("Skipped", "{}");
        let started = Instant::now();
        let id = home.emit("New", "{}");
        let line = lines.recv_timeout(Duration::from_secs(5)).expect("the capture was printed");
        latencies.push(started.elapsed());
        assert!(line.contains(&id), "{line}");
        std::thread::sleep(Duration::from_millis(100));
    }
    latencies.sort();
    let worst = *latencies.last().unwrap();
    eprintln!("tail --follow latency after emit returned: median {:?}, max {worst:?}", latencies[2]);
    assert!(worst <= Duration::from_secs(1), "{latencies:?}");

    stop_cleanly(child);
}

#[test]
fn follow_waits_for_a_store_that_does_not_exist_yet() {
    let home = Home::new();
    let (child, lines) = follow(&home, &[]);
    std::thread::sleep(Duration::from_millis(300));
    home.run(&["mode", "local-retention"]).expect(0);
    let id = home.emit("First", "{}");
    let line = lines.recv_timeout(Duration::from_secs(3)).expect("the first capture was printed");
    assert!(line.contains(&id));
    stop_cleanly(child);
}

#[test]
fn follow_exits_quietly_when_its_reader_goes_away() {
    let home = local_home();
    home.capture(3, "A");
    // `tail --follow | head -1`: the reader takes one line and closes the pipe while tail
    // has nothing more to write.
    let mut child = home.command(&["tail", "--follow"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("\"A\""));
    drop(reader);
    let run = finish(child, Duration::from_secs(5));
    assert_eq!(run.code, 0);
    assert!(run.stderr.is_empty(), "{}", run.stderr);
}

/// CPU time (user + system, in clock ticks) a process has used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn an_idle_follower_does_not_wake_itself() {
    let home = local_home();
    home.capture(2, "A");
    home.emit("B", "{}");
    let (child, lines) = follow(&home, &[]);
    for _ in 0..3 {
        lines.recv_timeout(Duration::from_secs(10)).unwrap();
    }
    // A capture wakes it; then it has nothing to do.
    home.emit("C", "{}");
    lines.recv_timeout(Duration::from_secs(5)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(child.id());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(child.id()) - before;
    // Its own reads open the WAL (and, as root, SQLite chowns it): were those taken as news,
    // the follower would read in a loop and burn a core.
    assert!(used <= 5, "an idle tail --follow used {used} ticks of CPU in 2 s");
    stop_cleanly(child);
}

#[test]
fn a_failing_stdout_is_an_error_but_a_closed_pipe_is_not() {
    let home = local_home();
    home.capture(2, "A");
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let output = home.command(&["tail"]).stdout(full).stderr(Stdio::piped()).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("hint:"));
    let mut child = home.command(&["tail"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let run = finish(child, Duration::from_secs(5));
    assert_eq!(run.code, 0, "{}", run.stderr);
}
