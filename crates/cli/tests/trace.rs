//! Traces through the `crm` binary against a real nats-server: one event's spans — the HTTP
//! request, the router's decision, the projector's commit and the webhook delivery — are exported
//! over OTLP/HTTP to a collector in this test and form one trace, each hop a child of the one
//! before, and the webhook carries the delivery span's context.

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest, common::v1::any_value, trace::v1::Span,
};
use prost::Message;
use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
};
use test_support::{NatsServer, TempSqlite, eventually, serve};

const KEY: &str = "trace-key";
/// The caller's trace: the event's spans must join it.
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// An exported span: its service, name, ids and attributes.
#[derive(Debug, Clone)]
struct Seen {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
    attributes: Vec<(String, String)>,
}

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|value| value.value.as_ref()) {
        Some(any_value::Value::StringValue(text)) => text.clone(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn seen(service: &str, span: &Span) -> Seen {
    Seen {
        service: service.to_owned(),
        name: span.name.clone(),
        trace: hex(&span.trace_id),
        id: hex(&span.span_id),
        parent: hex(&span.parent_span_id),
        attributes: span
            .attributes
            .iter()
            .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
            .collect(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OTLP/HTTP (protobuf) trace collector on a free port.
async fn collector() -> (String, Arc<Mutex<Vec<Seen>>>) {
    let spans: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: bytes::Bytes| {
            let sink = sink.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP request");
                let mut sink = sink.lock().expect("lock");
                for resource in &request.resource_spans {
                    let service = resource
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.name")
                        .map(|kv| text(kv.value.as_ref()))
                        .unwrap_or_default();
                    for scope in &resource.scope_spans {
                        sink.extend(scope.spans.iter().map(|span| seen(&service, span)));
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    (format!("http://{}", serve(app).await), spans)
}

/// A webhook receiver that keeps the `traceparent` of every delivery.
async fn receiver() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let sink = sink.clone();
            async move {
                let traceparent = headers
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                sink.lock().expect("lock").push(traceparent);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    (format!("http://{}/hook", serve(app).await), seen)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// `crm all`, killed when dropped.
struct Crm(Child);

impl Drop for Crm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_events_spans_from_gateway_to_webhook_form_one_trace() {
    let (otlp, spans) = collector().await;
    let (hook, deliveries) = receiver().await;
    let nats = NatsServer::start();
    let db = TempSqlite::new();
    let dir = tempfile::tempdir().expect("a working directory");
    let (gateway, admin) = (free_port(), free_port());
    let config = format!(
        r#"
[nats]
url = "{nats}"
[store]
url = "{store}"
[admin]
listen = "127.0.0.1:{admin}"
[gateway]
listen = "127.0.0.1:{gateway}"
api_keys = [{{ sha256 = "{hash}", tenant = "acme" }}]
[[notifier.webhooks]]
id = "billing"
tenant = "acme"
url = "{hook}"
secret = "whsec_test"
event_types = ["payment_failed"]
"#,
        nats = nats.url(),
        store = db.url(),
        hash = gateway::hash_key(KEY),
    );
    let path = dir.path().join("crm.toml");
    std::fs::write(&path, config).expect("write crm.toml");
    let _crm = Crm(Command::new(env!("CARGO_BIN_EXE_crm"))
        .current_dir(dir.path())
        .args(["--config", path.to_str().expect("utf-8 path"), "all"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("CRM_LOG", "warn")
        .env_remove("CRM_CONFIG")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_TRACES_EXPORTER")
        .env_remove("OTEL_SDK_DISABLED")
        .stdout(Stdio::null())
        .spawn()
        .expect("run crm all"));

    let client = reqwest::Client::new();
    let ready = format!("http://127.0.0.1:{admin}/readyz");
    eventually("crm all is ready", || async {
        client
            .get(&ready)
            .send()
            .await
            .is_ok_and(|response| response.status().is_success())
    })
    .await;

    let event = events::sample::event(events::EventType::PaymentFailed, "acme", "cust-7");
    let response = client
        .post(format!("http://127.0.0.1:{gateway}/v1/events"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{TRACE}-{CALLER_SPAN}-01"))
        .body(events::encode_json(&event))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status().as_u16(), 202);

    eventually("the webhook delivery", || async {
        !deliveries.lock().expect("lock").is_empty()
    })
    .await;
    let of_event = |name: &str| {
        spans
            .lock()
            .expect("lock")
            .iter()
            .find(|span| {
                span.name == name
                    && span
                        .attributes
                        .iter()
                        .any(|(key, value)| key == "event_id" && *value == event.event_id)
            })
            .cloned()
    };
    let names = ["POST /v1/events", "route", "project", "deliver"];
    eventually("every hop's span is exported", || async {
        names.iter().all(|name| of_event(name).is_some())
    })
    .await;
    let [request, route, project, deliver] = names.map(|name| of_event(name).expect("exported"));

    for span in [&request, &route, &project, &deliver] {
        assert_eq!(span.trace, TRACE, "one trace: {span:?}");
        assert_eq!(span.service, "crm-all", "{span:?}");
    }
    assert_eq!(
        request.parent, CALLER_SPAN,
        "the caller's span is the parent"
    );
    assert_eq!(
        route.parent, request.id,
        "the router's decision follows the request"
    );
    assert_eq!(
        project.parent, route.id,
        "the projector's commit follows the decision"
    );
    assert_eq!(
        deliver.parent, route.id,
        "the delivery follows the decision"
    );
    let field = |span: &Seen, name: &str| {
        span.attributes
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    };
    assert_eq!(
        field(&route, "lane").as_deref(),
        Some("critical"),
        "{route:?}"
    );
    assert_eq!(
        field(&deliver, "source").as_deref(),
        Some("critical"),
        "{deliver:?}"
    );
    let webhook = deliveries.lock().expect("lock")[0].clone();
    assert_eq!(
        webhook,
        format!("00-{TRACE}-{}-01", deliver.id),
        "the webhook carries the delivery span's context"
    );
}
