//! The analytics role: a durable consumer on CRM_INGEST that counts every event into per-tenant
//! aggregates (events per type per minute, pipeline value by stage, won revenue, tickets by
//! severity, consent changes), paced by the adaptive throttler so that under load analytics is
//! deferred — left in the stream, never dropped — and drained when pressure falls.

mod internal_events;
mod signals;
mod throttler;

pub use signals::{HealthBoard, LaneHealth};

use bus::{
    Bus, BusError, BusErrorKind, CancellationToken, Handler, Outcome, Runtime, Source, WaitPolicy,
    WorkerConfig,
    jetstream::{self, consumer::pull},
};
use events::DlqStage;
use futures::StreamExt;
use std::time::Duration;
use store::{FailureClass, Store, StoreError};
use throttle::ThrottleConfig;
use tokio::time::Instant;

/// The analytics consumer on CRM_INGEST.
pub const DURABLE: &str = "analytics";
pub(crate) const INGEST_STREAM: &str = "CRM_INGEST";
/// The label analytics uses where workers use a lane name (metrics, health, notices).
pub const LANE_LABEL: &str = "analytics";
/// The source label of the priority ingest stream's events.
pub const PRIORITY_LABEL: &str = "analytics_priority";

/// Analytics settings (`[analytics]` in crm.toml; the controller's under `[analytics.throttle]`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnalyticsConfig {
    /// Most events fetched and counted per transaction.
    pub max_batch: usize,
    /// Deliveries before an event that keeps failing is dead-lettered.
    pub max_deliveries: i64,
    /// How long each server-side pause lasts; renewed every tick while the level is 0, so a
    /// pause outlives a crashed analytics process by at most this long.
    #[serde(with = "humantime_serde")]
    pub pause_for: Duration,
    /// Worker roles whose lane health (priority p99, throughput, backlogs) drives the throttle.
    pub health_roles: Vec<String>,
    /// Compare the ingest forecast with the workers' measured throughput while they are busy,
    /// rather than only with `throttle.capacity_per_sec`.
    pub measure_capacity: bool,
    /// How long the priority ingest stream's counter collects events after the first before it
    /// counts them in one transaction (never deferred, only gathered: critical and high-value
    /// events arrive a few at a time, and a transaction each made most of analytics' commits).
    #[serde(with = "humantime_serde")]
    pub priority_gather: Duration,
    /// The controller's parameters.
    pub throttle: ThrottleConfig,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        Self {
            max_batch: 500,
            max_deliveries: 10,
            pause_for: Duration::from_secs(10),
            health_roles: vec!["projector".into()],
            measure_capacity: true,
            priority_gather: Duration::from_millis(100),
            throttle: ThrottleConfig::default(),
        }
    }
}

/// Why the analytics role could not run.
#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
    #[error("analytics.{0}")]
    Config(#[from] throttle::ConfigError),
    #[error("analytics.{field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: &'static str,
    },
    #[error(transparent)]
    Bus(#[from] BusError),
}

impl AnalyticsConfig {
    /// Checks every setting; errors name the field.
    pub fn validate(&self) -> Result<(), AnalyticsError> {
        self.throttle.validate()?;
        if self.max_batch == 0 {
            return Err(AnalyticsError::Invalid {
                field: "max_batch",
                problem: "must be at least 1",
            });
        }
        if self.max_deliveries < 1 {
            return Err(AnalyticsError::Invalid {
                field: "max_deliveries",
                problem: "must be at least 1",
            });
        }
        if self.pause_for < self.throttle.tick {
            return Err(AnalyticsError::Invalid {
                field: "pause_for",
                problem: "must be at least throttle.tick, or the pause lapses between renewals",
            });
        }
        Ok(())
    }
}

/// Run the throttler and the paced analytics consumer until `shutdown`; the batch in hand is
/// finished and acked first.
pub async fn run(
    bus: Bus,
    store: Store,
    config: AnalyticsConfig,
    shutdown: CancellationToken,
) -> Result<(), AnalyticsError> {
    config.validate()?;
    let consumer: jetstream::consumer::Consumer<pull::Config> = bus
        .jetstream()
        .get_consumer_from_stream(DURABLE, INGEST_STREAM)
        .await
        .map_err(|err| {
            BusError::with_source(BusErrorKind::Unavailable, "analytics consumer", err)
        })?;
    let mut shared = throttler::start(bus.clone(), &config, shutdown.clone())?;
    let mut settling = WorkerConfig::with_sources(
        "analytics",
        vec![Source::new(INGEST_STREAM, DURABLE, LANE_LABEL)],
        DlqStage::Analytics,
    );
    settling.max_deliveries = config.max_deliveries;
    settling.wait_policy = WaitPolicy::Hold;
    // The priority ingest stream is counted as it comes, never deferred: its events are the
    // ones the throttler protects, and few.
    let mut priority_config = WorkerConfig::with_sources(
        "analytics",
        vec![Source::new(
            bus::PRIORITY_INGEST_STREAM,
            DURABLE,
            PRIORITY_LABEL,
        )],
        DlqStage::Analytics,
    );
    priority_config.max_deliveries = config.max_deliveries;
    priority_config.wait_policy = WaitPolicy::Hold;
    priority_config.max_batch = config.max_batch;
    priority_config.gather = config.priority_gather;
    let priority_stop = shutdown.child_token();
    let priority = tokio::spawn(bus::run_worker(
        bus.clone(),
        priority_config,
        std::sync::Arc::new(Counter {
            store: store.clone(),
        }),
        priority_stop.clone(),
    ));
    let counter = Counter { store };
    // One batch at a time: a batch that holds for the store blocks the next fetch by itself.
    let runtime = Runtime::new(bus.clone(), settling, shutdown.clone());
    tracing::info!("analytics started");
    loop {
        // Wait for the pacer to permit a batch: BATCH_SPAN's worth of the allowed rate (one
        // event at a time would make a transaction, and a turn at SQLite's one writer, of each),
        // forever while paused, until the next decision.
        let wait = {
            let mut pacer = shared.pacer.lock().unwrap_or_else(|e| e.into_inner());
            let want = (pacer.rate() * BATCH_SPAN.as_secs_f64()) as usize;
            pacer.wait_time_for(want.clamp(1, config.max_batch), Instant::now())
        };
        match wait {
            Some(wait) if wait.is_zero() => {}
            Some(wait) => {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                    _ = shared.decisions.changed() => {}
                }
                continue;
            }
            None => {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    changed = shared.decisions.changed() => if changed.is_err() { break },
                }
                continue;
            }
        }
        let permitted = shared
            .pacer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .available(Instant::now())
            .clamp(1, config.max_batch);
        let batch = tokio::select! {
            _ = shutdown.cancelled() => break,
            batch = fetch(&consumer, permitted) => batch,
        };
        if batch.is_empty() {
            continue;
        }
        shared
            .pacer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(batch.len(), Instant::now());
        let labels = vec![LANE_LABEL; batch.len()];
        runtime.process(&counter, LANE_LABEL, batch, labels).await;
    }
    priority_stop.cancel();
    match priority.await {
        Ok(result) => result?,
        Err(err) => tracing::error!(error = %err, "analytics priority worker panicked"),
    }
    tracing::info!("analytics stopped");
    Ok(())
}

/// How much of the allowed rate a paced batch gathers before it is fetched.
const BATCH_SPAN: Duration = Duration::from_millis(200);

/// Up to `n` messages: returns as soon as `n` are in, or after a short wait with what came (a
/// request that answered "nothing yet" at once would make an idle consumer spin).
async fn fetch(
    consumer: &jetstream::consumer::Consumer<pull::Config>,
    n: usize,
) -> Vec<jetstream::Message> {
    let messages = consumer
        .batch()
        .max_messages(n)
        .expires(Duration::from_millis(250))
        .messages()
        .await;
    match messages {
        Ok(messages) => {
            messages
                .filter_map(|message| async move {
                    message
                        .map_err(|err| tracing::debug!(error = %err, "analytics fetch hiccup"))
                        .ok()
                })
                .collect()
                .await
        }
        Err(err) => {
            tracing::debug!(error = %err, "analytics fetch failed");
            tokio::time::sleep(Duration::from_millis(200)).await;
            Vec::new()
        }
    }
}

/// Counts each batch in one transaction. Invalid input is acked without being counted: the
/// router dead-letters it (one dead letter per bad event, not two). A store outage is waited
/// out; an event the store refuses is isolated and dead-lettered alone.
struct Counter {
    store: Store,
}

impl Handler for Counter {
    async fn handle(&self, _source: &'static str, batch: &[jetstream::Message]) -> Vec<Outcome> {
        let mut outcomes = vec![Outcome::Done; batch.len()];
        let mut events = Vec::with_capacity(batch.len());
        let mut positions = Vec::with_capacity(batch.len());
        for (index, message) in batch.iter().enumerate() {
            match bus::decode_ingest(message) {
                Ok((event, _, _)) => {
                    events.push(event);
                    positions.push(index);
                }
                Err(_) => {
                    internal_events::skipped("invalid_event");
                }
            }
        }
        let settled = bus::isolate(
            &events,
            |chunk| self.store.apply_analytics(chunk),
            |err: &StoreError| err.class() == FailureClass::Rejected,
        )
        .await;
        for (range, result) in settled {
            let outcome = match result {
                Ok(applied) => {
                    let duplicates = applied
                        .iter()
                        .filter(|a| **a == store::Applied::Duplicate)
                        .count();
                    internal_events::duplicates(duplicates as u64);
                    Outcome::Done
                }
                Err(err) => match err.class() {
                    FailureClass::Unavailable => Outcome::wait(&err),
                    FailureClass::Transient => Outcome::retry(&err),
                    FailureClass::Rejected => Outcome::poison("store_rejected", &err),
                },
            };
            for &index in &positions[range] {
                outcomes[index] = outcome.clone();
            }
        }
        outcomes
    }
}
