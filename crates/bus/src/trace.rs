//! Trace context across hops: each hop's span is a child of the `traceparent` its message
//! carries, and the message it sends on carries the span's own context, so one event's spans —
//! HTTP request, router decision, worker batch, webhook — form one W3C trace.
//!
//! Spans are made only when something will read them ([`set_mode`]: OTLP export, or JSON logs,
//! whose lines then carry `trace_id`); otherwise the hot path pays nothing and the incoming
//! `traceparent` is passed on as it came.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use std::sync::atomic::{AtomicU8, Ordering};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// What reads the spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Nothing: no spans, `traceparent` passed through.
    Off = 0,
    /// Log lines only: spans carry `trace_id` into JSON logs; ids are not advanced.
    Logs = 1,
    /// Spans are exported: every hop's span has its own id, and the next hop its child.
    Export = 2,
}

static MODE: AtomicU8 = AtomicU8::new(Mode::Off as u8);

/// Set once at start by the process's tracing setup.
pub fn set_mode(mode: Mode) {
    MODE.store(mode as u8, Ordering::Relaxed);
}

pub fn mode() -> Mode {
    match MODE.load(Ordering::Relaxed) {
        2 => Mode::Export,
        1 => Mode::Logs,
        _ => Mode::Off,
    }
}

/// Whether to make spans at all.
pub fn enabled() -> bool {
    mode() != Mode::Off
}

/// The trace id of a well-formed `traceparent`.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    crate::headers::is_traceparent(traceparent).then(|| &traceparent[3..35])
}

/// The remote span context a well-formed `traceparent` names.
pub fn remote_context(traceparent: &str) -> Option<SpanContext> {
    if !crate::headers::is_traceparent(traceparent) {
        return None;
    }
    let trace = TraceId::from_hex(&traceparent[3..35]).ok()?;
    let span = SpanId::from_hex(&traceparent[36..52]).ok()?;
    let flags = u8::from_str_radix(&traceparent[53..55], 16).ok()?;
    Some(SpanContext::new(
        trace,
        span,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    ))
}

/// Make `span` a child of `parent` (a `traceparent`; `None` or malformed: `span` starts a trace)
/// and record its `trace_id` field. Returns the `traceparent` the next hop should carry: the
/// span's own when spans are exported, else `parent` unchanged (or a fresh one when there was
/// none and `fresh` is set).
pub fn adopt(span: &Span, parent: Option<&str>, fresh: bool) -> Option<String> {
    let parent = parent.filter(|value| crate::headers::is_traceparent(value));
    if mode() == Mode::Export && !span.is_disabled() {
        if let Some(remote) = parent.and_then(remote_context) {
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
        }
        let context = span.context();
        let own = context.span().span_context().clone();
        if own.is_valid() {
            let value = format!(
                "00-{}-{}-{:02x}",
                own.trace_id(),
                own.span_id(),
                own.trace_flags().to_u8()
            );
            span.record("trace_id", &value[3..35]);
            return Some(value);
        }
    }
    let value = match parent {
        Some(parent) => Some(parent.to_owned()),
        None if fresh => Some(crate::headers::new_traceparent()),
        None => None,
    };
    if let Some(trace_id) = value.as_deref().and_then(trace_id_of) {
        span.record("trace_id", trace_id);
    }
    value
}

/// A hop's span for one message a consumer handles, child of the message's `traceparent`, and
/// the `traceparent` what it sends on should carry. While tracing is off the span is
/// [`Span::none`] and the message's own `traceparent` is passed on as it came. `source` names the
/// consumer (a worker's lane, the router's ingest consumer); a router records where the event
/// went in the span's `lane` field. The caller keeps the span until the message's work is done.
pub fn message_span(
    name: &'static str,
    source: &'static str,
    message: &async_nats::jetstream::Message,
) -> (Span, Option<String>) {
    let headers = message.headers.as_ref();
    if !enabled() {
        let own = crate::headers::get(headers, crate::headers::TRACEPARENT).map(str::to_owned);
        return (Span::none(), own);
    }
    let span = tracing::info_span!(
        "consume",
        otel.name = name,
        otel.kind = "consumer",
        source,
        lane = tracing::field::Empty,
        event_id = crate::headers::get(headers, crate::headers::EVENT_ID).unwrap_or_default(),
        trace_id = tracing::field::Empty,
    );
    let next = adopt(
        &span,
        crate::headers::get(headers, crate::headers::TRACEPARENT),
        false,
    );
    (span, next)
}

/// One [`message_span`] per message of a batch, for a handler that sends nothing on (the spans
/// last while the caller holds them); empty while tracing is off.
pub fn batch_spans(
    name: &'static str,
    source: &'static str,
    batch: &[async_nats::jetstream::Message],
) -> Vec<Span> {
    if !enabled() {
        return Vec::new();
    }
    batch
        .iter()
        .map(|message| message_span(name, source, message).0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_names_its_remote_context() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = remote_context(value).expect("well-formed");
        assert_eq!(
            context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(context.span_id().to_string(), "00f067aa0ba902b7");
        assert!(context.is_sampled() && context.is_remote());
        assert_eq!(trace_id_of(value), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert!(remote_context("00-00-00-01").is_none());
        assert!(trace_id_of("garbage").is_none());
    }

    #[test]
    fn without_export_the_parent_passes_through() {
        let span = Span::none();
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(adopt(&span, Some(value), true).as_deref(), Some(value));
        assert_eq!(adopt(&span, Some("bad"), false), None);
        let fresh = adopt(&span, None, true).expect("a fresh traceparent");
        assert!(crate::headers::is_traceparent(&fresh));
    }
}
