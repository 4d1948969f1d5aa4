//! `kitty-sync receiver serve|dump` as a real process on 127.0.0.1:0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_kitty-sync");

/// A running `receiver serve`; killed if a test ends without stopping it.
struct ServeProcess {
    child: Child,
    /// `HOST:PORT`
    addr: String,
}

impl ServeProcess {
    fn start(db: &Path, extra: &[&str], env: &[(&str, &str)]) -> ServeProcess {
        let mut command = Command::new(BIN);
        command
            .args(["receiver", "serve", "--bind", "127.0.0.1:0", "--db"])
            .arg(db)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        let mut process = ServeProcess { child, addr: String::new() };
        let Some(url) = line.trim_end().strip_prefix("listening on http://") else {
            let _ = process.child.kill();
            let mut stderr = String::new();
            let _ = process.child.stderr.take().unwrap().read_to_string(&mut stderr);
            panic!("unexpected first line {line:?}; stderr: {stderr}");
        };
        assert!(url.starts_with("127.0.0.1:"), "{url}");
        process.addr = url.to_string();
        process
    }

    /// SIGTERM, then the exit status (within a bound).
    fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "receiver did not stop after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = stderr.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// A minimal HTTP/1.1 exchange (`Connection: close`), enough for these tests.
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
    Reply { status, head: head.to_string(), body: body.to_string() }
}

fn post_batch(addr: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(body.as_bytes()).unwrap();
    let gzip = encoder.finish().unwrap();
    let mut all = vec![("Content-Type", "application/json"), ("Content-Encoding", "gzip")];
    all.extend_from_slice(headers);
    http(addr, "POST", "/api/v1/events/batch/", &all, &gzip)
}

fn envelope(n: u32, event_type: &str) -> String {
    format!(r#"{{"event_id": "01KVYWRGJEV7CEZW6J7G{n:06}", "event_type": "{event_type}", "payload": {{"n": {n}}}}}"#)
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).stdin(Stdio::null()).output().unwrap()
}

fn dump_json(db: &Path) -> Value {
    let output = run(&["receiver", "dump", "--json", "--db", db.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn serve_store_dump_and_stop_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let mut server = ServeProcess::start(&db, &["--deployment-id", "dep-7"], &[]);
    let event = envelope(1, "A");
    let reply = post_batch(&server.addr, &format!("{{\"events\": [{event}, {event}]}}"), &[]);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let results = reply.json()["results"].clone();
    assert_eq!((&results[0]["status"], &results[1]["status"]), (&json!("success"), &json!("duplicate")));

    let health = http(&server.addr, "GET", "/api/v1/sync/health/", &[], b"").json();
    assert_eq!(health["deployment_id"], "dep-7");
    assert_eq!(health["git_sha"], Value::Null);

    // Dump works while the server runs, and embeds the envelope byte for byte.
    let output = run(&["receiver", "dump", "--json", "--db", db.to_str().unwrap()]);
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains(&event), "{text}");
    let dump: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(dump["server_instance_id"], health["server_instance_id"]);
    assert_eq!((dump["event_count"].clone(), dump["batch_requests"].clone()), (json!(1), json!(1)));
    assert_eq!(dump["events"][0]["event_type"], "A");
    assert_eq!(dump["events"][0]["seq"], 1);

    assert_eq!(server.terminate().code(), Some(0), "stderr: {}", server.stderr());
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    assert!(!Path::new(&wal).exists(), "database not closed cleanly");

    let output = run(&["receiver", "dump", "--db", db.to_str().unwrap()]);
    assert!(output.status.success());
    let human = String::from_utf8(output.stdout).unwrap();
    assert!(human.contains("01KVYWRGJEV7CEZW6J7G000001"), "{human}");
    assert!(human.contains("batch requests     1 (200: 1)"), "{human}");
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(files, vec![std::ffi::OsString::from("r.db")], "dump must not create files");
}

#[test]
fn duplicates_survive_a_restart_and_identity_is_stable() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let mut server = ServeProcess::start(&db, &[], &[]);
    assert_eq!(post_batch(&server.addr, &format!("{{\"events\": [{}]}}", envelope(1, "A")), &[]).status, 200);
    let first = http(&server.addr, "GET", "/api/v1/sync/health", &[], b"").json();
    assert_eq!(server.terminate().code(), Some(0));

    let server = ServeProcess::start(&db, &[], &[]);
    let reply = post_batch(&server.addr, &format!("{{\"events\": [{}, {}]}}", envelope(1, "A"), envelope(2, "A")), &[]);
    assert_eq!(reply.json()["results"][0]["status"], "duplicate");
    assert_eq!(reply.json()["results"][1]["status"], "success");
    let second = http(&server.addr, "GET", "/api/v1/sync/health", &[], b"").json();
    assert_eq!(first["server_instance_id"], second["server_instance_id"]);
    let page = http(&server.addr, "GET", "/api/v1/events/?after=1&limit=5", &[], b"").json();
    assert_eq!(page["events"].as_array().unwrap().len(), 1);
    assert_eq!(page["next_after"], 2);
}

#[test]
fn token_from_the_environment_guards_the_batch_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let env = [("KS_RECEIVER_TEST_TOKEN", "tok-3f9a")];
    let mut server = ServeProcess::start(&db, &["--token-env", "KS_RECEIVER_TEST_TOKEN"], &env);
    let body = format!("{{\"events\": [{}]}}", envelope(1, "A"));
    let reply = post_batch(&server.addr, &body, &[]);
    assert_eq!(reply.status, 401);
    assert!(!reply.body.contains("tok-3f9a"));
    let reply = post_batch(&server.addr, &body, &[("Authorization", "Bearer tok-3f9a")]);
    assert_eq!(reply.status, 200);
    assert_eq!(server.terminate().code(), Some(0));
    assert!(!server.stderr().contains("tok-3f9a"));
    let dump = dump_json(&db);
    assert_eq!(dump["batch_requests_by_status"], json!({"200": 1, "401": 1}));
}

#[test]
fn fault_flags_inject_failures_and_rejections() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let flags = ["--fail-every", "2", "--fail-status", "429", "--reject-type", "Bad", "--delay-ms", "50"];
    let _server = ServeProcess::start(&db, &flags, &[]);
    let addr = &_server.addr;
    let body = format!("{{\"events\": [{}, {}]}}", envelope(1, "Bad"), envelope(2, "A"));
    let started = Instant::now();
    let reply = post_batch(addr, &body, &[]);
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(reply.json()["results"][0]["status"], "rejected");
    assert_eq!(reply.json()["results"][1]["status"], "success");
    let reply = post_batch(addr, &body, &[]);
    assert_eq!(reply.status, 429);
    assert!(reply.head.to_ascii_lowercase().contains("retry-after: 1"), "{}", reply.head);
}

#[test]
fn usage_errors_exit_2_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let db_arg = db.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["receiver", "serve", "--bind", "nonsense", "--db", db_arg],
        vec!["receiver", "serve", "--bind", "127.0.0.1:0", "--db", db_arg, "--token-env", "KS_SURELY_UNSET_VAR_X"],
        vec!["receiver", "serve", "--bind", "127.0.0.1:0", "--db", db_arg, "--fail-status", "200"],
        vec!["receiver", "serve", "--bind", "127.0.0.1:0", "--db", db_arg, "--max-body-bytes", "lots"],
        vec!["receiver", "dump", "--db", db_arg],
        vec!["receiver", "dump", "--json", "--db", db_arg],
    ];
    for args in &cases {
        let output = run(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(!stderr.is_empty(), "{args:?}");
    }
    let output = run(&["receiver", "dump", "--db", db_arg]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("does not exist") && stderr.contains("hint:"), "{stderr}");
    assert!(!db.exists(), "dump must never create a database");

    let foreign = dir.path().join("foreign.db");
    std::fs::write(&foreign, b"not a database at all, just some bytes").unwrap();
    let output = run(&["receiver", "dump", "--db", foreign.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a kitty-sync receiver database"));
}

#[test]
fn port_in_use_exits_1_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let db = dir.path().join("r.db");
    let output = run(&["receiver", "serve", "--bind", &addr, "--db", db.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("address already in use") && stderr.contains("hint:"), "{stderr}");
    assert!(output.stdout.is_empty());
}

#[test]
fn every_answered_success_survives_a_kill_mid_load() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let mut server = ServeProcess::start(&db, &[], &[]);
    let addr = server.addr.clone();
    let batch = |b: u32| -> String {
        let events: Vec<String> = (0..200).map(|n| envelope(b * 1000 + n, "A")).collect();
        format!("{{\"events\": [{}]}}", events.join(", "))
    };
    let (tx, rx) = mpsc::channel();
    let client = std::thread::spawn(move || {
        let mut confirmed = Vec::new();
        for b in 0..200 {
            let outcome = std::panic::catch_unwind(|| post_batch(&addr, &batch(b), &[]));
            match outcome {
                Ok(reply) if reply.status == 200 => confirmed.push(b),
                _ => break,
            }
            if b == 5 {
                let _ = tx.send(());
            }
        }
        confirmed
    });
    rx.recv_timeout(Duration::from_secs(20)).unwrap();
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let confirmed = client.join().unwrap();
    assert!(confirmed.len() >= 6);

    let server = ServeProcess::start(&db, &[], &[]);
    for b in &confirmed {
        let reply = post_batch(&server.addr, &batch(*b), &[]);
        let results = reply.json()["results"].as_array().unwrap().clone();
        assert!(results.iter().all(|r| r["status"] == "duplicate"), "batch {b} was answered but not kept");
    }
    let dump = dump_json(&db);
    assert!(dump["event_count"].as_u64().unwrap() >= 200 * confirmed.len() as u64);
}
