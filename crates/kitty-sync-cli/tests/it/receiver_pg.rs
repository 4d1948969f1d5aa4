//! `kitty-sync receiver serve --store postgres://…` from the outside: replicas sharing one
//! database, the product's `now` delivering to them, a wiped schema seen as a reset, and the
//! password kept out of every output. Needs `KITTY_SYNC_TEST_PG_URL`
//! (`scripts/pg-test-cluster`): without it these fail under `CI=true` and skip loudly elsewhere.

use crate::common;

use std::path::Path;

use common::{Home, Receiver, Run, bin, dump};
use kitty_sync_receiver::testing::PgScratch;

/// The scratch schema's store URL, as the helpers take it (see `common::store_args`).
fn store(scratch: &PgScratch) -> std::path::PathBuf {
    Path::new(&scratch.url()).to_path_buf()
}

fn password(url: &str) -> String {
    let (_, rest) = url.split_once("://").unwrap();
    let userinfo = rest.split('@').next().unwrap();
    userinfo.split_once(':').map(|(_, p)| p.to_string()).unwrap()
}

#[test]
fn two_replicas_take_overlapping_drains_once() {
    let Some(scratch) = PgScratch::new() else { return };
    let db = store(&scratch);
    let (a, b) = (Receiver::start(&db, &[]), Receiver::start(&db, &[]));
    let (home_a, home_b) = (Home::new(), Home::new());
    let lines: Vec<String> = (0..300).map(|i| common::odd_envelope(&common::new_event_id(), "Shared", i)).collect();
    // Each home holds 200 of the 300 events; 100 are in both.
    home_a.import(&lines[..200]);
    home_b.import(&lines[100..]);
    home_a.external(&a.endpoint());
    home_b.external(&b.endpoint());
    let drains: Vec<_> =
        [&home_a, &home_b].iter().map(|home| home.spawn(&["now", "--json", "--batch-events", "25"])).collect();
    let reports: Vec<serde_json::Value> = drains
        .into_iter()
        .map(|child| {
            let run = common::finish(child, std::time::Duration::from_secs(120)).expect(0);
            run.json()
        })
        .collect();
    let delivered: u64 = reports.iter().map(|r| r["delivered"].as_u64().unwrap()).sum();
    let duplicate: u64 = reports.iter().map(|r| r["duplicate"].as_u64().unwrap()).sum();
    assert_eq!((delivered, duplicate), (300, 100), "success exactly once per event: {reports:#?}");
    let held = dump(&db);
    assert_eq!(held.event_count, 300);
    // Stored byte for byte as the journal holds them, whichever replica took them.
    let by_id = held.by_id();
    for line in &lines[..5] {
        let id = serde_json::from_str::<serde_json::Value>(line).unwrap()["event_id"].as_str().unwrap().to_string();
        assert_eq!(by_id[&id], home_a.stored_envelope(&id));
    }
    assert_eq!(a.dump().json["server_instance_id"], b.dump().json["server_instance_id"]);
}

#[test]
fn a_wiped_schema_is_a_reset_for_now() {
    let Some(scratch) = PgScratch::new() else { return };
    let db = store(&scratch);
    let receiver = Receiver::start(&db, &[]);
    let home = Home::new();
    let ids = home.capture(5, "Before");
    home.external(&receiver.endpoint());
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["delivered"], 5);

    // The database is wiped under the running replica, which re-creates an empty schema.
    scratch.wipe();
    let run = home.run(&["now"]).expect(3);
    assert!(run.stderr.contains("kitty-sync now --redrain"), "{}", run.stderr);
    assert!(run.stderr.contains("hint:"), "{}", run.stderr);
    assert_eq!(receiver.dump().event_count, 0, "nothing posted to a reset target");
    let (run, report) = home.now(&["--redrain"]);
    run.expect(0);
    assert_eq!(report["delivered"], 5, "{report:#}");
    assert_eq!(receiver.dump().ids(), ids);
}

#[test]
fn the_password_never_shows_and_bad_databases_are_refused() {
    let Some(scratch) = PgScratch::new() else { return };
    let url = scratch.url();
    let secret = password(&url);
    let receiver = Receiver::start(&store(&scratch), &[]);
    let home = Home::new();
    home.capture(2, "A");
    home.external(&receiver.endpoint());
    home.now(&[]).0.expect(0);

    let human = run(bin().args(["receiver", "dump", "--store", &url]));
    assert_eq!(human.code, 0, "{human:?}");
    assert!(human.stdout.contains(":***@"), "{}", human.stdout);
    let without_password = url.replacen(&format!(":{secret}@"), "@", 1);
    let from_env =
        run(bin().args(["receiver", "dump", "--json", "--store", &without_password]).env("PGPASSWORD", &secret));
    assert_eq!(from_env.code, 0, "PGPASSWORD is used: {from_env:?}");
    assert_eq!(from_env.json()["event_count"], 2);

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let nowhere = format!("postgres://kitty:{secret}@{closed}/db");
    let unreachable = run(bin().args(["receiver", "serve", "--bind", "127.0.0.1:0", "--store", &nowhere]));
    assert_eq!(unreachable.code, 1, "{unreachable:?}");
    assert!(unreachable.stderr.contains("hint:"), "{}", unreachable.stderr);
    let tls = format!("{url}&sslmode=require");
    let refused = run(bin().args(["receiver", "serve", "--bind", "127.0.0.1:0", "--store", &tls]));
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(refused.stderr.contains("sslmode=disable"), "{}", refused.stderr);

    scratch.sql("INSERT INTO kitty_receiver_schema (version) VALUES (99)");
    let newer = run(bin().args(["receiver", "serve", "--bind", "127.0.0.1:0", "--store", &url]));
    assert_eq!(newer.code, 2, "{newer:?}");
    assert!(newer.stderr.contains("schema version 99"), "{}", newer.stderr);
    for run in [&human, &from_env, &unreachable, &refused, &newer] {
        assert!(!run.stdout.contains(&secret) && !run.stderr.contains(&secret), "password shown: {run:?}");
    }
    assert!(!receiver.stderr().contains(&secret));
}

fn run(command: &mut std::process::Command) -> Run {
    Run::from(command.output().unwrap())
}
