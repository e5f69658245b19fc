use crate::Readiness;
use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};
use tokio::{net::TcpListener, task::JoinHandle};

/// Content type of the Prometheus text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// The admin endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen for admin requests on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// What `/healthz` asks: the loops that are stuck, each with how long it has made no progress;
/// none while the process is live.
pub type LivenessCheck = Arc<dyn Fn() -> Vec<(String, Duration)> + Send + Sync>;

/// A liveness check for a process with no loops to watch.
pub fn always_live() -> LivenessCheck {
    Arc::new(Vec::new)
}

#[derive(Clone)]
struct AdminState {
    handle: PrometheusHandle,
    readiness: Readiness,
    liveness: LivenessCheck,
}

/// `GET /metrics` (Prometheus text), `GET /healthz` (200 `ok` while every loop makes progress,
/// else 503 naming the stuck ones, so that a supervisor restarts the process) and `GET /readyz`
/// (200 when every readiness check passes, else 503 naming the failing ones).
pub fn admin_router(
    handle: PrometheusHandle,
    readiness: Readiness,
    liveness: LivenessCheck,
) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(ready))
        .with_state(AdminState {
            handle,
            readiness,
            liveness,
        })
}

#[derive(Serialize)]
struct Stuck {
    #[serde(rename = "loop")]
    name: String,
    no_progress_s: f64,
}

async fn healthz(State(state): State<AdminState>) -> Response {
    let stuck: Vec<Stuck> = (state.liveness)()
        .into_iter()
        .map(|(name, quiet)| Stuck {
            name,
            no_progress_s: (quiet.as_secs_f64() * 10.0).round() / 10.0,
        })
        .collect();
    if stuck.is_empty() {
        return "ok".into_response();
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({ "live": false, "stuck": stuck })),
    )
        .into_response()
}

async fn render_metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        state.handle.render(),
    )
}

async fn ready(State(state): State<AdminState>) -> impl IntoResponse {
    let report = state.readiness.report();
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report))
}

/// Bind `addr` (port 0 picks a free port) and serve `router` until `shutdown` resolves, then
/// finish in-flight requests. Returns the bound address and the server task.
pub async fn serve_admin(
    addr: SocketAddr,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, JoinHandle<io::Result<()>>), AdminError> {
    let bind_error = |source| AdminError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
    });
    Ok((bound, server))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{install_recorder, metrics::*};
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::ServiceExt;

    async fn get(router: &Router, path: &str) -> (StatusCode, Option<String>, String) {
        let request = axum::http::Request::get(path)
            .body(Body::empty())
            .expect("request");
        let response = router.clone().oneshot(request).await.expect("response");
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (
            status,
            content_type,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    #[tokio::test]
    async fn metrics_are_rendered_with_help_and_latency_buckets() {
        let handle = install_recorder().expect("recorder");
        install_recorder().expect("installing again returns the same handle");
        ::metrics::counter!(ROUTER_ROUTED_TOTAL, "lane" => "critical", "reason" => "payment_failed")
            .increment(3);
        ::metrics::histogram!(LANE_E2E_LATENCY_SECONDS, "lane" => "critical").record(0.003);
        ::metrics::histogram!(WORKER_BATCH_SIZE, "role" => "router", "lane" => "bulk").record(40.0);
        let router = admin_router(handle, Readiness::default(), always_live());

        let (status, content_type, body) = get(&router, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type.as_deref(), Some(METRICS_CONTENT_TYPE));
        for expected in [
            "# HELP crm_router_routed_total Events routed",
            "# TYPE crm_router_routed_total counter",
            "crm_router_routed_total{lane=\"critical\",reason=\"payment_failed\"} 3",
            "# TYPE crm_lane_e2e_latency_seconds histogram",
            "crm_lane_e2e_latency_seconds_bucket{lane=\"critical\",le=\"0.0025\"} 0",
            "crm_lane_e2e_latency_seconds_bucket{lane=\"critical\",le=\"0.005\"} 1",
            "crm_lane_e2e_latency_seconds_bucket{lane=\"critical\",le=\"0.0001\"} 0",
            "crm_worker_batch_size_bucket{role=\"router\",lane=\"bulk\",le=\"50\"} 1",
        ] {
            assert!(body.contains(expected), "{expected:?} not in\n{body}");
        }
    }

    #[tokio::test]
    async fn healthz_and_readyz() {
        let handle = install_recorder().expect("recorder");
        let readiness = Readiness::with_checks(["nats", "streams"]);
        let stuck = Arc::new(std::sync::Mutex::new(Vec::new()));
        let check: LivenessCheck = {
            let stuck = stuck.clone();
            Arc::new(move || stuck.lock().expect("lock").clone())
        };
        let router = admin_router(handle, readiness.clone(), check);

        let (status, _, body) = get(&router, "/healthz").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
        stuck
            .lock()
            .expect("lock")
            .push(("projector/high".to_owned(), Duration::from_millis(61_250)));
        let (status, content_type, body) = get(&router, "/healthz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(content_type.as_deref(), Some("application/json"));
        assert_eq!(
            body,
            r#"{"live":false,"stuck":[{"loop":"projector/high","no_progress_s":61.3}]}"#
        );
        stuck.lock().expect("lock").clear();

        let (status, content_type, body) = get(&router, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(content_type.as_deref(), Some("application/json"));
        assert_eq!(body, r#"{"ready":false,"failing":["nats","streams"]}"#);

        readiness.set("nats", true);
        let (status, _, body) = get(&router, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, r#"{"ready":false,"failing":["streams"]}"#);

        readiness.set("streams", true);
        let (status, _, body) = get(&router, "/readyz").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, r#"{"ready":true,"failing":[]}"#);

        assert_eq!(get(&router, "/nope").await.0, StatusCode::NOT_FOUND);
    }

    /// One HTTP/1.1 request over a plain TCP connection; returns the whole response.
    async fn http_get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
    }

    #[tokio::test]
    async fn serves_on_a_real_port_until_shutdown() {
        let handle = install_recorder().expect("recorder");
        ::metrics::counter!(DLQ_EVENTS_TOTAL, "stage" => "router", "reason" => "invalid_event")
            .increment(1);
        let readiness = Readiness::with_checks(["nats"]);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr, server) = serve_admin(
            "127.0.0.1:0".parse().expect("addr"),
            admin_router(handle, readiness.clone(), always_live()),
            async {
                let _ = stopped.await;
            },
        )
        .await
        .expect("serve");
        assert_ne!(addr.port(), 0);

        let health = http_get(addr, "/healthz").await;
        assert!(health.starts_with("HTTP/1.1 200 OK\r\n"), "{health}");
        assert!(health.ends_with("\r\n\r\nok"), "{health}");

        let metrics = http_get(addr, "/metrics").await;
        assert!(
            metrics.contains("crm_dlq_events_total{stage=\"router\",reason=\"invalid_event\"} 1"),
            "{metrics}"
        );

        assert!(http_get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        readiness.set("nats", true);
        assert!(http_get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));

        // A second server cannot take the same port, and says which address.
        let taken = serve_admin(addr, Router::new(), std::future::pending())
            .await
            .expect_err("port in use");
        assert!(taken.to_string().contains(&addr.to_string()), "{taken}");

        stop.send(()).expect("server still running");
        let finished = tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .expect("graceful shutdown is prompt");
        assert!(matches!(finished, Ok(Ok(()))), "{finished:?}");
    }

    #[test]
    fn describe_all_and_init_tracing_are_repeatable() {
        install_recorder().expect("recorder");
        crate::describe_all();
        crate::describe_all();
        crate::init_tracing();
        crate::init_tracing();
        tracing::info!("logging works after two inits");
    }
}
