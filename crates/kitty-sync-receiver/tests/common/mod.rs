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
use kitty_sync_receiver::testing::PgScratch;
use kitty_sync_receiver::{
    AnyStore, PgLocation, PgStore, ReceiverStore, RunningServer, ServerConfig, SqliteStore, StoreStats,
};
use serde_json::Value;

/// The store a test runs against. Every HTTP test runs once per store (see [`both_stores!`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Declares each named test function `fn NAME(backend: Backend)` as two tests,
/// `sqlite::NAME` and `postgres::NAME`. The PostgreSQL variant needs `KITTY_SYNC_TEST_PG_URL`
/// (`scripts/pg-test-cluster`): without it, it fails under `CI=true` and skips loudly elsewhere.
#[macro_export]
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name($crate::common::Backend::Sqlite) } )*
        }
        mod postgres {
            $(
                #[test]
                fn $name() {
                    if kitty_sync_receiver::testing::test_pg_url().is_some() {
                        super::$name($crate::common::Backend::Postgres)
                    }
                }
            )*
        }
    };
}

/// Where a test receiver keeps its events.
pub enum Place {
    Sqlite(PathBuf),
    Postgres { scratch: PgScratch, location: Box<PgLocation> },
}

impl Place {
    pub fn new(backend: Backend, dir: &Path) -> Place {
        match backend {
            Backend::Sqlite => Place::Sqlite(dir.join("r.db")),
            Backend::Postgres => {
                let scratch = PgScratch::new().expect("KITTY_SYNC_TEST_PG_URL is set");
                let location = Box::new(PgLocation::parse(&scratch.url(), None).unwrap());
                Place::Postgres { scratch, location }
            }
        }
    }

    /// A new store on this place (creating it when needed), as the server holds it.
    pub fn open(&self) -> AnyStore {
        match self {
            Place::Sqlite(db) => {
                let store: Arc<dyn ReceiverStore> = Arc::new(SqliteStore::open(db).unwrap());
                store.into()
            }
            Place::Postgres { location, .. } => PgStore::open(location, 8).unwrap().into(),
        }
    }

    /// A read-only view, as `receiver dump` opens it.
    pub fn open_read_only(&self) -> AnyStore {
        match self {
            Place::Sqlite(db) => SqliteStore::open_read_only(db).unwrap().into(),
            Place::Postgres { location, .. } => PgStore::open_read_only(location).unwrap().into(),
        }
    }

    /// Throws everything away: the file deleted, or the schema dropped and created empty.
    pub fn wipe(&self) {
        match self {
            Place::Sqlite(db) => std::fs::remove_file(db).unwrap(),
            Place::Postgres { scratch, .. } => scratch.wipe(),
        }
    }
}

pub struct Receiver {
    pub server: Option<RunningServer>,
    pub place: Place,
    pub dir: tempfile::TempDir,
}

impl Receiver {
    pub fn start(backend: Backend, config: ServerConfig) -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        let place = Place::new(backend, dir.path());
        let server = Some(serve(place.open(), config));
        Receiver { server, place, dir }
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
        self.server = Some(serve(self.place.open(), config));
    }

    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().unwrap();
        }
    }

    /// What the database holds, read through a separate read-only store.
    pub fn stats(&self) -> StoreStats {
        block_on(self.place.open_read_only().stats()).unwrap()
    }

    pub fn envelopes(&self) -> Vec<String> {
        let store = self.place.open_read_only();
        block_on(store.events_after(0, 1_000_000)).unwrap().into_iter().map(|e| e.envelope).collect()
    }
}

pub fn serve(store: AnyStore, config: ServerConfig) -> RunningServer {
    RunningServer::start("127.0.0.1:0".parse().unwrap(), config, store).unwrap()
}

/// Runs one store call from a synchronous test.
pub fn block_on<T>(work: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(work)
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
