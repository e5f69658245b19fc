//! What the end-to-end tests share: a config for a test server and store, the platform running
//! in this process, a bus connection.

#![allow(dead_code)]

use bus::{Bus, ConnectOptions};
use cli::{
    config::Config,
    roles::{self, Roles},
};
use std::net::SocketAddr;
use test_support::NatsServer;

pub const KEY: &str = "test-key";

pub fn config(nats: &NatsServer, store_url: &str) -> Config {
    let mut config = Config::default();
    config.nats.url = nats.url();
    config.store.url = store_url.to_owned();
    config.admin.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.gateway.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.gateway.api_keys = vec![gateway::ApiKey {
        sha256: gateway::hash_key(KEY),
        tenant: "acme".into(),
    }];
    config
}

/// A platform running in this process until `stop` is sent.
pub struct Platform {
    pub gateway: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Platform {
    pub async fn start(config: &Config, roles: Roles) -> Self {
        let running = roles::start(config, roles, "test")
            .await
            .expect("platform starts");
        assert!(
            running.readiness.is_ready(),
            "{:?}",
            running.readiness.report().failing
        );
        let gateway = running.gateway_addr;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(running.run_until(async {
            let _ = stopped.await;
        }));
        Self {
            gateway,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.expect("gateway runs"))
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("join").expect("clean shutdown");
        }
    }
}

pub const ALL: Roles = Roles::ALL;

/// POST `event` as JSON to the platform's gateway with the test key: the status and the body.
pub async fn post(
    client: &reqwest::Client,
    platform: &Platform,
    event: &events::Event,
) -> (u16, serde_json::Value) {
    let response = client
        .post(platform.url("/v1/events"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(events::encode_json(event))
        .send()
        .await
        .expect("POST");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON body"))
}

pub async fn bus(nats: &NatsServer) -> Bus {
    Bus::connect(&ConnectOptions::new(nats.url()))
        .await
        .expect("connect")
}

/// Publish `event` to its ingest subject (protobuf, `Nats-Msg-Id` = its event id) and wait for
/// JetStream to store it.
pub async fn publish_event(bus: &Bus, event: &events::Event) -> bus::Published {
    let kind = events::EventType::of(event).expect("the event has a payload");
    let subject = events::ingest_subject(&event.tenant_id, kind).expect("subject");
    bus.publish(
        &subject,
        events::encode_proto(event).into(),
        &bus::PublishOptions::with_msg_id(event.event_id.clone()),
    )
    .await
    .expect("stored")
}

/// Publish `count` events of `kind` for tenant `acme` (customers `<prefix>-0` … `<prefix>-499`),
/// pipelined in windows of 1,000 (the client bounds how many acks may be outstanding).
pub async fn publish_backlog(bus: &Bus, kind: events::EventType, count: usize, prefix: &str) {
    let events: Vec<events::Event> = (0..count)
        .map(|i| events::sample::event(kind, "acme", &format!("{prefix}-{}", i % 500)))
        .collect();
    publish_events(bus, &events, "").await;
}

/// Publish `events` to their ingest subjects, pipelined in windows of 1,000, each with
/// `Nats-Msg-Id` = its event id followed by `id_suffix` (another suffix stores the same events
/// again, as a producer's retry past the duplicate window would).
pub async fn publish_events(bus: &Bus, events: &[events::Event], id_suffix: &str) {
    for window in events.chunks(1000) {
        let mut acks = Vec::with_capacity(window.len());
        for event in window {
            let kind = events::EventType::of(event).expect("the event has a payload");
            let subject = events::ingest_subject(&event.tenant_id, kind).expect("subject");
            let options =
                bus::PublishOptions::with_msg_id(format!("{}{id_suffix}", event.event_id));
            let ack = bus
                .send(&subject, events::encode_proto(event).into(), &options)
                .await
                .expect("send");
            acks.push((subject, ack));
        }
        for (subject, ack) in acks {
            bus.await_ack(&subject, ack).await.expect("stored");
        }
    }
}
