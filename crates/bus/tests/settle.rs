//! The consumer runtime's promises against a real nats-server: nothing is given up on without a
//! dead letter, a full DLQ keeps the message, and an unavailable dependency is waited out
//! without spending deliveries.

use bus::{
    Bus, CancellationToken, Definitions, Handler, Outcome, PublishOptions, WaitPolicy,
    WorkerConfig, headers, jetstream, run_worker,
};
use bytes::Bytes;
use events::{DlqStage, EventType, Lane};
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};
use test_support::{NatsServer, eventually};

async fn provisioned(server: &NatsServer) -> Bus {
    test_support::provisioned_bus(&server.url()).await
}

async fn fill(bus: &Bus, lane: Lane, count: usize, tag: &str) {
    let subject = events::lane_subject(lane, "acme", EventType::PageViewed).expect("subject");
    for i in 0..count {
        let options = PublishOptions::with_msg_id(format!("{tag}-{i}"))
            .header(headers::EVENT_ID, format!("{tag}-{i}"));
        bus.publish(&subject, Bytes::from(format!("{tag}-{i}")), &options)
            .await
            .expect("publish");
    }
}

async fn set_max_bytes(bus: &Bus, stream: &str, max_bytes: i64) {
    let mut stream = bus.jetstream().get_stream(stream).await.expect("stream");
    let mut config = stream.info().await.expect("info").config.clone();
    config.max_bytes = max_bytes;
    bus.jetstream()
        .update_stream(config)
        .await
        .expect("update stream");
}

async fn dlq_len(bus: &Bus) -> u64 {
    bus.stream_state("CRM_DLQ").await.expect("dlq").messages
}

fn config() -> WorkerConfig {
    let mut config = WorkerConfig::new("test", "projector", DlqStage::Projector);
    config.max_batch = 50;
    config.backoff_base = Duration::from_millis(10);
    config.backoff_max = Duration::from_millis(40);
    config.wait_max = Duration::from_millis(200);
    config.max_deliveries = 3;
    config.health_interval = Duration::ZERO;
    config
}

/// Poisons every message and remembers the highest delivery count seen per payload.
#[derive(Default)]
struct Poisoner {
    deliveries: Mutex<HashMap<String, i64>>,
}

impl Handler for Poisoner {
    async fn handle(&self, _source: &'static str, batch: &[jetstream::Message]) -> Vec<Outcome> {
        let mut deliveries = self.deliveries.lock().expect("lock");
        for message in batch {
            let delivered = message.info().expect("info").delivered;
            let seen = deliveries
                .entry(String::from_utf8_lossy(&message.payload).into_owned())
                .or_default();
            *seen = (*seen).max(delivered);
        }
        vec![Outcome::poison("invalid_event", "bad"); batch.len()]
    }
}

#[tokio::test]
async fn consumers_leave_giving_up_to_the_application() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    let definitions = Definitions::embedded().expect("definitions");
    for consumer in &definitions.consumers {
        let info = bus
            .consumer_info(&consumer.stream, &consumer.durable)
            .await
            .expect("consumer info");
        assert_eq!(
            info.config.max_deliver, -1,
            "{}/{}: the server must never drop a message on its own",
            consumer.stream, consumer.durable
        );
    }
}

#[tokio::test]
async fn a_full_dlq_keeps_the_message_until_its_dead_letter_is_written() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    fill(&bus, Lane::Standard, 2, "poison").await;
    // Far too small for any dead letter: every DLQ write is refused.
    set_max_bytes(&bus, "CRM_DLQ", 64).await;

    let handler = Arc::new(Poisoner::default());
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(run_worker(
        bus.clone(),
        config(),
        handler.clone(),
        shutdown.clone(),
    ));
    // Well past max_deliveries (3) and the old server-side max_deliver (10): still here.
    eventually("a dozen deliveries of each poisoned message", || async {
        let deliveries = handler.deliveries.lock().expect("lock");
        deliveries.len() == 2 && deliveries.values().all(|d| *d >= 12)
    })
    .await;
    assert_eq!(dlq_len(&bus).await, 0);

    // The operator makes room: both dead letters are written and the originals terminated.
    set_max_bytes(&bus, "CRM_DLQ", 512 * 1024 * 1024).await;
    eventually("both dead letters", || async { dlq_len(&bus).await == 2 }).await;
    eventually("nothing left on the lane", || async {
        let info = bus
            .consumer_info("CRM_LANE_STANDARD", "projector")
            .await
            .expect("info");
        info.num_pending == 0 && info.num_ack_pending == 0
    })
    .await;
    shutdown.cancel();
    worker.await.expect("join").expect("worker ok");
}

/// One handler call: whether the dependency was down, and each message's payload and delivery
/// count.
type Call = (bool, Vec<(String, i64)>);

/// Answers `Wait` while `down` is set, else `Done`; records every call.
struct Outage {
    down: AtomicBool,
    calls: Mutex<Vec<Call>>,
}

impl Handler for Outage {
    async fn handle(&self, _source: &'static str, batch: &[jetstream::Message]) -> Vec<Outcome> {
        let down = self.down.load(Ordering::SeqCst);
        let seen = batch
            .iter()
            .map(|m| {
                (
                    String::from_utf8_lossy(&m.payload).into_owned(),
                    m.info().expect("info").delivered,
                )
            })
            .collect();
        self.calls.lock().expect("lock").push((down, seen));
        let outcome = if down {
            Outcome::wait("store unavailable")
        } else {
            Outcome::Done
        };
        vec![outcome; batch.len()]
    }
}

#[tokio::test]
async fn an_outage_is_waited_out_holding_the_batch_without_spending_deliveries() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    fill(&bus, Lane::Standard, 20, "std").await;
    let handler = Arc::new(Outage {
        down: AtomicBool::new(true),
        calls: Mutex::new(Vec::new()),
    });
    let mut config = config();
    config.wait_policy = WaitPolicy::Hold;
    // Shorter than the outage: without in-progress acks the batch would be redelivered.
    config.progress_interval = Duration::from_millis(300);
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(run_worker(
        bus.clone(),
        config,
        handler.clone(),
        shutdown.clone(),
    ));
    let ack_wait = bus
        .consumer_info("CRM_LANE_STANDARD", "projector")
        .await
        .expect("info")
        .config
        .ack_wait;
    eventually("the first attempt", || async {
        !handler.calls.lock().expect("lock").is_empty()
    })
    .await;
    // While the store is down, new work arrives; it must not be taken.
    fill(&bus, Lane::Critical, 3, "crit").await;
    tokio::time::sleep(ack_wait + Duration::from_secs(2)).await;
    handler.down.store(false, Ordering::SeqCst);
    eventually("every message done", || async {
        let done: std::collections::HashSet<String> = handler
            .calls
            .lock()
            .expect("lock")
            .iter()
            .filter(|(down, _)| !down)
            .flat_map(|(_, seen)| seen.iter().map(|(id, _)| id.clone()))
            .collect();
        done.len() == 23
    })
    .await;
    shutdown.cancel();
    worker.await.expect("join").expect("worker ok");

    let calls = handler.calls.lock().expect("lock").clone();
    let during: Vec<&Call> = calls.iter().filter(|(d, _)| *d).collect();
    assert!(
        during.len() >= 3,
        "the held batch was retried during the outage: {during:?}"
    );
    let first: Vec<&String> = during[0].1.iter().map(|(id, _)| id).collect();
    for (_, seen) in &during {
        let ids: Vec<&String> = seen.iter().map(|(id, _)| id).collect();
        assert_eq!(ids, first, "only the held batch is handled while waiting");
        assert!(
            seen.iter().all(|(_, delivered)| *delivered == 1),
            "held, not redelivered: {seen:?}"
        );
    }
    assert!(
        first.iter().all(|id| id.starts_with("std-")),
        "the critical events arrived during the outage and waited: {first:?}"
    );
    // Buffered messages went back to the server once, at most.
    let most = calls
        .iter()
        .flat_map(|(_, seen)| seen.iter().map(|(_, d)| *d))
        .max()
        .unwrap_or_default();
    assert!(most <= 2, "at most one extra delivery per outage: {most}");
    assert_eq!(
        dlq_len(&bus).await,
        0,
        "an outage is not a reason to dead-letter"
    );
}

#[tokio::test]
async fn redelivered_waits_never_reach_the_dlq() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    fill(&bus, Lane::High, 3, "high").await;
    let handler = Arc::new(Outage {
        down: AtomicBool::new(true),
        calls: Mutex::new(Vec::new()),
    });
    let mut config = config();
    config.wait_policy = WaitPolicy::Redeliver;
    config.wait_max = Duration::from_millis(30);
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(run_worker(
        bus.clone(),
        config,
        handler.clone(),
        shutdown.clone(),
    ));
    // Far more deliveries than max_deliveries (3): still waiting, nothing dead-lettered.
    eventually("many redeliveries", || async {
        handler
            .calls
            .lock()
            .expect("lock")
            .iter()
            .flat_map(|(_, seen)| seen.iter().map(|(_, d)| *d))
            .max()
            .unwrap_or_default()
            >= 8
    })
    .await;
    assert_eq!(dlq_len(&bus).await, 0);
    handler.down.store(false, Ordering::SeqCst);
    eventually("all done", || async {
        let info = bus
            .consumer_info("CRM_LANE_HIGH", "projector")
            .await
            .expect("info");
        info.num_pending == 0 && info.num_ack_pending == 0
    })
    .await;
    shutdown.cancel();
    worker.await.expect("join").expect("worker ok");
    assert_eq!(dlq_len(&bus).await, 0);
}

#[tokio::test]
async fn a_worker_holding_for_an_outage_still_stops_promptly_and_loses_nothing() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    fill(&bus, Lane::Standard, 5, "std").await;
    let handler = Arc::new(Outage {
        down: AtomicBool::new(true),
        calls: Mutex::new(Vec::new()),
    });
    let mut config = config();
    config.wait_policy = WaitPolicy::Hold;
    config.wait_max = Duration::from_secs(30);
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(run_worker(
        bus.clone(),
        config,
        handler.clone(),
        shutdown.clone(),
    ));
    eventually("holding", || async {
        !handler.calls.lock().expect("lock").is_empty()
    })
    .await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), worker)
        .await
        .expect("stops promptly even while holding")
        .expect("join")
        .expect("worker ok");
    // Whoever runs next gets every message, none dead-lettered (handed back, or after the ack
    // wait when the server gave a naked message to a pull request of the stopped worker).
    let next = Arc::new(Outage {
        down: AtomicBool::new(false),
        calls: Mutex::new(Vec::new()),
    });
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(run_worker(
        bus.clone(),
        self::config(),
        next.clone(),
        shutdown.clone(),
    ));
    let seen_by_next = || {
        next.calls
            .lock()
            .expect("lock")
            .iter()
            .flat_map(|(_, seen)| seen.iter().map(|(id, _)| id.clone()))
            .collect::<std::collections::HashSet<String>>()
    };
    eventually("the next worker has all five", || async {
        seen_by_next().len() == 5
    })
    .await;
    shutdown.cancel();
    worker.await.expect("join").expect("worker ok");
    assert_eq!(dlq_len(&bus).await, 0);
}
