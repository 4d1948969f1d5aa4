//! `kitty-sync doctor` (contract §10): healthy and broken homes, every check with a verdict
//! and a hint, exit 0 or 3, and nothing created or changed.

use serde_json::Value;

use crate::capture_support::tree;
use crate::common::{Home, Receiver, closed_endpoint};

fn doctor(home: &Home) -> (i32, Value) {
    let run = home.run(&["doctor", "--json"]);
    assert!(run.code == 0 || run.code == 3, "{}\n{}", run.stdout, run.stderr);
    let doc = run.json();
    assert_eq!(doc["ok"], run.code == 0, "{doc:#}");
    for check in doc["checks"].as_array().unwrap() {
        let keys: Vec<&String> = check.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 4, "{check:#}");
        assert!(["ok", "warn", "fail"].contains(&check["status"].as_str().unwrap()), "{check:#}");
        if check["status"] != "ok" {
            assert!(check["hint"].as_str().is_some_and(|h| !h.is_empty()), "{check:#}");
        }
    }
    (run.code, doc)
}

fn check<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {doc:#}"))
}

/// A daemon state document of the §10 shape, with `fields` (pid, heartbeat_at, stopped_at)
/// laid over it.
fn write_daemon_state(home: &Home, fields: &Value) {
    let mut state = serde_json::json!({
        "pid": 0, "version": "0.1.0", "started_at": rfc3339_ago(120), "heartbeat_at": rfc3339_ago(0), "targets": [],
    });
    for (key, value) in fields.as_object().unwrap() {
        state[key] = value.clone();
    }
    std::fs::write(home.path().join("event-sync/daemon.json"), state.to_string()).unwrap();
}

fn rfc3339_ago(secs: i64) -> String {
    (jiff::Timestamp::now() - jiff::SignedDuration::from_secs(secs)).to_string()
}

#[test]
fn a_healthy_home_passes_and_nothing_is_touched() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&dir.path().join("r.db"), &[]);
    home.external(&receiver.endpoint());
    home.capture(2, "A");
    home.now(&[]).0.expect(0);
    std::fs::write(home.path().join("credentials"), "[user]\nusername = \"me\"\n").unwrap();
    let mut perms = std::fs::metadata(home.path().join("credentials")).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
    std::fs::set_permissions(home.path().join("credentials"), perms).unwrap();

    let before = tree(home.path());
    let (code, doc) = doctor(&home);
    assert_eq!(tree(home.path()), before, "doctor changed or created files");
    assert_eq!(code, 0, "{doc:#}");
    for name in ["home", "store", "store_integrity", "config", "credentials", "credentials_permissions", "daemon"] {
        assert_eq!(check(&doc, name)["status"], "ok", "{doc:#}");
    }
    assert!(check(&doc, "target:primary")["detail"].as_str().unwrap().contains("identity unchanged"), "{doc:#}");
    let human = home.run(&["doctor"]).expect(0).stdout;
    assert!(human.lines().any(|l| l.starts_with("ok") && l.contains("store_integrity")), "{human}");
}

#[test]
fn broken_homes_fail_with_hints() {
    let home = Home::new();
    home.external(&closed_endpoint());
    home.emit("A", "{}");
    std::fs::write(home.path().join("credentials"), "[user]\nusername = \"me\"\n").unwrap();
    let mut perms = std::fs::metadata(home.path().join("credentials")).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    std::fs::set_permissions(home.path().join("credentials"), perms).unwrap();
    // A daemon that died without a clean stop (pid far above any real one).
    write_daemon_state(&home, &serde_json::json!({"pid": 2_000_000_000i64, "heartbeat_at": rfc3339_ago(1)}));

    let (code, doc) = doctor(&home);
    assert_eq!(code, 3);
    assert_eq!(check(&doc, "credentials_permissions")["status"], "fail");
    assert!(check(&doc, "credentials_permissions")["hint"].as_str().unwrap().contains("chmod 600"));
    assert_eq!(check(&doc, "target:primary")["status"], "fail");
    assert!(check(&doc, "target:primary")["detail"].as_str().unwrap().contains("not reachable"));
    assert_eq!(check(&doc, "daemon")["status"], "fail");

    let text = home.run(&["doctor"]).expect(3).stdout;
    assert!(text.lines().any(|l| l.starts_with("fail") && l.contains("daemon")), "{text}");
    assert!(text.contains("hint: chmod 600"), "{text}");

    std::fs::write(home.path().join("config.toml"), "[event_sync\nmode = 1\n").unwrap();
    let (code, doc) = doctor(&home);
    assert_eq!(code, 3, "a broken config is a failed check, not a usage error");
    assert_eq!(check(&doc, "config")["status"], "fail");
    assert!(check(&doc, "config")["detail"].as_str().unwrap().contains("line 1"), "{doc:#}");
}

#[test]
fn daemon_state_alive_stale_or_stopped() {
    let home = Home::new();
    home.run(&["mode", "local-retention"]).expect(0);
    home.emit("A", "{}");
    let me = std::process::id();
    write_daemon_state(&home, &serde_json::json!({"pid": me, "heartbeat_at": rfc3339_ago(2)}));
    let (code, doc) = doctor(&home);
    assert_eq!((code, check(&doc, "daemon")["status"].as_str()), (0, Some("ok")), "{doc:#}");
    write_daemon_state(&home, &serde_json::json!({"pid": me, "heartbeat_at": rfc3339_ago(60)}));
    let (code, doc) = doctor(&home);
    assert_eq!((code, check(&doc, "daemon")["status"].as_str()), (3, Some("fail")), "a hung daemon is not healthy");
    let stopped =
        serde_json::json!({"pid": 2_000_000_000i64, "heartbeat_at": rfc3339_ago(600), "stopped_at": rfc3339_ago(600)});
    write_daemon_state(&home, &stopped);
    let (code, doc) = doctor(&home);
    assert_eq!((code, check(&doc, "daemon")["status"].as_str()), (0, Some("ok")), "a clean stop is not a failure");
}

#[test]
fn a_receiver_wiped_behind_its_url_and_a_damaged_store_fail() {
    let home = Home::new();
    let dir = tempfile::tempdir().unwrap();
    let mut receiver = Receiver::start(&dir.path().join("r.db"), &[]);
    home.external(&receiver.endpoint());
    home.emit("A", "{}");
    home.now(&[]).0.expect(0);
    // The same URL as a named target is the same target, with the health identity recorded.
    home.run(&["mode", "local-retention"]).expect(0);
    home.run(&["target", "add", "mine", "--endpoint", &receiver.endpoint()]).expect(0);
    assert_eq!(check(&doctor(&home).1, "target:mine")["status"], "ok");

    let addr = receiver.addr.clone();
    receiver.stop();
    std::fs::remove_file(dir.path().join("r.db")).unwrap();
    let _fresh = Receiver::start_with(&dir.path().join("r.db"), &addr, &[], &[]);
    let (code, doc) = doctor(&home);
    assert_eq!(code, 3);
    let mine = check(&doc, "target:mine");
    assert_eq!(mine["status"], "fail", "{doc:#}");
    assert!(mine["detail"].as_str().unwrap().contains("server_instance_id"), "{mine:#}");

    std::fs::write(home.path().join("event-sync/kitty-sync.db"), vec![b'x'; 8192]).unwrap();
    let _ = std::fs::remove_file(home.path().join("event-sync/kitty-sync.db-wal"));
    let (code, doc) = doctor(&home);
    assert_eq!(code, 3);
    assert_eq!(check(&doc, "store")["status"], "fail", "{doc:#}");
}

#[test]
fn without_a_home_it_creates_nothing() {
    let home = Home::new();
    let missing = home.path().join("not-yet");
    let run = crate::common::bin().arg("--home").arg(&missing).args(["doctor", "--json"]).output().unwrap();
    assert!(!missing.exists());
    let doc: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(check(&doc, "home")["status"], "warn");
}

#[test]
fn a_slow_target_check_does_not_hold_up_captures() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&dir.path().join("r.db"), &["--delay-ms", "3000"]);
    let home = Home::new();
    home.external(&receiver.endpoint());
    home.emit("Before", "{}");
    // A store without a WAL file (its last connection folded and removed it): the case where a
    // read-only open must exclude writers while it is open.
    let db = home.path().join("event-sync/kitty-sync.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
    drop(conn);
    for sidecar in ["kitty-sync.db-wal", "kitty-sync.db-shm"] {
        let _ = std::fs::remove_file(home.path().join("event-sync").join(sidecar));
    }
    let started = std::time::Instant::now();
    let doctor = home.spawn(&["doctor", "--json"]);
    // doctor is now waiting for the slow health endpoint; the store must be free meanwhile.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let emitted = std::time::Instant::now();
    home.emit("During", "{}");
    let took = emitted.elapsed();
    let output = doctor.wait_with_output().unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_millis(2500), "the target check was not slow");
    assert!(took < std::time::Duration::from_millis(1500), "emit waited {took:?} for doctor's read-only store");
    let doc: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(doc["checks"].as_array().unwrap().iter().filter(|c| c["name"] == "store").count(), 1);
}
