//! Events held back in an open-model phase, and the task that sends them again: events the
//! platform refused with `Retry-After` (sent again with the same id once the delay has passed, a
//! bounded number of times) and bulk events the admission signal defers (sent in order as the
//! allowed rate frees a slot). Nothing is held past the phase's end: what is still waiting then
//! was never acked, and is counted shed. Latency stays measured from each event's intended send
//! time, so the waits count.

use crate::{
    admission::SharedPacer,
    client_retry::Retries,
    driver::{Attempt, Driver, Outcome, Settled, settle},
    mix::Generated,
    tracker::{Run, histogram, record},
};
use hdrhistogram::Histogram;
use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::{Notify, Semaphore};

/// An event waiting to be sent (again).
#[derive(Debug, Clone)]
pub struct Pending {
    pub generated: Generated,
    pub attempt: Attempt,
}

#[derive(Debug, Default)]
struct Queue {
    /// Refused events by (when they may go again, arrival order).
    retries: BTreeMap<(u64, u64), Pending>,
    /// Deferred bulk events, oldest first.
    deferred: VecDeque<Pending>,
    next_seq: u64,
    /// Taken from the queue, answer not handled yet (a refusal may queue it again).
    in_flight: usize,
    /// The phase's own senders have stopped (they queue nothing more).
    fresh_done: bool,
}

/// What the dispatcher does next.
#[derive(Debug)]
enum Next {
    /// Boxed: an event is large beside the other variants.
    Send(Box<Pending>),
    /// Until this time (ns after the run's start) or until something is queued.
    Wait(u64),
    Stop,
}

/// One phase's held-back events and the rules for them.
#[derive(Debug)]
pub struct HeldBack {
    /// Nothing is sent from here at or after this time (ns after the run's start).
    deadline_ns: u64,
    /// Sends of one event at most (the first included).
    max_attempts: u32,
    pacer: Option<SharedPacer>,
    /// Client retries (`[[retry]]`) to schedule for the events acked from here.
    client_retries: Option<Arc<Retries>>,
    queue: Mutex<Queue>,
    wake: Notify,
}

fn as_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl HeldBack {
    pub fn new(deadline_ns: u64, max_attempts: u32, pacer: Option<SharedPacer>) -> Self {
        Self {
            deadline_ns,
            max_attempts: max_attempts.max(1),
            pacer,
            client_retries: None,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
        }
    }

    /// Offer the events acked from here to the run's client retries, as the senders do.
    #[must_use]
    pub fn with_client_retries(mut self, client_retries: Option<Arc<Retries>>) -> Self {
        self.client_retries = client_retries;
        self
    }

    pub const fn deadline_ns(&self) -> u64 {
        self.deadline_ns
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When a refused event may go again as attempt `next` (ns after the start): `None` when
    /// that is one attempt too many or the delay reaches past the deadline (it stays shed).
    pub fn retry_at(&self, next: &Attempt, retry_after: Duration, now_ns: u64) -> Option<u64> {
        let at = now_ns.saturating_add(as_ns(retry_after));
        (next.number <= self.max_attempts && at < self.deadline_ns).then_some(at)
    }

    /// Queue a refused event (numbered as its next attempt); false when it may not have one.
    pub fn retry_later(&self, pending: Pending, retry_after: Duration, now_ns: u64) -> bool {
        let Some(at) = self.retry_at(&pending.attempt, retry_after, now_ns) else {
            return false;
        };
        {
            let mut queue = self.queue();
            let seq = queue.next_seq;
            queue.next_seq += 1;
            queue.retries.insert((at, seq), pending);
        }
        self.wake.notify_one();
        true
    }

    /// A fresh bulk event the pacer governs: back to the caller to send now, or deferred (behind
    /// the bulk deferred before it) and `None`. Past the deadline it is not queued: shed.
    pub fn admit(&self, run: &Run, pending: Pending, now_ns: u64) -> Option<Pending> {
        let Some(pacer) = &self.pacer else {
            return Some(pending);
        };
        let mut queue = self.queue();
        if queue.deferred.is_empty()
            && pacer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .try_acquire(now_ns)
                .is_ok()
        {
            return Some(pending);
        }
        run.mark_deferred(pending.attempt.index);
        if now_ns < self.deadline_ns {
            queue.deferred.push_back(pending);
            drop(queue);
            self.wake.notify_one();
        }
        None
    }

    /// The phase's senders are done: the dispatcher stops once nothing is held any more.
    pub fn fresh_done(&self) {
        self.queue().fresh_done = true;
        self.wake.notify_one();
    }

    /// An event taken by [`Self::next`] has been answered (and re-queued if refused).
    fn settled(&self) {
        self.queue().in_flight -= 1;
        self.wake.notify_one();
    }

    fn next(&self, now_ns: u64) -> Next {
        let mut queue = self.queue();
        if now_ns >= self.deadline_ns {
            // What still waits was never acked: shed (its flags say so).
            queue.retries.clear();
            queue.deferred.clear();
            return Next::Stop;
        }
        if let Some(entry) = queue.retries.first_entry()
            && entry.key().0 <= now_ns
        {
            let pending = entry.remove();
            queue.in_flight += 1;
            return Next::Send(Box::new(pending));
        }
        let mut until = queue
            .retries
            .first_key_value()
            .map_or(self.deadline_ns, |((at, _), _)| *at)
            .min(self.deadline_ns);
        if !queue.deferred.is_empty() {
            let allowed = self.pacer.as_ref().map_or(Ok(()), |pacer| {
                pacer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .try_acquire(now_ns)
            });
            match allowed {
                Ok(()) => {
                    if let Some(pending) = queue.deferred.pop_front() {
                        queue.in_flight += 1;
                        return Next::Send(Box::new(pending));
                    }
                }
                Err(wait) => until = until.min(now_ns.saturating_add(as_ns(wait))),
            }
        }
        if queue.retries.is_empty()
            && queue.deferred.is_empty()
            && queue.fresh_done
            && queue.in_flight == 0
        {
            return Next::Stop;
        }
        Next::Wait(until)
    }

    /// Send held-back events as they become due, at most `concurrency` at a time, until the
    /// phase's senders are done and nothing is held, or the deadline. Ack latencies (from the
    /// intended send time) go into `acks` by class.
    pub async fn dispatch(
        self: Arc<Self>,
        run: Arc<Run>,
        driver: Arc<Driver>,
        acks: Arc<Mutex<[Histogram<u64>; 4]>>,
        concurrency: usize,
    ) {
        let permits = Arc::new(Semaphore::new(concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            while tasks.try_join_next().is_some() {}
            match self.next(run.now_ns()) {
                Next::Stop => break,
                Next::Wait(until) => {
                    let at = run.started + Duration::from_nanos(until);
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep_until(at.into()) => {}
                    }
                }
                Next::Send(pending) => {
                    let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                        break;
                    };
                    let (held, run, driver, acks) = (
                        Arc::clone(&self),
                        Arc::clone(&run),
                        Arc::clone(&driver),
                        Arc::clone(&acks),
                    );
                    tasks.spawn(async move {
                        held.send(&run, &driver, &acks, *pending).await;
                        held.settled();
                        drop(permit);
                    });
                }
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn send(
        &self,
        run: &Run,
        driver: &Driver,
        acks: &Mutex<[Histogram<u64>; 4]>,
        mut pending: Pending,
    ) {
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(1);
        run.mark_sent(pending.attempt.index, pending.attempt.intended_ns);
        driver
            .send(std::slice::from_ref(&pending.generated), &mut outcomes)
            .await;
        let outcome = outcomes
            .pop()
            .unwrap_or_else(|| Outcome::Failed("no answer".into()));
        let now = run.now_ns();
        let stored = outcome == (Outcome::Acked { duplicate: false });
        match settle(run, &pending.attempt, outcome, now) {
            Settled::Acked(latency) => {
                if stored && let Some(retries) = &self.client_retries {
                    retries.offer(pending.attempt.index, &pending.generated, now);
                }
                let mut acks = acks.lock().unwrap_or_else(|e| e.into_inner());
                record(&mut acks[pending.generated.class as usize], latency);
            }
            Settled::Failed => {}
            Settled::Refused(retry_after) => {
                pending.attempt.number += 1;
                self.retry_later(pending, retry_after, now);
            }
        }
    }
}

/// Histograms of ack latency per class, shared by a phase's senders and its dispatcher.
pub fn shared_acks() -> Arc<Mutex<[Histogram<u64>; 4]>> {
    Arc::new(Mutex::new(std::array::from_fn(|_| histogram(3))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        admission::{AdmissionSignal, BulkPacer, BulkState},
        mix::{Generator, tenant_names},
        scenario::Mix,
        tracker::DEFERRED,
    };

    const MS: u64 = 1_000_000;

    fn pending(run: &Run, index: u64) -> Pending {
        let mix = Mix::default();
        let generated = Generator::new(&mix, &tenant_names(&mix), run.run_tag, index).next(index);
        run.slots.generate(index, index * MS, generated.class, 0);
        Pending {
            generated,
            attempt: Attempt {
                index,
                intended_ns: index * MS,
                number: 1,
            },
        }
    }

    #[test]
    fn retries_are_bounded_by_attempts_and_the_deadline() {
        let held = HeldBack::new(1_000 * MS, 3, None);
        let run = Run::new(1, 10);
        let mut p = pending(&run, 0);
        p.attempt.number = 2;
        let second = Duration::from_millis(100);
        assert_eq!(held.retry_at(&p.attempt, second, 0), Some(100 * MS));
        p.attempt.number = 4;
        assert_eq!(
            held.retry_at(&p.attempt, second, 0),
            None,
            "the third was the last"
        );
        p.attempt.number = 3;
        assert_eq!(held.retry_at(&p.attempt, second, 899 * MS), Some(999 * MS));
        assert_eq!(
            held.retry_at(&p.attempt, second, 900 * MS),
            None,
            "past the phase"
        );
        assert!(!held.retry_later(p.clone(), second, 950 * MS));
        assert!(held.retry_later(p, second, 0));
        assert!(matches!(held.next(50 * MS), Next::Wait(at) if at == 100 * MS));
        assert!(matches!(held.next(100 * MS), Next::Send(_)));
        // Taken, not answered yet: the dispatcher waits for it even after the senders are done.
        held.fresh_done();
        assert!(matches!(held.next(101 * MS), Next::Wait(at) if at == 1_000 * MS));
        held.settled();
        assert!(matches!(held.next(102 * MS), Next::Stop));
    }

    #[test]
    fn retries_leave_in_due_order_and_the_deadline_drops_the_rest() {
        let held = HeldBack::new(1_000 * MS, 5, None);
        let run = Run::new(1, 10);
        for (index, after_ms) in [(0, 300), (1, 100), (2, 200), (3, 800)] {
            assert!(held.retry_later(pending(&run, index), Duration::from_millis(after_ms), 0));
        }
        let mut order = Vec::new();
        while let Next::Send(p) = held.next(500 * MS) {
            order.push(p.attempt.index);
            held.settled();
        }
        assert_eq!(order, [1, 2, 0]);
        assert!(
            matches!(held.next(1_000 * MS), Next::Stop),
            "event 3 stays shed"
        );
        assert!(matches!(held.next(1_000 * MS), Next::Stop));
    }

    #[test]
    fn deferred_bulk_leaves_in_order_at_the_allowed_rate() {
        let pacer: SharedPacer = Arc::new(Mutex::new(BulkPacer::new()));
        pacer.lock().expect("pacer").on_signal(
            &AdmissionSignal {
                at_ms: 0,
                bulk: BulkState::Limited,
                bulk_rate: 10.0,
                retry_after_ms: 100,
                reason: crate::admission::LimitReason::PipelineDelay,
            },
            0,
        );
        let held = HeldBack::new(2_000 * MS, 3, Some(Arc::clone(&pacer)));
        let run = Run::new(1, 10);
        // The bucket starts with one token: the first goes, the next four are deferred.
        assert!(held.admit(&run, pending(&run, 0), 0).is_some());
        for index in 1..5 {
            assert!(held.admit(&run, pending(&run, index), 0).is_none());
            assert_ne!(run.slots.view(index).expect("slot").flags & DEFERRED, 0);
        }
        // 10/s: one every 100 ms, oldest first; a fresh event cannot jump the queue.
        let mut sent = Vec::new();
        for ms in (0..=400).step_by(10) {
            if let Next::Send(p) = held.next(ms * MS) {
                sent.push((ms, p.attempt.index));
                held.settled();
            }
            if ms == 150 {
                assert!(held.admit(&run, pending(&run, 5), ms * MS).is_none());
            }
        }
        assert_eq!(sent, [(100, 1), (200, 2), (300, 3), (400, 4)]);
        assert_eq!(run.deferrals.load(std::sync::atomic::Ordering::Relaxed), 5);
        // Past the deadline a deferred event is not queued.
        assert!(held.admit(&run, pending(&run, 6), 2_000 * MS).is_none());
        assert!(matches!(held.next(2_000 * MS), Next::Stop));
    }
}
