//! `kitty-sync doctor [--json]`: one line per check (ok/warn/fail) with a hint; exit 3 when
//! any check fails. Changes nothing.

use std::path::Path;

use anyhow::Result;
use kitty_sync::doctor::{self, Verdict};
use kitty_sync::home::Home;

use crate::output::Printer;

pub fn run(home_flag: Option<&Path>, printer: &Printer) -> Result<u8> {
    let home = Home::resolve(home_flag)?;
    let report = doctor::run(&home);
    if printer.json {
        printer.json_doc(&report);
        return Ok(report.exit_code());
    }
    for check in &report.checks {
        // Under --quiet only what needs attention is printed.
        if printer.quiet && check.status == Verdict::Ok {
            continue;
        }
        printer.essential(format!("{:<5} {:<24} {}", check.status.as_str(), check.name, check.detail));
        if let Some(hint) = &check.hint {
            printer.essential(format!("{:<5} {:<24} hint: {hint}", "", ""));
        }
    }
    let failed = report.checks.iter().filter(|c| c.status == Verdict::Fail).count();
    let warned = report.checks.iter().filter(|c| c.status == Verdict::Warn).count();
    printer.line(format!("{} checks: {failed} failed, {warned} warnings", report.checks.len()));
    Ok(report.exit_code())
}
