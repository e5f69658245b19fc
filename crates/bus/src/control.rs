//! The control plane: small core-NATS messages under `crm.control.>` that let roles in any number
//! of processes see each other (lane health for the throttler, its decisions for `crm status`,
//! processed notices for load testers), and the JetStream reads that go with them (consumer and
//! stream state, message times, consumer pause).
//!
//! Control messages are JSON, best effort and never stored: losing one costs a reading, not an
//! event. Their shapes are part of the contract for external tools, documented in the README.

use crate::{Bus, BusError};
use async_nats::jetstream::{self, consumer::pull};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use time::OffsetDateTime;

/// Each worker publishes its [`HealthReport`] on `crm.control.health.<role>` every second.
pub const HEALTH_SUBJECT_PREFIX: &str = "crm.control.health";
/// The throttler publishes every decision ([`ThrottleReport`]) here.
pub const THROTTLE_SUBJECT: &str = "crm.control.throttle";
/// Workers publish a [`ProcessedNotice`] per settled batch on `crm.control.processed.<role>`.
pub const PROCESSED_SUBJECT_PREFIX: &str = "crm.control.processed";

/// Call `each` with every control message on `subject` until `shutdown`. When the subscription
/// cannot be made (the server refuses it, the connection is gone), logs an error saying what the
/// caller does without it (`degraded`) and returns: control messages are best effort.
pub async fn follow<F, Fut>(
    bus: &Bus,
    subject: String,
    degraded: &str,
    shutdown: crate::CancellationToken,
    mut each: F,
) where
    F: FnMut(async_nats::Message) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use futures::StreamExt as _;
    let mut subscription = match bus.client().subscribe(subject.clone()).await {
        Ok(subscription) => subscription,
        Err(err) => {
            tracing::error!(error = %err, %subject, "cannot subscribe; {degraded}");
            return;
        }
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            message = subscription.next() => match message {
                Some(message) => each(message).await,
                None => return,
            },
        }
    }
}

/// One worker process's view of its lanes over the last reporting interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    /// The role (`projector`, `notifier`, …).
    pub role: String,
    /// A process-unique id, so reports of several processes of one role are told apart.
    pub instance: String,
    /// When the report was made, ms since the Unix epoch.
    pub at_ms: u64,
    /// The interval the figures cover, in ms.
    pub interval_ms: u64,
    pub lanes: Vec<LaneReport>,
}

impl HealthReport {
    /// `count` events over this report's interval, per second (an empty interval counts as 1 ms).
    pub fn per_second(&self, count: u64) -> f64 {
        count as f64 * 1000.0 / self.interval_ms.max(1) as f64
    }
}

/// One lane in a [`HealthReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaneReport {
    /// `critical`, `high`, `standard`, or `analytics` for the analytics role.
    pub lane: String,
    /// Messages processed successfully in the interval.
    pub processed: u64,
    /// End-to-end latency (entry into the platform → processed) over the interval, in ms;
    /// 0 when nothing was processed.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Messages waiting for this worker's consumer, as of the last message it received.
    pub pending: u64,
}

/// One throttler decision with the signals it was made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThrottleReport {
    pub at_ms: u64,
    /// The analytics instance that decided (the holder of the throttler's lease).
    #[serde(default)]
    pub instance: String,
    /// Permitted analytics rate, events per second (0 = paused).
    pub rate: f64,
    /// 0 = paused … `levels` = full rate.
    pub level: u8,
    pub levels: u8,
    /// Why (`healthy`, `latency_breach`, `backlog_growth`, `forecast_over_capacity`,
    /// `starvation_guard`, `hold`).
    pub reason: String,
    /// Measured ingest rate over the last tick and its forecast at the horizon, events/s.
    pub ingest_rate: f64,
    pub forecast: f64,
    /// The capacity the forecast was compared with, events/s.
    pub capacity: f64,
    /// Priority-lane (critical + high) p99 over the last tick, ms.
    pub priority_p99_ms: f64,
    /// Messages waiting in the priority lanes.
    pub priority_backlog: u64,
    /// Analytics messages deferred (still in CRM_INGEST for the analytics consumer).
    pub deferred: u64,
    /// Age of the oldest deferred message, seconds (0 when none).
    pub oldest_deferred_age_s: f64,
    /// Whether the analytics consumer is paused on the server.
    pub consumer_paused: bool,
}

/// Messages a worker settled as done in one batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessedNotice {
    pub role: String,
    pub lane: String,
    /// When the batch was settled, ns since the Unix epoch.
    pub at_ns: u64,
    /// The `Nats-Msg-Id` of each message (the event's idempotency key, else its event id).
    pub ids: Vec<String>,
}

/// Now as ms / ns since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    u64::try_from(unix_ns() / 1_000_000).unwrap_or(u64::MAX)
}

pub fn unix_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

/// A process-unique instance id for `role`.
pub fn instance_id(role: &str) -> String {
    format!(
        "{role}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

impl Bus {
    /// Publish a control message (JSON) on core NATS; best effort.
    pub async fn publish_control<T: Serialize>(
        &self,
        subject: String,
        message: &T,
    ) -> Result<(), BusError> {
        let payload = serde_json::to_vec(message).map_err(|err| {
            BusError::unavailable(format!("encoding a message for {subject}"), err)
        })?;
        self.client()
            .publish(subject.clone(), payload.into())
            .await
            .map_err(|err| BusError::unavailable(format!("publishing to {subject}"), err))
    }

    /// The durable consumer's state, fresh from the server.
    pub async fn consumer_info(
        &self,
        stream: &str,
        durable: &str,
    ) -> Result<jetstream::consumer::Info, BusError> {
        let consumer: jetstream::consumer::Consumer<pull::Config> = self
            .jetstream()
            .get_consumer_from_stream(durable, stream)
            .await
            .map_err(|err| BusError::unavailable(format!("consumer {stream}/{durable}"), err))?;
        // The lookup is a CONSUMER.INFO request: its answer is the fresh info.
        Ok(consumer.cached_info().clone())
    }

    /// The stream's state (messages, first and last sequence), fresh from the server.
    pub async fn stream_state(&self, stream: &str) -> Result<jetstream::stream::State, BusError> {
        // The lookup is a STREAM.INFO request: its answer is the fresh state.
        let handle = self
            .jetstream()
            .get_stream(stream)
            .await
            .map_err(|err| BusError::unavailable(format!("stream {stream}"), err))?;
        Ok(handle.cached_info().state.clone())
    }

    /// When the first message at or after `sequence` was stored, `None` when there is none.
    pub async fn message_time(
        &self,
        stream: &str,
        sequence: u64,
    ) -> Result<Option<OffsetDateTime>, BusError> {
        let handle = self
            .jetstream()
            .get_stream_no_info(stream)
            .await
            .map_err(|err| BusError::unavailable(format!("stream {stream}"), err))?;
        match handle
            .direct_get_next_for_subject(">", Some(sequence.max(1)))
            .await
        {
            Ok(message) => Ok(Some(message.time)),
            Err(err) if err.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(err) => Err(BusError::unavailable(
                format!("reading {stream} at sequence {sequence}"),
                err,
            )),
        }
    }

    /// Pause the durable consumer on the server until `now + for_`; it resumes by itself then,
    /// so a paused consumer outlives no crashed pauser by more than `for_`.
    pub async fn pause_consumer(
        &self,
        stream: &str,
        durable: &str,
        for_: Duration,
    ) -> Result<(), BusError> {
        let handle = self
            .jetstream()
            .get_stream_no_info(stream)
            .await
            .map_err(|err| BusError::unavailable(format!("stream {stream}"), err))?;
        let until = OffsetDateTime::now_utc() + for_;
        handle
            .pause_consumer(durable, until)
            .await
            .map(|_| ())
            .map_err(|err| BusError::unavailable(format!("pausing {stream}/{durable}"), err))
    }

    /// Resume a paused durable consumer at once.
    pub async fn resume_consumer(&self, stream: &str, durable: &str) -> Result<(), BusError> {
        let handle = self
            .jetstream()
            .get_stream_no_info(stream)
            .await
            .map_err(|err| BusError::unavailable(format!("stream {stream}"), err))?;
        handle
            .resume_consumer(durable)
            .await
            .map(|_| ())
            .map_err(|err| BusError::unavailable(format!("resuming {stream}/{durable}"), err))
    }
}
