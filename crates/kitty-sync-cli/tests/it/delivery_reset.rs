//! Issue 7 from the outside: a redeploy (new `deployment_id`) is not a reset; a wiped
//! receiver restarted on the same URL is detected, refused (exit 3, `--redrain` hint, shown
//! by `status`), and `now --redrain` delivers every retained event again with the old
//! attempts kept as history. After `gc`, `--redrain` reports what cannot be re-delivered.

use crate::common;

use std::path::Path;

use common::{Home, Receiver, target_of};
use serde_json::{Value, json};

fn wipe(db: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let path = format!("{}{suffix}", db.display());
        let _ = std::fs::remove_file(path);
    }
}

/// Copies a SQLite database with its WAL (the receiver was killed, not stopped cleanly).
fn backup_files(from: &Path, to: &Path) {
    for suffix in ["", "-wal"] {
        let source = format!("{}{suffix}", from.display());
        if Path::new(&source).exists() {
            std::fs::copy(&source, format!("{}{suffix}", to.display())).unwrap();
        }
    }
}

fn current_target(home: &Home) -> Value {
    home.status()["delivery_targets"]["current"].clone()
}

#[test]
fn redeploy_is_not_a_reset_but_a_wiped_receiver_is_refused_until_redrain() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let flags = |deployment: &'static str, env: &'static str| -> Vec<&'static str> {
        vec!["--deployment-id", deployment, "--environment-name", env, "--git-sha", "abc123"]
    };
    let mut receiver = Receiver::start(&db, &flags("d1", "preview"));
    let bind = receiver.addr.clone();
    let mut ids = home.capture(5, "Before");
    home.external(&receiver.endpoint());
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["delivered"], 5);
    let first_instance = receiver.dump().json["server_instance_id"].clone();
    let deployment = current_target(&home)["deployment"].clone();
    assert_eq!(
        deployment,
        json!({"server_instance_id": first_instance, "deployment_id": "d1", "environment_name": "preview", "git_sha": "abc123"})
    );

    // A redeploy: same database, same URL, new deployment_id. Delivery goes on normally.
    receiver.stop();
    let mut receiver = Receiver::start_with(&db, &bind, &flags("d2", "preview"), &[]);
    ids.extend(home.capture(3, "AfterRedeploy"));
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!((report["selected"].clone(), report["delivered"].clone()), (json!(3), json!(3)));
    assert_eq!(receiver.dump().ids(), ids);
    let current = current_target(&home);
    assert_eq!(current["deployment"]["deployment_id"], "d2", "provenance is updated");
    assert!(current.get("reset_detected").is_none(), "{current:#}");
    home.run(&["status", "--check"]).expect(0);

    // The preview environment is destroyed and recreated at the same URL: a fresh database.
    receiver.stop();
    wipe(&db);
    let receiver = Receiver::start_with(&db, &bind, &flags("d3", "preview"), &[]);
    let new_instance = receiver.dump().json["server_instance_id"].clone();
    assert_ne!(new_instance, first_instance);
    ids.extend(home.capture(2, "AfterWipe"));
    let run = home.run(&["now"]).expect(3);
    assert!(run.stderr.contains("kitty-sync now --redrain"), "{}", run.stderr);
    assert!(run.stderr.contains("server_instance_id"), "explains what changed: {}", run.stderr);
    assert!(run.stderr.contains("hint:"), "{}", run.stderr);
    assert_eq!(receiver.dump().batch_requests, 0, "nothing posted to a reset target");
    // Refused again on the next run (the detection is remembered), also with --json.
    home.run(&["now", "--json"]).expect(3);
    assert_eq!(receiver.dump().batch_requests, 0);

    let status = home.status();
    let reset = &status["delivery_targets"]["current"]["reset_detected"];
    assert!(reset.is_object(), "{status:#}");
    assert!(reset["changed_fields"][0].as_str().unwrap().starts_with("server_instance_id"), "{reset:#}");
    assert_eq!(status["ok"], false);
    let check = home.run(&["status", "--check"]).expect(3);
    let human = home.run(&["status"]);
    assert!(
        format!("{}{}{}{}", check.stdout, check.stderr, human.stdout, human.stderr)
            .contains("kitty-sync now --redrain"),
        "status shows the hint: {human:?}"
    );
    assert_eq!(home.status()["delivery_ledger"]["undelivered_current_target"], 2, "old rows still count until redrain");

    // Re-drain: every retained event again, old attempts kept and marked superseded.
    let (run, report) = home.now(&["--redrain"]);
    run.expect(0);
    assert_eq!((report["selected"].clone(), report["delivered"].clone()), (json!(10), json!(10)), "{report:#}");
    assert_eq!(receiver.dump().ids(), ids, "the wiped receiver holds everything again");
    for (id, envelope) in receiver.dump().envelopes {
        assert_eq!(home.stored_envelope(&id), envelope);
    }
    let inspection = home.inspect(&ids[0]);
    let target = target_of(&inspection, &receiver.base());
    assert_eq!(target["status"], "success");
    let attempts = target["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{inspection:#}");
    assert_eq!(attempts[0]["superseded"], true, "{inspection:#}");
    assert_eq!(attempts[0]["outcome"], "success");
    assert!(attempts[1].get("superseded").is_none_or(|s| s == false), "{inspection:#}");
    let status = home.status();
    assert_eq!(status["ok"], true, "{status:#}");
    let current = &status["delivery_targets"]["current"];
    assert!(current.get("reset_detected").is_none(), "{current:#}");
    assert_eq!(current["deployment"]["server_instance_id"], new_instance);
    assert_eq!(current["delivered_count"], 10);
    assert_eq!(status["delivery_ledger"]["undelivered_current_target"], 0);
    let before = receiver.dump().batch_requests;
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["selected"], 0);
    assert_eq!(receiver.dump().batch_requests, before);

    // A changed environment_name is a reset too, even with the same database.
    let mut receiver = receiver;
    receiver.stop();
    let receiver = Receiver::start_with(&db, &bind, &flags("d3", "staging"), &[]);
    let run = home.run(&["now"]).expect(3);
    assert!(run.stderr.contains("environment_name"), "{}", run.stderr);
    let (run, report) = home.now(&["--redrain"]);
    run.expect(0);
    assert_eq!(report["duplicate"], 10, "the server still had them: {report:#}");
    assert_eq!(receiver.dump().event_count, 10);

    // After gc purged the payloads, a re-drain cannot deliver them again and says so.
    let gc = home.run(&["gc", "--json"]).expect(0);
    assert_eq!(gc.json()["purged"], 10, "{}", gc.stdout);
    let (run, report) = home.now(&["--redrain"]);
    assert_eq!(report["not_redeliverable"], 10, "{report:#}");
    assert_eq!(report["selected"], 0);
    assert!(run.stderr.contains("purged by gc"), "{}", run.stderr);
    // Nothing else this command could do: exit 0, with the loss reported.
    run.expect(0);
}

#[test]
fn a_server_that_comes_back_with_its_old_identity_is_no_longer_reset() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let backup = dir.path().join("backup.db");
    let mut receiver = Receiver::start(&db, &[]);
    let bind = receiver.addr.clone();
    let ids = home.capture(3, "Kept");
    home.external(&receiver.endpoint());
    home.now(&[]).0.expect(0);
    receiver.stop();
    backup_files(&db, &backup);

    // Wiped: detected and refused.
    wipe(&db);
    let mut receiver = Receiver::start_with(&db, &bind, &[], &[]);
    home.run(&["now"]).expect(3);
    home.run(&["status", "--check"]).expect(3);
    receiver.stop();

    // The operator restores the backup: the server has everything the ledger says.
    wipe(&db);
    backup_files(&backup, &db);
    let receiver = Receiver::start_with(&db, &bind, &[], &[]);
    let more = home.capture(1, "Kept");
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["delivered"], 1);
    let status = home.status();
    assert!(status["delivery_targets"]["current"].get("reset_detected").is_none(), "{status:#}");
    assert_eq!(status["ok"], true, "{status:#}");
    home.run(&["status", "--check"]).expect(0);
    let mut all = ids;
    all.extend(more);
    assert_eq!(receiver.dump().ids(), all);
}

#[test]
fn a_redrain_while_health_is_unavailable_does_not_leave_a_stale_identity() {
    use std::sync::{Arc, Mutex};

    use common::{FakeResponse, FakeServer};

    // The instance id the fake server reports; None = no health endpoint (404).
    let instance: Arc<Mutex<Option<&'static str>>> = Arc::new(Mutex::new(Some("instance-1")));
    let reported = Arc::clone(&instance);
    let server = FakeServer::start(move |request| {
        if request.path.starts_with("/api/v1/sync/health") {
            return match *reported.lock().unwrap() {
                Some(id) => FakeResponse::json(200, &json!({"status": "ok", "server_instance_id": id})),
                None => FakeResponse::text(404, "not found"),
            };
        }
        FakeResponse::all_success(request)
    });
    let home = Home::new();
    let ids = home.capture(2, "Kept");
    home.external(&server.endpoint());
    home.now(&[]).0.expect(0);

    *instance.lock().unwrap() = Some("instance-2");
    home.run(&["now"]).expect(3);
    // The health endpoint is unavailable while the operator re-drains.
    *instance.lock().unwrap() = None;
    let (run, report) = home.now(&["--redrain"]);
    run.expect(0);
    assert_eq!(report["delivered"], 2);
    // The server the re-drain delivered to is instance-2: it is not "reset" again.
    *instance.lock().unwrap() = Some("instance-2");
    let more = home.capture(1, "Kept");
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["delivered"], 1);
    assert_eq!(home.status()["delivery_targets"]["current"]["deployment"]["server_instance_id"], "instance-2");
    let sent: Vec<String> = server.batches().iter().flat_map(|b| b.event_ids()).collect();
    assert_eq!(sent, [ids.clone(), ids, more].concat());
}
