//! Everything the notifier reports, each in one place: the log line and the metric together.
//! Labels are bounded: `endpoint` is the operator-configured subscription id, never a tenant,
//! customer or URL.

use std::time::Duration;

pub const DELIVERIES_TOTAL: &str = "crm_notifier_deliveries_total";
pub const DELIVERY_DURATION_SECONDS: &str = "crm_notifier_delivery_duration_seconds";
pub const BREAKER_OPEN: &str = "crm_notifier_breaker_open";

/// Something worth observing: emitting it logs and counts.
pub(crate) trait InternalEvent {
    fn emit(self);
}

fn count(endpoint: &str, result: &'static str) {
    metrics::counter!(DELIVERIES_TOTAL, "endpoint" => endpoint.to_owned(), "result" => result)
        .increment(1);
}

fn time(endpoint: &str, elapsed: Duration) {
    metrics::histogram!(DELIVERY_DURATION_SECONDS, "endpoint" => endpoint.to_owned())
        .record(elapsed.as_secs_f64());
}

fn breaker_gauge(endpoint: &str, open: bool) {
    metrics::gauge!(BREAKER_OPEN, "endpoint" => endpoint.to_owned()).set(if open {
        1.0
    } else {
        0.0
    });
}

/// A subscription is ready (its breaker starts closed).
pub(crate) struct EndpointConfigured<'a> {
    pub endpoint: &'a str,
    pub tenant: &'a str,
    pub host: &'a str,
}

impl InternalEvent for EndpointConfigured<'_> {
    fn emit(self) {
        tracing::info!(
            endpoint = self.endpoint,
            tenant = self.tenant,
            host = self.host,
            "webhook configured"
        );
        breaker_gauge(self.endpoint, false);
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
    pub endpoint: &'a str,
    pub event_id: &'a str,
    pub attempt: i64,
    pub elapsed: Duration,
    pub answer: Answered<'a>,
}

impl InternalEvent for WebhookAnswered<'_> {
    fn emit(self) {
        let (endpoint, event_id, attempt, elapsed) =
            (self.endpoint, self.event_id, self.attempt, self.elapsed);
        let result = match self.answer {
            Answered::Delivered { .. } => "delivered",
            Answered::Failed { .. } => "retry",
            Answered::Rejected { .. } => "rejected",
        };
        count(endpoint, result);
        time(endpoint, elapsed);
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
    pub endpoint: &'a str,
    pub event_id: &'a str,
    pub cause: Deferral,
    pub retry_in: Duration,
}

impl InternalEvent for WebhookDeferred<'_> {
    fn emit(self) {
        tracing::debug!(
            endpoint = self.endpoint, event_id = self.event_id, retry_in = ?self.retry_in,
            "{}; not sending now", self.cause.describe()
        );
        let result = match self.cause {
            Deferral::Busy => "busy",
            Deferral::BreakerOpen => "breaker_open",
        };
        count(self.endpoint, result);
    }
}

/// The breaker opened (or a half-open trial failed).
pub(crate) struct BreakerOpened<'a> {
    pub endpoint: &'a str,
    pub cool_down: Duration,
    pub last_error: &'a str,
}

impl InternalEvent for BreakerOpened<'_> {
    fn emit(self) {
        tracing::warn!(
            endpoint = self.endpoint, cool_down = ?self.cool_down, last_error = self.last_error,
            "circuit opened: requests to this endpoint pause"
        );
        breaker_gauge(self.endpoint, true);
    }
}

/// A half-open trial succeeded: the breaker closed.
pub(crate) struct BreakerClosed<'a> {
    pub endpoint: &'a str,
}

impl InternalEvent for BreakerClosed<'_> {
    fn emit(self) {
        tracing::info!(
            endpoint = self.endpoint,
            "circuit closed: the endpoint answers again"
        );
        breaker_gauge(self.endpoint, false);
    }
}
