//! Observability in one place: tracing init, every metric name with its help text, the
//! Prometheus recorder, readiness flags and the admin endpoints `/metrics`, `/healthz`, `/readyz`.

mod admin;
pub mod metrics;
mod readiness;
mod traces;

pub use admin::{
    AdminError, LivenessCheck, METRICS_CONTENT_TYPE, admin_router, always_live, serve_admin,
};
pub use metrics::describe_all;
pub use metrics_exporter_prometheus::PrometheusHandle;
pub use readiness::{Readiness, ReadinessReport};
pub use traces::TracingGuard;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use std::{sync::OnceLock, time::Duration};

/// Environment variable holding the log filter (`tracing` env-filter syntax); default `info`.
pub const LOG_ENV: &str = "CRM_LOG";
/// Environment variable choosing the log format: `json` for JSON lines, else human-readable.
pub const LOG_FORMAT_ENV: &str = "CRM_LOG_FORMAT";

/// Buckets for every `*_seconds` histogram: 100 µs to 10 s.
pub const SECONDS_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Buckets for [`metrics::WORKER_BATCH_SIZE`].
pub const BATCH_SIZE_BUCKETS: [f64; 11] = [
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
];

/// How often histogram samples are folded into their buckets when nobody scrapes, so memory
/// stays bounded under load.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The Prometheus recorder could not be installed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RecorderError {
    #[error("building the Prometheus recorder: {0}")]
    Build(String),
    #[error("another metrics recorder is already installed in this process")]
    OtherRecorderInstalled,
}

static RECORDER: OnceLock<Result<PrometheusHandle, RecorderError>> = OnceLock::new();

/// Install the process-wide Prometheus recorder (with [`SECONDS_BUCKETS`] for `*_seconds`
/// histograms) and describe every metric. Idempotent: later calls return the same handle.
pub fn install_recorder() -> Result<PrometheusHandle, RecorderError> {
    RECORDER.get_or_init(install).clone()
}

fn install() -> Result<PrometheusHandle, RecorderError> {
    let build =
        |err: metrics_exporter_prometheus::BuildError| RecorderError::Build(err.to_string());
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
        .map_err(build)?
        .set_buckets_for_metric(
            Matcher::Full(metrics::WORKER_BATCH_SIZE.into()),
            &BATCH_SIZE_BUCKETS,
        )
        .map_err(build)?
        .build_recorder();
    let handle = recorder.handle();
    ::metrics::set_global_recorder(recorder).map_err(|_| RecorderError::OtherRecorderInstalled)?;
    describe_all();

    let upkeep = handle.clone();
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            }
        });
    if let Err(error) = spawned {
        // Scrapes still drain histograms; only an unscraped process accumulates samples.
        tracing::warn!(%error, "no metrics upkeep thread; histograms drain only when scraped");
    }
    Ok(handle)
}

/// Log to stderr: filter from `CRM_LOG` (default `info`), JSON lines when `CRM_LOG_FORMAT=json`.
/// Safe to call more than once: only the first call installs a subscriber. Spans are not
/// exported; a role uses [`init_tracing_as`].
pub fn init_tracing() {
    init_tracing_at("info");
}

/// [`init_tracing`] with another default filter when `CRM_LOG` is unset or invalid: one-shot
/// commands (`crm status`, `crm dlq list`, …) log at `warn`, so their output is not interleaved
/// with connection notices.
pub fn init_tracing_at(default_filter: &str) {
    drop(traces::install(None, default_filter));
}

/// [`init_tracing_at`] for a process that handles events (`service` names it, e.g. `crm-router`;
/// `OTEL_SERVICE_NAME` overrides it): when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, its spans are exported there over OTLP/HTTP.
/// Keep the guard until the process ends: dropping it sends what is still buffered.
pub fn init_tracing_as(service: &str, default_filter: &str) -> TracingGuard {
    traces::install(Some(service), default_filter)
}
