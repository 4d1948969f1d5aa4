//! Error texts as the operator sees them: exit code, stdout and stderr snapshotted together,
//! so every message and `hint:` line is reviewed when it changes.

use crate::assert_cli_snapshot;
use crate::common::Home;

#[test]
fn unknown_event_id_for_inspect() {
    let home = Home::new();
    home.run(&["emit", "--type", "T"]).expect(0);
    let run = home.run(&["inspect", "01ARZ3NDEKTSV4RRFFQ69G5FAV"]);
    assert_cli_snapshot!(home.path(), run);
}

#[test]
fn external_receiver_without_an_endpoint() {
    let home = Home::new();
    let run = home.run(&["mode", "external-receiver"]);
    assert_cli_snapshot!(home.path(), run);
}

#[test]
fn unknown_flag() {
    let home = Home::new();
    let run = home.run(&["now", "--no-such-flag"]);
    assert_cli_snapshot!(home.path(), run);
}

#[test]
fn invalid_server_url() {
    let home = Home::new();
    let run = home.run(&["server", "not a url"]);
    assert_cli_snapshot!(home.path(), run);
}
