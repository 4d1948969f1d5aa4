//! Load benchmark of the receiver on loopback, with durable commits.
//!
//! SQLite (`synchronous=FULL`):
//! 1. one client posting 1,000-event gzip batches of ~500-byte events: events/s;
//! 2. four concurrent clients doing the same: p50/p99 latency per batch.
//!
//! PostgreSQL (needs `KITTY_SYNC_TEST_PG_URL`, e.g. through `scripts/pg-test-cluster run`):
//! 3. two replicas on one database, four clients each, the same batches: aggregate events/s
//!    and p50/p99 latency per batch;
//! 4. listing 1,000,000 stored events page by page (`limit=1000`) through one replica.
//!
//! Bounded in count and time; stops by itself. Batches are built and compressed before the
//! clock starts, so the numbers are the server's (plus loopback HTTP), not the client's gzip.
//! Run: `cargo bench -p kitty-sync-receiver --bench load [-- sqlite|pg]`

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::write::GzEncoder;
use kitty_sync_receiver::testing::PgScratch;
use kitty_sync_receiver::{PgLocation, PgStore, ReceiverStore, RunningServer, ServerConfig, SqliteStore};

const EVENTS_PER_BATCH: usize = 1_000;
const SINGLE_CLIENT_BATCHES: usize = 60;
const CONCURRENT_CLIENTS: usize = 4;
const BATCHES_PER_CONCURRENT_CLIENT: usize = 25;
const PHASE_TIME_LIMIT: Duration = Duration::from_secs(60);

/// Each phase runs this many times on fresh ids: on a shared machine one run can be unlucky.
const ROUNDS: usize = 3;

const PG_REPLICAS: usize = 2;
const PG_CLIENTS_PER_REPLICA: usize = 4;
const PG_BATCHES_PER_CLIENT: usize = 15;
const PG_LISTED_EVENTS: i64 = 1_000_000;

fn main() {
    let chosen: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let wants = |name: &str| chosen.is_empty() || chosen.iter().any(|c| c == name);
    if wants("sqlite") {
        sqlite_bench();
    }
    if wants("pg") {
        match PgScratch::new() {
            Some(scratch) => pg_bench(&scratch),
            None => println!("PostgreSQL: skipped (no KITTY_SYNC_TEST_PG_URL; see scripts/pg-test-cluster)"),
        }
    }
}

fn sqlite_bench() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("bench.db");
    let store: Arc<dyn ReceiverStore> = Arc::new(SqliteStore::open(&db).expect("open store"));
    let server = RunningServer::start("127.0.0.1:0".parse().expect("addr"), ServerConfig::default(), store)
        .expect("start server");
    let url = format!("{}/api/v1/events/batch/", server.url());
    let mut ids = IdSource::default();

    let warmup = build_batches(&mut ids, 5);
    post_all(&url, &warmup, PHASE_TIME_LIMIT);
    let sample = &warmup[0];
    println!(
        "batch: {EVENTS_PER_BATCH} events, {} bytes JSON ({} bytes/event), {} bytes gzip; rss {} MiB",
        sample.raw_len,
        sample.raw_len / EVENTS_PER_BATCH,
        sample.gzip.len(),
        rss_mib()
    );

    for round in 1..=ROUNDS {
        let batches = build_batches(&mut ids, SINGLE_CLIENT_BATCHES);
        let (started, cpu) = (Instant::now(), cpu_seconds());
        let latencies = post_all(&url, &batches, PHASE_TIME_LIMIT);
        report(&format!("round {round}, 1 client "), &latencies, started.elapsed(), cpu_seconds() - cpu);
    }
    for round in 1..=ROUNDS {
        let per_client: Vec<Vec<Batch>> =
            (0..CONCURRENT_CLIENTS).map(|_| build_batches(&mut ids, BATCHES_PER_CONCURRENT_CLIENT)).collect();
        let (started, cpu) = (Instant::now(), cpu_seconds());
        let mut latencies: Vec<f64> = std::thread::scope(|scope| {
            let handles: Vec<_> =
                per_client.iter().map(|batches| scope.spawn(|| post_all(&url, batches, PHASE_TIME_LIMIT))).collect();
            handles.into_iter().flat_map(|h| h.join().expect("client thread")).collect()
        });
        let (elapsed, cpu) = (started.elapsed(), cpu_seconds() - cpu);
        latencies.sort_by(f64::total_cmp);
        report(&format!("round {round}, {CONCURRENT_CLIENTS} clients"), &latencies, elapsed, cpu);
    }

    server.stop().expect("graceful stop");
    let stored = SqliteStore::open_read_only(&db).and_then(|s| s.stats()).expect("stats");
    println!(
        "stored {} events in {} batch requests; database {} MiB",
        stored.event_count,
        stored.batch_requests,
        std::fs::metadata(&db).map(|m| m.len() / (1024 * 1024)).unwrap_or(0)
    );
}

fn pg_bench(scratch: &PgScratch) {
    let location = PgLocation::parse(&scratch.url(), None).expect("test URL");
    let replicas: Vec<RunningServer> = (0..PG_REPLICAS)
        .map(|_| {
            let store = PgStore::open(&location, 8).expect("open PostgreSQL store");
            RunningServer::start("127.0.0.1:0".parse().expect("addr"), ServerConfig::default(), store)
                .expect("start replica")
        })
        .collect();
    let urls: Vec<String> = replicas.iter().map(|r| format!("{}/api/v1/events/batch/", r.url())).collect();
    let mut ids = IdSource::default();
    for url in &urls {
        post_all(url, &build_batches(&mut ids, 2), PHASE_TIME_LIMIT);
    }
    println!(
        "PostgreSQL: {PG_REPLICAS} replicas x {PG_CLIENTS_PER_REPLICA} clients, {EVENTS_PER_BATCH}-event gzip batches"
    );
    for round in 1..=2 {
        let per_client: Vec<(usize, Vec<Batch>)> = (0..PG_REPLICAS * PG_CLIENTS_PER_REPLICA)
            .map(|client| (client % PG_REPLICAS, build_batches(&mut ids, PG_BATCHES_PER_CLIENT)))
            .collect();
        let (started, cpu) = (Instant::now(), cpu_seconds());
        let mut latencies: Vec<f64> = std::thread::scope(|scope| {
            let handles: Vec<_> = per_client
                .iter()
                .map(|(replica, batches)| {
                    let url = &urls[*replica];
                    scope.spawn(move || post_all(url, batches, PHASE_TIME_LIMIT))
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("client thread")).collect()
        });
        let (elapsed, cpu) = (started.elapsed(), cpu_seconds() - cpu);
        latencies.sort_by(f64::total_cmp);
        report(&format!("round {round}, {} clients", per_client.len()), &latencies, elapsed, cpu);
    }
    fill_to(scratch, PG_LISTED_EVENTS);
    let base = replicas[0].url();
    for round in 1..=2 {
        let started = Instant::now();
        let (events, pages) = list_all(&base);
        let elapsed = started.elapsed().as_secs_f64();
        println!(
            "round {round}, listing: {events} events in {pages} pages in {elapsed:.2} s = {:.0} events/s",
            events as f64 / elapsed
        );
    }
}

/// Tops the store up to `total` events with one SQL statement (envelopes like the posted
/// ones, ~500 bytes), committed before the listing starts, so every row is settled.
fn fill_to(scratch: &PgScratch, total: i64) {
    let held: i64 = scratch.query_column("SELECT count(*) FROM kitty_receiver_events")[0].parse().expect("count");
    let missing = total - held;
    if missing <= 0 {
        return;
    }
    let started = Instant::now();
    scratch.sql(&format!(
        "INSERT INTO kitty_receiver_events (seq, event_id, event_type, received_at, xid, envelope)
         SELECT (pg_current_xact_id()::text::bigint << 24) + g, 'FILL' || lpad(g::text, 22, '0'), 'WPStatusChanged',
                '2026-05-01T12:00:00.000000Z', pg_current_xact_id(),
                format('{{\"event_id\": \"%s\", \"event_type\": \"WPStatusChanged\", \"aggregate_id\": \"WP07\", \"aggregate_type\": \"WorkPackage\", \"schema_version\": \"3.0.0\", \"timestamp\": \"2026-05-01T12:00:00.000000+00:00\", \"node_id\": \"a1b2c3d4e5f6\", \"lamport_clock\": %s, \"team_slug\": \"kitty-team\", \"project_uuid\": null, \"payload\": {{\"from_lane\": \"doing\", \"to_lane\": \"for_review\", \"actor\": \"claude\", \"note\": \"%s\", \"mission_slug\": \"042-event-sync\"}}}}',
                       'FILL' || lpad(g::text, 22, '0'), g, md5(g::text) || md5((g + 1)::text) || md5((g + 2)::text) || md5((g + 3)::text))
         FROM generate_series(1, {missing}) AS g;
         ANALYZE kitty_receiver_events"
    ));
    println!("filled {missing} events by SQL in {:.1} s", started.elapsed().as_secs_f64());
}

/// Pages through everything a replica lists, `limit=1000` at a time; (events, pages).
fn list_all(base: &str) -> (usize, usize) {
    #[derive(serde::Deserialize)]
    struct Page {
        events: Vec<serde::de::IgnoredAny>,
        next_after: i64,
    }
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(30))).build().into();
    let (mut after, mut events, mut pages) = (0i64, 0usize, 0usize);
    loop {
        let url = format!("{base}/api/v1/events/?after={after}&limit=1000");
        let mut response = agent.get(&url).call().expect("list events");
        let body = response.body_mut().with_config().limit(64 * 1024 * 1024).read_to_string().expect("read page");
        let page: Page = serde_json::from_str(&body).expect("page JSON");
        if page.events.is_empty() {
            return (events, pages);
        }
        events += page.events.len();
        pages += 1;
        after = page.next_after;
    }
}

/// `cpu` is the process's CPU time (server and client threads), which, unlike wall time,
/// does not depend on what else the machine is doing.
fn report(label: &str, sorted_latencies: &[f64], elapsed: Duration, cpu: f64) {
    let events = sorted_latencies.len() * EVENTS_PER_BATCH;
    println!(
        "{label}: {events:>6} events in {:.2} s = {:>6.0} events/s; per batch p50 {:>5.1} ms, p99 {:>5.1} ms, max {:>5.1} ms; cpu {:.1} ms/batch; rss {} MiB",
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64(),
        percentile(sorted_latencies, 50.0),
        percentile(sorted_latencies, 99.0),
        sorted_latencies.last().copied().unwrap_or(0.0),
        cpu * 1000.0 / sorted_latencies.len().max(1) as f64,
        rss_mib(),
    );
}

struct Batch {
    raw_len: usize,
    gzip: Vec<u8>,
}

/// Unique, valid event ids without a clock: a fixed prefix and a counter in base 10.
#[derive(Default)]
struct IdSource {
    next: u64,
    rng: u64,
}

impl IdSource {
    fn id(&mut self) -> String {
        self.next += 1;
        format!("01KVYWRGJE{:016}", self.next)
    }

    /// xorshift: payload text that compresses like real data (not like a run of spaces).
    fn noise(&mut self, len: usize) -> String {
        if self.rng == 0 {
            self.rng = 0x9E37_79B9_7F4A_7C15;
        }
        (0..len)
            .map(|_| {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                char::from(b"abcdefghijklmnopqrstuvwxyz0123456789 "[(self.rng % 37) as usize])
            })
            .collect()
    }
}

fn envelope(ids: &mut IdSource) -> String {
    let id = ids.id();
    let note = ids.noise(120);
    format!(
        concat!(
            r#"{{"event_id": "{id}", "event_type": "WPStatusChanged", "aggregate_id": "WP07", "#,
            r#""aggregate_type": "WorkPackage", "schema_version": "3.0.0", "#,
            r#""timestamp": "2026-05-01T12:00:00.000000+00:00", "node_id": "a1b2c3d4e5f6", "#,
            r#""lamport_clock": {n}, "team_slug": "kitty-team", "project_uuid": null, "#,
            r#""payload": {{"from_lane": "doing", "to_lane": "for_review", "actor": "claude", "#,
            r#""note": "{note}", "mission_slug": "042-event-sync"}}}}"#
        ),
        id = id,
        n = ids.next,
        note = note
    )
}

fn build_batches(ids: &mut IdSource, count: usize) -> Vec<Batch> {
    (0..count)
        .map(|_| {
            let events: Vec<String> = (0..EVENTS_PER_BATCH).map(|_| envelope(ids)).collect();
            let body = format!("{{\"events\": [{}]}}", events.join(", "));
            let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
            encoder.write_all(body.as_bytes()).expect("gzip");
            Batch { raw_len: body.len(), gzip: encoder.finish().expect("gzip") }
        })
        .collect()
}

/// Posts each batch in turn; returns the latency (ms) of every batch answered, sorted.
fn post_all(url: &str, batches: &[Batch], limit: Duration) -> Vec<f64> {
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(30))).build().into();
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(batches.len());
    for batch in batches {
        if started.elapsed() > limit {
            eprintln!("time limit reached after {} batches", latencies.len());
            break;
        }
        let sent = Instant::now();
        let mut response = agent
            .post(url)
            .header("Content-Type", "application/json")
            .header("Content-Encoding", "gzip")
            .send(&batch.gzip[..])
            .expect("post batch");
        let body = response.body_mut().read_to_string().expect("read response");
        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
        assert!(
            body.matches("\"success\"").count() == EVENTS_PER_BATCH,
            "unexpected answer: {}",
            &body[..body.len().min(300)]
        );
    }
    latencies.sort_by(f64::total_cmp);
    latencies
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// User + system CPU seconds of this process, from /proc (0 where unavailable).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<u64>().ok()).sum();
    ticks as f64 / 100.0
}

fn rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}
