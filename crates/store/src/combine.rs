//! Priority batches that wait for SQLite's writer together commit together.
//!
//! The projector's critical worker keeps several batches in flight, so that a critical event
//! that arrives while another waits for the writer waits beside it, not behind it. Written one
//! after the other, each of those batches paid a transaction of its own: its statements and a
//! commit (an fsync), while the bulk batch that gave way to them waited. The first batch to
//! ask leads: once the writer is its own, it takes every priority batch queued by then, its own
//! included, and applies them in one transaction; the others are told their part of the result.
//! If that transaction fails, each batch is applied again on its own, so that a batch the store
//! refuses (an event at fault) fails alone and the others' outcomes are theirs.

use crate::BatchResult;
use events::Event;
use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};
use tokio::sync::oneshot;

/// What a waiting batch is told.
#[derive(Debug)]
pub(crate) enum Reply {
    /// Applied with others: its part of the result.
    Done(BatchResult),
    /// The shared transaction failed (or its leader went away): apply the batch on its own.
    Alone,
}

#[derive(Debug)]
struct Job {
    id: u64,
    events: Vec<Event>,
    reply: oneshot::Sender<Reply>,
}

#[derive(Debug, Default)]
struct Queue {
    jobs: Vec<Job>,
    /// Whether a leader is waiting for the writer (it takes every job queued when it gets it).
    leading: bool,
    next_id: u64,
}

/// The queue of priority batches waiting for the writer (one per SQLite store, shared by its
/// handles).
#[derive(Debug, Default)]
pub(crate) struct Combiner {
    queue: Mutex<Queue>,
}

/// A batch's place: the leader applies what is queued; a follower waits to be told.
pub(crate) enum Role {
    Lead(Leader),
    Follow(oneshot::Receiver<Reply>),
}

/// The right (and the duty) to apply the queued batches. Dropped without
/// [`Leader::take`] (its caller went away while waiting for the writer), it tells every queued
/// batch to go on its own, so none waits for a leader that will not come.
pub(crate) struct Leader {
    combiner: Arc<Combiner>,
    id: u64,
    taken: bool,
}

/// The batches a leader took: `events` in queue order, each batch's range of them.
pub(crate) struct Taken {
    pub(crate) events: Vec<Event>,
    /// The leader's own batch's range.
    pub(crate) own: std::ops::Range<usize>,
    others: Vec<(std::ops::Range<usize>, oneshot::Sender<Reply>)>,
}

impl Combiner {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a priority batch.
    pub(crate) fn join(self: &Arc<Self>, events: &[Event]) -> Role {
        let (reply, answer) = oneshot::channel();
        let mut queue = self.queue();
        let id = queue.next_id;
        queue.next_id += 1;
        queue.jobs.push(Job {
            id,
            events: events.to_vec(),
            reply,
        });
        if std::mem::replace(&mut queue.leading, true) {
            Role::Follow(answer)
        } else {
            Role::Lead(Leader {
                combiner: self.clone(),
                id,
                taken: false,
            })
        }
    }
}

impl Leader {
    /// With the writer in hand: every batch queued so far, the leader's own among them. Batches
    /// queued from now on get a leader of their own.
    pub(crate) fn take(mut self) -> Taken {
        self.taken = true;
        let jobs = {
            let mut queue = self.combiner.queue();
            queue.leading = false;
            std::mem::take(&mut queue.jobs)
        };
        let mut taken = Taken {
            events: Vec::with_capacity(jobs.iter().map(|job| job.events.len()).sum()),
            own: 0..0,
            others: Vec::with_capacity(jobs.len().saturating_sub(1)),
        };
        for job in jobs {
            let range = taken.events.len()..taken.events.len() + job.events.len();
            taken.events.extend(job.events);
            if job.id == self.id {
                taken.own = range;
            } else {
                taken.others.push((range, job.reply));
            }
        }
        taken
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if self.taken {
            return;
        }
        let jobs = {
            let mut queue = self.combiner.queue();
            queue.leading = false;
            std::mem::take(&mut queue.jobs)
        };
        for job in jobs {
            let _ = job.reply.send(Reply::Alone);
        }
    }
}

impl Taken {
    /// How many batches share the transaction.
    pub(crate) fn batches(&self) -> usize {
        self.others.len() + 1
    }

    /// Tell every other batch its part of `result` (the result of applying `self.events`) and
    /// return the leader's own.
    pub(crate) fn settle(self, result: BatchResult) -> BatchResult {
        for (range, reply) in self.others {
            let _ = reply.send(Reply::Done(part(&result, &self.events, range)));
        }
        let mut own = part(&result, &self.events, self.own);
        // Counted once, with the leader's part.
        own.conflicts = result.conflicts;
        own
    }

    /// The shared transaction failed: every other batch goes on its own.
    pub(crate) fn alone(self) {
        for (_, reply) in self.others {
            let _ = reply.send(Reply::Alone);
        }
    }
}

/// The result of the events in `range` of a combined batch.
fn part(result: &BatchResult, events: &[Event], range: std::ops::Range<usize>) -> BatchResult {
    let customers: BTreeSet<(&str, &str)> = events[range.clone()]
        .iter()
        .map(|event| (event.tenant_id.as_str(), event.customer_id.as_str()))
        .collect();
    let touched = |list: &[(String, String)]| -> Vec<(String, String)> {
        list.iter()
            .filter(|(tenant, customer)| customers.contains(&(tenant.as_str(), customer.as_str())))
            .cloned()
            .collect()
    };
    BatchResult {
        outcomes: result.outcomes[range].to_vec(),
        changed_customers: touched(&result.changed_customers),
        context_changed: touched(&result.context_changed),
        conflicts: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Applied;

    fn event(customer: &str) -> Event {
        events::sample::event(events::EventType::ContactCreated, "acme", customer)
    }

    fn lead(role: Role) -> Leader {
        match role {
            Role::Lead(leader) => leader,
            Role::Follow(_) => panic!("expected to lead"),
        }
    }

    fn follow(role: Role) -> oneshot::Receiver<Reply> {
        match role {
            Role::Follow(answer) => answer,
            Role::Lead(_) => panic!("expected to follow"),
        }
    }

    #[test]
    fn batches_queued_behind_a_leader_follow_it_and_get_their_own_part() {
        let combiner = Arc::new(Combiner::default());
        let leader = lead(combiner.join(&[event("a")]));
        let mut b = follow(combiner.join(&[event("b"), event("b")]));
        let taken = leader.take();
        assert_eq!(taken.batches(), 2);
        assert_eq!(taken.own, 0..1);
        // Queued after the take: a leader of its own.
        let _next = lead(combiner.join(&[event("c")]));
        let result = BatchResult {
            outcomes: vec![Applied::Applied, Applied::Applied, Applied::Duplicate],
            changed_customers: vec![("acme".into(), "a".into()), ("acme".into(), "b".into())],
            context_changed: vec![("acme".into(), "b".into())],
            conflicts: 2,
        };
        let own = taken.settle(result);
        assert_eq!(own.outcomes, [Applied::Applied]);
        assert_eq!(own.changed_customers, [("acme".to_owned(), "a".to_owned())]);
        assert!(own.context_changed.is_empty());
        assert_eq!(own.conflicts, 2);
        match b.try_recv() {
            Ok(Reply::Done(part)) => {
                assert_eq!(part.outcomes, [Applied::Applied, Applied::Duplicate]);
                assert_eq!(
                    part.changed_customers,
                    [("acme".to_owned(), "b".to_owned())]
                );
                assert_eq!(part.context_changed, [("acme".to_owned(), "b".to_owned())]);
                assert_eq!(part.conflicts, 0);
            }
            other => panic!("expected its part, got {other:?}"),
        }
    }

    #[test]
    fn a_leader_that_goes_away_before_taking_sends_every_queued_batch_alone() {
        let combiner = Arc::new(Combiner::default());
        let leader = lead(combiner.join(&[event("a")]));
        let mut b = follow(combiner.join(&[event("b")]));
        drop(leader);
        assert!(matches!(b.try_recv(), Ok(Reply::Alone)));
        // Nobody leads any more: the next batch does.
        let _next = lead(combiner.join(&[event("c")]));
    }
}
