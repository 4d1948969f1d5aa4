//! `kitty-sync demo`: the whole story in a temporary home, against two built-in receivers
//! on loopback. Captured → delivered to A → switched to B → delivered again → a re-run
//! skips everything → every event is still retained. Leaves nothing behind.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Args;
use kitty_sync::delivery::dispatcher::{DrainOptions, DrainSummary, drain};
use kitty_sync::delivery::fanout::drain_all;
use kitty_sync::delivery::lock::{self, DrainLock};
use kitty_sync::delivery::receiver::{ExternalReceiver, HttpClient};
use kitty_sync::event_journal::{CapturePolicy, Journal, NewEvent};
use kitty_sync::home::{Home, set_config_string, try_edit_config};
use kitty_sync::mode::EventSyncMode;
use kitty_sync::store::Store;
use kitty_sync::targets_config::{self, NewTarget, PRIMARY};
use kitty_sync_receiver::{ReceiverStore, RunningServer, ServerConfig, SqliteStore};
use serde_json::json;

use super::Context;
use crate::exit_status::ExitStatus;
use crate::output::Printer;

#[derive(Args, Debug)]
pub struct DemoArgs {}

struct DemoReceiver {
    server: RunningServer,
    store: Arc<SqliteStore>,
}

impl DemoReceiver {
    fn start(dir: &Path, name: &str) -> Result<DemoReceiver> {
        let store = Arc::new(SqliteStore::open(&dir.join(format!("receiver-{name}.db")))?);
        let addr: SocketAddr = "127.0.0.1:0".parse()?;
        let server = RunningServer::start(addr, ServerConfig::default(), store.clone())?;
        Ok(DemoReceiver { server, store })
    }

    fn endpoint(&self) -> String {
        format!("{}/api/v1/events/batch/", self.server.url())
    }

    /// How many of the receiver's stored envelopes equal the journal's bytes exactly.
    fn identical_to_journal(&self, store: &Store) -> Result<usize> {
        let mut same = 0;
        for event in self.store.events_after(0, 1000)? {
            let journal = kitty_sync::inspect::inspect(Some(store), &event.event_id)?.envelope;
            same += usize::from(journal.is_some_and(|stored| stored.get() == event.envelope));
        }
        Ok(same)
    }

    fn counts(&self) -> Result<(u64, u64)> {
        let stats = self.store.stats()?;
        Ok((stats.event_count, stats.batch_requests))
    }
}

const SAMPLE: [(&str, &str); 12] = [
    ("MissionCreated", "demo mission"),
    ("SpecifyStarted", "spec.md"),
    ("WPCreated", "WP01"),
    ("WPCreated", "WP02"),
    ("WPCreated", "WP03"),
    ("WPStatusChanged", "WP01 planned → doing"),
    ("WPStatusChanged", "WP02 planned → doing"),
    ("WPStatusChanged", "WP01 doing → review"),
    ("WPStatusChanged", "WP01 review → done"),
    ("WPStatusChanged", "WP03 planned → doing"),
    ("DependencyResolved", "WP02 ← WP01"),
    ("MissionNote", "café ☕ and 🚀: unicode survives byte for byte"),
];

pub fn run(_args: DemoArgs, _home_flag: Option<&Path>, printer: &Printer) -> Result<ExitStatus> {
    let dir =
        tempfile::Builder::new().prefix("kitty-sync-demo-").tempdir().context("cannot create a temporary home")?;
    let home = Home::at(&dir.path().join("home"));
    let a = DemoReceiver::start(dir.path(), "a")?;
    let b = DemoReceiver::start(dir.path(), "b")?;
    let c = DemoReceiver::start(dir.path(), "c")?;
    let say = |text: String| printer.line(text);
    say(format!("kitty-sync demo — temporary home {}", home.root().display()));
    say(format!("receivers: A {} · B {} · C {}", a.server.url(), b.server.url(), c.server.url()));

    // Held for the whole story: every drain below changes delivery state.
    let lock = lock::acquire(&home, Duration::ZERO, "`kitty-sync demo`")?;
    let mut store = Store::open(&home)?;
    let policy = CapturePolicy { mode: EventSyncMode::ExternalReceiver, ..CapturePolicy::default() };
    let mut journal = Journal::new(&mut store, policy);
    append(&mut journal, &SAMPLE)?;
    say(format!("1. captured {} events into the journal", SAMPLE.len()));

    let first = drain_to(&home, &mut store, &lock, &a, "2. now → A")?;
    say(first);
    say("3. switched: kitty-sync mode external-receiver --endpoint <B>".into());
    say(drain_to(&home, &mut store, &lock, &b, "4. now → B")?);
    let (_, b_requests) = b.counts()?;
    say(drain_to(&home, &mut store, &lock, &b, "5. now → B again")?);
    let (b_events, b_after) = b.counts()?;
    say(format!("   B received {} new request(s): everything was already delivered", b_after - b_requests));
    let (a_events, a_before) = a.counts()?;
    say(drain_to(&home, &mut store, &lock, &a, "6. back to A")?);
    let (_, a_after) = a.counts()?;
    say(format!("   A received {} new request(s) too", a_after - a_before));
    let retained = kitty_sync::store::stats::journal_counters_of(&store)?.retained;
    say(format!("7. journal still retains {retained}/{} events; A holds {a_events}, B holds {b_events}", SAMPLE.len()));
    say(format!(
        "   byte-identical to the journal: A {}/{a_events}, B {}/{b_events}",
        a.identical_to_journal(&store)?,
        b.identical_to_journal(&store)?
    ));
    capture(&mut store, &SAMPLE[..3])?;
    say("8. captured 3 more; kitty-sync target add b --endpoint <B> (beside primary A); now → both at once".into());
    add_target(&home, "b", &b)?;
    fan_out(&home, &lock, printer)?;
    say("9. kitty-sync target add c --endpoint <C>; now → C catches up alone".into());
    add_target(&home, "c", &c)?;
    fan_out(&home, &lock, printer)?;
    drop((store, lock));
    say(String::new());
    say("kitty-sync status:".into());
    let ctx = Context::load(Some(home.root()))?;
    let mode = ctx.config.mode()?;
    let receiver = super::target::active_receiver(&ctx, mode, Duration::from_secs(5), printer)?;
    let report = kitty_sync::status::build(
        &ctx.home,
        &ctx.authority,
        &kitty_sync::status::CurrentDelivery { mode, receiver: receiver.as_deref().map(|r| r as _) },
    );
    super::status::render(&report, &ctx, printer);
    drop((a, b, c));
    dir.close().context("cannot remove the temporary home")?;
    say(String::new());
    say("Done: the temporary home and the receiver databases were removed.".into());
    Ok(ExitStatus::Success)
}

fn append(journal: &mut Journal<'_>, events: &[(&str, &str)]) -> Result<()> {
    for (i, (event_type, note)) in events.iter().enumerate() {
        journal.append(NewEvent {
            event_type: event_type.to_string(),
            aggregate_id: Some("demo-mission".into()),
            aggregate_type: Some("Mission".into()),
            payload: Some(json!({ "step": i + 1, "note": note })),
            ..NewEvent::default()
        })?;
    }
    Ok(())
}

fn capture(store: &mut Store, events: &[(&str, &str)]) -> Result<()> {
    let policy = CapturePolicy { mode: EventSyncMode::ExternalReceiver, ..CapturePolicy::default() };
    append(&mut Journal::new(store, policy), events)
}

/// `kitty-sync target add NAME --endpoint <receiver>`.
fn add_target(home: &Home, name: &str, receiver: &DemoReceiver) -> Result<()> {
    let path = home.config_path();
    let new = NewTarget {
        name: name.into(),
        endpoint: receiver.endpoint(),
        token_env: None,
        types: Vec::new(),
        enabled: true,
    };
    try_edit_config(&path, |doc| targets_config::add(doc, &path, &new))?;
    Ok(())
}

/// `kitty-sync now` with every active target: one final line per target.
fn fan_out(home: &Home, lock: &DrainLock, printer: &Printer) -> Result<()> {
    let ctx = Context::load(Some(home.root()))?;
    let mode = ctx.config.mode()?;
    let plan = super::fan::plan(&ctx, mode, &[], Duration::from_secs(10), printer)?;
    let outcomes = drain_all(home, lock, plan.targets, &DrainOptions::default(), false, &mut |_, _| {});
    let mut idle = Vec::new();
    for outcome in outcomes {
        if let Some(e) = outcome.error {
            return Err(e.into());
        }
        let name = if outcome.name == PRIMARY { "A".to_string() } else { outcome.name.to_uppercase() };
        if outcome.summary.selected == 0 {
            idle.push(name);
            continue;
        }
        printer.line(format!("   {name}: {}", super::now::final_line(&outcome.summary, &outcome.name)));
    }
    if !idle.is_empty() {
        printer.line(format!("   {}: nothing to send", idle.join(", ")));
    }
    Ok(())
}

/// Points the home at `receiver` (as `kitty-sync mode` would) and drains to it.
fn drain_to(home: &Home, store: &mut Store, lock: &DrainLock, receiver: &DemoReceiver, label: &str) -> Result<String> {
    let endpoint = receiver.endpoint();
    let path = home.config_path();
    try_edit_config(&path, |doc| {
        set_config_string(doc, &path, "event_sync", "mode", EventSyncMode::ExternalReceiver.config_token())?;
        set_config_string(doc, &path, "event_sync", "external_endpoint", &endpoint)
    })?;
    let mut target = ExternalReceiver::new(Some(&endpoint), None, HttpClient::new(Duration::from_secs(10)))?;
    let summary: DrainSummary = drain(store, lock, &mut target, &DrainOptions::default(), false, &mut |_, _| {})?;
    Ok(format!("{label}: {}", super::now::final_line(&summary, EventSyncMode::ExternalReceiver.display_name())))
}
