//! The worker runtime: one durable pull consumer per lane; whenever a slot frees, the next batch
//! comes from the highest lane with work (strict priority, plus a minimum share for lower lanes so
//! nothing starves). A handler returns an [`Outcome`] per message, which the runtime turns into
//! ack, nak-with-delay (exponential backoff with jitter) or dead letter + term.

use crate::{Bus, BusError, BusErrorKind, DeadLetter};
use async_nats::jetstream::{self, AckKind, consumer::pull};
use events::{DlqStage, Lane};
use futures::{FutureExt, StreamExt};
use std::{future::Future, sync::Arc, time::Duration};
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Processed: ack.
    Done,
    /// Failed for now: redeliver after `after` (or the runtime's backoff).
    Retry {
        after: Option<Duration>,
        error: String,
    },
    /// Will never succeed: dead-letter with a bounded `reason` label.
    Poison { reason: String, error: String },
}

impl Outcome {
    pub fn retry(error: impl ToString) -> Self {
        Self::Retry {
            after: None,
            error: error.to_string(),
        }
    }

    pub fn poison(reason: &str, error: impl ToString) -> Self {
        Self::Poison {
            reason: reason.to_owned(),
            error: error.to_string(),
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Retry { .. } => "retry",
            Self::Poison { .. } => "poison",
        }
    }
}

/// Processes one batch from one lane; returns one outcome per message, in order.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        lane: Lane,
        batch: &[jetstream::Message],
    ) -> impl Future<Output = Vec<Outcome>> + Send;
}

/// How a worker consumes.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Role name for metrics and logs (`projector`, `notifier`).
    pub role: &'static str,
    /// Durable consumer name on every lane stream.
    pub durable: String,
    pub dlq_stage: DlqStage,
    /// Lanes to consume, highest priority first.
    pub lanes: Vec<Lane>,
    pub max_batch: usize,
    /// Batches processed at once.
    pub concurrency: usize,
    /// Every `1/lower_lane_share`-th batch prefers the lowest lane with work (0 = strict).
    pub lower_lane_share: f64,
    /// Deliveries after which a retried message is dead-lettered instead (≤ the consumer's
    /// `max_deliver`, so the runtime, not the server, decides).
    pub max_deliveries: i64,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Handlers running longer than this send in-progress acks (keep < the consumer ack wait).
    pub progress_interval: Duration,
}

impl WorkerConfig {
    pub fn new(role: &'static str, durable: impl Into<String>, dlq_stage: DlqStage) -> Self {
        Self {
            role,
            durable: durable.into(),
            dlq_stage,
            lanes: Lane::ALL.to_vec(),
            max_batch: 256,
            concurrency: 1,
            lower_lane_share: 0.05,
            max_deliveries: 10,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            progress_interval: Duration::from_secs(10),
        }
    }
}

/// Exponential backoff with jitter for the `delivered`-th attempt: a random delay in
/// [d/2, d] where d = min(max, base · 2^(delivered-1)).
pub fn backoff(base: Duration, max: Duration, delivered: i64) -> Duration {
    let exponent = u32::try_from(delivered.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
    let full = base.saturating_mul(2u32.saturating_pow(exponent)).min(max);
    full.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

type Messages = pull::Stream;

async fn open_lane(bus: &Bus, lane: Lane, config: &WorkerConfig) -> Result<Messages, BusError> {
    let consumer: jetstream::consumer::Consumer<pull::Config> = bus
        .jetstream()
        .get_consumer_from_stream(&config.durable, lane.stream())
        .await
        .map_err(|err| {
            BusError::with_source(
                BusErrorKind::Unavailable,
                format!("consumer {}/{}", lane.stream(), config.durable),
                err,
            )
        })?;
    consumer
        .stream()
        .max_messages_per_batch(config.max_batch.max(1) * 2)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|err| {
            BusError::with_source(
                BusErrorKind::Unavailable,
                format!("pulling from {}/{}", lane.stream(), config.durable),
                err,
            )
        })
}

/// Wait for the next message from the highest (or, when `reverse`, lowest) lane that has one.
async fn next_message(
    lanes: &mut [(Lane, Messages)],
    reverse: bool,
) -> (usize, Option<Result<jetstream::Message, BusError>>) {
    // Poll in priority order so that of several ready lanes the preferred one wins.
    let order: Vec<usize> = if reverse {
        (0..lanes.len()).rev().collect()
    } else {
        (0..lanes.len()).collect()
    };
    std::future::poll_fn(|cx| {
        for &index in &order {
            if let std::task::Poll::Ready(item) = lanes[index].1.poll_next_unpin(cx) {
                let item = item.map(|r| {
                    r.map_err(|err| {
                        BusError::with_source(BusErrorKind::Unavailable, "pull consumer", err)
                    })
                });
                return std::task::Poll::Ready((index, item));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Run `handler` over the lanes until `shutdown` fires; then stop fetching, finish and ack the
/// batches in flight, and return.
pub async fn run_worker<H: Handler>(
    bus: Bus,
    config: WorkerConfig,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let mut lanes = Vec::with_capacity(config.lanes.len());
    for &lane in &config.lanes {
        lanes.push((lane, open_lane(&bus, lane, &config).await?));
    }
    let config = Arc::new(config);
    let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let share_every = if config.lower_lane_share > 0.0 {
        (1.0 / config.lower_lane_share).round().max(1.0) as u64
    } else {
        0
    };
    let mut taken: u64 = 0;
    let mut tasks = JoinSet::new();
    tracing::info!(role = config.role, durable = %config.durable, "worker started");

    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let reverse = share_every > 0 && taken % share_every == share_every - 1;
        let (index, item) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            next = next_message(&mut lanes, reverse) => next,
        };
        let first = match item {
            Some(Ok(message)) => message,
            Some(Err(err)) => {
                // Missed heartbeats and the like: the stream carries on by itself.
                tracing::debug!(role = config.role, error = %err, "pull stream hiccup");
                continue;
            }
            None => {
                let lane = lanes[index].0;
                tracing::warn!(role = config.role, %lane, "pull stream ended; reopening");
                tokio::time::sleep(Duration::from_millis(200)).await;
                lanes[index].1 = open_lane(&bus, lane, &config).await?;
                continue;
            }
        };
        taken += 1;
        let lane = lanes[index].0;
        let mut batch = vec![first];
        while batch.len() < config.max_batch {
            match lanes[index].1.next().now_or_never() {
                Some(Some(Ok(message))) => batch.push(message),
                _ => break,
            }
        }
        let (bus, config, handler) = (bus.clone(), config.clone(), handler.clone());
        tasks.spawn(async move {
            process_batch(&bus, &config, handler.as_ref(), lane, batch).await;
            drop(permit);
        });
        // Reap finished tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
    }

    // Hand back what is buffered but not started, so it is redelivered at once.
    for (_, messages) in &mut lanes {
        while let Some(Some(Ok(message))) = messages.next().now_or_never() {
            let _ = message.ack_with(AckKind::Nak(None)).await;
        }
    }
    while tasks.join_next().await.is_some() {}
    tracing::info!(role = config.role, "worker stopped");
    Ok(())
}

async fn process_batch<H: Handler>(
    bus: &Bus,
    config: &WorkerConfig,
    handler: &H,
    lane: Lane,
    batch: Vec<jetstream::Message>,
) {
    let started = std::time::Instant::now();
    let work = handler.handle(lane, &batch);
    tokio::pin!(work);
    let mut progress = tokio::time::interval_at(
        tokio::time::Instant::now() + config.progress_interval,
        config.progress_interval,
    );
    let outcomes = loop {
        tokio::select! {
            outcomes = &mut work => break outcomes,
            _ = progress.tick() => {
                for message in &batch {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
            }
        }
    };
    metrics::histogram!(
        "crm_worker_batch_duration_seconds",
        "role" => config.role, "lane" => lane.as_str()
    )
    .record(started.elapsed().as_secs_f64());
    if outcomes.len() != batch.len() {
        tracing::error!(
            role = config.role,
            expected = batch.len(),
            got = outcomes.len(),
            "handler returned the wrong number of outcomes; retrying the batch"
        );
    }
    for (index, message) in batch.iter().enumerate() {
        let outcome = outcomes
            .get(index)
            .cloned()
            .unwrap_or_else(|| Outcome::retry("handler returned no outcome"));
        settle(bus, config, lane, message, outcome).await;
    }
}

async fn settle(
    bus: &Bus,
    config: &WorkerConfig,
    lane: Lane,
    message: &jetstream::Message,
    outcome: Outcome,
) {
    let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
    let label = match (&outcome, delivered >= config.max_deliveries) {
        (Outcome::Retry { .. }, true) => "dead_lettered",
        (Outcome::Poison { .. }, _) => "dead_lettered",
        _ => outcome.label(),
    };
    metrics::counter!(
        "crm_worker_processed_total",
        "role" => config.role, "lane" => lane.as_str(), "outcome" => label
    )
    .increment(1);
    let result = match outcome {
        Outcome::Done => message.ack().await.map_err(|e| e.to_string()),
        Outcome::Retry { after, error } if delivered < config.max_deliveries => {
            let delay = after
                .unwrap_or_else(|| backoff(config.backoff_base, config.backoff_max, delivered));
            tracing::debug!(role = config.role, %lane, delivered, ?delay, error, "retrying later");
            message
                .ack_with(AckKind::Nak(Some(delay)))
                .await
                .map_err(|e| e.to_string())
        }
        Outcome::Retry { error, .. } => {
            let letter = DeadLetter {
                stage: config.dlq_stage,
                reason: "max_deliveries",
                error: &error,
            };
            bus.dead_letter(message, &letter)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Outcome::Poison { reason, error } => {
            let letter = DeadLetter {
                stage: config.dlq_stage,
                reason: &reason,
                error: &error,
            };
            bus.dead_letter(message, &letter)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    if let Err(error) = result {
        // The message comes back after its ack wait; effects are idempotent.
        tracing::warn!(role = config.role, %lane, error, "settling a message failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for _ in 0..100 {
            let first = backoff(base, max, 1);
            assert!(first >= base / 2 && first <= base, "{first:?}");
            let third = backoff(base, max, 3);
            assert!(third >= base * 2 && third <= base * 4, "{third:?}");
            let late = backoff(base, max, 60);
            assert!(late >= max / 2 && late <= max, "{late:?}");
        }
    }
}
