//! Everything the notifier reports, each in one place: the log line and the metric together.
//! Labels are bounded: `endpoint` is the operator-configured subscription id, never a tenant,
//! customer or URL.

use metrics::{Counter, Gauge, Histogram};
use std::{sync::Arc, time::Duration};

pub const DELIVERIES_TOTAL: &str = "crm_notifier_deliveries_total";
pub const DELIVERY_DURATION_SECONDS: &str = "crm_notifier_delivery_duration_seconds";
pub const BREAKER_OPEN: &str = "crm_notifier_breaker_open";

/// Something worth observing: emitting it logs and counts.
pub(crate) trait InternalEvent {
    fn emit(self);
}

/// The `result` label values of `crm_notifier_deliveries_total`.
const RESULTS: [&str; 5] = ["delivered", "retry", "rejected", "busy", "breaker_open"];

/// One endpoint's metric handles, registered once when it is configured.
#[derive(Debug)]
pub(crate) struct EndpointSignals {
    pub id: Arc<str>,
    deliveries: [Counter; 5],
    duration: Histogram,
    breaker_open: Gauge,
}

impl EndpointSignals {
    pub(crate) fn new(id: Arc<str>) -> Self {
        let label = id.to_string();
        Self {
            deliveries: RESULTS.map(|result| {
                metrics::counter!(DELIVERIES_TOTAL, "endpoint" => label.clone(), "result" => result)
            }),
            duration: metrics::histogram!(DELIVERY_DURATION_SECONDS, "endpoint" => label.clone()),
            breaker_open: metrics::gauge!(BREAKER_OPEN, "endpoint" => label),
            id,
        }
    }

    fn count(&self, result: &str) {
        if let Some(index) = RESULTS.iter().position(|known| *known == result) {
            self.deliveries[index].increment(1);
        }
    }

    fn breaker(&self, open: bool) {
        self.breaker_open.set(if open { 1.0 } else { 0.0 });
    }
}

/// A subscription is ready (its breaker starts closed).
pub(crate) struct EndpointConfigured<'a> {
    pub endpoint: &'a EndpointSignals,
    pub tenant: &'a str,
    pub host: &'a str,
}

impl InternalEvent for EndpointConfigured<'_> {
    fn emit(self) {
        tracing::info!(
            endpoint = &*self.endpoint.id,
            tenant = self.tenant,
            host = self.host,
            "webhook configured"
        );
        self.endpoint.breaker(false);
    }
}

/// How a request that was made ended.
pub(crate) enum Answered<'a> {
    /// 2xx.
    Delivered { status: u16 },
    /// 408, 429, 5xx, timeout or connection error: retried after `retry_in`.
    Failed { error: &'a str, retry_in: Duration },
    /// Any other status: the event goes to the dead-letter queue.
    Rejected { error: &'a str },
}

/// A request to an endpoint finished.
pub(crate) struct WebhookAnswered<'a> {
    pub endpoint: &'a EndpointSignals,
    pub event_id: &'a str,
    pub attempt: i64,
    pub elapsed: Duration,
    pub answer: Answered<'a>,
}

impl InternalEvent for WebhookAnswered<'_> {
    fn emit(self) {
        let (signals, event_id, attempt, elapsed) =
            (self.endpoint, self.event_id, self.attempt, self.elapsed);
        let endpoint = &*signals.id;
        let result = match self.answer {
            Answered::Delivered { .. } => "delivered",
            Answered::Failed { .. } => "retry",
            Answered::Rejected { .. } => "rejected",
        };
        signals.count(result);
        signals.duration.record(elapsed.as_secs_f64());
        let (error, retry_in) = match self.answer {
            Answered::Delivered { status } => {
                tracing::debug!(
                    endpoint,
                    event_id,
                    status,
                    attempt,
                    ?elapsed,
                    "webhook delivered"
                );
                return;
            }
            Answered::Failed { error, retry_in } => (error, Some(retry_in)),
            Answered::Rejected { error } => (error, None),
        };
        let what = match retry_in {
            Some(_) => "webhook failed; retrying later",
            None => "webhook rejected; the event goes to the dead-letter queue",
        };
        tracing::warn!(
            endpoint,
            event_id,
            error,
            attempt,
            ?elapsed,
            ?retry_in,
            "{what}"
        );
    }
}

/// Why no request was made this time.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Deferral {
    /// The endpoint had `endpoint_concurrency` requests in flight.
    Busy,
    /// The endpoint's circuit breaker is open.
    BreakerOpen,
}

impl Deferral {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Self::Busy => "endpoint busy",
            Self::BreakerOpen => "circuit open",
        }
    }
}

/// An event was not sent to an endpoint now and comes back after `retry_in`.
pub(crate) struct WebhookDeferred<'a> {
    pub endpoint: &'a EndpointSignals,
    pub event_id: &'a str,
    pub cause: Deferral,
    pub retry_in: Duration,
}

impl InternalEvent for WebhookDeferred<'_> {
    fn emit(self) {
        tracing::debug!(
            endpoint = &*self.endpoint.id, event_id = self.event_id, retry_in = ?self.retry_in,
            "{}; not sending now", self.cause.describe()
        );
        let result = match self.cause {
            Deferral::Busy => "busy",
            Deferral::BreakerOpen => "breaker_open",
        };
        self.endpoint.count(result);
    }
}

/// The breaker opened (or a half-open trial failed).
pub(crate) struct BreakerOpened<'a> {
    pub endpoint: &'a EndpointSignals,
    pub cool_down: Duration,
    pub last_error: &'a str,
}

impl InternalEvent for BreakerOpened<'_> {
    fn emit(self) {
        tracing::warn!(
            endpoint = &*self.endpoint.id, cool_down = ?self.cool_down, last_error = self.last_error,
            "circuit opened: requests to this endpoint pause"
        );
        self.endpoint.breaker(true);
    }
}

/// A half-open trial succeeded: the breaker closed.
pub(crate) struct BreakerClosed<'a> {
    pub endpoint: &'a EndpointSignals,
}

impl InternalEvent for BreakerClosed<'_> {
    fn emit(self) {
        tracing::info!(
            endpoint = &*self.endpoint.id,
            "circuit closed: the endpoint answers again"
        );
        self.endpoint.breaker(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endpoint's handles, registered once, count every event under its endpoint and result.
    #[test]
    fn an_endpoints_events_count_under_its_own_labels() {
        let text = test_support::render_metrics(|| {
            let signals = EndpointSignals::new(Arc::from("billing"));
            EndpointConfigured {
                endpoint: &signals,
                tenant: "acme",
                host: "example.test",
            }
            .emit();
            for answer in [
                Answered::Delivered { status: 204 },
                Answered::Failed {
                    error: "503",
                    retry_in: Duration::from_secs(1),
                },
                Answered::Rejected { error: "410" },
            ] {
                WebhookAnswered {
                    endpoint: &signals,
                    event_id: "e1",
                    attempt: 1,
                    elapsed: Duration::from_millis(3),
                    answer,
                }
                .emit();
            }
            for cause in [Deferral::Busy, Deferral::BreakerOpen] {
                WebhookDeferred {
                    endpoint: &signals,
                    event_id: "e1",
                    cause,
                    retry_in: Duration::from_secs(1),
                }
                .emit();
            }
            BreakerOpened {
                endpoint: &signals,
                cool_down: Duration::from_secs(30),
                last_error: "503",
            }
            .emit();
        });
        for result in RESULTS {
            assert!(
                text.contains(&format!(
                    "{DELIVERIES_TOTAL}{{endpoint=\"billing\",result=\"{result}\"}} 1"
                )),
                "{result}: {text}"
            );
        }
        assert!(
            text.contains(&format!("{BREAKER_OPEN}{{endpoint=\"billing\"}} 1")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "{DELIVERY_DURATION_SECONDS}_count{{endpoint=\"billing\"}} 3"
            )),
            "{text}"
        );
    }
}
