//! Retention by design, against a real nats-server (one per test): lanes hold backlog, not
//! history; a full stream refuses rather than drops; the ingest keeper trims processed history
//! and never an unprocessed event; stream usage is exported as gauges.

use bus::{
    Bus, BusErrorKind, CancellationToken, ConnectOptions, Definitions, PublishOptions,
    RetentionConfig, jetstream::consumer::PullConsumer,
};
use bytes::Bytes;
use futures::StreamExt;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};
use test_support::{NatsServer, eventually};

const PAGE_VIEWED: &str = "crm.ingest.acme.page_viewed";
const DEAL_WON: &str = "crm.ingest.acme.deal_won";

async fn connect(server: &NatsServer) -> Bus {
    Bus::connect(&ConnectOptions::new(server.url()))
        .await
        .expect("connects to the test server")
}

/// A bus with the shipped definitions, after `adjust` edited them (e.g. a small max_bytes).
async fn provisioned_with(server: &NatsServer, adjust: impl FnOnce(&mut Definitions)) -> Bus {
    let bus = connect(server).await;
    let mut definitions = Definitions::embedded().expect("definitions");
    adjust(&mut definitions);
    bus.provision(&definitions).await.expect("provisions");
    bus
}

async fn provisioned(server: &NatsServer) -> Bus {
    provisioned_with(server, |_| {}).await
}

fn set_stream_field(definitions: &mut Definitions, stream: &str, field: &str, value: i64) {
    definitions
        .streams
        .iter_mut()
        .find(|s| s.name == stream)
        .expect("stream definition")
        .config
        .insert(field.into(), value.into());
}

async fn publish(bus: &Bus, subject: &str, payload: &[u8], id: &str) -> Result<u64, bus::BusError> {
    bus.publish(
        subject,
        Bytes::copy_from_slice(payload),
        &PublishOptions::with_msg_id(id),
    )
    .await
    .map(|published| published.sequence)
}

async fn publish_n(bus: &Bus, subject: &str, n: usize, tag: &str) -> Vec<u64> {
    let mut sequences = Vec::new();
    for i in 0..n {
        sequences.push(
            publish(bus, subject, b"event", &format!("{tag}-{i}"))
                .await
                .expect("stored"),
        );
    }
    sequences
}

async fn consumer(bus: &Bus, stream: &str, durable: &str) -> PullConsumer {
    bus.jetstream()
        .get_consumer_from_stream(durable, stream)
        .await
        .expect("consumer exists")
}

/// Fetch `n` messages from the durable consumer; acknowledge them (confirmed by the server)
/// when `ack`, else leave them delivered and unacknowledged. Returns their stream sequences.
async fn take(bus: &Bus, stream: &str, durable: &str, n: usize, ack: bool) -> Vec<u64> {
    let consumer = consumer(bus, stream, durable).await;
    let mut sequences = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sequences.len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{stream}/{durable}: only {} of {n} messages arrived",
            sequences.len()
        );
        let mut batch = consumer
            .fetch()
            .max_messages(n - sequences.len())
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .expect("fetch");
        while let Some(message) = batch.next().await {
            let message = message.expect("message");
            sequences.push(message.info().expect("ack info").stream_sequence);
            if ack {
                message.double_ack().await.expect("ack confirmed");
            }
        }
    }
    sequences
}

async fn state(bus: &Bus, stream: &str) -> bus::jetstream::stream::State {
    bus.stream_state(stream).await.expect("stream state")
}

fn window(replay_window: Duration) -> RetentionConfig {
    RetentionConfig {
        replay_window,
        ..RetentionConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Lanes and the DLQ
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_lane_drops_a_message_once_every_consumer_acked_it_and_keeps_it_until_then() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    let subject = "crm.lane.standard.acme.page_viewed";
    publish_n(&bus, subject, 3, "lane").await;

    take(&bus, "CRM_LANE_STANDARD", "projector", 3, true).await;
    // The notifier has not acked: every message is still its backlog.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(state(&bus, "CRM_LANE_STANDARD").await.messages, 3);

    take(&bus, "CRM_LANE_STANDARD", "notifier", 2, true).await;
    eventually("the two messages both consumers acked to go", || async {
        state(&bus, "CRM_LANE_STANDARD").await.messages == 1
    })
    .await;
    let left = state(&bus, "CRM_LANE_STANDARD").await;
    assert_eq!(
        left.first_sequence, 3,
        "the one the notifier still owes stays"
    );

    take(&bus, "CRM_LANE_STANDARD", "notifier", 1, true).await;
    eventually("the lane to be empty", || async {
        state(&bus, "CRM_LANE_STANDARD").await.messages == 0
    })
    .await;
}

#[tokio::test]
async fn a_full_lane_refuses_a_publish_keeps_what_it_stored_and_takes_more_once_acked() {
    let server = NatsServer::start();
    let bus = provisioned_with(&server, |d| {
        set_stream_field(d, "CRM_LANE_HIGH", "max_bytes", 4096);
    })
    .await;
    let subject = "crm.lane.high.acme.deal_won";
    let payload = [7u8; 300];
    let mut stored = Vec::new();
    let refused = loop {
        match publish(&bus, subject, &payload, &format!("full-{}", stored.len())).await {
            Ok(sequence) => stored.push(sequence),
            Err(err) => break err,
        }
        assert!(
            stored.len() < 100,
            "a 4 KiB lane took 100 messages of 300 bytes"
        );
    };
    assert_eq!(refused.kind(), BusErrorKind::Full, "{refused}");
    assert!(!stored.is_empty());

    let full = state(&bus, "CRM_LANE_HIGH").await;
    assert_eq!(
        full.messages,
        stored.len() as u64,
        "nothing stored was lost"
    );
    assert_eq!(full.first_sequence, 1);
    let lane = bus
        .jetstream()
        .get_stream("CRM_LANE_HIGH")
        .await
        .expect("lane");
    for sequence in &stored {
        let message = lane.get_raw_message(*sequence).await.expect("still stored");
        assert_eq!(message.payload.as_ref(), payload);
    }

    // Both consumers work the backlog off: the lane makes room by itself.
    take(&bus, "CRM_LANE_HIGH", "projector", stored.len(), true).await;
    take(&bus, "CRM_LANE_HIGH", "notifier", stored.len(), true).await;
    eventually("the acked backlog to leave the lane", || async {
        state(&bus, "CRM_LANE_HIGH").await.messages == 0
    })
    .await;
    publish(&bus, subject, &payload, "after-drain")
        .await
        .expect("a drained lane takes writes again");
}

#[tokio::test]
async fn dead_letters_do_not_age_out_and_a_full_dlq_refuses() {
    let server = NatsServer::start();
    let bus = provisioned_with(&server, |d| {
        set_stream_field(d, "CRM_DLQ", "max_bytes", 2048)
    })
    .await;
    let info = bus
        .jetstream()
        .get_stream("CRM_DLQ")
        .await
        .expect("dlq")
        .get_info()
        .await
        .expect("info");
    assert_eq!(info.config.max_age, Duration::ZERO, "no age limit");
    assert_eq!(
        info.config.discard,
        bus::jetstream::stream::DiscardPolicy::New
    );
    let mut stored = 0;
    let refused = loop {
        match publish(
            &bus,
            "crm.dlq.projector.acme.deal_won",
            &[1u8; 300],
            &format!("dl-{stored}"),
        )
        .await
        {
            Ok(_) => stored += 1,
            Err(err) => break err,
        }
        assert!(stored < 100);
    };
    assert_eq!(refused.kind(), BusErrorKind::Full);
    assert_eq!(state(&bus, "CRM_DLQ").await.messages, stored);
}

// ---------------------------------------------------------------------------------------------
// The ingest retention keeper
// ---------------------------------------------------------------------------------------------

/// Every ingest consumer that has messages takes and acks them all.
async fn process_everything(bus: &Bus, n: usize) {
    take(bus, "CRM_INGEST", "router", n, true).await;
    take(bus, "CRM_INGEST", "analytics", n, true).await;
}

#[tokio::test]
async fn the_keeper_purges_processed_history_outside_the_window_and_keeps_the_window() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    publish_n(&bus, PAGE_VIEWED, 37, "old").await; // 1..=37
    tokio::time::sleep(Duration::from_millis(1500)).await;
    publish_n(&bus, PAGE_VIEWED, 23, "new").await; // 38..=60
    // Gaps on both sides of the window's edge: the search must step over them.
    let ingest = bus
        .jetstream()
        .get_stream("CRM_INGEST")
        .await
        .expect("ingest");
    for sequence in [10, 36, 37, 38, 39] {
        ingest.delete_message(sequence).await.expect("deleted");
    }
    process_everything(&bus, 55).await;

    let report = bus
        .trim_ingest(&window(Duration::from_secs(1)))
        .await
        .expect("trim");
    assert_eq!(
        report.purged, 34,
        "every old event and no new one: {report:?}"
    );
    assert!(!report.under_pressure);
    let kept = state(&bus, "CRM_INGEST").await;
    assert_eq!((kept.first_sequence, kept.messages), (40, 21), "{report:?}");
    let age = report.oldest_kept_age.expect("something kept");
    assert!(age < Duration::from_millis(1400), "{age:?}");

    // A day-long window keeps everything processed.
    let report = bus
        .trim_ingest(&RetentionConfig::default())
        .await
        .expect("trim");
    assert_eq!(report.purged, 0);
    assert_eq!(state(&bus, "CRM_INGEST").await.messages, 21);
}

#[tokio::test]
async fn the_keeper_never_purges_what_a_consumer_has_not_acked() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    publish_n(&bus, PAGE_VIEWED, 10, "e").await;
    take(&bus, "CRM_INGEST", "router", 10, true).await;
    // Analytics has processed 4 and holds 6 delivered but unacknowledged (a slow batch).
    take(&bus, "CRM_INGEST", "analytics", 4, true).await;
    take(&bus, "CRM_INGEST", "analytics", 6, false).await;

    let report = bus
        .trim_ingest(&window(Duration::ZERO))
        .await
        .expect("trim");
    assert_eq!(report.processed_through, 4, "{report:?}");
    assert_eq!(report.purged, 4);
    assert_eq!(report.pinned_by.as_deref(), Some("analytics"));
    assert_eq!(report.unprocessed, 6);
    let kept = state(&bus, "CRM_INGEST").await;
    assert_eq!((kept.first_sequence, kept.messages), (5, 6));

    // Paused with undelivered work (the throttler at level 0): nothing of it goes either.
    publish_n(&bus, PAGE_VIEWED, 5, "later").await;
    take(&bus, "CRM_INGEST", "router", 5, true).await;
    bus.pause_consumer("CRM_INGEST", "analytics", Duration::from_secs(60))
        .await
        .expect("pause");
    let report = bus
        .trim_ingest(&window(Duration::ZERO))
        .await
        .expect("trim");
    assert_eq!(report.purged, 0, "{report:?}");
    let kept = state(&bus, "CRM_INGEST").await;
    assert_eq!((kept.first_sequence, kept.messages), (5, 11));
}

#[tokio::test]
async fn an_idle_filtered_consumer_does_not_pin_the_stream_and_a_busy_one_does() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    // No express type at all: router_express has never had anything to do.
    publish_n(&bus, PAGE_VIEWED, 6, "bulk").await;
    process_everything(&bus, 6).await;
    let report = bus
        .trim_ingest(&window(Duration::ZERO))
        .await
        .expect("trim");
    assert_eq!(report.purged, 6, "{report:?}");
    assert_eq!(state(&bus, "CRM_INGEST").await.messages, 0);

    // An express event router_express has not taken pins everything from it on.
    let express = publish_n(&bus, DEAL_WON, 1, "express").await[0];
    publish_n(&bus, PAGE_VIEWED, 3, "bulk-2").await;
    process_everything(&bus, 4).await;
    let report = bus
        .trim_ingest(&window(Duration::ZERO))
        .await
        .expect("trim");
    assert_eq!(
        report.pinned_by.as_deref(),
        Some("router_express"),
        "{report:?}"
    );
    assert_eq!(state(&bus, "CRM_INGEST").await.first_sequence, express);

    take(&bus, "CRM_INGEST", "router_express", 1, true).await;
    bus.trim_ingest(&window(Duration::ZERO))
        .await
        .expect("trim");
    assert_eq!(state(&bus, "CRM_INGEST").await.messages, 0);
}

#[tokio::test]
async fn the_keeper_trims_the_window_under_size_pressure_but_never_unprocessed_events() {
    let server = NatsServer::start();
    let max_bytes = 64 * 1024;
    let bus = provisioned_with(&server, |d| {
        set_stream_field(d, "CRM_INGEST", "max_bytes", max_bytes);
    })
    .await;
    let payload = [3u8; 1000];
    let mut n = 0;
    let fill_to = |bus: &Bus, fraction: f64, mut n: usize| {
        let bus = bus.clone();
        async move {
            while (state(&bus, "CRM_INGEST").await.bytes as f64) < fraction * max_bytes as f64 {
                publish(&bus, PAGE_VIEWED, &payload, &format!("big-{n}"))
                    .await
                    .expect("room left");
                n += 1;
            }
            n
        }
    };
    n = fill_to(&bus, 0.85, n).await;
    take(&bus, "CRM_INGEST", "router", n, true).await;
    // Analytics is far behind: it has processed fewer events than the keeper would like to trim.
    let processed = n / 10;
    take(&bus, "CRM_INGEST", "analytics", processed, true).await;

    let config = RetentionConfig::default(); // a 24 h window: nothing is old enough
    let report = bus.trim_ingest(&config).await.expect("trim");
    assert!(report.under_pressure, "{report:?}");
    assert_eq!(
        report.purged, processed as u64,
        "only processed events go: {report:?}"
    );
    assert_eq!(report.pinned_by.as_deref(), Some("analytics"));
    let kept = state(&bus, "CRM_INGEST").await;
    assert_eq!(kept.first_sequence, processed as u64 + 1);
    assert_eq!(kept.messages, (n - processed) as u64);

    // Analytics catches up and ingest fills past the mark again: now the keeper trims the
    // window's oldest part until ingest is below the high-water mark, and keeps the rest.
    let before = n;
    n = fill_to(&bus, 0.85, n).await;
    take(&bus, "CRM_INGEST", "router", n - before, true).await;
    take(&bus, "CRM_INGEST", "analytics", n - processed, true).await;
    let report = bus.trim_ingest(&config).await.expect("trim");
    assert!(report.under_pressure && report.purged > 0, "{report:?}");
    let kept = state(&bus, "CRM_INGEST").await;
    assert!(
        (kept.bytes as f64) < config.high_water * max_bytes as f64,
        "{kept:?}"
    );
    assert!(
        kept.messages as f64 > 0.5 * (n - processed) as f64,
        "the newest processed history stays: {kept:?}"
    );
    let report = bus.trim_ingest(&config).await.expect("trim");
    assert!(!report.under_pressure, "{report:?}");
    assert_eq!(
        report.purged, 0,
        "below the high-water mark the window is kept"
    );
}

#[tokio::test]
async fn several_keepers_at_once_never_purge_an_unprocessed_event() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    let shutdown = CancellationToken::new();
    let config = RetentionConfig {
        replay_window: Duration::ZERO,
        interval: Duration::from_millis(20),
        ..RetentionConfig::default()
    };
    let keepers: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(bus::run_ingest_retention(
                bus.clone(),
                config.clone(),
                shutdown.clone(),
            ))
        })
        .collect();
    let mut analytics_acked = 0;
    for round in 0..10 {
        publish_n(&bus, PAGE_VIEWED, 20, &format!("r{round}")).await;
        take(&bus, "CRM_INGEST", "router", 20, true).await;
        // Analytics lags 5 messages behind the router, always.
        take(&bus, "CRM_INGEST", "analytics", 15, true).await;
        analytics_acked += 15;
        let now = state(&bus, "CRM_INGEST").await;
        assert!(
            now.first_sequence <= analytics_acked + 1,
            "an event analytics has not processed was purged: {now:?}"
        );
        assert_eq!(
            now.messages,
            now.last_sequence - now.first_sequence + 1,
            "no gaps"
        );
    }
    eventually("the keepers to purge what everyone processed", || async {
        state(&bus, "CRM_INGEST").await.first_sequence == analytics_acked + 1
    })
    .await;
    shutdown.cancel();
    for keeper in keepers {
        tokio::time::timeout(Duration::from_secs(5), keeper)
            .await
            .expect("a keeper stops on shutdown")
            .expect("and does not panic");
    }
    assert_eq!(state(&bus, "CRM_INGEST").await.messages, 50);
}

#[tokio::test]
async fn the_keeper_keeps_going_when_the_stream_is_missing() {
    let server = NatsServer::start();
    let bus = connect(&server).await;
    let err = bus
        .trim_ingest(&RetentionConfig::default())
        .await
        .expect_err("no CRM_INGEST");
    assert!(err.to_string().contains("CRM_INGEST"), "{err}");
    let shutdown = CancellationToken::new();
    let keeper = tokio::spawn(bus::run_ingest_retention(
        bus.clone(),
        RetentionConfig {
            interval: Duration::from_millis(10),
            ..RetentionConfig::default()
        },
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!keeper.is_finished(), "errors do not stop the keeper");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), keeper)
        .await
        .expect("stops")
        .expect("no panic");
}

// ---------------------------------------------------------------------------------------------
// Stream usage gauges
// ---------------------------------------------------------------------------------------------

/// A recorder that keeps the last value of every gauge as `name{label=value,…}`.
#[derive(Debug, Clone, Default)]
struct Gauges(Arc<Mutex<HashMap<String, f64>>>);

#[derive(Debug)]
struct GaugeCell {
    key: String,
    values: Arc<Mutex<HashMap<String, f64>>>,
}

impl metrics::GaugeFn for GaugeCell {
    fn increment(&self, value: f64) {
        let mut values = self.values.lock().expect("gauges");
        *values.entry(self.key.clone()).or_default() += value;
    }
    fn decrement(&self, value: f64) {
        self.increment(-value);
    }
    fn set(&self, value: f64) {
        self.values
            .lock()
            .expect("gauges")
            .insert(self.key.clone(), value);
    }
}

impl metrics::Recorder for Gauges {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        metrics::Gauge::from_arc(Arc::new(GaugeCell {
            key: format!("{}{{{}}}", key.name(), labels.join(",")),
            values: self.0.clone(),
        }))
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

impl Gauges {
    fn get(&self, key: &str) -> Option<f64> {
        self.0.lock().expect("gauges").get(key).copied()
    }
}

#[tokio::test]
async fn stream_usage_is_exported_per_stream_with_its_limit() {
    let server = NatsServer::start();
    let bus = provisioned_with(&server, |d| set_stream_field(d, "CRM_DLQ", "max_bytes", -1)).await;
    publish_n(&bus, PAGE_VIEWED, 4, "usage").await;
    let usage = bus.stream_usage("CRM_INGEST").await.expect("usage");
    assert_eq!(usage.messages, 4);
    assert_eq!(usage.max_bytes, Some(2 * 1024 * 1024 * 1024));
    assert!(
        usage.ratio().is_some_and(|r| r > 0.0 && r < 0.001),
        "{usage:?}"
    );
    let dlq = bus.stream_usage("CRM_DLQ").await.expect("usage");
    assert_eq!((dlq.max_bytes, dlq.ratio()), (None, None), "unlimited");

    // The watcher runs on this (current-thread) runtime, so the thread's recorder sees it.
    let gauges = Gauges::default();
    let _guard = metrics::set_default_local_recorder(&gauges);
    let shutdown = CancellationToken::new();
    let streams: Vec<String> = Definitions::embedded().expect("definitions").stream_names();
    assert_eq!(streams.len(), 8);
    let watcher = tokio::spawn(bus::watch_streams(
        bus.clone(),
        streams,
        Duration::from_millis(20),
        shutdown.clone(),
    ));
    eventually("the gauges of all six streams", || async {
        gauges
            .get("crm_stream_messages{stream=CRM_LANE_STANDARD}")
            .is_some()
    })
    .await;
    assert_eq!(
        gauges.get("crm_stream_messages{stream=CRM_INGEST}"),
        Some(4.0)
    );
    assert_eq!(
        gauges.get("crm_stream_bytes{stream=CRM_INGEST}"),
        Some(usage.bytes as f64)
    );
    assert_eq!(
        gauges.get("crm_stream_max_bytes{stream=CRM_INGEST}"),
        Some(2_147_483_648.0)
    );
    assert_eq!(
        gauges.get("crm_stream_max_bytes{stream=CRM_DLQ}"),
        None,
        "no limit, no ratio to alert on"
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .expect("stops")
        .expect("no panic");
}
