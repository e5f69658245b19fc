//! The event spine end to end: gateway → CRM_INGEST → router → lanes → projector → store,
//! against a real nats-server and real SQLite / PostgreSQL.

use bus::{Bus, ConnectOptions, PublishOptions, WorkerConfig, headers, jetstream};
use cli::{
    config::Config,
    roles::{self, Roles},
};
use events::{DlqStage, EventType};
use serde_json::Value;
use std::{net::SocketAddr, sync::Arc};
use store::Store;
use test_support::{NatsServer, TempPostgres, TempSqlite, eventually};

const KEY: &str = "test-key";

fn config(nats: &NatsServer, store_url: &str) -> Config {
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
struct Platform {
    gateway: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Platform {
    async fn start(config: &Config, roles: Roles) -> Self {
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

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.expect("gateway runs"))
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("join").expect("clean shutdown");
        }
    }
}

const ALL: Roles = Roles {
    gateway: true,
    router: true,
    projector: true,
};

async fn bus(nats: &NatsServer) -> Bus {
    Bus::connect(&ConnectOptions::new(nats.url()))
        .await
        .expect("connect")
}

async fn post(
    client: &reqwest::Client,
    platform: &Platform,
    event: &events::Event,
) -> (u16, Value) {
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

async fn post_then_read(store_url: &str) {
    let nats = NatsServer::start();
    let platform = Platform::start(&config(&nats, store_url), ALL).await;
    let client = reqwest::Client::new();

    let mut event = events::sample::event(EventType::ContactCreated, "acme", "cust-1");
    event.idempotency_key = "signup-cust-1".into();
    let (status, body) = post(&client, &platform, &event).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["duplicate"], false);
    assert_eq!(body["event_id"], event.event_id.as_str());

    // Same idempotency key again (a client retry with a fresh event id): one effect.
    let mut retry = event.clone();
    retry.event_id = events::new_event_id();
    let (status, body) = post(&client, &platform, &retry).await;
    assert_eq!(status, 202);
    assert_eq!(body["duplicate"], true, "{body}");

    let read = || async {
        client
            .get(platform.url("/v1/customers/cust-1"))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("GET")
    };
    eventually("the profile", || async { read().await.status() == 200 }).await;
    let profile: Value = read().await.json().await.expect("json");
    assert_eq!(profile["fields"]["email"], "ada@example.com");
    assert_eq!(profile["events_applied"], 1);
    let missing = client
        .get(platform.url("/v1/customers/nobody"))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("GET");
    assert_eq!(missing.status(), 404);
    platform.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_then_read_profile_sqlite() {
    let db = TempSqlite::new();
    post_then_read(&db.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_then_read_profile_postgres() {
    let db = TempPostgres::create().await;
    post_then_read(&db.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_events_overtake_a_standard_backlog() {
    const STANDARD: usize = 20_000;
    const CRITICAL: usize = 20;
    let nats = NatsServer::start();
    let db = TempSqlite::new();
    let config = config(&nats, &db.url());
    // Gateway and router first: the standard backlog is routed and waits in its lane.
    let front = Platform::start(
        &config,
        Roles {
            gateway: true,
            router: true,
            projector: false,
        },
    )
    .await;
    let bus = bus(&nats).await;
    let subject = events::ingest_subject("acme", EventType::PageViewed).expect("subject");
    // Pipelined in windows: the client bounds how many acks may be outstanding.
    for window in (0..STANDARD).collect::<Vec<_>>().chunks(1000) {
        let mut acks = Vec::with_capacity(window.len());
        for i in window {
            let event =
                events::sample::event(EventType::PageViewed, "acme", &format!("std-{}", i % 500));
            let options = PublishOptions::with_msg_id(event.event_id.clone());
            acks.push(
                bus.send(&subject, events::encode_proto(&event).into(), &options)
                    .await
                    .expect("send"),
            );
        }
        for ack in acks {
            bus.await_ack(&subject, ack).await.expect("stored");
        }
    }
    eventually("the standard backlog to be routed", || async {
        let stream = bus
            .jetstream()
            .get_stream("CRM_LANE_STANDARD")
            .await
            .expect("lane");
        stream.get_info().await.expect("info").state.messages as usize == STANDARD
    })
    .await;

    // The projector starts on the backlog; then critical events arrive over HTTP.
    let back = Platform::start(
        &config,
        Roles {
            gateway: false,
            router: false,
            projector: true,
        },
    )
    .await;
    let client = reqwest::Client::new();
    for i in 0..CRITICAL {
        let event = events::sample::event(EventType::PaymentFailed, "acme", &format!("crit-{i}"));
        assert_eq!(post(&client, &front, &event).await.0, 202);
    }
    let store = Store::connect(&db.url()).await.expect("store");
    eventually("every critical event to be projected", || async {
        let mut done = 0;
        for i in 0..CRITICAL {
            if store
                .profile("acme", &format!("crit-{i}"))
                .await
                .expect("read")
                .is_some()
            {
                done += 1;
            }
        }
        done == CRITICAL
    })
    .await;
    let projected = store.processed_count().await.expect("count") as usize;
    let standard_done = projected - CRITICAL;
    eprintln!(
        "when the last of {CRITICAL} critical events was projected: {standard_done} of {STANDARD} standard were"
    );
    assert!(
        standard_done < STANDARD / 2,
        "all {CRITICAL} critical events were projected while {standard_done} of {STANDARD} standard \
         events were: most of the backlog should still be pending"
    );
    back.shutdown().await;
    front.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_events_on_nats_are_dead_lettered_and_a_fixed_one_replays() {
    let nats = NatsServer::start();
    let db = TempSqlite::new();
    let platform = Platform::start(&config(&nats, &db.url()), ALL).await;
    let bus = bus(&nats).await;

    // Not JSON at all, and a well-formed event that fails validation.
    let garbage =
        PublishOptions::with_msg_id("garbage-1").header(headers::CONTENT_TYPE, "application/json");
    bus.publish(
        "crm.ingest.acme.deal_won",
        bytes::Bytes::from_static(b"{not json"),
        &garbage,
    )
    .await
    .expect("stored");
    let mut invalid = events::sample::event(EventType::DealWon, "acme", "cust-dlq");
    if let Some(events::pb::event::Payload::DealWon(won)) = invalid.payload.as_mut() {
        won.deal_id.clear();
    }
    bus.publish(
        "crm.ingest.acme.deal_won",
        events::encode_proto(&invalid).into(),
        &PublishOptions::with_msg_id(invalid.event_id.clone()),
    )
    .await
    .expect("stored");
    // A valid event behind them is not blocked.
    let fine = events::sample::event(EventType::PageViewed, "acme", "cust-fine");
    bus.publish(
        "crm.ingest.acme.page_viewed",
        events::encode_proto(&fine).into(),
        &PublishOptions::with_msg_id(fine.event_id.clone()),
    )
    .await
    .expect("stored");

    eventually("two dead letters", || async {
        bus.dlq_list(1, 10).await.expect("list").len() == 2
    })
    .await;
    let letters = bus.dlq_list(1, 10).await.expect("list");
    for letter in &letters {
        assert_eq!(letter.reason, "invalid_event");
        assert_eq!(letter.stage, "router");
        assert_eq!(letter.origin_stream, "CRM_INGEST");
        assert_eq!(letter.subject, "crm.dlq.router.acme.deal_won");
    }
    assert!(
        letters[0].error.contains("invalid JSON"),
        "{}",
        letters[0].error
    );
    assert!(
        letters[1]
            .error
            .contains("payload.deal_won.deal_id: is required"),
        "{}",
        letters[1].error
    );
    let store = Store::connect(&db.url()).await.expect("store");
    eventually("the valid event", || async {
        store
            .profile("acme", "cust-fine")
            .await
            .expect("read")
            .is_some()
    })
    .await;

    // Fix the invalid event and replay it from the DLQ.
    let mut fixed = invalid.clone();
    if let Some(events::pb::event::Payload::DealWon(won)) = fixed.payload.as_mut() {
        won.deal_id = "deal-7".into();
    }
    let subject = events::ingest_subject("acme", EventType::DealWon).expect("subject");
    bus.dlq_replay(
        letters[1].seq,
        Some((subject, events::encode_proto(&fixed).into())),
    )
    .await
    .expect("replayed");
    eventually("the fixed event to be projected", || async {
        store
            .profile("acme", "cust-dlq")
            .await
            .expect("read")
            .is_some_and(|p| p.lifetime_value_minor == 1_250_000)
    })
    .await;
    assert_eq!(
        bus.dlq_list(1, 10).await.expect("list").len(),
        1,
        "the replayed letter is gone"
    );
    platform.shutdown().await;
}

/// Commits the batch through the real projector, then hangs: the worker dies before acking.
struct CrashAfterCommit(projector::Projector);

impl bus::Handler for CrashAfterCommit {
    async fn handle(&self, lane: events::Lane, batch: &[jetstream::Message]) -> Vec<bus::Outcome> {
        let _ = bus::Handler::handle(&self.0, lane, batch).await;
        std::future::pending().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_after_commit_redelivers_with_exactly_one_effect() {
    const EVENTS: usize = 200;
    let nats = NatsServer::start();
    let db = TempSqlite::new();
    let bus = bus(&nats).await;
    let mut definitions = bus::Definitions::embedded().expect("definitions");
    for consumer in definitions
        .consumers
        .iter_mut()
        .filter(|c| c.durable == "projector")
    {
        // Redeliver quickly after the crash.
        consumer
            .config
            .insert("ack_wait".into(), 1_000_000_000u64.into());
    }
    bus.provision(&definitions).await.expect("provision");
    let subject =
        events::lane_subject(events::Lane::High, "acme", EventType::DealWon).expect("subject");
    for i in 0..EVENTS {
        let mut event = events::sample::event(EventType::DealWon, "acme", &format!("c-{}", i % 10));
        if let Some(events::pb::event::Payload::DealWon(won)) = event.payload.as_mut() {
            won.deal_id = format!("deal-{i}");
        }
        bus.publish(
            &subject,
            events::encode_proto(&event).into(),
            &PublishOptions::with_msg_id(event.event_id.clone()),
        )
        .await
        .expect("stored");
    }
    let store = Store::connect(&db.url()).await.expect("store");

    let mut worker = WorkerConfig::new("projector", "projector", DlqStage::Projector);
    worker.max_batch = 64;
    let crashing = Arc::new(CrashAfterCommit(projector::Projector::new(
        store.clone(),
        bus.clone(),
    )));
    let task = tokio::spawn(bus::run_worker(
        bus.clone(),
        worker,
        crashing,
        bus::CancellationToken::new(),
    ));
    eventually("a committed batch", || async {
        store.processed_count().await.expect("count") > 0
    })
    .await;
    task.abort();
    let _ = task.await;
    let committed_before_crash = store.processed_count().await.expect("count");
    assert!(
        committed_before_crash < EVENTS as i64,
        "the crash happened mid-stream"
    );

    // A fresh projector gets the unacked batch again; the ledger makes it a no-op.
    // Run the projector directly: starting the platform would re-provision the 30 s ack wait.
    let shutdown = bus::CancellationToken::new();
    let fresh = tokio::spawn(projector::run(
        bus.clone(),
        store.clone(),
        projector::ProjectorConfig::default(),
        shutdown.clone(),
    ));
    eventually("every event", || async {
        store.processed_count().await.expect("count") == EVENTS as i64
    })
    .await;
    let consumer: jetstream::consumer::PullConsumer = bus
        .jetstream()
        .get_consumer_from_stream("projector", "CRM_LANE_HIGH")
        .await
        .expect("consumer");
    eventually("everything acked", || async {
        let info = consumer.get_info().await.expect("info");
        info.num_pending == 0 && info.num_ack_pending == 0
    })
    .await;
    let info = consumer.get_info().await.expect("info");
    assert!(
        info.num_redelivered > 0 || info.delivered.consumer_sequence > EVENTS as u64,
        "the crashed batch was redelivered"
    );
    for customer in 0..10 {
        let profile = store
            .profile("acme", &format!("c-{customer}"))
            .await
            .expect("read")
            .expect("exists");
        assert_eq!(profile.events_applied, (EVENTS / 10) as i64);
        assert_eq!(
            profile.lifetime_value_minor,
            1_250_000 * (EVENTS / 10) as i64,
            "each won deal counted once"
        );
    }
    shutdown.cancel();
    fresh.await.expect("join").expect("projector stops cleanly");
}
