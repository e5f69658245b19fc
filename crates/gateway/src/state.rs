//! What every handler shares: the bus, the key ring, the read model and the limits.

use crate::{GatewayConfig, GatewayError, ReadModel, config::KeyRing};
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
    keys: KeyRing,
    reads: Option<Arc<dyn ReadModel>>,
    publish_timeout: Duration,
    max_inflight: usize,
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
    /// Check `config` (keys, non-zero limits) and build the state.
    pub fn new(
        bus: Bus,
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
        Ok(Self {
            inner: Arc::new(Inner {
                bus,
                keys: KeyRing::new(&config.api_keys)?,
                reads,
                publish_timeout: config.publish_timeout,
                max_inflight: config.max_inflight,
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

    pub(crate) fn max_inflight(&self) -> usize {
        self.inner.max_inflight
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
        subject: &str,
        event: &Event,
        traceparent: &str,
    ) -> Result<Published, BusError> {
        let bus = &self.inner.bus;
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
