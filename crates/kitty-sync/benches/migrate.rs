//! Legacy migration throughput: 10 spec-kitty 3.2.3 queue files (exact DDL) holding 100,000
//! rows of realistic ~800-byte Python-encoded envelopes, migrated into a fresh journal.
//! Target: ≤ 3 s. Run with `cargo bench -p kitty-sync --bench migrate`.

use std::path::Path;
use std::time::Duration;

use kitty_sync::authority::{AuthorityInputs, TargetAuthority};
use kitty_sync::home::Home;
use kitty_sync::legacy::{self, MigrateOptions};
use rusqlite::{Connection, params};
use support::{event_id, generated_home, timed};

#[path = "support/mod.rs"]
mod support;

const FILES: usize = 10;
const ROWS: usize = 100_000;
const TARGET: Duration = Duration::from_secs(3);

/// spec-kitty-cli 3.2.3's `OfflineQueue` schema, verbatim (shared with the migration tests).
const DDL_323: &str = include_str!("../tests/data/spec_kitty_323_queue.sql");

/// An envelope as spec-kitty 3.2.3 wrote it: `json.dumps` defaults, insertion order.
fn envelope(id: &str, n: usize) -> String {
    format!(
        "{{\"event_id\": \"{id}\", \"event_type\": \"WPStatusChanged\", \"aggregate_id\": \"WP{w:02}\", \
         \"aggregate_type\": \"WorkPackage\", \"schema_version\": \"3.0.0\", \"build_id\": \"01KHG5W0X0KJHYYQJATAB2A96V\", \
         \"payload\": {{\"mission_slug\": \"073-teamspace-ingress\", \"wp_id\": \"WP{w:02}\", \"from_lane\": \"planned\", \
         \"to_lane\": \"doing\", \"actor\": \"claude\", \"note\": \"Progress note #{n} \\u2014 caf\\u00e9 \\ud83d\\ude00\", \
         \"execution_mode\": \"worktree\"}}, \"node_id\": \"a1b2c3d4e5f6\", \"lamport_clock\": {n}, \
         \"causation_id\": null, \"correlation_id\": \"01KHG5W0X0KJHYYQJATAB2A96V\", \
         \"timestamp\": \"2026-02-27T16:05:08.123456+00:00\", \"team_slug\": \"team-gamma\", \
         \"project_uuid\": \"424b1fee-9709-4315-85d9-5954058b4714\", \"project_slug\": \"spec-kitty\", \
         \"git_branch\": \"main\", \"head_commit_sha\": \"3f9c2a7d1e4b5a6c7d8e9f0a1b2c3d4e5f6a7b8c\", \
         \"repo_slug\": \"priivacy-ai/spec-kitty\", \"drain_blocked_reason\": null}}",
        w = n % 12
    )
}

fn generate(home: &Path) {
    let queues = home.join("queues");
    std::fs::create_dir_all(&queues).expect("create queues/");
    let per_file = ROWS / FILES;
    for f in 0..FILES {
        let mut conn = Connection::open(queues.join(format!("queue-{f:016x}.db"))).expect("open legacy queue");
        conn.execute_batch(DDL_323).expect("3.2.3 DDL");
        let tx = conn.transaction().expect("begin");
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO queue (event_id, event_type, data, timestamp) VALUES (?1, 'WPStatusChanged', ?2, ?3)",
                )
                .expect("prepare");
            for i in 0..per_file {
                let n = f * per_file + i;
                let id = event_id("01KJ", n);
                insert.execute(params![id, envelope(&id, n), 1_772_208_308 + n as i64]).expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
}

fn main() {
    let (_dir, home_dir, generated) = generated_home(generate);
    let legacy_bytes: u64 = std::fs::read_dir(home_dir.join("queues"))
        .expect("list")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    let home = Home::at(&home_dir);
    let authority = TargetAuthority::resolve(&AuthorityInputs::default());

    let timed = |dry_run: bool| {
        timed(|| {
            legacy::migrate(&home, &authority, &MigrateOptions { dry_run, ..Default::default() }, &mut |_| {})
                .expect("migration runs")
        })
    };
    let (dry, dry_report) = timed(true);
    let (real, report) = timed(false);
    let (rerun, rerun_report) = timed(false);
    assert_eq!(dry_report.totals.imported, ROWS as u64);
    assert_eq!(report.totals.imported, ROWS as u64);
    assert_eq!(report.totals.source_errors + report.totals.invalid_rows + report.totals.conflicts, 0);
    assert_eq!(rerun_report.totals.deduped, ROWS as u64);

    println!(
        "legacy input: {FILES} files, {ROWS} rows, {:.1} MiB (generated in {:.2?})",
        legacy_bytes as f64 / 1_048_576.0,
        generated
    );
    println!("migrate --dry-run : {dry}");
    println!("migrate           : {real}  {:.0} rows/s", ROWS as f64 / real.wall.as_secs_f64());
    println!("migrate (re-run)  : {rerun}  (all deduped)");
    let verdict = if real.wall <= TARGET { "OK" } else { "SLOWER THAN TARGET (check the machine's load)" };
    println!("target            : {TARGET:>9.3?} wall -> {verdict}");
}
