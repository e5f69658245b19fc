//! RFC 9457 problem details: every error the gateway returns is `application/problem+json`.

use axum::{
    extract::rejection::BytesRejection,
    http::{
        HeaderName, HeaderValue, StatusCode,
        header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE},
    },
    response::{IntoResponse, Response},
};
use events::{DecodeError, FieldError, ValidationErrors};
use serde::Serialize;
use std::time::Duration;

const TYPE_BASE: &str = "https://crm-events.dev/problems/";

/// The exact wait of a 503, in milliseconds (`Retry-After` itself counts whole seconds).
pub const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

pub(crate) fn retry_after_ms(wait: Duration) -> u64 {
    u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)
}

/// One problem: its status, a stable slug (the `type` URL's last segment), a title per slug,
/// a detail for this occurrence and, for invalid events, every field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub status: StatusCode,
    pub slug: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub errors: Vec<FieldError>,
    /// How long the client should wait before it tries again (503 only): `Retry-After` in
    /// whole seconds, rounded up, and the exact figure as `Retry-After-Ms` and `retry_after_ms`.
    pub retry_after: Option<Duration>,
}

impl Problem {
    pub fn new(
        status: StatusCode,
        slug: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            slug,
            title,
            detail: detail.into(),
            errors: Vec::new(),
            retry_after: None,
        }
    }

    fn retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Missing or unknown API key",
            "send `Authorization: Bearer <api key>`",
        )
    }

    pub fn wrong_tenant(event_tenant: &str, key_tenant: &str) -> Self {
        let mut problem = Self::new(
            StatusCode::FORBIDDEN,
            "tenant-mismatch",
            "Event belongs to another tenant",
            format!("tenant_id {event_tenant:?} is not the API key's tenant"),
        );
        problem.errors.push(FieldError {
            field: "tenant_id".into(),
            message: format!("must be {key_tenant:?}, the API key's tenant"),
        });
        problem
    }

    /// A body that is not an event; a JSON member whose value could not be read is named in
    /// `errors` as a validation error would name it.
    pub fn undecodable(err: DecodeError) -> Self {
        let (slug, title) = match err {
            DecodeError::Json { .. } => ("invalid-json", "Body is not a valid JSON event"),
            DecodeError::Protobuf(_) => ("invalid-protobuf", "Body is not a valid protobuf event"),
        };
        let mut problem = Self::new(StatusCode::BAD_REQUEST, slug, title, err.to_string());
        if let DecodeError::Json {
            field: Some(field),
            message,
            ..
        } = err
        {
            problem.errors.push(FieldError { field, message });
        }
        problem
    }

    pub fn invalid_event(errors: ValidationErrors) -> Self {
        let mut problem = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid-event",
            "Event failed validation",
            format!("{} field(s) are invalid", errors.0.len()),
        );
        problem.errors = errors.0;
        problem
    }

    pub fn unsupported_media_type(got: Option<&str>, accepted: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported Content-Type",
            format!(
                "Content-Type {} is not accepted here; send {accepted}",
                got.map_or_else(|| "(none)".to_owned(), |v| format!("{v:?}"))
            ),
        )
    }

    pub fn too_large(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            "Request too large",
            detail,
        )
    }

    /// The body could not be read: over the size limit (413) or broken off (400).
    pub fn unreadable_body(rejection: &BytesRejection, limit: usize) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::too_large(format!("the request body exceeds {limit} bytes"))
        } else {
            Self::new(
                rejection.status(),
                "unreadable-body",
                "Request body could not be read",
                rejection.body_text(),
            )
        }
    }

    /// CRM_INGEST is full (its unprocessed backlog reached the stream's limit): the stream
    /// refused the event, so nothing was stored and nothing acked is at risk. Retry later.
    pub fn ingest_full() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ingest-full",
            "Ingest is full",
            "the ingest stream is full of events not processed yet, so this event was not stored; \
             retry after the Retry-After delay with the same event_id or idempotency_key",
        )
        // A full stream drains at the pace of its consumers: a longer pause than for a hiccup.
        .retry_after(Duration::from_secs(5))
    }

    /// JetStream did not confirm storage; the client retries (with the same idempotency key).
    pub fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Event store unavailable",
            "JetStream did not acknowledge the event, so it may not be stored; retry with the same \
             event_id or idempotency_key",
        )
        .retry_after(Duration::from_secs(1))
    }

    pub fn overloaded() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "Gateway overloaded",
            "too many requests in flight; retry shortly",
        )
        .retry_after(Duration::from_secs(1))
    }

    /// Bulk refused by admission control before it was stored: nothing is lost; retry after
    /// the Retry-After delay (critical and high events are admitted on budgets of their own).
    pub fn shed(class: &str, why: &str, retry_after: Duration) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "Gateway overloaded",
            format!(
                "{class} events are being admitted {why}, so this event was not stored; retry \
                 after the Retry-After delay with the same event_id or idempotency_key"
            ),
        )
        .retry_after(retry_after)
    }

    /// A bulk event sent to the priority door, which takes critical and high events only.
    pub fn misdirected(class: &str) -> Self {
        Self::new(
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected",
            "Not an event for the priority door",
            format!(
                "the priority door takes critical and high events only and this one is {class} by \
                 its content: send it to the main door (`gateway.listen`); nothing was stored"
            ),
        )
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            detail,
        )
    }
}

pub(crate) async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        "this route does not accept that method",
    )
}

#[derive(Serialize)]
struct Body<'a> {
    r#type: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    errors: &'a [FieldError],
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = Body {
            r#type: format!("{TYPE_BASE}{}", self.slug),
            title: self.title,
            status: self.status.as_u16(),
            detail: &self.detail,
            errors: &self.errors,
            retry_after_ms: self.retry_after.map(retry_after_ms),
        };
        // Serializing strings and numbers cannot fail.
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (self.status, json).into_response();
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(wait) = self.retry_after {
            // `Retry-After` counts whole seconds: rounded up, so a client that honours only it
            // never comes back early; the exact wait for clients that can use it.
            let seconds = wait.as_millis().div_ceil(1000).max(1);
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds as u64));
            headers.insert(RETRY_AFTER_MS, HeaderValue::from(retry_after_ms(wait)));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn render(problem: Problem) -> (Response, serde_json::Value) {
        let response = problem.into_response();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        let json = serde_json::from_slice(&bytes).expect("json");
        (Response::from_parts(parts, axum::body::Body::empty()), json)
    }

    #[tokio::test]
    async fn renders_rfc9457_with_field_errors() {
        let (response, json) = render(Problem::invalid_event(ValidationErrors(vec![FieldError {
            field: "payload.deal_won.amount.minor_units".into(),
            message: "must be > 0".into(),
        }])))
        .await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/problem+json");
        assert_eq!(
            json,
            serde_json::json!({
                "type": "https://crm-events.dev/problems/invalid-event",
                "title": "Event failed validation",
                "status": 400,
                "detail": "1 field(s) are invalid",
                "errors": [{"field": "payload.deal_won.amount.minor_units", "message": "must be > 0"}],
            })
        );
    }

    #[tokio::test]
    async fn adds_retry_after_and_www_authenticate() {
        let (response, json) = render(Problem::unavailable()).await;
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        assert!(json.get("errors").is_none(), "{json}");
        let (response, _) = render(Problem::unauthorized()).await;
        assert_eq!(response.headers()[WWW_AUTHENTICATE], "Bearer");
        assert!(response.headers().get(RETRY_AFTER).is_none());
        // A paced refusal: whole seconds rounded up, and the exact wait.
        let (response, json) =
            render(Problem::shed("bulk", "slowly", Duration::from_millis(1500))).await;
        assert_eq!(response.headers()[RETRY_AFTER], "2");
        assert_eq!(response.headers()[RETRY_AFTER_MS], "1500");
        assert_eq!(json["retry_after_ms"], 1500);
        let (response, _) =
            render(Problem::shed("bulk", "slowly", Duration::from_millis(100))).await;
        assert_eq!(response.headers()[RETRY_AFTER], "1", "never 0");
    }
}
