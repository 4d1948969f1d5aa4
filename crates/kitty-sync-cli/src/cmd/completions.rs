//! `kitty-sync completions SHELL` and `kitty-sync man`: generated from the same clap
//! definition the binary parses with, so they never drift from the real flags.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use clap_complete::Shell;

use crate::exit_status::ExitStatus;

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for
    #[arg(value_enum)]
    shell: Shell,
}

pub fn completions(args: CompletionsArgs, mut command: clap::Command) -> Result<ExitStatus> {
    let name = command.get_name().to_string();
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut command, name, &mut out);
    write_stdout(&out)
}

/// The man page in roff, every subcommand in one page.
pub fn man(command: clap::Command) -> Result<ExitStatus> {
    let mut out = Vec::new();
    let man = clap_mangen::Man::new(command.clone());
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        render_subcommand(&mut out, command.get_name(), sub)?;
    }
    man.render_version_section(&mut out)?;
    write_stdout(&out)
}

/// One `.SH` section per subcommand: its synopsis, description and options.
fn render_subcommand(out: &mut Vec<u8>, parent: &str, sub: &clap::Command) -> Result<()> {
    let name = format!("{parent} {}", sub.get_name());
    writeln!(out, ".SH \"{}\"", name.to_uppercase())?;
    let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
    writeln!(out, ".PP\n\\fB{}\\fR \\- {}", roff_escape(&name), roff_escape(&about))?;
    let page = clap_mangen::Man::new(sub.clone().bin_name(name.clone()));
    let mut section = Vec::new();
    page.render_synopsis_section(&mut section)?;
    page.render_options_section(&mut section)?;
    // Each rendered block starts with its own `.SH`; inside a subcommand they are subsections.
    let text = String::from_utf8_lossy(&section).replace(".SH ", ".SS ");
    out.extend_from_slice(text.as_bytes());
    for nested in sub.get_subcommands().filter(|s| !s.is_hide_set()) {
        render_subcommand(out, &name, nested)?;
    }
    Ok(())
}

fn roff_escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('-', "\\-")
}

/// A reader that stops early (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) -> Result<ExitStatus> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(ExitStatus::Success),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitStatus::Success),
        Err(e) => Err(kitty_sync::Error::io("cannot write", std::path::Path::new("stdout"), e).into()),
    }
}
