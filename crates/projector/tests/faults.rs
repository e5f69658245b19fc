//! The projector under faults, against a real nats-server and real databases: an event the
//! store refuses is dead-lettered alone, and a store outage is waited out, never dead-lettered.

use bus::{Bus, CancellationToken, PublishOptions, headers};
use bytes::Bytes;
use events::{EventType, Lane};
use projector::ProjectorConfig;
use store::Store;
use test_support::{NatsServer, TcpProxy, TempPostgres, TempSqlite, eventually};

/// Publish one event per customer to the standard lane, as the router would.
async fn route(bus: &Bus, customers: &[String]) {
    for (i, customer) in customers.iter().enumerate() {
        let event = events::sample::event(EventType::PageViewed, "acme", customer);
        let subject =
            events::lane_subject(Lane::Standard, "acme", EventType::PageViewed).expect("subject");
        let options = PublishOptions::with_msg_id(format!("test/{i}"))
            .header(headers::EVENT_ID, &event.event_id);
        bus.publish(
            &subject,
            Bytes::from(events::encode_proto(&event)),
            &options,
        )
        .await
        .expect("publish");
    }
}

async fn dlq(bus: &Bus) -> Vec<bus::ops::DlqEntry> {
    bus.dlq_list(1, 1000).await.expect("dlq list")
}

async fn lane_settled(bus: &Bus) -> bool {
    let info = bus
        .consumer_info(Lane::Standard.stream(), projector::DURABLE)
        .await
        .expect("consumer info");
    info.num_pending == 0 && info.num_ack_pending == 0
}

/// Run the projector until the standard lane has nothing pending or unacked, then stop it.
async fn project_until_settled(bus: &Bus, store: &Store) {
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(projector::run(
        bus.clone(),
        store.clone(),
        config(),
        shutdown.clone(),
    ));
    eventually("the lane settled", || lane_settled(bus)).await;
    shutdown.cancel();
    worker.await.expect("join").expect("projector ok");
}

fn config() -> ProjectorConfig {
    ProjectorConfig {
        max_batch: 64,
        max_deliveries: 2,
        ..ProjectorConfig::default()
    }
}

#[tokio::test]
async fn an_event_the_store_refuses_is_dead_lettered_alone() {
    let server = NatsServer::start();
    let bus = test_support::provisioned_bus(&server.url()).await;
    let db = TempSqlite::new();
    let store = Store::connect(&db.url()).await.expect("store");
    // Passes validation, refused by the store: a database rule this test adds.
    let pool = sqlx::SqlitePool::connect(&db.url()).await.expect("pool");
    sqlx::query(
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON processed_events \
         WHEN NEW.customer_id = 'poison' BEGIN SELECT RAISE(ABORT, 'poison refused'); END",
    )
    .execute(&pool)
    .await
    .expect("trigger");

    let mut customers: Vec<String> = (0..40).map(|i| format!("cust-{i}")).collect();
    customers.insert(17, "poison".into());
    route(&bus, &customers).await;

    project_until_settled(&bus, &store).await;

    assert_eq!(
        store.processed_count().await.expect("count"),
        40,
        "every other event of the batch was applied"
    );
    let letters = dlq(&bus).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason, "store_rejected");
    assert!(letters[0].error.contains("poison refused"), "{letters:?}");
    let event = events::decode(&letters[0].payload, events::Encoding::Protobuf).expect("event");
    assert_eq!(event.customer_id, "poison");
}

#[tokio::test]
async fn a_postgres_outage_is_waited_out_not_dead_lettered() {
    let server = NatsServer::start();
    let bus = test_support::provisioned_bus(&server.url()).await;
    let db = TempPostgres::create().await;
    let upstream: std::net::SocketAddr = {
        let url = db.url();
        let authority = url
            .split_once("://")
            .and_then(|(_, rest)| rest.split('/').next())
            .expect("authority");
        let host_port = authority.rsplit('@').next().expect("host");
        tokio::net::lookup_host(host_port)
            .await
            .expect("resolve")
            .next()
            .expect("an address")
    };
    let proxy = TcpProxy::start(upstream).await;
    let store = Store::connect(&test_support::via(&db.url(), proxy.addr()))
        .await
        .expect("store");

    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(projector::run(
        bus.clone(),
        store.clone(),
        config(),
        shutdown.clone(),
    ));
    // Down before the events arrive, for longer than the retry budget (2 deliveries with
    // sub-second backoff) and than the consumers' ack wait.
    proxy.set_up(false);
    let customers: Vec<String> = (0..30).map(|i| format!("cust-{i}")).collect();
    route(&bus, &customers).await;
    tokio::time::sleep(std::time::Duration::from_secs(12)).await;
    assert!(
        dlq(&bus).await.is_empty(),
        "an outage is not a reason to dead-letter"
    );

    proxy.set_up(true);
    eventually("the lane settled", || lane_settled(&bus)).await;
    shutdown.cancel();
    worker.await.expect("join").expect("projector ok");
    assert_eq!(store.processed_count().await.expect("count"), 30);
    assert!(dlq(&bus).await.is_empty());
}

/// A lane message is applied only for the tenant its subject names: a producer allowed to write
/// one tenant's lane subjects cannot change another tenant's profiles by putting that tenant in
/// the payload. The mismatch is dead-lettered with its reason; the rest of the batch applies.
#[tokio::test]
async fn a_lane_message_for_another_tenant_than_its_subject_is_dead_lettered() {
    let server = NatsServer::start();
    let bus = test_support::provisioned_bus(&server.url()).await;
    let db = TempSqlite::new();
    let store = Store::connect(&db.url()).await.expect("store");
    route(&bus, &["cust-1".to_owned(), "cust-2".to_owned()]).await;
    // Tenant "globex" in the payload, on acme's subject.
    let spoofed = events::sample::event(EventType::PageViewed, "globex", "victim");
    let subject =
        events::lane_subject(Lane::Standard, "acme", EventType::PageViewed).expect("subject");
    bus.publish(
        &subject,
        Bytes::from(events::encode_proto(&spoofed)),
        &PublishOptions::with_msg_id("test/spoofed".to_owned())
            .header(headers::EVENT_ID, &spoofed.event_id),
    )
    .await
    .expect("publish");

    project_until_settled(&bus, &store).await;

    assert_eq!(store.processed_count().await.expect("count"), 2);
    let letters = dlq(&bus).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason, "subject_mismatch");
    assert!(letters[0].error.contains("globex"), "{letters:?}");
}
