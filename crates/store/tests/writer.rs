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

/// Events in the bulk batch: enough to take a while, so the priority transaction arrives mid-way.
const BULK: i64 = 50_000;

/// What happened when a priority transaction arrived while a bulk batch was being written.
struct Arrival {
    /// The bulk batch's events and result.
    bulk: Vec<events::Event>,
    result: store::BatchResult,
    /// Ledger positions (insertion order) of the priority event and of the last bulk event.
    vip: i64,
    last_bulk: i64,
}

/// Start a bulk batch of [`BULK`] events on `store` (after a priority transaction when `warm`,
/// so the priority path is active), let it take the writer, then apply one priority event.
async fn priority_during_bulk(db: &TempSqlite, store: &Store, warm: bool) -> Arrival {
    let priority = store.with_write_priority(WritePriority::Priority);
    if warm {
        priority
            .apply_batch(&[update("vip", 0, "title", "cto")])
            .await
            .expect("priority batch");
    }
    let big: Vec<_> = (0..BULK)
        .map(|i| update(&format!("bulk-{i}"), i, "title", "engineer"))
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let task = {
        let (bulk, big, done) = (store.clone(), big.clone(), done.clone());
        tokio::spawn(async move {
            let result = bulk.apply_batch(&big).await;
            done.store(true, Ordering::SeqCst);
            result
        })
    };
    // Sequencing, not timing: let the bulk batch take the writer first.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        !done.load(Ordering::SeqCst),
        "the bulk batch is still being written when the priority one arrives"
    );
    let applied = priority
        .apply_batch(&[update("vip", 1, "title", "ceo")])
        .await
        .expect("priority batch");
    assert_eq!(applied.outcomes, vec![Applied::Applied]);
    let result = task.await.expect("join").expect("bulk batch");
    let (vip, last_bulk) = ledger_positions(db).await;
    Arrival {
        bulk: big,
        result,
        vip,
        last_bulk,
    }
}

/// While the priority path is active, a bulk batch much larger than one segment is committed in
/// segments when a priority transaction waits for the writer, so that transaction goes in at the
/// next segment boundary instead of after the whole batch; every bulk event is still applied
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_transaction_goes_in_between_the_segments_of_a_bulk_batch() {
    let db = TempSqlite::new();
    let store = Store::connect(&db.url()).await.expect("connect");
    let arrival = priority_during_bulk(&db, &store, true).await;
    assert!(
        arrival.vip < arrival.last_bulk,
        "the priority event went into the ledger between bulk segments ({} < {})",
        arrival.vip,
        arrival.last_bulk
    );
    let result = arrival.result;
    assert_eq!(result.outcomes.len(), BULK as usize);
    assert!(result.outcomes.iter().all(|o| *o == Applied::Applied));
    assert_eq!(result.changed_customers.len(), BULK as usize);
    applied_once(&store).await;
    // Applying the batch again has no second effect, segment by segment.
    let again = store
        .apply_batch(&arrival.bulk)
        .await
        .expect("replayed batch");
    assert!(again.outcomes.iter().all(|o| *o == Applied::Duplicate));
    assert!(again.changed_customers.is_empty());
}

/// A priority transaction that starts waiting while the first segment of a bulk transaction is
/// being written does not wait for the rest of that segment: nothing of the bulk transaction is
/// committed yet, so it rolls back, lets the priority one in, and writes the segment again; every
/// bulk event is still applied exactly once. (One segment here, so the whole batch gives way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_transaction_does_not_wait_for_the_segment_being_written() {
    let db = TempSqlite::new();
    let store = Store::connect_with(&store::StoreOptions {
        sqlite_yield_segment: BULK as usize,
        ..store::StoreOptions::new(db.url())
    })
    .await
    .expect("connect");
    let arrival = priority_during_bulk(&db, &store, true).await;
    let first_bulk = first_bulk_position(&db).await;
    assert!(
        arrival.vip < first_bulk,
        "the priority event went into the ledger before any bulk event ({} < {first_bulk})",
        arrival.vip
    );
    assert!(
        arrival
            .result
            .outcomes
            .iter()
            .all(|o| *o == Applied::Applied)
    );
    assert_eq!(arrival.result.changed_customers.len(), BULK as usize);
    applied_once(&store).await;
}

/// With no priority traffic for a while, a bulk batch is written in one piece (segments cost
/// statements): the first priority transaction after the quiet spell waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_quiet_spell_a_bulk_batch_is_written_in_one_piece() {
    let db = TempSqlite::new();
    let store = Store::connect(&db.url()).await.expect("connect");
    let arrival = priority_during_bulk(&db, &store, false).await;
    assert!(
        arrival.vip > arrival.last_bulk,
        "the priority event went into the ledger after the whole bulk batch ({} > {})",
        arrival.vip,
        arrival.last_bulk
    );
}

/// `sqlite_yield_segment = 0` turns segments off: even while the priority path is active, a
/// priority transaction waits for the whole bulk batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_yield_segment_zero_bulk_batches_are_never_segmented() {
    let db = TempSqlite::new();
    let store = Store::connect_with(&store::StoreOptions {
        sqlite_yield_segment: 0,
        ..store::StoreOptions::new(db.url())
    })
    .await
    .expect("connect");
    let arrival = priority_during_bulk(&db, &store, true).await;
    assert!(
        arrival.vip > arrival.last_bulk,
        "{} > {}",
        arrival.vip,
        arrival.last_bulk
    );
}

/// The first and last bulk customers have one event applied, `vip` two (the warm-up and the one
/// that arrived during the bulk batch).
async fn applied_once(store: &Store) {
    for (customer, applied) in [("bulk-0", 1), ("bulk-49999", 1), ("vip", 2)] {
        let profile = store
            .profile(common::TENANT, customer)
            .await
            .expect("read")
            .expect("a profile");
        assert_eq!(profile.events_applied, applied, "{customer}: {profile:?}");
    }
}

/// Where in the ledger (insertion order) the first bulk event went.
async fn first_bulk_position(db: &TempSqlite) -> i64 {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&db.url())
        .await
        .expect("connect");
    sqlx::query_scalar("SELECT MIN(rowid) FROM processed_events WHERE customer_id LIKE 'bulk-%'")
        .fetch_one(&mut conn)
        .await
        .expect("bulk")
}

/// Where in the ledger (insertion order) the last event of customer `vip` and the last bulk
/// event went.
async fn ledger_positions(db: &TempSqlite) -> (i64, i64) {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&db.url())
        .await
        .expect("connect");
    let (vip,): (i64,) =
        sqlx::query_as("SELECT MAX(rowid) FROM processed_events WHERE customer_id = 'vip'")
            .fetch_one(&mut conn)
            .await
            .expect("vip");
    let (bulk,): (i64,) =
        sqlx::query_as("SELECT MAX(rowid) FROM processed_events WHERE customer_id LIKE 'bulk-%'")
            .fetch_one(&mut conn)
            .await
            .expect("bulk");
    (vip, bulk)
}

/// The writer passes from one transaction straight to the next: a priority transaction does not
/// wait for anything to run on the runtime of the bulk transaction before it. (In a role process
/// the bulk runtime's threads run at a lower OS priority; under load they may not be scheduled
/// for a while, and a critical commit must not wait for them.) Here the bulk runtime's only
/// thread is kept busy right after its transaction commits.
#[test]
fn the_writer_is_handed_over_without_the_bulk_runtime() {
    let db = TempSqlite::new();
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let store = main.block_on(Store::connect(&db.url())).expect("connect");
    let (committed, wait_for_commit) = std::sync::mpsc::channel();
    let bulk = {
        let store = store.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("bulk runtime");
            runtime.block_on(async move {
                store
                    .apply_batch(&[update("bulk", 0, "title", "engineer")])
                    .await
                    .expect("bulk batch");
                committed.send(()).expect("send");
                // Busy: nothing else on this runtime runs for a while.
                std::thread::sleep(std::time::Duration::from_secs(5));
            });
        })
    };
    wait_for_commit.recv().expect("the bulk batch committed");
    let started = std::time::Instant::now();
    let applied = main
        .block_on(
            store
                .with_write_priority(WritePriority::Priority)
                .apply_batch(&[update("vip", 1, "title", "ceo")]),
        )
        .expect("priority batch");
    let waited = started.elapsed();
    assert_eq!(applied.outcomes, vec![Applied::Applied]);
    assert!(
        waited < std::time::Duration::from_secs(2),
        "the priority transaction waited {waited:?} for the busy bulk runtime"
    );
    bulk.join().expect("bulk thread");
}
