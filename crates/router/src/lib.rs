//! The priority router: two durable consumers on CRM_INGEST read through the platform's consumer
//! runtime (`bus::run_worker`); each event is decoded, validated, classified (rules + customer
//! context) and republished to its lane, and the ingest message is acked only after the lane has
//! stored it. Invalid input is dead-lettered with reason `invalid_event`, never lost and never
//! blocking the stream. A lane that refuses writes (full, or unreachable) makes its events wait
//! in CRM_INGEST — redelivered with a backoff, never dead-lettered, never dropped — while events
//! bound for the other lanes go on.

mod rules;
mod signals;

pub use rules::{RulesHandle, watch_rules};

use bus::{
    Bus, BusError, BusErrorKind, CancellationToken, Handler, Outcome, Source, WaitPolicy,
    WorkerConfig, headers, jetstream,
};
use events::{DlqStage, Encoding, Event, EventType, Lane};
use futures::future::BoxFuture;
use signals::RouterSignals;
use std::{sync::Arc, time::Duration};

/// The consumer the router reads CRM_INGEST with: every subject, of which it routes all but the
/// express types.
pub const DURABLE: &str = "router";
/// The consumer of the express types ([`EventType::EXPRESS`]), read first.
pub const EXPRESS_DURABLE: &str = "router_express";
/// The consumer of the priority ingest stream, read by a worker of its own.
pub const PRIORITY_DURABLE: &str = "router_priority";
const INGEST_STREAM: &str = "CRM_INGEST";
const PRIORITY_STREAM: &str = bus::PRIORITY_INGEST_STREAM;
/// Source labels (metrics, health).
const PRIORITY_LABEL: &str = "priority";
const EXPRESS_LABEL: &str = "express";
const BULK_LABEL: &str = "bulk";

/// One pick in this many prefers the bulk consumer.
const BULK_SHARE_EVERY: u32 = 16;

/// Whether an ingest subject names an express type (the express consumer routes those).
fn is_express_subject(subject: &str) -> bool {
    events::tenant_and_type_tokens(subject)
        .and_then(|(_, kind)| EventType::from_name(kind))
        .is_some_and(EventType::is_express)
}

/// Customer context for high-value rules (tier, lifetime value), usually a cache over the store.
pub trait ContextLookup: Send + Sync + 'static {
    fn lookup<'a>(
        &'a self,
        tenant: &'a str,
        customer: &'a str,
    ) -> BoxFuture<'a, Result<Option<routing::CustomerContext>, String>>;
    fn invalidate<'a>(&'a self, tenant: &'a str, customer: &'a str) -> BoxFuture<'a, ()>;
}

/// Router settings (`[router]` in crm.toml).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// Routing rules file; the built-in rules apply when absent.
    pub rules_file: Option<std::path::PathBuf>,
    /// Events being routed at once (lane publishes in flight).
    pub max_in_flight: usize,
    /// Events routed together: their lane publishes are pipelined and their ingest acks sent
    /// together.
    pub max_batch: usize,
    /// The longest a lane that refuses writes (full, unreachable) makes an event wait between
    /// two attempts.
    #[serde(with = "humantime_serde")]
    pub lane_retry_max: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            rules_file: None,
            max_in_flight: 2048,
            max_batch: 256,
            lane_retry_max: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Bus(#[from] BusError),
}

struct Router {
    bus: Bus,
    rules: RulesHandle,
    context: Option<Arc<dyn ContextLookup>>,
    signals: Arc<RouterSignals>,
}

/// How the router consumes: the express consumer first, every `BULK_SHARE_EVERY`-th batch from
/// the bulk one, `max_in_flight` events in flight in batches of up to `max_batch`.
fn worker_config(config: &RouterConfig) -> WorkerConfig {
    let mut worker = WorkerConfig::with_sources(
        "router",
        vec![
            Source::new(INGEST_STREAM, EXPRESS_DURABLE, EXPRESS_LABEL),
            Source::new(INGEST_STREAM, DURABLE, BULK_LABEL),
        ],
        DlqStage::Router,
    );
    let max_batch = config.max_batch.max(1);
    worker.max_batch = max_batch;
    worker.concurrency = config.max_in_flight.max(1).div_ceil(max_batch);
    worker.pull_batch = config.max_in_flight.clamp(1, 1000);
    worker.lower_lane_share = 1.0 / f64::from(BULK_SHARE_EVERY);
    // A full lane holds up only the events bound for it: they go back to CRM_INGEST with a
    // delay, and the others are routed meanwhile.
    worker.wait_policy = WaitPolicy::Redeliver;
    worker.backoff_base = Duration::from_millis(250);
    worker.wait_max = config.lane_retry_max;
    // The projector's notices complete an event; the router's would only add traffic.
    worker.processed_notices = false;
    worker
}

/// How the router consumes the priority ingest stream: alone, on its own connection, in small
/// batches so that no event waits for a big batch's lane acks.
fn priority_worker_config(config: &RouterConfig) -> WorkerConfig {
    let mut worker = worker_config(config);
    worker.sources = vec![Source::new(
        PRIORITY_STREAM,
        PRIORITY_DURABLE,
        PRIORITY_LABEL,
    )];
    worker.max_batch = worker.max_batch.min(PRIORITY_MAX_BATCH);
    worker.concurrency = config.max_in_flight.max(1).div_ceil(worker.max_batch);
    worker.lower_lane_share = 0.0;
    // Many slots take small batches: what is buffered goes at once, the rest to the next slot.
    worker.fill_linger = Duration::ZERO;
    worker
}

/// Largest batch of the priority worker.
const PRIORITY_MAX_BATCH: usize = 32;

/// Run the router until `shutdown`: one worker reads the priority ingest stream over a
/// connection of its own (so its fetches and lane publishes never queue behind bulk traffic),
/// another reads CRM_INGEST (express types first). In-flight events are finished (their lane
/// publish awaited and the ingest message acked) before it returns. Both run on the current
/// runtime; [`run_placed`] puts the priority worker on a runtime of its own.
pub async fn run(
    bus: Bus,
    config: RouterConfig,
    rules: RulesHandle,
    context: Option<Arc<dyn ContextLookup>>,
    shutdown: CancellationToken,
) -> Result<(), RouterError> {
    let here = tokio::runtime::Handle::current();
    run_placed(bus, config, rules, context, &here, shutdown).await
}

/// [`run`], with the priority worker and its connection on `priority` (threads the bulk
/// worker's tasks never occupy).
pub async fn run_placed(
    bus: Bus,
    config: RouterConfig,
    rules: RulesHandle,
    context: Option<Arc<dyn ContextLookup>>,
    priority: &tokio::runtime::Handle,
    shutdown: CancellationToken,
) -> Result<(), RouterError> {
    let invalidations = context.as_ref().map(|context| {
        tokio::spawn(listen_for_invalidations(
            bus.clone(),
            context.clone(),
            shutdown.clone(),
        ))
    });
    let signals = Arc::new(RouterSignals::new());
    let router = Arc::new(Router {
        bus: bus.clone(),
        rules: rules.clone(),
        context: context.clone(),
        signals: signals.clone(),
    });
    // One worker failing stops the other: the router must not go on half alive unnoticed.
    let stop = shutdown.child_token();
    let watched = |result: Result<(), BusError>| {
        if result.is_err() {
            stop.cancel();
        }
        result
    };
    let priority_work = {
        let (bus, config, stop) = (bus.clone(), priority_worker_config(&config), stop.clone());
        async move {
            // Connected there, so that the connection's I/O task runs on the priority runtime.
            let priority_bus = bus.connect_another("priority").await?;
            let handler = Arc::new(Router {
                bus: priority_bus.clone(),
                rules,
                context,
                signals,
            });
            bus::run_worker(priority_bus, config, handler, stop).await
        }
    };
    let (priority, bulk) = tokio::join!(
        async {
            watched(bus::run_on(priority, "the router's priority worker", priority_work).await)
        },
        async { watched(bus::run_worker(bus, worker_config(&config), router, stop.clone()).await) },
    );
    if let Some(task) = invalidations {
        task.abort();
    }
    priority?;
    Ok(bulk?)
}

async fn listen_for_invalidations(
    bus: Bus,
    context: Arc<dyn ContextLookup>,
    shutdown: CancellationToken,
) {
    let subject = events::CUSTOMER_CHANGED_SUBJECT.to_owned();
    bus::control::follow(&bus, subject, "cache relies on TTL", shutdown, |message| {
        let context = context.clone();
        async move {
            if let Some((tenant, customer)) = std::str::from_utf8(&message.payload)
                .ok()
                .and_then(|text| text.split_once('\n'))
            {
                context.invalidate(tenant, customer).await;
            }
        }
    })
    .await;
}

/// An event decoded and classified, its lane publish not yet sent.
struct Routed {
    subject: String,
    lane: Lane,
    reason: String,
    payload: bytes::Bytes,
    headers: bus::HeaderMap,
    /// The routing decision's span (none while tracing is off), ended when the lane has acked.
    span: tracing::Span,
}

impl Handler for Router {
    async fn handle(&self, source: &'static str, batch: &[jetstream::Message]) -> Vec<Outcome> {
        // Decode and classify every event at once (context lookups overlap), then send every
        // lane publish before awaiting the first ack: one round trip for the batch.
        let classified =
            futures::future::join_all(batch.iter().map(|message| self.classify(source, message)))
                .await;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut sent = Vec::with_capacity(batch.len());
        for (index, routed) in classified.into_iter().enumerate() {
            match routed {
                Ok(Some(routed)) => {
                    match self
                        .bus
                        .send_with_headers(&routed.subject, routed.payload, routed.headers)
                        .await
                    {
                        Ok(ack) => sent.push((
                            index,
                            routed.subject,
                            routed.lane,
                            routed.reason,
                            ack,
                            routed.span,
                        )),
                        Err(err) => {
                            outcomes.push((index, lane_refused(&self.signals, routed.lane, &err)))
                        }
                    }
                }
                // The bulk consumer lets express types go: the express consumer routes them.
                Ok(None) => outcomes.push((index, Outcome::Done)),
                Err(error) => outcomes.push((index, Outcome::poison("invalid_event", error))),
            }
        }
        let acks = futures::future::join_all(sent.into_iter().map(
            |(index, subject, lane, reason, ack, _span)| async move {
                let outcome = match self.bus.await_ack(&subject, ack).await {
                    Ok(_) => {
                        self.signals.routed(lane, &reason);
                        Outcome::Done
                    }
                    Err(err) => lane_refused(&self.signals, lane, &err),
                };
                (index, outcome)
            },
        ))
        .await;
        outcomes.extend(acks);
        outcomes.sort_by_key(|(index, _)| *index);
        outcomes.into_iter().map(|(_, outcome)| outcome).collect()
    }
}

/// What a failed lane publish means for the event: it waits (the lane is full or unreachable:
/// retried later, never dead-lettered), unless the lane refuses this very message (too large
/// for it), which no retry can fix.
fn lane_refused(signals: &RouterSignals, lane: Lane, err: &BusError) -> Outcome {
    match err.kind() {
        BusErrorKind::Rejected => Outcome::poison("lane_rejected", err),
        kind => {
            signals.lane_refused(lane, kind_label(kind));
            Outcome::wait(err)
        }
    }
}

fn kind_label(kind: BusErrorKind) -> &'static str {
    match kind {
        BusErrorKind::Full => "full",
        BusErrorKind::Timeout => "timeout",
        _ => "unavailable",
    }
}

impl Router {
    /// Decode, validate and classify one ingest message: `Ok(None)` for an express type read by
    /// the bulk consumer, `Err` with the reason for an invalid event.
    async fn classify(
        &self,
        source: &'static str,
        message: &jetstream::Message,
    ) -> Result<Option<Routed>, String> {
        if source == BULK_LABEL && is_express_subject(&message.subject) {
            return Ok(None);
        }
        let (span, traceparent) = bus::trace::message_span("route", source, message);
        let (event, kind, encoding) = bus::decode_ingest(message)?;
        let rules = self.rules.current();
        let context = match (&self.context, rules.needs_customer_context(&event)) {
            (Some(lookup), true) => match lookup.lookup(&event.tenant_id, &event.customer_id).await
            {
                Ok(context) => context,
                Err(error) => {
                    // Routing must not stop when the store does: route on the event alone.
                    tracing::warn!(error, "customer context lookup failed; routing without it");
                    None
                }
            },
            _ => None,
        };
        let decision = rules.classify(&event, context.as_ref());
        span.record("lane", decision.lane.as_str());
        let routed = self
            .lane_message(
                message,
                &event,
                kind,
                encoding,
                (decision.lane, &decision.reason),
                traceparent.as_deref(),
            )
            .map_err(|err| err.to_string())?;
        Ok(Some(Routed {
            lane: decision.lane,
            reason: decision.reason,
            span,
            ..routed
        }))
    }

    /// The lane message of `event`: lane subject, protobuf payload, and headers (a dedupe id
    /// per ingest message, the event id, the route reason, trace context and ingest time).
    fn lane_message(
        &self,
        message: &jetstream::Message,
        event: &Event,
        kind: EventType,
        encoding: Encoding,
        (lane, reason): (Lane, &str),
        traceparent: Option<&str>,
    ) -> Result<Routed, BusError> {
        let subject = events::lane_subject(lane, &event.tenant_id, kind)
            .map_err(|err| BusError::with_source(BusErrorKind::Rejected, "lane subject", err))?;
        let info = message.info().map_err(|err| {
            BusError::with_source(BusErrorKind::Rejected, "ingest message info", err)
        })?;
        let original = message.headers.as_ref();
        let mut lane_headers = bus::HeaderMap::new();
        let msg_id = if message.subject.starts_with("crm.priority.") {
            events::priority_lane_msg_id(info.stream_sequence)
        } else {
            events::lane_msg_id(info.stream_sequence)
        };
        lane_headers.insert(headers::MSG_ID, msg_id.as_str());
        lane_headers.insert(headers::EVENT_ID, event.event_id.as_str());
        lane_headers.insert(headers::ROUTE_REASON, reason);
        if let Some(value) = traceparent {
            lane_headers.insert(headers::TRACEPARENT, value);
        }
        match headers::get(original, headers::INGESTED_AT) {
            Some(value) => lane_headers.insert(headers::INGESTED_AT, value),
            // Published straight to NATS without the header: the stream's timestamp is when it
            // entered the platform.
            None => {
                let nanos = info.published.unix_timestamp_nanos().to_string();
                lane_headers.insert(headers::INGESTED_AT, nanos.as_str());
            }
        }
        // Lanes always carry protobuf: the producer's bytes when it sent protobuf, else re-encoded.
        let payload = match encoding {
            Encoding::Protobuf => message.payload.clone(),
            Encoding::Json => bytes::Bytes::from(events::encode_proto(event)),
        };
        Ok(Routed {
            subject,
            lane,
            reason: reason.to_owned(),
            payload,
            headers: lane_headers,
            span: tracing::Span::none(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_express_consumer_filters_exactly_the_express_types() {
        let definitions = bus::Definitions::embedded().expect("definitions");
        let express = definitions
            .consumers
            .iter()
            .find(|c| c.stream == "CRM_INGEST" && c.durable == EXPRESS_DURABLE)
            .expect("router_express is defined");
        let mut filtered: Vec<String> = express.config["filter_subjects"]
            .as_array()
            .expect("filter_subjects")
            .iter()
            .map(|v| v.as_str().expect("a subject").to_owned())
            .collect();
        filtered.sort();
        let mut expected: Vec<String> = EventType::EXPRESS
            .iter()
            .map(|kind| format!("crm.ingest.*.{kind}"))
            .collect();
        expected.sort();
        assert_eq!(filtered, expected);
        assert!(is_express_subject("crm.ingest.acme.payment_failed"));
        assert!(!is_express_subject("crm.ingest.acme.page_viewed"));
        assert!(!is_express_subject("crm.ingest.acme.shoe_bought"));
        assert!(!is_express_subject("crm.ingest.acme"));
    }
}
