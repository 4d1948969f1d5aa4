//! Teamspace auth on the wire, against a scripted server: bearer + `X-Team-Slug` headers,
//! one token refresh after a 401 (or before posting when the access token is expired), the
//! credentials file rewritten atomically with mode 0600 and everything else kept.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{FakeRequest, FakeResponse, FakeServer, Home};
use serde_json::{Value, json};

const REFRESH_PATH: &str = "/api/v1/token/refresh/";

fn credentials(access_expires_at: &str) -> String {
    format!(
        "# written by spec-kitty — keep this comment\n\
         [tokens]\n\
         access = \"old-access-tok\"\n\
         refresh = \"refresh-tok-1\"\n\
         access_expires_at = \"{access_expires_at}\"\n\
         \n\
         [user]\n\
         username = \"u@example.com\"\n\
         team_slug = \"team-a\"\n\
         \n\
         [extra]\n\
         keep = \"me\"\n"
    )
}

/// A Teamspace server: batches need `Bearer new-access-tok` and `X-Team-Slug: team-a`;
/// `refresh_status` answers the refresh endpoint.
fn teamspace(refresh_status: u16) -> FakeServer {
    FakeServer::start(move |request: &FakeRequest| {
        if request.method == "POST" && request.path == REFRESH_PATH {
            let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
            if refresh_status != 200 || body != json!({"refresh": "refresh-tok-1"}) {
                return FakeResponse::json(refresh_status.max(400), &json!({"detail": "token not valid"}));
            }
            return FakeResponse::json(200, &json!({"access": "new-access-tok", "refresh": "refresh-tok-2"}));
        }
        if !request.is_batch() {
            return FakeResponse::text(404, "not found");
        }
        if request.header("authorization") != Some("Bearer new-access-tok") {
            return FakeResponse::json(401, &json!({"detail": "Given token not valid for any token type"}));
        }
        if request.header("x-team-slug") != Some("team-a") {
            return FakeResponse::json(403, &json!({"detail": "wrong team"}));
        }
        FakeResponse::all_success(request)
    })
}

fn teamspace_home(server: &FakeServer, access_expires_at: &str) -> Home {
    let mut home = Home::new();
    home.write_credentials(&credentials(access_expires_at));
    std::fs::set_permissions(home.path().join("credentials"), std::fs::Permissions::from_mode(0o644)).unwrap();
    home.set_env("SPEC_KITTY_ENABLE_SAAS_SYNC", "yes");
    home.set_env("SPEC_KITTY_SAAS_URL", &server.base());
    home
}

fn assert_refreshed_credentials(home: &Home) {
    let path = home.path().join("credentials");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "rewritten with mode 0600");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("access = \"new-access-tok\""), "{text}");
    assert!(text.contains("refresh = \"refresh-tok-2\""), "{text}");
    assert!(!text.contains("old-access-tok"), "{text}");
    for kept in [
        "# written by spec-kitty — keep this comment",
        "username = \"u@example.com\"",
        "team_slug = \"team-a\"",
        "[extra]",
        "keep = \"me\"",
    ] {
        assert!(text.contains(kept), "{kept:?} lost:\n{text}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(home.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn assert_no_secrets(run: &common::Run) {
    for secret in ["old-access-tok", "new-access-tok", "refresh-tok-1", "refresh-tok-2"] {
        assert!(!run.stdout.contains(secret) && !run.stderr.contains(secret), "{secret} leaked: {run:?}");
    }
}

#[test]
fn a_401_refreshes_the_token_once_and_the_batch_is_sent_again() {
    let server = teamspace(200);
    let home = teamspace_home(&server, "2099-01-01T00:00:00Z");
    let ids = home.capture(4, "Teamspace");
    let (run, report) = home.now(&["--retries", "0"]);
    assert_no_secrets(&run);
    run.expect(0);
    assert_eq!(report["delivered"], 4);
    let posts: Vec<(String, Option<String>)> = server
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .map(|r| (r.path.clone(), r.header("authorization").map(str::to_string)))
        .collect();
    assert_eq!(
        posts,
        vec![
            ("/api/v1/events/batch/".to_string(), Some("Bearer old-access-tok".to_string())),
            (REFRESH_PATH.to_string(), None),
            ("/api/v1/events/batch/".to_string(), Some("Bearer new-access-tok".to_string())),
        ]
    );
    let batch = &server.batches()[1];
    assert_eq!(batch.event_ids(), ids);
    // Both attempts are history: the refused one, then the accepted one.
    let inspection = home.inspect(&ids[0]);
    assert_eq!(common::attempt_outcomes(&inspection, &server.base()), vec!["failed_transient", "success"]);
    assert_eq!(common::target_of(&inspection, &server.base())["attempts"][0]["http_status"], 401);
    assert_eq!(batch.header("content-encoding"), Some("gzip"));
    assert_eq!(batch.header("content-type"), Some("application/json"));
    assert_refreshed_credentials(&home);
    // The new token is used from then on, without another refresh.
    home.capture(1, "Teamspace");
    home.now(&[]).0.expect(0);
    assert_eq!(server.requests().iter().filter(|r| r.path == REFRESH_PATH).count(), 1);
}

#[test]
fn an_expired_access_token_is_refreshed_before_posting() {
    let server = teamspace(200);
    let home = teamspace_home(&server, "2001-01-01T00:00:00Z");
    home.capture(2, "Teamspace");
    let (run, report) = home.now(&[]);
    assert_no_secrets(&run);
    run.expect(0);
    assert_eq!(report["delivered"], 2);
    let batches = server.batches();
    assert_eq!(batches.len(), 1, "no 401 round trip");
    assert_eq!(batches[0].header("authorization"), Some("Bearer new-access-tok"));
    assert_refreshed_credentials(&home);
}

#[test]
fn a_refused_refresh_stops_with_exit_3_and_keeps_the_credentials() {
    let server = teamspace(401);
    let home = teamspace_home(&server, "2099-01-01T00:00:00Z");
    let ids = home.capture(2, "Teamspace");
    let before = std::fs::read(home.path().join("credentials")).unwrap();
    let run = home.run(&["now", "--retries", "0"]);
    assert_no_secrets(&run);
    let run = run.expect(3);
    assert!(run.stderr.contains("hint:") && run.stderr.contains("log in"), "{}", run.stderr);
    assert_eq!(std::fs::read(home.path().join("credentials")).unwrap(), before, "credentials untouched");
    assert_eq!(server.batches().len(), 1);
    assert_eq!(home.ledger_status(&ids[0], &server.base()).as_deref(), Some("failed_transient"));
    assert_eq!(home.status()["delivery_ledger"]["rejected"], 0, "auth failures are never content rejections");
}

#[test]
fn a_401_after_the_refresh_is_not_refreshed_again() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&attempts);
    let server = FakeServer::start(move |request| {
        if request.path == REFRESH_PATH {
            counter.fetch_add(1, Ordering::SeqCst);
            return FakeResponse::json(200, &json!({"access": "new-access-tok"}));
        }
        if request.is_batch() {
            return FakeResponse::json(401, &json!({"detail": "nope"}));
        }
        FakeResponse::text(404, "not found")
    });
    let home = teamspace_home(&server, "2099-01-01T00:00:00Z");
    home.capture(2, "Teamspace");
    let run = home.run(&["now", "--retries", "3"]).expect(3);
    assert_no_secrets(&run);
    assert!(run.stderr.contains("401"), "{}", run.stderr);
    assert_eq!(attempts.load(Ordering::SeqCst), 1, "one refresh per drain");
    assert_eq!(server.batches().len(), 2, "the batch, then once more with the new token");
    // The refresh answer had no refresh token: the old one is kept.
    let text = std::fs::read_to_string(home.path().join("credentials")).unwrap();
    assert!(text.contains("refresh = \"refresh-tok-1\""), "{text}");
}

#[test]
fn team_isolation_events_of_another_team_are_never_sent() {
    let server = teamspace(200);
    let home = teamspace_home(&server, "2001-01-01T00:00:00Z");
    let mine = home.capture(2, "Mine");
    // Captured while logged in to another team.
    std::fs::write(home.path().join("credentials"), credentials("2001-01-01T00:00:00Z").replace("team-a", "team-b"))
        .unwrap();
    home.capture(2, "Theirs");
    home.write_credentials(&credentials("2001-01-01T00:00:00Z"));
    let (run, report) = home.now(&[]);
    run.expect(0);
    assert_eq!(report["selected"], 2, "{report:#}");
    let sent: Vec<String> = server.batches().iter().flat_map(|b| b.event_ids()).collect();
    assert_eq!(sent, mine);
}
