//! What the gateway's HTTP tests share: a gateway serving over real HTTP against a real
//! nats-server (one per test, provisioned), and readers for its answers.

#![allow(dead_code)]

use bus::Bus;
use events::{Event, EventType};
use gateway::{ApiKey, GatewayConfig, ReadModel, hash_key};
use reqwest::{Response, StatusCode};
use serde_json::Value;
use std::{net::SocketAddr, sync::Arc};
use test_support::NatsServer;
use tokio::sync::oneshot;

pub const KEY: &str = "acme-secret-key";

pub struct Gateway {
    pub server: NatsServer,
    pub bus: Bus,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    pub stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<Result<(), gateway::GatewayError>>,
}

pub async fn start() -> Gateway {
    start_with(|_| {}, None).await
}

/// Rules without a critical or high rule: every event is bulk and goes to CRM_INGEST.
pub fn bulk_only_rules() -> gateway::RulesSource {
    let rules = Arc::new(routing::Rules::from_toml("").expect("empty rules are valid"));
    Arc::new(move || rules.clone())
}

pub async fn start_with(
    tweak: impl FnOnce(&mut GatewayConfig),
    profiles: Option<Arc<dyn ReadModel>>,
) -> Gateway {
    start_classified(tweak, profiles, bulk_only_rules()).await
}

pub async fn start_classified(
    tweak: impl FnOnce(&mut GatewayConfig),
    profiles: Option<Arc<dyn ReadModel>>,
    rules: gateway::RulesSource,
) -> Gateway {
    let server = NatsServer::start();
    let bus = test_support::provisioned_bus(&server.url()).await;
    let mut config = GatewayConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        api_keys: vec![ApiKey {
            sha256: hash_key(KEY),
            tenant: "acme".into(),
        }],
        ..GatewayConfig::default()
    };
    tweak(&mut config);
    let (stop, stopped) = oneshot::channel::<()>();
    let gateway::Serving { addr, task, .. } =
        gateway::serve(&config, bus.clone(), rules, profiles, async {
            let _ = stopped.await;
        })
        .await
        .expect("serves");
    Gateway {
        server,
        bus,
        addr,
        http: reqwest::Client::new(),
        stop: Some(stop),
        task,
    }
}

impl Gateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn post(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::RequestBuilder {
        self.http
            .post(self.url(path))
            .bearer_auth(KEY)
            .header("content-type", content_type)
            .body(body)
    }

    pub async fn post_event(&self, event: &Event) -> Response {
        self.post("/v1/events", "application/json", events::encode_json(event))
            .send()
            .await
            .expect("request")
    }

    pub async fn ingest_messages(&self) -> u64 {
        messages_in(&self.bus, "CRM_INGEST").await
    }

    pub async fn stored(&self, seq: u64) -> bus::jetstream::message::StreamMessage {
        self.bus
            .jetstream()
            .get_stream("CRM_INGEST")
            .await
            .expect("stream")
            .get_raw_message(seq)
            .await
            .expect("stored message")
    }
}

pub fn deal_won() -> Event {
    events::sample::event(EventType::DealWon, "acme", "cust-1")
}

/// Status, then the problem body after checking it is `application/problem+json`.
pub async fn problem(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "{status}"
    );
    let body: Value = response.json().await.expect("problem json");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert!(
        body["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("https://crm-events.dev/problems/")),
        "{body}"
    );
    (status, body)
}

pub fn fields(problem: &Value) -> Vec<&str> {
    problem["errors"]
        .as_array()
        .map(|errors| errors.iter().filter_map(|e| e["field"].as_str()).collect())
        .unwrap_or_default()
}

/// How many messages `stream` holds.
pub async fn messages_in(bus: &Bus, stream: &str) -> u64 {
    let mut stream = bus.jetstream().get_stream(stream).await.expect("stream");
    stream.info().await.expect("info").state.messages
}
