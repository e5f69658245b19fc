//! The priority router: a durable consumer on CRM_INGEST that decodes and validates each event,
//! classifies it (rules + customer context) and republishes it to its lane with the same
//! `Nats-Msg-Id`, acking the ingest message only after the lane has stored it. Invalid input is
//! dead-lettered with reason `invalid_event`, never lost and never blocking the stream.

mod rules;

pub use rules::{RulesHandle, watch_rules};

use bus::{
    Bus, BusError, BusErrorKind, CancellationToken, DeadLetter, headers,
    jetstream::{self, AckKind},
};
use events::{DlqStage, Encoding, Event, EventType, Lane};
use futures::{StreamExt, future::BoxFuture};
use std::{sync::Arc, time::Duration};

/// The consumer the router reads CRM_INGEST with: every subject, of which it routes all but the
/// express types.
pub const DURABLE: &str = "router";
/// The consumer of the express types ([`EventType::EXPRESS`]), read first.
pub const EXPRESS_DURABLE: &str = "router_express";

/// One pick in this many prefers the bulk consumer.
const BULK_SHARE_EVERY: u64 = 16;

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
    let batch = config.max_in_flight.clamp(1, 1000);
    let mut express = bus
        .pull_stream("CRM_INGEST", EXPRESS_DURABLE, batch)
        .await?;
    let mut bulk = bus.pull_stream("CRM_INGEST", DURABLE, batch).await?;

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
    // Each event is routed by a task of its own, so that in a shared process (`crm all`) routing
    // gets its fair share of the scheduler next to, say, a thousand gateway connections; one task
    // polling every route would get one turn among them all.
    let max_in_flight = config.max_in_flight.max(1);
    let slots = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    tracing::info!("router started");
    let mut picks: u64 = 0;
    loop {
        let slot = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        // Express types first: they never wait behind a bulk backlog. Every
        // `BULK_SHARE_EVERY`-th pick prefers bulk, so a flood of express events cannot starve it.
        picks = picks.wrapping_add(1);
        let next = if picks.is_multiple_of(BULK_SHARE_EVERY) {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                next = bulk.next() => next.map(|m| (m, false)),
                next = express.next() => next.map(|m| (m, true)),
            }
        } else {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                next = express.next() => next.map(|m| (m, true)),
                next = bulk.next() => next.map(|m| (m, false)),
            }
        };
        match next {
            Some((Ok(message), from_express)) => {
                if !from_express && is_express_subject(&message.subject) {
                    // The express consumer routes it; the bulk consumer sees every subject (so
                    // that malformed ones reach the DLQ) and lets these go.
                    if let Err(err) = message.ack().await {
                        tracing::debug!(error = %err, "acking an express event on the bulk consumer");
                    }
                    continue;
                }
                let router = router.clone();
                tokio::spawn(async move {
                    router.route(message).await;
                    drop(slot);
                });
            }
            Some((Err(err), _)) => tracing::debug!(error = %err, "router pull hiccup"),
            None => {
                tracing::warn!("router pull stream ended");
                break;
            }
        }
    }
    // Every slot back means every spawned route has published, acked and finished.
    let all = u32::try_from(max_in_flight).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
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

impl Router {
    async fn route(&self, message: jetstream::Message) {
        let (event, kind, encoding) = match bus::decode_ingest(&message) {
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
