//! `POST /v1/events` and `POST /v1/events:batch`: decode → validate → tenant check → publish,
//! answering 202 only for what JetStream acknowledged.

use crate::{
    GatewayState,
    admission::{Class, Door, RETRY_AFTER, Refusal},
    auth::Tenant,
    problem::Problem,
};
use axum::{
    Extension, Json,
    extract::{State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header::CONTENT_TYPE},
};
use bus::{BusError, BusErrorKind, Published, headers as nats};
use bytes::Bytes;
use events::{Encoding, Event, EventType, FieldError, ValidationErrors};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::{Instrument, Span};

/// Most events one batch may carry.
pub const MAX_BATCH_EVENTS: usize = 1000;
/// Publishes of one batch awaiting their ack at once.
const BATCH_PUBLISH_CONCURRENCY: usize = 128;

#[derive(Debug, Serialize)]
pub(crate) struct Accepted {
    event_id: String,
    stream: String,
    stream_seq: u64,
    duplicate: bool,
}

pub(crate) async fn single(
    State(state): State<GatewayState>,
    Extension(tenant): Extension<Tenant>,
    Extension(door): Extension<Door>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Accepted>), Problem> {
    let encoding = encoding(&headers, "application/json or application/x-protobuf")?;
    let body = body.map_err(|r| Problem::unreadable_body(&r, state.max_body_bytes()))?;
    let event = events::decode(&body, encoding).map_err(Problem::undecodable)?;
    let (class, subject) = check(&state, &event, &tenant)?;
    let ticket = state
        .admission()
        .admit(door, class, &tenant, &event.event_id)
        .map_err(|refusal| refused(class, refusal))?;
    let (span, traceparent) = request_span("POST /v1/events", &headers);
    span.record("event_id", event.event_id.as_str());
    let published = state
        .publish(class, &subject, &event, &traceparent)
        .instrument(span)
        .await;
    state.admission().published(ticket);
    let published = published.map_err(|err| unavailable(&subject, &err))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            event_id: event.event_id,
            stream: published.stream,
            stream_seq: published.sequence,
            duplicate: published.duplicate,
        }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    // Raw, so that one undecodable item fails alone, with positions relative to the item.
    events: Vec<Box<RawValue>>,
}

#[derive(Debug, Serialize)]
pub(crate) struct BatchResponse {
    results: Vec<ItemResult>,
}

/// The outcome of one batch item, as the status a single request would have had.
#[derive(Debug, Serialize)]
struct ItemResult {
    index: usize,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duplicate: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<FieldError>,
    /// A refused item's wait before it is sent again, ms (as a single event's `Retry-After-Ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

impl ItemResult {
    fn failed(index: usize, event_id: Option<String>, problem: Problem) -> Self {
        Self {
            index,
            status: problem.status.as_u16(),
            event_id: event_id.filter(|id| !id.is_empty()),
            stream: None,
            stream_seq: None,
            duplicate: None,
            detail: Some(problem.detail),
            errors: problem.errors,
            retry_after_ms: problem.retry_after.map(crate::problem::retry_after_ms),
        }
    }

    fn published(index: usize, event_id: String, published: Published) -> Self {
        Self {
            index,
            status: StatusCode::ACCEPTED.as_u16(),
            event_id: Some(event_id),
            stream: Some(published.stream),
            stream_seq: Some(published.sequence),
            duplicate: Some(published.duplicate),
            detail: None,
            errors: Vec::new(),
            retry_after_ms: None,
        }
    }
}

pub(crate) async fn batch(
    State(state): State<GatewayState>,
    Extension(tenant): Extension<Tenant>,
    Extension(door): Extension<Door>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<BatchResponse>, Problem> {
    if encoding(&headers, "application/json")? != Encoding::Json {
        return Err(Problem::unsupported_media_type(
            content_type(&headers),
            "application/json",
        ));
    }
    let body = body.map_err(|r| Problem::unreadable_body(&r, state.max_body_bytes()))?;
    let request: BatchRequest = serde_json::from_slice(&body)
        .map_err(|err| Problem::undecodable(events::DecodeError::json(&err, None)))?;
    if request.events.len() > MAX_BATCH_EVENTS {
        return Err(Problem::too_large(format!(
            "a batch holds at most {MAX_BATCH_EVENTS} events, not {}",
            request.events.len()
        )));
    }

    let mut results = Vec::with_capacity(request.events.len());
    let mut admitted = Vec::new();
    for (index, raw) in request.events.iter().enumerate() {
        let result = match events::decode(raw.get().as_bytes(), Encoding::Json) {
            Err(err) => ItemResult::failed(index, None, Problem::undecodable(err)),
            Ok(event) => match check(&state, &event, &tenant).and_then(|(class, subject)| {
                let ticket = state
                    .admission()
                    .admit(door, class, &tenant, &event.event_id)
                    .map_err(|refusal| refused(class, refusal))?;
                Ok((class, subject, ticket))
            }) {
                Err(problem) => ItemResult::failed(index, Some(event.event_id), problem),
                Ok((class, subject, ticket)) => {
                    // Overwritten once the publish settles.
                    let pending = ItemResult::failed(
                        index,
                        Some(event.event_id.clone()),
                        Problem::internal("not published"),
                    );
                    admitted.push((index, class, subject, event, ticket));
                    pending
                }
            },
        };
        results.push(result);
    }

    // One trace for the whole request. `buffered` starts the publishes in batch order, so the
    // stream keeps that order unless a retry intervenes.
    let (span, traceparent) = request_span("POST /v1/events:batch", &headers);
    let state = &state;
    let traceparent = traceparent.as_str();
    let mut settled = futures::stream::iter(admitted)
        .map(|(index, class, subject, event, ticket)| async move {
            let outcome = state.publish(class, &subject, &event, traceparent).await;
            state.admission().published(ticket);
            (index, subject, event.event_id, outcome)
        })
        .buffered(BATCH_PUBLISH_CONCURRENCY);
    async {
        while let Some((index, subject, event_id, outcome)) = settled.next().await {
            results[index] = match outcome {
                Ok(published) => ItemResult::published(index, event_id, published),
                Err(err) => ItemResult::failed(index, Some(event_id), unavailable(&subject, &err)),
            };
        }
    }
    .instrument(span)
    .await;
    Ok(Json(BatchResponse { results }))
}

/// Validate `event`, check it belongs to the caller's tenant and classify it on its content;
/// returns its class and ingest subject (the priority one for critical and high events).
fn check(state: &GatewayState, event: &Event, tenant: &Tenant) -> Result<(Class, String), Problem> {
    events::validate(event).map_err(Problem::invalid_event)?;
    if event.tenant_id != **tenant {
        return Err(Problem::wrong_tenant(&event.tenant_id, tenant));
    }
    let invalid = |field: &str, message: String| {
        Problem::invalid_event(ValidationErrors(vec![FieldError {
            field: field.into(),
            message,
        }]))
    };
    // Both hold after validation; kept as errors rather than panics.
    let kind = EventType::of(event)
        .ok_or_else(|| invalid("payload", "is required: set exactly one event type".into()))?;
    let class = state.classify(event);
    let subject = if class.is_priority() {
        events::priority_subject(&event.tenant_id, kind)
    } else {
        events::ingest_subject(&event.tenant_id, kind)
    };
    subject
        .map(|subject| (class, subject))
        .map_err(|err| invalid("tenant_id", err.to_string()))
}

fn refused(class: Class, refusal: Refusal) -> Problem {
    let why = match refusal {
        Refusal::Budget => "at their in-flight limit",
        Refusal::Rate { .. } => "at a reduced rate while the pipeline catches up",
        Refusal::Misdirected => return Problem::misdirected(class.as_str()),
    };
    Problem::shed(
        class.as_str(),
        why,
        refusal.retry_after().unwrap_or(RETRY_AFTER),
    )
}

fn unavailable(subject: &str, err: &BusError) -> Problem {
    tracing::warn!(subject, kind = ?err.kind(), error = %err, "event not acknowledged");
    if err.kind() == BusErrorKind::Full {
        Problem::ingest_full()
    } else {
        Problem::unavailable()
    }
}

fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok())
}

fn encoding(headers: &HeaderMap, accepted: &str) -> Result<Encoding, Problem> {
    content_type(headers)
        .and_then(Encoding::from_content_type)
        .ok_or_else(|| Problem::unsupported_media_type(content_type(headers), accepted))
}

/// The request's span, a child of the caller's `traceparent` when it sent a well-formed one
/// (none while tracing is off), and the `traceparent` its events carry: the span's own when spans
/// are exported, else the caller's, else a new trace.
fn request_span(route: &'static str, headers: &HeaderMap) -> (Span, String) {
    let span = if bus::trace::enabled() {
        tracing::info_span!(
            "gateway",
            otel.name = route,
            otel.kind = "server",
            event_id = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        )
    } else {
        Span::none()
    };
    let parent = headers.get(nats::TRACEPARENT).and_then(|v| v.to_str().ok());
    let traceparent = bus::trace::adopt(&span, parent, true).unwrap_or_else(nats::new_traceparent);
    (span, traceparent)
}
