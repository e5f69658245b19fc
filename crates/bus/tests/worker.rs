//! The worker runtime against a real nats-server.

use bus::{
    Bus, CancellationToken, Handler, Outcome, PublishOptions, WorkerConfig, headers, jetstream,
    run_worker,
};
use bytes::Bytes;
use events::{DlqStage, EventType, Lane};
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};
use test_support::NatsServer;

async fn provisioned(server: &NatsServer) -> Bus {
    test_support::provisioned_bus(&server.url()).await
}

/// Publish `count` messages to a lane, pipelined.
async fn fill(bus: &Bus, lane: Lane, count: usize, tag: &str) {
    let subject = events::lane_subject(lane, "acme", EventType::PageViewed).expect("subject");
    let mut acks = Vec::with_capacity(count);
    for i in 0..count {
        let options = PublishOptions::with_msg_id(format!("{tag}-{i}"));
        acks.push(
            bus.send(&subject, Bytes::from(format!("{tag}-{i}")), &options)
                .await
                .expect("send"),
        );
    }
    for ack in acks {
        bus.await_ack(&subject, ack).await.expect("ack");
    }
}

fn config() -> WorkerConfig {
    let mut config = WorkerConfig::new("test", "projector", DlqStage::Projector);
    config.max_batch = 50;
    config.backoff_base = Duration::from_millis(10);
    config.backoff_max = Duration::from_millis(50);
    config
}

/// Records (lane, payload) in processing order; stops the worker after `stop_after` messages.
struct Recorder {
    seen: Mutex<Vec<(Lane, String)>>,
    stop_after: usize,
    shutdown: CancellationToken,
}

impl Handler for Recorder {
    async fn handle(&self, source: &'static str, batch: &[jetstream::Message]) -> Vec<Outcome> {
        let lane = Lane::from_name(source).expect("a lane");
        let mut seen = self.seen.lock().expect("lock");
        for message in batch {
            seen.push((lane, String::from_utf8_lossy(&message.payload).into_owned()));
        }
        if seen.len() >= self.stop_after {
            self.shutdown.cancel();
        }
        vec![Outcome::Done; batch.len()]
    }
}

#[tokio::test]
async fn critical_work_overtakes_a_standard_backlog() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    fill(&bus, Lane::Standard, 3000, "std").await;
    fill(&bus, Lane::Critical, 20, "crit").await;

    let shutdown = CancellationToken::new();
    let recorder = Arc::new(Recorder {
        seen: Mutex::new(Vec::new()),
        stop_after: 3020,
        shutdown: shutdown.clone(),
    });
    let worker = tokio::spawn(run_worker(
        bus.clone(),
        config(),
        recorder.clone(),
        shutdown,
    ));
    tokio::time::timeout(Duration::from_secs(60), worker)
        .await
        .expect("worker finishes")
        .expect("join")
        .expect("worker ok");

    let seen = recorder.seen.lock().expect("lock").clone();
    let last_critical = seen
        .iter()
        .rposition(|(lane, _)| *lane == Lane::Critical)
        .expect("critical processed");
    let standard_before = seen[..last_critical]
        .iter()
        .filter(|(lane, _)| *lane == Lane::Standard)
        .count();
    assert_eq!(
        seen.iter().filter(|(l, _)| *l == Lane::Critical).count(),
        20
    );
    assert!(
        standard_before < 300,
        "all 20 critical events should be done while most of the 3000 standard ones wait; \
         {standard_before} standard went first"
    );
    // Everything acked: nothing pending on any lane.
    for lane in [Lane::Critical, Lane::Standard] {
        let mut consumer: jetstream::consumer::PullConsumer = bus
            .jetstream()
            .get_consumer_from_stream("projector", lane.stream())
            .await
            .expect("consumer");
        let info = consumer.info().await.expect("info");
        assert_eq!(info.num_pending + info.num_ack_pending as u64, 0, "{lane}");
    }
}

/// Fails each message `fail_times` times, then: `final_outcome`.
struct Flaky {
    fail_times: i64,
    final_outcome: Outcome,
    done: Mutex<Vec<(String, i64)>>,
}

impl Handler for Flaky {
    async fn handle(&self, _source: &'static str, batch: &[jetstream::Message]) -> Vec<Outcome> {
        batch
            .iter()
            .map(|message| {
                let delivered = message.info().expect("info").delivered;
                if delivered <= self.fail_times {
                    Outcome::retry("not yet")
                } else {
                    self.done.lock().expect("lock").push((
                        String::from_utf8_lossy(&message.payload).into_owned(),
                        delivered,
                    ));
                    self.final_outcome.clone()
                }
            })
            .collect()
    }
}

async fn run_until<F, Fut>(bus: &Bus, config: WorkerConfig, handler: Arc<impl Handler>, done: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(run_worker(bus.clone(), config, handler, shutdown.clone()));
    test_support::eventually("the condition", done).await;
    shutdown.cancel();
    worker.await.expect("join").expect("worker ok");
}

async fn dlq_len(bus: &Bus) -> u64 {
    let stream = bus.jetstream().get_stream("CRM_DLQ").await.expect("dlq");
    stream.get_info().await.expect("info").state.messages
}

async fn dlq_messages(bus: &Bus) -> Vec<jetstream::message::StreamMessage> {
    let stream = bus.jetstream().get_stream("CRM_DLQ").await.expect("dlq");
    let count = stream.get_info().await.expect("info").state.messages;
    let mut out = Vec::new();
    for seq in 1..=count {
        out.push(stream.get_raw_message(seq).await.expect("dlq message"));
    }
    out
}

#[tokio::test]
async fn retries_with_backoff_then_succeeds_once() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    fill(&bus, Lane::High, 5, "h").await;
    let handler = Arc::new(Flaky {
        fail_times: 2,
        final_outcome: Outcome::Done,
        done: Mutex::new(Vec::new()),
    });
    let h = handler.clone();
    run_until(&bus, config(), handler.clone(), || async {
        h.done.lock().expect("lock").len() >= 5
    })
    .await;
    let done = handler.done.lock().expect("lock").clone();
    assert_eq!(
        done.len(),
        5,
        "each message succeeds exactly once: {done:?}"
    );
    assert!(done.iter().all(|(_, delivered)| *delivered == 3));
    assert!(dlq_messages(&bus).await.is_empty());
}

#[tokio::test]
async fn poison_and_exhausted_retries_land_in_the_dlq_with_reasons() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    fill(&bus, Lane::Standard, 2, "poison").await;
    let handler = Arc::new(Flaky {
        fail_times: 0,
        final_outcome: Outcome::poison("invalid_event", "payload.x: bad"),
        done: Mutex::new(Vec::new()),
    });
    run_until(&bus, config(), handler, || async {
        dlq_len(&bus).await >= 2
    })
    .await;

    fill(&bus, Lane::Critical, 1, "exhaust").await;
    let mut exhausting = config();
    exhausting.max_deliveries = 3;
    let handler = Arc::new(Flaky {
        fail_times: i64::MAX,
        final_outcome: Outcome::Done,
        done: Mutex::new(Vec::new()),
    });
    run_until(&bus, exhausting, handler, || async {
        dlq_len(&bus).await >= 3
    })
    .await;

    let letters = dlq_messages(&bus).await;
    assert_eq!(letters.len(), 3);
    let get = |m: &jetstream::message::StreamMessage, name| {
        headers::get(Some(&m.headers), name)
            .unwrap_or_default()
            .to_owned()
    };
    for letter in &letters[..2] {
        assert_eq!(
            letter.subject.as_str(),
            "crm.dlq.projector.acme.page_viewed"
        );
        assert_eq!(get(letter, headers::DLQ_REASON), "invalid_event");
        assert_eq!(get(letter, headers::DLQ_STAGE), "projector");
        assert_eq!(get(letter, headers::DLQ_ORIGIN_STREAM), "CRM_LANE_STANDARD");
        assert_eq!(get(letter, headers::DLQ_ERROR), "payload.x: bad");
        assert!(letter.payload.starts_with(b"poison-"));
    }
    let exhausted = &letters[2];
    assert_eq!(get(exhausted, headers::DLQ_REASON), "max_deliveries");
    assert_eq!(get(exhausted, headers::DLQ_DELIVERIES), "3");
    assert_eq!(
        get(exhausted, headers::DLQ_ORIGIN_STREAM),
        "CRM_LANE_CRITICAL"
    );
    assert_eq!(get(exhausted, headers::DLQ_ORIGIN_SEQ), "1");

    // The originals were terminated: nothing left pending.
    let mut consumer: jetstream::consumer::PullConsumer = bus
        .jetstream()
        .get_consumer_from_stream("projector", "CRM_LANE_STANDARD")
        .await
        .expect("consumer");
    let info = consumer.info().await.expect("info");
    assert_eq!(info.num_pending + info.num_ack_pending as u64, 0);
}

/// Records each batch: its lead lane and every message's own lane (from its stream).
struct Batches {
    batches: Mutex<Vec<(Lane, Vec<Lane>)>>,
    total: Mutex<usize>,
    stop_after: usize,
    shutdown: CancellationToken,
}

impl Handler for Batches {
    async fn handle(&self, source: &'static str, batch: &[jetstream::Message]) -> Vec<Outcome> {
        let lane = Lane::from_name(source).expect("a lane");
        // Slow enough that every lane's buffer is full when the next batch is taken.
        tokio::time::sleep(Duration::from_millis(30)).await;
        let own: Vec<Lane> = batch
            .iter()
            .map(|m| {
                let stream = m.info().expect("info").stream.to_owned();
                *Lane::ALL
                    .iter()
                    .find(|l| l.stream() == stream)
                    .expect("a lane stream")
            })
            .collect();
        self.batches.lock().expect("lock").push((lane, own));
        let mut total = self.total.lock().expect("lock");
        *total += batch.len();
        if *total >= self.stop_after {
            self.shutdown.cancel();
        }
        vec![Outcome::Done; batch.len()]
    }
}

#[tokio::test]
async fn a_priority_batch_is_topped_up_from_the_lanes_below() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    fill(&bus, Lane::Standard, 1000, "std").await;
    let shutdown = CancellationToken::new();
    let handler = Arc::new(Batches {
        batches: Mutex::new(Vec::new()),
        total: Mutex::new(0),
        stop_after: 1005,
        shutdown: shutdown.clone(),
    });
    let mut config = config();
    config.top_up = true;
    let worker = tokio::spawn(run_worker(bus.clone(), config, handler.clone(), shutdown));
    // The standard backlog is being worked on; now a few critical events arrive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    fill(&bus, Lane::Critical, 5, "crit").await;
    tokio::time::timeout(Duration::from_secs(60), worker)
        .await
        .expect("worker finishes")
        .expect("join")
        .expect("worker ok");

    let batches = handler.batches.lock().expect("lock").clone();
    let led_by_critical: Vec<&Vec<Lane>> = batches
        .iter()
        .filter(|(lead, _)| *lead == Lane::Critical)
        .map(|(_, own)| own)
        .collect();
    assert!(!led_by_critical.is_empty(), "{batches:?}");
    for own in &led_by_critical {
        // Priority order inside a batch: the critical events first, then the standard top-up.
        let first_standard = own
            .iter()
            .position(|l| *l == Lane::Standard)
            .unwrap_or(own.len());
        assert!(
            own[first_standard..].iter().all(|l| *l == Lane::Standard),
            "{own:?}"
        );
    }
    let critical_batch_sizes: Vec<usize> = led_by_critical.iter().map(|own| own.len()).collect();
    assert!(
        critical_batch_sizes.iter().any(|n| *n > 5),
        "a critical batch was topped up with standard events: {critical_batch_sizes:?}"
    );
    let critical_seen: usize = batches
        .iter()
        .flat_map(|(_, own)| own)
        .filter(|l| **l == Lane::Critical)
        .count();
    assert_eq!(critical_seen, 5);
    // Acks are sent without waiting for the server's answer: on a busy machine the last
    // ones may still be on their way when the worker returns.
    for lane in [Lane::Critical, Lane::Standard] {
        test_support::eventually(&format!("every {lane} message acked"), || async {
            let info = bus
                .consumer_info(lane.stream(), "projector")
                .await
                .expect("consumer info");
            info.num_pending + info.num_ack_pending as u64 == 0
        })
        .await;
    }
}

/// Records the size of every batch; takes a few ms per batch, as a store commit does.
struct BatchSizes {
    sizes: Mutex<Vec<usize>>,
}

impl Handler for BatchSizes {
    async fn handle(&self, _source: &'static str, batch: &[jetstream::Message]) -> Vec<Outcome> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.sizes.lock().expect("lock").push(batch.len());
        vec![Outcome::Done; batch.len()]
    }
}

#[tokio::test]
async fn a_backlog_is_taken_in_full_batches() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    let backlog = 4_000;
    fill(&bus, Lane::Standard, backlog, "backlog").await;
    let mut config = config().lanes(&[Lane::Standard]);
    config.max_batch = 256;
    let handler = Arc::new(BatchSizes {
        sizes: Mutex::new(Vec::new()),
    });
    let seen = handler.clone();
    run_until(&bus, config, handler.clone(), move || {
        let seen = seen.clone();
        async move { seen.sizes.lock().expect("lock").iter().sum::<usize>() >= backlog }
    })
    .await;
    let sizes = handler.sizes.lock().expect("lock").clone();
    // While the lane holds more than a batch, every batch is a full one: a batch costs a
    // commit, so a backlog taken in small batches is drained at a fraction of the rate.
    let (last, full) = sizes.split_last().expect("batches");
    assert!(
        full.iter().all(|&n| n == 256) && *last <= 256,
        "batch sizes: {sizes:?}"
    );
    assert_eq!(sizes.len(), backlog.div_ceil(256), "batch sizes: {sizes:?}");
}

/// Batch sizes of a worker on the standard lane while `count` events trickle in `gap` apart.
async fn trickled(bus: &Bus, gather: Duration, count: usize, gap: Duration) -> Vec<usize> {
    let mut config = config().lanes(&[Lane::Standard]);
    config.gather = gather;
    let handler = Arc::new(BatchSizes {
        sizes: Mutex::new(Vec::new()),
    });
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(run_worker(
        bus.clone(),
        config,
        handler.clone(),
        shutdown.clone(),
    ));
    for i in 0..count {
        fill(bus, Lane::Standard, 1, &format!("trickle-{gather:?}-{i}")).await;
        tokio::time::sleep(gap).await;
    }
    let seen = handler.clone();
    test_support::eventually("every trickled event handled", move || {
        let seen = seen.clone();
        async move { seen.sizes.lock().expect("lock").iter().sum::<usize>() >= count }
    })
    .await;
    shutdown.cancel();
    worker.await.expect("join").expect("worker ok");
    handler.sizes.lock().expect("lock").clone()
}

#[tokio::test]
async fn a_gathering_worker_takes_events_that_trickle_in_as_one_batch() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    // Ten events 30 ms apart, nothing stored ahead of any of them: without `gather` each is a
    // batch (a transaction) of its own …
    let alone = trickled(&bus, Duration::ZERO, 10, Duration::from_millis(30)).await;
    assert!(alone.len() >= 5, "batch sizes without gather: {alone:?}");
    // … with it, the first one's batch waits for the rest (well inside its 2 s).
    let gathered = trickled(&bus, Duration::from_secs(2), 10, Duration::from_millis(30)).await;
    assert_eq!(gathered, [10], "batch sizes with gather");
}

/// Hangs in the handler for the first batch (a call that never returns) until released.
struct Hangs {
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

impl Handler for Hangs {
    async fn handle(&self, _source: &'static str, batch: &[jetstream::Message]) -> Vec<Outcome> {
        self.entered.notify_one();
        self.release.notified().await;
        vec![Outcome::Done; batch.len()]
    }
}

/// Answers "dependency down" to every batch: the runtime holds it and retries.
struct StoreDown;

impl Handler for StoreDown {
    async fn handle(&self, _source: &'static str, batch: &[jetstream::Message]) -> Vec<Outcome> {
        vec![Outcome::wait("store unavailable"); batch.len()]
    }
}

#[tokio::test]
async fn a_loop_stuck_in_its_handler_is_named_by_liveness_a_held_batch_is_not() {
    const BOUND: Duration = Duration::from_millis(300);
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    fill(&bus, Lane::High, 3, "h").await;
    let shutdown = CancellationToken::new();
    let stalled = |bus: &Bus| bus.liveness().stalled(std::time::Instant::now(), BOUND);

    // Waiting for work is not stuck.
    let idle = config().lanes(&[Lane::Critical]);
    let idle_worker = tokio::spawn(run_worker(
        bus.clone(),
        idle,
        Arc::new(StoreDown),
        shutdown.clone(),
    ));
    // A batch held for a dependency that is down retries, and each retry returns: live.
    let mut held = config().lanes(&[Lane::Standard]);
    held.wait_policy = bus::WaitPolicy::Hold;
    held.backoff_base = Duration::from_millis(20);
    held.wait_max = Duration::from_millis(50);
    fill(&bus, Lane::Standard, 2, "s").await;
    let held_worker = tokio::spawn(run_worker(
        bus.clone(),
        held,
        Arc::new(StoreDown),
        shutdown.clone(),
    ));
    // A handler that never returns: stuck once the bound has passed.
    let hangs = Arc::new(Hangs {
        entered: tokio::sync::Notify::new(),
        release: tokio::sync::Notify::new(),
    });
    let hung_worker = tokio::spawn(run_worker(
        bus.clone(),
        config().lanes(&[Lane::High]),
        hangs.clone(),
        shutdown.clone(),
    ));
    hangs.entered.notified().await;
    assert!(stalled(&bus).is_empty(), "within the bound");
    tokio::time::sleep(BOUND * 3).await;
    let names: Vec<String> = stalled(&bus).into_iter().map(|(name, _)| name).collect();
    assert_eq!(names, vec!["test/high".to_owned()], "only the hung loop");

    // It returns: live again.
    hangs.release.notify_one();
    test_support::eventually("the loop makes progress", || async {
        stalled(&bus).is_empty()
    })
    .await;
    shutdown.cancel();
    hangs.release.notify_waiters();
    for worker in [idle_worker, held_worker, hung_worker] {
        worker.await.expect("join").expect("worker ok");
    }
}
