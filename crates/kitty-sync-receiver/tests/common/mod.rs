//! Helpers shared by the receiver's integration tests: a real server on 127.0.0.1:0 and a
//! blocking HTTP client.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flate2::Compression;
use flate2::write::GzEncoder;
use kitty_sync_receiver::{ReceiverStore, RunningServer, ServerConfig, SqliteStore, StoreStats};
use serde_json::Value;

pub struct Receiver {
    pub server: Option<RunningServer>,
    pub db: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Receiver {
    pub fn start(config: ServerConfig) -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("r.db");
        let server = Some(serve(&db, config));
        Receiver { server, db, dir }
    }

    pub fn url(&self) -> String {
        self.server.as_ref().unwrap().url()
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.as_ref().unwrap().addr()
    }

    pub fn batch_url(&self) -> String {
        format!("{}/api/v1/events/batch/", self.url())
    }

    /// Stops the server (gracefully) and starts a new one on the same database.
    pub fn restart(&mut self, config: ServerConfig) {
        self.stop();
        self.server = Some(serve(&self.db, config));
    }

    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().unwrap();
        }
    }

    /// What the database holds, read through a separate read-only store.
    pub fn stats(&self) -> StoreStats {
        SqliteStore::open_read_only(&self.db).unwrap().stats().unwrap()
    }

    pub fn envelopes(&self) -> Vec<String> {
        let store = SqliteStore::open_read_only(&self.db).unwrap();
        store.events_after(0, 1_000_000).unwrap().into_iter().map(|e| e.envelope).collect()
    }
}

pub fn serve(db: &Path, config: ServerConfig) -> RunningServer {
    let store: Arc<dyn ReceiverStore> = Arc::new(SqliteStore::open(db).unwrap());
    RunningServer::start("127.0.0.1:0".parse().unwrap(), config, store).unwrap()
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

pub struct Reply {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// `status` of every result, in order.
    pub fn statuses(&self) -> Vec<String> {
        self.json()["results"]
            .as_array()
            .unwrap_or_else(|| panic!("no results: {}", self.body))
            .iter()
            .map(|r| r["status"].as_str().unwrap().to_string())
            .collect()
    }
}

fn reply(mut response: ureq::http::Response<ureq::Body>) -> Reply {
    let status = response.status().as_u16();
    let headers =
        response.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect();
    let body = response.body_mut().with_config().limit(64 * 1024 * 1024).read_to_string().unwrap();
    Reply { status, body, headers }
}

pub fn post(url: &str, body: &[u8], headers: &[(&str, &str)]) -> Reply {
    let mut request = agent().post(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    reply(request.send(body).unwrap())
}

pub fn post_json(url: &str, body: &str) -> Reply {
    post(url, body.as_bytes(), &[("Content-Type", "application/json")])
}

pub fn post_gzip(url: &str, body: &str) -> Reply {
    post(url, &gzip(body.as_bytes()), &[("Content-Type", "application/json"), ("Content-Encoding", "gzip")])
}

pub fn get(url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = agent().get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    reply(request.call().unwrap())
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// A valid ULID that is unique per `n` within a test.
pub fn ulid(n: u32) -> String {
    format!("01KVYWRGJEV7CEZW6J7G{n:06}")
}

/// An envelope the way Python's `json.dumps` writes it (`", "` and `": "` separators,
/// non-ASCII escaped), so "stored verbatim" is a meaningful check.
pub fn envelope(id: &str, event_type: &str) -> String {
    format!(r#"{{"event_id": "{id}", "event_type": "{event_type}", "payload": {{"note": "caf\u00e9", "n": 1.50}}}}"#)
}

pub fn batch(events: &[String]) -> String {
    format!("{{\"events\": [{}]}}", events.join(", "))
}

/// Sends raw bytes and reads the whole answer; for requests a well-behaved client won't make.
pub fn raw_exchange(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(request).unwrap();
    read_response(&mut stream)
}

pub fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut text = Vec::new();
    let _ = stream.read_to_end(&mut text);
    let text = String::from_utf8_lossy(&text).to_string();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}
