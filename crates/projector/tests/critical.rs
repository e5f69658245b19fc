//! The critical lane's worker against a real nats-server and SQLite: a critical event that
//! arrives while another critical batch waits for the writer queues at the writer beside it,
//! not behind it, so it goes in before the bulk transaction queued next.

use bus::{Bus, CancellationToken, PublishOptions, headers};
use bytes::Bytes;
use events::{Event, EventType, Lane};
use projector::ProjectorConfig;
use std::time::Duration;
use store::Store;
use test_support::{NatsServer, TempSqlite, eventually};

/// Events in the bulk transaction that holds the writer while the critical events arrive.
const HOLDING: usize = 100_000;

async fn publish_critical(bus: &Bus, event: &Event) {
    let subject = events::lane_subject(Lane::Critical, &event.tenant_id, EventType::PaymentFailed)
        .expect("subject");
    let options = PublishOptions::with_msg_id(event.event_id.clone())
        .header(headers::EVENT_ID, &event.event_id);
    bus.publish(&subject, Bytes::from(events::encode_proto(event)), &options)
        .await
        .expect("publish");
}

/// Where each event went in the ledger (insertion order).
async fn ledger_position(db: &TempSqlite, event: &Event) -> i64 {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&db.url())
        .await
        .expect("connect");
    sqlx::query_scalar("SELECT rowid FROM processed_events WHERE event_id = $1")
        .bind(&event.event_id)
        .fetch_one(&mut conn)
        .await
        .expect("in the ledger")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_event_does_not_wait_behind_a_critical_batch_that_waits_for_the_writer() {
    let server = NatsServer::start();
    let bus = test_support::provisioned_bus(&server.url()).await;
    let db = TempSqlite::new();
    let store = Store::connect(&db.url()).await.expect("store");
    let shutdown = CancellationToken::new();
    let projector = tokio::spawn(projector::run(
        bus.clone(),
        store.clone(),
        ProjectorConfig::default(),
        shutdown.clone(),
    ));

    // A long bulk transaction takes the writer (in one piece: no priority traffic yet) and a
    // short one queues behind it.
    let holding: Vec<Event> = (0..HOLDING)
        .map(|i| events::sample::event(EventType::PageViewed, "acme", &format!("bulk-{i}")))
        .collect();
    let first = {
        let store = store.clone();
        tokio::spawn(async move { store.apply_batch(&holding).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let queued = events::sample::event(EventType::PageViewed, "acme", "queued");
    let second = {
        let (store, queued) = (store.clone(), queued.clone());
        tokio::spawn(async move { store.apply_batch(&[queued]).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Two critical events, one after the other, while the writer is held.
    let a = events::sample::event(EventType::PaymentFailed, "acme", "vip-a");
    let b = events::sample::event(EventType::PaymentFailed, "acme", "vip-b");
    publish_critical(&bus, &a).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish_critical(&bus, &b).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !first.is_finished(),
        "the bulk transaction still holds the writer when both critical events have arrived \
         (make it longer on a faster machine)"
    );

    first.await.expect("join").expect("holding batch");
    second.await.expect("join").expect("queued batch");
    eventually("both critical events applied", || async {
        store.processed_count().await.expect("count") == (HOLDING + 3) as i64
    })
    .await;
    shutdown.cancel();
    projector.await.expect("join").expect("projector ok");

    let (a, b, queued) = (
        ledger_position(&db, &a).await,
        ledger_position(&db, &b).await,
        ledger_position(&db, &queued).await,
    );
    assert!(
        a < queued && b < queued,
        "both critical events went in before the bulk transaction queued behind the holder \
         (a {a}, b {b}, queued bulk {queued})"
    );
}
