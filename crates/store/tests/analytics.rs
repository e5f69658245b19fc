//! Analytics aggregates on SQLite and PostgreSQL: exact counts whatever the duplication, and
//! deal-derived figures whatever the order.

#[macro_use]
mod common;

use common::*;
use events::{
    EventType,
    pb::{ConsentChannel, TicketSeverity},
    pbjson_types::Timestamp,
    sample,
};
use store::{Applied, Store};

conformance!(
    counts_each_event_once,
    pipeline_and_won_revenue_converge_in_any_order,
    events_per_minute_by_occurred_at,
    concurrent_overlapping_batches_count_each_event_once,
    a_retry_with_the_same_idempotency_key_is_counted_once,
);

/// A client retry after the bus's duplicate window (same idempotency key, new event id) is not
/// counted again; another tenant's event with the same key is.
async fn a_retry_with_the_same_idempotency_key_is_counted_once(store: Store) {
    let view = keyed(sample::event(EventType::PageViewed, TENANT, "c1"), "view-1");
    let deal = keyed(won("c1", 1, "d1", "USD", 500), "deal-1");
    assert_eq!(
        count(&store, &[view.clone(), deal.clone()]).await,
        [Applied::Applied, Applied::Applied]
    );
    let before = store.analytics_summary(TENANT).await.expect("summary");
    let mut retried_deal = retried(&deal);
    if let Some(events::pb::event::Payload::DealWon(won)) = retried_deal.payload.as_mut() {
        // Even if the retry differs, the key says it is the same operation.
        won.amount.get_or_insert_default().minor_units = 900;
    }
    assert_eq!(
        count(&store, &[retried(&view), retried_deal, retried(&view)]).await,
        [Applied::Duplicate, Applied::Duplicate, Applied::Duplicate]
    );
    assert_eq!(
        store.analytics_summary(TENANT).await.expect("summary"),
        before
    );
    assert_eq!(before.events_counted, 2);

    let mut elsewhere = retried(&view);
    elsewhere.tenant_id = "other-tenant".into();
    assert_eq!(count(&store, &[elsewhere]).await, [Applied::Applied]);
    let other = store
        .analytics_summary("other-tenant")
        .await
        .expect("summary");
    assert_eq!(other.events_by_type["page_viewed"], 1);
}

async fn count(store: &Store, events: &[events::Event]) -> Vec<Applied> {
    store
        .apply_analytics(events)
        .await
        .expect("apply_analytics")
}

fn mixed() -> Vec<events::Event> {
    vec![
        sample::event(EventType::PageViewed, TENANT, "c1"),
        sample::event(EventType::PageViewed, TENANT, "c2"),
        sample::event(EventType::EmailOpened, TENANT, "c1"),
        ticket_opened("c1", 1, "t1", TicketSeverity::High),
        ticket_opened("c2", 2, "t2", TicketSeverity::Low),
        ticket_escalated("c1", 3, "t1", TicketSeverity::Critical),
        consent("c1", 4, ConsentChannel::Email, false),
        consent("c2", 5, ConsentChannel::Email, true),
        consent("c3", 6, ConsentChannel::Sms, false),
        sample::event(EventType::PaymentFailed, "other-tenant", "c9"),
    ]
}

async fn counts_each_event_once(store: Store) {
    let events = mixed();
    // A repeat inside the batch counts once.
    let mut batch = events.clone();
    batch.push(events[0].clone());
    let applied = count(&store, &batch).await;
    assert_eq!(
        applied.iter().filter(|a| **a == Applied::Applied).count(),
        10
    );
    assert_eq!(applied[10], Applied::Duplicate);
    // A redelivered batch changes nothing.
    let again = count(&store, &events).await;
    assert!(again.iter().all(|a| *a == Applied::Duplicate), "{again:?}");

    let summary = store.analytics_summary(TENANT).await.expect("summary");
    assert_eq!(summary.events_counted, 9);
    let by_type: Vec<(&str, i64)> = summary
        .events_by_type
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        by_type,
        [
            ("consent_changed", 3),
            ("email_opened", 1),
            ("page_viewed", 2),
            ("ticket_escalated", 1),
            ("ticket_opened", 2),
        ]
    );
    assert_eq!(summary.tickets["opened"]["high"], 1);
    assert_eq!(summary.tickets["opened"]["low"], 1);
    assert_eq!(summary.tickets["escalated"]["critical"], 1);
    assert_eq!(
        (
            summary.consents["email"].granted,
            summary.consents["email"].revoked
        ),
        (1, 1)
    );
    assert_eq!(
        (
            summary.consents["sms"].granted,
            summary.consents["sms"].revoked
        ),
        (0, 1)
    );
    // Tenants are apart.
    let other = store
        .analytics_summary("other-tenant")
        .await
        .expect("summary");
    assert_eq!(other.events_counted, 1);
    assert_eq!(other.events_by_type["payment_failed"], 1);
    let nobody = store.analytics_summary("nobody").await.expect("summary");
    assert_eq!(nobody.events_counted, 0);
    assert!(nobody.events_by_type.is_empty());
}

fn deal_history() -> Vec<events::Event> {
    vec![
        stage("c1", 1, "d1", "qualified", Some(10_000)),
        stage("c1", 2, "d1", "proposal", None), // keeps its amount
        stage("c2", 3, "d2", "proposal", Some(5_000)),
        stage("c2", 4, "d3", "qualified", Some(7_000)),
        won("c2", 5, "d3", "EUR", 8_000), // leaves the pipeline, at its final amount
        stage("c3", 6, "d4", "qualified", Some(1_000)),
        lost("c3", 7, "d4"), // neither pipeline nor revenue
        won("c1", 8, "d5", "USD", 2_500),
    ]
}

async fn pipeline_and_won_revenue_converge_in_any_order(store: Store) {
    let forward = deal_history();
    let mut reversed = forward.clone();
    reversed.reverse();
    for event in &mut reversed {
        event.tenant_id = "mirror".into();
    }
    count(&store, &forward).await;
    // One by one in reverse: every register must still end on the latest write.
    for event in &reversed {
        count(&store, std::slice::from_ref(event)).await;
    }
    let summary = store.analytics_summary(TENANT).await.expect("summary");
    let mirror = store.analytics_summary("mirror").await.expect("summary");
    type StageRow<'a> = (&'a str, i64, Vec<(&'a str, i64)>);
    let pipeline: Vec<StageRow> = summary
        .pipeline
        .iter()
        .map(|(stage, v)| {
            let values = v
                .value_minor
                .iter()
                .map(|(c, a)| (c.as_str(), *a))
                .collect();
            (stage.as_str(), v.deals, values)
        })
        .collect();
    // `stage()` amounts are in USD (see common).
    assert_eq!(pipeline, [("proposal", 2, vec![("USD", 15_000)])]);
    assert_eq!(summary.won_revenue["EUR"].amount_minor, 8_000);
    assert_eq!(summary.won_revenue["USD"].amount_minor, 2_500);
    assert_eq!(summary.won_revenue["USD"].deals, 1);
    assert_eq!(summary.pipeline, mirror.pipeline);
    assert_eq!(summary.won_revenue, mirror.won_revenue);
    assert_eq!(summary.events_by_type, mirror.events_by_type);
}

async fn events_per_minute_by_occurred_at(store: Store) {
    let at = |seconds: i64, kind: EventType| {
        let mut event = sample::event(kind, TENANT, "c1");
        event.occurred_at = Some(Timestamp { seconds, nanos: 5 });
        event
    };
    let minute = 1_700_000_040; // a multiple of 60
    count(
        &store,
        &[
            at(minute, EventType::PageViewed),
            at(minute + 59, EventType::PageViewed),
            at(minute + 59, EventType::DealWon),
            at(minute + 60, EventType::PageViewed),
            at(minute + 600, EventType::PageViewed),
        ],
    )
    .await;
    let rows = store
        .analytics_events_per_minute(TENANT, minute, minute + 120, None)
        .await
        .expect("per minute");
    let rows: Vec<(&str, &str, i64)> = rows
        .iter()
        .map(|r| (r.minute.as_str(), r.event_type.as_str(), r.events))
        .collect();
    assert_eq!(
        rows,
        [
            ("2023-11-14T22:14:00Z", "deal_won", 1),
            ("2023-11-14T22:14:00Z", "page_viewed", 2),
            ("2023-11-14T22:15:00Z", "page_viewed", 1),
        ]
    );
    let won_only = store
        .analytics_events_per_minute(TENANT, minute, minute + 3600, Some(EventType::DealWon))
        .await
        .expect("per minute");
    assert_eq!(won_only.len(), 1);
    assert_eq!(won_only[0].events, 1);
}

async fn concurrent_overlapping_batches_count_each_event_once(store: Store) {
    let events: Vec<events::Event> = (0..200)
        .map(|i| {
            let kind = EventType::ALL[i % EventType::ALL.len()];
            sample::event(kind, TENANT, &format!("c{}", i % 7))
        })
        .collect();
    // Four writers over overlapping, differently ordered slices.
    let mut tasks = Vec::new();
    for w in 0..4usize {
        let store = store.clone();
        let mut slice: Vec<events::Event> = events[w * 30..w * 30 + 80].to_vec();
        if w % 2 == 1 {
            slice.reverse();
        }
        tasks.push(tokio::spawn(async move {
            for chunk in slice.chunks(16) {
                store
                    .apply_analytics(chunk)
                    .await
                    .expect("concurrent apply");
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
    count(&store, &events).await;
    let summary = store.analytics_summary(TENANT).await.expect("summary");
    assert_eq!(summary.events_counted, 200);
    assert_eq!(summary.events_by_type.values().sum::<i64>(), 200);
}

/// On SQLite (one writer per database file) analytics counts in a database file of its own, so
/// its transactions never queue behind the projection's, nor the projection's behind them.
#[tokio::test]
async fn on_sqlite_counting_does_not_wait_for_the_projection_writer() {
    use sqlx::{Connection, Executor};
    let db = test_support::TempSqlite::new();
    let store = Store::connect(&db.url()).await.expect("connect");
    // Another writer holds the projection's database.
    let mut other = sqlx::SqliteConnection::connect(&db.url())
        .await
        .expect("connect");
    other.execute("BEGIN IMMEDIATE").await.expect("write lock");
    let counted = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        store.apply_analytics(&[sample::event(EventType::PageViewed, TENANT, "c1")]),
    )
    .await;
    other.execute("ROLLBACK").await.expect("rollback");
    let counted = counted.expect("analytics waited for the projection's writer");
    assert_eq!(counted.expect("counted"), [Applied::Applied]);
    assert_eq!(events_counted(&store, TENANT).await, 1);
    assert!(
        std::path::Path::new(&store::sqlite_analytics_path(&db.path())).exists(),
        "the analytics file sits beside the projection's"
    );
}

/// A SQLite database from before analytics had a file of its own keeps what it counted: the
/// rows move to the analytics file when the store first opens it.
#[tokio::test]
async fn what_analytics_counted_in_the_projection_file_moves_to_its_own() {
    use sqlx::Executor;
    let db = test_support::TempSqlite::new();
    let legacy = sqlx::SqlitePool::connect(&db.url()).await.expect("connect");
    sqlx::migrate!("./migrations/sqlite")
        .run(&legacy)
        .await
        .expect("migrate");
    legacy
        .execute(
            "INSERT INTO analytics_processed (tenant_id, dedupe_key, event_id, processed_at_ns) \
             VALUES ('acme', 'e1', 'e1', 1), ('acme', 'e2', 'e2', 1); \
             INSERT INTO analytics_event_counts (tenant_id, minute_start_s, event_type, events) \
             VALUES ('acme', 60, 'page_viewed', 2);",
        )
        .await
        .expect("counted before the split");
    legacy.close().await;

    let store = Store::connect(&db.url()).await.expect("connect");
    let summary = store.analytics_summary("acme").await.expect("summary");
    assert_eq!(summary.events_counted, 2);
    assert_eq!(summary.events_by_type["page_viewed"], 2);
    // Still recognised: the ledger moved with the counts.
    let mut again = sample::event(EventType::PageViewed, "acme", "c1");
    again.event_id = "e1".into();
    assert_eq!(
        store.apply_analytics(&[again]).await.expect("count"),
        [Applied::Duplicate]
    );
    drop(store);
    // Opened again: nothing is moved twice.
    let store = Store::connect(&db.url()).await.expect("connect");
    assert_eq!(events_counted(&store, "acme").await, 2);
}
