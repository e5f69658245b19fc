//! What every handler shares: the bus, the key ring, the read model and the limits.

use crate::{
    GatewayConfig, GatewayError, ReadModel, RulesSource,
    admission::{Admission, Class},
    config::KeyRing,
};
use bus::{Bus, BusError, BusErrorKind, PublishOptions, Published, headers};
use bytes::Bytes;
use events::Event;
use std::{sync::Arc, time::Duration};

/// Shared gateway state. Cheap to clone.
#[derive(Clone)]
pub struct GatewayState {
    inner: Arc<Inner>,
}

struct Inner {
    bus: Bus,
    /// Critical and high events' own connection: their publishes never queue behind bulk's.
    priority_bus: Bus,
    rules: RulesSource,
    admission: Admission,
    keys: KeyRing,
    reads: Option<Arc<dyn ReadModel>>,
    publish_timeout: Duration,
    max_inflight: usize,
    critical_inflight: usize,
    high_inflight: usize,
    max_body_bytes: usize,
}

impl std::fmt::Debug for GatewayState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayState")
            .field("keys", &self.inner.keys)
            .field("reads", &self.inner.reads.is_some())
            .field("publish_timeout", &self.inner.publish_timeout)
            .field("max_inflight", &self.inner.max_inflight)
            .field("max_body_bytes", &self.inner.max_body_bytes)
            .finish_non_exhaustive()
    }
}

impl GatewayState {
    /// Check `config` (keys, non-zero limits) and build the state. `priority_bus` carries
    /// critical and high events (a connection of its own; the same bus works, without the
    /// isolation); `rules` classifies events on their content.
    pub fn new(
        bus: Bus,
        priority_bus: Bus,
        rules: RulesSource,
        config: &GatewayConfig,
        reads: Option<Arc<dyn ReadModel>>,
    ) -> Result<Self, GatewayError> {
        let positive = |field: &'static str, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(GatewayError::InvalidConfig {
                    field,
                    reason: "must be greater than zero".into(),
                })
            }
        };
        positive("max_inflight", config.max_inflight > 0)?;
        positive("max_body_bytes", config.max_body_bytes > 0)?;
        positive("publish_timeout", !config.publish_timeout.is_zero())?;
        positive(
            "admission.critical_inflight",
            config.admission.critical_inflight > 0,
        )?;
        positive(
            "admission.high_inflight",
            config.admission.high_inflight > 0,
        )?;
        positive(
            "admission.min_bulk_rate",
            config.admission.min_bulk_rate > 0.0,
        )?;
        positive(
            "admission.publish_interval",
            !config.admission.publish_interval.is_zero(),
        )?;
        Ok(Self {
            inner: Arc::new(Inner {
                bus,
                priority_bus,
                rules,
                admission: Admission::new(&config.admission, config.max_inflight),
                keys: KeyRing::new(&config.api_keys)?,
                reads,
                publish_timeout: config.publish_timeout,
                max_inflight: config.max_inflight,
                critical_inflight: config.admission.critical_inflight,
                high_inflight: config.admission.high_inflight,
                max_body_bytes: config.max_body_bytes,
            }),
        })
    }

    pub(crate) fn keys(&self) -> &KeyRing {
        &self.inner.keys
    }

    pub(crate) fn reads(&self) -> Option<&dyn ReadModel> {
        self.inner.reads.as_deref()
    }

    /// The memory guard over every request: bulk's and reads' limit plus the class budgets.
    pub(crate) fn request_limit(&self) -> usize {
        self.inner.max_inflight + self.inner.critical_inflight + self.inner.high_inflight
    }

    /// The memory guard over the priority door's requests: the class budgets.
    pub(crate) fn priority_request_limit(&self) -> usize {
        self.inner.critical_inflight + self.inner.high_inflight
    }

    pub(crate) fn admission(&self) -> &Admission {
        &self.inner.admission
    }

    pub(crate) fn bus(&self) -> &Bus {
        &self.inner.bus
    }

    /// The class of `event` by its content (rules without customer context).
    pub(crate) fn classify(&self, event: &Event) -> Class {
        Class::of((self.inner.rules)().classify(event, None).lane)
    }

    pub(crate) fn max_body_bytes(&self) -> usize {
        self.inner.max_body_bytes
    }

    /// Publish an admitted `event` to `subject` and wait for JetStream to store it. Fails fast
    /// while the connection is down (the client reconnects by itself) so callers get their 503
    /// at once instead of after the ack timeout.
    ///
    /// An error does not prove the event was not stored: a publish sent just before the
    /// connection broke is flushed by the client after it reconnects. Clients retry with the same
    /// id and the stream's duplicate window absorbs the copy.
    pub(crate) async fn publish(
        &self,
        class: Class,
        subject: &str,
        event: &Event,
        traceparent: &str,
    ) -> Result<Published, BusError> {
        let bus = if class.is_priority() {
            &self.inner.priority_bus
        } else {
            &self.inner.bus
        };
        if !bus.is_connected() {
            return Err(BusError::new(
                BusErrorKind::Unavailable,
                "the NATS connection is down",
            ));
        }
        // Scoped to the tenant: another tenant's identical key is another event.
        let msg_id = events::ingest_msg_id(event);
        // The clock the workers' end-to-end latency is measured against.
        let ingested_at = bus::control::unix_ns();
        let mut options = PublishOptions::with_msg_id(msg_id)
            .header(headers::EVENT_ID, &event.event_id)
            .header(headers::TRACEPARENT, traceparent)
            .header(headers::INGESTED_AT, ingested_at.to_string());
        // Two attempts share the budget, so the caller has its answer within `publish_timeout`.
        options.timeout = Some(self.inner.publish_timeout / 2);
        options.max_attempts = 2;
        let payload = Bytes::from(events::encode_proto(event));
        bus.publish(subject, payload, &options).await
    }
}
