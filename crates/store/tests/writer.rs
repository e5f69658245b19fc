//! SQLite's one writer, shared by bulk and priority transactions: a priority transaction never
//! waits for a whole bulk batch.

mod common;

use common::update;
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};
use store::{Applied, Store, WritePriority};
use test_support::TempSqlite;

/// A bulk batch much larger than one segment is committed in segments when a priority
/// transaction waits for the writer, so that transaction goes in at the next segment boundary
/// instead of after the whole batch; every bulk event is still applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_transaction_goes_in_between_the_segments_of_a_bulk_batch() {
    let db = TempSqlite::new();
    let store = Store::connect(&db.url()).await.expect("connect");
    let bulk = store.clone();
    let priority = store.with_write_priority(WritePriority::Priority);
    let big: Vec<_> = (0..20_000)
        .map(|i| update(&format!("bulk-{i}"), i, "title", "engineer"))
        .collect();
    let replay = big.clone();
    let bulk_done = Arc::new(AtomicBool::new(false));
    let bulk_task = {
        let done = bulk_done.clone();
        tokio::spawn(async move {
            let result = bulk.apply_batch(&big).await;
            done.store(true, Ordering::SeqCst);
            result
        })
    };
    // Sequencing, not timing: let the bulk batch take the writer first.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        !bulk_done.load(Ordering::SeqCst),
        "the bulk batch is still being written when the priority one arrives"
    );
    let consent = update("vip", 1, "title", "ceo");
    let applied = priority
        .apply_batch(std::slice::from_ref(&consent))
        .await
        .expect("priority batch");
    assert_eq!(applied.outcomes, vec![Applied::Applied]);
    assert!(
        !bulk_done.load(Ordering::SeqCst),
        "the priority transaction committed before the bulk batch was done"
    );

    let result = bulk_task.await.expect("join").expect("bulk batch");
    assert_eq!(result.outcomes.len(), 20_000);
    assert!(result.outcomes.iter().all(|o| *o == Applied::Applied));
    assert_eq!(result.changed_customers.len(), 20_000);
    for customer in ["bulk-0", "bulk-19999", "vip"] {
        let profile = store
            .profile(common::TENANT, customer)
            .await
            .expect("read")
            .expect("a profile");
        assert_eq!(profile.events_applied, 1, "{customer}: {profile:?}");
    }
    // Applying the batch again has no second effect, segment by segment.
    let again = store.apply_batch(&replay).await.expect("replayed batch");
    assert!(again.outcomes.iter().all(|o| *o == Applied::Duplicate));
    assert!(again.changed_customers.is_empty());
}
