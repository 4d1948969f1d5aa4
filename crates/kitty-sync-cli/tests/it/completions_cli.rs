//! `kitty-sync completions SHELL` and `kitty-sync man`: generated from the real command
//! definition, so every subcommand shows up.

use crate::common::bin;

const SUBCOMMANDS: [&str; 6] = ["emit", "now", "status", "tail", "migrate", "receiver"];

fn stdout_of(args: &[&str]) -> String {
    let output = bin().args(args).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn every_shell_gets_a_script_naming_the_subcommands() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = stdout_of(&["completions", shell]);
        assert!(script.contains("kitty-sync"), "{shell}");
        for sub in SUBCOMMANDS {
            assert!(script.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    assert!(stdout_of(&["completions", "bash"]).contains("complete -F"));
}

#[test]
fn unknown_shell_is_a_usage_error() {
    let output = bin().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bash") && stderr.contains("hint:"), "{stderr}");
}

#[test]
fn man_page_is_roff_with_a_section_per_subcommand() {
    let page = stdout_of(&["man"]);
    assert!(page.contains(".TH kitty-sync 1"), "{page}");
    for sub in SUBCOMMANDS {
        assert!(page.contains(&format!(".SH \"KITTY-SYNC {}\"", sub.to_uppercase())), "no section for {sub}");
    }
    assert!(page.contains("\\-\\-follow"), "tail's flags are documented");
    assert!(page.contains(".SH \"KITTY-SYNC RECEIVER SERVE\""), "nested subcommands too");
}
