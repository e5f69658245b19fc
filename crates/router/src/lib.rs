//! The priority router: a durable consumer on CRM_INGEST that decodes and validates each event,
//! classifies it (rules + customer context) and republishes it to its lane with the same
//! `Nats-Msg-Id`, acking the ingest message only after the lane has stored it. Invalid input is
//! dead-lettered with reason `invalid_event`, never lost and never blocking the stream.

mod rules;

pub use rules::{RulesHandle, watch_rules};

use bus::{
    Bus, BusError, BusErrorKind, CancellationToken, DeadLetter, headers,
    jetstream::{self, AckKind, consumer::pull},
};
use events::{DlqStage, Encoding, Event, EventType, Lane};
use futures::{StreamExt, future::BoxFuture, stream::FuturesUnordered};
use std::{sync::Arc, time::Duration};

/// The consumer the router reads CRM_INGEST with.
pub const DURABLE: &str = "router";

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
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            rules_file: None,
            max_in_flight: 2048,
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
}

/// Run the router until `shutdown`; in-flight events are finished (their lane publish awaited
/// and the ingest message acked) before it returns.
pub async fn run(
    bus: Bus,
    config: RouterConfig,
    rules: RulesHandle,
    context: Option<Arc<dyn ContextLookup>>,
    shutdown: CancellationToken,
) -> Result<(), RouterError> {
    let consumer: jetstream::consumer::Consumer<pull::Config> = bus
        .jetstream()
        .get_consumer_from_stream(DURABLE, "CRM_INGEST")
        .await
        .map_err(|err| BusError::with_source(BusErrorKind::Unavailable, "router consumer", err))?;
    let batch = config.max_in_flight.clamp(1, 1000);
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(batch)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|err| BusError::with_source(BusErrorKind::Unavailable, "router pull", err))?;

    let invalidations = context.as_ref().map(|context| {
        tokio::spawn(listen_for_invalidations(
            bus.clone(),
            context.clone(),
            shutdown.clone(),
        ))
    });
    let router = Arc::new(Router {
        bus,
        rules,
        context,
    });
    let mut in_flight = FuturesUnordered::new();
    tracing::info!("router started");
    loop {
        if in_flight.len() >= config.max_in_flight {
            in_flight.next().await;
            continue;
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            next = messages.next() => match next {
                Some(Ok(message)) => {
                    let router = router.clone();
                    in_flight.push(async move { router.route(message).await });
                }
                Some(Err(err)) => tracing::debug!(error = %err, "router pull hiccup"),
                None => {
                    tracing::warn!("router pull stream ended");
                    break;
                }
            },
        }
    }
    while in_flight.next().await.is_some() {}
    if let Some(task) = invalidations {
        task.abort();
    }
    tracing::info!("router stopped");
    Ok(())
}

async fn listen_for_invalidations(
    bus: Bus,
    context: Arc<dyn ContextLookup>,
    shutdown: CancellationToken,
) {
    let mut subscription = match bus
        .client()
        .subscribe(events::CUSTOMER_CHANGED_SUBJECT)
        .await
    {
        Ok(subscription) => subscription,
        Err(err) => {
            tracing::error!(error = %err, "cannot subscribe to customer changes; cache relies on TTL");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            message = subscription.next() => match message {
                Some(message) => {
                    if let Some((tenant, customer)) = std::str::from_utf8(&message.payload)
                        .ok()
                        .and_then(|text| text.split_once('\n'))
                    {
                        context.invalidate(tenant, customer).await;
                    }
                }
                None => return,
            },
        }
    }
}

/// Why an ingest message is not an acceptable event.
fn check(message: &jetstream::Message) -> Result<(Event, EventType, Encoding), String> {
    let encoding = match headers::get(message.headers.as_ref(), headers::CONTENT_TYPE) {
        None => Encoding::Protobuf,
        Some(value) => Encoding::from_content_type(value)
            .ok_or_else(|| format!("unsupported Content-Type {value:?}"))?,
    };
    let event = events::decode(&message.payload, encoding).map_err(|err| err.to_string())?;
    events::validate(&event).map_err(|err| err.to_string())?;
    let subject = events::parse_ingest_subject(&message.subject).map_err(|err| err.to_string())?;
    let kind = EventType::of(&event).ok_or("payload: is required")?;
    if subject.tenant != event.tenant_id || subject.kind != kind {
        return Err(format!(
            "subject {} does not match the event (tenant_id {:?}, type {kind})",
            message.subject, event.tenant_id
        ));
    }
    Ok((event, kind, encoding))
}

impl Router {
    async fn route(&self, message: jetstream::Message) {
        let (event, kind, encoding) = match check(&message) {
            Ok(checked) => checked,
            Err(error) => {
                let letter = DeadLetter {
                    stage: DlqStage::Router,
                    reason: "invalid_event",
                    error: &error,
                };
                if let Err(err) = self.bus.dead_letter(&message, &letter).await {
                    tracing::warn!(error = %err, "dead-lettering an invalid event failed; will retry");
                }
                return;
            }
        };
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
        match self
            .publish_to_lane(
                &message,
                &event,
                kind,
                encoding,
                decision.lane,
                &decision.reason,
            )
            .await
        {
            Ok(()) => {
                metrics::counter!(
                    "crm_router_routed_total",
                    "lane" => decision.lane.as_str(),
                    "reason" => decision.reason.clone()
                )
                .increment(1);
                if let Err(err) = message.ack().await {
                    tracing::warn!(error = %err, "acking an ingest message failed; it will be routed again (deduplicated)");
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "lane publish failed; retrying later");
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }

    async fn publish_to_lane(
        &self,
        message: &jetstream::Message,
        event: &Event,
        kind: EventType,
        encoding: Encoding,
        lane: Lane,
        reason: &str,
    ) -> Result<(), BusError> {
        let subject = events::lane_subject(lane, &event.tenant_id, kind)
            .map_err(|err| BusError::with_source(BusErrorKind::Rejected, "lane subject", err))?;
        let original = message.headers.as_ref();
        let mut lane_headers = bus::HeaderMap::new();
        let msg_id = headers::get(original, headers::MSG_ID).unwrap_or(events::dedupe_id(event));
        lane_headers.insert(headers::MSG_ID, msg_id);
        lane_headers.insert(headers::ROUTE_REASON, reason);
        if let Some(value) = headers::get(original, headers::TRACEPARENT) {
            lane_headers.insert(headers::TRACEPARENT, value);
        }
        match headers::get(original, headers::INGESTED_AT) {
            Some(value) => lane_headers.insert(headers::INGESTED_AT, value),
            // Published straight to NATS without the header: the stream's timestamp is when it
            // entered the platform.
            None => {
                if let Ok(info) = message.info() {
                    let nanos = info.published.unix_timestamp_nanos().to_string();
                    lane_headers.insert(headers::INGESTED_AT, nanos.as_str());
                }
            }
        }
        // Lanes always carry protobuf: the producer's bytes when it sent protobuf, else re-encoded.
        let payload = match encoding {
            Encoding::Protobuf => message.payload.clone(),
            Encoding::Json => bytes::Bytes::from(events::encode_proto(event)),
        };
        let ack = self
            .bus
            .send_with_headers(&subject, payload, lane_headers)
            .await?;
        self.bus.await_ack(&subject, ack).await.map(|_| ())
    }
}
