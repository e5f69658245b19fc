//! The worker handler: one lane event → a signed POST to every matching subscription, and one
//! outcome for the runtime (ack, nak with a delay, or dead letter).

use crate::{
    breaker::{CircuitBreaker, Permit, Transition},
    config::{ConfigError, NotifierConfig, Subscription},
    header,
    internal_events::{
        Answered, BreakerClosed, BreakerOpened, Deferral, EndpointConfigured, EndpointSignals,
        InternalEvent, WebhookAnswered, WebhookDeferred,
    },
    retry::{StatusClass, classify, parse_retry_after, retry_delay},
    signature,
};
use bus::{Handler, Outcome, headers, jetstream};
use bytes::Bytes;
use events::{EventType, Lane};
use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio::{sync::Semaphore, time::Instant};
use tracing::Instrument;

/// Longest part of a response body quoted in errors and dead letters.
pub const BODY_EXCERPT_BYTES: usize = 512;

/// Dead-letter reason for a receiver's permanent refusal.
pub const REJECTED_REASON: &str = "webhook_rejected";

/// A subscription with its limits and health.
struct Endpoint {
    subscription: Subscription,
    signals: EndpointSignals,
    slots: Arc<Semaphore>,
    breaker: Mutex<CircuitBreaker>,
    /// The endpoint's most recent failure, quoted when a request is not even tried, so the last
    /// error of a dead letter still carries a status and body excerpt.
    last_failure: Mutex<Option<Arc<str>>>,
}

impl Endpoint {
    fn id(&self) -> &str {
        &self.subscription.id
    }

    fn with_last_failure(&self, what: String) -> String {
        match lock(&self.last_failure).as_deref() {
            Some(last) => format!("{what}; last failure: {last}"),
            None => what,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How an event ended at one endpoint, remembered so redeliveries skip it.
#[derive(Debug, Clone)]
enum Settled {
    /// For good: a replay of the event (a new lane message) skips this endpoint too.
    Delivered,
    /// For this lane message only: a replay after the receiver was fixed tries again.
    Rejected { error: Arc<str>, stream_seq: u64 },
}

/// What became of one event at one endpoint on this delivery.
#[derive(Debug)]
enum EndpointResult {
    Delivered,
    Rejected(Arc<str>),
    Retry { after: Duration, error: String },
}

/// What is sent, the same for every endpoint but the signature.
struct Delivery<'a> {
    event_id: &'a str,
    kind: EventType,
    body: Bytes,
    /// The JetStream delivery count.
    attempt: i64,
    /// The lane message's stream sequence (0 when unknown).
    stream_seq: u64,
    traceparent: Option<&'a str>,
}

/// What a request came to.
enum Answer {
    Status {
        status: u16,
        retry_after: Option<Duration>,
        error: String,
    },
    Transport(String),
}

/// The notifier's handler; see the crate docs.
pub struct Notifier {
    endpoints: Vec<Endpoint>,
    client: reqwest::Client,
    /// (subscription id, event id) → how it ended there.
    settled: moka::future::Cache<(Arc<str>, String), Settled>,
    request_timeout: Duration,
    backoff_base: Duration,
    backoff_max: Duration,
    busy_retry_base: Duration,
    breaker_cool_down: Duration,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field(
                "endpoints",
                &self.endpoints.iter().map(Endpoint::id).collect::<Vec<_>>(),
            )
            .field("settled", &self.settled.entry_count())
            .finish_non_exhaustive()
    }
}

impl Notifier {
    /// Check `config` (see [`NotifierConfig::subscriptions`]) and prepare the HTTP client.
    pub fn try_new(config: &NotifierConfig) -> Result<Self, ConfigError> {
        let subscriptions = config.subscriptions()?;
        let client = reqwest::Client::builder()
            .user_agent(concat!("crm-events-notifier/", env!("CARGO_PKG_VERSION")))
            // A redirect would carry the signed event somewhere the operator did not configure.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout)
            .pool_max_idle_per_host(config.endpoint_concurrency)
            .build()
            .map_err(|err| ConfigError::new("notifier", format!("HTTP client: {err}")))?;
        let endpoints = subscriptions
            .into_iter()
            .map(|subscription| {
                let signals = EndpointSignals::new(subscription.id.clone());
                EndpointConfigured {
                    endpoint: &signals,
                    tenant: &subscription.tenant,
                    host: subscription.url.host_str().unwrap_or_default(),
                }
                .emit();
                Endpoint {
                    signals,
                    slots: Arc::new(Semaphore::new(config.endpoint_concurrency)),
                    breaker: Mutex::new(CircuitBreaker::new(
                        config.breaker_failure_threshold,
                        config.breaker_cool_down,
                        config.request_timeout,
                    )),
                    last_failure: Mutex::new(None),
                    subscription,
                }
            })
            .collect();
        Ok(Self {
            endpoints,
            client,
            settled: moka::future::Cache::builder()
                .max_capacity(config.remember_accepted)
                .time_to_live(config.redelivery_horizon())
                .build(),
            request_timeout: config.request_timeout,
            backoff_base: config.backoff_base,
            backoff_max: config.backoff_max,
            busy_retry_base: config.busy_retry_base,
            breaker_cool_down: config.breaker_cool_down,
        })
    }

    async fn deliver(&self, lane: Lane, message: &jetstream::Message) -> Outcome {
        let (event, kind) = match bus::decode_lane(message) {
            Ok(decoded) => decoded,
            Err((reason, err)) => return Outcome::poison(reason, err),
        };
        let targets: Vec<&Endpoint> = self
            .endpoints
            .iter()
            .filter(|e| e.subscription.matches(&event.tenant_id, kind, lane))
            .collect();
        if targets.is_empty() {
            return Outcome::Done;
        }
        // One span per event delivered (its webhooks carry the span's context), child of the lane
        // message's trace.
        let (span, traceparent) = bus::trace::message_span("deliver", lane.as_str(), message);
        let traceparent = traceparent.filter(|value| headers::is_traceparent(value));
        let info = message.info().ok();
        let delivery = Delivery {
            event_id: &event.event_id,
            kind,
            body: Bytes::from(events::encode_json(&event)),
            attempt: info.as_ref().map_or(1, |info| info.delivered),
            stream_seq: info.as_ref().map_or(0, |info| info.stream_sequence),
            traceparent: traceparent.as_deref(),
        };
        let results = futures::future::join_all(
            targets
                .iter()
                .map(|endpoint| self.deliver_to(endpoint, &delivery)),
        )
        .instrument(span)
        .await;
        combine(results)
    }

    async fn deliver_to(&self, endpoint: &Endpoint, delivery: &Delivery<'_>) -> EndpointResult {
        let key = (
            endpoint.subscription.id.clone(),
            delivery.event_id.to_owned(),
        );
        match self.settled.get(&key).await {
            Some(Settled::Delivered) => return EndpointResult::Delivered,
            Some(Settled::Rejected { error, stream_seq })
                if stream_seq == delivery.stream_seq && stream_seq != 0 =>
            {
                return EndpointResult::Rejected(error);
            }
            Some(Settled::Rejected { .. }) | None => {}
        }
        let defer = |cause: Deferral, after: Duration| {
            WebhookDeferred {
                endpoint: &endpoint.signals,
                event_id: delivery.event_id,
                cause,
                retry_in: after,
            }
            .emit();
            let error = format!("webhook {}: {}", endpoint.id(), cause.describe());
            EndpointResult::Retry {
                after,
                error: endpoint.with_last_failure(error),
            }
        };
        // Never wait for a slot: a waiting event would hold a worker slot another tenant needs.
        let Ok(_slot) = endpoint.slots.clone().try_acquire_owned() else {
            let after = retry_delay(
                None,
                delivery.attempt,
                self.busy_retry_base,
                self.backoff_max,
            );
            return defer(Deferral::Busy, after);
        };
        let permit = match lock(&endpoint.breaker).try_acquire() {
            Ok(permit) => permit,
            Err(after) => return defer(Deferral::BreakerOpen, after),
        };

        let started = Instant::now();
        let answer = self.post(endpoint, delivery).await;
        let elapsed = started.elapsed();
        let (status, retry_after, error) = match answer {
            Answer::Status {
                status,
                retry_after,
                error,
            } => (Some(status), retry_after, error),
            Answer::Transport(error) => (None, None, error),
        };
        // No status at all (timeout, refused connection) is as retryable as a 503.
        let class = status.map_or(StatusClass::Retryable, classify);
        // A rejection still shows the endpoint up and answering: only failures count against it.
        self.breaker_result(endpoint, permit, class != StatusClass::Retryable, &error);
        let (answer, result) = match class {
            StatusClass::Accepted => {
                self.settled.insert(key, Settled::Delivered).await;
                let status = status.unwrap_or_default();
                (Answered::Delivered { status }, EndpointResult::Delivered)
            }
            StatusClass::Rejected => {
                let shared: Arc<str> = Arc::from(error.as_str());
                self.settled
                    .insert(
                        key,
                        Settled::Rejected {
                            error: shared.clone(),
                            stream_seq: delivery.stream_seq,
                        },
                    )
                    .await;
                (
                    Answered::Rejected { error: &error },
                    EndpointResult::Rejected(shared),
                )
            }
            StatusClass::Retryable => {
                *lock(&endpoint.last_failure) = Some(Arc::from(error.as_str()));
                let after = retry_delay(
                    retry_after,
                    delivery.attempt,
                    self.backoff_base,
                    self.backoff_max,
                );
                (
                    Answered::Failed {
                        error: &error,
                        retry_in: after,
                    },
                    EndpointResult::Retry {
                        after,
                        error: error.clone(),
                    },
                )
            }
        };
        WebhookAnswered {
            endpoint: &endpoint.signals,
            event_id: delivery.event_id,
            attempt: delivery.attempt,
            elapsed,
            answer,
        }
        .emit();
        result
    }

    fn breaker_result(&self, endpoint: &Endpoint, permit: Permit, ok: bool, error: &str) {
        let transition = {
            let mut breaker = lock(&endpoint.breaker);
            if ok {
                breaker.on_success(permit)
            } else {
                breaker.on_failure(permit)
            }
        };
        match transition {
            Some(Transition::Opened) => BreakerOpened {
                endpoint: &endpoint.signals,
                cool_down: self.breaker_cool_down,
                last_error: error,
            }
            .emit(),
            Some(Transition::Closed) => BreakerClosed {
                endpoint: &endpoint.signals,
            }
            .emit(),
            None => {}
        }
    }

    async fn post(&self, endpoint: &Endpoint, delivery: &Delivery<'_>) -> Answer {
        let subscription = &endpoint.subscription;
        let now = SystemTime::now();
        let timestamp = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let signature = signature::sign_with_all(
            subscription.secrets.iter().map(String::as_str),
            timestamp,
            &delivery.body,
        );
        let mut request = self
            .client
            .post(subscription.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(header::EVENT_ID, delivery.event_id)
            .header(header::EVENT_TYPE, delivery.kind.as_str())
            .header(header::IDEMPOTENCY_KEY, delivery.event_id)
            .header(header::DELIVERY_ATTEMPT, delivery.attempt.to_string())
            .header(header::SIGNATURE, signature)
            .body(delivery.body.clone());
        if let Some(traceparent) = delivery.traceparent {
            request = request.header(header::TRACEPARENT, traceparent);
        }
        let id = endpoint.id();
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(err) => return Answer::Transport(transport_error(id, &err, self.request_timeout)),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| parse_retry_after(value, SystemTime::now()));
        let excerpt = match read_excerpt(&mut response).await {
            Ok(excerpt) => excerpt,
            Err(err) if classify(status.as_u16()) == StatusClass::Accepted => {
                tracing::debug!(endpoint = id, error = %err, "reading an accepted response failed");
                String::new()
            }
            Err(err) => return Answer::Transport(transport_error(id, &err, self.request_timeout)),
        };
        let mut error = format!("webhook {id}: HTTP {status}");
        if !excerpt.is_empty() {
            error.push_str(": ");
            error.push_str(&excerpt);
        }
        Answer::Status {
            status: status.as_u16(),
            retry_after,
            error,
        }
    }
}

/// Up to [`BODY_EXCERPT_BYTES`] of the response body, on one line; the rest is not read.
async fn read_excerpt(response: &mut reqwest::Response) -> Result<String, reqwest::Error> {
    let mut bytes = Vec::new();
    while bytes.len() < BODY_EXCERPT_BYTES {
        match response.chunk().await? {
            Some(chunk) => bytes.extend_from_slice(&chunk),
            None => break,
        }
    }
    Ok(excerpt(&bytes))
}

/// `bytes` as one line of text, at most [`BODY_EXCERPT_BYTES`] long, trimmed.
pub fn excerpt(bytes: &[u8]) -> String {
    // A few bytes more than needed, so that a multi-byte character at the cut survives decoding.
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(BODY_EXCERPT_BYTES + 4)]);
    headers::single_line(&text, BODY_EXCERPT_BYTES)
        .trim()
        .to_owned()
}

/// A transport failure in words, with its causes and without the URL (it may hold a token).
fn transport_error(id: &str, err: &reqwest::Error, timeout: Duration) -> String {
    if err.is_timeout() {
        return format!("webhook {id}: no answer within {timeout:?}");
    }
    let mut text = format!("webhook {id}: ");
    text.push_str(if err.is_connect() {
        "connection failed"
    } else {
        "request failed"
    });
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// One outcome from every endpoint's result: retry while any endpoint may still take the event
/// (the endpoints that already have it are remembered and skipped), then dead-letter if any
/// endpoint refused it, else ack.
fn combine(results: Vec<EndpointResult>) -> Outcome {
    let mut retry: Option<Duration> = None;
    let mut errors = Vec::new();
    let mut rejected = Vec::new();
    for result in results {
        match result {
            EndpointResult::Delivered => {}
            EndpointResult::Rejected(error) => rejected.push(error),
            EndpointResult::Retry { after, error } => {
                // Wait for the slowest: no endpoint is asked again before it said it could be.
                retry = Some(retry.map_or(after, |longest| longest.max(after)));
                errors.push(error);
            }
        }
    }
    errors.extend(rejected.iter().map(|e| e.to_string()));
    match retry {
        Some(after) => Outcome::Retry {
            after: Some(after),
            error: errors.join("; "),
        },
        None if !rejected.is_empty() => Outcome::poison(REJECTED_REASON, errors.join("; ")),
        None => Outcome::Done,
    }
}

impl Handler for Notifier {
    async fn handle(&self, source: &'static str, batch: &[jetstream::Message]) -> Vec<Outcome> {
        // The notifier reads only lanes; an unknown label would be a wiring bug, and then the
        // event goes to subscriptions of any lane rather than to none.
        let lane = Lane::from_name(source).unwrap_or(Lane::Standard);
        futures::future::join_all(batch.iter().map(|message| self.deliver(lane, message))).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_bounded_single_line_text() {
        assert_eq!(
            excerpt(b"  {\"error\":\n\"bad\"}\r\n"),
            "{\"error\": \"bad\"}"
        );
        let long = "é".repeat(600);
        let cut = excerpt(long.as_bytes());
        assert!(cut.len() <= BODY_EXCERPT_BYTES && cut.len() >= BODY_EXCERPT_BYTES - 1);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(excerpt(&[0xff, b'o', b'k']), "\u{fffd}ok");
    }

    #[test]
    fn one_outcome_from_many_endpoints() {
        let retry = |secs, error: &str| EndpointResult::Retry {
            after: Duration::from_secs(secs),
            error: error.into(),
        };
        let rejected = |error: &str| EndpointResult::Rejected(Arc::from(error));
        assert_eq!(combine(vec![]), Outcome::Done);
        assert_eq!(
            combine(vec![EndpointResult::Delivered, EndpointResult::Delivered]),
            Outcome::Done
        );
        assert_eq!(
            combine(vec![
                EndpointResult::Delivered,
                retry(3, "a: 503"),
                retry(7, "b: 429")
            ]),
            Outcome::Retry {
                after: Some(Duration::from_secs(7)),
                error: "a: 503; b: 429".into()
            }
        );
        // A refusal waits until the others are settled, and the error names both.
        assert_eq!(
            combine(vec![rejected("a: HTTP 400"), retry(2, "b: HTTP 503")]),
            Outcome::Retry {
                after: Some(Duration::from_secs(2)),
                error: "b: HTTP 503; a: HTTP 400".into()
            }
        );
        assert_eq!(
            combine(vec![EndpointResult::Delivered, rejected("a: HTTP 400")]),
            Outcome::poison(REJECTED_REASON, "a: HTTP 400")
        );
    }
}
