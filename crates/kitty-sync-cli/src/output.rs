//! One output discipline for every command: human text or one JSON document on stdout;
//! warnings, progress and errors on stderr.

use std::cell::Cell;
use std::io::{IsTerminal, Write};

use serde::Serialize;

use crate::exit_status::ExitStatus;

pub struct Printer {
    pub json: bool,
    pub quiet: bool,
    pub verbose: u8,
    /// Colour in human output, decided once: stdout is a terminal and `NO_COLOR` is unset.
    pub color: bool,
    stderr_tty: bool,
    /// Whether this process already printed its one JSON document.
    json_printed: Cell<bool>,
}

impl Printer {
    pub fn new(json: bool, quiet: bool, verbose: u8) -> Printer {
        Printer {
            json,
            quiet,
            verbose,
            color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
            stderr_tty: std::io::stderr().is_terminal(),
            json_printed: Cell::new(false),
        }
    }

    /// Human output (suppressed by `--json` and `--quiet`).
    pub fn line(&self, text: impl AsRef<str>) {
        if !self.json && !self.quiet {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", text.as_ref());
        }
    }

    /// Output a script may need even under `--quiet` (e.g. a captured event id).
    pub fn essential(&self, text: impl AsRef<str>) {
        if !self.json {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", text.as_ref());
        }
    }

    pub fn json_doc<T: Serialize>(&self, value: &T) {
        self.json_printed.set(true);
        let mut out = std::io::stdout().lock();
        match serde_json::to_string_pretty(value) {
            Ok(text) => {
                let _ = writeln!(out, "{text}");
            }
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "error: cannot render JSON: {e}");
            }
        }
    }

    pub fn warn(&self, text: impl AsRef<str>) {
        let _ = writeln!(std::io::stderr().lock(), "warning: {}", text.as_ref());
    }

    pub fn note(&self, text: impl AsRef<str>) {
        if !self.quiet {
            let _ = writeln!(std::io::stderr().lock(), "{}", text.as_ref());
        }
    }

    /// Progress bars only on a terminal, never under `--quiet`.
    pub fn show_progress(&self) -> bool {
        self.stderr_tty && !self.quiet
    }

    /// Renders an error with its hint on stderr and returns the exit code; with `-v`, every
    /// cause below it too (`caused by:` lines). Under `--json`, a command that failed before
    /// printing its document prints `{"error": {...}}` instead, so stdout still holds exactly
    /// one JSON document.
    pub fn error(&self, err: &anyhow::Error) -> ExitStatus {
        let (message, hint, status) = match err.downcast_ref::<kitty_sync::Error>() {
            Some(e) => (e.to_string(), e.hint().to_string(), ExitStatus::from(e.class())),
            None if self.verbose > 0 => (err.to_string(), "report it if it persists".to_string(), ExitStatus::Failure),
            None => (
                format!("{err:#}"),
                "run again with -v for details; report it if it persists".to_string(),
                ExitStatus::Failure,
            ),
        };
        if self.json && !self.json_printed.get() {
            let code = status.code();
            self.json_doc(&serde_json::json!({ "error": { "message": message, "hint": hint, "exit_code": code } }));
        }
        let mut stderr = std::io::stderr().lock();
        let _ = writeln!(stderr, "error: {message}");
        if self.verbose > 0 {
            for cause in causes(err, self.verbose > 1) {
                let _ = writeln!(stderr, "caused by: {cause}");
            }
        }
        let _ = writeln!(stderr, "hint: {hint}");
        status
    }
}

/// The error's `source()` chain below the top message, outermost first. A cause whose text
/// the message above already quotes is shown in its debug form instead (the error kind and
/// code the text leaves out); with `-vv`, every cause is.
fn causes(err: &anyhow::Error, debug: bool) -> Vec<String> {
    let top: &(dyn std::error::Error + 'static) = err.as_ref();
    let mut above = top.to_string();
    let mut out = Vec::new();
    let mut next = top.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        out.push(if debug || above.contains(&text) { format!("{cause:?}") } else { text.clone() });
        above = text;
        next = cause.source();
    }
    out
}

/// A spinner with a counter on stderr, drawn only on a terminal.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    pub fn lines(printer: &Printer, label: &'static str) -> Progress {
        if !printer.show_progress() {
            return Progress { bar: None };
        }
        let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} {pos} lines ({elapsed})") {
            bar.set_style(style);
        }
        bar.set_message(label);
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        Progress { bar: Some(bar) }
    }

    pub fn set(&self, position: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(position);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Progress {
    /// A bar with a known total (falls back to a counter while the total is unknown).
    pub fn bar(printer: &Printer, label: &'static str) -> Progress {
        if !printer.show_progress() {
            return Progress { bar: None };
        }
        let bar = indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} events ({elapsed}, eta {eta})")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(label);
        Progress { bar: Some(bar) }
    }

    pub fn is_visible(&self) -> bool {
        self.bar.is_some()
    }

    pub fn update(&self, position: u64, total: Option<u64>) {
        if let Some(bar) = &self.bar {
            if let Some(total) = total {
                bar.set_length(total);
            }
            bar.set_position(position);
        }
    }
}
