//! Python store import throughput (contract §12): spec-kitty 3.2.4 stores (exact DDL) with
//! 100,000 events in 4 journals and a ledger of 300,000 rows (3 targets: delivered, parked,
//! rejected, transient, pending), imported into a fresh journal. Targets: ≤ 3 s; a re-run
//! with nothing new ≤ 0.5 s. Run with `cargo bench -p kitty-sync --bench migrate_python`.

use std::path::Path;
use std::time::Duration;

use kitty_sync::authority::{AuthorityInputs, TargetAuthority};
use kitty_sync::home::Home;
use kitty_sync::legacy::{self, MigrateOptions};
use rusqlite::{Connection, params};
use support::{Phase, event_id, generated_home, timed};

#[path = "support/mod.rs"]
mod support;

const JOURNALS: usize = 4;
const EVENTS: usize = 100_000;
const TARGETS: usize = 3;
const IMPORT_TARGET: Duration = Duration::from_secs(3);
const RERUN_TARGET: Duration = Duration::from_millis(500);

const JOURNAL_DDL: &str = include_str!("../tests/data/spec_kitty_324_journal.sql");
const TARGETS_DDL: &str = include_str!("../tests/data/spec_kitty_324_targets.sql");
const LEDGER_DDL: &str = include_str!("../tests/data/spec_kitty_324_ledger.sql");

/// A 3.2.4 envelope: `json.dumps(envelope, sort_keys=True)` (default separators).
fn envelope(id: &str, n: usize) -> String {
    format!(
        "{{\"aggregate_id\": \"WP{w:02}\", \"aggregate_type\": \"WorkPackage\", \"build_id\": \"01KEZ7T6HDQPQV5EVDHX4RYJYK\", \
         \"causation_id\": null, \"correlation_id\": \"{id}\", \"event_id\": \"{id}\", \"event_type\": \"WPStatusChanged\", \
         \"git_branch\": \"main\", \"head_commit_sha\": \"221d8584deb23390f135ef208ddf35878b06050f\", \"lamport_clock\": {n}, \
         \"node_id\": \"a1b2c3d4e5f6\", \"payload\": {{\"actor\": \"claude\", \"from_lane\": \"planned\", \
         \"mission_slug\": \"119-retention-gc\", \"note\": \"Progress note #{n} \\u2014 caf\\u00e9\", \"to_lane\": \"doing\", \
         \"wp_id\": \"WP{w:02}\"}}, \"project_slug\": \"offline-sync\", \"project_uuid\": \"4c91ce27-3c2c-4bda-9c59-0101468b71ac\", \
         \"repo_slug\": \"acme/offline-sync\", \"schema_version\": \"3.0.0\", \"team_slug\": \"tm-alice-private\", \
         \"timestamp\": \"2026-11-29T18:03:30.584919+00:00\"}}",
        w = n % 12
    )
}

fn target_id(t: usize) -> String {
    format!("tgt_tm_alice_private_{t:032x}")
}

fn generate(home: &Path) {
    std::fs::create_dir_all(home.join("event_journal")).expect("event_journal/");
    std::fs::create_dir_all(home.join("delivery")).expect("delivery/");
    let per = EVENTS / JOURNALS;
    for j in 0..JOURNALS {
        let mut conn = Connection::open(home.join(format!("event_journal/journal-team-{j}.db"))).expect("journal");
        conn.execute_batch(JOURNAL_DDL).expect("journal DDL");
        let tx = conn.transaction().expect("begin");
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO event_journal (event_id, event_type, payload, occurred_at, created_at)
                     VALUES (?1, 'WPStatusChanged', ?2, ?3, ?3)",
                )
                .expect("prepare");
            for i in 0..per {
                let n = j * per + i;
                let id = event_id("01M8", n);
                let at = format!("2026-11-29T18:{:02}:{:02}.{:06}+00:00", n / 60_000 % 60, n / 1000 % 60, n % 1000);
                insert.execute(params![id, envelope(&id, n).into_bytes(), at]).expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    let targets = Connection::open(home.join("delivery/targets.db")).expect("targets.db");
    targets.execute_batch(TARGETS_DDL).expect("targets DDL");
    for t in 0..TARGETS {
        targets
            .execute(
                "INSERT INTO delivery_targets (target_id, canonical_url, url_hash, team_slug, user_email, first_seen_at, last_seen_at)
                 VALUES (?1, ?2, ?3, 'tm-alice-private', '', '2026-11-29T18:00:00+00:00', '2026-11-29T18:00:00+00:00')",
                params![target_id(t), format!("https://teamspace-{t}.example.com"), format!("{t:064x}")],
            )
            .expect("target");
    }
    let mut ledger = Connection::open(home.join("delivery/ledger.db")).expect("ledger.db");
    ledger.execute_batch(LEDGER_DDL).expect("ledger DDL");
    let tx = ledger.transaction().expect("begin");
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO delivery_ledger (event_id, target_id, status, attempt_count, last_attempted_at, last_http_status)
                 VALUES (?1, ?2, ?3, ?4, '2026-11-29T18:05:00+00:00', 200)",
            )
            .expect("prepare");
        for n in 0..EVENTS {
            for t in 0..TARGETS {
                let status = match (n + t) % 20 {
                    0 => "terminal_failed",
                    1 => "rejected",
                    2 => "failed_transient",
                    3 => "pending",
                    4 => "duplicate",
                    _ => "success",
                };
                insert
                    .execute(params![event_id("01M8", n), target_id(t), status, 1 + (n % 3) as i64])
                    .expect("ledger row");
            }
        }
    }
    tx.commit().expect("commit");
}

fn main() {
    let (_dir, home_dir, generated) = generated_home(generate);
    let home = Home::at(&home_dir);
    let authority = TargetAuthority::resolve(&AuthorityInputs::default());
    let timed =
        || timed(|| legacy::migrate(&home, &authority, &MigrateOptions::default(), &mut |_| {}).expect("import runs"));
    let (import, report) = timed();
    assert_eq!(report.totals.imported, EVENTS as u64);
    assert_eq!(report.totals.ledger_rows, (EVENTS * TARGETS) as u64);
    assert_eq!(report.totals.targets, TARGETS as u64);
    assert_eq!(report.totals.source_errors + report.totals.invalid_rows + report.totals.conflicts, 0);
    let (rerun, rerun_report) = timed();
    assert_eq!(rerun_report.totals.imported, 0);
    assert!(rerun_report.sources.iter().all(|s| s.unchanged));

    println!(
        "python input: {JOURNALS} journals, {EVENTS} events, {} ledger rows for {TARGETS} targets (generated in {generated:.2?})",
        EVENTS * TARGETS
    );
    let verdict = |took: &Phase, target: Duration| {
        if took.wall <= target { "OK" } else { "SLOWER THAN TARGET (check the machine's load)" }
    };
    println!("import            : {import}  target {IMPORT_TARGET:?} -> {}", verdict(&import, IMPORT_TARGET));
    println!("re-run (unchanged): {rerun}  target {RERUN_TARGET:?} -> {}", verdict(&rerun, RERUN_TARGET));
}
