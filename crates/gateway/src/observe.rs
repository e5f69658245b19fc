//! The gateway's metrics, each recorded in one place, and the load-shedding answer.

use crate::{
    admission::{Class, Door, Refusal},
    problem::Problem,
    routes,
};
use axum::{
    BoxError,
    extract::{MatchedPath, Request},
    middleware::Next,
    response::Response,
};
use metrics::{Counter, Gauge};
use std::time::Instant;

pub const REQUESTS_TOTAL: &str = "crm_gateway_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "crm_gateway_request_duration_seconds";
pub const INFLIGHT_REQUESTS: &str = "crm_gateway_inflight_requests";
pub const SHED_TOTAL: &str = "crm_gateway_shed_total";

/// The `route` label: a known template, never a raw path (which would carry ids).
fn route_label(request: &Request) -> &'static str {
    label_of(
        request
            .extensions()
            .get::<MatchedPath>()
            .map(MatchedPath::as_str),
    )
}

fn label_of(matched: Option<&str>) -> &'static str {
    routes::ALL
        .iter()
        .copied()
        .find(|route| Some(*route) == matched)
        .unwrap_or("other")
}

/// Counts the in-flight gauge down even when the request future is dropped.
struct InflightGuard;

impl InflightGuard {
    fn enter() -> Self {
        metrics::gauge!(INFLIGHT_REQUESTS).increment(1.0);
        Self
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        metrics::gauge!(INFLIGHT_REQUESTS).decrement(1.0);
    }
}

pub(crate) async fn track(request: Request, next: Next) -> Response {
    let route = route_label(&request);
    let door = request
        .extensions()
        .get::<Door>()
        .map_or(Door::Main, |door| *door)
        .as_str();
    let _inflight = InflightGuard::enter();
    let started = Instant::now();
    let response = next.run(request).await;
    metrics::histogram!(REQUEST_DURATION_SECONDS, "route" => route, "door" => door)
        .record(started.elapsed().as_secs_f64());
    metrics::counter!(
        REQUESTS_TOTAL,
        "route" => route,
        "status" => response.status().as_u16().to_string(),
        "door" => door
    )
    .increment(1);
    response
}

/// `HandleErrorLayer` callback for the shedding stack.
pub(crate) async fn shed(err: BoxError) -> Problem {
    if err.is::<tower::load_shed::error::Overloaded>() {
        shed_one("request");
        Problem::overloaded()
    } else {
        tracing::error!(error = %err, "middleware failed");
        Problem::internal("the request could not be handled")
    }
}

/// A request (`what`: `request`, `read`) refused because every slot of `max_inflight` is taken.
pub(crate) fn shed_one(what: &str) {
    metrics::counter!(SHED_TOTAL).increment(1);
    tracing::debug!("{what} shed: too many in flight");
}

fn class_index(class: Class) -> usize {
    match class {
        Class::Critical => 0,
        Class::High => 1,
        Class::Bulk => 2,
    }
}

fn refusal_index(refusal: Refusal) -> usize {
    match refusal {
        Refusal::Budget => 0,
        Refusal::Rate { .. } => 1,
        Refusal::Misdirected => 2,
    }
}

const CLASSES: [Class; 3] = [Class::Critical, Class::High, Class::Bulk];
/// Every refusal, in [`refusal_index`] order (the retry wait plays no part in the label).
const REFUSALS: [Refusal; 3] = [
    Refusal::Budget,
    Refusal::Rate {
        retry_after: std::time::Duration::ZERO,
    },
    Refusal::Misdirected,
];

/// Admission's counters and gauges, registered once when the gateway starts.
#[derive(Debug)]
pub(crate) struct AdmissionSignals {
    admitted: [Counter; 3],
    refused: [[Counter; 3]; 3],
    bulk_rate_limit: Gauge,
    pipeline_delay: Gauge,
}

impl AdmissionSignals {
    pub(crate) fn new() -> Self {
        Self {
            admitted: CLASSES.map(
                |class| metrics::counter!("crm_gateway_admitted_total", "class" => class.as_str()),
            ),
            refused: CLASSES.map(|class| {
                REFUSALS.map(|reason| {
                    metrics::counter!(
                        "crm_gateway_refused_total",
                        "class" => class.as_str(),
                        "reason" => reason.as_str()
                    )
                })
            }),
            bulk_rate_limit: metrics::gauge!("crm_gateway_bulk_rate_limit"),
            pipeline_delay: metrics::gauge!("crm_gateway_pipeline_delay_seconds"),
        }
    }

    pub(crate) fn admitted(&self, class: Class) {
        self.admitted[class_index(class)].increment(1);
    }

    pub(crate) fn refused(&self, class: Class, refusal: Refusal) {
        self.refused[class_index(class)][refusal_index(refusal)].increment(1);
    }

    /// The bulk rate in force and, when the pipeline reported, its delay.
    pub(crate) fn controller(&self, bulk_rate: f64, pipeline_delay_s: Option<f64>) {
        self.bulk_rate_limit.set(bulk_rate);
        if let Some(delay) = pipeline_delay_s {
            self.pipeline_delay.set(delay);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_path_has_a_route_label_of_its_own() {
        let document: serde_json::Value =
            serde_json::from_str(crate::OPENAPI_JSON).expect("openapi.json");
        let paths = document["paths"].as_object().expect("paths");
        assert!(paths.len() >= routes::ALL.len(), "{paths:?}");
        for path in paths.keys() {
            assert_eq!(
                label_of(Some(path)),
                path,
                "{path} is recorded as another route"
            );
        }
        assert_eq!(label_of(Some("/v1/customers/c-1")), "other");
        assert_eq!(label_of(None), "other");
    }

    /// Each admission outcome counts under its own class and reason.
    #[test]
    fn admission_outcomes_count_under_their_labels() {
        let text = test_support::render_metrics(|| {
            let signals = AdmissionSignals::new();
            signals.admitted(Class::High);
            signals.refused(Class::Critical, Refusal::Budget);
            signals.refused(
                Class::Bulk,
                Refusal::Rate {
                    retry_after: std::time::Duration::from_millis(300),
                },
            );
            signals.refused(Class::Bulk, Refusal::Misdirected);
        });
        for line in [
            "crm_gateway_admitted_total{class=\"high\"} 1",
            "crm_gateway_admitted_total{class=\"critical\"} 0",
            "crm_gateway_refused_total{class=\"critical\",reason=\"budget\"} 1",
            "crm_gateway_refused_total{class=\"bulk\",reason=\"rate\"} 1",
            "crm_gateway_refused_total{class=\"bulk\",reason=\"misdirected\"} 1",
            "crm_gateway_refused_total{class=\"bulk\",reason=\"budget\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
