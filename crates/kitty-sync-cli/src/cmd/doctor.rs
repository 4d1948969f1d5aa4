//! `kitty-sync doctor [--json]`: one line per check (ok/warn/fail) with a hint; exit 3 when
//! any check fails. Changes nothing.

use std::path::Path;

use anyhow::Result;
use kitty_sync::doctor::{self, Verdict};
use kitty_sync::home::Home;

use crate::exit_status::ExitStatus;
use crate::output::Printer;

pub fn run(home_flag: Option<&Path>, printer: &Printer) -> Result<ExitStatus> {
    let home = Home::resolve(home_flag)?;
    let report = doctor::run(&home);
    if printer.json {
        printer.json_doc(&report);
        return Ok(exit_status(&report));
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
    Ok(exit_status(&report))
}

/// A failed check blocks (exit 3): the operator must act before delivery can be trusted.
fn exit_status(report: &doctor::DoctorReport) -> ExitStatus {
    if report.ok { ExitStatus::Success } else { ExitStatus::Blocked }
}
