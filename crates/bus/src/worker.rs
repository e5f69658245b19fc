//! The consumer runtime every role uses (router, projector, notifier, analytics): one durable pull
//! consumer per source, highest priority first; whenever a slot frees, the next batch comes from
//! the highest source with work (strict priority, plus a minimum share for lower sources so
//! nothing starves). A handler returns an [`Outcome`] per message and [`settle`] is the one place
//! that turns outcomes into ack, nak-with-delay, or dead letter + term.
//!
//! What the runtime promises: a message is never given up on without a dead letter written and
//! acknowledged first (the consumers carry `max_deliver: -1`, so the server never gives up on its
//! own); a message whose dead letter cannot be written stays (nak with backoff, and
//! `crm_dlq_write_failures_total` counts it); a dependency that is down ([`Outcome::Wait`]) is
//! waited out, never dead-lettered.

use crate::{
    Bus, BusError, BusErrorKind, DeadLetter, HealthRecorder,
    control::{PROCESSED_SUBJECT_PREFIX, ProcessedNotice, unix_ns},
    e2e_latency, headers,
    signals::{Settled, WorkerSignals},
};
use async_nats::jetstream::{self, AckKind, consumer::pull};
use events::{DlqStage, Lane};
use futures::{FutureExt, StreamExt};
use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};
use tokio::{
    sync::{Notify, Semaphore},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Processed: ack.
    Done,
    /// The message failed for now: redeliver after `after` (or the runtime's backoff); after
    /// `max_deliveries` deliveries it is dead-lettered with reason `max_deliveries`.
    Retry {
        after: Option<Duration>,
        error: String,
    },
    /// Will never succeed: dead-letter with a bounded `reason` label.
    Poison { reason: String, error: String },
    /// Not this message's fault: a dependency refused (the store is down, the stream it goes
    /// to is full). Never dead-lettered, whatever the deliveries; how the runtime waits is its
    /// [`WaitPolicy`].
    Wait { error: String },
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

    pub fn wait(error: impl ToString) -> Self {
        Self::Wait {
            error: error.to_string(),
        }
    }
}

/// How a worker waits out [`Outcome::Wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitPolicy {
    /// For a dependency every message needs (the store): keep the waiting messages in hand
    /// (in-progress acks keep the server from redelivering them), stop taking new batches, and
    /// give the buffered ones back; run the handler on the held messages again after a backoff
    /// until they pass. No delivery is spent on the outage while the process lives.
    Hold,
    /// For a dependency only some messages need (one full lane): nak the waiting message with
    /// a backoff delay and go on with the others. A delivery is spent per attempt, but a waiting
    /// message is never dead-lettered for it.
    Redeliver,
}

/// Processes one batch from one source; returns one outcome per message, in order.
pub trait Handler: Send + Sync + 'static {
    /// `source` is the label of the batch's source ([`Source::label`]: a lane name for lane
    /// workers); with `top_up`, each message's own stream is in `message.info()`.
    fn handle(
        &self,
        source: &'static str,
        batch: &[jetstream::Message],
    ) -> impl Future<Output = Vec<Outcome>> + Send;
}

/// One durable pull consumer a worker reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub stream: String,
    pub durable: String,
    /// Bounded label for metrics, health and the handler (`critical`, `express`, …).
    pub label: &'static str,
}

impl Source {
    pub fn new(stream: impl Into<String>, durable: impl Into<String>, label: &'static str) -> Self {
        Self {
            stream: stream.into(),
            durable: durable.into(),
            label,
        }
    }

    /// Durable `durable` on `lane`'s stream, labelled with the lane's name.
    pub fn lane(lane: Lane, durable: &str) -> Self {
        Self::new(lane.stream(), durable, lane.as_str())
    }
}

/// How a worker consumes.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Role name for metrics and logs (`projector`, `notifier`, `router`).
    pub role: &'static str,
    pub dlq_stage: DlqStage,
    /// What to consume, highest priority first.
    pub sources: Vec<Source>,
    pub max_batch: usize,
    /// Messages asked for per pull request (0: twice `max_batch`). Workers with small batches
    /// and many slots (the notifier) pull more than a batch, so one round trip feeds many slots.
    pub pull_batch: usize,
    /// Batches processed at once.
    pub concurrency: usize,
    /// When the stream holds more for the batch's source than has reached the worker, wait up
    /// to this long for it to fill the batch (zero: take only what is buffered).
    pub fill_linger: Duration,
    /// Collect a batch for up to this long after its first message arrived, even when the
    /// stream holds nothing more yet (zero: take what is there). For consumers whose work need
    /// not be done at once: fewer, fuller transactions.
    pub gather: Duration,
    /// Fill a batch that its source cannot fill with what the sources below it have buffered,
    /// in priority order: one transaction then carries a few priority events and many bulk ones,
    /// instead of a transaction for the few.
    pub top_up: bool,
    /// Every `1/lower_lane_share`-th batch prefers the lowest source with work (0 = strict).
    pub lower_lane_share: f64,
    /// Deliveries after which a retried message is dead-lettered instead.
    pub max_deliveries: i64,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How [`Outcome::Wait`] is waited out, and the longest pause between two attempts.
    pub wait_policy: WaitPolicy,
    pub wait_max: Duration,
    /// Handlers running longer than this send in-progress acks (keep < the consumer ack wait).
    pub progress_interval: Duration,
    /// How often lane health is published on `crm.control.health.<role>` (zero: never).
    pub health_interval: Duration,
    /// Publish a processed notice per batch on `crm.control.processed.<role>` (load testers and
    /// other observers match them by event id).
    pub processed_notices: bool,
}

impl WorkerConfig {
    /// A worker of `role` reading durable `durable` on every lane, highest first.
    pub fn new(role: &'static str, durable: &str, dlq_stage: DlqStage) -> Self {
        Self::with_sources(
            role,
            Lane::ALL
                .iter()
                .map(|&lane| Source::lane(lane, durable))
                .collect(),
            dlq_stage,
        )
    }

    pub fn with_sources(role: &'static str, sources: Vec<Source>, dlq_stage: DlqStage) -> Self {
        Self {
            role,
            dlq_stage,
            sources,
            max_batch: 256,
            pull_batch: 0,
            concurrency: 1,
            fill_linger: Duration::from_millis(10),
            gather: Duration::ZERO,
            top_up: false,
            lower_lane_share: 0.05,
            max_deliveries: 10,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            wait_policy: WaitPolicy::Hold,
            wait_max: Duration::from_secs(5),
            progress_interval: Duration::from_millis(1500),
            health_interval: Duration::from_secs(1),
            processed_notices: true,
        }
    }

    /// Keep only the sources of these lanes (tests, partial deployments).
    pub fn lanes(mut self, lanes: &[Lane]) -> Self {
        self.sources
            .retain(|source| lanes.iter().any(|lane| lane.as_str() == source.label));
        self
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

async fn open_source(
    bus: &Bus,
    source: &Source,
    config: &WorkerConfig,
) -> Result<Messages, BusError> {
    let batch = if config.pull_batch > 0 {
        config.pull_batch
    } else {
        config.max_batch.max(1) * 2
    };
    bus.pull_stream(&source.stream, &source.durable, batch)
        .await
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

/// Wait for the next message from the highest (or, when `reverse`, lowest) source that has one.
async fn next_message(
    sources: &mut [(Source, Messages)],
    reverse: bool,
) -> (usize, Option<Result<jetstream::Message, BusError>>) {
    // Poll in priority order so that of several ready sources the preferred one wins.
    let order: Vec<usize> = if reverse {
        (0..sources.len()).rev().collect()
    } else {
        (0..sources.len()).collect()
    };
    std::future::poll_fn(|cx| {
        for &index in &order {
            if let std::task::Poll::Ready(item) = sources[index].1.poll_next_unpin(cx) {
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

/// Batches holding messages for an unavailable dependency ([`WaitPolicy::Hold`]); while any
/// does, the runtime takes no new batch.
#[derive(Debug, Default)]
pub struct Holding {
    batches: AtomicUsize,
    entered: Notify,
    released: Notify,
}

impl Holding {
    fn enter(&self, signals: &WorkerSignals) {
        if self.batches.fetch_add(1, Ordering::SeqCst) == 0 {
            signals.waiting(true);
            self.entered.notify_waiters();
        }
    }

    fn leave(&self, signals: &WorkerSignals) {
        if self.batches.fetch_sub(1, Ordering::SeqCst) == 1 {
            signals.waiting(false);
            self.released.notify_waiters();
        }
    }

    /// Whether some batch is waiting for a dependency.
    pub fn is_holding(&self) -> bool {
        self.batches.load(Ordering::SeqCst) > 0
    }

    async fn released(&self) {
        loop {
            let notified = self.released.notified();
            if !self.is_holding() {
                return;
            }
            notified.await;
        }
    }

    async fn entered(&self) {
        loop {
            let notified = self.entered.notified();
            if self.is_holding() {
                return;
            }
            notified.await;
        }
    }
}

/// What every batch of one consumer shares: the connection, the settings, lane health, the hold
/// state and the shutdown signal. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Runtime {
    bus: Bus,
    config: Arc<WorkerConfig>,
    recorder: Arc<HealthRecorder>,
    signals: Arc<WorkerSignals>,
    holding: Arc<Holding>,
    beat: crate::liveness::Beat,
    shutdown: CancellationToken,
}

impl Runtime {
    /// The runtime of one consumer; starts publishing lane health every
    /// `config.health_interval` (unless zero) until `shutdown`.
    pub fn new(bus: Bus, config: WorkerConfig, shutdown: CancellationToken) -> Self {
        let labels: Vec<&str> = config.sources.iter().map(|source| source.label).collect();
        let recorder = HealthRecorder::new(config.role, &labels);
        if !config.health_interval.is_zero() {
            tokio::spawn(crate::health::report_health(
                bus.clone(),
                recorder.clone(),
                config.health_interval,
                shutdown.clone(),
            ));
        }
        let signals = WorkerSignals::new(config.role, &labels, config.dlq_stage.as_str());
        signals.waiting(false);
        let beat = bus
            .liveness()
            .register(&format!("{}/{}", config.role, labels.join("+")));
        Self {
            bus,
            beat,
            config: Arc::new(config),
            recorder,
            signals: Arc::new(signals),
            holding: Arc::new(Holding::default()),
            shutdown,
        }
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    pub fn holding(&self) -> &Holding {
        &self.holding
    }
}

/// Open every source; on failure, what was opened is dropped.
async fn open_all(bus: &Bus, config: &WorkerConfig) -> Result<Vec<(Source, Messages)>, BusError> {
    let mut open = Vec::with_capacity(config.sources.len());
    for source in &config.sources {
        open.push((source.clone(), open_source(bus, source, config).await?));
    }
    Ok(open)
}

/// Close the pull streams and give back (nak, no delay) what they had buffered and not handed
/// out, so another worker can take it without waiting out its ack wait. The streams go first, so
/// that their unsubscribes precede the naks. A pull request of a closed stream can still be
/// pending on the server until it expires, and the server may hand a naked message to it; that
/// message then comes back after its ack wait instead: later, never lost.
async fn give_back(sources: &mut Vec<(Source, Messages)>) {
    let mut buffered = Vec::new();
    for (_, messages) in sources.iter_mut() {
        while let Some(Some(Ok(message))) = messages.next().now_or_never() {
            buffered.push(message);
        }
    }
    sources.clear();
    for message in buffered {
        let _ = message.ack_with(AckKind::Nak(None)).await;
    }
}

/// Run `work` on `runtime` and wait for it here. The priority path's workers (the router's
/// priority ingest, the projector's critical lane) run on a runtime of their own, so their tasks
/// never wait for a thread behind bulk tasks; a NATS connection made inside `work` has its I/O
/// task there too. A panic in `work` comes back as an error.
pub async fn run_on<T, F>(
    runtime: &tokio::runtime::Handle,
    what: &str,
    work: F,
) -> Result<T, BusError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, BusError>> + Send + 'static,
{
    runtime.spawn(work).await.map_err(|err| {
        BusError::new(
            BusErrorKind::Unavailable,
            format!("{what} stopped abnormally: {err}"),
        )
    })?
}

/// Run `handler` over the sources until `shutdown` fires; then stop fetching, finish and settle
/// the batches in flight, and return.
pub async fn run_worker<H: Handler>(
    bus: Bus,
    config: WorkerConfig,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let mut sources = open_all(&bus, &config).await?;
    let labels: Vec<&str> = config.sources.iter().map(|source| source.label).collect();
    let runtime = Runtime::new(bus.clone(), config, shutdown.clone());
    let (config, recorder, holding, signals) = (
        runtime.config.clone(),
        runtime.recorder.clone(),
        runtime.holding.clone(),
        runtime.signals.clone(),
    );
    let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let share_every = if config.lower_lane_share > 0.0 {
        (1.0 / config.lower_lane_share).round().max(1.0) as u64
    } else {
        0
    };
    let mut taken: u64 = 0;
    let mut tasks = JoinSet::new();
    tracing::info!(role = config.role, sources = ?labels, "worker started");

    loop {
        if holding.is_holding() {
            // A dependency is down: take nothing new. Hand back what is buffered and close the
            // pulls, so nothing sits in this process past its ack wait; reopen once it is up.
            tracing::warn!(
                role = config.role,
                "waiting for a dependency; no new batches until it is back"
            );
            give_back(&mut sources).await;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = holding.released() => {}
            }
            tracing::info!(role = config.role, "dependency back; resuming");
            sources = open_all(&bus, &config).await?;
            continue;
        }
        let slot_wait = std::time::Instant::now();
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        if holding.is_holding() {
            continue;
        }
        let reverse = share_every > 0 && taken % share_every == share_every - 1;
        let fetch_wait = std::time::Instant::now();
        let (index, item) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            // A batch started to hold while this one waited for work.
            _ = holding.entered() => continue,
            next = next_message(&mut sources, reverse) => next,
        };
        let first = match item {
            Some(Ok(message)) => message,
            Some(Err(err)) => {
                // Missed heartbeats and the like: the stream carries on by itself.
                tracing::debug!(role = config.role, error = %err, "pull stream hiccup");
                continue;
            }
            None => {
                let source = sources[index].0.clone();
                tracing::warn!(
                    role = config.role,
                    source = source.label,
                    "pull stream ended; reopening"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
                sources[index].1 = open_source(&bus, &source, &config).await?;
                continue;
            }
        };
        taken += 1;
        let label = sources[index].0.label;
        signals.stage(label, "slot_wait", fetch_wait.duration_since(slot_wait));
        signals.stage(label, "fetch_wait", fetch_wait.elapsed());
        let mut batch = vec![first];
        let mut batch_labels = vec![label];
        let below = if config.top_up {
            sources.len()
        } else {
            index + 1
        };
        for (position, (source, messages)) in sources.iter_mut().take(below).skip(index).enumerate()
        {
            // The lead source has a backlog in the stream beyond what has reached us: wait for
            // it (briefly) rather than commit a batch of what one pull happened to bring. A
            // batch costs a commit, so a backlog taken in part batches drains at a fraction of
            // the rate; the wait is for messages already stored, about one round trip.
            // With `gather`, the lead source is given that long from the batch's first message
            // whether or not more is stored yet: one transaction then carries what arrived
            // meanwhile instead of one each.
            let lead = position == 0;
            let now = tokio::time::Instant::now();
            let (linger_until, gather_until) = (now + config.fill_linger, now + config.gather);
            loop {
                take_buffered(
                    messages,
                    &mut batch,
                    &mut batch_labels,
                    source.label,
                    config.max_batch,
                );
                let backlog = || {
                    batch
                        .last()
                        .and_then(|m| m.info().ok())
                        .is_some_and(|i| i.pending > 0)
                };
                if !lead || batch.len() >= config.max_batch {
                    break;
                }
                let deadline = if !config.fill_linger.is_zero() && backlog() {
                    linger_until.max(gather_until)
                } else if !config.gather.is_zero() {
                    gather_until
                } else {
                    break;
                };
                match tokio::time::timeout_at(deadline, messages.next()).await {
                    Ok(Some(Ok(message))) => {
                        batch.push(message);
                        batch_labels.push(source.label);
                    }
                    _ => break,
                }
            }
            let last_of_source = batch
                .iter()
                .zip(&batch_labels)
                .rev()
                .find(|(_, l)| **l == source.label);
            if let Some((message, _)) = last_of_source
                && let Ok(info) = message.info()
            {
                recorder.set_pending(source.label, info.pending);
            }
        }
        signals.batch_taken(label, batch.len());
        let (runtime, handler) = (runtime.clone(), handler.clone());
        tasks.spawn(async move {
            runtime
                .process(handler.as_ref(), label, batch, batch_labels)
                .await;
            drop(permit);
        });
        // Reap finished tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
    }

    // Hand back what is buffered but not started, so it is redelivered at once; then let the
    // batches in flight finish (a batch held for an outage hands its messages back too).
    give_back(&mut sources).await;
    while tasks.join_next().await.is_some() {}
    tracing::info!(role = config.role, "worker stopped");
    Ok(())
}

/// Move what `messages` has buffered into the batch, up to `max_batch`, without waiting.
fn take_buffered(
    messages: &mut Messages,
    batch: &mut Vec<jetstream::Message>,
    labels: &mut Vec<&'static str>,
    label: &'static str,
    max_batch: usize,
) {
    while batch.len() < max_batch {
        match messages.next().now_or_never() {
            Some(Some(Ok(message))) => {
                batch.push(message);
                labels.push(label);
            }
            _ => break,
        }
    }
}

/// Run `work` while sending in-progress acks for `messages` every `interval`.
async fn with_progress<T>(
    messages: &[jetstream::Message],
    interval: Duration,
    work: impl Future<Output = T>,
) -> T {
    tokio::pin!(work);
    let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = progress.tick() => {
                for message in messages {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
            }
        }
    }
}

impl Runtime {
    /// Handle one batch and settle every message, waiting out [`Outcome::Wait`] as
    /// `config.wait_policy` says. `label` is the batch's source; `labels` each message's own.
    /// Public so that a consumer with a loop of its own (analytics' paced fetch) settles the same way.
    /// On shutdown a held batch is given back (nak) rather than held on.
    pub async fn process<H: Handler>(
        &self,
        handler: &H,
        label: &'static str,
        mut batch: Vec<jetstream::Message>,
        mut labels: Vec<&'static str>,
    ) {
        let (bus, config, recorder, holding, signals) = (
            &self.bus,
            &*self.config,
            &*self.recorder,
            &*self.holding,
            &*self.signals,
        );
        let mut held_since: Option<tokio::time::Instant> = None;
        let mut attempt: i64 = 0;
        loop {
            // Handling and settling is work; the pause before a held batch's retry is not.
            let working = self.beat.start();
            let started = std::time::Instant::now();
            let outcomes = with_progress(
                &batch,
                config.progress_interval,
                handler.handle(label, &batch),
            )
            .await;
            signals.batch_handled(label, started.elapsed());
            if outcomes.len() != batch.len() {
                tracing::error!(
                    role = config.role,
                    expected = batch.len(),
                    got = outcomes.len(),
                    "handler returned the wrong number of outcomes; retrying the batch"
                );
            }
            let settling = std::time::Instant::now();
            let mut waiting = Vec::new();
            let mut waiting_labels = Vec::new();
            let mut wait_error = String::new();
            let mut done: Vec<(&'static str, jetstream::Message)> = Vec::new();
            for (index, (message, source)) in batch.into_iter().zip(labels).enumerate() {
                let outcome = outcomes
                    .get(index)
                    .cloned()
                    .unwrap_or_else(|| Outcome::retry("handler returned no outcome"));
                match outcome {
                    Outcome::Wait { error } if config.wait_policy == WaitPolicy::Hold => {
                        wait_error = error;
                        waiting.push(message);
                        waiting_labels.push(source);
                    }
                    Outcome::Done => {
                        settle(bus, config, signals, source, &message, Outcome::Done).await;
                        done.push((source, message));
                    }
                    outcome => settle(bus, config, signals, source, &message, outcome).await,
                }
            }
            for source in config.sources.iter().map(|s| s.label) {
                let of_source: Vec<&jetstream::Message> = done
                    .iter()
                    .filter(|(l, _)| *l == source)
                    .map(|(_, m)| m)
                    .collect();
                record_done(bus, config, recorder, signals, source, &of_source, None).await;
            }
            signals.stage(label, "settle", settling.elapsed());
            drop(working);
            if waiting.is_empty() {
                if held_since.is_some() {
                    holding.leave(signals);
                }
                return;
            }
            if held_since.is_none() {
                held_since = Some(tokio::time::Instant::now());
                holding.enter(signals);
            }
            attempt += 1;
            signals.settled(label, Settled::Wait, waiting.len() as u64);
            let delay = backoff(
                config.backoff_base.min(config.wait_max),
                config.wait_max,
                attempt,
            );
            tracing::warn!(
                role = config.role, lane = label, messages = waiting.len(), attempt, ?delay,
                error = %wait_error, "a dependency is unavailable; holding the batch"
            );
            let stopping = with_progress(&waiting, config.progress_interval, async {
                tokio::select! {
                    _ = self.shutdown.cancelled() => true,
                    _ = tokio::time::sleep(delay) => false,
                }
            })
            .await;
            if stopping {
                // Hand the held messages back for whoever runs next; nothing was spent on them.
                for message in &waiting {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                }
                holding.leave(signals);
                return;
            }
            batch = waiting;
            labels = waiting_labels;
        }
    }
}

/// Poison isolation: apply `apply` to `items`; when it fails for a reason that lies in the data
/// (`in_the_data`), apply it to each half instead, and so on, until every failing item is alone.
/// Returns each range that was settled with its result: `Ok` ranges took effect, an `Err` range
/// failed as a whole (one item when the fault was in the data; several when it was not, e.g. the
/// store is down). One bad event then costs ~2·log2(n) extra attempts, never the batch.
pub async fn isolate<'a, T, R, E, F, Fut>(
    items: &'a [T],
    mut apply: F,
    in_the_data: impl Fn(&E) -> bool,
) -> Vec<(std::ops::Range<usize>, Result<R, E>)>
where
    F: FnMut(&'a [T]) -> Fut,
    Fut: Future<Output = Result<R, E>>,
{
    let mut settled = Vec::new();
    let mut todo = Vec::new();
    todo.push(0..items.len());
    while let Some(range) = todo.pop() {
        if range.is_empty() {
            continue;
        }
        match apply(&items[range.clone()]).await {
            Err(err) if range.len() > 1 && in_the_data(&err) => {
                let middle = range.start + range.len() / 2;
                // First half on top: ranges settle in item order.
                todo.push(middle..range.end);
                todo.push(range.start..middle);
            }
            result => settled.push((range, result)),
        }
    }
    settled
}

/// Latency (metric and health) and the processed notice for messages settled as done. The
/// notice lists event ids: `ids` when given (one per message), else each message's
/// `Crm-Event-Id` header (its `Nats-Msg-Id` when it has none).
pub async fn record_done(
    bus: &Bus,
    config: &WorkerConfig,
    recorder: &HealthRecorder,
    signals: &WorkerSignals,
    label: &'static str,
    done: &[&jetstream::Message],
    ids: Option<Vec<String>>,
) {
    if done.is_empty() {
        return;
    }
    let now = unix_ns();
    for message in done {
        let latency = e2e_latency(message.headers.as_ref(), now);
        if let Some(latency) = latency {
            signals.e2e_latency(label, latency);
        }
        recorder.record(label, latency);
    }
    if !config.processed_notices {
        return;
    }
    let ids = ids.unwrap_or_else(|| {
        done.iter()
            .filter_map(|message| {
                let headers = message.headers.as_ref();
                headers::get(headers, headers::EVENT_ID)
                    .or_else(|| headers::get(headers, headers::MSG_ID))
                    .map(str::to_owned)
            })
            .collect()
    });
    if ids.is_empty() {
        return;
    }
    let notice = ProcessedNotice {
        role: config.role.to_owned(),
        lane: label.to_owned(),
        at_ns: u64::try_from(now).unwrap_or(u64::MAX),
        ids,
    };
    let subject = format!("{PROCESSED_SUBJECT_PREFIX}.{}", config.role);
    if let Err(err) = bus.publish_control(subject, &notice).await {
        tracing::debug!(error = %err, "publishing a processed notice failed");
    }
}

/// What [`settle`] does with one outcome, given the message's delivery count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    Ack,
    /// Nak with this delay.
    Redeliver(Duration),
    /// Write a dead letter with this reason, then terminate.
    DeadLetter {
        reason: String,
        error: String,
    },
}

/// The settle policy, pure: `delivered` is the message's delivery count (1 on the first).
pub fn settlement(config: &WorkerConfig, outcome: Outcome, delivered: i64) -> Settlement {
    match outcome {
        Outcome::Done => Settlement::Ack,
        Outcome::Retry { after, .. } if delivered < config.max_deliveries => Settlement::Redeliver(
            after.unwrap_or_else(|| backoff(config.backoff_base, config.backoff_max, delivered)),
        ),
        Outcome::Retry { error, .. } => Settlement::DeadLetter {
            reason: "max_deliveries".to_owned(),
            error,
        },
        Outcome::Poison { reason, error } => Settlement::DeadLetter { reason, error },
        // Held messages never get here; with `Redeliver` the delay grows with the attempts and
        // is capped, whatever the count: waiting is never a reason to give up.
        Outcome::Wait { .. } => Settlement::Redeliver(backoff(
            config.backoff_base.min(config.wait_max),
            config.wait_max,
            delivered,
        )),
    }
}

/// Turn `outcome` into ack, nak with delay, or dead letter + term, and count it under
/// `crm_worker_processed_total{role, lane, outcome}` (`done`, `retry`, `wait`,
/// `dead_lettered`, `dead_letter_failed`). `lane` is the source's label. When the dead letter
/// cannot be written, the message is nak'ed with a backoff and tried again later: it is never
/// terminated without its dead letter stored.
pub async fn settle(
    bus: &Bus,
    config: &WorkerConfig,
    signals: &WorkerSignals,
    lane: &'static str,
    message: &jetstream::Message,
    outcome: Outcome,
) {
    let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
    let waiting = matches!(outcome, Outcome::Wait { .. });
    let retry_error = match &outcome {
        Outcome::Retry { error, .. } | Outcome::Wait { error } => Some(error.clone()),
        _ => None,
    };
    let (label, result) = match settlement(config, outcome, delivered) {
        Settlement::Ack => (
            Settled::Done,
            message.ack().await.map_err(|e| e.to_string()),
        ),
        Settlement::Redeliver(delay) => {
            tracing::debug!(
                role = config.role, %lane, delivered, ?delay,
                error = retry_error.unwrap_or_default(), "redelivering later"
            );
            (
                if waiting {
                    Settled::Wait
                } else {
                    Settled::Retry
                },
                message
                    .ack_with(AckKind::Nak(Some(delay)))
                    .await
                    .map_err(|e| e.to_string()),
            )
        }
        Settlement::DeadLetter { reason, error } => {
            let letter = DeadLetter {
                stage: config.dlq_stage,
                reason: &reason,
                error: &error,
            };
            match bus.dead_letter(message, &letter).await {
                Ok(_) => (Settled::DeadLettered, Ok(())),
                Err(err) => {
                    // The DLQ is full or unreachable: keep the message (it comes back after the
                    // delay and is dead-lettered then) and make it visible.
                    signals.dead_letter_write_failed();
                    let delay = backoff(config.backoff_base, config.backoff_max, delivered);
                    tracing::error!(
                        role = config.role, %lane, reason, error = %err, ?delay,
                        "cannot write a dead letter; keeping the message"
                    );
                    (
                        Settled::DeadLetterFailed,
                        message
                            .ack_with(AckKind::Nak(Some(delay)))
                            .await
                            .map_err(|e| e.to_string()),
                    )
                }
            }
        }
    };
    signals.settled(lane, label, 1);
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

    #[tokio::test]
    async fn isolation_leaves_each_bad_item_alone_and_applies_the_rest() {
        let items: Vec<u32> = (0..37).collect();
        let bad = [3u32, 17, 36];
        let attempts = std::sync::Mutex::new(0);
        let settled = isolate(
            &items,
            |chunk: &[u32]| {
                *attempts.lock().expect("lock") += 1;
                let result = match chunk.iter().find(|i| bad.contains(i)) {
                    Some(i) => Err(format!("item {i}")),
                    None => Ok(chunk.len()),
                };
                async move { result }
            },
            |_| true,
        )
        .await;
        let mut applied = 0;
        let mut failed = Vec::new();
        let mut next = 0;
        for (range, result) in &settled {
            assert_eq!(range.start, next, "ranges settle in order: {settled:?}");
            next = range.end;
            match result {
                Ok(n) => applied += n,
                Err(_) => {
                    assert_eq!(range.len(), 1, "a failure is isolated to one item");
                    failed.push(items[range.start]);
                }
            }
        }
        assert_eq!(next, items.len());
        assert_eq!(failed, bad);
        assert_eq!(applied, items.len() - bad.len());
        assert!(
            *attempts.lock().expect("lock") <= 1 + 3 * 2 * 6,
            "bounded attempts"
        );

        // A failure that is not in the data (the store is down) is not split.
        let settled = isolate(
            &items,
            |_: &[u32]| async { Err::<(), _>("down") },
            |_| false,
        )
        .await;
        assert_eq!(settled.len(), 1);
        assert_eq!(settled[0].0, 0..items.len());
    }

    #[test]
    fn the_settle_policy_gives_up_only_with_a_dead_letter() {
        let config = WorkerConfig::new("test", "projector", DlqStage::Projector);
        assert_eq!(settlement(&config, Outcome::Done, 1), Settlement::Ack);
        assert!(matches!(
            settlement(&config, Outcome::retry("x"), 9),
            Settlement::Redeliver(_)
        ));
        assert_eq!(
            settlement(&config, Outcome::retry("x"), 10),
            Settlement::DeadLetter {
                reason: "max_deliveries".into(),
                error: "x".into()
            }
        );
        assert_eq!(
            settlement(&config, Outcome::poison("invalid_event", "bad"), 1),
            Settlement::DeadLetter {
                reason: "invalid_event".into(),
                error: "bad".into()
            }
        );
        // Waiting is never a reason to give up, however often it happened.
        for delivered in [1, 10, 1_000, i64::MAX] {
            match settlement(&config, Outcome::wait("lane full"), delivered) {
                Settlement::Redeliver(delay) => assert!(delay <= config.wait_max, "{delay:?}"),
                other => panic!("waiting settled as {other:?}"),
            }
        }
    }
}
