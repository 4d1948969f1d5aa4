//! What only a shared PostgreSQL store promises: several replicas on one database, a listing
//! that never skips while they write, outages answered 503 with automatic recovery, and
//! schema migrations applied once. Needs `KITTY_SYNC_TEST_PG_URL` (`scripts/pg-test-cluster`):
//! without it these fail under `CI=true` and skip loudly elsewhere.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use kitty_sync_receiver::testing::PgScratch;
use kitty_sync_receiver::{PgLocation, PgStore, RunningServer, ServerConfig, StoreError};

fn scratch() -> Option<(PgScratch, PgLocation)> {
    let scratch = PgScratch::new()?;
    let location = PgLocation::parse(&scratch.url(), None).unwrap();
    Some((scratch, location))
}

fn replica(location: &PgLocation) -> RunningServer {
    serve(PgStore::open(location, 4).unwrap().into(), ServerConfig::default())
}

fn health_id(server: &RunningServer) -> Reply {
    get(&format!("{}/api/v1/sync/health/", server.url()), &[])
}

/// Every page of the listing from `after`, following `next_after`, until an empty page.
fn list_from(base: &str, mut after: i64, limit: usize) -> (Vec<String>, i64) {
    let mut ids = Vec::new();
    loop {
        let page = get(&format!("{base}/api/v1/events/?after={after}&limit={limit}"), &[]).json();
        let events = page["events"].as_array().unwrap().clone();
        if events.is_empty() {
            return (ids, after);
        }
        ids.extend(events.iter().map(|e| e["event_id"].as_str().unwrap().to_string()));
        after = page["next_after"].as_i64().unwrap();
    }
}

#[test]
fn replicas_store_each_id_once_under_concurrent_overlapping_posts() {
    let Some((_scratch, location)) = scratch() else { return };
    let replicas = [replica(&location), replica(&location), replica(&location)];
    let events: Vec<String> = (0..300).map(|n| envelope(&ulid(n), "A")).collect();
    // Six clients, two per replica, each posting overlapping windows of the same ids.
    let answers: Vec<(String, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6)
            .map(|client| {
                let url = replicas[client % 3].url();
                let events = &events;
                scope.spawn(move || {
                    let mut answers = Vec::new();
                    for window in 0..10 {
                        let start = (window * 25 + client * 10) % 250;
                        let body = batch(&events[start..start + 50]);
                        let reply = post_gzip(&format!("{url}/api/v1/events/batch/"), &body);
                        assert_eq!(reply.status, 200, "{}", reply.body);
                        for result in reply.json()["results"].as_array().unwrap() {
                            let id = result["event_id"].as_str().unwrap().to_string();
                            answers.push((id, result["status"].as_str().unwrap().to_string()));
                        }
                    }
                    answers
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let mut successes: HashMap<String, usize> = HashMap::new();
    for (id, status) in &answers {
        assert!(status == "success" || status == "duplicate", "{status}");
        *successes.entry(id.clone()).or_default() += usize::from(status == "success");
    }
    assert!(successes.values().all(|n| *n == 1), "each id answered success exactly once: {successes:?}");
    let stored = block_on(PgStore::open_read_only(&location).unwrap().stats()).unwrap();
    assert_eq!(stored.event_count as usize, successes.len());
    assert_eq!(stored.batch_requests, 60);
    let ids: BTreeSet<String> =
        replicas.iter().map(|r| health_id(r).json()["server_instance_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), 1, "every replica reports the database's identity");
}

/// A transaction that began before a committed batch, and commits after it, must not be
/// skipped by a reader that paged past the batch: the listing holds the batch back until
/// the older transaction is settled.
#[test]
fn a_page_never_passes_an_unsettled_transaction() {
    let Some((scratch, location)) = scratch() else { return };
    let server = replica(&location);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let slow = runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&scratch.url(), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        // A writer that has its transaction id but has not inserted yet.
        client.batch_execute("BEGIN; SELECT pg_current_xact_id();").await.unwrap();
        client
    });
    let reply = post_gzip(&format!("{}/api/v1/events/batch/", server.url()), &batch(&[envelope(&ulid(2), "A")]));
    assert_eq!(reply.statuses(), ["success"]);
    let (seen, after) = list_from(&server.url(), 0, 10);
    assert!(seen.is_empty(), "a later transaction's events are held back while an older one runs: {seen:?}");

    let slow_row = envelope(&ulid(1), "A");
    runtime.block_on(async {
        let insert = "INSERT INTO kitty_receiver_events (seq, event_id, event_type, received_at, xid, envelope)
                      VALUES ((pg_current_xact_id()::text::bigint << 24), $1, 'A', 'x', pg_current_xact_id(), $2)";
        slow.execute(insert, &[&ulid(1), &slow_row]).await.unwrap();
        slow.batch_execute("COMMIT").await.unwrap();
    });
    let (seen, _) = list_from(&server.url(), after, 10);
    assert_eq!(seen, [ulid(1), ulid(2)], "the older transaction comes first, nothing skipped");
}

#[test]
fn listing_while_replicas_write_never_skips_or_repeats() {
    let Some((_scratch, location)) = scratch() else { return };
    let replicas = [replica(&location), replica(&location)];
    const WRITERS: u32 = 4;
    const BATCHES: u32 = 40;
    const PER_BATCH: u32 = 10;
    let listed = std::thread::scope(|scope| {
        for writer in 0..WRITERS {
            let url = format!("{}/api/v1/events/batch/", replicas[(writer % 2) as usize].url());
            scope.spawn(move || {
                for b in 0..BATCHES {
                    let first = (writer * BATCHES + b) * PER_BATCH;
                    let events: Vec<String> = (first..first + PER_BATCH).map(|n| envelope(&ulid(n), "A")).collect();
                    assert_eq!(post_gzip(&url, &batch(&events)).status, 200);
                }
            });
        }
        let reader = scope.spawn(|| {
            let (mut ids, mut after) = (Vec::new(), 0);
            let mut turn = 0;
            let deadline = Instant::now() + Duration::from_secs(120);
            while ids.len() < (WRITERS * BATCHES * PER_BATCH) as usize && Instant::now() < deadline {
                // Alternate replicas: they must agree on what is settled.
                let (page, next) = list_from(&replicas[turn % 2].url(), after, 7);
                turn += 1;
                ids.extend(page);
                after = next;
            }
            ids
        });
        reader.join().unwrap()
    });
    let unique: BTreeSet<&String> = listed.iter().collect();
    assert_eq!(unique.len(), listed.len(), "no event listed twice");
    let expected: BTreeSet<String> = (0..WRITERS * BATCHES * PER_BATCH).map(ulid).collect();
    assert_eq!(unique.into_iter().cloned().collect::<BTreeSet<_>>(), expected, "every event listed");
}

#[test]
fn database_outage_answers_503_stores_nothing_and_recovers() {
    let Some((scratch, _location)) = scratch() else { return };
    let mut proxy = Proxy::start(&scratch.url());
    let location = PgLocation::parse(&proxy.url, None).unwrap();
    let server = replica(&location);
    let batch_url = format!("{}/api/v1/events/batch/", server.url());
    let events: Vec<String> = (0..50).map(|n| envelope(&ulid(n), "A")).collect();
    assert_eq!(post_gzip(&batch_url, &batch(&events[..10])).statuses(), vec!["success"; 10]);

    proxy.stop();
    let reply = post_gzip(&batch_url, &batch(&events[10..]));
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(health_id(&server).status, 503);

    proxy.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    let reply = loop {
        let reply = post_gzip(&batch_url, &batch(&events[10..]));
        if reply.status == 200 || Instant::now() > deadline {
            break reply;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(reply.statuses(), vec!["success"; 40], "nothing of the failed batch was stored");
    assert_eq!(health_id(&server).status, 200);
}

#[test]
fn replicas_starting_together_migrate_once_and_a_newer_schema_is_refused() {
    let Some((scratch, location)) = scratch() else { return };
    let ids: BTreeSet<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6)
            .map(|_| scope.spawn(|| block_on(PgStore::open(&location, 1).unwrap().server_instance_id()).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(ids.len(), 1);
    assert_eq!(scratch.query_column("SELECT version FROM kitty_receiver_schema"), ["1"]);
    assert_eq!(scratch.query_column("SELECT count(*) FROM kitty_receiver_meta"), ["1"]);

    scratch.sql("INSERT INTO kitty_receiver_schema (version) VALUES (99)");
    match PgStore::open(&location, 1) {
        Err(StoreError::NewerSchema { found: 99, known: 1, database }) => {
            let password = String::from_utf8(location.config().get_password().unwrap().to_vec()).unwrap();
            assert!(!database.contains(&password), "{database}");
        }
        other => panic!("expected a refusal, got {:?}", other.err()),
    }
    assert!(matches!(PgStore::open_read_only(&location), Err(StoreError::NewerSchema { .. })));
}

#[test]
fn a_schema_dropped_while_serving_is_recreated_with_a_new_identity() {
    let Some((scratch, location)) = scratch() else { return };
    let server = replica(&location);
    let first = health_id(&server).json()["server_instance_id"].clone();
    let body = batch(&[envelope(&ulid(1), "A")]);
    let batch_url = format!("{}/api/v1/events/batch/", server.url());
    assert_eq!(post_gzip(&batch_url, &body).statuses(), ["success"]);
    scratch.wipe();
    let second = health_id(&server).json()["server_instance_id"].clone();
    assert_ne!(first, second, "a re-created schema is a new receiver");
    assert_eq!(post_gzip(&batch_url, &body).statuses(), ["success"]);
}

#[test]
fn unreachable_or_empty_databases_are_reported_clearly() {
    let Some((scratch, location)) = scratch() else { return };
    assert!(matches!(PgStore::open_read_only(&location), Err(StoreError::NoSchema { .. })));
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let nowhere = PgLocation::parse(&format!("postgres://kitty:s3cret@{closed}/db"), None).unwrap();
    match PgStore::open(&nowhere, 1) {
        Err(error @ StoreError::Unreachable { .. }) => assert!(!error.to_string().contains("s3cret"), "{error}"),
        other => panic!("expected unreachable, got {:?}", other.err()),
    }
    drop(scratch);
}

/// A TCP forwarder in front of the test database that can be cut and restored on the same
/// port: an outage as the receiver sees it, without stopping the shared server.
struct Proxy {
    listen: SocketAddr,
    upstream: SocketAddr,
    url: String,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    fn start(url: &str) -> Proxy {
        let location = PgLocation::parse(url, None).unwrap();
        let host = match &location.config().get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(host) => host.clone(),
            other => panic!("TCP host expected, got {other:?}"),
        };
        let port = location.config().get_ports().first().copied().unwrap_or(5432);
        let upstream: SocketAddr = format!("{host}:{port}").parse().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let listen = listener.local_addr().unwrap();
        let url = url.replacen(&format!("{host}:{port}"), &listen.to_string(), 1);
        let mut proxy = Proxy {
            listen,
            upstream,
            url,
            conns: Arc::default(),
            stop: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&mut self, listener: TcpListener) {
        let (upstream, conns, stop) = (self.upstream, Arc::clone(&self.conns), Arc::clone(&self.stop));
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(upstream) else { continue };
                conns.lock().unwrap().extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
    }

    /// Refuses new connections and cuts the open ones.
    fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        for conn in self.conns.lock().unwrap().drain(..) {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restart(&mut self) {
        self.stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let listener = TcpListener::bind(self.listen).unwrap();
        self.serve(listener);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}
