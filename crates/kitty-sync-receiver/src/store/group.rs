//! Group commit: batches that arrive while a commit is in progress are committed together by
//! the next caller, in one transaction and one fsync. With several clients the disk sync, not
//! the inserts, is what each batch would otherwise queue behind.
//!
//! No thread of its own: whoever submits while nobody is leading becomes the leader, runs
//! every pending job, publishes the results and steps down; the others wait on a condvar.
//! A caller leads at most the one round that contains its own job.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

pub(crate) struct GroupCommit<J, R> {
    state: Mutex<State<J, R>>,
    wake: Condvar,
}

struct State<J, R> {
    next_id: u64,
    leading: bool,
    pending: Vec<(u64, J)>,
    done: HashMap<u64, R>,
}

impl<J, R> GroupCommit<J, R> {
    pub(crate) fn new() -> Self {
        GroupCommit {
            state: Mutex::new(State { next_id: 0, leading: false, pending: Vec::new(), done: HashMap::new() }),
            wake: Condvar::new(),
        }
    }

    /// Runs `job` (possibly together with other callers' jobs) and returns its result.
    /// `run` gets the jobs in arrival order and answers one result per job, in order;
    /// `lost` stands in for a result `run` failed to give (short answer or panic).
    pub(crate) fn submit(&self, job: J, run: impl Fn(Vec<J>) -> Vec<R>, lost: impl Fn() -> R) -> R {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.pending.push((id, job));
        loop {
            if let Some(result) = state.done.remove(&id) {
                return result;
            }
            if state.leading {
                state = self.wake.wait(state).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            state.leading = true;
            let (ids, jobs): (Vec<u64>, Vec<J>) = std::mem::take(&mut state.pending).into_iter().unzip();
            drop(state);
            let mut round = Round { group: self, ids, lost: &lost };
            let results = run(jobs);
            round.publish(results);
            state = self.lock();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<J, R>> {
        // Results are only inserted whole and `leading` is reset by `Round` even on panic,
        // so the state is consistent after a poisoning panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One leader's round. Publishing (or unwinding out of `run`) hands results to the waiting
/// callers and steps down, so a panic cannot leave everyone waiting for a leader.
struct Round<'a, J, R, L: Fn() -> R> {
    group: &'a GroupCommit<J, R>,
    ids: Vec<u64>,
    lost: &'a L,
}

impl<J, R, L: Fn() -> R> Round<'_, J, R, L> {
    fn publish(&mut self, results: Vec<R>) {
        let mut state = self.group.lock();
        let mut results = results.into_iter();
        for id in self.ids.drain(..) {
            let result = results.next().unwrap_or_else(|| (self.lost)());
            state.done.insert(id, result);
        }
        state.leading = false;
        self.group.wake.notify_all();
    }
}

impl<J, R, L: Fn() -> R> Drop for Round<'_, J, R, L> {
    fn drop(&mut self) {
        if !self.ids.is_empty() {
            self.publish(Vec::new());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn every_caller_gets_its_own_result_and_rounds_are_shared() {
        let group = GroupCommit::<u32, u32>::new();
        let rounds = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..16u32)
                .map(|n| {
                    let (group, rounds) = (&group, &rounds);
                    scope.spawn(move || {
                        let run = |jobs: Vec<u32>| {
                            rounds.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(20));
                            jobs.into_iter().map(|j| j * 10).collect()
                        };
                        (n, group.submit(n, run, || u32::MAX))
                    })
                })
                .collect();
            for handle in handles {
                let (n, result) = handle.join().unwrap();
                assert_eq!(result, n * 10);
            }
        });
        assert!(rounds.load(Ordering::SeqCst) < 16, "some rounds should carry several jobs");
    }

    #[test]
    fn a_panicking_leader_does_not_strand_the_others() {
        let group = GroupCommit::<u32, Option<u32>>::new();
        let panicked =
            std::thread::scope(|scope| scope.spawn(|| group.submit(1, |_| panic!("boom"), || None)).join().is_err());
        assert!(panicked);
        assert_eq!(group.submit(2, |jobs| jobs.into_iter().map(Some).collect(), || None), Some(2));
        assert_eq!(group.submit(3, |_| Vec::new(), || None), None, "short answers become `lost`");
    }
}
