//! Observability in one place: tracing init, every metric name with its help text, the
//! Prometheus recorder, and the admin endpoints `/metrics`, `/healthz`, `/readyz`.

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
};

/// Metric names (labels are bounded: never tenant or customer ids).
pub mod names {
    pub const GATEWAY_REQUESTS: &str = "crm_gateway_requests_total";
    pub const GATEWAY_REQUEST_DURATION: &str = "crm_gateway_request_duration_seconds";
    pub const GATEWAY_INFLIGHT: &str = "crm_gateway_inflight_requests";
    pub const GATEWAY_SHED: &str = "crm_gateway_shed_total";
    pub const LANE_E2E_LATENCY: &str = "crm_lane_e2e_latency_seconds";
    pub const ROUTER_ROUTED: &str = "crm_router_routed_total";
    pub const WORKER_PROCESSED: &str = "crm_worker_processed_total";
    pub const WORKER_BATCH_DURATION: &str = "crm_worker_batch_duration_seconds";
    pub const DLQ_EVENTS: &str = "crm_dlq_events_total";
    pub const CONSUMER_PENDING: &str = "crm_consumer_pending_messages";
    pub const CONSUMER_ACK_PENDING: &str = "crm_consumer_ack_pending_messages";
    pub const CACHE_REQUESTS: &str = "crm_cache_requests_total";
    pub const PROJECTOR_DUPLICATES: &str = "crm_projector_duplicates_total";
    pub const RULES_RELOADS: &str = "crm_rules_reloads_total";
    pub const NATS_CONNECTED: &str = "crm_nats_connected";
}

/// Register help text and units for every metric.
pub fn describe_all() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    use names::*;
    describe_counter!(
        GATEWAY_REQUESTS,
        "HTTP requests by route template and status"
    );
    describe_histogram!(
        GATEWAY_REQUEST_DURATION,
        Unit::Seconds,
        "HTTP request duration by route"
    );
    describe_gauge!(GATEWAY_INFLIGHT, "HTTP requests being handled");
    describe_counter!(
        GATEWAY_SHED,
        "HTTP requests shed with 503 because the gateway was full"
    );
    describe_histogram!(
        LANE_E2E_LATENCY,
        Unit::Seconds,
        "From ingest to projector commit, by lane"
    );
    describe_counter!(ROUTER_ROUTED, "Events routed, by lane and rule reason");
    describe_counter!(
        WORKER_PROCESSED,
        "Messages settled by workers, by role, lane and outcome"
    );
    describe_histogram!(
        WORKER_BATCH_DURATION,
        Unit::Seconds,
        "Handler time per batch"
    );
    describe_counter!(DLQ_EVENTS, "Messages dead-lettered, by stage and reason");
    describe_gauge!(
        CONSUMER_PENDING,
        "Messages not yet delivered to a durable consumer"
    );
    describe_gauge!(CONSUMER_ACK_PENDING, "Messages delivered and awaiting ack");
    describe_counter!(
        CACHE_REQUESTS,
        "Cache lookups by cache and result (hit, miss, error)"
    );
    describe_counter!(
        PROJECTOR_DUPLICATES,
        "Redelivered events the ledger recognised (no effect)"
    );
    describe_counter!(RULES_RELOADS, "Routing rule reloads by result");
    describe_gauge!(NATS_CONNECTED, "1 while connected to NATS");
}

/// Latency buckets from 100 µs to 10 s.
const SECONDS_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the global Prometheus recorder once; later calls return the same handle.
pub fn install_recorder() -> Result<PrometheusHandle, String> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
        .map_err(|e| e.to_string())?
        .build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        return HANDLE
            .get()
            .cloned()
            .ok_or_else(|| "another metrics recorder is installed".into());
    }
    describe_all();
    let _ = HANDLE.set(handle.clone());
    Ok(handle)
}

/// `CRM_LOG` filter (default `info`), JSON lines when `CRM_LOG_FORMAT=json`.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CRM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if std::env::var("CRM_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Named readiness checks; ready when every registered check passes.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Readiness {
    pub fn set(&self, check: &str, ok: bool) {
        if let Ok(mut checks) = self.checks.lock() {
            checks.insert(check.to_owned(), ok);
        }
    }

    /// The failing checks (empty = ready). No checks registered = not ready.
    pub fn failing(&self) -> Vec<String> {
        match self.checks.lock() {
            Ok(checks) if !checks.is_empty() => checks
                .iter()
                .filter(|(_, ok)| !**ok)
                .map(|(name, _)| name.clone())
                .collect(),
            _ => vec!["starting".into()],
        }
    }

    pub fn is_ready(&self) -> bool {
        self.failing().is_empty()
    }
}

#[derive(Clone)]
struct AdminState {
    handle: PrometheusHandle,
    readiness: Readiness,
}

/// `/metrics`, `/healthz`, `/readyz`.
pub fn admin_router(handle: PrometheusHandle, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(AdminState { handle, readiness })
}

async fn metrics_text(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.handle.render(),
    )
}

async fn ready(State(state): State<AdminState>) -> impl IntoResponse {
    let failing = state.readiness.failing();
    let status = if failing.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({ "ready": failing.is_empty(), "failing": failing })),
    )
}

/// Bind `addr` and serve `router` until `shutdown`; returns the bound address.
pub async fn serve_admin(
    addr: SocketAddr,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get_text(router: &Router, path: &str) -> (StatusCode, String) {
        let response = router
            .clone()
            .oneshot(
                axum::http::Request::get(path)
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("response");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn admin_endpoints() {
        let handle = install_recorder().expect("recorder");
        assert!(install_recorder().is_ok(), "idempotent");
        metrics::counter!(names::ROUTER_ROUTED, "lane" => "critical", "reason" => "test")
            .increment(3);
        let readiness = Readiness::default();
        let router = admin_router(handle, readiness.clone());

        let (status, body) = get_text(&router, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.contains("crm_router_routed_total{lane=\"critical\",reason=\"test\"} 3"),
            "{body}"
        );

        assert_eq!(
            get_text(&router, "/healthz").await,
            (StatusCode::OK, "ok".into())
        );
        let (status, body) = get_text(&router, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("starting"));
        readiness.set("nats", false);
        readiness.set("streams", true);
        let (status, body) = get_text(&router, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"nats\""), "{body}");
        readiness.set("nats", true);
        assert_eq!(get_text(&router, "/readyz").await.0, StatusCode::OK);
    }
}
