//! The webhook notifier: a worker over the three lanes that POSTs each event, as proto3 JSON and
//! signed with HMAC-SHA256, to every subscription that matches its tenant, type and lane; retries
//! through JetStream nak delays (so retries survive a restart), dead-letters refusals, and keeps
//! one slow or dead endpoint from holding up any other (a concurrency limit and a circuit breaker
//! per endpoint).
//!
//! Delivery is at least once. An endpoint that accepted an event is remembered (in memory, for
//! longer than an event can keep being redelivered) so that another endpoint's failure does not
//! send it again; a restart forgets, so receivers must deduplicate on `Idempotency-Key`.

mod breaker;
mod config;
mod delivery;
mod internal_events;
mod retry;
mod signature;

pub use breaker::{BreakerState, CircuitBreaker, Permit, Transition};
pub use config::{
    ConfigError, DEFAULT_MAX_DELIVERIES, MAX_MAX_DELIVERIES, NotifierConfig, Subscription,
    WebhookConfig,
};
pub use delivery::{BODY_EXCERPT_BYTES, Notifier, REJECTED_REASON, excerpt};
pub use internal_events::{BREAKER_OPEN, DELIVERIES_TOTAL, DELIVERY_DURATION_SECONDS};
pub use retry::{StatusClass, classify, parse_retry_after, retry_delay};
pub use signature::{SignatureError, sign, sign_with_all, verify};

use bus::{Bus, BusError, BusErrorKind, CancellationToken, WorkerConfig, run_worker};
use events::{DlqStage, Lane};
use std::sync::Arc;

/// The durable consumer name on each lane.
pub const DURABLE: &str = "notifier";

/// The headers of every webhook request.
pub mod header {
    /// The event id.
    pub const EVENT_ID: &str = "Crm-Event-Id";
    /// The event type name (`deal_won`, …).
    pub const EVENT_TYPE: &str = "Crm-Event-Type";
    /// The event id again: deduplicate on it, delivery is at least once.
    pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
    /// The JetStream delivery count of the event (1 on the first try).
    pub const DELIVERY_ATTEMPT: &str = "Crm-Delivery-Attempt";
    /// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`; see [`crate::verify`].
    pub const SIGNATURE: &str = "Crm-Signature";
    /// W3C trace context, passed through when the event carried one.
    pub const TRACEPARENT: &str = bus::headers::TRACEPARENT;
}

/// Refuse to start when the runtime would dead-letter later than the server stops redelivering.
async fn check_consumers(bus: &Bus, max_deliveries: i64) -> Result<(), BusError> {
    for lane in Lane::ALL {
        let max_deliver = bus
            .consumer_info(lane.stream(), DURABLE)
            .await?
            .config
            .max_deliver;
        if max_deliver > 0 && max_deliveries > max_deliver {
            return Err(BusError::new(
                BusErrorKind::Definition,
                format!(
                    "notifier.max_deliveries = {max_deliveries} exceeds max_deliver = {max_deliver} \
                     of consumer {}/{DURABLE}",
                    lane.stream()
                ),
            ));
        }
    }
    Ok(())
}

/// Run the notifier until `shutdown`. A config that does not validate is refused with the field
/// path at fault (as a [`BusErrorKind::Definition`] error); check it earlier with
/// [`NotifierConfig::validate`].
pub async fn run(
    bus: Bus,
    config: NotifierConfig,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let notifier = Notifier::try_new(&config)
        .map_err(|err| BusError::new(BusErrorKind::Definition, err.to_string()))?;
    check_consumers(&bus, config.max_deliveries).await?;
    let mut worker = WorkerConfig::new("notifier", DURABLE, DlqStage::Notifier);
    // One event per handler call, many at once: a slow endpoint then holds at most its own
    // `endpoint_concurrency` slots, never an event bound for someone else.
    worker.max_batch = 1;
    // …but pulled many at a time, so one round trip to the server feeds many slots.
    worker.pull_batch = config.concurrency.max(1) * 4;
    if config.webhooks.is_empty() {
        // Nothing to deliver: every event is acked at once, so take them in large batches.
        tracing::info!("notifier: no webhook subscriptions; acking lane events as they come");
        worker.max_batch = 256;
    }
    worker.concurrency = config.concurrency;
    worker.lower_lane_share = config.lower_lane_share;
    worker.max_deliveries = config.max_deliveries;
    worker.backoff_base = config.backoff_base;
    worker.backoff_max = config.backoff_max;
    run_worker(bus, worker, Arc::new(notifier), shutdown).await
}
