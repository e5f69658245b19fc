//! The worker runtime: one durable pull consumer per lane; whenever a slot frees, the next batch
//! comes from the highest lane with work (strict priority, plus a minimum share for lower lanes so
//! nothing starves). A handler returns an [`Outcome`] per message, which the runtime turns into
//! ack, nak-with-delay (exponential backoff with jitter) or dead letter + term.

use crate::{
    Bus, BusError, BusErrorKind, DeadLetter, HealthRecorder,
    control::{PROCESSED_SUBJECT_PREFIX, ProcessedNotice, unix_ns},
    e2e_latency, headers,
};
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
    /// Messages asked for per pull request (0: twice `max_batch`). Workers with small batches
    /// and many slots (the notifier) pull more than a batch, so one round trip feeds many slots.
    pub pull_batch: usize,
    /// Batches processed at once.
    pub concurrency: usize,
    /// Fill a batch that its lane cannot fill with what the lanes below it have buffered, in
    /// priority order: one transaction then carries a few priority events and many bulk ones,
    /// instead of a transaction for the few. The handler's `lane` is then the batch's highest;
    /// each message's own lane is in its stream (`message.info()`).
    pub top_up: bool,
    /// Every `1/lower_lane_share`-th batch prefers the lowest lane with work (0 = strict).
    pub lower_lane_share: f64,
    /// Deliveries after which a retried message is dead-lettered instead (≤ the consumer's
    /// `max_deliver`, so the runtime, not the server, decides).
    pub max_deliveries: i64,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Handlers running longer than this send in-progress acks (keep < the consumer ack wait).
    pub progress_interval: Duration,
    /// How often lane health is published on `crm.control.health.<role>` (zero: never).
    pub health_interval: Duration,
    /// Publish a processed notice per batch on `crm.control.processed.<role>` (load testers and
    /// other observers match them by `Nats-Msg-Id`).
    pub processed_notices: bool,
}

impl WorkerConfig {
    pub fn new(role: &'static str, durable: impl Into<String>, dlq_stage: DlqStage) -> Self {
        Self {
            role,
            durable: durable.into(),
            dlq_stage,
            lanes: Lane::ALL.to_vec(),
            max_batch: 256,
            pull_batch: 0,
            concurrency: 1,
            top_up: false,
            lower_lane_share: 0.05,
            max_deliveries: 10,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            progress_interval: Duration::from_millis(1500),
            health_interval: Duration::from_secs(1),
            processed_notices: true,
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
    let batch = if config.pull_batch > 0 {
        config.pull_batch
    } else {
        config.max_batch.max(1) * 2
    };
    bus.pull_stream(lane.stream(), &config.durable, batch).await
}

impl Bus {
    /// A continuous pull from durable consumer `durable` on `stream`, asking for up to `batch`
    /// messages per request (heartbeats every 5 s, requests expiring after 30 s).
    pub async fn pull_stream(
        &self,
        stream: &str,
        durable: &str,
        batch: usize,
    ) -> Result<pull::Stream, BusError> {
        let consumer: jetstream::consumer::Consumer<pull::Config> = self
            .jetstream()
            .get_consumer_from_stream(durable, stream)
            .await
            .map_err(|err| {
                BusError::with_source(
                    BusErrorKind::Unavailable,
                    format!("consumer {stream}/{durable}"),
                    err,
                )
            })?;
        consumer
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|err| {
                BusError::with_source(
                    BusErrorKind::Unavailable,
                    format!("pulling from {stream}/{durable}"),
                    err,
                )
            })
    }
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
    let labels: Vec<&str> = config.lanes.iter().map(|lane| lane.as_str()).collect();
    let recorder = HealthRecorder::new(config.role, &labels);
    if !config.health_interval.is_zero() {
        tokio::spawn(crate::health::report_health(
            bus.clone(),
            recorder.clone(),
            config.health_interval,
            shutdown.clone(),
        ));
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
        let mut batch_lanes = vec![lane];
        let below = if config.top_up {
            lanes.len()
        } else {
            index + 1
        };
        for (source, messages) in lanes.iter_mut().take(below).skip(index) {
            while batch.len() < config.max_batch {
                match messages.next().now_or_never() {
                    Some(Some(Ok(message))) => {
                        batch.push(message);
                        batch_lanes.push(*source);
                    }
                    _ => break,
                }
            }
            let last_of_lane = batch
                .iter()
                .zip(&batch_lanes)
                .rev()
                .find(|(_, l)| *l == source);
            if let Some((message, _)) = last_of_lane
                && let Ok(info) = message.info()
            {
                recorder.set_pending(source.as_str(), info.pending);
            }
        }
        let (bus, config, handler, recorder) = (
            bus.clone(),
            config.clone(),
            handler.clone(),
            recorder.clone(),
        );
        tasks.spawn(async move {
            process_batch(
                &bus,
                &config,
                handler.as_ref(),
                &recorder,
                lane,
                batch,
                batch_lanes,
            )
            .await;
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
    recorder: &HealthRecorder,
    lane: Lane,
    batch: Vec<jetstream::Message>,
    batch_lanes: Vec<Lane>,
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
    let mut done: Vec<(Lane, &jetstream::Message)> = Vec::new();
    for (index, (message, &source)) in batch.iter().zip(&batch_lanes).enumerate() {
        let outcome = outcomes
            .get(index)
            .cloned()
            .unwrap_or_else(|| Outcome::retry("handler returned no outcome"));
        if outcome == Outcome::Done {
            done.push((source, message));
        }
        settle(bus, config, source.as_str(), message, outcome).await;
    }
    for source in Lane::ALL {
        let of_lane: Vec<&jetstream::Message> = done
            .iter()
            .filter(|(l, _)| *l == source)
            .map(|(_, m)| *m)
            .collect();
        record_done(bus, config, recorder, source.as_str(), &of_lane).await;
    }
}

/// Latency (metric and health) and the processed notice for messages settled as done.
pub async fn record_done(
    bus: &Bus,
    config: &WorkerConfig,
    recorder: &HealthRecorder,
    lane: &'static str,
    done: &[&jetstream::Message],
) {
    if done.is_empty() {
        return;
    }
    let now = unix_ns();
    let mut ids = Vec::with_capacity(if config.processed_notices {
        done.len()
    } else {
        0
    });
    let e2e = metrics::histogram!(
        "crm_lane_e2e_latency_seconds",
        "role" => config.role, "lane" => lane
    );
    for message in done {
        let latency = e2e_latency(message.headers.as_ref(), now);
        if let Some(latency) = latency {
            e2e.record(latency.as_secs_f64());
        }
        recorder.record(lane, latency);
        if config.processed_notices
            && let Some(id) = headers::get(message.headers.as_ref(), headers::MSG_ID)
        {
            ids.push(id.to_owned());
        }
    }
    if !ids.is_empty() {
        let notice = ProcessedNotice {
            role: config.role.to_owned(),
            lane: lane.to_owned(),
            at_ns: u64::try_from(now).unwrap_or(u64::MAX),
            ids,
        };
        let subject = format!("{PROCESSED_SUBJECT_PREFIX}.{}", config.role);
        if let Err(err) = bus.publish_control(subject, &notice).await {
            tracing::debug!(error = %err, "publishing a processed notice failed");
        }
    }
}

/// Turn `outcome` into ack, nak with delay, or dead letter + term, and count it under
/// `crm_worker_processed_total{role, lane, outcome}`. `lane` is the source's label (a lane name,
/// or `analytics`).
pub async fn settle(
    bus: &Bus,
    config: &WorkerConfig,
    lane: &'static str,
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
        "role" => config.role, "lane" => lane, "outcome" => label
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
