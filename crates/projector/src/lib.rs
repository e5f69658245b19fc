//! The profile projector: a worker over the three lanes that applies each batch of events to the
//! store in one transaction (field-level last-writer-wins, idempotency ledger) and acks after
//! commit. A store outage is waited out (the batch held, nothing dead-lettered); an event the
//! store refuses is isolated from its batch and dead-lettered alone. It announces changed
//! customers so routers drop their cached context.

use bus::{
    Bus, CancellationToken, Handler, Outcome, WaitPolicy, WorkerConfig, jetstream, run_worker,
};
use events::{DlqStage, Event, Lane};
use std::sync::Arc;
use store::{FailureClass, Store, StoreError};

/// The durable consumer name on each lane.
pub const DURABLE: &str = "projector";

/// Projector settings (`[projector]` in crm.toml).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectorConfig {
    /// Events per store transaction.
    pub max_batch: usize,
    /// Batches in flight (SQLite has one writer; PostgreSQL can use more).
    pub concurrency: usize,
    /// Share of picks that go to the lowest lane with work, so it never starves.
    pub lower_lane_share: f64,
    /// Deliveries before a failing event is dead-lettered.
    pub max_deliveries: i64,
    /// The critical lane by a worker of its own (small transactions, own connection); `false`
    /// reads all three lanes with one worker, critical batches topped up with bulk events.
    pub critical_worker: bool,
    /// Critical batches in flight. On SQLite they still commit one at a time, but a critical
    /// event that arrives while another critical batch waits for the writer then waits at the
    /// writer beside it (priority transactions first), not behind it for a whole turn.
    pub critical_concurrency: usize,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            max_batch: 256,
            concurrency: 1,
            lower_lane_share: 0.05,
            max_deliveries: 10,
            critical_worker: true,
            critical_concurrency: 4,
        }
    }
}

/// The batch handler.
#[derive(Debug)]
pub struct Projector {
    store: Store,
    bus: Bus,
}

impl Projector {
    pub fn new(store: Store, bus: Bus) -> Self {
        Self { store, bus }
    }
}

impl Handler for Projector {
    async fn handle(&self, source: &'static str, batch: &[jetstream::Message]) -> Vec<Outcome> {
        // Each event's span (child of its lane message's trace) lasts until its batch commits.
        let _spans = bus::trace::batch_spans("project", source, batch);
        let mut outcomes = vec![Outcome::Done; batch.len()];
        let mut events: Vec<Event> = Vec::with_capacity(batch.len());
        let mut positions = Vec::with_capacity(batch.len());
        for (index, message) in batch.iter().enumerate() {
            match bus::decode_lane(message) {
                Ok((event, _)) => {
                    events.push(event);
                    positions.push(index);
                }
                Err((reason, err)) => outcomes[index] = Outcome::poison(reason, err),
            }
        }
        if events.is_empty() {
            return outcomes;
        }
        // One transaction for the batch; when the store refuses it because of one event, the
        // batch is split until that event is alone and dead-lettered, and the rest commit.
        let settled = bus::isolate(
            &events,
            |chunk| self.store.apply_batch(chunk),
            |err: &StoreError| err.class() == FailureClass::Rejected,
        )
        .await;
        for (range, result) in settled {
            let outcome = match result {
                Ok(result) => {
                    // The runtime records end-to-end latency when it acks.
                    let duplicates = result
                        .outcomes
                        .iter()
                        .filter(|o| **o == store::Applied::Duplicate)
                        .count();
                    metrics::counter!("crm_projector_duplicates_total")
                        .increment(duplicates as u64);
                    self.announce(&result.context_changed).await;
                    Outcome::Done
                }
                Err(err) => store_failure(&err, range.len()),
            };
            for &index in &positions[range] {
                outcomes[index] = outcome.clone();
            }
        }
        outcomes
    }
}

/// What a store failure means for the events it covers: wait while the store is unavailable
/// (never dead-lettered), retry a transient conflict, dead-letter the one event the store refuses.
fn store_failure(err: &StoreError, events: usize) -> Outcome {
    match err.class() {
        FailureClass::Unavailable => Outcome::wait(err),
        FailureClass::Transient => {
            tracing::warn!(error = %err, events, "store conflict; retrying");
            Outcome::retry(err)
        }
        FailureClass::Rejected => Outcome::poison("store_rejected", err),
    }
}

impl Projector {
    /// Tell routers which customers' context (tier, lifetime value) changed. Best effort: their
    /// cache also expires by TTL.
    async fn announce(&self, customers: &[(String, String)]) {
        for (tenant, customer) in customers {
            let payload = format!("{tenant}\n{customer}");
            let _ = self
                .bus
                .client()
                .publish(events::CUSTOMER_CHANGED_SUBJECT, payload.into())
                .await;
        }
    }
}

/// Largest batch of the critical lane's worker: a critical event never waits for a big
/// transaction of its own.
const CRITICAL_MAX_BATCH: usize = 32;

/// Run the projector until `shutdown`: the critical lane by a worker of its own, on its own NATS
/// connection, in small transactions that carry no bulk event; the high and standard lanes by the
/// main worker (high first, standard topping its batches up). A critical event so waits at most
/// for the one bulk transaction the store is writing (its transaction goes first in the SQLite
/// writer's queue), never inside a bulk batch. Both workers run on the current runtime;
/// [`run_placed`] puts the critical one on a runtime of its own.
pub async fn run(
    bus: Bus,
    store: Store,
    config: ProjectorConfig,
    shutdown: CancellationToken,
) -> Result<(), bus::BusError> {
    let here = tokio::runtime::Handle::current();
    run_placed(bus, store, config, &here, shutdown).await
}

/// [`run`], with the critical lane's worker and its connection on `priority` (threads the bulk
/// worker's tasks never occupy).
pub async fn run_placed(
    bus: Bus,
    store: Store,
    config: ProjectorConfig,
    priority: &tokio::runtime::Handle,
    shutdown: CancellationToken,
) -> Result<(), bus::BusError> {
    let mut worker = WorkerConfig::new("projector", DURABLE, DlqStage::Projector);
    // The store is what every event needs: while it is down, hold the batch and take no more.
    worker.wait_policy = WaitPolicy::Hold;
    worker.max_batch = config.max_batch;
    worker.concurrency = config.concurrency;
    worker.lower_lane_share = config.lower_lane_share;
    worker.max_deliveries = config.max_deliveries;
    let handler = Arc::new(Projector::new(store, bus.clone()));
    if !config.critical_worker {
        // Priority events share a transaction with bulk ones rather than paying for one each.
        worker.top_up = true;
        return run_worker(bus, worker, handler, shutdown).await;
    }
    let mut critical = worker.clone().lanes(&[Lane::Critical]);
    critical.max_batch = config.max_batch.min(CRITICAL_MAX_BATCH);
    critical.concurrency = config.critical_concurrency.max(1);
    // The latency path commits what has arrived; only bulk waits to fill its batches.
    critical.fill_linger = std::time::Duration::ZERO;
    let mut bulk = worker.lanes(&[Lane::High, Lane::Standard]);
    // High events share a transaction with standard ones rather than paying for one each.
    bulk.top_up = true;
    // On SQLite (one writer) a critical transaction takes the writer before any queued bulk or
    // analytics one: it waits at most for the transaction being written.
    let critical_store = handler
        .store
        .with_write_priority(store::WritePriority::Priority);
    // One worker failing stops the other: the projector must not go on half alive unnoticed.
    let stop = shutdown.child_token();
    let watched = |result: Result<(), bus::BusError>| {
        if result.is_err() {
            stop.cancel();
        }
        result
    };
    let critical_work = {
        let (bus, stop) = (bus.clone(), stop.clone());
        async move {
            // Connected there, so that the connection's I/O task runs on `priority`.
            let critical_bus = bus.connect_another("critical").await?;
            let handler = Arc::new(Projector::new(critical_store, critical_bus.clone()));
            run_worker(critical_bus, critical, handler, stop).await
        }
    };
    let (critical, bulk) = tokio::join!(
        async {
            watched(bus::run_on(priority, "the projector's critical worker", critical_work).await)
        },
        async { watched(run_worker(bus, bulk, handler.clone(), stop.clone()).await) },
    );
    critical?;
    bulk
}
