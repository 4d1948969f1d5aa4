//! Shared helpers for the black-box delivery tests: a temporary home driving the real
//! `kitty-sync` binary, built-in receivers as child processes on `127.0.0.1:0` (killed on
//! drop), `receiver dump` with the envelopes kept byte for byte, and a tiny scripted HTTP
//! server for answers the built-in receiver never gives (400 with/without details, garbage
//! bodies, token refresh). Other CLI tests keep their helpers in `*_support/`.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

/// Variables that would let the host's configuration leak into a test.
pub const HOST_ENV: [&str; 4] = ["SPEC_KITTY_SAAS_URL", "SPEC_KITTY_ENABLE_SAAS_SYNC", "SPEC_KITTY_HOME", "NO_COLOR"];

pub const BIN: &str = env!("CARGO_BIN_EXE_kitty-sync");

/// Fixture helpers shared with the engine's migration tests (one copy of them).
#[path = "../../../../kitty-sync/tests/support/mod.rs"]
mod fixtures;
pub use fixtures::{copy_tree, shared_fixtures, unconsented_ids};

/// A plain `std::process::Command` for the binary, host variables removed, no `--home`
/// (spawnable and killable, unlike `assert_cmd`'s).
pub fn bin() -> Command {
    let mut command = Command::new(BIN);
    for name in HOST_ENV {
        command.env_remove(name);
    }
    command.stdin(Stdio::null());
    command
}

/// What a finished command left behind.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from(output: Output) -> Run {
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Panics with both streams unless the exit code is `code`.
    #[track_caller]
    pub fn expect(self, code: i32) -> Run {
        assert_eq!(self.code, code, "unexpected exit code\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        self
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!("stdout is not one JSON document ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr)
        })
    }
}

/// A temporary `--home` plus the environment every command of a test shares.
pub struct Home {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Home {
    pub fn new() -> Home {
        Home { dir: tempfile::tempdir().unwrap(), env: Vec::new() }
    }

    /// A home inside `parent` (e.g. a small filesystem a test mounted).
    pub fn new_in(parent: &Path) -> Home {
        Home { dir: tempfile::tempdir_in(parent).unwrap(), env: Vec::new() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Sets an environment variable for every later command of this home.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.retain(|(n, _)| n != name);
        self.env.push((name.to_string(), value.to_string()));
    }

    pub fn unset_env(&mut self, name: &str) {
        self.env.retain(|(n, _)| n != name);
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = bin();
        command.arg("--home").arg(self.path()).args(args);
        for (name, value) in &self.env {
            command.env(name, value);
        }
        command
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(self.command(args).output().unwrap())
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }

    /// `now --json` with extra flags; returns the run (exit code unchecked) and its report.
    pub fn now(&self, extra: &[&str]) -> (Run, Value) {
        let mut args = vec!["now", "--json"];
        args.extend_from_slice(extra);
        let run = self.run(&args);
        let report = run.json();
        (run, report)
    }

    pub fn external(&self, endpoint: &str) {
        self.run(&["mode", "external-receiver", "--endpoint", endpoint]).expect(0);
    }

    pub fn status(&self) -> Value {
        self.run(&["status", "--json"]).json()
    }

    pub fn inspect(&self, event_id: &str) -> Value {
        self.run(&["inspect", event_id, "--json"]).expect(0).json()
    }

    /// The stored envelope of an event, byte for byte, as `inspect --json` shows it.
    pub fn stored_envelope(&self, event_id: &str) -> String {
        #[derive(Deserialize)]
        struct Inspection {
            envelope: Option<Box<RawValue>>,
        }
        let run = self.run(&["inspect", event_id, "--json"]).expect(0);
        let parsed: Inspection = serde_json::from_str(&run.stdout).unwrap();
        parsed.envelope.map(|raw| raw.get().to_string()).unwrap_or_default()
    }

    /// Ledger status of an event for the target whose canonical URL starts with `url_prefix`.
    pub fn ledger_status(&self, event_id: &str, url_prefix: &str) -> Option<String> {
        let inspection = self.inspect(event_id);
        target_of(&inspection, url_prefix)["status"].as_str().map(str::to_string)
    }

    /// Imports `n` events of `event_type` from JSON Lines written with unusual (but valid)
    /// formatting, so byte-identity checks mean something. Returns their ids in order.
    pub fn capture(&self, n: usize, event_type: &str) -> Vec<String> {
        let ids: Vec<String> = (0..n).map(|_| new_event_id()).collect();
        let lines: Vec<String> = ids.iter().enumerate().map(|(i, id)| odd_envelope(id, event_type, i)).collect();
        self.import(&lines);
        ids
    }

    /// Imports the given JSON Lines (each stored byte for byte).
    pub fn import(&self, lines: &[String]) {
        let file = self.path().join(format!("import-{}.jsonl", new_event_id()));
        std::fs::write(&file, lines.join("\n") + "\n").unwrap();
        let run = self.run(&["emit", "--jsonl", file.to_str().unwrap(), "--json"]).expect(0);
        assert_eq!(run.json()["captured"], lines.len(), "{}", run.stdout);
        std::fs::remove_file(file).unwrap();
    }

    /// One event through `emit --type`; returns its id.
    pub fn emit(&self, event_type: &str, payload: &str) -> String {
        let run = self.run(&["emit", "--type", event_type, "--payload", payload]).expect(0);
        run.stdout.trim().to_string()
    }

    pub fn write_credentials(&self, text: &str) {
        std::fs::write(self.path().join("credentials"), text).unwrap();
    }
}

/// The `targets[]` entry of an `inspect --json` document for a URL prefix.
#[track_caller]
pub fn target_of<'a>(inspection: &'a Value, url_prefix: &str) -> &'a Value {
    inspection["targets"]
        .as_array()
        .and_then(|targets| {
            targets.iter().find(|t| t["canonical_url"].as_str().is_some_and(|u| u.starts_with(url_prefix)))
        })
        .unwrap_or_else(|| panic!("no target {url_prefix} in {inspection:#}"))
}

/// Outcomes of the attempts recorded for one target, oldest first.
#[track_caller]
pub fn attempt_outcomes(inspection: &Value, url_prefix: &str) -> Vec<String> {
    target_of(inspection, url_prefix)["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap().to_string())
        .collect()
}

/// A fresh, valid ULID (Crockford base32; unique per process and call).
pub fn new_event_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let millis = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let random = (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut value: u128 = (u128::from(millis) << 80) | (u128::from(random) << 16) | u128::from(n as u16);
    let mut out = [0u8; 26];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(value & 31) as usize];
        value >>= 5;
    }
    String::from_utf8(out.to_vec()).unwrap()
}

/// A valid envelope with deliberately odd formatting: unsorted keys, spaces, an escaped
/// non-ASCII character and a float written with an exponent.
pub fn odd_envelope(event_id: &str, event_type: &str, i: usize) -> String {
    format!(
        r#"{{ "payload" : {{"n": {i}, "note": "caf\u00e9 #{i}", "ratio": 1.5e0}},  "event_type":"{event_type}", "event_id": "{event_id}" , "aggregate_id":"agg-{i}"}}"#
    )
}

/// A built-in receiver (`kitty-sync receiver serve`) as a child process; killed on drop.
pub struct Receiver {
    child: Option<Child>,
    /// `127.0.0.1:PORT`
    pub addr: String,
    pub db: PathBuf,
    stderr: Arc<Mutex<String>>,
}

impl Receiver {
    /// Starts on a free loopback port.
    pub fn start(db: &Path, extra: &[&str]) -> Receiver {
        Receiver::start_with(db, "127.0.0.1:0", extra, &[])
    }

    pub fn start_env(db: &Path, extra: &[&str], env: &[(&str, &str)]) -> Receiver {
        Receiver::start_with(db, "127.0.0.1:0", extra, env)
    }

    /// Starts on `bind` (port 0 for a free one; a port it had before for a restart).
    pub fn start_with(db: &Path, bind: &str, extra: &[&str], env: &[(&str, &str)]) -> Receiver {
        assert!(bind.starts_with("127.0.0.1:"), "tests only listen on loopback");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Receiver::try_start(db, bind, extra, env) {
                Ok(receiver) => return receiver,
                // Restarting on the same port can race the previous process's exit.
                Err(stderr) if stderr.contains("address already in use") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(stderr) => panic!("receiver did not start on {bind}: {stderr}"),
            }
        }
    }

    fn try_start(db: &Path, bind: &str, extra: &[&str], env: &[(&str, &str)]) -> Result<Receiver, String> {
        let mut command = bin();
        command
            .args(["receiver", "serve", "--bind", bind])
            .args(store_args(db))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Keep reading so the server never blocks on a full pipe.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        match line.trim_end().strip_prefix("listening on http://") {
            Some(addr) => {
                assert!(addr.starts_with("127.0.0.1:"), "{addr}");
                Ok(Receiver { child: Some(child), addr: addr.to_string(), db: db.to_path_buf(), stderr })
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(50));
                let text = stderr.lock().unwrap().clone();
                Err(format!("first line {line:?}; stderr: {text}"))
            }
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The batch endpoint, as an external receiver is configured.
    pub fn endpoint(&self) -> String {
        format!("http://{}/api/v1/events/batch/", self.addr)
    }

    /// Kills the process (as a crash or a destroyed preview environment would stop it).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn dump(&self) -> Dump {
        dump(&self.db)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a receiver database holds (`receiver dump --json`), envelopes kept byte for byte.
#[derive(Debug)]
pub struct Dump {
    pub json: Value,
    pub event_count: u64,
    pub batch_requests: u64,
    /// (event_id, stored envelope bytes), in store order.
    pub envelopes: Vec<(String, String)>,
}

impl Dump {
    pub fn ids(&self) -> Vec<String> {
        self.envelopes.iter().map(|(id, _)| id.clone()).collect()
    }

    pub fn by_id(&self) -> BTreeMap<String, String> {
        self.envelopes.iter().cloned().collect()
    }

    /// Batch requests answered with `status`.
    pub fn requests_with(&self, status: u16) -> u64 {
        self.json["batch_requests_by_status"][status.to_string()].as_u64().unwrap_or(0)
    }
}

pub fn dump(db: &Path) -> Dump {
    #[derive(Deserialize)]
    struct Raw {
        events: Vec<RawEvent>,
    }
    #[derive(Deserialize)]
    struct RawEvent {
        event_id: String,
        envelope: Box<RawValue>,
    }
    let run = Run::from(bin().args(["receiver", "dump", "--json"]).args(store_args(db)).output().unwrap()).expect(0);
    let json: Value = run.json();
    let raw: Raw = serde_json::from_str(&run.stdout).unwrap();
    Dump {
        event_count: json["event_count"].as_u64().unwrap(),
        batch_requests: json["batch_requests"].as_u64().unwrap(),
        envelopes: raw.events.into_iter().map(|e| (e.event_id, e.envelope.get().to_string())).collect(),
        json,
    }
}

/// `--db PATH`, or `--store URL` when the "path" is a `postgres://` URL (the PostgreSQL tests
/// use the same helpers).
fn store_args(db: &Path) -> Vec<std::ffi::OsString> {
    match db.to_str() {
        Some(url) if url.starts_with("postgres://") => vec!["--store".into(), url.into()],
        _ => vec!["--db".into(), db.into()],
    }
}

/// A loopback URL nothing listens on (the port was free a moment ago).
pub fn closed_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}/api/v1/events/batch/")
}

/// Sends SIGKILL to a child (the `kill -9` of the stories) and reaps it.
pub fn kill9(child: &mut Child) {
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-KILL", &pid]).status();
    let _ = child.wait();
}

/// Waits for a child with a bound; returns its exit code and output.
#[track_caller]
pub fn finish(mut child: Child, limit: Duration) -> Run {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return Run::from(child.wait_with_output().unwrap());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not finish within {limit:?}: {:?}", child.wait_with_output().map(Run::from));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `check` until it holds (or panics after `limit`).
#[track_caller]
pub fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

// ---------------------------------------------------------------------------------------
// A scripted HTTP server for answers the built-in receiver never gives.

/// One request the fake server received (body gunzipped when it was gzip).
#[derive(Debug, Clone)]
pub struct FakeRequest {
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl FakeRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }

    pub fn is_batch(&self) -> bool {
        self.method == "POST" && self.path.starts_with("/api/v1/events/batch")
    }

    /// The event ids of a batch body, in order.
    pub fn event_ids(&self) -> Vec<String> {
        let json: Value = serde_json::from_slice(&self.body).unwrap_or(Value::Null);
        json["events"]
            .as_array()
            .map(|events| events.iter().filter_map(|e| e["event_id"].as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone)]
pub struct FakeResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl FakeResponse {
    pub fn json(status: u16, body: &Value) -> FakeResponse {
        FakeResponse {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        }
    }

    pub fn text(status: u16, body: &str) -> FakeResponse {
        FakeResponse {
            status,
            headers: vec![("Content-Type".into(), "text/html".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    /// 200 with `success` for every event of the batch.
    pub fn all_success(request: &FakeRequest) -> FakeResponse {
        let results: Vec<Value> =
            request.event_ids().iter().map(|id| serde_json::json!({"event_id": id, "status": "success"})).collect();
        FakeResponse::json(200, &serde_json::json!({ "results": results }))
    }
}

type Handler = dyn Fn(&FakeRequest) -> FakeResponse + Send + Sync;

/// Answers every request with `handler` (one request per connection); stops on drop.
pub struct FakeServer {
    pub addr: String,
    requests: Arc<Mutex<Vec<FakeRequest>>>,
    stop: Arc<AtomicBool>,
}

impl FakeServer {
    pub fn start(handler: impl Fn(&FakeRequest) -> FakeResponse + Send + Sync + 'static) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let (seen, stopping) = (Arc::clone(&requests), Arc::clone(&stop));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (seen, handler) = (Arc::clone(&seen), Arc::clone(&handler));
                std::thread::spawn(move || serve_one(stream, &seen, handler.as_ref()));
            }
        });
        FakeServer { addr, requests, stop }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}/api/v1/events/batch/", self.addr)
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<FakeRequest> {
        self.requests.lock().unwrap().clone()
    }

    pub fn batches(&self) -> Vec<FakeRequest> {
        self.requests().into_iter().filter(FakeRequest::is_batch).collect()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
    }
}

fn serve_one(mut stream: TcpStream, seen: &Mutex<Vec<FakeRequest>>, handler: &Handler) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Some(request) = read_request(&mut stream) else { return };
    let response = handler(&request);
    seen.lock().unwrap().push(request);
    let reason = match response.status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        _ => "Scripted",
    };
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        response.body.len()
    );
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&response.body);
    let _ = stream.flush();
}

fn read_request(stream: &mut TcpStream) -> Option<FakeRequest> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let mut body = Vec::new();
    if headers.get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).ok()?;
            let size = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0u8; size + 2];
            reader.read_exact(&mut chunk).ok()?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = headers.get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(length, 0);
        reader.read_exact(&mut body).ok()?;
    }
    if headers.get("content-encoding").is_some_and(|v| v.eq_ignore_ascii_case("gzip")) {
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(body.as_slice()).read_to_end(&mut plain).ok()?;
        body = plain;
    }
    Some(FakeRequest { method, path, headers, body })
}
