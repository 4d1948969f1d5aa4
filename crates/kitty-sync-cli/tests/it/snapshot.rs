//! Snapshots of a whole command run: exit code, stdout and stderr in one reviewed text, so
//! error messages and `hint:` lines are read by a person when they change, not just
//! `contains`-checked. Run-specific parts (the temporary home, ports, times, ids) are
//! replaced by stable placeholders.
#![allow(dead_code)]

use std::path::Path;

use crate::common::Run;

/// One text holding everything the operator saw.
pub fn render(run: &Run) -> String {
    format!("exit: {}\n--- stdout\n{}--- stderr\n{}", run.code, with_newline(&run.stdout), with_newline(&run.stderr))
}

fn with_newline(text: &str) -> String {
    if text.is_empty() || text.ends_with('\n') { text.to_string() } else { format!("{text}\n") }
}

/// Filters for a run under `home`: the home path, loopback ports, RFC 3339 times, ULIDs,
/// target ids and durations.
pub fn filters(home: &Path) -> Vec<(String, String)> {
    vec![
        (crate::status_support::regex_escape(&home.display().to_string()), "[home]".into()),
        (r"127\.0\.0\.1:\d+".into(), "127.0.0.1:[port]".into()),
        (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)".into(), "[time]".into()),
        (r"tgt_[a-z0-9_]+_[0-9a-f]{32}".into(), "[target-id]".into()),
        (r"\b[0-9A-HJKMNP-TV-Z]{26}\b".into(), "[ulid]".into()),
        (r"\bin \d+(\.\d+)? ?(ms|s|µs)\b".into(), "in [elapsed]".into()),
    ]
}

/// `assert_cli_snapshot!(home_path, run)` or `assert_cli_snapshot!(name, home_path, run)`:
/// exit code, stdout and stderr of `run` against a reviewed snapshot.
#[macro_export]
macro_rules! assert_cli_snapshot {
    ($home:expr, $run:expr) => {{
        let filters = $crate::snapshot::filters($home);
        let refs: Vec<(&str, &str)> = filters.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        insta::with_settings!({ filters => refs, omit_expression => true }, {
            insta::assert_snapshot!($crate::snapshot::render(&$run));
        });
    }};
    ($name:expr, $home:expr, $run:expr) => {{
        let filters = $crate::snapshot::filters($home);
        let refs: Vec<(&str, &str)> = filters.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        insta::with_settings!({ filters => refs, omit_expression => true }, {
            insta::assert_snapshot!($name, $crate::snapshot::render(&$run));
        });
    }};
}
