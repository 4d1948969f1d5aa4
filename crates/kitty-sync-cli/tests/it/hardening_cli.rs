//! Issue 10's settings, credentials and error defects, reproduced from the outside: atomic
//! writes through symlinks and onto non-regular files, report paths checked before
//! delivering, URL validation, token refresh under a lock, secrets redacted, one policy for
//! an unparsable `credentials`, and the `-v` cause chain.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use serde_json::json;

use crate::assert_cli_snapshot;
use crate::common::{self, FakeRequest, FakeResponse, FakeServer, Home, Run};

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
fn archive_through_a_symlink_writes_its_target() {
    let server = FakeServer::start(FakeResponse::all_success);
    let home = external_home(&server);
    home.capture(3, "T");
    home.now(&[]).0.expect(0);
    std::fs::create_dir(home.path().join("archives")).unwrap();
    let link = home.path().join("latest.jsonl.gz");
    symlink("archives/a.jsonl.gz", &link).unwrap();
    home.run(&["archive", "--out", link.to_str().unwrap()]).expect(0);
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the symlink is kept");
    assert!(std::fs::metadata(home.path().join("archives/a.jsonl.gz")).unwrap().len() > 0);
    assert_eq!(home.status()["event_journal"]["archived_event_count"], 3);
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
}

// ---------------------------------------------------------------------------------------
// Token refresh: under a lock, with the newest refresh token, never losing a rotated one.

const REFRESH_PATH: &str = "/api/v1/token/refresh/";

fn credentials(access: &str, refresh: &str, access_expires_at: &str) -> String {
    format!(
        "# spec-kitty's file\n[tokens]\naccess = \"{access}\"\nrefresh = \"{refresh}\"\n\
         access_expires_at = \"{access_expires_at}\"\n\n[user]\nusername = \"u@example.com\"\nteam_slug = \"team-a\"\n"
    )
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A home delivering to Teamspace at `server`, with `credentials` written 0600.
fn teamspace_home(home: &mut Home, server: &FakeServer, text: &str) {
    write_private(&home.path().join("credentials"), text);
    home.set_env("SPEC_KITTY_ENABLE_SAAS_SYNC", "1");
    home.set_env("SPEC_KITTY_SAAS_URL", &server.base());
}

/// Batches succeed with `Bearer <good>`, else 401; the refresh endpoint answers `refresh`.
fn teamspace_server(
    good: &'static str,
    on_batch: impl Fn(&FakeRequest) + Send + Sync + 'static,
    refresh: impl Fn(&FakeRequest) -> FakeResponse + Send + Sync + 'static,
) -> FakeServer {
    FakeServer::start(move |request| {
        if request.path == REFRESH_PATH {
            return refresh(request);
        }
        if !request.is_batch() {
            return FakeResponse::text(404, "not found");
        }
        on_batch(request);
        if request.header("authorization") == Some(&format!("Bearer {good}")) {
            return FakeResponse::all_success(request);
        }
        FakeResponse::json(401, &json!({"detail": "token not valid"}))
    })
}

fn refresh_body(request: &FakeRequest) -> String {
    let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap_or_default();
    body["refresh"].as_str().unwrap_or_default().to_string()
}

fn assert_no_secrets(run: &Run, secrets: &[&str]) {
    for secret in secrets {
        assert!(!run.stdout.contains(secret) && !run.stderr.contains(secret), "{secret} leaked: {run:?}");
    }
}

/// Another process rewriting `credentials` while our first batch (sent with `access-1`) is
/// in flight.
fn rewritten_during_first_batch(home: &Home, text: String) -> impl Fn(&FakeRequest) + Send + Sync + 'static {
    let path = home.path().join("credentials");
    move |request| {
        if request.header("authorization") == Some("Bearer access-1") {
            write_private(&path, &text);
        }
    }
}

#[test]
fn refresh_sends_the_refresh_token_another_process_rotated_meanwhile() {
    let mut home = Home::new();
    let path = home.path().join("credentials");
    // spec-kitty refreshes while our first batch is in flight: it rotates the refresh token.
    let server = teamspace_server(
        "access-3",
        rewritten_during_first_batch(&home, credentials("access-1", "refresh-2", "2099-01-01T00:00:00Z")),
        |request| match refresh_body(request).as_str() {
            "refresh-2" => FakeResponse::json(200, &json!({"access": "access-3", "refresh": "refresh-3"})),
            _ => FakeResponse::json(401, &json!({"detail": "refresh token already used"})),
        },
    );
    teamspace_home(&mut home, &server, &credentials("access-1", "refresh-1", "2099-01-01T00:00:00Z"));
    home.capture(2, "T");
    let (run, report) = home.now(&["--retries", "0"]);
    assert_no_secrets(&run, &["access-1", "access-3", "refresh-1", "refresh-2", "refresh-3"]);
    run.expect(0);
    assert_eq!(report["delivered"], 2);
    let sent: Vec<String> = server.requests().iter().filter(|r| r.path == REFRESH_PATH).map(refresh_body).collect();
    assert_eq!(sent, vec!["refresh-2"], "the newest refresh token, never the used one");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("refresh = \"refresh-3\"") && text.contains("# spec-kitty's file"), "{text}");
}

#[test]
fn a_token_another_process_refreshed_is_used_without_refreshing_again() {
    let mut home = Home::new();
    let path = home.path().join("credentials");
    let server = teamspace_server(
        "access-2",
        rewritten_during_first_batch(&home, credentials("access-2", "refresh-2", "2099-01-01T00:00:00Z")),
        |_| FakeResponse::json(401, &json!({"detail": "must not be called"})),
    );
    teamspace_home(&mut home, &server, &credentials("access-1", "refresh-1", "2099-01-01T00:00:00Z"));
    home.capture(2, "T");
    let (run, report) = home.now(&["--retries", "0"]);
    run.expect(0);
    assert_eq!(report["delivered"], 2);
    assert!(server.requests().iter().all(|r| r.path != REFRESH_PATH), "no refresh request");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("access = \"access-2\"") && text.contains("refresh = \"refresh-2\""), "{text}");
}

#[test]
fn a_rotated_token_that_cannot_be_saved_is_used_for_this_run_and_reported() {
    let mut home = Home::new();
    let path = home.path().join("credentials");
    let corrupt = path.clone();
    let server = teamspace_server(
        "access-2",
        |_| {},
        move |_| {
            // The file turns unparsable between our read and our rewrite.
            write_private(&corrupt, "[tokens\naccess = \"half-written\"\n");
            FakeResponse::json(200, &json!({"access": "access-2", "refresh": "refresh-2"}))
        },
    );
    teamspace_home(&mut home, &server, &credentials("access-1", "refresh-1", "2001-01-01T00:00:00Z"));
    home.capture(2, "T");
    let run = home.run(&["now", "--retries", "0"]);
    assert_no_secrets(&run, &["access-1", "access-2", "refresh-1", "refresh-2"]);
    assert_cli_snapshot!(home.path(), run);
    let batches = server.batches();
    assert_eq!(batches.len(), 1, "the drain goes on with the new token");
    assert_eq!(batches[0].header("authorization"), Some("Bearer access-2"));
    assert_eq!(batches[0].event_ids().len(), 2);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("[tokens\n"), "a file that does not parse is never overwritten: {text}");
}

#[test]
fn leftovers_of_a_killed_rewrite_are_removed() {
    let mut home = Home::new();
    let server = teamspace_server(
        "access-2",
        |_| {},
        |_| FakeResponse::json(200, &json!({"access": "access-2", "refresh": "refresh-2"})),
    );
    teamspace_home(&mut home, &server, &credentials("access-1", "refresh-1", "2001-01-01T00:00:00Z"));
    let leftover = home.path().join(".credentials.tmp-4194305");
    std::fs::write(&leftover, credentials("access-0", "refresh-0", "")).unwrap();
    let past = std::time::SystemTime::now() - std::time::Duration::from_secs(120);
    std::fs::File::options().write(true).open(&leftover).unwrap().set_modified(past).unwrap();
    home.capture(1, "T");
    home.now(&[]).0.expect(0);
    assert!(!leftover.exists(), "the killed run's temp file (with tokens) is removed");
    assert_only_private_token_files(home.path());
}

/// Every file under `dir` that holds a token is owner-only; no temp file is left.
fn assert_only_private_token_files(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            assert_only_private_token_files(&path);
            continue;
        }
        let bytes = std::fs::read(&path).unwrap_or_default();
        let has_token = bytes.windows(8).any(|w| w == b"refresh-" || w == b"access-\"");
        if has_token {
            assert_eq!(meta.permissions().mode() & 0o077, 0, "{} is readable by others", path.display());
        }
    }
}

#[test]
fn kill_9_during_token_rewrites_leaves_the_old_or_the_new_file_owner_only() {
    let mut home = Home::new();
    let server = teamspace_server(
        "access-new",
        |_| {},
        |_| FakeResponse::json(200, &json!({"access": "access-new", "refresh": "refresh-new"})),
    );
    let old = credentials("access-old", "refresh-old", "2001-01-01T00:00:00Z");
    teamspace_home(&mut home, &server, &old);
    home.capture(1, "T");
    let path = home.path().join("credentials");
    for i in 0..16u64 {
        write_private(&path, &old);
        let mut child = home.spawn(&["now"]);
        std::thread::sleep(std::time::Duration::from_millis(2 + i * 3));
        common::kill9(&mut child);
        let text = std::fs::read_to_string(&path).unwrap();
        let parsed: toml_edit::DocumentMut = text.parse().unwrap_or_else(|e| panic!("torn credentials ({e}):\n{text}"));
        let refresh = parsed["tokens"]["refresh"].as_str().unwrap();
        let access = parsed["tokens"]["access"].as_str().unwrap();
        assert!(
            (access, refresh) == ("access-old", "refresh-old") || (access, refresh) == ("access-new", "refresh-new"),
            "{text}"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_only_private_token_files(home.path());
    }
}

// ---------------------------------------------------------------------------------------
// One policy for an unparsable `credentials` (line 3 below is broken).

const BROKEN_CREDENTIALS: &str = "[tokens]\naccess = \"a\"\nrefresh = = \"r\"\n";

#[test]
fn capture_goes_on_with_a_warning_naming_file_and_line() {
    let home = Home::new();
    home.write_credentials(BROKEN_CREDENTIALS);
    let run = home.run(&["emit", "--type", "T", "--event-id", "01ARZ3NDEKTSV4RRFFQ69G5FAV"]);
    assert_cli_snapshot!(home.path(), run);
}

#[test]
fn status_goes_on_and_is_not_ok_when_teamspace_needs_the_file() {
    let mut home = Home::new();
    home.write_credentials(BROKEN_CREDENTIALS);
    home.set_env("SPEC_KITTY_ENABLE_SAAS_SYNC", "1");
    let run = home.run(&["status", "--json"]).expect(0);
    let status = run.json();
    assert_eq!(status["ok"], false);
    let warnings = status["target_authority"]["warnings"].to_string();
    assert!(warnings.contains("credentials") && warnings.contains("line 3"), "{warnings}");
    let human = home.run(&["status", "--check"]).expect(3);
    assert!(human.stdout.contains("missing_auth") && human.stdout.contains("line 3"), "{}", human.stdout);
    home.external("http://127.0.0.1:9/api/v1/events/batch/");
    let status = home.run(&["status", "--json"]).expect(0).json();
    assert_eq!(status["ok"], true, "external targets do not need credentials: {status:#}");
}

#[test]
fn now_to_teamspace_stops_with_exit_2_naming_file_and_line() {
    let mut home = Home::new();
    home.write_credentials(BROKEN_CREDENTIALS);
    home.set_env("SPEC_KITTY_ENABLE_SAAS_SYNC", "1");
    home.capture(1, "T");
    let run = home.run(&["now"]);
    assert_cli_snapshot!(home.path(), run);
}

#[test]
fn now_to_an_external_target_goes_on() {
    let server = FakeServer::start(FakeResponse::all_success);
    let home = external_home(&server);
    home.write_credentials(BROKEN_CREDENTIALS);
    home.capture(2, "T");
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["delivered"], 2);
}

// ---------------------------------------------------------------------------------------
// Secrets echoed by others.

#[test]
fn a_receiver_echoing_the_bearer_token_is_redacted_in_output_and_history() {
    let server = FakeServer::start(|request: &FakeRequest| {
        let auth = request.header("authorization").unwrap_or_default().to_string();
        FakeResponse::json(401, &json!({"detail": format!("credentials {auth} are not valid")}))
    });
    let mut home = external_home(&server);
    home.run(&["mode", "external-receiver", "--token-env", "RECEIVER_TOKEN"]).expect(0);
    home.set_env("RECEIVER_TOKEN", "tok-SECRET-4711");
    let ids = home.capture(1, "T");
    let run = home.run(&["now", "--retries", "0", "-v"]).expect(3);
    assert_no_secrets(&run, &["SECRET-4711"]);
    assert!(run.stderr.contains("***"), "{}", run.stderr);
    let inspection = home.run(&["inspect", &ids[0], "--json"]).expect(0);
    assert_no_secrets(&inspection, &["SECRET-4711"]);
}

#[test]
fn mode_never_prints_url_passwords_or_keys() {
    let home = Home::new();
    let endpoint = "http://alice:pw-SECRET@127.0.0.1:9/api/v1/events/batch/?api_key=key-SECRET&team=a";
    let set = home.run(&["mode", "external-receiver", "--endpoint", endpoint]).expect(0);
    let shown = home.run(&["mode"]).expect(0);
    let json = home.run(&["mode", "--json"]).expect(0);
    let bad = home.run(&["mode", "external-receiver", "--endpoint", "ftp://alice:pw-SECRET@example.com/"]).expect(2);
    for run in [&set, &shown, &json, &bad] {
        assert_no_secrets(run, &["pw-SECRET", "key-SECRET"]);
    }
    assert_cli_snapshot!(home.path(), shown);
    let config = std::fs::read_to_string(home.path().join("config.toml")).unwrap();
    assert!(config.contains("key-SECRET"), "the endpoint itself is stored as given: {config}");
}

#[test]
fn server_urls_with_secrets_are_used_but_never_shown() {
    let mut home = Home::new();
    std::fs::write(home.path().join("config.toml"), "[sync]\nserver_url = \"https://u:pw-SECRET@config.example\"\n")
        .unwrap();
    home.set_env("SPEC_KITTY_SAAS_URL", "https://env.example/?access_token=tok-SECRET");
    let runs = [
        home.run(&["server"]).expect(0),
        home.run(&["server", "--json"]).expect(0),
        home.run(&["status", "--json"]).expect(0),
        home.run(&["status"]).expect(0),
        home.run(&["mode"]).expect(0),
        home.run(&["mode", "external-receiver", "--token-env", "tok-SECRET"]).expect(2),
    ];
    for run in &runs {
        assert_no_secrets(run, &["pw-SECRET", "tok-SECRET"]);
    }
    assert!(runs[0].stdout.contains("https://u:***@config.example"), "{}", runs[0].stdout);
}

// ---------------------------------------------------------------------------------------
// `-v` shows the cause chain the hint promises.

#[test]
fn verbose_prints_the_cause_chain() {
    let home = Home::new();
    let file = home.path().join("not-a-dir");
    std::fs::write(&file, "").unwrap();
    let mut plain = common::bin();
    plain.args(["--home", file.to_str().unwrap(), "emit", "--type", "T"]);
    let run = Run::from(plain.output().unwrap());
    assert!(!run.stderr.contains("caused by"), "{}", run.stderr);
    let mut verbose = common::bin();
    verbose.args(["--home", file.to_str().unwrap(), "-v", "emit", "--type", "T"]);
    let run = Run::from(verbose.output().unwrap());
    assert_cli_snapshot!(home.path(), run);
}
