//! Sending events: over HTTP (single or batch, keep-alive pool) or straight to NATS, in an open
//! model (a constant or ramping arrival rate; every event has an intended send time and its
//! latency is measured from it, so a stall counts for every event that should have been sent
//! during it) or a closed model (N users: send, wait for the answer, think, repeat).
//!
//! An event the platform refuses with `Retry-After` (503/429: shed, never stored) is sent again
//! with the same id after the delay, a bounded number of times and never past its phase; over
//! NATS, critical and high events go to the priority ingest subject and bulk is paced to the
//! admission signal's rate (see [`crate::admission`] and [`crate::retry`]).

use crate::{
    admission::{self, SharedPacer},
    client_retry::Retries,
    mix::{Class, Doom, Generated, Generator},
    retry::{HeldBack, Pending},
    scenario::{DriverConfig, DriverKind, Load, Mix, WireEncoding},
    tracker::{INVALID, POISON, Run, histogram, record, tenant_flags},
};
use bus::{Bus, PublishOptions};
use hdrhistogram::Histogram;
use reqwest::{
    StatusCode,
    header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER},
};
use std::{
    sync::{Arc, atomic::AtomicU64, atomic::Ordering::Relaxed},
    time::Duration,
};

/// Where events go.
#[derive(Debug, Clone)]
pub enum Target {
    /// A gateway (or anything speaking its API) at `base_url`, with its priority door at
    /// `priority_url` if it has one; `keys[k]` is tenant k's API key.
    Http {
        base_url: String,
        priority_url: Option<String>,
        keys: Vec<String>,
    },
    Nats(Box<Bus>),
}

/// What the platform answered for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx or PubAck: stored; `duplicate` when the answer said the stream already held the
    /// event's key (nothing new was stored).
    Acked { duplicate: bool },
    /// 503 or 429 with `Retry-After`: refused before it was stored; send it again (same id)
    /// after `retry_after`. `kind` is the problem type's last segment (e.g. `overloaded`).
    Shed { retry_after: Duration, kind: String },
    /// Anything else: an error (the event may or may not be stored).
    Failed(String),
}

/// The delay for a refused batch item when the answer carries no `Retry-After`.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// One send of an event: which event, when it was meant to go, and which attempt this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    pub index: u64,
    pub intended_ns: u64,
    /// 1 for the first send.
    pub number: u32,
}

/// Sends events to a target; cheap to share.
#[derive(Debug)]
pub struct Driver {
    kind: DriverKind,
    encoding: WireEncoding,
    timeout: Duration,
    http: reqwest::Client,
    single_url: String,
    batch_url: String,
    /// HTTP: critical and high single events to the gateway's priority door, over connections
    /// of their own (their requests never wait behind bulk ones on a connection).
    priority_http: Option<(reqwest::Client, String)>,
    auth: Vec<HeaderValue>,
    nats: Option<Bus>,
    /// NATS: critical and high to `crm.priority.…`.
    priority_subjects: bool,
    /// NATS: the connection of the priority subjects, as README asks of NATS-native producers
    /// (their PubAcks never wait behind bulk ones on one socket); `None`: the main one.
    priority_nats: Option<Bus>,
    /// Sends of one event at most (the first included).
    max_attempts: u32,
    /// NATS: bulk paced to the admission signal.
    pacer: Option<SharedPacer>,
}

#[derive(serde::Deserialize)]
struct BatchAnswer {
    results: Vec<BatchItem>,
}

#[derive(serde::Deserialize)]
struct BatchItem {
    index: usize,
    status: u16,
    #[serde(default)]
    duplicate: Option<bool>,
    /// A refused item's own wait, ms.
    #[serde(default)]
    retry_after_ms: Option<u64>,
}

/// The gateway's answer to one accepted event.
#[derive(serde::Deserialize)]
struct Accepted {
    #[serde(default)]
    duplicate: bool,
}

impl Driver {
    /// The NATS connection of a NATS driver.
    pub fn nats_bus(&self) -> Option<&Bus> {
        self.nats.as_ref()
    }

    pub fn new(config: &DriverConfig, target: Target, pool: usize) -> anyhow::Result<Self> {
        let client = || {
            reqwest::Client::builder()
                .pool_max_idle_per_host(pool)
                .pool_idle_timeout(Duration::from_secs(90))
                .tcp_nodelay(true)
                .timeout(config.timeout)
                .build()
        };
        let http = client()?;
        let mut priority_http = None;
        let (single_url, batch_url, auth, nats) = match target {
            Target::Http {
                base_url,
                priority_url,
                keys,
            } => {
                if let Some(url) = priority_url.filter(|_| config.priority_subjects) {
                    let url = format!("{}/v1/events", url.trim_end_matches('/'));
                    priority_http = Some((client()?, url));
                }
                let base = base_url.trim_end_matches('/');
                let auth = keys
                    .iter()
                    .map(|key| HeaderValue::from_str(&format!("Bearer {key}")))
                    .collect::<Result<Vec<_>, _>>()?;
                anyhow::ensure!(!auth.is_empty(), "an HTTP target needs an API key");
                (
                    format!("{base}/v1/events"),
                    format!("{base}/v1/events:batch"),
                    auth,
                    None,
                )
            }
            Target::Nats(bus) => (String::new(), String::new(), Vec::new(), Some(*bus)),
        };
        anyhow::ensure!(
            config.kind == DriverKind::Nats || nats.is_none(),
            "driver {} needs an HTTP target",
            config.kind.as_str()
        );
        anyhow::ensure!(
            config.kind != DriverKind::Nats || nats.is_some(),
            "driver nats needs a NATS target"
        );
        Ok(Self {
            kind: config.kind,
            encoding: config.encoding,
            timeout: config.timeout,
            http,
            single_url,
            batch_url,
            priority_http,
            auth,
            nats,
            priority_subjects: config.priority_subjects,
            priority_nats: None,
            max_attempts: config.max_attempts.max(1),
            pacer: None,
        })
    }

    /// Pace NATS bulk publishes with `pacer` (fed by the admission signal); a no-op for HTTP
    /// drivers and when the scenario turned `bulk_pacing` off.
    pub fn with_pacer(mut self, pacer: SharedPacer, config: &DriverConfig) -> Self {
        if self.kind == DriverKind::Nats && config.bulk_pacing {
            self.pacer = Some(pacer);
        }
        self
    }

    /// NATS with priority subjects: publish critical and high events over a connection of their
    /// own, as a well-behaved NATS-native producer does.
    pub async fn with_priority_connection(mut self) -> anyhow::Result<Self> {
        // `nats` is set exactly for the NATS driver (checked in `new`).
        if self.priority_subjects
            && let Some(bus) = &self.nats
        {
            self.priority_nats = Some(bus.connect_another("load-priority").await?);
        }
        Ok(self)
    }

    pub const fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    pub fn pacer(&self) -> Option<SharedPacer> {
        self.pacer.clone()
    }

    /// Whether a `class` event waits for the bulk pacer.
    pub fn paces(&self, class: Class) -> bool {
        self.pacer.is_some() && !admission::is_priority(class)
    }

    /// Events per request.
    pub fn events_per_send(&self, config: &DriverConfig) -> usize {
        match self.kind {
            DriverKind::HttpBatch => config.batch_size,
            DriverKind::Http | DriverKind::Nats => 1,
        }
    }

    fn auth(&self, tenant: u64) -> HeaderValue {
        let index = usize::try_from(tenant).unwrap_or(0) % self.auth.len().max(1);
        self.auth
            .get(index)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static(""))
    }

    /// Send `batch` (one event unless the driver batches); `results[k]` is item k's outcome.
    pub async fn send(&self, batch: &[Generated], results: &mut Vec<Outcome>) {
        results.clear();
        match self.kind {
            DriverKind::Http => {
                for generated in batch {
                    results.push(self.send_http(generated).await);
                }
            }
            DriverKind::HttpBatch => self.send_http_batch(batch, results).await,
            DriverKind::Nats => {
                for generated in batch {
                    results.push(self.send_nats(generated).await);
                }
            }
        }
    }

    async fn send_http(&self, generated: &Generated) -> Outcome {
        let (content_type, body) = match self.encoding {
            WireEncoding::Json => ("application/json", events::encode_json(&generated.event)),
            WireEncoding::Protobuf => (
                "application/x-protobuf",
                events::encode_proto(&generated.event),
            ),
        };
        let (http, url) = match &self.priority_http {
            Some((http, url)) if admission::is_priority(generated.class) => (http, url),
            _ => (&self.http, &self.single_url),
        };
        let response = match http
            .post(url)
            .header(AUTHORIZATION, self.auth(generated.tenant))
            .header(CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .await
        {
            Ok(response) => response,
            Err(err) => return Outcome::Failed(request_error(err)),
        };
        let status = response.status();
        let retry_after = retry_after(response.headers());
        // Read the body so the connection goes back to the pool (and a refusal says why).
        let body = response.bytes().await.unwrap_or_default();
        answer_outcome(status, retry_after, &body)
    }

    async fn send_http_batch(&self, batch: &[Generated], results: &mut Vec<Outcome>) {
        let Some(first) = batch.first() else {
            return;
        };
        let mut body = Vec::with_capacity(batch.len() * 400 + 16);
        body.extend_from_slice(b"{\"events\":[");
        for (k, generated) in batch.iter().enumerate() {
            if k > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&events::encode_json(&generated.event));
        }
        body.extend_from_slice(b"]}");
        // The sender fills a batch with one tenant's events: one API key for all.
        let answer = async {
            let response = self
                .http
                .post(&self.batch_url)
                .header(AUTHORIZATION, self.auth(first.tenant))
                .header(CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await
                .map_err(|err| Outcome::Failed(request_error(err)))?;
            let status = response.status();
            let retry_after = retry_after(response.headers());
            if !status.is_success() {
                let body = response.bytes().await.unwrap_or_default();
                return Err(answer_outcome(status, retry_after, &body));
            }
            let answer = response
                .json::<BatchAnswer>()
                .await
                .map_err(|err| Outcome::Failed(format!("batch answer: {err}")))?;
            Ok((answer, retry_after))
        }
        .await;
        match answer {
            Err(outcome) => results.extend(batch.iter().map(|_| outcome.clone())),
            Ok((answer, retry_after)) => {
                results.extend(
                    batch
                        .iter()
                        .map(|_| Outcome::Failed("no result for the item".to_owned())),
                );
                for item in answer.results {
                    if let Some(slot) = results.get_mut(item.index) {
                        let retry_after = item
                            .retry_after_ms
                            .map(Duration::from_millis)
                            .or(retry_after);
                        *slot =
                            item_outcome(item.status, retry_after, item.duplicate.unwrap_or(false));
                    }
                }
            }
        }
    }

    async fn send_nats(&self, generated: &Generated) -> Outcome {
        match self.publish(generated).await {
            Ok(duplicate) => Outcome::Acked { duplicate },
            Err(kind) => Outcome::Failed(kind),
        }
    }

    /// Publish and wait for the PubAck; whether it said `duplicate`.
    async fn publish(&self, generated: &Generated) -> Result<bool, String> {
        let Some(bus) = &self.nats else {
            return Err("no NATS target".into());
        };
        let tenant = &generated.event.tenant_id;
        let priority = self.priority_subjects && admission::is_priority(generated.class);
        let subject = if priority {
            admission::priority_subject(tenant, generated.kind)
        } else {
            events::ingest_subject(tenant, generated.kind)
        }
        .map_err(|err| err.to_string())?;
        let bus = match &self.priority_nats {
            Some(priority_bus) if priority => priority_bus,
            _ => bus,
        };
        let payload = events::encode_proto(&generated.event).into();
        // What the gateway sets: `<tenant>:<idempotency key or event id>`.
        let options = PublishOptions::with_msg_id(events::ingest_msg_id(&generated.event))
            .header(bus::headers::EVENT_ID, &generated.event.event_id);
        let ack = bus
            .send(&subject, payload, &options)
            .await
            .map_err(|err| format!("nats {:?}", err.kind()))?;
        match tokio::time::timeout(self.timeout, bus.await_ack(&subject, ack)).await {
            Err(_) => Err("timeout".into()),
            Ok(Err(err)) => Err(format!("nats {:?}", err.kind())),
            Ok(Ok(published)) => Ok(published.duplicate),
        }
    }
}

/// How long the answer asks the client to wait: the gateway's exact `Retry-After-Ms` when
/// there is one, else a `Retry-After` in delay-seconds.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let header = |name| headers.get(name).and_then(|value| value.to_str().ok());
    header(admission::RETRY_AFTER_MS)
        .and_then(admission::parse_retry_after_ms)
        .or_else(|| header(RETRY_AFTER.as_str()).and_then(admission::parse_retry_after))
}

/// The platform is asking for the event later rather than failing it.
fn is_refusal(status: u16) -> bool {
    status == StatusCode::SERVICE_UNAVAILABLE.as_u16()
        || status == StatusCode::TOO_MANY_REQUESTS.as_u16()
}

/// A whole answer: 2xx acked (a duplicate when the body says `duplicate: true`); 503/429 with
/// `Retry-After` shed (the problem type says why); anything else failed.
pub fn answer_outcome(status: StatusCode, retry_after: Option<Duration>, body: &[u8]) -> Outcome {
    if status.is_success() {
        return Outcome::Acked {
            duplicate: serde_json::from_slice::<Accepted>(body)
                .is_ok_and(|answer| answer.duplicate),
        };
    }
    match retry_after {
        Some(retry_after) if is_refusal(status.as_u16()) => Outcome::Shed {
            retry_after,
            kind: admission::problem_kind(body)
                .unwrap_or_else(|| format!("http {}", status.as_u16())),
        },
        _ => Outcome::Failed(format!("http {}", status.as_u16())),
    }
}

/// A batch item: 2xx acked (`duplicate` as the item said); 503/429 is shed after the answer's
/// `Retry-After` (or [`DEFAULT_RETRY_AFTER`]: an item has no headers of its own).
pub fn item_outcome(status: u16, retry_after: Option<Duration>, duplicate: bool) -> Outcome {
    if (200..300).contains(&status) {
        Outcome::Acked { duplicate }
    } else if is_refusal(status) {
        Outcome::Shed {
            retry_after: retry_after.unwrap_or(DEFAULT_RETRY_AFTER),
            kind: format!("item {status}"),
        }
    } else {
        Outcome::Failed(format!("item {status}"))
    }
}

/// How an answer settles an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Acked after this long from its intended send time.
    Acked(Duration),
    /// Refused: it may go again after this delay.
    Refused(Duration),
    Failed,
}

/// Account one answer to `attempt`, received at `now_ns`.
pub fn settle(run: &Run, attempt: &Attempt, outcome: Outcome, now_ns: u64) -> Settled {
    match outcome {
        Outcome::Acked { duplicate } => {
            run.mark_acked(attempt.index, duplicate);
            Settled::Acked(Duration::from_nanos(
                now_ns.saturating_sub(attempt.intended_ns),
            ))
        }
        Outcome::Shed { retry_after, kind } => {
            run.mark_refused(attempt.index, &kind);
            Settled::Refused(retry_after)
        }
        Outcome::Failed(kind) => {
            run.mark_error(attempt.index, attempt.intended_ns, &kind);
            Settled::Failed
        }
    }
}

fn request_error(err: reqwest::Error) -> String {
    if err.is_timeout() {
        "timeout".into()
    } else if err.is_connect() {
        "connect".into()
    } else {
        "request".into()
    }
}

/// When event `j` of an open phase is due, ns after the phase starts: the rate goes linearly
/// from `rate` to `to_rate` over `duration`, so events due by t are ∫ rate = r0·t + (r1−r0)·t²/2D.
pub fn open_schedule_ns(j: u64, rate: f64, to_rate: f64, duration: Duration) -> u64 {
    let j = j as f64;
    let d = duration.as_secs_f64();
    let a = (to_rate - rate) / (2.0 * d);
    let t = if a.abs() < 1e-12 {
        j / rate
    } else {
        (-rate + (rate * rate + 4.0 * a * j).max(0.0).sqrt()) / (2.0 * a)
    };
    (t * 1e9) as u64
}

/// Events an open phase sends.
pub fn open_count(rate: f64, to_rate: f64, duration: Duration) -> u64 {
    ((rate + to_rate) / 2.0 * duration.as_secs_f64()).round() as u64
}

/// Everything a phase's sender tasks share.
#[derive(Debug, Clone)]
pub struct PhaseContext {
    pub run: Arc<Run>,
    pub driver: Arc<Driver>,
    pub mix: Mix,
    /// The tenants events are written for (see [`Generator::new`]).
    pub tenant_names: Arc<[String]>,
    pub seed: u64,
    pub events_per_send: usize,
    /// Open model: senders (requests in flight at most).
    pub connections: usize,
    /// Client retries to schedule as events are acked (`[[retry]]`).
    pub retries: Option<Arc<Retries>>,
}

/// What the senders of a phase measured: the answer's latency per class (from the intended
/// send time), and when the phase ran.
#[derive(Debug)]
pub struct PhaseSent {
    pub ack: [Histogram<u64>; 4],
    pub start_ns: u64,
    pub end_ns: u64,
}

impl PhaseSent {
    fn new() -> Self {
        Self {
            ack: std::array::from_fn(|_| histogram(3)),
            start_ns: 0,
            end_ns: 0,
        }
    }
}

/// Ack latencies (class, µs) a sender keeps before it takes the phase's lock to record them: a
/// histogram per sender would cost ~750 KiB each (1,000 users: 750 MiB), a lock per event would
/// serialize the senders.
const ACK_BUFFER: usize = 256;

type SharedAcks = Arc<std::sync::Mutex<[Histogram<u64>; 4]>>;

/// One sender's loop state: its own generator, batch and result buffers.
struct Sender {
    context: PhaseContext,
    phase: usize,
    generator: Generator,
    batch: Vec<Generated>,
    attempts: Vec<Attempt>,
    results: Vec<Outcome>,
    acks: SharedAcks,
    pending: Vec<(Class, Duration)>,
    held: Arc<HeldBack>,
    /// Closed model: the sender itself waits out refusals and the pacer (a user is blocked
    /// anyway); open model: it hands them to the phase's dispatcher and goes on.
    inline: bool,
    /// Closed model: refused events of the last send and the delay each asked for.
    refused: Vec<(Pending, Duration)>,
}

impl Sender {
    fn new(
        context: &PhaseContext,
        phase: usize,
        task: u64,
        acks: &SharedAcks,
        held: &Arc<HeldBack>,
        inline: bool,
    ) -> Self {
        let seed = context.seed ^ ((phase as u64) << 40) ^ task.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Self {
            generator: Generator::new(
                &context.mix,
                &context.tenant_names,
                context.run.run_tag,
                seed,
            ),
            context: context.clone(),
            phase,
            batch: Vec::with_capacity(context.events_per_send),
            attempts: Vec::with_capacity(context.events_per_send),
            results: Vec::with_capacity(context.events_per_send),
            acks: Arc::clone(acks),
            pending: Vec::with_capacity(ACK_BUFFER),
            held: Arc::clone(held),
            inline,
            refused: Vec::new(),
        }
    }

    /// Record the buffered ack latencies into the phase's histograms.
    fn flush(&mut self) {
        let mut acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
        for (class, latency) in self.pending.drain(..) {
            record(&mut acks[class as usize], latency);
        }
    }

    /// Generate an event due at `intended_ns` into the batch.
    fn generate(&mut self, intended_ns: u64) {
        let run = &self.context.run;
        let index = run.next_index();
        // A batch goes out under one API key: every event of it is the first one's tenant's.
        let tenant = self.batch.first().map(|first| first.tenant);
        let id_millis = (run.started_unix_ns + intended_ns) / 1_000_000;
        let generated = self.generator.next_for(index, tenant, id_millis);
        run.slots
            .generate(index, intended_ns, generated.class, self.phase);
        run.slots.mark(index, tenant_flags(generated.tenant));
        match generated.doom {
            Some(Doom::Invalid) => run.slots.mark(index, INVALID),
            Some(Doom::Poison) => run.slots.mark(index, POISON),
            None => {}
        }
        self.attempts.push(Attempt {
            index,
            intended_ns,
            number: 1,
        });
        self.batch.push(generated);
    }

    /// Bulk events the admission signal holds back leave the batch: deferred to the dispatcher
    /// (open model), or waited for here (closed model); shed when the phase ends first.
    async fn pace(&mut self) {
        let driver = Arc::clone(&self.context.driver);
        if !self.batch.iter().any(|g| driver.paces(g.class)) {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        let attempts = std::mem::take(&mut self.attempts);
        for (generated, attempt) in batch.into_iter().zip(attempts) {
            let pending = Pending { generated, attempt };
            let admitted = if !driver.paces(pending.generated.class) {
                Some(pending)
            } else if self.inline {
                self.wait_for_pacer(pending).await
            } else {
                let now = self.context.run.now_ns();
                self.held.admit(&self.context.run, pending, now)
            };
            if let Some(pending) = admitted {
                self.batch.push(pending.generated);
                self.attempts.push(pending.attempt);
            }
        }
    }

    /// Closed model: wait until the pacer lets `pending` go, or give it up at the deadline.
    async fn wait_for_pacer(&self, pending: Pending) -> Option<Pending> {
        let run = &self.context.run;
        let pacer = self.context.driver.pacer()?;
        loop {
            let now = run.now_ns();
            let allowed = pacer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .try_acquire(now);
            let wait = match allowed {
                Ok(()) => return Some(pending),
                Err(wait) => wait,
            };
            run.mark_deferred(pending.attempt.index);
            if now.saturating_add(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX))
                >= self.held.deadline_ns()
            {
                return None;
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Send the batch and account every item against its intended time.
    async fn send(&mut self) {
        self.pace().await;
        if self.batch.is_empty() {
            return;
        }
        let run = Arc::clone(&self.context.run);
        for attempt in &self.attempts {
            run.mark_sent(attempt.index, attempt.intended_ns);
        }
        self.context
            .driver
            .send(&self.batch, &mut self.results)
            .await;
        let now = run.now_ns();
        for ((generated, mut attempt), outcome) in self
            .batch
            .drain(..)
            .zip(self.attempts.drain(..))
            .zip(self.results.drain(..))
        {
            // Only an event the stream took as new gets a client retry (`[[retry]]`).
            let stored = outcome == (Outcome::Acked { duplicate: false });
            match settle(&run, &attempt, outcome, now) {
                Settled::Acked(latency) => {
                    if stored && let Some(retries) = &self.context.retries {
                        retries.offer(attempt.index, &generated, now);
                    }
                    self.pending.push((generated.class, latency));
                }
                Settled::Failed => {}
                Settled::Refused(retry_after) => {
                    attempt.number += 1;
                    let pending = Pending { generated, attempt };
                    if self.inline {
                        self.refused.push((pending, retry_after));
                    } else {
                        self.held.retry_later(pending, retry_after, now);
                    }
                }
            }
        }
        if self.pending.len() >= ACK_BUFFER {
            self.flush();
        }
    }

    /// Closed model: send refused events again once their delay has passed, while attempts
    /// and the phase last (the user waits, as a client honouring `Retry-After` would).
    async fn retry_refused(&mut self) {
        while !self.refused.is_empty() {
            let now = self.context.run.now_ns();
            let delay = self
                .refused
                .iter()
                .map(|(_, retry_after)| *retry_after)
                .max()
                .unwrap_or_default();
            let again: Vec<Pending> = std::mem::take(&mut self.refused)
                .into_iter()
                .filter(|(pending, _)| self.held.retry_at(&pending.attempt, delay, now).is_some())
                .map(|(pending, _)| pending)
                .collect();
            if again.is_empty() {
                return;
            }
            tokio::time::sleep(delay).await;
            for pending in again {
                self.batch.push(pending.generated);
                self.attempts.push(pending.attempt);
            }
            self.send().await;
        }
    }
}

/// Run one phase from `start_ns` (after the run's start) for `duration`.
pub async fn run_phase(
    context: &PhaseContext,
    phase: usize,
    load: Load,
    start_ns: u64,
    duration: Duration,
) -> PhaseSent {
    let run = &context.run;
    let mut total = PhaseSent::new();
    total.start_ns = start_ns;
    let acks: SharedAcks = crate::retry::shared_acks();
    let end_ns = start_ns.saturating_add(u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX));
    // Refused and deferred events are sent again until the phase's end at the latest.
    let held = Arc::new(
        HeldBack::new(
            end_ns,
            context.driver.max_attempts(),
            context.driver.pacer(),
        )
        .with_client_retries(context.retries.clone()),
    );
    let mut dispatcher = None;
    let mut tasks = tokio::task::JoinSet::new();
    match load {
        Load::Open { rate, to_rate } => {
            dispatcher = Some(tokio::spawn(Arc::clone(&held).dispatch(
                Arc::clone(run),
                Arc::clone(&context.driver),
                Arc::clone(&acks),
                context.connections,
            )));
            let count = open_count(rate, to_rate, duration);
            let next = Arc::new(AtomicU64::new(0));
            let per_send = context.events_per_send.max(1) as u64;
            for task in 0..context.connections.max(1) {
                let mut sender = Sender::new(context, phase, task as u64, &acks, &held, false);
                let next = Arc::clone(&next);
                tasks.spawn(async move {
                    loop {
                        let first = next.fetch_add(per_send, Relaxed);
                        if first >= count {
                            break;
                        }
                        let last = (first + per_send).min(count);
                        let mut due = start_ns;
                        for j in first..last {
                            due = start_ns + open_schedule_ns(j, rate, to_rate, duration);
                            sender.generate(due);
                        }
                        // A batch leaves when its last event is due; each keeps its own time.
                        let at = sender.context.run.started + Duration::from_nanos(due);
                        tokio::time::sleep_until(at.into()).await;
                        sender.send().await;
                    }
                    sender.flush();
                });
            }
        }
        Load::Closed { users, think } => {
            let per_send = context.events_per_send.max(1);
            let start_at = run.started + Duration::from_nanos(start_ns);
            for user in 0..users {
                let mut sender = Sender::new(context, phase, user as u64, &acks, &held, true);
                tasks.spawn(async move {
                    tokio::time::sleep_until(start_at.into()).await;
                    loop {
                        let now = sender.context.run.now_ns();
                        if now >= end_ns {
                            break;
                        }
                        for _ in 0..per_send {
                            sender.generate(now);
                        }
                        sender.send().await;
                        sender.retry_refused().await;
                        if !think.is_zero() {
                            tokio::time::sleep(think).await;
                        }
                    }
                    sender.flush();
                });
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    held.fresh_done();
    if let Some(dispatcher) = dispatcher {
        let _ = dispatcher.await;
    }
    total.ack = std::mem::replace(
        &mut *acks.lock().unwrap_or_else(|e| e.into_inner()),
        std::array::from_fn(|_| histogram(1)),
    );
    total.end_ns = run.now_ns();
    total
}

/// The classes in report order.
pub const CLASSES: [Class; 4] = Class::ALL;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_says_whether_it_was_a_duplicate_and_a_refusal_is_shed() {
        let ok = StatusCode::ACCEPTED;
        assert_eq!(
            answer_outcome(ok, None, br#"{"event_id":"e","duplicate":true}"#),
            Outcome::Acked { duplicate: true }
        );
        assert_eq!(
            answer_outcome(ok, None, b"{}"),
            Outcome::Acked { duplicate: false }
        );
        assert_eq!(
            item_outcome(202, None, true),
            Outcome::Acked { duplicate: true }
        );
        assert!(matches!(
            item_outcome(503, None, false),
            Outcome::Shed { retry_after, .. } if retry_after == DEFAULT_RETRY_AFTER
        ));
        assert_eq!(
            item_outcome(400, None, false),
            Outcome::Failed("item 400".into())
        );
    }

    #[test]
    fn the_exact_retry_after_ms_wins_over_whole_seconds() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert(admission::RETRY_AFTER_MS, HeaderValue::from_static("1250"));
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(1250)));
        headers.insert(admission::RETRY_AFTER_MS, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
    }

    #[test]
    fn a_constant_rate_spaces_events_evenly() {
        let d = Duration::from_secs(10);
        assert_eq!(open_count(100.0, 100.0, d), 1000);
        assert_eq!(open_schedule_ns(0, 100.0, 100.0, d), 0);
        assert_eq!(open_schedule_ns(150, 100.0, 100.0, d), 1_500_000_000);
    }

    #[test]
    fn a_ramp_sends_the_integral_and_ends_on_time() {
        let d = Duration::from_secs(10);
        // 100/s → 300/s: 2000 events; half the time passes after ~(100·5 + 100·25/10) = 750.
        assert_eq!(open_count(100.0, 300.0, d), 2000);
        let at = |j| open_schedule_ns(j, 100.0, 300.0, d) as f64 / 1e9;
        assert!((at(750) - 5.0).abs() < 0.01, "{}", at(750));
        assert!((at(2000) - 10.0).abs() < 0.01, "{}", at(2000));
        // Going down works too.
        let down = |j| open_schedule_ns(j, 300.0, 100.0, d) as f64 / 1e9;
        assert!((down(2000) - 10.0).abs() < 0.01, "{}", down(2000));
        assert!(down(1) < at(1));
    }
}
