//! The tracing subscriber: log lines to stderr and, when an OTLP endpoint is configured, spans
//! exported over OTLP/HTTP (protobuf) by a batch processor on a thread of its own.

use crate::{LOG_ENV, LOG_FORMAT_ENV};
use bus::trace::Mode;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use std::{io::IsTerminal, time::Duration};
use tracing_subscriber::{
    EnvFilter, Layer, Registry, layer::SubscriberExt, util::SubscriberInitExt,
};

/// What spans are exported at: the platform's own, at info and above.
const EXPORT_FILTER: &str =
    "warn,bus=info,gateway=info,router=info,projector=info,notifier=info,analytics=info,cli=info";
/// Per-export timeout when `OTEL_EXPORTER_OTLP_TIMEOUT` does not say.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Flushes and stops the span exporter when dropped (a no-op when nothing is exported).
#[derive(Debug, Default)]
#[must_use = "dropping the guard stops span export"]
pub struct TracingGuard {
    provider: Option<SdkTracerProvider>,
}

impl TracingGuard {
    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("warning: flushing spans at exit failed: {error}");
        }
    }
}

/// The OTLP endpoint from the standard variables, unless export is switched off.
fn otlp_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|value| !value.trim().is_empty());
    let off = std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|value| value == "none")
        || std::env::var("OTEL_SDK_DISABLED").is_ok_and(|value| value == "true");
    !off && (set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") || set("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

pub(crate) fn install(service: Option<&str>, default_filter: &str) -> TracingGuard {
    let spec = std::env::var(LOG_ENV).ok();
    let filter = |spec: Option<&str>| match spec.map(EnvFilter::try_new) {
        None => (EnvFilter::new(default_filter), None),
        Some(Ok(filter)) => (filter, None),
        Some(Err(error)) => (EnvFilter::new(default_filter), Some(error)),
    };
    let (log_filter, invalid) = filter(spec.as_deref());
    let json = std::env::var(LOG_FORMAT_ENV).is_ok_and(|format| format == "json");
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![if json {
        fmt.json().with_filter(log_filter).boxed()
    } else {
        fmt.with_filter(log_filter).boxed()
    }];
    let (provider, export_error) = match service {
        Some(service) if otlp_configured() => match provider(service) {
            Ok(provider) => (Some(provider), None),
            Err(error) => (None, Some(error)),
        },
        _ => (None, None),
    };
    if let Some(provider) = &provider {
        let tracer = provider.tracer("crm-events");
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(EnvFilter::new(EXPORT_FILTER))
                .boxed(),
        );
    }
    if tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_err()
    {
        // Another subscriber came first (a test harness): leave it, export nothing.
        return TracingGuard::default();
    }
    bus::trace::set_mode(match (&provider, json) {
        (Some(_), _) => Mode::Export,
        (None, true) => Mode::Logs,
        (None, false) => Mode::Off,
    });
    if let Some(error) = invalid {
        tracing::warn!(spec = spec.as_deref(), %error, "{LOG_ENV} is not a valid filter; logging at {default_filter}");
    }
    if let Some(error) = export_error {
        tracing::error!(%error, "cannot export spans over OTLP; logging only");
    }
    TracingGuard { provider }
}

fn provider(service: &str) -> Result<SdkTracerProvider, String> {
    let timeout = std::env::var("OTEL_EXPORTER_OTLP_TIMEOUT")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(EXPORT_TIMEOUT, Duration::from_millis);
    let client = reqwest::blocking::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|err| format!("HTTP client: {err}"))?;
    // The endpoint, headers and timeout come from the standard OTEL_EXPORTER_OTLP_* variables.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(BlockingHttp(client))
        .with_timeout(timeout)
        .build()
        .map_err(|err| format!("OTLP exporter: {err}"))?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_owned());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// OTLP over a blocking client: the batch processor calls the exporter from a thread of its own,
/// outside any async runtime, so a blocking request there holds up nothing else.
#[derive(Debug)]
struct BlockingHttp(reqwest::blocking::Client);

#[async_trait::async_trait]
impl HttpClient for BlockingHttp {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let response = self
            .0
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body.to_vec())
            .send()?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes()?;
        let mut out = Response::builder().status(status).body(body)?;
        *out.headers_mut() = headers;
        Ok(out)
    }
}
