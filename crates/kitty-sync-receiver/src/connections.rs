//! The open connections and what each is doing, so that a full server makes room by closing
//! the connection that costs honest clients least: one idle the longest, else one stuck the
//! longest in sending its request body. A connection whose request is being processed is
//! never closed: its client would lose the answer to work already done.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for (the rest of) a request head, before the first request or between two.
    Idle,
    /// A request is being handled but its body has not fully arrived.
    Reading,
    /// The request body is in; the answer is being computed.
    Working,
}

#[derive(Debug)]
struct PhaseSince {
    phase: Phase,
    since: Instant,
}

/// One connection's state, shared between its task, its requests and the registry.
#[derive(Debug)]
pub(crate) struct Activity {
    state: Mutex<PhaseSince>,
    evicted: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity { state: Mutex::new(PhaseSince { phase: Phase::Idle, since: Instant::now() }), evicted: Notify::new() }
    }

    fn lock(&self) -> MutexGuard<'_, PhaseSince> {
        // The guarded value is two plain fields, valid whatever a panicking holder did.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn enter(&self, phase: Phase) {
        *self.lock() = PhaseSince { phase, since: Instant::now() };
    }

    /// A request head arrived; its body (if any) is still to come.
    pub(crate) fn request_started(&self) {
        self.enter(Phase::Reading);
    }

    /// The request body is fully read: from now on the connection is not evicted.
    pub(crate) fn body_received(&self) {
        self.enter(Phase::Working);
    }

    /// The answer is written (or handed to the connection): idle until the next request.
    pub(crate) fn request_finished(&self) {
        self.enter(Phase::Idle);
    }

    /// Completes when the registry chose this connection to make room for a new one.
    pub(crate) async fn evicted(&self) {
        self.evicted.notified().await;
    }
}

pub(crate) enum Admission {
    /// Serve the connection; drop the [`Ticket`] when it closes.
    Admitted(Ticket),
    /// Full of working connections: answer 503 and close.
    Full,
}

/// A registered connection; deregisters on drop.
pub(crate) struct Ticket {
    id: u64,
    activity: Arc<Activity>,
    registry: Arc<Registry>,
}

impl Ticket {
    pub(crate) fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.registry.open().remove(&self.id);
    }
}

#[derive(Debug)]
pub(crate) struct Registry {
    max: usize,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Activity>>>,
}

impl Registry {
    pub(crate) fn new(max: usize) -> Arc<Registry> {
        Arc::new(Registry { max: max.max(1), next_id: AtomicU64::new(0), open: Mutex::new(HashMap::new()) })
    }

    fn open(&self) -> MutexGuard<'_, HashMap<u64, Arc<Activity>>> {
        self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a new connection, evicting one when the server is full.
    pub(crate) fn admit(self: &Arc<Self>) -> Admission {
        let mut open = self.open();
        if open.len() >= self.max {
            let Some(victim) = victim(&open) else { return Admission::Full };
            if let Some(activity) = open.remove(&victim) {
                // `notify_one` keeps the wake-up even if the task is not waiting right now.
                activity.evicted.notify_one();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new());
        open.insert(id, Arc::clone(&activity));
        Admission::Admitted(Ticket { id, activity, registry: Arc::clone(self) })
    }
}

/// The longest-idle connection, else the one longest in its body; never a working one.
fn victim(open: &HashMap<u64, Arc<Activity>>) -> Option<u64> {
    let candidates = open.iter().filter_map(|(id, activity)| {
        let state = activity.lock();
        let rank = match state.phase {
            Phase::Idle => 0,
            Phase::Reading => 1,
            Phase::Working => return None,
        };
        Some((rank, state.since, *id))
    });
    candidates.min().map(|(_, _, id)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(registry: &Arc<Registry>) -> Ticket {
        match registry.admit() {
            Admission::Admitted(ticket) => ticket,
            Admission::Full => panic!("refused"),
        }
    }

    fn working(ticket: &Ticket) {
        ticket.activity().request_started();
        ticket.activity().body_received();
    }

    #[test]
    fn idle_goes_first_then_the_oldest_reader_and_never_a_worker() {
        let tick = || std::thread::sleep(std::time::Duration::from_millis(2));
        let registry = Registry::new(3);
        let worker = admitted(&registry);
        working(&worker);
        tick();
        let reader = admitted(&registry);
        reader.activity().request_started();
        tick();
        let idle = admitted(&registry);

        let fourth = admitted(&registry);
        assert!(!registry.open().contains_key(&idle.id), "the idle connection made room");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let woken = runtime.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(1), idle.activity().evicted()).await
        });
        assert!(woken.is_ok(), "the evicted connection's task is told");

        working(&fourth);
        let fifth = admitted(&registry);
        assert!(!registry.open().contains_key(&reader.id), "then the one stuck in its body");
        working(&fifth);
        assert!(matches!(registry.admit(), Admission::Full));
        drop(worker);
        assert!(matches!(registry.admit(), Admission::Admitted(_)));
    }
}
