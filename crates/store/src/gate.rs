//! The SQLite writer's queue, in priority order.
//!
//! SQLite has one writer, so every write transaction (the projector's critical and bulk
//! workers, both analytics workers) queues for the one write connection. The pool's own queue is
//! first come, first served: a critical batch would wait behind every bulk and analytics
//! transaction already queued. The gate lets a priority transaction go next, so it waits at
//! most for the one transaction that holds the writer. PostgreSQL has no such gate: its writers
//! run side by side.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};
use tokio::sync::oneshot;

/// Whose write transaction this is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WritePriority {
    /// Goes ahead of every queued [`WritePriority::Bulk`] transaction.
    Priority,
    #[default]
    Bulk,
}

#[derive(Debug, Default)]
struct Queue {
    held: bool,
    priority: VecDeque<oneshot::Sender<Pass>>,
    bulk: VecDeque<oneshot::Sender<Pass>>,
    /// When a priority transaction last asked for the writer.
    last_priority: Option<std::time::Instant>,
}

/// How long after a priority transaction the priority path counts as active (see
/// [`Pass::priority_active`]).
const PRIORITY_ACTIVE_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// One writer at a time; priority waiters first, each class in arrival order.
#[derive(Debug, Default)]
pub(crate) struct WriteGate {
    queue: Mutex<Queue>,
}

/// The right to write, held for one transaction; dropping it hands it to the next waiter.
#[derive(Debug)]
pub(crate) struct Pass {
    /// `None` only in a pass that was never handed over (its waiter had left).
    gate: Option<Arc<WriteGate>>,
}

impl WriteGate {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait for the writer. Cancel-safe: a waiter dropped before its turn leaves the queue
    /// (its sender fails), and one dropped with the pass in hand hands it on.
    pub(crate) async fn enter(self: &Arc<Self>, priority: WritePriority) -> Pass {
        self.wait(priority, false).await
    }

    /// [`WriteGate::enter`] for a bulk transaction that gave the writer up to a priority one
    /// part-way through its batch: it goes first among the bulk waiters, so steady priority
    /// traffic cannot send it to the back of the queue again and again.
    pub(crate) async fn resume(self: &Arc<Self>) -> Pass {
        self.wait(WritePriority::Bulk, true).await
    }

    async fn wait(self: &Arc<Self>, priority: WritePriority, first: bool) -> Pass {
        let receiver = {
            let mut queue = self.queue();
            if priority == WritePriority::Priority {
                queue.last_priority = Some(std::time::Instant::now());
            }
            if !queue.held {
                queue.held = true;
                return Pass {
                    gate: Some(self.clone()),
                };
            }
            let (sender, receiver) = oneshot::channel();
            match priority {
                WritePriority::Priority => queue.priority.push_back(sender),
                WritePriority::Bulk if first => queue.bulk.push_front(sender),
                WritePriority::Bulk => queue.bulk.push_back(sender),
            }
            receiver
        };
        match receiver.await {
            Ok(pass) => pass,
            // Senders are only dropped after a send: unreachable, but never hang on it.
            Err(_) => Box::pin(self.wait(priority, first)).await,
        }
    }

    /// How many transactions wait (for tests).
    #[cfg(test)]
    fn waiting(&self) -> usize {
        let queue = self.queue();
        queue.priority.len() + queue.bulk.len()
    }
}

impl Pass {
    /// Whether a priority transaction asked for the writer within the last second: while it
    /// has, bulk batches are written in segments they can yield between (which costs them
    /// statements); while it has not, in one piece.
    pub(crate) fn priority_active(&self) -> bool {
        self.gate.as_ref().is_some_and(|gate| {
            gate.queue()
                .last_priority
                .is_some_and(|at| at.elapsed() < PRIORITY_ACTIVE_FOR)
        })
    }

    /// Whether a priority transaction waits for the writer: a bulk holder yields to it at its
    /// next segment boundary.
    pub(crate) fn priority_waits(&self) -> bool {
        self.gate.as_ref().is_some_and(|gate| {
            let mut queue = gate.queue();
            // Waiters that left (their future was dropped) wait for nothing.
            queue.priority.retain(|waiter| !waiter.is_closed());
            !queue.priority.is_empty()
        })
    }

    /// Give the writer up and wait for it again, first among the bulk waiters (a priority
    /// transaction that waits goes in between).
    pub(crate) async fn yield_to_priority(self) -> Self {
        let gate = self.gate.clone();
        drop(self);
        match gate {
            Some(gate) => gate.resume().await,
            None => Pass { gate: None },
        }
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let Some(gate) = self.gate.take() else {
            return;
        };
        let mut queue = gate.queue();
        loop {
            let Some(next) = queue
                .priority
                .pop_front()
                .or_else(|| queue.bulk.pop_front())
            else {
                queue.held = false;
                return;
            };
            match next.send(Pass {
                gate: Some(gate.clone()),
            }) {
                Ok(()) => return,
                // That waiter is gone: empty the pass made for it (its drop would re-enter this
                // lock) and try the next one.
                Err(mut pass) => drop(pass.gate.take()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    type Order = Arc<Mutex<Vec<&'static str>>>;

    /// Queue one waiter per entry at the held `gate`, in this order; each records its name in
    /// the returned order when it gets the writer.
    async fn queue(
        gate: &Arc<WriteGate>,
        waiters: &[(&'static str, WritePriority)],
    ) -> (Order, Vec<tokio::task::JoinHandle<()>>) {
        let order: Order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for &(name, priority) in waiters {
            let (waiter, order) = (gate.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _pass = waiter.enter(priority).await;
                order.lock().expect("order").push(name);
            }));
            while gate.waiting() < tasks.len() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        (order, tasks)
    }

    #[tokio::test]
    async fn a_priority_waiter_goes_before_bulk_waiters_that_came_first() {
        let gate = Arc::new(WriteGate::default());
        let held = gate.enter(WritePriority::Bulk).await;
        let (order, tasks) = queue(
            &gate,
            &[
                ("bulk-1", WritePriority::Bulk),
                ("bulk-2", WritePriority::Bulk),
                ("critical", WritePriority::Priority),
            ],
        )
        .await;
        drop(held);
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(
            *order.lock().expect("order"),
            ["critical", "bulk-1", "bulk-2"]
        );
        // Free again: the next one enters at once.
        let _again = tokio::time::timeout(Duration::from_secs(1), gate.enter(WritePriority::Bulk))
            .await
            .expect("the gate was released");
    }

    #[tokio::test]
    async fn a_yielding_bulk_holder_goes_after_the_priority_waiter_and_before_other_bulk() {
        let gate = Arc::new(WriteGate::default());
        let held = gate.enter(WritePriority::Bulk).await;
        let (order, tasks) = queue(
            &gate,
            &[
                ("bulk-queued", WritePriority::Bulk),
                ("critical", WritePriority::Priority),
            ],
        )
        .await;
        assert!(held.priority_waits());
        let resumed = held.yield_to_priority().await;
        order.lock().expect("order").push("resumed");
        assert!(!resumed.priority_waits());
        drop(resumed);
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(
            *order.lock().expect("order"),
            ["critical", "resumed", "bulk-queued"]
        );
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_does_not_keep_the_writer() {
        let gate = Arc::new(WriteGate::default());
        let held = gate.enter(WritePriority::Bulk).await;
        let gone = tokio::time::timeout(
            Duration::from_millis(10),
            gate.enter(WritePriority::Priority),
        )
        .await;
        assert!(gone.is_err(), "the writer was held");
        assert!(
            !held.priority_waits(),
            "a waiter that left does not make bulk yield"
        );
        drop(held);
        let _next = tokio::time::timeout(Duration::from_secs(1), gate.enter(WritePriority::Bulk))
            .await
            .expect("handed past the waiter that left");
    }
}
