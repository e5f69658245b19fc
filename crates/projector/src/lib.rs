//! The profile projector: a worker over the three lanes that applies each batch of events to the
//! store in one transaction (field-level last-writer-wins, idempotency ledger) and acks after
//! commit. It announces changed customers so routers drop their cached context.

use bus::{Bus, CancellationToken, Handler, Outcome, WorkerConfig, jetstream, run_worker};
use events::{DlqStage, Encoding, Event, Lane};
use std::sync::Arc;
use store::Store;

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
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            max_batch: 256,
            concurrency: 1,
            lower_lane_share: 0.05,
            max_deliveries: 10,
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
    async fn handle(&self, _lane: Lane, batch: &[jetstream::Message]) -> Vec<Outcome> {
        let mut outcomes = vec![Outcome::Done; batch.len()];
        let mut events: Vec<Event> = Vec::with_capacity(batch.len());
        let mut positions = Vec::with_capacity(batch.len());
        for (index, message) in batch.iter().enumerate() {
            match events::decode(&message.payload, Encoding::Protobuf) {
                Ok(event) => {
                    events.push(event);
                    positions.push(index);
                }
                Err(err) => outcomes[index] = Outcome::poison("invalid_event", err),
            }
        }
        if events.is_empty() {
            return outcomes;
        }
        match self.store.apply_batch(&events).await {
            Ok(result) => {
                // The runtime records end-to-end latency when it acks.
                let duplicates = result
                    .outcomes
                    .iter()
                    .filter(|o| **o == store::Applied::Duplicate)
                    .count();
                metrics::counter!("crm_projector_duplicates_total").increment(duplicates as u64);
                for (tenant, customer) in &result.context_changed {
                    let payload = format!("{tenant}\n{customer}");
                    // Best effort: the router's cache also expires by TTL.
                    let _ = self
                        .bus
                        .client()
                        .publish(events::CUSTOMER_CHANGED_SUBJECT, payload.into())
                        .await;
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, batch = events.len(), "store write failed; retrying the batch");
                for index in positions {
                    outcomes[index] = Outcome::retry(&err);
                }
            }
        }
        outcomes
    }
}

/// Run the projector until `shutdown`.
pub async fn run(
    bus: Bus,
    store: Store,
    config: ProjectorConfig,
    shutdown: CancellationToken,
) -> Result<(), bus::BusError> {
    let mut worker = WorkerConfig::new("projector", DURABLE, DlqStage::Projector);
    worker.max_batch = config.max_batch;
    // Priority events share a transaction with bulk ones rather than paying for one each.
    worker.top_up = true;
    worker.concurrency = config.concurrency;
    worker.lower_lane_share = config.lower_lane_share;
    worker.max_deliveries = config.max_deliveries;
    let handler = Arc::new(Projector::new(store, bus.clone()));
    run_worker(bus, worker, handler, shutdown).await
}
