//! Liveness that means something: a consumer whose batch has been in its handler longer than a
//! bound, with nothing settled meanwhile, is stuck (a lock never granted, a call that never
//! returns), and `/healthz` says so, so that the supervisor restarts the process. Waiting for
//! work is not stuck, and neither is a batch held for a dependency that is down (each retry
//! returns, which counts as progress; `/readyz` reports the outage).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

/// The loops of one process, shared by every clone (and every [`crate::Bus`] made from one
/// with `connect_another`).
#[derive(Debug, Clone, Default)]
pub struct Liveness {
    loops: Arc<Mutex<BTreeMap<String, Loop>>>,
}

#[derive(Debug)]
struct Loop {
    /// Batches in the handler now.
    busy: usize,
    /// When the loop last finished a batch, or started one while it had none.
    since: Instant,
}

impl Liveness {
    /// The handle of the loop `name` (a role and source, such as `projector/high`). Several
    /// handles of one name count together.
    pub fn register(&self, name: &str) -> Beat {
        self.lock().entry(name.to_owned()).or_insert(Loop {
            busy: 0,
            since: Instant::now(),
        });
        Beat {
            name: name.to_owned(),
            liveness: self.clone(),
        }
    }

    /// The loops with a batch in hand and nothing finished for more than `after`, as of `now`,
    /// with how long they have made no progress.
    pub fn stalled(&self, now: Instant, after: Duration) -> Vec<(String, Duration)> {
        self.lock()
            .iter()
            .filter(|(_, state)| state.busy > 0)
            .map(|(name, state)| (name.clone(), now.saturating_duration_since(state.since)))
            .filter(|(_, quiet)| *quiet > after)
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Loop>> {
        // Plain counters and instants: a panic elsewhere cannot leave them half-updated.
        self.loops.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One loop's handle: [`Beat::start`] when a batch goes into the handler.
#[derive(Debug, Clone)]
pub struct Beat {
    name: String,
    liveness: Liveness,
}

impl Beat {
    /// A batch enters the handler; the guard marks progress when it is dropped (the handler
    /// returned, or its future was dropped).
    pub fn start(&self) -> Working {
        if let Some(state) = self.liveness.lock().get_mut(&self.name) {
            if state.busy == 0 {
                state.since = Instant::now();
            }
            state.busy += 1;
        }
        Working { beat: self.clone() }
    }
}

/// A batch in the handler (see [`Beat::start`]).
#[derive(Debug)]
pub struct Working {
    beat: Beat,
}

impl Drop for Working {
    fn drop(&mut self) {
        if let Some(state) = self.beat.liveness.lock().get_mut(&self.beat.name) {
            state.busy = state.busy.saturating_sub(1);
            state.since = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Duration = Duration::from_secs(60);

    #[test]
    fn a_batch_in_the_handler_past_the_bound_is_stalled_waiting_is_not() {
        let liveness = Liveness::default();
        let beat = liveness.register("projector/high");
        let later = |s: u64| Instant::now() + Duration::from_secs(s);
        assert!(liveness.stalled(later(3600), BOUND).is_empty(), "idle");
        let work = beat.start();
        assert!(liveness.stalled(later(30), BOUND).is_empty());
        let stalled = liveness.stalled(later(61), BOUND);
        assert_eq!(stalled.len(), 1, "{stalled:?}");
        assert_eq!(stalled[0].0, "projector/high");
        assert!(stalled[0].1 >= Duration::from_secs(61));
        drop(work);
        assert!(liveness.stalled(later(61), BOUND).is_empty(), "it returned");
    }

    #[test]
    fn one_batch_finishing_is_progress_while_another_runs() {
        let liveness = Liveness::default();
        let beat = liveness.register("router/bulk");
        let first = beat.start();
        let second = beat.start();
        drop(first);
        // The second started with the first, but the loop finished a batch just now.
        assert!(
            liveness
                .stalled(Instant::now() + Duration::from_secs(30), BOUND)
                .is_empty()
        );
        assert_eq!(
            liveness
                .stalled(Instant::now() + Duration::from_secs(61), BOUND)
                .len(),
            1
        );
        drop(second);
    }
}
