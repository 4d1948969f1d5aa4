//! `kitty-sync tail [--after EVENT_ID] [--follow] [--type T]... [--limit N]`: stored envelopes
//! as JSON Lines on stdout, byte for byte, in capture order.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use kitty_sync::home::Home;
use kitty_sync::tail::JournalTail;
use kitty_sync::watch::{StoreWatcher, Wake, Waker};

use crate::exit_status::ExitStatus;
use crate::output::Printer;

/// Rows per page: large enough that one `write` carries megabytes, small enough that a
/// page's read snapshot stays short.
const PAGE_ROWS: usize = 10_000;
/// With notifications working, an idle follower still looks this often (the safety net).
const IDLE_LOOK: Duration = Duration::from_secs(5);

#[derive(Args, Debug)]
pub struct TailArgs {
    /// Start right after this event (an event_id printed earlier); default: the first event
    #[arg(long, value_name = "EVENT_ID")]
    after: Option<String>,
    /// Keep printing new captures until interrupted (SIGINT/SIGTERM) or stdout is closed
    #[arg(long)]
    follow: bool,
    /// Only events of this type (repeatable)
    #[arg(long = "type", value_name = "TYPE")]
    types: Vec<String>,
    /// Stop after N events
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
}

pub fn run(args: TailArgs, home_flag: Option<&Path>, printer: &Printer) -> Result<ExitStatus> {
    let home = Home::resolve(home_flag)?;
    let mut tail = JournalTail::new(&home, args.types, args.after.as_deref())?;
    let mut remaining = args.limit.unwrap_or(u64::MAX);
    let mut watcher = args.follow.then(|| follower(&home, printer));
    let mut page = Vec::with_capacity(4 << 20);
    loop {
        match catch_up(&mut tail, &mut page, &mut remaining) {
            Ok(()) => {}
            Err(CatchUp::ReaderGone) => return Ok(ExitStatus::Success),
            Err(CatchUp::Failed(e)) => return Err(e.into()),
        }
        // Everything readable is out; a store that had to be stepped over is not a clean end.
        if let Some(damage) = tail.damage() {
            return Err(damage.into());
        }
        let Some(watcher) = watcher.as_mut() else { return Ok(ExitStatus::Success) };
        if remaining == 0 || watcher.wait(IDLE_LOOK) == Wake::Stop {
            return Ok(ExitStatus::Success);
        }
    }
}

enum CatchUp {
    /// The reader went away (EPIPE): a normal end for a stream, exit 0.
    ReaderGone,
    Failed(kitty_sync::Error),
}

fn write_error(e: std::io::Error) -> CatchUp {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        CatchUp::ReaderGone
    } else {
        CatchUp::Failed(kitty_sync::Error::io("cannot write to", Path::new("stdout"), e))
    }
}

/// Prints every page there is now (up to the limit) and flushes.
fn catch_up(tail: &mut JournalTail, page: &mut Vec<u8>, remaining: &mut u64) -> Result<(), CatchUp> {
    let mut out = std::io::stdout().lock();
    while *remaining > 0 {
        page.clear();
        let max = (*remaining).min(PAGE_ROWS as u64) as usize;
        let count = tail.next_page(page, max).map_err(CatchUp::Failed)?;
        if count == 0 {
            break;
        }
        *remaining -= count as u64;
        // The page ends with a newline, so stdout's line buffer passes it on in one write.
        out.write_all(page).map_err(write_error)?;
    }
    out.flush().map_err(write_error)
}

/// The watcher a follower waits on, woken early by SIGINT/SIGTERM and by its reader leaving.
fn follower(home: &Home, printer: &Printer) -> StoreWatcher {
    let watcher = StoreWatcher::new(home);
    let waker = watcher.waker();
    let on_signal = waker.clone();
    if let Err(e) = ctrlc::set_handler(move || on_signal.stop()) {
        printer.warn(format!("cannot handle SIGINT/SIGTERM ({e}); they will end tail abruptly"));
    }
    watch_reader(waker);
    watcher
}

/// A follower that prints nothing for hours would only learn that its reader left (`| head -1`)
/// at its next write; poll(2) reports the closed pipe as soon as it happens.
#[cfg(unix)]
fn watch_reader(waker: Waker) {
    std::thread::spawn(move || {
        let mut fd = libc::pollfd { fd: libc::STDOUT_FILENO, events: 0, revents: 0 };
        loop {
            // SAFETY: one valid pollfd, for the duration of the call.
            let ready = unsafe { libc::poll(&mut fd, 1, -1) };
            if ready > 0 && fd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                waker.stop();
                return;
            }
            if ready < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return;
            }
        }
    });
}

#[cfg(not(unix))]
fn watch_reader(_waker: Waker) {}
