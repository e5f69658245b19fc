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
    let (big, task) = bulk_in_progress(store).await;
    let applied = priority
        .apply_batch(&[update("vip", 1, "title", "ceo")])
        .await
        .expect("priority batch");
    assert_eq!(applied.outcomes, vec![Applied::Applied]);
    let result = task.await.expect("join");
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

/// Start a bulk batch of [`BULK`] events on `store`; returns its events and its task once it
/// holds the writer (sequencing, not timing: it is still being written 200 ms later).
async fn bulk_in_progress(
    store: &Store,
) -> (
    Vec<events::Event>,
    tokio::task::JoinHandle<store::BatchResult>,
) {
    let big: Vec<_> = (0..BULK)
        .map(|i| update(&format!("bulk-{i}"), i, "title", "engineer"))
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let task = {
        let (bulk, big, done) = (store.clone(), big.clone(), done.clone());
        tokio::spawn(async move {
            let result = bulk.apply_batch(&big).await.expect("bulk batch");
            done.store(true, Ordering::SeqCst);
            result
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        !done.load(Ordering::SeqCst),
        "the bulk batch is still being written when the priority ones arrive"
    );
    (big, task)
}

/// A store whose bulk batches are never segmented, so never give the writer way: priority
/// batches queue behind a bulk batch in progress.
async fn unsegmented(db: &TempSqlite) -> Store {
    Store::connect_with(&store::StoreOptions {
        sqlite_yield_segment: 0,
        ..store::StoreOptions::new(db.url())
    })
    .await
    .expect("connect")
}

/// Priority batches that wait for the writer at the same time (the projector's critical worker
/// keeps several in flight) go in as one transaction, one commit, instead of one each; each
/// caller is told its own events' outcomes and customers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_batches_that_wait_together_commit_together() {
    let db = TempSqlite::new();
    let store = unsegmented(&db).await;
    let (_, bulk) = bulk_in_progress(&store).await;
    let priority = store.with_write_priority(WritePriority::Priority);
    let repeated = update("p-1", 1, "title", "ceo");
    let batches = [
        vec![update("p-0", 1, "title", "cto")],
        vec![repeated.clone(), repeated],
        vec![update("p-2", 1, "tier", "premium")],
    ];
    let (a, b, c) = tokio::join!(
        priority.apply_batch(&batches[0]),
        priority.apply_batch(&batches[1]),
        priority.apply_batch(&batches[2]),
    );
    bulk.await.expect("join");
    let (a, b, c) = (a.expect("a"), b.expect("b"), c.expect("c"));
    assert_eq!(a.outcomes, [Applied::Applied]);
    // The repeated event is a duplicate within its own batch's part.
    assert_eq!(b.outcomes, [Applied::Applied, Applied::Duplicate]);
    assert_eq!(c.outcomes, [Applied::Applied]);
    let customer = |name: &str| vec![(common::TENANT.to_owned(), name.to_owned())];
    assert_eq!(a.changed_customers, customer("p-0"));
    assert_eq!(b.changed_customers, customer("p-1"));
    assert_eq!(c.changed_customers, customer("p-2"));
    assert_eq!(
        c.context_changed,
        customer("p-2"),
        "a tier write changes routing context"
    );
    assert!(a.context_changed.is_empty() && b.context_changed.is_empty());
    // One transaction: the ledger rows of all three batches carry the one processing time.
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&db.url())
        .await
        .expect("connect");
    let times: i64 = sqlx::query_scalar(
        "SELECT COUNT(DISTINCT processed_at_ns) FROM processed_events WHERE customer_id LIKE 'p-%'",
    )
    .fetch_one(&mut conn)
    .await
    .expect("times");
    assert_eq!(times, 1, "the three priority batches were one transaction");
}

/// A batch the store refuses, among priority batches that wait together, fails alone: the
/// shared transaction rolls back and every batch is applied again on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_among_combined_priority_batches_fails_alone() {
    let db = TempSqlite::new();
    let store = unsegmented(&db).await;
    common::refuse_poison(&db.url(), "profile_fields", "value").await;
    let (_, bulk) = bulk_in_progress(&store).await;
    let priority = store.with_write_priority(WritePriority::Priority);
    let batches = [
        [update("p-0", 1, "title", "cto")],
        [update("p-bad", 1, "title", "poison")],
        [update("p-1", 1, "title", "ceo")],
    ];
    let (good, bad, also_good) = tokio::join!(
        priority.apply_batch(&batches[0]),
        priority.apply_batch(&batches[1]),
        priority.apply_batch(&batches[2]),
    );
    bulk.await.expect("join");
    assert_eq!(good.expect("good").outcomes, [Applied::Applied]);
    assert_eq!(also_good.expect("also good").outcomes, [Applied::Applied]);
    let err = bad.expect_err("refused");
    assert_eq!(err.class(), store::FailureClass::Rejected, "{err}");
    for (customer, title) in [("p-0", "cto"), ("p-1", "ceo")] {
        let profile = store
            .profile(common::TENANT, customer)
            .await
            .expect("read")
            .expect("applied");
        assert_eq!(profile.events_applied, 1, "{customer}: {profile:?}");
        assert_eq!(
            profile.fields.get("title").map(String::as_str),
            Some(title),
            "{customer}: {profile:?}"
        );
    }
    assert_eq!(
        store.profile(common::TENANT, "p-bad").await.expect("read"),
        None
    );
}
