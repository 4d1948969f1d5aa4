//! A store with a damaged page: every command either works around the damage or stops with
//! exit 1 and a hint naming `kitty-sync doctor` and the recovery path, never panics, and no
//! command makes the damage worse (events that could be read before still can).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use crate::common::{Home, Receiver, Run};

fn store_path(home: &Path) -> PathBuf {
    home.join("event-sync/kitty-sync.db")
}

/// Overwrites page `page` (4 KiB pages, 0-based) with a pattern no valid page has.
fn damage_page(db: &Path, page: usize) {
    let mut bytes = std::fs::read(db).unwrap();
    let start = page * 4096;
    let end = (start + 4096).min(bytes.len());
    for (i, byte) in bytes[start..end].iter_mut().enumerate() {
        *byte = (i * 7 + 3) as u8;
    }
    std::fs::write(db, bytes).unwrap();
}

/// Events whose row and stored bytes (unless gc purged them after archiving) SQLite can still
/// read, probed one by one so that a damaged page costs only the rows on it.
fn readable_events(db: &Path) -> usize {
    let Ok(conn) = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY) else { return 0 };
    let Ok(max) = conn.query_row("SELECT max(seq) FROM events", [], |r| r.get::<_, Option<i64>>(0)) else {
        return 0;
    };
    (1..=max.unwrap_or(0))
        .filter(|seq| {
            conn.query_row(
                "SELECT e.event_id, e.purged_at IS NOT NULL OR length(p.envelope) > 0
                 FROM events e LEFT JOIN payloads p USING (seq) WHERE e.seq = ?1",
                [seq],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?)),
            )
            .is_ok_and(|(_, kept)| kept)
        })
        .count()
}

/// Folds the WAL a writer leaves beside the store into the store file, so the file alone
/// holds the whole journal.
fn fold_wal(home: &Path) {
    let db = store_path(home);
    if db.exists() {
        let conn = Connection::open(&db).unwrap();
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
    }
}

/// Copies the config and the store file (the WAL folded in first).
fn copy_home(from: &Path, to: &Path) {
    fold_wal(from);
    std::fs::create_dir_all(to.join("event-sync")).unwrap();
    for name in ["config.toml", "event-sync/kitty-sync.db"] {
        if from.join(name).exists() {
            std::fs::copy(from.join(name), to.join(name)).unwrap();
        }
    }
}

#[track_caller]
fn assert_handled(run: &Run, what: &str) {
    assert!(!run.stderr.contains("panicked"), "{what}: {}", run.stderr);
    assert!(matches!(run.code, 0 | 1 | 3 | 4), "{what}: exit {}\n{}", run.code, run.stderr);
    let damaged = ["malformed", "damaged", "corrupt"].iter().any(|w| run.stderr.contains(w));
    if run.code != 0 && damaged {
        let hint = run.stderr.lines().find(|l| l.starts_with("hint:")).unwrap_or_default();
        assert!(hint.contains("kitty-sync doctor"), "{what}: the hint does not name doctor:\n{}", run.stderr);
        assert!(hint.contains("keep a copy"), "{what}: the hint does not protect the data:\n{}", run.stderr);
    }
}

#[test]
fn damaged_pages_are_reported_and_never_made_worse() {
    let outside = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&outside.path().join("r.db"), &[]);
    let pristine = Home::new();
    pristine.external(&receiver.endpoint());
    let ids = pristine.capture(150, "Kept");
    fold_wal(pristine.path());
    let pages = std::fs::metadata(store_path(pristine.path())).unwrap().len() as usize / 4096;
    // The header page, early schema/table pages, and spread through the data.
    let mut victims = vec![0, 1, 2, 3, 5];
    victims.extend((1..6).map(|k| k * pages / 6));
    let jsonl = outside.path().join("more.jsonl");
    std::fs::write(&jsonl, format!(r#"{{"event_id":"{}","event_type":"More"}}"#, crate::common::new_event_id()))
        .unwrap();
    let jsonl = jsonl.to_str().unwrap().to_string();
    for page in victims {
        let home = Home::new();
        copy_home(pristine.path(), home.path());
        let db = store_path(home.path());
        damage_page(&db, page);
        let readable_before = readable_events(&db);
        let status = home.run(&["status", "--json"]).json();
        if status["ok"] == true {
            assert_eq!(readable_before, ids.len(), "page {page}: status is ok over a damaged store: {status}");
        } else {
            let human = home.run(&["status"]);
            assert!(human.stdout.contains("kitty-sync doctor"), "page {page}: {}", human.stdout);
        }
        let commands: [&[&str]; 8] = [
            &["status", "--json"],
            &["inspect", &ids[0], "--json"],
            &["emit", "--type", "After", "--payload", "{}"],
            &["emit", "--jsonl", &jsonl],
            &["now", "--json"],
            &["archive", "--json"],
            &["gc", "--json"],
            &["migrate", "--json"],
        ];
        for args in commands {
            let run = home.run(args);
            assert_handled(&run, &format!("page {page}: {args:?}"));
        }
        let readable_after = readable_events(&db);
        assert!(
            readable_after >= readable_before,
            "page {page}: readable events went from {readable_before} to {readable_after}"
        );
    }
}

/// Event ids whose stored envelope SQLite can still read, probed one position at a time
/// (what an export can be expected to recover, with or without the event's row).
fn readable_ids(db: &Path) -> BTreeSet<String> {
    let Ok(conn) = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY) else { return BTreeSet::new() };
    let last = ["events", "payloads"].iter().find_map(|table| {
        conn.query_row(&format!("SELECT max(seq) FROM {table}"), [], |r| r.get::<_, Option<i64>>(0)).ok().flatten()
    });
    (1..=last.unwrap_or(0))
        .filter_map(|seq| {
            let envelope =
                conn.query_row("SELECT envelope FROM payloads WHERE seq = ?1", [seq], |r| r.get::<_, Vec<u8>>(0));
            let envelope: serde_json::Value = serde_json::from_slice(&envelope.ok()?).ok()?;
            Some(envelope["event_id"].as_str()?.to_string())
        })
        .collect()
}

fn lines_by_id(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .map(|line| {
            let envelope: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("tail printed a line that is not JSON ({e}): {line}"));
            (envelope["event_id"].as_str().unwrap().to_string(), line.to_string())
        })
        .collect()
}

#[test]
fn tail_exports_every_readable_event_of_a_damaged_store() {
    let pristine = Home::new();
    let ids = pristine.capture(400, "Kept");
    let clean = pristine.run(&["tail"]);
    assert_eq!(clean.code, 0, "{}", clean.stderr);
    let all = lines_by_id(&clean.stdout);
    assert_eq!(all.len(), ids.len());
    fold_wal(pristine.path());
    let pages = std::fs::metadata(store_path(pristine.path())).unwrap().len() as usize / 4096;
    let mut exported_past_damage = false;
    for page in [0, 1, 2, 3, 5].into_iter().chain((1..8).map(|k| k * pages / 8)) {
        let home = Home::new();
        copy_home(pristine.path(), home.path());
        let db = store_path(home.path());
        damage_page(&db, page);
        let readable = readable_ids(&db);
        let run = home.run(&["tail"]);
        assert!(!run.stderr.contains("panicked"), "page {page}: {}", run.stderr);
        let printed = lines_by_id(&run.stdout);
        for (id, line) in &printed {
            assert_eq!(all.get(id), Some(line), "page {page}: tail printed an envelope that was never stored");
        }
        let missing: Vec<&String> = readable.iter().filter(|id| !printed.contains_key(*id)).collect();
        assert!(missing.is_empty(), "page {page}: {} readable events not exported:\n{}", missing.len(), run.stderr);
        // A damaged page outside the events (meta, an index) still fails the export: the
        // store needs the operator's attention even though every event came out.
        if printed.len() == all.len() && run.code == 0 {
            continue;
        }
        assert_eq!(run.code, 1, "page {page}: an incomplete export must fail:\n{}", run.stderr);
        let hint = run.stderr.lines().find(|l| l.starts_with("hint:")).unwrap_or_default();
        assert!(hint.contains("kitty-sync doctor"), "page {page}: {}", run.stderr);
        assert!(hint.contains("kitty-sync tail > rescue.jsonl"), "page {page}: {}", run.stderr);
        // Events captured after the damaged range still come out.
        let first_lost = ids.iter().position(|id| !printed.contains_key(id));
        exported_past_damage |= first_lost.is_some_and(|at| ids[at..].iter().any(|id| printed.contains_key(id)));
    }
    assert!(exported_past_damage, "no damaged page was stepped over: the test damages the wrong pages");
}
