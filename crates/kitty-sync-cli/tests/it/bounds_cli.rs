//! Input that is valid for the OS or the shell but out of range for kitty-sync is refused when
//! it is given (exit 2 with a hint), never accepted and failed on later.

use crate::assert_cli_snapshot;
use crate::common::Home;

/// A huge `--wait`/`--timeout` used to overflow `Instant + Duration` and panic (exit 101).
#[test]
fn huge_wait_and_timeout_are_usage_errors() {
    let home = Home::new();
    home.run(&["emit", "--type", "A"]).expect(0);
    // A delivering mode, so `now` gets as far as its lock and its HTTP client.
    home.external("http://127.0.0.1:9/api/v1/events/batch/");
    let huge = ["1e19", "18446744073709551615", "1e300", "86401", "-1", "inf"];
    for value in huge {
        for args in [
            vec!["now", "--wait", value],
            vec!["now", "--timeout", value],
            vec!["archive", "--wait", value],
            vec!["gc", "--wait", value],
        ] {
            let run = home.run(&args).expect(2);
            assert!(run.stderr.contains("hint:"), "{args:?}: {}", run.stderr);
        }
    }
    home.run(&["now", "--timeout", "0"]).expect(2);
    let run = home.run(&["now", "--wait", "1e19"]);
    assert_cli_snapshot!(home.path(), run);
}
