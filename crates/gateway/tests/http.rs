//! The gateway over real HTTP against a real nats-server (one per test, provisioned).

use bus::{Bus, ConnectOptions, headers};
use events::{Encoding, Event, EventType, pb::event::Payload};
use futures::{StreamExt, future::BoxFuture};
use gateway::{ApiKey, GatewayConfig, ReadModel, hash_key};
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};
use test_support::NatsServer;
use tokio::sync::{Notify, oneshot};

mod common;
use common::*;

#[tokio::test]
async fn json_event_is_acked_after_storage_with_its_headers() {
    let gw = start().await;
    let event = deal_won();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let response = gw
        .post(
            "/v1/events",
            "application/json",
            events::encode_json(&event),
        )
        .header("traceparent", traceparent)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["event_id"], event.event_id.as_str());
    assert_eq!(body["duplicate"], false);
    let seq = body["stream_seq"].as_u64().expect("stream_seq");

    let stored = gw.stored(seq).await;
    assert_eq!(stored.subject.as_str(), "crm.ingest.acme.deal_won");
    assert_eq!(
        events::decode(&stored.payload, Encoding::Protobuf).expect("protobuf"),
        event
    );
    let header = |name| headers::get(Some(&stored.headers), name).map(str::to_owned);
    assert_eq!(
        header(headers::MSG_ID),
        Some(format!("acme:{}", event.event_id))
    );
    assert_eq!(header(headers::EVENT_ID), Some(event.event_id.clone()));
    assert_eq!(header(headers::TRACEPARENT).as_deref(), Some(traceparent));
    let ingested: u128 = header(headers::INGESTED_AT)
        .expect("Crm-Ingested-At")
        .parse()
        .expect("decimal ns");
    assert!(ingested >= before, "{ingested} < {before}");
}

#[tokio::test]
async fn protobuf_body_is_accepted_and_gets_a_new_trace() {
    let gw = start().await;
    let event = events::sample::event(EventType::TicketEscalated, "acme", "cust-2");
    let response = gw
        .post(
            "/v1/events",
            "application/x-protobuf",
            events::encode_proto(&event),
        )
        .header("traceparent", "garbage")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.expect("json");
    let stored = gw.stored(body["stream_seq"].as_u64().expect("seq")).await;
    assert_eq!(stored.subject.as_str(), "crm.ingest.acme.ticket_escalated");
    assert_eq!(
        events::decode(&stored.payload, Encoding::Protobuf).expect("protobuf"),
        event
    );
    let traceparent = headers::get(Some(&stored.headers), headers::TRACEPARENT).unwrap_or_default();
    assert!(headers::is_traceparent(traceparent), "{traceparent:?}");

    let (status, body) = problem(
        gw.post(
            "/v1/events",
            "application/x-protobuf",
            vec![0xff, 0xff, 0xff],
        )
        .send()
        .await
        .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["type"]
            .as_str()
            .unwrap_or_default()
            .ends_with("invalid-protobuf"),
        "{body}"
    );
}

#[tokio::test]
async fn same_idempotency_key_twice_is_stored_once() {
    let gw = start().await;
    let mut first = deal_won();
    first.idempotency_key = "order-42".into();
    let mut second = deal_won(); // another event_id, same key
    second.idempotency_key = "order-42".into();

    let a: Value = gw.post_event(&first).await.json().await.expect("json");
    let response = gw.post_event(&second).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let b: Value = response.json().await.expect("json");
    assert_eq!(a["duplicate"], false);
    assert_eq!(b["duplicate"], true, "{b}");
    assert_eq!(a["stream_seq"], b["stream_seq"]);
    assert_eq!(gw.ingest_messages().await, 1);
    let stored = gw.stored(a["stream_seq"].as_u64().expect("seq")).await;
    assert_eq!(
        headers::get(Some(&stored.headers), headers::MSG_ID),
        Some("acme:order-42")
    );
}

#[tokio::test]
async fn two_tenants_with_the_same_idempotency_key_are_two_events() {
    const OTHER_KEY: &str = "globex-secret-key";
    let gw = start_with(
        |config| {
            config.api_keys.push(ApiKey {
                sha256: hash_key(OTHER_KEY),
                tenant: "globex".into(),
            })
        },
        None,
    )
    .await;
    let mut ours = deal_won();
    ours.idempotency_key = "order-42".into();
    let mut theirs = events::sample::event(EventType::DealWon, "globex", "cust-9");
    theirs.idempotency_key = "order-42".into();

    let a: Value = gw.post_event(&ours).await.json().await.expect("json");
    let response = gw
        .http
        .post(gw.url("/v1/events"))
        .bearer_auth(OTHER_KEY)
        .header("content-type", "application/json")
        .body(events::encode_json(&theirs))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let b: Value = response.json().await.expect("json");
    assert_eq!(a["duplicate"], false);
    assert_eq!(
        b["duplicate"], false,
        "another tenant's key is not ours: {b}"
    );
    assert_ne!(a["stream_seq"], b["stream_seq"]);
    assert_eq!(gw.ingest_messages().await, 2);
}

#[tokio::test]
async fn a_full_ingest_answers_503_with_retry_after_and_stores_nothing() {
    let gw = start().await;
    let mut stream = gw
        .bus
        .jetstream()
        .get_stream("CRM_INGEST")
        .await
        .expect("stream");
    let mut config = stream.info().await.expect("info").config.clone();
    config.max_bytes = 4096;
    gw.bus
        .jetstream()
        .update_stream(config)
        .await
        .expect("shrink ingest");
    let mut accepted: u64 = 0;
    let mut refused = None;
    for _ in 0..200 {
        let response = gw.post_event(&deal_won()).await;
        if response.status() == StatusCode::ACCEPTED {
            accepted += 1;
            continue;
        }
        refused = Some(response);
        break;
    }
    let refused = refused.expect("ingest fills up");
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("5")
    );
    let body: Value = refused.json().await.expect("json");
    assert!(
        body["type"]
            .as_str()
            .unwrap_or_default()
            .ends_with("ingest-full"),
        "{body}"
    );
    assert!(accepted > 0);
    assert_eq!(
        gw.ingest_messages().await,
        accepted,
        "everything acked is stored; the refused event is not"
    );
}

#[tokio::test]
async fn bad_bodies_are_problems() {
    let gw = start().await;

    let (status, body) = problem(
        gw.post("/v1/events", "application/json", "{\n  \"eventId\": 5")
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["type"]
            .as_str()
            .unwrap_or_default()
            .ends_with("invalid-json")
    );
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("line 2 column"),
        "{body}"
    );

    let (status, body) = problem(
        gw.post("/v1/events", "text/plain", "hello")
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{body}");
    let missing = gw
        .http
        .post(gw.url("/v1/events"))
        .bearer_auth(KEY)
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(problem(missing).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let oversize = format!("{{\"source\": \"{}\"}}", "x".repeat(1 << 20));
    let (status, body) = problem(
        gw.post("/v1/events", "application/json", oversize.clone())
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    let (status, _) = problem(
        gw.post(
            "/v1/events:batch",
            "application/json",
            format!("{{\"events\": [{oversize}]}}"),
        )
        .send()
        .await
        .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(gw.ingest_messages().await, 0);
}

#[tokio::test]
async fn every_invalid_field_is_listed() {
    let gw = start().await;
    let mut event = deal_won();
    event.event_id = "not-a-uuid".into();
    event.customer_id.clear();
    if let Some(Payload::DealWon(deal)) = event.payload.as_mut() {
        deal.amount.as_mut().expect("amount").minor_units = -5;
        deal.amount.as_mut().expect("amount").currency_code = "usd".into();
    }
    let (status, body) = problem(gw.post_event(&event).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        fields(&body),
        [
            "event_id",
            "customer_id",
            "payload.deal_won.amount.currency_code",
            "payload.deal_won.amount.minor_units"
        ],
        "{body}"
    );
    assert_eq!(gw.ingest_messages().await, 0);
}

#[tokio::test]
async fn auth_and_tenant_are_enforced() {
    let gw = start().await;
    let event = deal_won();

    for request in [
        gw.http.post(gw.url("/v1/events")),
        gw.http.post(gw.url("/v1/events")).bearer_auth("wrong-key"),
        gw.http
            .get(gw.url("/v1/customers/c1"))
            .header("authorization", "Basic YWNtZQ=="),
    ] {
        let response = request
            .header("content-type", "application/json")
            .body(events::encode_json(&event))
            .send()
            .await
            .expect("request");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        assert_eq!(problem(response).await.0, StatusCode::UNAUTHORIZED);
    }

    let other = events::sample::event(EventType::DealWon, "globex", "cust-1");
    let (status, body) = problem(gw.post_event(&other).await).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(fields(&body), ["tenant_id"], "{body}");
    assert_eq!(gw.ingest_messages().await, 0);

    // Unknown routes and methods are problems too; /openapi.json needs no key.
    let (status, _) = problem(gw.http.get(gw.url("/nope")).send().await.expect("request")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let response = gw
        .http
        .get(gw.url("/v1/events"))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(problem(response).await.0, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn batch_reports_each_item_and_stores_only_valid_ones() {
    let gw = start().await;
    let valid = deal_won();
    let mut invalid = events::sample::event(EventType::PageViewed, "acme", "cust-1");
    if let Some(Payload::PageViewed(page)) = invalid.payload.as_mut() {
        page.url = "ftp://x".into();
    }
    let foreign = events::sample::event(EventType::DealLost, "globex", "cust-1");
    let last = events::sample::event(EventType::EmailOpened, "acme", "cust-3");
    let json = |e: &Event| serde_json::from_slice::<Value>(&events::encode_json(e)).expect("json");
    let body = json!({"events": [json(&valid), json(&invalid), json(&foreign), {"noSuchField": 1}, json(&last)]});
    let response = gw
        .post("/v1/events:batch", "application/json", body.to_string())
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    let results = body["results"].as_array().expect("results");
    let statuses: Vec<_> = results.iter().map(|r| r["status"].as_u64()).collect();
    assert_eq!(
        statuses,
        [Some(202), Some(400), Some(403), Some(400), Some(202)],
        "{body}"
    );
    for (i, result) in results.iter().enumerate() {
        assert_eq!(result["index"], i);
    }
    assert_eq!(results[0]["event_id"], valid.event_id.as_str());
    assert_eq!(results[1]["errors"][0]["field"], "payload.page_viewed.url");
    assert_eq!(results[2]["errors"][0]["field"], "tenant_id");
    assert!(
        results[3]["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("noSuchField")
    );
    assert_eq!(gw.ingest_messages().await, 2);
    let seq = results[4]["stream_seq"].as_u64().expect("seq");
    assert_eq!(
        events::decode(&gw.stored(seq).await.payload, Encoding::Protobuf).expect("protobuf"),
        last
    );

    let too_many = json!({"events": vec![json(&valid); gateway::MAX_BATCH_EVENTS + 1]});
    let response = gw
        .post("/v1/events:batch", "application/json", too_many.to_string())
        .send()
        .await
        .expect("request");
    assert_eq!(problem(response).await.0, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_gives_quick_503_and_recovers_without_a_gateway_restart() {
    let mut gw = start().await;
    let first = deal_won();
    let response = gw.post_event(&first).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let first_seq = response.json::<Value>().await.expect("json")["stream_seq"]
        .as_u64()
        .expect("seq");

    gw.server.stop();
    let started = Instant::now();
    let response = gw.post_event(&deal_won()).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(response.headers()["retry-after"], "1");
    let (status, body) = problem(response).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let batch = json!({"events": [serde_json::from_slice::<Value>(&events::encode_json(&deal_won())).expect("json")]});
    let body: Value = gw
        .post("/v1/events:batch", "application/json", batch.to_string())
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(body["results"][0]["status"], 503, "{body}");

    gw.server.restart();
    let event = deal_won();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let response = gw.post_event(&event).await;
        if response.status() != StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            break response.status();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, StatusCode::ACCEPTED);
    // The restarted server kept its store. (An event answered 503 may still have been stored:
    // the client flushes what it sent just before the break once it reconnects.)
    assert_eq!(
        events::decode(&gw.stored(first_seq).await.payload, Encoding::Protobuf).expect("protobuf"),
        first
    );
}

/// Lookups wait at the gate when there is one (to hold a request in flight).
#[derive(Default)]
struct Profiles {
    gate: Option<Gate>,
}

#[derive(Clone, Default)]
struct Gate {
    entered: Arc<Notify>,
    release: Arc<Notify>,
}

impl ReadModel for Profiles {
    fn profile(
        &self,
        tenant: &str,
        customer: &str,
    ) -> BoxFuture<'_, Result<Option<Value>, String>> {
        let known = (tenant == "acme" && customer == "cust-1")
            .then(|| json!({"customer_id": customer, "tier": "premium"}));
        let fail = customer == "broken";
        Box::pin(async move {
            if let Some(gate) = &self.gate {
                gate.entered.notify_one();
                gate.release.notified().await;
            }
            if fail {
                Err("database is down".into())
            } else {
                Ok(known)
            }
        })
    }
}

#[tokio::test]
async fn customers_are_read_from_the_profile_source() {
    let gw = start_with(|_| {}, Some(Arc::new(Profiles::default()))).await;
    let get = |id: &str| {
        gw.http
            .get(gw.url(&format!("/v1/customers/{id}")))
            .bearer_auth(KEY)
            .send()
    };
    let response = get("cust-1").await.expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    let profile: Value = response.json().await.expect("json");
    assert_eq!(profile["tier"], "premium");
    assert_eq!(
        problem(get("cust-9").await.expect("request")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        problem(get("broken").await.expect("request")).await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );

    let without = start().await;
    let response = without
        .http
        .get(without.url("/v1/customers/cust-1"))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(problem(response).await.0, StatusCode::NOT_IMPLEMENTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_max_inflight_are_shed() {
    let gate = Gate::default();
    let profiles = Profiles {
        gate: Some(gate.clone()),
    };
    let gw = start_with(|c| c.max_inflight = 1, Some(Arc::new(profiles))).await;
    let held = tokio::spawn(
        gw.http
            .get(gw.url("/v1/customers/cust-1"))
            .bearer_auth(KEY)
            .send(),
    );
    // The held request now occupies the only slot.
    tokio::time::timeout(Duration::from_secs(10), gate.entered.notified())
        .await
        .expect("held request reached the profile source");
    let shed = gw.post_event(&deal_won()).await;
    assert_eq!(shed.headers()["retry-after"], "1");
    let (status, body) = problem(shed).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body["type"]
            .as_str()
            .unwrap_or_default()
            .ends_with("overloaded"),
        "{body}"
    );

    gate.release.notify_one();
    let response = held.await.expect("join").expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        gw.post_event(&deal_won()).await.status(),
        StatusCode::ACCEPTED
    );
}

#[tokio::test]
async fn openapi_is_served_and_shutdown_is_graceful() {
    let mut gw = start().await;
    let response = gw
        .http
        .get(gw.url("/openapi.json"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    let doc: Value = response.json().await.expect("json");
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        gateway::routes::EVENTS,
        gateway::routes::EVENTS_BATCH,
        gateway::routes::CUSTOMER,
        gateway::routes::ANALYTICS_SUMMARY,
        gateway::routes::ANALYTICS_EVENTS_PER_MINUTE,
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} documented");
    }
    assert_eq!(
        doc["components"]["schemas"]["Event"]["oneOf"]
            .as_array()
            .map(Vec::len),
        Some(12)
    );

    gw.stop
        .take()
        .expect("stop")
        .send(())
        .expect("gateway running");
    tokio::time::timeout(Duration::from_secs(5), &mut gw.task)
        .await
        .expect("stops in time")
        .expect("join")
        .expect("clean shutdown");
}

async fn stored_in(bus: &Bus, stream: &str, seq: u64) -> bus::jetstream::message::StreamMessage {
    bus.jetstream()
        .get_stream(stream)
        .await
        .expect("stream")
        .get_raw_message(seq)
        .await
        .expect("stored message")
}

#[tokio::test]
async fn critical_and_high_events_take_the_priority_stream_and_bulk_the_ingest_stream() {
    let gw = start_classified(|_| {}, None, gateway::default_rules()).await;
    // Consent changes are critical by the built-in rules, a big won deal is high-value by its
    // amount alone, a page view is bulk.
    let consent = events::sample::event(EventType::ConsentChanged, "acme", "cust-1");
    // The sample deal is USD 12,500.00, over the built-in 10,000.00 threshold.
    let big_deal = events::sample::event(EventType::DealWon, "acme", "cust-2");
    let page = events::sample::event(EventType::PageViewed, "acme", "cust-3");
    for (event, stream, subject) in [
        (
            &consent,
            "CRM_INGEST_PRIORITY",
            "crm.priority.acme.consent_changed",
        ),
        (
            &big_deal,
            "CRM_INGEST_PRIORITY",
            "crm.priority.acme.deal_won",
        ),
        (&page, "CRM_INGEST", "crm.ingest.acme.page_viewed"),
    ] {
        let response = gw.post_event(event).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["stream"], stream, "{body}");
        let stored = stored_in(&gw.bus, stream, body["stream_seq"].as_u64().expect("seq")).await;
        assert_eq!(stored.subject.as_str(), subject);
        assert_eq!(
            headers::get(Some(&stored.headers), headers::MSG_ID),
            Some(events::ingest_msg_id(event).as_str()),
            "the same dedupe id on either stream"
        );
    }
}

/// Health reports that say the projector's standard lane waits `p50_ms` and gets through
/// `processed` events a second.
async fn report_a_slow_pipeline(bus: &Bus, p50_ms: f64, processed: u64) {
    let report = bus::control::HealthReport {
        role: "projector".into(),
        instance: "projector-test".into(),
        at_ms: bus::control::unix_ms(),
        interval_ms: 1000,
        lanes: vec![bus::control::LaneReport {
            lane: "standard".into(),
            processed,
            p50_ms,
            p99_ms: p50_ms,
            max_ms: p50_ms,
            pending: 100_000,
        }],
    };
    bus.publish_control("crm.control.health.projector".into(), &report)
        .await
        .expect("published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_pipeline_sheds_bulk_before_storing_it_and_never_critical() {
    let gw = start_classified(
        |c| c.admission.min_bulk_rate = 1.0,
        None,
        gateway::default_rules(),
    )
    .await;
    let mut admission = gw
        .bus
        .client()
        .subscribe(gateway::ADMISSION_SUBJECT)
        .await
        .expect("subscribed");
    // Until the pipeline says it is behind, bulk is open.
    let open: gateway::AdmissionReport = serde_json::from_slice(
        &tokio::time::timeout(Duration::from_secs(5), admission.next())
            .await
            .expect("a report within a tick")
            .expect("message")
            .payload,
    )
    .expect("report");
    assert_eq!(open.bulk, "open");
    assert_eq!(open.bulk_rate, -1.0);

    // The projector reports a standing queue and 1 event/s: bulk is limited to about that.
    let deadline = Instant::now() + Duration::from_secs(15);
    let limited = loop {
        report_a_slow_pipeline(&gw.bus, 5_000.0, 1).await;
        let message = tokio::time::timeout(Duration::from_secs(5), admission.next())
            .await
            .expect("a report within a tick")
            .expect("message");
        let report: gateway::AdmissionReport =
            serde_json::from_slice(&message.payload).expect("report");
        if report.bulk == "limited" || Instant::now() > deadline {
            break report;
        }
    };
    assert_eq!(limited.bulk, "limited", "{limited:?}");
    assert_eq!(limited.reason, "pipeline_delay");
    assert!(
        limited.bulk_rate >= 1.0 && limited.bulk_rate < 10.0,
        "{limited:?}"
    );

    let before = gw.ingest_messages().await;
    let (mut accepted, mut shed) = (0, 0);
    let mut waits = Vec::new();
    for _ in 0..20 {
        let response = gw
            .post_event(&events::sample::event(
                EventType::PageViewed,
                "acme",
                "cust-1",
            ))
            .await;
        match response.status() {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                let header = |name: &str| -> u64 {
                    response.headers()[name]
                        .to_str()
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or_else(|| panic!("{name}: {:?}", response.headers()))
                };
                let (seconds, ms) = (header("retry-after"), header("retry-after-ms"));
                assert_eq!(
                    seconds,
                    ms.div_ceil(1000).max(1),
                    "whole seconds, rounded up"
                );
                waits.push(ms);
                let (_, body) = problem(response).await;
                assert_eq!(body["retry_after_ms"], ms, "{body}");
                assert!(
                    body["type"]
                        .as_str()
                        .unwrap_or_default()
                        .ends_with("overloaded"),
                    "{body}"
                );
                shed += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        shed >= 15,
        "bulk over its rate is shed: {accepted} accepted, {shed} shed"
    );
    // Each refusal gets a later slot of the retry schedule (1/rate apart, 10 s ahead at most),
    // so the refused come back at the rate in force, not all at once.
    assert!(
        waits[0] >= 100
            && waits
                .windows(2)
                .all(|pair| pair[1] > pair[0] || pair[1] == 10_000),
        "paced retry slots: {waits:?}"
    );
    assert_eq!(
        gw.ingest_messages().await,
        before + accepted,
        "a shed event is not stored"
    );
    // Critical events are admitted on their own budget whatever bulk's state.
    for _ in 0..20 {
        let response = gw
            .post_event(&events::sample::event(
                EventType::ConsentChanged,
                "acme",
                "cust-1",
            ))
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    // A batch mixes both: its bulk items are shed one by one, its critical ones stored.
    let item = |kind| {
        serde_json::from_slice::<Value>(&events::encode_json(&events::sample::event(
            kind, "acme", "cust-4",
        )))
        .expect("json")
    };
    let batch = json!({"events": [
        item(EventType::ConsentChanged),
        item(EventType::PageViewed), item(EventType::PageViewed), item(EventType::PageViewed),
        item(EventType::PaymentFailed),
    ]});
    let body: Value = gw
        .post("/v1/events:batch", "application/json", batch.to_string())
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    let statuses: Vec<u64> = body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["status"].as_u64().expect("status"))
        .collect();
    assert_eq!(statuses[0], 202, "{body}");
    assert_eq!(statuses[4], 202, "{body}");
    assert!(statuses[1..4].contains(&503), "{body}");
}

/// A gateway with a priority door (`priority_listen`) whose main door runs on `main` and whose
/// priority door and priority NATS connection run on `priority`, each a runtime of one thread.
struct TwoDoors {
    _server: NatsServer,
    bus: Bus,
    main_addr: SocketAddr,
    priority_addr: SocketAddr,
    main: tokio::runtime::Runtime,
    priority: tokio::runtime::Runtime,
    task: tokio::task::JoinHandle<Result<(), gateway::GatewayError>>,
}

fn one_thread(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn start_two_doors() -> TwoDoors {
    let server = NatsServer::start();
    let url = server.url();
    let main = one_thread("test-main-door");
    let priority = one_thread("test-priority-door");
    let priority_handle = priority.handle().clone();
    let (bus, main_addr, priority_addr, task) = main
        .spawn(async move {
            // Connected on the main door's runtime, as the gateway role does.
            let bus = test_support::provisioned_bus(&url).await;
            let config = GatewayConfig {
                listen: "127.0.0.1:0".parse().expect("addr"),
                priority_listen: Some("127.0.0.1:0".parse().expect("addr")),
                api_keys: vec![ApiKey {
                    sha256: hash_key(KEY),
                    tenant: "acme".into(),
                }],
                ..GatewayConfig::default()
            };
            let serving = gateway::serve_placed(
                &config,
                bus.clone(),
                gateway::default_rules(),
                None,
                &priority_handle,
                std::future::pending(),
            )
            .await
            .expect("serves");
            let priority_addr = serving.priority_addr.expect("a priority door");
            (bus, serving.addr, priority_addr, serving.task)
        })
        .await
        .expect("started");
    TwoDoors {
        _server: server,
        bus,
        main_addr,
        priority_addr,
        main,
        priority,
        task,
    }
}

impl TwoDoors {
    async fn post(&self, addr: SocketAddr, path: &str, body: Vec<u8>) -> Response {
        reqwest::Client::new()
            .post(format!("http://{addr}{path}"))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(body)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("answered within 10 s")
    }

    fn stop(self) {
        self.main.shutdown_background();
        self.priority.shutdown_background();
    }
}

/// Critical and high producers have a door of their own: a listener on a runtime (thread) of
/// its own with its own NATS connection, so their requests never queue behind bulk requests
/// waiting for the main door's thread. Proved structurally: the main door's only thread is held
/// busy, and a consent change sent to the priority door is still stored and answered 202.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_priority_door_answers_while_the_main_doors_thread_is_busy() {
    let doors = start_two_doors().await;
    let (held, release) = std::sync::mpsc::channel::<()>();
    let (busy, is_busy) = oneshot::channel();
    // Holds the main door's only thread (as a burst of bulk requests would) until released.
    doors.main.spawn(async move {
        let _ = busy.send(());
        let _ = release.recv();
    });
    is_busy.await.expect("the main door's thread is held");

    let consent = events::sample::event(EventType::ConsentChanged, "acme", "cust-1");
    let response = doors
        .post(
            doors.priority_addr,
            "/v1/events",
            events::encode_json(&consent),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["stream"], "CRM_INGEST_PRIORITY", "{body}");

    held.send(()).expect("the holder waits");
    // (The test's own connection runs on the main door's runtime: checked once it is free.)
    let stored = stored_in(
        &doors.bus,
        "CRM_INGEST_PRIORITY",
        body["stream_seq"].as_u64().expect("seq"),
    )
    .await;
    assert_eq!(stored.subject.as_str(), "crm.priority.acme.consent_changed");
    // The main door still serves every class once its thread is free.
    let page = events::sample::event(EventType::PageViewed, "acme", "cust-2");
    let response = doors
        .post(doors.main_addr, "/v1/events", events::encode_json(&page))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    doors.stop();
}

/// The priority door takes critical and high events only (by their content, as the gateway
/// classifies): a bulk event there is refused with 421 and a problem naming the main door, and
/// nothing is stored; in a batch each bulk item gets its own 421.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_priority_door_refuses_bulk_events_with_421() {
    let doors = start_two_doors().await;
    let page = events::sample::event(EventType::PageViewed, "acme", "cust-1");
    let (status, body) = problem(
        doors
            .post(
                doors.priority_addr,
                "/v1/events",
                events::encode_json(&page),
            )
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "{body}");
    assert!(
        body["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("/misdirected")),
        "{body}"
    );
    assert!(
        body["detail"].as_str().is_some_and(|d| d.contains("main")),
        "{body}"
    );
    assert_eq!(messages_in(&doors.bus, "CRM_INGEST").await, 0);

    let consent = events::sample::event(EventType::ConsentChanged, "acme", "cust-2");
    let batch = format!(
        "{{\"events\":[{},{}]}}",
        String::from_utf8(events::encode_json(&page)).expect("utf8"),
        String::from_utf8(events::encode_json(&consent)).expect("utf8"),
    );
    let response = doors
        .post(doors.priority_addr, "/v1/events:batch", batch.into_bytes())
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["results"][0]["status"], 421, "{body}");
    assert_eq!(body["results"][1]["status"], 202, "{body}");
    assert_eq!(messages_in(&doors.bus, "CRM_INGEST").await, 0);
    // Reads are the main door's.
    let read = reqwest::Client::new()
        .get(format!(
            "http://{}/v1/customers/cust-2",
            doors.priority_addr
        ))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("answered");
    assert_eq!(read.status(), StatusCode::NOT_FOUND);
    doors.stop();
}

/// A door that stops before the shutdown signal (here: the priority door's runtime goes away)
/// ends the gateway's task with an error, so the process sees a failing role instead of a
/// gateway that half serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_door_that_stops_early_ends_the_gateway_with_an_error() {
    let TwoDoors {
        main,
        priority,
        task,
        _server,
        ..
    } = start_two_doors().await;
    priority.shutdown_background();
    let served = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the gateway noticed within 10 s")
        .expect("join");
    assert!(served.is_err(), "{served:?}");
    main.shutdown_background();
}

/// A priority door that cannot bind fails the start and leaves nothing running: the main door,
/// bound first, is closed again.
#[tokio::test]
async fn a_priority_door_that_cannot_bind_leaves_nothing_listening() {
    let server = NatsServer::start();
    let bus = Bus::connect(&ConnectOptions::new(server.url()))
        .await
        .expect("connects");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let main_port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let config = GatewayConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], main_port)),
        priority_listen: Some(taken.local_addr().expect("addr")),
        api_keys: vec![ApiKey {
            sha256: hash_key(KEY),
            tenant: "acme".into(),
        }],
        ..GatewayConfig::default()
    };
    let err = gateway::serve(
        &config,
        bus,
        gateway::default_rules(),
        None,
        std::future::pending(),
    )
    .await
    .expect_err("the priority door's address is taken");
    assert!(matches!(err, gateway::GatewayError::Bind { .. }), "{err:?}");
    tokio::net::TcpStream::connect(("127.0.0.1", main_port))
        .await
        .expect_err("the main door is not left listening");
}

/// The request metrics tell the doors apart (`door="main"` or `door="priority"`), so an SRE can
/// watch the priority door's latency and answers on their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_metrics_say_which_door() {
    // This test's process alone (nextest runs each test in its own): the global recorder.
    let handle = telemetry::install_recorder().expect("recorder");
    let doors = start_two_doors().await;
    let consent = events::sample::event(EventType::ConsentChanged, "acme", "cust-1");
    let page = events::sample::event(EventType::PageViewed, "acme", "cust-2");
    for (addr, event) in [(doors.priority_addr, &consent), (doors.main_addr, &page)] {
        let response = doors
            .post(addr, "/v1/events", events::encode_json(event))
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    let rendered = handle.render();
    for door in ["main", "priority"] {
        assert!(
            rendered
                .lines()
                .any(|line| line.starts_with("crm_gateway_requests_total{")
                    && line.contains(&format!("door=\"{door}\""))
                    && line.contains("status=\"202\"")),
            "no 202 counted for the {door} door in:\n{rendered}"
        );
    }
    doors.stop();
}
