//! The platform on a 3-node JetStream cluster with every stream R3: a node is killed under load
//! and nothing acked is lost, the platform goes on with the survivors, and the node rejoins and
//! catches up.

use bus::{Bus, ConnectOptions, Definitions, PublishOptions};
use events::EventType;
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};
use store::Store;
use test_support::{NatsCluster, TempSqlite, connect_when_ready, eventually};

mod common;
use common::*;

const EVENTS: usize = 600;

/// A connection to the cluster once JetStream answers, with short timeouts (a publish to a stream
/// electing a leader fails fast and is sent again).
async fn connect(url: &str, name: &str) -> Bus {
    let mut options = ConnectOptions::new(url).name(name);
    options.connect_timeout = Duration::from_secs(2);
    options.request_timeout = Duration::from_secs(2);
    connect_when_ready(&options).await
}

/// The server leading `stream`'s replicas (`n2`), and the replicas that are current.
async fn placement(bus: &Bus, stream: &str) -> Option<(String, Vec<String>)> {
    let mut stream = bus.jetstream().get_stream(stream).await.ok()?;
    let cluster = stream.info().await.ok()?.cluster.clone()?;
    let current = cluster
        .replicas
        .iter()
        .filter(|r| r.current)
        .map(|r| r.name.clone())
        .collect();
    Some((cluster.leader?, current))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_under_load_loses_nothing_acked_and_rejoins() {
    let mut cluster = NatsCluster::start(3);
    let url = cluster.url();
    let operator = connect(&url, "operator").await;
    eventually("every stream is provisioned R3", || async {
        let definitions = Definitions::embedded()
            .expect("definitions")
            .with_replicas(3);
        operator.provision(&definitions).await.is_ok()
    })
    .await;
    let (_, replicas) = placement(&operator, "CRM_INGEST").await.expect("placed");
    assert_eq!(replicas.len(), 2, "R3: a leader and two followers");

    let sqlite = TempSqlite::new();
    let mut config = config(&cluster.nodes[0], &sqlite.url());
    config.nats.url = url.clone();
    let platform = Platform::start(&config, ALL).await;

    // A producer publishes EVENTS contact creations, each until JetStream acks it (a publish
    // that is not acked, while the stream elects a new leader, is sent again with its id).
    let acked = Arc::new(AtomicUsize::new(0));
    let producer = {
        let (bus, acked) = (connect(&url, "producer").await, acked.clone());
        tokio::spawn(async move {
            let mut retries = 0_usize;
            for i in 0..EVENTS {
                let event =
                    events::sample::event(EventType::ContactCreated, "acme", &format!("c-{i}"));
                let subject =
                    events::ingest_subject("acme", EventType::ContactCreated).expect("subject");
                let options = PublishOptions::with_msg_id(event.event_id.clone());
                while bus
                    .publish(&subject, events::encode_proto(&event).into(), &options)
                    .await
                    .is_err()
                {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                acked.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            retries
        })
    };

    // A third of the way in, the node leading CRM_INGEST goes.
    eventually("a third acked", || async {
        acked.load(Ordering::Relaxed) >= EVENTS / 3
    })
    .await;
    let (leader, _) = placement(&operator, "CRM_INGEST").await.expect("placed");
    cluster.node_named(&leader).stop();
    let retries = producer.await.expect("producer");
    assert_eq!(acked.load(Ordering::Relaxed), EVENTS);

    // Every acked event is processed once, by the platform on the two survivors.
    let store = Store::connect(&sqlite.url()).await.expect("store");
    eventually("every acked event processed", || async {
        store.processed_count().await.expect("count") >= EVENTS as i64
    })
    .await;
    assert_eq!(store.processed_count().await.expect("count"), EVENTS as i64);
    for i in (0..EVENTS).step_by(37) {
        let profile = store
            .profile("acme", &format!("c-{i}"))
            .await
            .expect("read")
            .expect("the customer exists");
        assert_eq!(profile.events_applied, 1, "c-{i} applied once");
    }

    // The node comes back and catches up: it is a current replica of every stream again.
    cluster.node_named(&leader).restart();
    for stream in Definitions::embedded().expect("definitions").stream_names() {
        eventually(&format!("{leader} current on {stream}"), || async {
            placement(&operator, &stream)
                .await
                .is_some_and(|(now_leading, current)| {
                    now_leading == leader || current.contains(&leader)
                })
        })
        .await;
    }
    eprintln!("{leader} killed under load: {retries} publishes retried, 0 acked events lost");
    platform.shutdown().await;
}
