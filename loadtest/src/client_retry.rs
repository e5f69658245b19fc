//! Client retries (`[[retry]]`): a share of the acked events is sent again, `after` its ack, with
//! the same tenant, idempotency key and payload and a new event id — what a client does when it
//! never saw the answer. Inside the ingest stream's duplicate window the retry must be answered
//! `duplicate: true`; after it the retry is stored and routed again, and only the store's ledger,
//! keyed on (tenant, idempotency key), keeps it from having a second effect.

use crate::{
    driver::{Driver, Outcome},
    mix::Generated,
    scenario::Retry,
    tracker::{RETRY, Run, tenant_flags},
};
use bus::CancellationToken;
use serde::{Deserialize, Serialize};
use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

/// Selection granularity: a group's share is rounded to 1 / BUCKETS.
const BUCKETS: u64 = 10_000;
/// Retries in flight at most.
const CONCURRENCY: usize = 32;

/// A retry waiting for its time.
#[derive(Debug)]
struct Pending {
    due_ns: u64,
    group: usize,
    original: u64,
    generated: Generated,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.due_ns, self.original) == (other.due_ns, other.original)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due_ns, self.original).cmp(&(other.due_ns, other.original))
    }
}

/// What one group's retries met.
#[derive(Debug, Default)]
struct Counters {
    scheduled: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
    deduplicated: AtomicU64,
    errors: AtomicU64,
}

/// One group's retries, for the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RetryReport {
    pub name: String,
    pub after_s: f64,
    pub within_window: bool,
    pub scheduled: u64,
    pub sent: u64,
    pub acked: u64,
    /// Answered `duplicate: true` (the stream still held the key).
    pub deduplicated: u64,
    /// Not acked: an error, or refused with `Retry-After`.
    pub errors: u64,
    /// Stored again (acked, not a duplicate) and then processed by the projector.
    pub processed: u64,
}

impl RetryReport {
    /// Whether the group met the window as it expected: every acked retry inside the window was
    /// a duplicate, every one after it was stored again.
    pub fn as_expected(&self) -> bool {
        let stored = self.acked - self.deduplicated;
        self.acked > 0
            && if self.within_window {
                stored == 0
            } else {
                self.deduplicated == 0
            }
    }
}

/// The run's retry groups and the retries waiting.
#[derive(Debug)]
pub struct Retries {
    groups: Vec<Retry>,
    /// Group k takes the events whose bucket is in `bounds[k]..bounds[k + 1]`.
    bounds: Vec<u64>,
    queue: Mutex<BinaryHeap<Reverse<Pending>>>,
    counters: Vec<Counters>,
    /// Retry index → group.
    sent_by: Mutex<Vec<(u64, usize)>>,
}

/// A well-mixed bucket for `index` (splitmix64), so groups do not follow the senders' order.
fn bucket(index: u64) -> u64 {
    let mut z = index.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) % BUCKETS
}

impl Retries {
    pub fn new(groups: &[Retry]) -> Self {
        let mut bounds = vec![0];
        let mut total = 0.0;
        for group in groups {
            total += group.share;
            bounds.push(((total * BUCKETS as f64).round() as u64).min(BUCKETS));
        }
        Self {
            groups: groups.to_vec(),
            bounds,
            queue: Mutex::new(BinaryHeap::new()),
            counters: groups.iter().map(|_| Counters::default()).collect(),
            sent_by: Mutex::new(Vec::new()),
        }
    }

    /// The group event `index` belongs to, if any.
    pub fn group_of(&self, index: u64) -> Option<usize> {
        let b = bucket(index);
        (0..self.groups.len()).find(|&k| self.bounds[k] <= b && b < self.bounds[k + 1])
    }

    /// Event `index` was acked at `now_ns` (after the run's start): schedule its retry if its
    /// group wants one.
    pub fn offer(&self, index: u64, generated: &Generated, now_ns: u64) {
        let Some(group) = self.group_of(index) else {
            return;
        };
        let after = u64::try_from(self.groups[group].after.as_nanos()).unwrap_or(u64::MAX);
        self.counters[group].scheduled.fetch_add(1, Relaxed);
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Reverse(Pending {
                due_ns: now_ns.saturating_add(after),
                group,
                original: index,
                generated: generated.clone(),
            }));
    }

    fn next_due(&self, now_ns: u64) -> Result<Pending, Option<u64>> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        match queue.peek() {
            Some(Reverse(first)) if first.due_ns <= now_ns => {
                queue.pop().map(|Reverse(p)| p).ok_or(None)
            }
            Some(Reverse(first)) => Err(Some(first.due_ns)),
            None => Err(None),
        }
    }

    /// Send retries as they fall due until `load_done` and none is left.
    pub async fn run(
        self: Arc<Self>,
        run: Arc<Run>,
        driver: Arc<Driver>,
        load_done: CancellationToken,
    ) {
        let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            match self.next_due(run.now_ns()) {
                Ok(pending) => {
                    let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                        break;
                    };
                    let (this, run, driver) =
                        (Arc::clone(&self), Arc::clone(&run), Arc::clone(&driver));
                    tasks.spawn(async move {
                        this.send(&run, &driver, pending).await;
                        drop(permit);
                    });
                }
                Err(next) => {
                    if next.is_none() && load_done.is_cancelled() {
                        break;
                    }
                    let wait = next.map_or(Duration::from_millis(50), |due| {
                        Duration::from_nanos(due.saturating_sub(run.now_ns()))
                            .min(Duration::from_millis(50))
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = load_done.cancelled(), if next.is_none() => {}
                    }
                }
            }
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn send(&self, run: &Run, driver: &Driver, pending: Pending) {
        let counters = &self.counters[pending.group];
        let index = run.next_index();
        let view = run.slots.view(pending.original);
        let mut generated = pending.generated;
        generated.event.event_id = run.event_id(index, pending.due_ns);
        run.slots.generate(
            index,
            pending.due_ns,
            generated.class,
            view.map_or(0, |v| v.phase),
        );
        run.slots
            .mark(index, RETRY | tenant_flags(generated.tenant));
        run.retry_of
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(index, pending.original);
        self.sent_by
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((index, pending.group));
        run.mark_sent(index, pending.due_ns);
        counters.sent.fetch_add(1, Relaxed);
        let mut results: Vec<Outcome> = Vec::with_capacity(1);
        driver
            .send(std::slice::from_ref(&generated), &mut results)
            .await;
        match results
            .pop()
            .unwrap_or_else(|| Outcome::Failed("no result".into()))
        {
            Outcome::Acked { duplicate } => {
                run.mark_acked(index, duplicate);
                counters.acked.fetch_add(1, Relaxed);
                if duplicate {
                    counters.deduplicated.fetch_add(1, Relaxed);
                }
            }
            // Refused with `Retry-After`: not stored, and a client retry is not sent again.
            Outcome::Shed { kind, .. } => {
                run.mark_refused(index, &kind);
                counters.errors.fetch_add(1, Relaxed);
            }
            Outcome::Failed(kind) => {
                run.mark_error(index, pending.due_ns, &kind);
                counters.errors.fetch_add(1, Relaxed);
            }
        }
    }

    /// Each group's counts, with how many of its stored retries the projector processed.
    pub fn report(&self, run: &Run) -> Vec<RetryReport> {
        let mut processed = vec![0u64; self.groups.len()];
        for &(index, group) in self
            .sent_by
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            if let Some(view) = run.slots.view(index)
                && view.processed()
            {
                processed[group] += 1;
            }
        }
        self.groups
            .iter()
            .zip(&self.counters)
            .zip(processed)
            .map(|((group, c), processed)| RetryReport {
                name: group.name.clone(),
                after_s: group.after.as_secs_f64(),
                within_window: group.within_window,
                scheduled: c.scheduled.load(Relaxed),
                sent: c.sent.load(Relaxed),
                acked: c.acked.load(Relaxed),
                deduplicated: c.deduplicated.load(Relaxed),
                errors: c.errors.load(Relaxed),
                processed,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, share: f64, within_window: bool) -> Retry {
        Retry {
            name: name.into(),
            share,
            after: Duration::from_secs(1),
            within_window,
        }
    }

    #[test]
    fn groups_take_their_share_and_never_the_same_event() {
        let retries = Retries::new(&[group("a", 0.1, true), group("b", 0.05, false)]);
        let mut counts = [0u32; 3];
        for index in 0..100_000 {
            match retries.group_of(index) {
                Some(k) => counts[k] += 1,
                None => counts[2] += 1,
            }
        }
        assert!((9_000..11_000).contains(&counts[0]), "{counts:?}");
        assert!((4_300..5_700).contains(&counts[1]), "{counts:?}");
        let none = Retries::new(&[]);
        assert_eq!(none.group_of(7), None);
    }

    #[test]
    fn a_group_is_as_expected_only_when_the_window_did_what_it_said() {
        let within = RetryReport {
            within_window: true,
            acked: 10,
            deduplicated: 10,
            ..RetryReport::default()
        };
        assert!(within.as_expected());
        assert!(
            !RetryReport {
                deduplicated: 9,
                ..within.clone()
            }
            .as_expected(),
            "one retry inside the window was stored again"
        );
        let after = RetryReport {
            within_window: false,
            acked: 10,
            deduplicated: 0,
            ..RetryReport::default()
        };
        assert!(after.as_expected());
        assert!(
            !RetryReport {
                deduplicated: 1,
                ..after.clone()
            }
            .as_expected(),
            "the window had not passed"
        );
        assert!(
            !RetryReport::default().as_expected(),
            "no retry acked proves nothing"
        );
    }
}
