//! Under load: standard and analytics work beyond the projector's capacity. The throttler pauses
//! analytics (visible on the server as a paused consumer), critical events keep their latency,
//! deferred analytics piles up in the stream; when the load stops it drains, and the aggregates
//! hold exactly what was sent.

use bus::{
    PublishOptions,
    control::{HEALTH_SUBJECT_PREFIX, HealthReport, THROTTLE_SUBJECT, ThrottleReport},
};
use cli::roles::Roles;
use events::EventType;
use futures::StreamExt;
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};
use store::Store;
use test_support::{NatsServer, TempSqlite, eventually};

mod common;
use common::*;

const STANDARD: usize = 12_000;
const TARGET: Duration = Duration::from_millis(1500);

/// Collects every message of `subject` decoded as `T`.
async fn collect<T: serde::de::DeserializeOwned + Send + 'static>(
    bus: &bus::Bus,
    subject: String,
) -> Arc<Mutex<Vec<T>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut subscription = bus.client().subscribe(subject).await.expect("subscribe");
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Some(message) = subscription.next().await {
            if let Ok(value) = serde_json::from_slice::<T>(&message.payload) {
                sink.lock().expect("lock").push(value);
            }
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_defers_analytics_keeps_critical_latency_and_drains_exactly() {
    let nats = NatsServer::start();
    let db = TempSqlite::new();
    let mut config = config(&nats, &db.url());
    // One event per transaction: a projector much slower than the ingest burst.
    config.projector.max_batch = 1;
    let throttle = &mut config.analytics.throttle;
    throttle.tick = Duration::from_millis(200);
    throttle.target_p99 = TARGET;
    throttle.min_rate_per_sec = 50.0;
    throttle.max_rate_per_sec = 20_000.0;
    throttle.increase_step_per_sec = 5_000.0;
    throttle.decrease_factor = 0.1;
    throttle.capacity_per_sec = 1_000.0;
    config.analytics.pause_for = Duration::from_secs(2);

    let bus = bus(&nats).await;
    // Analytics apart from the workers whose health drives it: they meet only on NATS, as they
    // would in separate processes.
    let workers = Platform::start(
        &config,
        Roles {
            router: true,
            projector: true,
            ..Roles::default()
        },
    )
    .await;
    let analytics = Platform::start(
        &config,
        Roles {
            analytics: true,
            ..Roles::default()
        },
    )
    .await;
    let decisions = collect::<ThrottleReport>(&bus, THROTTLE_SUBJECT.into()).await;
    let health = collect::<HealthReport>(&bus, format!("{HEALTH_SUBJECT_PREFIX}.projector")).await;

    // What the server says about the analytics consumer, sampled throughout.
    let seen_paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (bus, seen_paused) = (bus.clone(), seen_paused.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(info) = bus.consumer_info("CRM_INGEST", analytics::DURABLE).await
                    && info.paused
                {
                    seen_paused.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // The load: page views (standard lane) in windows of pipelined publishes, a payment failure
    // (critical lane) after each window.
    let mut critical = 0;
    for window in 0..STANDARD / 500 {
        let mut acks = Vec::new();
        for i in 0..500 {
            let customer = format!("std-{}", (window * 500 + i) % 300);
            let event = events::sample::event(EventType::PageViewed, "acme", &customer);
            let subject = events::ingest_subject("acme", EventType::PageViewed).expect("subject");
            let options = PublishOptions::with_msg_id(event.event_id.clone());
            let payload = events::encode_proto(&event).into();
            acks.push((
                subject.clone(),
                bus.send(&subject, payload, &options).await.expect("send"),
            ));
        }
        for (subject, ack) in acks {
            bus.await_ack(&subject, ack).await.expect("stored");
        }
        publish_event(
            &bus,
            &events::sample::event(EventType::PaymentFailed, "acme", "vip"),
        )
        .await;
        critical += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = STANDARD + critical;

    // Under the load the throttler paused analytics, on the server too, and work was deferred.
    let paused = decisions
        .lock()
        .expect("lock")
        .iter()
        .find(|d| d.level == 0 && d.consumer_paused)
        .cloned();
    let paused = paused.unwrap_or_else(|| {
        panic!(
            "analytics was never paused; decisions: {:?}",
            decisions
                .lock()
                .expect("lock")
                .iter()
                .map(|d| (
                    d.level,
                    d.reason.clone(),
                    d.ingest_rate as u64,
                    d.capacity as u64
                ))
                .collect::<Vec<_>>()
        )
    });
    assert_ne!(paused.reason, "healthy", "{paused:?}");
    assert!(
        seen_paused.load(std::sync::atomic::Ordering::SeqCst),
        "the server never showed the analytics consumer paused"
    );
    sampler.abort();
    let max_deferred = decisions
        .lock()
        .expect("lock")
        .iter()
        .map(|d| d.deferred)
        .max()
        .unwrap_or(0);
    assert!(
        max_deferred > (STANDARD / 4) as u64,
        "analytics pending grew to only {max_deferred}"
    );
    // The oldest deferred event's age (read from the stream at the ack floor) grew while paused.
    let oldest = decisions
        .lock()
        .expect("lock")
        .iter()
        .map(|d| d.oldest_deferred_age_s)
        .fold(0.0, f64::max);
    assert!(oldest > 0.5, "oldest deferred age peaked at {oldest} s");

    // Nothing lost: the projector gets through the whole backlog.
    let store = Store::connect(&db.url()).await.expect("store");
    eventually("the projector to apply every event", || async {
        store.processed_count().await.expect("count") == sent as i64
    })
    .await;

    // The priority lane kept its latency throughout, every interval in which it processed.
    let critical_p99s: Vec<f64> = health
        .lock()
        .expect("lock")
        .iter()
        .flat_map(|r| r.lanes.iter())
        .filter(|l| l.lane == "critical" && l.processed > 0)
        .map(|l| l.p99_ms)
        .collect();
    assert!(
        !critical_p99s.is_empty(),
        "no critical lane health reported"
    );
    let worst = critical_p99s.iter().copied().fold(0.0, f64::max);
    assert!(
        worst <= TARGET.as_secs_f64() * 1000.0,
        "critical p99 reached {worst} ms (target {TARGET:?}): {critical_p99s:?}"
    );

    // Load gone: analytics resumes and drains everything, counted exactly once.
    eventually("analytics to drain", || async {
        let info = bus
            .consumer_info("CRM_INGEST", analytics::DURABLE)
            .await
            .expect("consumer info");
        info.num_pending == 0 && info.num_ack_pending == 0 && !info.paused
    })
    .await;
    let summary = store.analytics_summary("acme").await.expect("summary");
    assert_eq!(summary.events_counted, sent as i64);
    assert_eq!(summary.events_by_type["page_viewed"], STANDARD as i64);
    assert_eq!(summary.events_by_type["payment_failed"], critical as i64);
    assert_eq!(
        summary.events_by_type.len(),
        2,
        "{:?}",
        summary.events_by_type
    );
    print_timeline(&decisions.lock().expect("lock"), worst);
    let resumed = decisions
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .expect("decisions");
    assert!(resumed.level > 0, "{resumed:?}");
    assert!(bus.dlq_list(1, 10).await.expect("dlq").is_empty());
    analytics.shutdown().await;
    workers.shutdown().await;
}

/// The run as a table (shown with `--no-capture`): one row per second of throttle decisions.
fn print_timeline(decisions: &[ThrottleReport], critical_p99_ms: f64) {
    let Some(first) = decisions.first() else {
        return;
    };
    eprintln!(
        "| t (s) | ingest/s | forecast/s | capacity/s | level | analytics rate/s | reason | deferred | oldest deferred (s) | paused |"
    );
    eprintln!("|---|---|---|---|---|---|---|---|---|---|");
    let mut next_ms = first.at_ms;
    for d in decisions {
        if d.at_ms < next_ms {
            continue;
        }
        next_ms = d.at_ms + 1000;
        eprintln!(
            "| {:.1} | {:.0} | {:.0} | {:.0} | {} | {:.0} | {} | {} | {:.1} | {} |",
            (d.at_ms - first.at_ms) as f64 / 1000.0,
            d.ingest_rate,
            d.forecast,
            d.capacity,
            d.level,
            d.rate,
            d.reason,
            d.deferred,
            d.oldest_deferred_age_s,
            d.consumer_paused
        );
    }
    eprintln!("worst critical-lane p99 over any 1 s interval: {critical_p99_ms:.1} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_backlogs_lanes_the_throttle_and_dead_letters() {
    let nats = NatsServer::start();
    let db = TempSqlite::new();
    let mut config = config(&nats, &db.url());
    config.analytics.throttle.tick = Duration::from_millis(250);
    let platform = Platform::start(
        &config,
        Roles {
            router: true,
            projector: true,
            analytics: true,
            ..Roles::default()
        },
    )
    .await;
    let bus = bus(&nats).await;
    for kind in [EventType::PaymentFailed, EventType::PageViewed] {
        publish_event(&bus, &events::sample::event(kind, "acme", "c1")).await;
    }
    bus.publish(
        "crm.ingest.acme.page_viewed",
        "not an event".into(),
        &PublishOptions::with_msg_id("garbage-1"),
    )
    .await
    .expect("stored");
    let store = Store::connect(&db.url()).await.expect("store");
    eventually("both events projected and counted", || async {
        store.processed_count().await.expect("count") == 2
            && store
                .analytics_summary("acme")
                .await
                .expect("summary")
                .events_counted
                == 2
    })
    .await;

    let status = cli::status::gather(&bus, Duration::from_millis(2500))
        .await
        .expect("status");
    assert_eq!(status.dead_letters, 1);
    let analytics = status
        .consumers
        .iter()
        .find(|c| c.stream == "CRM_INGEST" && c.consumer == "analytics")
        .expect("analytics consumer listed");
    assert_eq!((analytics.pending, analytics.paused), (0, false));
    assert_eq!(status.consumers.len(), 11, "{:?}", status.consumers);
    let projector = &status.lanes["projector"];
    assert_eq!(
        projector.keys().map(String::as_str).collect::<Vec<_>>(),
        ["critical", "high", "standard"]
    );
    assert!(status.lanes.contains_key("analytics"), "{:?}", status.lanes);
    let throttle = status.throttle.clone().expect("a throttle decision");
    assert_eq!((throttle.deferred, throttle.levels), (0, 4));
    let text = status.to_string();
    assert!(text.contains("throttle: level"), "{text}");
    assert!(text.contains("dead letters: 1"), "{text}");
    platform.shutdown().await;
}
