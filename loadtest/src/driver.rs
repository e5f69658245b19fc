//! Sending events: over HTTP (single or batch, keep-alive pool) or straight to NATS, in an open
//! model (a constant or ramping arrival rate; every event has an intended send time and its
//! latency is measured from it, so a stall counts for every event that should have been sent
//! during it) or a closed model (N users: send, wait for the answer, think, repeat).

use crate::{
    mix::{Class, Doom, Generated, Generator},
    retry::Retries,
    scenario::{DriverConfig, DriverKind, Load, Mix, WireEncoding},
    tracker::{INVALID, POISON, Run, histogram, record, tenant_flags},
};
use bus::{Bus, PublishOptions};
use hdrhistogram::Histogram;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use std::{
    sync::{Arc, atomic::AtomicU64, atomic::Ordering::Relaxed},
    time::Duration,
};

/// Where events go.
#[derive(Debug, Clone)]
pub enum Target {
    /// A gateway (or anything speaking its API) at `base_url`; `keys[k]` is tenant k's API key.
    Http {
        base_url: String,
        keys: Vec<String>,
    },
    Nats(Box<Bus>),
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
    auth: Vec<HeaderValue>,
    nats: Option<Bus>,
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
}

/// The gateway's answer to one accepted event.
#[derive(serde::Deserialize)]
struct Accepted {
    #[serde(default)]
    duplicate: bool,
}

/// One item's outcome: acked (`true` when the answer said `duplicate`), or the error's kind.
pub type SendResult = Result<bool, String>;

impl Driver {
    pub fn new(config: &DriverConfig, target: Target, pool: usize) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(pool)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .timeout(config.timeout)
            .build()?;
        let (single_url, batch_url, auth, nats) = match target {
            Target::Http { base_url, keys } => {
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
            auth,
            nats,
        })
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
    pub async fn send(&self, batch: &[Generated], results: &mut Vec<SendResult>) {
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

    async fn send_http(&self, generated: &Generated) -> SendResult {
        let (content_type, body) = match self.encoding {
            WireEncoding::Json => ("application/json", events::encode_json(&generated.event)),
            WireEncoding::Protobuf => (
                "application/x-protobuf",
                events::encode_proto(&generated.event),
            ),
        };
        let response = self
            .http
            .post(&self.single_url)
            .header(AUTHORIZATION, self.auth(generated.tenant))
            .header(CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .await
            .map_err(request_error)?;
        let status = response.status();
        // Read the body so the connection goes back to the pool.
        let body = response.bytes().await;
        if status.is_success() {
            Ok(body
                .ok()
                .and_then(|body| serde_json::from_slice::<Accepted>(&body).ok())
                .is_some_and(|answer| answer.duplicate))
        } else {
            Err(format!("http {}", status.as_u16()))
        }
    }

    async fn send_http_batch(&self, batch: &[Generated], results: &mut Vec<SendResult>) {
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
                .map_err(request_error)?;
            let status = response.status();
            if !status.is_success() {
                return Err(format!("http {}", status.as_u16()));
            }
            response
                .json::<BatchAnswer>()
                .await
                .map_err(|err| format!("batch answer: {err}"))
        }
        .await;
        match answer {
            Err(err) => results.extend(batch.iter().map(|_| Err(err.clone()))),
            Ok(answer) => {
                results.extend(
                    batch
                        .iter()
                        .map(|_| Err("no result for the item".to_owned())),
                );
                for item in answer.results {
                    if let Some(slot) = results.get_mut(item.index) {
                        *slot = if (200..300).contains(&item.status) {
                            Ok(item.duplicate.unwrap_or(false))
                        } else {
                            Err(format!("item {}", item.status))
                        };
                    }
                }
            }
        }
    }

    async fn send_nats(&self, generated: &Generated) -> SendResult {
        let Some(bus) = &self.nats else {
            return Err("no NATS target".into());
        };
        let subject = events::ingest_subject(&generated.event.tenant_id, generated.kind)
            .map_err(|err| err.to_string())?;
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
    indices: Vec<(u64, u64)>,
    results: Vec<SendResult>,
    acks: SharedAcks,
    pending: Vec<(Class, Duration)>,
}

impl Sender {
    fn new(context: &PhaseContext, phase: usize, task: u64, acks: &SharedAcks) -> Self {
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
            indices: Vec::with_capacity(context.events_per_send),
            results: Vec::with_capacity(context.events_per_send),
            acks: Arc::clone(acks),
            pending: Vec::with_capacity(ACK_BUFFER),
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
        self.indices.push((index, intended_ns));
        self.batch.push(generated);
    }

    /// Send the batch and account every item against its intended time.
    async fn send(&mut self) {
        let run = Arc::clone(&self.context.run);
        for &(index, intended) in &self.indices {
            run.mark_sent(index, intended);
        }
        self.context
            .driver
            .send(&self.batch, &mut self.results)
            .await;
        let now = run.now_ns();
        for ((generated, &(index, intended)), result) in
            self.batch.iter().zip(&self.indices).zip(&self.results)
        {
            match result {
                Ok(duplicate) => {
                    run.mark_acked(index, *duplicate);
                    if let Some(retries) = &self.context.retries
                        && !*duplicate
                    {
                        retries.offer(index, generated, now);
                    }
                    self.pending.push((
                        generated.class,
                        Duration::from_nanos(now.saturating_sub(intended)),
                    ));
                }
                Err(kind) => run.mark_error(index, intended, kind),
            }
        }
        self.batch.clear();
        self.indices.clear();
        if self.pending.len() >= ACK_BUFFER {
            self.flush();
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
    let acks: SharedAcks = Arc::new(std::sync::Mutex::new(std::array::from_fn(|_| histogram(3))));
    let mut tasks = tokio::task::JoinSet::new();
    match load {
        Load::Open { rate, to_rate } => {
            let count = open_count(rate, to_rate, duration);
            let next = Arc::new(AtomicU64::new(0));
            let per_send = context.events_per_send.max(1) as u64;
            for task in 0..context.connections.max(1) {
                let mut sender = Sender::new(context, phase, task as u64, &acks);
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
            let end_ns = start_ns + u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
            let per_send = context.events_per_send.max(1);
            let start_at = run.started + Duration::from_nanos(start_ns);
            for user in 0..users {
                let mut sender = Sender::new(context, phase, user as u64, &acks);
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
