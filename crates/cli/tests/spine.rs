//! The event spine end to end: gateway → CRM_INGEST → router → lanes → projector → store,
//! against a real nats-server and real SQLite / PostgreSQL.

use bus::{PublishOptions, WorkerConfig, headers, jetstream};
use cli::roles::Roles;
use events::{DlqStage, EventType};
use serde_json::Value;
use std::sync::Arc;
use store::Store;
use test_support::{NatsServer, TempPostgres, TempSqlite, eventually};

mod common;
use common::*;

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

    // Analytics counts the event once, too (the duplicate POST was never stored).
    let analytics = |path: &'static str| {
        let request = client.get(platform.url(path)).bearer_auth(KEY);
        async move {
            let response = request.send().await.expect("GET");
            (
                response.status().as_u16(),
                response.json::<Value>().await.expect("json"),
            )
        }
    };
    eventually("the analytics summary", || async {
        analytics("/v1/analytics/summary").await.1["events_counted"] == 1
    })
    .await;
    let (status, summary) = analytics("/v1/analytics/summary").await;
    assert_eq!(status, 200);
    assert_eq!(summary["events_by_type"]["contact_created"], 1, "{summary}");
    let (status, minutes) = analytics("/v1/analytics/events-per-minute?type=contact_created").await;
    assert_eq!(status, 200, "{minutes}");
    assert_eq!(minutes["minutes"][0]["events"], 1, "{minutes}");
    let (status, problem) = analytics("/v1/analytics/events-per-minute?from=yesterday").await;
    assert_eq!(status, 400);
    assert_eq!(problem["errors"][0]["field"], "query.from", "{problem}");
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
            ..Roles::default()
        },
    )
    .await;
    let bus = bus(&nats).await;
    publish_backlog(&bus, EventType::PageViewed, STANDARD, "std").await;
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
    let back = Platform::start(&config, Roles::PROJECTOR).await;
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
    publish_event(&bus, &fine).await;

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
            .is_some_and(|p| {
                p.lifetime_value
                    == [store::CurrencyAmount {
                        currency_code: "USD".into(),
                        minor_units: 1_250_000,
                    }]
            })
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
    async fn handle(
        &self,
        source: &'static str,
        batch: &[jetstream::Message],
    ) -> Vec<bus::Outcome> {
        let _ = bus::Handler::handle(&self.0, source, batch).await;
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
            profile.lifetime_value,
            [store::CurrencyAmount {
                currency_code: "USD".into(),
                minor_units: 1_250_000 * (EVENTS / 10) as i64,
            }],
            "each won deal counted once"
        );
    }
    shutdown.cancel();
    fresh.await.expect("join").expect("projector stops cleanly");
}

/// The whole path of a webhook: HTTP ingest → router → critical lane → notifier → a signed POST to
/// a receiver, with `crm all`'s wiring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_posted_payment_failure_reaches_its_webhook_signed() {
    type Seen = Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, bytes::Bytes)>>>;
    let seen: Seen = Arc::default();
    let sink = seen.clone();
    let receiver = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: bytes::Bytes| {
            let sink = sink.clone();
            async move {
                sink.lock().expect("lock").push((headers, body));
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let hook = format!("http://{}/hook", test_support::serve(receiver).await);

    let nats = NatsServer::start();
    let db = TempSqlite::new();
    let mut config = config(&nats, &db.url());
    config.notifier.webhooks = vec![notifier::WebhookConfig {
        id: "billing".into(),
        tenant: "acme".into(),
        url: hook,
        secret: Some("whsec_test".into()),
        secret_env: None,
        previous_secret: None,
        previous_secret_env: None,
        event_types: Some(vec!["payment_failed".into()]),
        lanes: None,
    }];
    let platform = Platform::start(&config, ALL).await;
    let client = reqwest::Client::new();
    let page = events::sample::event(EventType::PageViewed, "acme", "cust-9");
    let failed = events::sample::event(EventType::PaymentFailed, "acme", "cust-9");
    for event in [&page, &failed] {
        assert_eq!(post(&client, &platform, event).await.0, 202);
    }
    eventually("the webhook delivery", || async {
        !seen.lock().expect("lock").is_empty()
    })
    .await;
    // Give a stray second delivery (the page view, not subscribed) a moment to show up.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1, "only the subscribed type is delivered");
    let (headers, body) = &seen[0];
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    assert_eq!(header("crm-event-id"), failed.event_id);
    assert_eq!(header("idempotency-key"), failed.event_id);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    notifier::verify(
        "whsec_test",
        header("crm-signature"),
        body,
        now,
        std::time::Duration::from_secs(300),
    )
    .expect("the signature verifies");
    let delivered: Value = serde_json::from_slice(body).expect("JSON body");
    assert_eq!(
        delivered["paymentFailed"]["paymentId"], "pay-1",
        "{delivered}"
    );
    platform.shutdown().await;
}

/// The router takes express types (payment failures, consent changes, tickets, won deals) from
/// their own consumer first: critical events ingested behind a bulk backlog are routed before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn express_events_overtake_an_ingest_backlog_at_the_router() {
    const BULK: usize = 20_000;
    const CRITICAL: usize = 20;
    let nats = NatsServer::start();
    let db = TempSqlite::new();
    let config = config(&nats, &db.url());
    let bus = bus(&nats).await;
    bus.provision(&bus::Definitions::embedded().expect("definitions"))
        .await
        .expect("provision");
    // The backlog, then the critical events, all in CRM_INGEST before any router runs.
    publish_backlog(&bus, EventType::PageViewed, BULK, "bulk").await;
    for i in 0..CRITICAL {
        let event = events::sample::event(EventType::PaymentFailed, "acme", &format!("crit-{i}"));
        publish_event(&bus, &event).await;
    }
    let lane_messages = |stream: &'static str| {
        let bus = bus.clone();
        async move { bus.stream_state(stream).await.expect("lane state").messages as usize }
    };

    let router = Platform::start(
        &config,
        Roles {
            router: true,
            ..Roles::default()
        },
    )
    .await;
    eventually("every critical event routed", || async {
        lane_messages("CRM_LANE_CRITICAL").await == CRITICAL
    })
    .await;
    let bulk_routed = lane_messages("CRM_LANE_STANDARD").await;
    eprintln!(
        "when the last of {CRITICAL} critical events was routed: {bulk_routed} of {BULK} bulk were"
    );
    assert!(
        bulk_routed < BULK / 2,
        "critical events waited behind the bulk backlog: {bulk_routed} of {BULK} routed first"
    );
    // The bulk consumer let the express events go rather than routing them twice, and routed
    // every bulk event.
    eventually("the backlog routed", || async {
        lane_messages("CRM_LANE_STANDARD").await == BULK
    })
    .await;
    assert_eq!(lane_messages("CRM_LANE_CRITICAL").await, CRITICAL);
    let express = bus
        .consumer_info("CRM_INGEST", router::EXPRESS_DURABLE)
        .await
        .expect("express consumer");
    assert_eq!(express.delivered.stream_sequence as usize, BULK + CRITICAL);
    router.shutdown().await;
}

/// `/readyz` answers 200 only once every role is up: a load balancer or harness that trusts it
/// must find the gateway listening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_means_the_gateway_is_listening() {
    let nats = NatsServer::start();
    let db = TempSqlite::new();
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
    };
    let mut config = config(&nats, &db.url());
    config.admin.listen = free_port();
    config.gateway.listen = free_port();
    let (admin, gateway) = (config.admin.listen, config.gateway.listen);
    let starting = tokio::spawn(async move { cli::roles::start(&config, ALL, "test").await });
    let client = reqwest::Client::new();
    eventually("/readyz answers 200", || async {
        client
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(
        tokio::net::TcpStream::connect(gateway).await.is_ok(),
        "ready, but the gateway does not listen yet"
    );
    // `crm health` asks the same questions, as a container health check does.
    use cli::probe::{Probe, check};
    let wait = std::time::Duration::from_secs(2);
    let ready = check(admin, Probe::Ready, wait).await.expect("ready");
    assert!(ready.contains(r#""ready":true"#), "{ready}");
    assert_eq!(check(admin, Probe::Live, wait).await.as_deref(), Ok("ok"));
    let running = starting.await.expect("join").expect("started");
    running.run_until(async {}).await.expect("stops");
    let gone = check(admin, Probe::Live, wait).await.expect_err("stopped");
    assert!(gone.contains(&admin.to_string()), "{gone}");
}
