//! The SQLite writer's queue, in priority order.
//!
//! SQLite has one writer, so every write transaction (the projector's critical and bulk
//! workers, both analytics workers, the ledger pruner) queues for the one write connection. A
//! pool's queue is first come, first served: a critical batch would wait behind every bulk and
//! analytics transaction already queued. The gate lets a priority transaction go next, so it
//! waits at most for the one transaction that holds the writer. PostgreSQL has no such gate: its
//! writers run side by side.
//!
//! The gate owns the write connection and hands it over with the [`Pass`]: the holder's drop
//! gives it to the next waiter on the spot. Through a connection pool, a returned connection is
//! first checked by a task spawned on the returning runtime (a ping to SQLite's thread), so a
//! critical transaction waited for the bulk runtime, whose threads run at a lower OS priority
//! and, under load, may not be scheduled for a while.

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

#[derive(Debug)]
struct Queue<C> {
    /// The connection while nobody holds the writer (`None`: a [`Pass`] holds it).
    idle: Option<C>,
    priority: VecDeque<oneshot::Sender<Pass<C>>>,
    bulk: VecDeque<oneshot::Sender<Pass<C>>>,
    /// When a priority transaction last asked for the writer.
    last_priority: Option<std::time::Instant>,
}

/// How long after a priority transaction the priority path counts as active (see
/// [`Watch::priority_active`]).
const PRIORITY_ACTIVE_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// One writer at a time, owning the write connection `C`; priority waiters first, each class in
/// arrival order.
#[derive(Debug)]
pub(crate) struct WriteGate<C> {
    queue: Mutex<Queue<C>>,
}

/// The right to write and the connection to write with, held for one transaction (or a run of
/// them); dropping it hands both to the next waiter.
#[derive(Debug)]
pub(crate) struct Pass<C> {
    /// `None` only in a pass that was never handed over (its waiter had left).
    gate: Option<Arc<WriteGate<C>>>,
    /// `None` only in a pass that was never handed over.
    connection: Option<C>,
}

impl<C> WriteGate<C> {
    /// A gate around the one write connection.
    pub(crate) fn new(connection: C) -> Self {
        Self {
            queue: Mutex::new(Queue {
                idle: Some(connection),
                priority: VecDeque::new(),
                bulk: VecDeque::new(),
                last_priority: None,
            }),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue<C>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait for the writer. Cancel-safe: a waiter dropped before its turn leaves the queue
    /// (its sender fails), and one dropped with the pass in hand hands it on.
    pub(crate) async fn enter(self: &Arc<Self>, priority: WritePriority) -> Pass<C> {
        self.wait(priority, false).await
    }

    /// [`WriteGate::enter`] for a bulk transaction that gave the writer up to a priority one
    /// part-way through its batch: it goes first among the bulk waiters, so steady priority
    /// traffic cannot send it to the back of the queue again and again.
    pub(crate) async fn resume(self: &Arc<Self>) -> Pass<C> {
        self.wait(WritePriority::Bulk, true).await
    }

    async fn wait(self: &Arc<Self>, priority: WritePriority, first: bool) -> Pass<C> {
        let receiver = {
            let mut queue = self.queue();
            if priority == WritePriority::Priority {
                queue.last_priority = Some(std::time::Instant::now());
            }
            if let Some(connection) = queue.idle.take() {
                return Pass {
                    gate: Some(self.clone()),
                    connection: Some(connection),
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

/// Whether priority transactions want the writer, readable while the holder's transaction
/// borrows its connection.
#[derive(Debug)]
pub(crate) struct Watch<C>(Option<Arc<WriteGate<C>>>);

impl<C> Watch<C> {
    /// Whether a priority transaction asked for the writer within the last second: while it
    /// has, bulk batches are written in segments they can yield between (which costs them
    /// statements); while it has not, in one piece.
    pub(crate) fn priority_active(&self) -> bool {
        self.0.as_ref().is_some_and(|gate| {
            gate.queue()
                .last_priority
                .is_some_and(|at| at.elapsed() < PRIORITY_ACTIVE_FOR)
        })
    }

    /// Whether a priority transaction waits for the writer: a bulk holder yields to it at its
    /// next segment boundary.
    pub(crate) fn priority_waits(&self) -> bool {
        self.0.as_ref().is_some_and(|gate| {
            let mut queue = gate.queue();
            // Waiters that left (their future was dropped) wait for nothing.
            queue.priority.retain(|waiter| !waiter.is_closed());
            !queue.priority.is_empty()
        })
    }
}

/// A PostgreSQL write connection: writers run side by side, so nobody waits for it and it never
/// yields.
#[derive(Debug)]
pub(crate) struct Pooled(pub(crate) sqlx::pool::PoolConnection<sqlx::Postgres>);

impl Pooled {
    pub(crate) fn connection(&mut self) -> &mut sqlx::PgConnection {
        &mut self.0
    }

    pub(crate) fn watch(&self) -> Watch<sqlx::PgConnection> {
        Watch(None)
    }

    pub(crate) async fn yield_to_priority(self) -> Self {
        self
    }
}

impl<C> Pass<C> {
    /// What the holder checks between segments.
    pub(crate) fn watch(&self) -> Watch<C> {
        Watch(self.gate.clone())
    }

    /// The write connection.
    pub(crate) fn connection(&mut self) -> &mut C {
        self.connection
            .as_mut()
            .expect("a pass in hand holds the connection")
    }

    /// Give the writer up and wait for it again, first among the bulk waiters (a priority
    /// transaction that waits goes in between).
    pub(crate) async fn yield_to_priority(self) -> Self {
        let gate = self.gate.clone();
        drop(self);
        match gate {
            Some(gate) => gate.resume().await,
            None => Pass {
                gate: None,
                connection: None,
            },
        }
    }
}

impl<C> Drop for Pass<C> {
    fn drop(&mut self) {
        let Some(gate) = self.gate.take() else {
            return;
        };
        let mut connection = self.connection.take();
        let mut queue = gate.queue();
        loop {
            let Some(next) = queue
                .priority
                .pop_front()
                .or_else(|| queue.bulk.pop_front())
            else {
                queue.idle = connection;
                return;
            };
            match next.send(Pass {
                gate: Some(gate.clone()),
                connection,
            }) {
                Ok(()) => return,
                // That waiter is gone: empty the pass made for it (its drop would re-enter this
                // lock), keep the connection, and try the next one.
                Err(mut pass) => {
                    drop(pass.gate.take());
                    connection = pass.connection.take();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    type Order = Arc<Mutex<Vec<&'static str>>>;
    /// A gate whose "connection" counts how many holders used it.
    type Gate = Arc<WriteGate<u32>>;

    fn gate() -> Gate {
        Arc::new(WriteGate::new(0))
    }

    /// Queue one waiter per entry at the held `gate`, in this order; each records its name in
    /// the returned order when it gets the writer.
    async fn queue(
        gate: &Gate,
        waiters: &[(&'static str, WritePriority)],
    ) -> (Order, Vec<tokio::task::JoinHandle<()>>) {
        let order: Order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for &(name, priority) in waiters {
            let (waiter, order) = (gate.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let mut pass = waiter.enter(priority).await;
                *pass.connection() += 1;
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
        let gate = gate();
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
        let mut again =
            tokio::time::timeout(Duration::from_secs(1), gate.enter(WritePriority::Bulk))
                .await
                .expect("the gate was released");
        // The one connection went through every holder's hands and came back.
        assert_eq!(*again.connection(), 3);
    }

    #[tokio::test]
    async fn a_yielding_bulk_holder_goes_after_the_priority_waiter_and_before_other_bulk() {
        let gate = gate();
        let held = gate.enter(WritePriority::Bulk).await;
        let (order, tasks) = queue(
            &gate,
            &[
                ("bulk-queued", WritePriority::Bulk),
                ("critical", WritePriority::Priority),
            ],
        )
        .await;
        assert!(held.watch().priority_waits());
        let resumed = held.yield_to_priority().await;
        order.lock().expect("order").push("resumed");
        assert!(!resumed.watch().priority_waits());
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
        let gate = gate();
        let held = gate.enter(WritePriority::Bulk).await;
        let gone = tokio::time::timeout(
            Duration::from_millis(10),
            gate.enter(WritePriority::Priority),
        )
        .await;
        assert!(gone.is_err(), "the writer was held");
        assert!(
            !held.watch().priority_waits(),
            "a waiter that left does not make bulk yield"
        );
        drop(held);
        let mut next =
            tokio::time::timeout(Duration::from_secs(1), gate.enter(WritePriority::Bulk))
                .await
                .expect("handed past the waiter that left");
        // The connection was not lost with the waiter that left.
        assert_eq!(*next.connection(), 0);
    }
}
