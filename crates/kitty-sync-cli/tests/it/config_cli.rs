//! `kitty-sync server` and `kitty-sync mode` from the outside: the target authority (§4),
//! config.toml round-trips that keep the operator's text, validation, the
//! `SPEC_KITTY_SAAS_URL` override, and read-only behaviour (§2).

use crate::capture_support;

use std::path::Path;

use capture_support::*;
use serde_json::Value;

const DEFAULT_SERVER: &str = "https://spec-kitty-dev.fly.dev";

/// An operator's hand-written config.toml: comments everywhere, keys kitty-sync does not know,
/// a quoted table name, an inline comment on the very value that gets replaced.
const OPERATOR_CONFIG: &str = r#"# spec-kitty configuration — edited by hand, keep my notes!

[sync]
# where our Teamspace lives
server_url = "https://old.example.com" # prod, do not change without asking
max_queue_size = 100000
background_daemon = "manual"

[repo_defaults."acme/widgets"]
enabled = true    # keep
labels = ["a", "b"]   # trailing comment

[event_sync]
# opt-out for now
mode = "local_retention"
local_only_types = ["Heartbeat"]

[[profiles]]
name = "first"
"#;

fn config_text(home: &Path) -> String {
    std::fs::read_to_string(home.join("config.toml")).expect("config.toml exists")
}

fn server_json(home: &Path) -> Value {
    json_ok(ks(home).args(["server", "--json"]))
}

fn mode_json(home: &Path) -> Value {
    json_ok(ks(home).args(["mode", "--json"]))
}

// ---------------------------------------------------------------------------------------------
// server: show

#[test]
fn server_shows_the_default_authority_without_creating_anything() {
    let root = tempfile::tempdir().unwrap();
    let home = root.path().join("never-created");
    let doc = server_json(&home);
    let keys: Vec<&str> = doc.as_object().unwrap().keys().map(String::as_str).collect();
    for key in [
        "configured_server_url",
        "env_server_url",
        "override_mode",
        "resolved_server_url",
        "user_id",
        "team_slug",
        "derived_queue_scope",
        "queue_db_path",
        "active_queue_scope_status",
    ] {
        assert!(keys.contains(&key), "missing {key} in {keys:?}");
    }
    assert_eq!(doc["resolved_server_url"], DEFAULT_SERVER);
    assert_eq!(doc["configured_server_url"], Value::Null);
    assert_eq!(doc["env_server_url"], Value::Null);
    assert_eq!(doc["override_mode"], "none");
    assert_eq!(doc["queue_db_path"], "queue.db");
    assert_eq!(doc["derived_queue_scope"], format!("{DEFAULT_SERVER}||"));
    assert_eq!(doc["active_queue_scope_status"], "absent");

    let output = ks(&home).arg("server").output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert!(stdout(&output).contains(DEFAULT_SERVER), "{}", stdout(&output));
    assert!(stderr(&output).is_empty(), "{}", stderr(&output));
    assert!(!home.exists(), "a read-only command never creates the home");
}

#[test]
fn server_shows_user_team_and_legacy_scope_from_credentials() {
    let home = tempfile::tempdir().unwrap();
    write_config(home.path(), "[sync]\nserver_url = \"https://spec-kitty-dev.fly.dev/\"\n");
    write_credentials(
        home.path(),
        "[tokens]\naccess = \"very-secret-token\"\n[user]\nusername = \"alice@example.com\"\nteam_slug = \"team-alpha\"\n",
    );
    std::fs::write(home.path().join("active_queue_scope"), "https://other|bob|x\n").unwrap();
    let output = ks(home.path()).args(["server", "--json"]).output().unwrap();
    assert!(!stdout(&output).contains("very-secret-token") && !stderr(&output).contains("very-secret-token"));
    let doc = parse_json(&output);
    assert_eq!(doc["resolved_server_url"], DEFAULT_SERVER, "trailing / stripped");
    assert_eq!(doc["user_id"], "alice@example.com");
    assert_eq!(doc["team_slug"], "team-alpha");
    assert_eq!(doc["derived_queue_scope"], "https://spec-kitty-dev.fly.dev|alice@example.com|team-alpha");
    // spec-kitty 3.2.3's digest of that scope (the public legacy fixture's scope A).
    assert_eq!(doc["queue_db_path"], "queues/queue-f7b048d5c00bc4e2.db");
    assert_eq!(doc["active_queue_scope_status"], "stale_non_authoritative");
    let human = ks(home.path()).arg("server").output().unwrap();
    assert!(stdout(&human).contains("alice@example.com") && stdout(&human).contains("team-alpha"));
    assert!(!stdout(&human).contains("very-secret-token"));
}

// ---------------------------------------------------------------------------------------------
// server: set

#[test]
fn server_set_rewrites_only_the_url_and_keeps_the_operators_text() {
    let home = tempfile::tempdir().unwrap();
    write_config(home.path(), OPERATOR_CONFIG);
    let output = ks(home.path()).args(["server", "https://new.example.com/"]).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stdout(&output).contains("https://new.example.com"), "{}", stdout(&output));
    let expected = OPERATOR_CONFIG.replace("https://old.example.com", "https://new.example.com");
    assert_eq!(config_text(home.path()), expected, "every other byte of the file is kept");
    assert_eq!(server_json(home.path())["resolved_server_url"], "https://new.example.com");
    // Other commands still read the operator's other settings.
    assert_eq!(mode_json(home.path())["mode"], "LOCAL_RETENTION");
}

#[test]
fn server_set_creates_a_missing_config_and_stores_the_canonical_url() {
    let home = tempfile::tempdir().unwrap();
    let doc = json_ok(ks(home.path()).args(["server", "HTTPS://Teamspace.Example.COM:443/base/?debug=1#x", "--json"]));
    assert_eq!(doc["resolved_server_url"], "https://teamspace.example.com/base");
    assert_eq!(config_text(home.path()), "[sync]\nserver_url = \"https://teamspace.example.com/base\"\n");
    // A password in the URL is neither stored nor echoed.
    let output = ks(home.path()).args(["server", "https://user:hunter2@example.com"]).output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert!(!stdout(&output).contains("hunter2") && !stderr(&output).contains("hunter2"));
    assert!(!config_text(home.path()).contains("hunter2"));
}

#[test]
fn server_accepts_loopback_http() {
    let home = tempfile::tempdir().unwrap();
    for (url, resolved) in [
        ("http://127.0.0.1:9/", "http://127.0.0.1:9"),
        ("http://localhost:8787", "http://localhost:8787"),
        ("http://[::1]:8080/x/", "http://[::1]:8080/x"),
        ("http://127.1.2.3", "http://127.1.2.3"),
    ] {
        let doc = json_ok(ks(home.path()).args(["server", url, "--json"]));
        assert_eq!(doc["resolved_server_url"], resolved, "{url}");
    }
}

#[test]
fn invalid_server_urls_are_refused_and_leave_the_config_untouched() {
    let home = tempfile::tempdir().unwrap();
    for url in ["ftp://x", "https://", "http://example.com", "http://10.0.0.1:8787/", "example.com", "not a url", ""] {
        expect_error(ks(home.path()).args(["server", url]), 2, &["invalid url"]);
    }
    assert!(!home.path().join("config.toml").exists(), "no config created by a refused URL");
    write_config(home.path(), OPERATOR_CONFIG);
    for url in ["ftp://x", "https://", "http://example.com"] {
        expect_error(ks(home.path()).args(["server", url]), 2, &[url]);
        assert_eq!(config_text(home.path()), OPERATOR_CONFIG);
    }
}

// ---------------------------------------------------------------------------------------------
// SPEC_KITTY_SAAS_URL

fn warning_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.starts_with("warning: ")).collect()
}

#[test]
fn env_url_that_disagrees_wins_and_warns_once() {
    let home = tempfile::tempdir().unwrap();
    write_config(home.path(), OPERATOR_CONFIG);
    let output = ks(home.path())
        .env("SPEC_KITTY_SAAS_URL", "https://env.example.com/")
        .args(["server", "--json"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let doc = parse_json(&output);
    assert_eq!(doc["resolved_server_url"], "https://env.example.com");
    assert_eq!(doc["env_server_url"], "https://env.example.com");
    assert_eq!(doc["configured_server_url"], "https://old.example.com");
    assert_eq!(doc["override_mode"], "process_override");
    assert_eq!(doc["derived_queue_scope"], "https://env.example.com||");
    let err = stderr(&output);
    let warnings = warning_lines(&err);
    assert_eq!(warnings.len(), 1, "{err}");
    for needle in ["SPEC_KITTY_SAAS_URL", "https://env.example.com", "https://old.example.com"] {
        assert!(warnings[0].contains(needle), "{needle} not in {:?}", warnings[0]);
    }

    // Human output says it too.
    let output = ks(home.path()).env("SPEC_KITTY_SAAS_URL", "https://env.example.com").arg("server").output().unwrap();
    assert_eq!(warning_lines(&stderr(&output)).len(), 1);
    assert!(stdout(&output).contains("https://env.example.com"));

    // Setting the configured URL while the variable overrides it: written, and said so.
    let output = ks(home.path())
        .env("SPEC_KITTY_SAAS_URL", "https://env.example.com")
        .args(["server", "https://new.example.com"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert!(config_text(home.path()).contains("server_url = \"https://new.example.com\""));
    assert!(stdout(&output).contains("SPEC_KITTY_SAAS_URL"), "{}", stdout(&output));
    let warnings = stderr(&output);
    assert!(warning_lines(&warnings).iter().any(|w| w.contains("https://new.example.com")), "{warnings}");
}

#[test]
fn env_url_without_a_configured_url_still_overrides_the_default() {
    let home = tempfile::tempdir().unwrap();
    let output = ks(home.path())
        .env("SPEC_KITTY_SAAS_URL", "https://env.example.com")
        .args(["server", "--json"])
        .output()
        .unwrap();
    let doc = parse_json(&output);
    assert_eq!(doc["override_mode"], "process_override");
    assert_eq!(doc["resolved_server_url"], "https://env.example.com");
    let err = stderr(&output);
    assert_eq!(warning_lines(&err).len(), 1, "{err}");
    assert!(err.contains("SPEC_KITTY_SAAS_URL") && err.contains("https://env.example.com"));
}

#[test]
fn env_url_equal_to_the_configured_one_or_blank_is_no_override() {
    let home = tempfile::tempdir().unwrap();
    write_config(home.path(), "[sync]\nserver_url = \"https://same.example.com\"\n");
    for value in ["https://same.example.com/", "https://SAME.example.com", "   "] {
        let output = ks(home.path()).env("SPEC_KITTY_SAAS_URL", value).args(["server", "--json"]).output().unwrap();
        let doc = parse_json(&output);
        assert_eq!(doc["override_mode"], "none", "{value:?}");
        assert!(warning_lines(&stderr(&output)).is_empty(), "{value:?}: {}", stderr(&output));
    }
    let doc = parse_json(&ks(home.path()).env("SPEC_KITTY_SAAS_URL", "").args(["server", "--json"]).output().unwrap());
    assert_eq!(doc["env_server_url"], Value::Null);
    assert_eq!(doc["resolved_server_url"], "https://same.example.com");
}

// ---------------------------------------------------------------------------------------------
// Broken config.toml: exit 2 naming file and line, never a panic, never overwritten

#[test]
fn corrupt_config_is_a_clear_error_and_is_never_overwritten() {
    let home = tempfile::tempdir().unwrap();
    let broken = "# mine\n[sync]\nserver_url = \"https://x.example\"\nbroken = = 1\n";
    write_config(home.path(), broken);
    let commands: &[&[&str]] = &[
        &["server"],
        &["server", "--json"],
        &["server", "https://y.example"],
        &["mode"],
        &["mode", "opt-out"],
        &["emit", "--type", "T"],
    ];
    for args in commands {
        let err = expect_error(ks(home.path()).args(*args), 2, &["config.toml", "line 4"]);
        assert!(err.contains("hint: "), "{err}");
        assert_eq!(config_text(home.path()), broken, "{args:?} left the file alone");
    }
    assert!(!home.path().join("event-sync").exists(), "nothing captured with an unreadable config");
}

#[test]
fn config_whose_tables_are_not_tables_is_refused_without_panicking() {
    for (broken, args) in [
        ("sync = \"https://x.example\"\n", &["server", "https://y.example"][..]),
        ("[[sync]]\nserver_url = \"https://x.example\"\n", &["server", "https://y.example"][..]),
        ("event_sync = 3\n", &["mode", "opt-out"][..]),
        ("[[event_sync]]\nmode = \"teamspace\"\n", &["mode", "local-retention"][..]),
    ] {
        let home = tempfile::tempdir().unwrap();
        write_config(home.path(), broken);
        expect_error(ks(home.path()).args(args), 2, &["config.toml"]);
        assert_eq!(config_text(home.path()), broken);
    }
}

#[test]
fn unreadable_credentials_are_a_warning_without_secrets() {
    let home = tempfile::tempdir().unwrap();
    write_credentials(home.path(), "[tokens]\naccess = \"leaky-secret\"\nthis is not toml\n");
    let output = ks(home.path()).arg("server").output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(err.contains("warning: ") && err.contains("credentials"), "{err}");
    assert!(!err.contains("leaky-secret") && !stdout(&output).contains("leaky-secret"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// mode

#[test]
fn mode_defaults_to_teamspace_and_shows_without_creating_anything() {
    let root = tempfile::tempdir().unwrap();
    let home = root.path().join("absent");
    let doc = mode_json(&home);
    assert_eq!(doc["mode"], "TEAMSPACE");
    assert_eq!(doc["external_endpoint"], Value::Null);
    let output = ks(&home).arg("mode").output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert!(stdout(&output).contains("TEAMSPACE") && stdout(&output).contains(DEFAULT_SERVER), "{}", stdout(&output));
    assert!(!home.exists());
}

#[test]
fn mode_set_accepts_every_mode_and_alias_and_prints_upper_case() {
    let home = tempfile::tempdir().unwrap();
    let endpoint = "http://127.0.0.1:8787/api/v1/events/batch/";
    let cases: &[(&[&str], &str, &str)] = &[
        (&["opt-out"], "OPT_OUT", "opt_out"),
        (&["trash"], "OPT_OUT", "opt_out"),
        (&["TRASH"], "OPT_OUT", "opt_out"),
        (&["Local_Retention"], "LOCAL_RETENTION", "local_retention"),
        (&["local-retention"], "LOCAL_RETENTION", "local_retention"),
        (&["EXTERNAL-RECEIVER", "--endpoint", endpoint], "EXTERNAL_RECEIVER", "external_receiver"),
        (&["external_receiver"], "EXTERNAL_RECEIVER", "external_receiver"),
        (&["TeamSpace"], "TEAMSPACE", "teamspace"),
    ];
    for (args, shown, stored) in cases {
        let output = ks(home.path()).arg("mode").args(*args).output().unwrap();
        assert_eq!(output.status.code(), Some(0), "{args:?}: {}", stderr(&output));
        assert!(stdout(&output).contains(shown), "{args:?}: {}", stdout(&output));
        assert!(config_text(home.path()).contains(&format!("mode = \"{stored}\"")), "{}", config_text(home.path()));
        assert_eq!(mode_json(home.path())["mode"], *shown);
    }
    // The endpoint is kept verbatim (it is posted to as given) across later mode changes.
    assert_eq!(mode_json(home.path())["external_endpoint"], endpoint);
    let doc = json_ok(ks(home.path()).args(["mode", "external-receiver", "--json"]));
    assert_eq!(doc["mode"], "EXTERNAL_RECEIVER");
    assert_eq!(doc["external_endpoint"], endpoint);
}

#[test]
fn external_receiver_needs_an_endpoint() {
    let home = tempfile::tempdir().unwrap();
    expect_error(ks(home.path()).args(["mode", "external-receiver"]), 2, &["endpoint"]);
    assert!(!home.path().join("config.toml").exists());
    write_config(home.path(), OPERATOR_CONFIG);
    expect_error(
        ks(home.path()).args(["mode", "EXTERNAL_RECEIVER", "--token-env", "RECEIVER_TOKEN"]),
        2,
        &["--endpoint"],
    );
    assert_eq!(config_text(home.path()), OPERATOR_CONFIG);
}

#[test]
fn endpoint_and_token_env_are_validated_and_written() {
    let home = tempfile::tempdir().unwrap();
    write_config(home.path(), OPERATOR_CONFIG);
    for bad in ["ftp://x", "http://example.com/api/v1/events/batch/", "https://", "nope"] {
        expect_error(ks(home.path()).args(["mode", "external-receiver", "--endpoint", bad]), 2, &["invalid url"]);
        assert_eq!(config_text(home.path()), OPERATOR_CONFIG);
    }
    for bad in ["1ABC", "MY-TOKEN", "", "tok en"] {
        expect_error(
            ks(home.path()).args([
                "mode",
                "external-receiver",
                "--endpoint",
                "http://127.0.0.1:1/",
                "--token-env",
                bad,
            ]),
            2,
            &["--token-env"],
        );
        assert_eq!(config_text(home.path()), OPERATOR_CONFIG);
    }
    let output = ks(home.path())
        .env_remove("RECEIVER_TOKEN")
        .args(["mode", "external-receiver", "--endpoint", "https://receiver.example.com/api/v1/events/batch/"])
        .args(["--token-env", "RECEIVER_TOKEN"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stderr(&output).contains("RECEIVER_TOKEN"), "warns that the variable is unset: {}", stderr(&output));
    let text = config_text(home.path());
    assert!(text.contains("external_endpoint = \"https://receiver.example.com/api/v1/events/batch/\""), "{text}");
    assert!(text.contains("external_token_env = \"RECEIVER_TOKEN\""), "{text}");
    assert!(text.contains("mode = \"external_receiver\""));
    // Only [event_sync] changed: the rest of the operator's text is intact.
    let (before_event_sync, _) = OPERATOR_CONFIG.split_once("[event_sync]").unwrap();
    assert!(text.starts_with(before_event_sync), "{text}");
    for kept in ["# opt-out for now", "local_only_types = [\"Heartbeat\"]", "[[profiles]]\nname = \"first\""] {
        assert!(text.contains(kept), "{kept} lost:\n{text}");
    }
    let doc = mode_json(home.path());
    assert_eq!(doc["external_token_env"], "RECEIVER_TOKEN");
    // The token's value is never shown, even when set.
    let output = ks(home.path()).env("RECEIVER_TOKEN", "tok-value-123").arg("mode").output().unwrap();
    assert!(stdout(&output).contains("RECEIVER_TOKEN") && !stdout(&output).contains("tok-value-123"));
}

#[test]
fn unknown_mode_is_exit_2_with_the_valid_choices() {
    let home = tempfile::tempdir().unwrap();
    write_config(home.path(), OPERATOR_CONFIG);
    let err = expect_error(ks(home.path()).args(["mode", "cloud"]), 2, &["cloud"]);
    assert!(err.contains("external-receiver") && err.contains("opt-out"), "{err}");
    assert_eq!(config_text(home.path()), OPERATOR_CONFIG);
    // An unknown mode already in the file is named when shown, and fixable with `mode`.
    write_config(home.path(), "[event_sync]\nmode = \"sideways\"\n");
    expect_error(ks(home.path()).arg("mode"), 2, &["sideways"]);
    json_ok(ks(home.path()).args(["mode", "opt-out", "--json"]));
    assert_eq!(mode_json(home.path())["mode"], "OPT_OUT");
}

#[test]
fn mode_flags_without_a_mode_are_usage_errors() {
    let home = tempfile::tempdir().unwrap();
    for args in [&["mode", "--endpoint", "http://127.0.0.1:1/"][..], &["mode", "--token-env", "X"][..]] {
        let output = ks(home.path()).args(args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
    }
    assert!(!home.path().join("config.toml").exists());
}

// ---------------------------------------------------------------------------------------------
// Home resolution

#[test]
fn home_comes_from_flag_then_spec_kitty_home() {
    let env_home = tempfile::tempdir().unwrap();
    let flag_home = tempfile::tempdir().unwrap();
    let output = bare()
        .env("SPEC_KITTY_HOME", env_home.path())
        .args(["server", "https://env-home.example.com"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(config_text(env_home.path()).contains("https://env-home.example.com"));
    let doc = json_ok(bare().env("SPEC_KITTY_HOME", env_home.path()).args(["server", "--json"]));
    assert_eq!(doc["resolved_server_url"], "https://env-home.example.com");
    // --home wins over the variable.
    let doc = json_ok(
        bare().env("SPEC_KITTY_HOME", env_home.path()).arg("--home").arg(flag_home.path()).args(["server", "--json"]),
    );
    assert_eq!(doc["resolved_server_url"], DEFAULT_SERVER);
    // An empty SPEC_KITTY_HOME is ignored (falls back to ~/.spec-kitty under $HOME).
    let fake_user_home = tempfile::tempdir().unwrap();
    let output = bare()
        .env("SPEC_KITTY_HOME", "")
        .env("HOME", fake_user_home.path())
        .args(["mode", "opt-out"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(fake_user_home.path().join(".spec-kitty/config.toml").exists());
}

// ---------------------------------------------------------------------------------------------
// Read-only commands create nothing

#[test]
fn read_only_commands_never_create_the_home_or_any_file() {
    let root = tempfile::tempdir().unwrap();
    let home = root.path().join("no-such-home");
    let commands: &[&[&str]] = &[
        &["server"],
        &["server", "--json"],
        &["mode"],
        &["mode", "--json"],
        &["inspect", "01KVYWRGJEV7CEZW6J7GXEBN16"],
        &["inspect", "01KVYWRGJEV7CEZW6J7GXEBN16", "--json"],
    ];
    for args in commands {
        let _ = ks(&home).args(*args).env("SPEC_KITTY_SAAS_URL", "https://env.example.com").output().unwrap();
        assert!(!home.exists(), "{args:?} created the home");
    }

    // On an existing home with a store and config, nothing changes either.
    let home = tempfile::tempdir().unwrap();
    write_config(home.path(), OPERATOR_CONFIG);
    let output = ks(home.path()).args(["emit", "--type", "T"]).output().unwrap();
    let id = stdout(&output).trim().to_string();
    let before = tree(home.path());
    for args in commands {
        let _ = ks(home.path()).args(*args).output().unwrap();
    }
    let _ = ks(home.path()).args(["inspect", &id, "--json"]).output().unwrap();
    assert_eq!(tree(home.path()), before, "read-only commands changed the home");
}

#[test]
fn unusable_server_urls_from_env_or_file_are_warned_about() {
    let home = tempfile::tempdir().unwrap();
    let output = ks(home.path())
        .env("SPEC_KITTY_SAAS_URL", "ftp://files.example.com")
        .args(["server", "--json"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(parse_json(&output)["resolved_server_url"], "ftp://files.example.com", "the variable still wins");
    let err = stderr(&output);
    assert!(warning_lines(&err).iter().any(|w| w.contains("cannot be used") && w.contains("ftp")), "{err}");
    write_config(home.path(), "[sync]\nserver_url = \"http://teamspace.example.com\"\n");
    let output = ks(home.path()).arg("server").output().unwrap();
    let err = stderr(&output);
    assert!(warning_lines(&err).iter().any(|w| w.contains("[sync] server_url") && w.contains("loopback")), "{err}");
}

#[test]
fn an_empty_home_flag_is_refused() {
    let cwd = tempfile::tempdir().unwrap();
    let output = bare().current_dir(cwd.path()).args(["--home", "", "mode", "opt-out"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("--home"), "{}", stderr(&output));
    assert!(std::fs::read_dir(cwd.path()).unwrap().next().is_none(), "nothing written to the current directory");
}

#[test]
fn mode_in_teamspace_shows_the_overridden_server_and_warns() {
    let home = tempfile::tempdir().unwrap();
    write_config(home.path(), "[sync]\nserver_url = \"https://config.example.com\"\n");
    let output = ks(home.path()).env("SPEC_KITTY_SAAS_URL", "https://env.example.com").arg("mode").output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert!(stdout(&output).contains("https://env.example.com"), "{}", stdout(&output));
    let err = stderr(&output);
    let warnings = warning_lines(&err);
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(warnings[0].contains("SPEC_KITTY_SAAS_URL") && warnings[0].contains("https://config.example.com"));
    // Modes that do not use the server URL stay quiet.
    write_config(home.path(), "[event_sync]\nmode = \"local_retention\"\n");
    let output = ks(home.path()).env("SPEC_KITTY_SAAS_URL", "https://env.example.com").arg("mode").output().unwrap();
    assert!(stderr(&output).is_empty(), "{}", stderr(&output));
}
