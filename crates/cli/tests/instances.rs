//! Several instances of a role on the same durable consumers (what a Deployment with two
//! replicas runs): the work is shared, and the result is the one a single instance gives.

use cli::roles::Roles;
use events::{
    FieldMask,
    pb::{Contact, ContactUpdated, event::Payload},
    pbjson_types::Timestamp,
};
use store::Store;
use test_support::{NatsServer, TempPostgres, eventually};

mod common;
use common::*;

const CUSTOMERS: usize = 40;
const UPDATES: usize = 6;

/// Update `k` of `customer`: the title `title-<k>`, at second `since + k`.
fn update(customer: usize, k: usize, since: i64) -> events::Event {
    let mut event = events::sample::with_payload(
        Payload::ContactUpdated(ContactUpdated {
            contact: Some(Contact {
                title: format!("title-{k}"),
                ..Contact::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["title".into()],
            }),
        }),
        "acme",
        &format!("c-{customer}"),
    );
    event.occurred_at = Some(Timestamp {
        seconds: since + k as i64,
        nanos: 0,
    });
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_routers_and_two_projectors_converge_with_no_duplicate_effect() {
    let nats = NatsServer::start();
    let postgres = TempPostgres::create().await;
    let config = config(&nats, &postgres.url());
    let roles = Roles {
        router: true,
        projector: true,
        ..Roles::default()
    };
    let first = Platform::start(&config, roles).await;
    let second = Platform::start(&config, roles).await;

    // Every customer's updates in a scrambled order, and each one stored twice under different
    // message ids (a producer's retry that JetStream's dedupe window did not catch): both
    // instances see some of each customer's events, in no particular order.
    let hour_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
        - 3600;
    let mut updates: Vec<events::Event> = (0..CUSTOMERS)
        .flat_map(|customer| (0..UPDATES).map(move |k| update(customer, k, hour_ago)))
        .collect();
    let n = updates.len();
    updates = (0..n).map(|i| updates[(i * 7919) % n].clone()).collect();
    let bus = bus(&nats).await;
    // Both instances pull from the same durables: each keeps a pull request waiting on them.
    for (stream, durable) in [("CRM_INGEST", "router"), ("CRM_LANE_STANDARD", "projector")] {
        eventually(
            &format!("two instances pulling {stream}/{durable}"),
            || async {
                let info = bus.consumer_info(stream, durable).await.expect("info");
                info.num_waiting >= 2
            },
        )
        .await;
    }
    publish_events(&bus, &updates, "").await;
    // Let the first copies be in flight across both instances before the second.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    publish_events(&bus, &updates, "-again").await;

    let store = Store::connect(&postgres.url()).await.expect("store");
    eventually("every distinct event processed", || async {
        store.processed_count().await.expect("count") >= n as i64
    })
    .await;
    // Both copies of every event reached a projector by now or soon: give stragglers a moment,
    // then the ledger holds each event once and each had one effect.
    eventually("both lanes drained", || async {
        let mut pending = 0;
        for lane in ["CRM_LANE_STANDARD", "CRM_LANE_HIGH", "CRM_LANE_CRITICAL"] {
            let info = bus.consumer_info(lane, "projector").await.expect("info");
            pending += info.num_pending + info.num_ack_pending as u64;
        }
        let router = bus
            .consumer_info("CRM_INGEST", "router")
            .await
            .expect("info");
        pending + router.num_pending + router.num_ack_pending as u64 == 0
    })
    .await;
    assert_eq!(store.processed_count().await.expect("count"), n as i64);
    for customer in 0..CUSTOMERS {
        let profile = store
            .profile("acme", &format!("c-{customer}"))
            .await
            .expect("read")
            .expect("the customer exists");
        assert_eq!(profile.events_applied, UPDATES as i64, "c-{customer}");
        assert_eq!(
            profile.fields.get("title").map(String::as_str),
            Some(format!("title-{}", UPDATES - 1).as_str()),
            "c-{customer}: the newest write wins whichever instance applied it"
        );
    }
    first.shutdown().await;
    second.shutdown().await;
}

/// The instances whose decisions `subscription` carried within `window`.
async fn deciders(
    subscription: &mut bus::async_nats::Subscriber,
    window: std::time::Duration,
) -> std::collections::BTreeSet<String> {
    use futures::StreamExt as _;
    let mut seen = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, subscription.next()).await {
        let report: bus::control::ThrottleReport =
            serde_json::from_slice(&message.payload).expect("a throttle report");
        seen.insert(report.instance);
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_analytics_instances_have_one_throttle_decision_and_hand_it_over() {
    let nats = NatsServer::start();
    let postgres = TempPostgres::create().await;
    let config = config(&nats, &postgres.url());
    let roles = Roles::ANALYTICS;
    let bus = bus(&nats).await;
    let mut decisions = bus
        .client()
        .subscribe(bus::control::THROTTLE_SUBJECT)
        .await
        .expect("subscribe");
    let first = Platform::start(&config, roles).await;
    let window = std::time::Duration::from_secs(3);
    let leader = deciders(&mut decisions, window).await;
    assert_eq!(leader.len(), 1, "{leader:?}");
    let second = Platform::start(&config, roles).await;
    let both_running = deciders(&mut decisions, window).await;
    assert_eq!(both_running, leader, "one decision in force while both run");

    // The holder goes; the other takes the lease once it lapses, and decides alone.
    first.shutdown().await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let successor = loop {
        let seen = deciders(&mut decisions, window).await;
        if !seen.is_empty() && seen.is_disjoint(&leader) {
            break seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no other instance took over: {seen:?}"
        );
    };
    assert_eq!(successor.len(), 1, "{successor:?}");
    second.shutdown().await;
}
