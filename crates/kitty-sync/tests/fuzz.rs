//! Bounded fuzzing of every engine parser that reads outside bytes, as property tests: JSON
//! Lines import (plain and gzip), the wire-response mapping, `config.toml` and `credentials`,
//! and the legacy queue and Python store readers on damaged copies of real files.
//!
//! `KITTY_SYNC_FUZZ_CASES=N` sets the cases per property (default small, so CI stays fast);
//! a long run is `KITTY_SYNC_FUZZ_CASES=200000 cargo test -p kitty-sync --test fuzz --release`.
//! Properties: no panic, bounded time and memory, a clear error naming what is wrong, and
//! for importers nothing partially imported from a source reported as failed.

use std::fs;
use std::io::{BufReader, Cursor, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use flate2::Compression;
use flate2::write::GzEncoder;
use kitty_sync::authority::{AuthorityInputs, TargetAuthority};
use kitty_sync::delivery::backoff::RetryAfter;
use kitty_sync::delivery::wire::{self, HttpReply, Verdict};
use kitty_sync::event_journal::{CapturePolicy, ImportOptions, Journal};
use kitty_sync::home::{Config, Credentials, Home};
use kitty_sync::legacy::{self, MigrateOptions};
use kitty_sync::store::Store;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("KITTY_SYNC_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

fn new_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&Home::at(dir.path())).unwrap();
    (dir, store)
}

/// A connection of the test's own to a store file (the engine keeps its own to itself), or
/// `None` when no store was created.
fn observe(db: &Path) -> Option<rusqlite::Connection> {
    db.exists().then(|| {
        let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        conn
    })
}

fn event_count(db: &Path) -> i64 {
    observe(db).map_or(0, |conn| conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0)).unwrap())
}

/// A line that is valid, almost valid, or noise.
fn jsonl_line() -> impl Strategy<Value = Vec<u8>> {
    let id = "[0-7][0-9A-HJKMNP-TV-Z]{25}";
    prop_oneof![
        (id, "[A-Za-z]{1,8}").prop_map(|(id, t)| format!(r#"{{"event_id":"{id}","event_type":"{t}"}}"#).into_bytes()),
        (id, 0usize..300).prop_map(|(id, depth)| {
            format!(r#"{{"event_id":"{id}","event_type":"Deep","p":{}{}}}"#, "[".repeat(depth), "]".repeat(depth))
                .into_bytes()
        }),
        "[ -~]{0,60}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..80),
        Just(b"\xef\xbb\xbf{}".to_vec()),
        Just(b"{\"event_id\":\"\xff\xfe\"}".to_vec()),
    ]
}

fn jsonl_file() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec((jsonl_line(), prop_oneof![Just(&b"\n"[..]), Just(&b"\r\n"[..]), Just(&b""[..])]), 0..12)
        .prop_map(|lines| {
            lines.into_iter().flat_map(|(line, end)| line.into_iter().chain(end.iter().copied())).collect()
        })
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// Imports `input` into a fresh store and checks the all-or-nothing rules.
fn check_import(input: &mut dyn std::io::BufRead, skip_invalid: bool) -> Result<(), TestCaseError> {
    let (_dir, mut store) = new_store();
    let options = ImportOptions { default_type: None, skip_invalid };
    let result = Journal::new(&mut store, CapturePolicy::default()).import(input, &options, &mut |_| {});
    let stored = event_count(store.path());
    match result {
        Ok(report) if report.committed => {
            prop_assert_eq!(stored as u64, report.captured, "{:?}", report);
            for invalid in &report.invalid {
                prop_assert!(!invalid.error.is_empty());
            }
        }
        Ok(report) => {
            prop_assert_eq!(stored, 0, "a rolled-back import left events: {:?}", report);
            prop_assert!(!report.invalid.is_empty());
        }
        Err(error) => {
            prop_assert_eq!(stored, 0, "a failed import left events: {}", error);
            prop_assert!(!error.to_string().is_empty() && !error.hint().is_empty());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(64))]

    #[test]
    fn jsonl_import_of_any_bytes(input in jsonl_file(), skip in any::<bool>()) {
        check_import(&mut Cursor::new(input), skip)?;
    }

    #[test]
    fn jsonl_import_of_damaged_gzip(input in jsonl_file(), cut in any::<prop::sample::Index>(), flip in any::<(prop::sample::Index, u8)>(), damage in 0u8..3) {
        let mut gz = gzip(&input);
        match damage {
            0 => gz.truncate(cut.index(gz.len())),
            1 => { let at = flip.0.index(gz.len()); gz[at] ^= flip.1 | 1; }
            _ => {}
        }
        let reader = flate2::bufread::MultiGzDecoder::new(Cursor::new(gz));
        check_import(&mut BufReader::new(reader), false)?;
    }

    #[test]
    fn wire_mapping_of_any_reply(
        status in prop_oneof![100u16..600, any::<u16>()],
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            reply_json().prop_map(String::into_bytes),
        ],
        retry_after in "[ -~]{0,12}",
        n in 0usize..5,
    ) {
        let ids: Vec<String> = (0..n).map(|i| format!("01KVYWRGJEV7CEZW6J7GXEBN1{i}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let retry_after = wire::parse_retry_after(&retry_after);
        let reply = HttpReply { status, body, retry_after };
        match wire::map_reply(&ids, &reply) {
            Verdict::PerEvent(outcomes) => {
                prop_assert!((200..300).contains(&status));
                prop_assert_eq!(outcomes.len(), ids.len());
            }
            Verdict::AuthFailed { .. } => prop_assert!(status == 401 || status == 403),
            Verdict::Transient { error, .. } | Verdict::TooLarge { error } | Verdict::RejectAll { error }
            | Verdict::BadRequest { error, .. } => prop_assert!(!error.is_empty()),
        }
    }

    #[test]
    fn retry_after_of_any_text(text in "\\PC{0,30}") {
        // Seconds or an HTTP date (contract 7); anything else is no answer, never a panic.
        match wire::parse_retry_after(&text) {
            Some(RetryAfter::Delay(_)) => prop_assert!(text.trim().chars().all(|c| c.is_ascii_digit())),
            Some(RetryAfter::At(_)) => prop_assert!(httpdate::parse_http_date(text.trim()).is_ok()),
            None => {}
        }
    }

    #[test]
    fn config_and_credentials_of_any_text(text in prop_oneof![
        toml_like(),
        prop::collection::vec(any::<u8>(), 0..120).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ], raw in prop::collection::vec(any::<u8>(), 0..60)) {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in [("config.toml", text.as_bytes()), ("credentials", text.as_bytes()), ("raw", &raw[..])] {
            let path = dir.path().join(name);
            fs::write(&path, bytes).unwrap();
            if let Err(error) = Config::load(&path) {
                prop_assert!(error.to_string().contains(&path.display().to_string()), "{}", error);
                prop_assert!(!error.hint().is_empty());
            } else if let Ok(config) = Config::load(&path) {
                let _ = config.mode();
            }
            if let Err(error) = Credentials::load(&path) {
                prop_assert!(error.to_string().contains(&path.display().to_string()), "{}", error);
                prop_assert!(!error.hint().is_empty());
            }
        }
    }
}

fn reply_json() -> impl Strategy<Value = String> {
    let status =
        prop_oneof![Just("success"), Just("duplicate"), Just("rejected"), Just("pending"), Just("weird"), Just("")];
    let entry = (0usize..6, status, "[ -~&&[^\"\\\\]]{0,20}")
        .prop_map(|(i, s, e)| format!(r#"{{"event_id":"01KVYWRGJEV7CEZW6J7GXEBN1{i}","status":"{s}","error":"{e}"}}"#));
    prop_oneof![
        prop::collection::vec(entry.clone(), 0..6).prop_map(|r| format!(r#"{{"results":[{}]}}"#, r.join(","))),
        prop::collection::vec(entry, 0..4)
            .prop_map(|r| format!(r#"{{"error":"too large?","details":{:?}}}"#, format!("[{}]", r.join(",")))),
        Just(r#"{"details":[{"event_id":5}]}"#.to_string()),
        Just(r#"{"results":{}}"#.to_string()),
        Just("[]".to_string()),
    ]
}

fn toml_like() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("mode"),
        Just("server_url"),
        Just("url"),
        Just("access"),
        Just("local_only_types"),
        Just("username")
    ];
    let value = prop_oneof![
        "\"[ -~&&[^\"\\\\]]{0,20}\"".prop_map(|s| s.to_string()),
        Just("[\"a\", 1]".to_string()),
        Just("{ x = 1 }".to_string()),
        Just("1979-05-27T07:32:00Z".to_string()),
        "[0-9]{1,30}".prop_map(|s| s.to_string()),
        Just("\"\\uD800\"".to_string()),
    ];
    let section = prop_oneof![
        Just("[sync]"),
        Just("[event_sync]"),
        Just("[tokens]"),
        Just("[user]"),
        Just("[server]"),
        Just("[[x]]")
    ];
    prop::collection::vec((section, prop::collection::vec((key, value), 0..4)), 0..4).prop_map(|sections| {
        sections
            .into_iter()
            .map(|(s, pairs)| {
                let body: Vec<String> = pairs.into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{s}\n{}\n", body.join("\n"))
            })
            .collect()
    })
}

fn legacy_fixture() -> PathBuf {
    support::shared_fixtures().join("legacy-queues/public/home")
}

fn copy_fixture(to: &Path) -> Vec<PathBuf> {
    let from = legacy_fixture();
    fs::create_dir_all(to.join("queues")).unwrap();
    let mut queues = Vec::new();
    for name in ["queue.db", "active_queue_scope"] {
        fs::copy(from.join(name), to.join(name)).unwrap();
    }
    queues.push(to.join("queue.db"));
    for entry in fs::read_dir(from.join("queues")).unwrap() {
        let entry = entry.unwrap();
        let target = to.join("queues").join(entry.file_name());
        fs::copy(entry.path(), &target).unwrap();
        queues.push(target);
    }
    for queue in &queues {
        let mut permissions = fs::metadata(queue).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        permissions.set_readonly(false);
        fs::set_permissions(queue, permissions).unwrap();
    }
    queues.sort();
    queues
}

#[derive(Debug, Clone)]
enum Damage {
    /// XOR bytes at these positions (taken modulo the file length).
    Flip(Vec<(prop::sample::Index, u8)>),
    /// Cut the file at a page boundary (4096-byte pages) or anywhere.
    Truncate(prop::sample::Index, bool),
    /// Overwrite one whole page with noise.
    Page(prop::sample::Index, u8),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8).prop_map(Damage::Flip),
        (any::<prop::sample::Index>(), any::<bool>()).prop_map(|(i, page)| Damage::Truncate(i, page)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Damage::Page(i, b)),
    ]
}

fn apply(path: &Path, damage: &Damage) {
    let mut bytes = fs::read(path).unwrap();
    if bytes.is_empty() {
        return;
    }
    match damage {
        Damage::Flip(flips) => {
            for (at, mask) in flips {
                let at = at.index(bytes.len());
                bytes[at] ^= mask;
            }
        }
        Damage::Truncate(at, page) => {
            let cut = at.index(bytes.len());
            bytes.truncate(if *page { cut / 4096 * 4096 } else { cut });
        }
        Damage::Page(at, fill) => {
            let page = at.index(bytes.len().div_ceil(4096)) * 4096;
            let end = (page + 4096).min(bytes.len());
            bytes[page..end].iter_mut().enumerate().for_each(|(i, b)| *b = fill.wrapping_add(i as u8));
        }
    }
    fs::write(path, bytes).unwrap();
}

proptest! {
    #![proptest_config(cases(12))]

    #[test]
    fn legacy_queues_damaged_at_random(which in any::<prop::sample::Index>(), damage in damage()) {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        let queues = copy_fixture(dir.path());
        apply(&queues[which.index(queues.len())], &damage);
        let authority = TargetAuthority::resolve(&AuthorityInputs::default());
        let report = legacy::migrate(&home, &authority, &MigrateOptions::default(), &mut |_| {});
        let report = match report {
            Ok(report) => report,
            Err(error) => {
                prop_assert!(!error.hint().is_empty(), "{}", error);
                return Ok(());
            }
        };
        let Some(conn) = observe(&home.store_path()) else { return Ok(()) };
        let provenance = |source: &str| -> i64 {
            conn
                .query_row("SELECT count(*) FROM migration_provenance WHERE source = ?1", [source], |r| r.get(0))
                .unwrap()
        };
        for source in &report.sources {
            if let Some(error) = &source.error {
                prop_assert!(!error.is_empty());
                prop_assert_eq!(source.imported, 0, "{} failed but imported rows", source.path);
                prop_assert_eq!(provenance(&source.source), 0, "{} failed but left rows", source.path);
            }
        }
        let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        prop_assert_eq!(integrity, "ok");
        prop_assert_eq!(event_count(&home.store_path()) as u64, report.totals.imported);
    }
}

#[test]
fn an_endless_line_is_refused_without_holding_it() {
    use kitty_sync::event_journal::MAX_LINE_BYTES;
    let (_dir, mut store) = new_store();
    let good = r#"{"event_id":"01KVYWRGJEV7CEZW6J7GXEBN16","event_type":"A"}"#;
    let mut input = format!("{good}\n{{\"event_id\":\"").into_bytes();
    input.resize(input.len() + MAX_LINE_BYTES + 10, b'x');
    input.extend_from_slice(b"\"}\n");
    input.extend_from_slice(br#"{"event_id":"01KVYWRGJEV7CEZW6J7GXEBN17","event_type":"A"}"#);
    let options = ImportOptions { default_type: None, skip_invalid: true };
    let report = Journal::new(&mut store, CapturePolicy::default())
        .import(&mut BufReader::new(Cursor::new(input)), &options, &mut |_| {})
        .unwrap();
    assert_eq!((report.captured, report.lines), (2, 3), "{report:?}");
    assert_eq!(report.invalid.len(), 1);
    assert_eq!(report.invalid[0].line, 2);
    assert!(report.invalid[0].error.contains("line longer than"), "{}", report.invalid[0].error);
}

mod support;

/// The Python store files of the two fixture homes, and which one each belongs to.
const PYTHON_FILES: [(&str, &str); 6] = [
    ("public", "event_journal/journal-local.db"),
    ("public", "event_journal/journal-tm-alice-private.db"),
    ("public", "delivery/ledger.db"),
    ("public", "delivery/targets.db"),
    ("public-327", "projects/a781258b-0c7f-4871-a308-ecada586e22a/sync/sync.db"),
    ("public-327", "projects/c19b6058-574e-4dbc-bf64-46251b8fa120/sync/sync.db"),
];

/// The source a Python store file is read as: `targets.db` belongs to the ledger's source.
fn python_source_of(file: &str) -> &str {
    if file == "delivery/targets.db" { "delivery/ledger.db" } else { file }
}

fn python_home(fixture: &str, without: Option<&str>) -> (tempfile::TempDir, Home) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("home");
    support::copy_tree(&support::shared_fixtures().join("python-stores").join(fixture).join("home"), &root);
    if let Some(file) = without {
        fs::remove_file(root.join(file)).unwrap();
    }
    let home = Home::at(&root);
    (dir, home)
}

/// What an import left in the journal, in terms that do not depend on sequence numbers.
#[derive(Debug, Default, PartialEq, Eq)]
struct Imported {
    events: std::collections::BTreeSet<String>,
    ledger: std::collections::BTreeSet<(String, String, String, String)>,
    provenance: std::collections::BTreeMap<String, i64>,
    targets: std::collections::BTreeSet<(String, String, String)>,
}

fn imported(home: &Home) -> Imported {
    let Some(conn) = observe(&home.store_path()) else { return Imported::default() };
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(integrity, "ok");
    let rows = |sql: &str, n: usize| -> Vec<Vec<String>> {
        let mut stmt = conn.prepare(sql).unwrap();
        stmt.query_map([], |r| (0..n).map(|i| r.get::<_, String>(i)).collect()).unwrap().map(Result::unwrap).collect()
    };
    Imported {
        events: rows("SELECT event_id FROM events", 1).into_iter().map(|r| r[0].clone()).collect(),
        ledger: rows(
            "SELECT e.event_id, t.canonical_url, t.team_slug, l.status FROM ledger l
             JOIN events e ON e.seq = l.seq JOIN targets t ON t.id = l.target",
            4,
        )
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone(), r[2].clone(), r[3].clone()))
        .collect(),
        provenance: rows("SELECT source, CAST(count(*) AS TEXT) FROM migration_provenance GROUP BY source", 2)
            .into_iter()
            .map(|r| (r[0].clone(), r[1].parse().unwrap()))
            .collect(),
        targets: rows("SELECT canonical_url, team_slug, user_email FROM targets", 3)
            .into_iter()
            .map(|r| (r[0].clone(), r[1].clone(), r[2].clone()))
            .collect(),
    }
}

/// What a clean import of the fixture leaves when one source is missing: the only outcome a
/// damaged copy of that source may lead to once it is reported as failed. Cached, since
/// there are only a few.
fn imported_without(fixture: &str, source: &str) -> std::sync::Arc<Imported> {
    type Cache = std::sync::Mutex<std::collections::HashMap<(String, String), std::sync::Arc<Imported>>>;
    static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Cache::default);
    let key = (fixture.to_string(), source.to_string());
    if let Some(found) = cache.lock().unwrap().get(&key) {
        return found.clone();
    }
    let (_dir, home) = python_home(fixture, Some(source));
    migrate_within(&home, std::time::Duration::from_secs(120)).unwrap();
    let found = std::sync::Arc::new(imported(&home));
    cache.lock().unwrap().insert(key, found.clone());
    found
}

/// Runs `f` on its own thread, so a reader that loops on a damaged page is a failed case
/// rather than a hung test run.
fn within<T: Send + 'static>(limit: std::time::Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

fn migrate_within(home: &Home, limit: std::time::Duration) -> Result<legacy::MigrationReport, String> {
    let worker = home.clone();
    let run = within(limit, move || {
        let authority = TargetAuthority::resolve(&AuthorityInputs::default());
        legacy::migrate(&worker, &authority, &MigrateOptions::default(), &mut |_| {})
    });
    match run {
        Some(result) => result.map_err(|e| format!("{e} (hint: {})", e.hint())),
        None => Err(format!("the migration did not finish within {limit:?}")),
    }
}

proptest! {
    #![proptest_config(cases(16))]

    #[test]
    fn python_stores_damaged_at_random(which in any::<prop::sample::Index>(), damage in damage()) {
        let (fixture, file) = PYTHON_FILES[which.index(PYTHON_FILES.len())];
        let damaged_source = python_source_of(file);
        let (_dir, home) = python_home(fixture, None);
        apply(&home.root().join(file), &damage);
        let report = migrate_within(&home, std::time::Duration::from_secs(60));
        // A damaged source is a per-source finding, never a failed migration.
        let report = report.map_err(|e| TestCaseError::fail(format!("{file} {damage:?}: {e}")))?;
        let mut failed = None;
        for source in &report.sources {
            let Some(error) = &source.error else { continue };
            prop_assert!(source.path.ends_with(damaged_source), "undamaged {} failed: {}", source.path, error);
            prop_assert!(!error.is_empty());
            prop_assert_eq!((source.imported, source.ledger_rows), (0, 0), "{} failed but counted rows", source.path);
            failed = Some(source.source.clone());
        }
        let now = imported(&home);
        prop_assert_eq!(now.events.len() as u64, report.totals.imported);
        if let Some(source) = failed {
            prop_assert!(!now.provenance.contains_key(&source), "{} failed but left provenance", source);
            // Nothing of it, and everything of the others: exactly a clean import without it.
            let expected = imported_without(fixture, damaged_source);
            prop_assert_eq!(&now, &*expected, "{} {:?}", file, damage);
        }
    }
}

/// A store of a few hundred events, and every line `tail` prints for it, built once.
fn tail_fixture() -> &'static (Vec<u8>, Vec<String>) {
    static FIXTURE: std::sync::OnceLock<(Vec<u8>, Vec<String>)> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| {
        let (dir, mut store) = new_store();
        let lines: String = (0..300)
            .map(|i| {
                format!(
                    "{{\"event_id\":\"{}\",\"event_type\":\"T{}\",\"payload\":{{\"n\":{i},\"pad\":\"{}\"}}}}\n",
                    ulid::Ulid::generate(),
                    i % 3,
                    "x".repeat(i % 200)
                )
            })
            .collect();
        let options = ImportOptions { default_type: None, skip_invalid: false };
        Journal::new(&mut store, CapturePolicy::default())
            .import(&mut Cursor::new(lines), &options, &mut |_| {})
            .unwrap();
        drop(store);
        let home = Home::at(dir.path());
        let (printed, damage) = tail_all(&home);
        assert!(damage.is_none());
        let printed: Vec<String> = printed.unwrap().lines().map(str::to_string).collect();
        assert_eq!(printed.len(), 300);
        // A writer leaves a small WAL beside the store: fold it in, so the bytes damaged below
        // are the whole journal.
        let conn = rusqlite::Connection::open(home.store_path()).unwrap();
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
        drop(conn);
        (fs::read(home.store_path()).unwrap(), printed)
    })
}

/// Everything `tail` prints, and how it ends.
fn tail_all(home: &Home) -> (Result<String, kitty_sync::Error>, Option<kitty_sync::Error>) {
    let mut tail = match kitty_sync::tail::JournalTail::new(home, Vec::new(), None) {
        Ok(tail) => tail,
        Err(e) => return (Err(e), None),
    };
    let mut out = Vec::new();
    loop {
        match tail.next_page(&mut out, 64) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return (Err(e), tail.damage()),
        }
    }
    (Ok(String::from_utf8_lossy(&out).into_owned()), tail.damage())
}

proptest! {
    #![proptest_config(cases(24))]

    #[test]
    fn tail_exports_what_a_damaged_store_still_holds(damage in damage()) {
        let (pristine, all) = tail_fixture();
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        fs::create_dir_all(home.store_path().parent().unwrap()).unwrap();
        fs::write(home.store_path(), pristine).unwrap();
        apply(&home.store_path(), &damage);
        let worker = home.clone();
        let Some((printed, damaged)) = within(std::time::Duration::from_secs(60), move || tail_all(&worker)) else {
            return Err(TestCaseError::fail(format!("tail did not finish: {damage:?}")));
        };
        let printed = match printed {
            Ok(printed) => printed,
            Err(e) => {
                prop_assert!(!e.hint().is_empty(), "{}", e);
                return Ok(());
            }
        };
        // A flipped byte inside an envelope is not something SQLite can see; whole pages are.
        // An empty file is what a store looks like before its first commit.
        if matches!(damage, Damage::Flip(_)) || fs::metadata(home.store_path()).unwrap().len() == 0 {
            return Ok(());
        }
        let lines: Vec<&str> = printed.lines().collect();
        for line in &lines {
            prop_assert!(all.iter().any(|a| a == line), "tail printed what was never stored: {}", line);
        }
        if lines.len() < all.len() {
            let error = damaged.ok_or_else(|| TestCaseError::fail(format!("{} of {} printed, no error", lines.len(), all.len())))?;
            prop_assert!(error.hint().contains("kitty-sync tail > rescue.jsonl"), "{}", error.hint());
            prop_assert_eq!(error.exit_code(), 1);
        }
    }
}

/// Found by `tail_exports_what_a_damaged_store_still_holds`: SQLite read a store cut short
/// near its end as a journal that simply ended there, and `tail` exited 0 without the last
/// events.
#[test]
fn a_store_cut_short_is_not_read_as_a_shorter_journal() {
    let (pristine, all) = tail_fixture();
    let mut exported_some = false;
    for percent in 90..100 {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        fs::create_dir_all(home.store_path().parent().unwrap()).unwrap();
        fs::write(home.store_path(), &pristine[..pristine.len() * percent / 100]).unwrap();
        let error = match tail_all(&home) {
            (Ok(printed), damage) => {
                assert!(printed.lines().all(|line| all.iter().any(|a| a == line)));
                exported_some |= !printed.is_empty();
                damage.unwrap_or_else(|| panic!("cut at {percent}%: the export ended cleanly"))
            }
            (Err(error), _) => error,
        };
        assert!(error.hint().contains("kitty-sync tail > rescue.jsonl"), "{percent}%: {error}: {}", error.hint());
    }
    assert!(exported_some, "no cut left anything readable: the test cuts in the wrong place");
}
