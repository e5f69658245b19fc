//! The router against a real nats-server: a lane that refuses writes holds its events in
//! CRM_INGEST (never dropped, never dead-lettered), and each routed event carries its id.

use bus::{Bus, CancellationToken, PublishOptions, headers};
use bytes::Bytes;
use events::{EventType, Lane};
use router::{RouterConfig, RulesHandle};
use std::{collections::HashSet, time::Duration};
use test_support::{NatsServer, eventually};

async fn provisioned(server: &NatsServer) -> Bus {
    test_support::provisioned_bus(&server.url()).await
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

fn start_router(bus: &Bus, shutdown: &CancellationToken) -> tokio::task::JoinHandle<()> {
    let config = RouterConfig {
        lane_retry_max: Duration::from_millis(500),
        ..RouterConfig::default()
    };
    let (bus, shutdown) = (bus.clone(), shutdown.clone());
    tokio::spawn(async move {
        router::run(
            bus,
            config,
            RulesHandle::new(routing::Rules::default()),
            None,
            shutdown,
        )
        .await
        .expect("router ok");
    })
}

#[tokio::test]
async fn a_full_lane_holds_its_events_in_ingest_and_loses_none() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    // Room for about a third of what comes.
    set_max_bytes(&bus, "CRM_LANE_STANDARD", 64 * 1024).await;
    let mut sent = HashSet::new();
    for i in 0..600 {
        let event = events::sample::event(EventType::PageViewed, "acme", &format!("c-{i}"));
        let subject = events::ingest_subject("acme", EventType::PageViewed).expect("subject");
        let options = PublishOptions::with_msg_id(events::ingest_msg_id(&event));
        let published = bus
            .publish(
                &subject,
                Bytes::from(events::encode_proto(&event)),
                &options,
            )
            .await
            .expect("ingest accepts");
        assert!(!published.duplicate);
        sent.insert(event.event_id);
    }
    let shutdown = CancellationToken::new();
    let router = start_router(&bus, &shutdown);

    eventually("the lane to fill", || async {
        bus.stream_state("CRM_LANE_STANDARD")
            .await
            .expect("state")
            .messages
            > 100
    })
    .await;
    // Longer than ten redeliveries at the old fixed 1 s delay, after which the server dropped
    // the events (max_deliver 10).
    tokio::time::sleep(Duration::from_secs(15)).await;
    let info = bus
        .consumer_info("CRM_INGEST", router::DURABLE)
        .await
        .expect("info");
    assert!(
        info.num_pending + info.num_ack_pending as u64 > 0,
        "the events the lane refused are still waiting in ingest"
    );

    // The operator makes room: every event arrives, each once.
    set_max_bytes(&bus, "CRM_LANE_STANDARD", 1024 * 1024 * 1024).await;
    eventually("all 600 on the lane", || async {
        bus.stream_state("CRM_LANE_STANDARD")
            .await
            .expect("state")
            .messages
            == 600
    })
    .await;
    eventually("ingest settled", || async {
        let info = bus
            .consumer_info("CRM_INGEST", router::DURABLE)
            .await
            .expect("info");
        info.num_pending == 0 && info.num_ack_pending == 0
    })
    .await;
    shutdown.cancel();
    router.await.expect("router stops");

    let lane = bus
        .jetstream()
        .get_stream(Lane::Standard.stream())
        .await
        .expect("lane");
    let mut routed = HashSet::new();
    for seq in 1..=600 {
        let message = lane.get_raw_message(seq).await.expect("message");
        let id = headers::get(Some(&message.headers), headers::EVENT_ID).expect("Crm-Event-Id");
        assert!(routed.insert(id.to_owned()), "{id} routed twice");
    }
    assert_eq!(routed, sent);
    assert!(
        bus.dlq_list(1, 10).await.expect("dlq").is_empty(),
        "a full lane is not a reason to dead-letter"
    );
}

async fn lane_msg_ids(bus: &Bus, lane: Lane) -> Vec<String> {
    let mut stream = bus
        .jetstream()
        .get_stream(lane.stream())
        .await
        .expect("lane stream");
    let last = stream.info().await.expect("info").state.last_sequence;
    let mut ids = Vec::new();
    for seq in 1..=last {
        let message = stream.get_raw_message(seq).await.expect("lane message");
        ids.push(
            headers::get(Some(&message.headers), headers::MSG_ID)
                .expect("a msg id")
                .to_owned(),
        );
    }
    ids
}

#[tokio::test]
async fn the_priority_ingest_stream_is_routed_by_its_own_worker_with_its_own_lane_ids() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    // A bulk backlog on CRM_INGEST and, behind it in time, a critical event on the priority
    // subject (as the gateway or a NATS-native producer sends it).
    for i in 0..300 {
        let event = events::sample::event(EventType::PageViewed, "acme", &format!("c-{i}"));
        let subject = events::ingest_subject("acme", EventType::PageViewed).expect("subject");
        bus.publish(
            &subject,
            Bytes::from(events::encode_proto(&event)),
            &PublishOptions::with_msg_id(events::ingest_msg_id(&event)),
        )
        .await
        .expect("ingest accepts");
    }
    let critical = events::sample::event(EventType::PaymentFailed, "acme", "c-1");
    let subject = events::priority_subject("acme", EventType::PaymentFailed).expect("subject");
    let stored = bus
        .publish(
            &subject,
            Bytes::from(events::encode_proto(&critical)),
            &PublishOptions::with_msg_id(events::ingest_msg_id(&critical)),
        )
        .await
        .expect("priority ingest accepts");
    assert_eq!(stored.stream, "CRM_INGEST_PRIORITY");

    let shutdown = CancellationToken::new();
    let router = start_router(&bus, &shutdown);
    eventually("everything routed", || async {
        let priority = bus
            .consumer_info("CRM_INGEST_PRIORITY", "router_priority")
            .await
            .expect("info");
        let bulk = bus
            .consumer_info("CRM_INGEST", "router")
            .await
            .expect("info");
        priority.num_pending + priority.num_ack_pending as u64 == 0
            && bulk.num_pending + bulk.num_ack_pending as u64 == 0
            && bulk.delivered.stream_sequence == 300
    })
    .await;
    shutdown.cancel();
    router.await.expect("router stops");

    assert_eq!(
        lane_msg_ids(&bus, Lane::Critical).await,
        [events::priority_lane_msg_id(stored.sequence)],
        "the priority stream's sequences are their own id namespace"
    );
    let standard = lane_msg_ids(&bus, Lane::Standard).await;
    assert_eq!(standard.len(), 300);
    assert!(standard.iter().all(|id| id.starts_with("crm/ingest/")));
}

const GOOD_RULES: &str = "[[critical]]\nreason = \"only_deals\"\ntypes = [\"deal_lost\"]\n";

/// Rules reloads are audited: each reload of the routing rules file, taken or refused, is a
/// record in CRM_AUDIT naming the process, the file and the outcome.
#[tokio::test]
async fn each_rules_reload_taken_or_refused_is_in_the_audit_log() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    let dir = std::env::temp_dir().join(format!("crm-rules-audit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("routing.toml");
    std::fs::write(&path, GOOD_RULES).expect("write");
    let handle = RulesHandle::load(&path).expect("good rules");
    let shutdown = CancellationToken::new();
    let watcher = tokio::spawn(router::watch_rules(
        handle,
        path.clone(),
        Duration::from_millis(20),
        Some((bus.clone(), "router-test".to_owned())),
        shutdown.clone(),
    ));
    let reloads = || async {
        bus.audit_list(Some("rules_reload"), 10)
            .await
            .expect("audit list")
    };

    // A change the watcher takes. (Written twice a moment apart: a file system with a coarse
    // clock may not show the first change in its modification time.)
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::fs::write(&path, format!("{GOOD_RULES}\n")).expect("write");
    eventually("the reload is audited", || async {
        !reloads().await.is_empty()
    })
    .await;
    let taken = reloads().await;
    assert_eq!(taken[0].actor, "router-test");
    assert_eq!(taken[0].target, path.display().to_string());
    assert_eq!(taken[0].outcome, "ok");
    assert_eq!(taken[0].detail["trigger"], "file_changed");

    // A bad file: refused, the old rules stay, and the refusal is recorded with its error.
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::fs::write(&path, "[[critical]]\nreason = 7\n").expect("write");
    eventually("the refusal is audited", || async {
        reloads().await.iter().any(|r| r.outcome != "ok")
    })
    .await;
    let refused = reloads().await.into_iter().find(|r| r.outcome != "ok");
    assert!(
        refused.is_some_and(|r| r.outcome.contains("routing.toml")),
        "the error names the file"
    );
    shutdown.cancel();
    watcher.await.expect("join");
    let _ = std::fs::remove_dir_all(&dir);
}
