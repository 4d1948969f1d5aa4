//! `kitty-sync daemon` and the health it reports (contract §10), from the outside: real
//! daemons and built-in receivers as child processes, captures by other processes, SIGTERM
//! and kill -9, `status --json`/`--check`, and `GET /health`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{FakeResponse, FakeServer, Home, Receiver, closed_endpoint, finish, kill9, wait_until};

/// A `kitty-sync daemon` child; killed (-9) on drop.
struct Daemon {
    child: Option<Child>,
    stderr: Arc<Mutex<String>>,
}

impl Daemon {
    fn start(home: &Home, extra: &[&str]) -> Daemon {
        let mut args = vec!["daemon"];
        if !extra.contains(&"--poll-ms") {
            args.extend(["--poll-ms", "2000"]);
        }
        args.extend_from_slice(extra);
        let mut child = home.spawn(&args);
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let daemon = Daemon { child: Some(child), stderr };
        wait_until(Duration::from_secs(10), "the daemon to start", || daemon.stderr().contains("daemon running"));
        daemon
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn health_url(&self) -> String {
        let text = self.stderr();
        let start = text.find("health on http://").expect("health line") + "health on http://".len();
        text[start..].lines().next().unwrap().trim_end_matches("/health").to_string()
    }

    fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill").args([name, &self.pid().to_string()]).status().unwrap();
        assert!(status.success());
    }

    fn kill9(&mut self) {
        kill9(self.child.as_mut().unwrap());
        self.child = None;
    }

    fn into_child(mut self) -> Child {
        self.child.take().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill9(child);
        }
    }
}

fn state(home: &Home) -> Value {
    let text = std::fs::read_to_string(home.path().join("event-sync/daemon.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn daemon_status(home: &Home) -> Value {
    home.status()["daemon"].clone()
}

/// `GET /health` on the daemon's responder: (status code, body).
fn get_health(addr: &str) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1;
    (code, serde_json::from_str(body).unwrap())
}

/// A home in external-receiver mode pointed at a fresh built-in receiver (started with `extra`).
fn home_with_receiver(extra: &[&str]) -> (tempfile::TempDir, Receiver, Home) {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&dir.path().join("r.db"), extra);
    let home = Home::new();
    home.external(&receiver.endpoint());
    (dir, receiver, home)
}

fn delivered(receiver: &Receiver) -> usize {
    receiver.dump().envelopes.len()
}

#[test]
fn captures_from_other_processes_arrive_within_a_second() {
    let (_dir, receiver, home) = home_with_receiver(&[]);
    let _daemon = Daemon::start(&home, &[]);
    let mut latencies = Vec::new();
    for i in 0..7 {
        let id = home.emit("Latency", &format!("{{\"i\":{i}}}"));
        let captured = Instant::now();
        wait_until(Duration::from_secs(5), "the event at the receiver", || receiver.dump().by_id().contains_key(&id));
        latencies.push(captured.elapsed());
    }
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    assert!(median < Duration::from_secs(1), "median {median:?} of {latencies:?}");
    let s = state(&home);
    let keys: Vec<&str> = s["targets"][0].as_object().unwrap().keys().map(String::as_str).collect();
    let mut expected = vec![
        "name",
        "target_id",
        "canonical_url",
        "state",
        "last_success_at",
        "last_failure_at",
        "consecutive_failures",
        "last_error",
        "next_attempt_at",
        "undelivered_count",
        "oldest_undelivered_at",
    ];
    expected.sort();
    let mut keys = keys;
    keys.sort();
    assert_eq!(keys, expected);
    assert_eq!(s["targets"][0]["name"], "primary");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn a_receiver_that_was_down_gets_everything_after_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let mut receiver = Receiver::start(&db, &[]);
    let addr = receiver.addr.clone();
    receiver.stop();
    let home = Home::new();
    home.external(&format!("http://{addr}/api/v1/events/batch/"));
    let ids = home.capture(20, "Down");
    let _daemon = Daemon::start(&home, &["--max-backoff", "1"]);
    wait_until(Duration::from_secs(5), "a failure in the state", || {
        let t = &state(&home)["targets"][0];
        t["state"] == "backoff" && t["consecutive_failures"].as_u64() >= Some(1)
    });
    assert_eq!(state(&home)["targets"][0]["undelivered_count"], 20);
    let receiver = Receiver::start_with(&db, &addr, &[], &[]);
    wait_until(Duration::from_secs(8), "every event at the receiver", || delivered(&receiver) == ids.len());
    wait_until(Duration::from_secs(5), "the target idle again", || {
        let t = &state(&home)["targets"][0];
        t["state"] == "idle" && t["undelivered_count"] == 0 && t["consecutive_failures"] == 0
    });
}

#[test]
fn retry_after_is_honoured_beyond_the_backoff() {
    let times = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let seen = Arc::clone(&times);
    let server = FakeServer::start(move |request| {
        if !request.is_batch() {
            return FakeResponse::json(404, &json!({}));
        }
        let mut seen = seen.lock().unwrap();
        seen.push(Instant::now());
        if seen.len() == 1 {
            let mut busy = FakeResponse::json(503, &json!({"error": "busy"}));
            busy.headers.push(("Retry-After".into(), "2".into()));
            busy
        } else {
            FakeResponse::all_success(request)
        }
    });
    let home = Home::new();
    home.external(&server.endpoint());
    home.emit("Later", "{}");
    let _daemon = Daemon::start(&home, &["--max-backoff", "1"]);
    wait_until(Duration::from_secs(8), "the second attempt", || times.lock().unwrap().len() >= 2);
    let times = times.lock().unwrap();
    let gap = times[1] - times[0];
    assert!(gap >= Duration::from_millis(1900), "second attempt after {gap:?}, Retry-After asked for 2 s");
    assert!(gap < Duration::from_secs(4), "{gap:?}");
}

#[test]
fn a_second_daemon_exits_5_naming_the_first() {
    let home = Home::new();
    home.external(&closed_endpoint());
    let first = Daemon::start(&home, &["--health-bind", "127.0.0.1:0"]);
    let second = home.run(&["daemon"]).expect(5);
    assert!(second.stderr.contains(&format!("pid {}", first.pid())), "{}", second.stderr);
    assert!(second.stderr.contains("hint:"), "{}", second.stderr);
    // Busy, not a port clash, when the second one asks for the same health address.
    let again = home.run(&["daemon", "--health-bind", &first.health_url()]).expect(5);
    assert!(again.stderr.contains(&format!("pid {}", first.pid())), "{}", again.stderr);
    assert_eq!(get_health(&first.health_url()).1["pid"], first.pid());
}

#[test]
fn sigterm_stops_cleanly_and_status_says_stopped() {
    let (_dir, _receiver, home) = home_with_receiver(&[]);
    let daemon = Daemon::start(&home, &[]);
    assert_eq!(daemon_status(&home)["running"], true);
    daemon.signal("-TERM");
    let started = Instant::now();
    finish(daemon.into_child(), Duration::from_secs(10)).expect(0);
    assert!(started.elapsed() < Duration::from_secs(10));
    let s = daemon_status(&home);
    assert_eq!(s["running"], false);
    assert!(s["stopped_at"].is_string(), "{s:#}");
    home.run(&["status", "--check"]).expect(0);
}

#[test]
fn sigint_abandons_a_hanging_request_within_10_s() {
    let (_dir, _receiver, home) = home_with_receiver(&["--delay-ms", "20000"]);
    home.emit("Slow", "{}");
    let daemon = Daemon::start(&home, &[]);
    wait_until(Duration::from_secs(5), "the daemon delivering", || state(&home)["targets"][0]["state"] == "delivering");
    daemon.signal("-INT");
    let started = Instant::now();
    finish(daemon.into_child(), Duration::from_secs(11)).expect(0);
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert!(state(&home)["stopped_at"].is_string());
}

#[test]
fn kill_9_then_restart_stores_every_event_exactly_once() {
    let (_dir, receiver, home) = home_with_receiver(&["--delay-ms", "30"]);
    let mut ids = home.capture(600, "Crash");
    let mut daemon = Daemon::start(&home, &[]);
    wait_until(Duration::from_secs(10), "the first batches", || delivered(&receiver) > 0);
    daemon.kill9();
    ids.extend(home.capture(50, "AfterCrash"));
    let status = home.status();
    assert_eq!(status["daemon"]["running"], false);
    home.run(&["status", "--check"]).expect(3);
    let _daemon = Daemon::start(&home, &[]);
    wait_until(Duration::from_secs(20), "every event at the receiver", || delivered(&receiver) == ids.len());
    let mut stored = receiver.dump().ids();
    stored.sort();
    ids.sort();
    assert_eq!(stored, ids, "each event exactly once");
    wait_until(Duration::from_secs(5), "status to call the daemon running", || {
        home.run(&["status", "--check"]).code == 0
    });
}

#[test]
fn now_wait_gets_its_turn_beside_a_running_daemon() {
    let (_dir, receiver, home) = home_with_receiver(&["--delay-ms", "20"]);
    home.capture(200, "Busy");
    let _daemon = Daemon::start(&home, &[]);
    home.capture(20, "More");
    let (run, _) = home.now(&["--wait", "10", "--batch-events", "10"]);
    run.expect(0);
    wait_until(Duration::from_secs(10), "everything delivered", || delivered(&receiver) == 220);
}

#[test]
fn max_lag_fails_the_check_when_the_oldest_undelivered_event_is_too_old() {
    let home = Home::new();
    home.external(&closed_endpoint());
    home.run(&["status", "--check", "--max-lag", "1s"]).expect(0);
    home.emit("Stuck", "{}");
    std::thread::sleep(Duration::from_millis(1200));
    let run = home.run(&["status", "--check", "--max-lag", "1s"]).expect(3);
    assert!(run.stdout.contains("behind"), "{}", run.stdout);
    home.run(&["status", "--check", "--max-lag", "1h"]).expect(0);
    let json = home.run(&["status", "--json", "--max-lag", "1s"]).json();
    assert_eq!(json["ok"], false);
    assert_eq!(json["daemon"], Value::Null);
    home.run(&["status", "--max-lag", "soon"]).expect(2);
}

#[test]
fn health_is_200_while_delivering_and_503_while_a_target_fails() {
    let (_dir, receiver, home) = home_with_receiver(&[]);
    home.emit("Fine", "{}");
    let daemon = Daemon::start(&home, &["--health-bind", "127.0.0.1:0"]);
    let addr = daemon.health_url();
    wait_until(Duration::from_secs(5), "delivery", || delivered(&receiver) == 1);
    let (code, body) = get_health(&addr);
    assert_eq!(code, 200, "{body:#}");
    assert_eq!(body["pid"], daemon.pid());
    drop(daemon);

    let failing = Home::new();
    failing.external(&closed_endpoint());
    failing.emit("Lost", "{}");
    let daemon = Daemon::start(&failing, &["--health-bind", "127.0.0.1:0", "--max-backoff", "1"]);
    let addr = daemon.health_url();
    wait_until(Duration::from_secs(5), "a 503", || get_health(&addr).0 == 503);
    let (_, body) = get_health(&addr);
    assert_eq!(body["targets"][0]["state"], "backoff");
    assert!(body["targets"][0]["last_error"].is_string());
    // A running daemon that cannot deliver is never reported healthy.
    let run = failing.run(&["status", "--check"]).expect(3);
    assert!(run.stdout.contains("cannot deliver to primary"), "{}", run.stdout);
}

/// CPU time (utime + stime, in clock ticks) a process has used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
#[cfg(target_os = "linux")]
fn waits_quietly_while_another_drain_holds_the_lock() {
    let (_dir, receiver, home) = home_with_receiver(&[]);
    home.capture(5, "Queued");
    // Another drain (here: this test) holds the home's drain lock.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(home.path().join("event-sync/drain.lock"))
        .unwrap();
    lock.lock().unwrap();
    let daemon = Daemon::start(&home, &[]);
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(daemon.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(daemon.pid()) - before;
    // Retrying the lock a few times a second costs next to nothing; spinning on it burns a core.
    assert!(used <= 10, "{used} CPU ticks in 2 s while the lock was busy");
    assert_eq!(delivered(&receiver), 0, "nothing is delivered while another drain holds the lock");
    drop(lock);
    wait_until(Duration::from_secs(5), "delivery once the lock is free", || delivered(&receiver) == 5);
}

#[test]
fn a_mode_switch_is_picked_up_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let a = Receiver::start(&dir.path().join("a.db"), &[]);
    let b = Receiver::start(&dir.path().join("b.db"), &[]);
    let home = Home::new();
    home.run(&["mode", "local-retention"]).expect(0);
    let daemon = Daemon::start(&home, &["--poll-ms", "200"]);
    assert_eq!(state(&home)["targets"], json!([]));
    home.emit("Early", "{}");
    home.external(&a.endpoint());
    wait_until(Duration::from_secs(5), "delivery to A", || delivered(&a) == 1);
    home.external(&b.endpoint());
    home.emit("Late", "{}");
    wait_until(Duration::from_secs(5), "every retained event at B", || delivered(&b) == 2);
    assert_eq!(delivered(&a), 1);
    assert!(daemon.stderr().contains("settings changed"), "{}", daemon.stderr());
    assert_eq!(state(&home)["targets"][0]["canonical_url"], b.endpoint().trim_end_matches('/'));
}

#[test]
fn named_targets_are_kept_delivered_beside_the_primary_with_their_type_filters() {
    let (dir, primary, home) = home_with_receiver(&[]);
    let audit = Receiver::start(&dir.path().join("audit.db"), &[]);
    home.run(&["target", "add", "audit", "--endpoint", &audit.endpoint(), "--type", "Kept"]).expect(0);
    let _daemon = Daemon::start(&home, &[]);
    let kept = home.emit("Kept", "{}");
    let other = home.emit("Other", "{}");
    wait_until(Duration::from_secs(10), "both events at the primary", || {
        let stored = primary.dump().by_id();
        stored.contains_key(&kept) && stored.contains_key(&other)
    });
    wait_until(Duration::from_secs(10), "the Kept event at audit", || audit.dump().by_id().contains_key(&kept));
    wait_until(Duration::from_secs(10), "audit idle with nothing undelivered", || {
        let s = state(&home);
        let audit_state = s["targets"].as_array().unwrap().iter().find(|t| t["name"] == "audit").cloned();
        audit_state.is_some_and(|t| t["state"] == "idle" && t["undelivered_count"] == 0)
    });
    assert_eq!(audit.dump().envelopes.len(), 1, "an event outside the type filter went to audit");
    let names: Vec<Value> = state(&home)["targets"].as_array().unwrap().iter().map(|t| t["name"].clone()).collect();
    assert_eq!(names, [json!("primary"), json!("audit")]);
}
