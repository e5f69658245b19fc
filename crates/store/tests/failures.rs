//! Telling outages from bad data: `StoreError::class` on errors the real backends produce, and
//! a refused batch leaving nothing behind.

mod common;

use common::*;
use events::{EventType, sample};
use sqlx::{Connection, Executor};
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};
use store::{Applied, FailureClass, Store, StoreError};
use test_support::{TempPostgres, TempSqlite};
use tokio::{net::TcpListener, task::AbortHandle};

/// A sqlx error as the store reports it, to classify errors made on the side.
fn query_error(backend: &'static str, source: sqlx::Error) -> StoreError {
    StoreError::Query {
        backend,
        operation: "testing",
        source,
    }
}

/// A port nothing listens on (bound for a moment, then released).
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr").port()
}

#[tokio::test]
async fn a_postgres_that_refuses_connections_is_unavailable() {
    let url = format!("postgres://postgres@127.0.0.1:{}/crm", closed_port().await);
    let err = Store::connect(&url).await.expect_err("nothing listens");
    assert_eq!(err.class(), FailureClass::Unavailable, "{err}");
}

#[tokio::test]
async fn a_sqlite_file_that_cannot_be_opened_is_unavailable() {
    let err = Store::connect("sqlite:///nonexistent-dir/crm.db?mode=rwc")
        .await
        .expect_err("no such directory");
    assert_eq!(err.class(), FailureClass::Unavailable, "{err}");
    // The same from the driver itself: SQLITE_CANTOPEN.
    let raw = sqlx::SqliteConnection::connect("sqlite:///nonexistent-dir/crm.db?mode=rwc")
        .await
        .expect_err("cannot open");
    assert_eq!(
        query_error("sqlite", raw).class(),
        FailureClass::Unavailable
    );
}

/// A TCP relay to PostgreSQL that can be cut (every relayed connection dropped, new ones
/// accepted and closed at once, as a crashed or partitioned server looks) and restored.
struct Relay {
    port: u16,
    cut: Arc<AtomicBool>,
    relays: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Relay {
    async fn to(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let cut = Arc::new(AtomicBool::new(false));
        let relays: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept = tokio::spawn({
            let (cut, relays) = (cut.clone(), relays.clone());
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let upstream = upstream.clone();
                    let relay = tokio::spawn(async move {
                        if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    relays.lock().expect("relays").push(relay.abort_handle());
                }
            }
        })
        .abort_handle();
        Self {
            port,
            cut,
            relays,
            accept,
        }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for relay in self.relays.lock().expect("relays").drain(..) {
            relay.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// `url` (`postgres://user@host:port/db…`) through `127.0.0.1:port`.
fn via_port(url: &str, port: u16) -> (String, String) {
    let (scheme_user, rest) = url.split_once('@').expect("user@host in the test URL");
    let (host, path) = rest.split_once('/').expect("a database in the test URL");
    (
        format!("{scheme_user}@127.0.0.1:{port}/{path}"),
        host.to_owned(),
    )
}

/// PostgreSQL going away under a running store: the failures are Unavailable (never Rejected,
/// which would dead-letter good events), and the store works again once it is back.
#[tokio::test]
async fn a_postgres_outage_under_a_running_store_is_unavailable_and_passes() {
    let db = TempPostgres::create().await;
    let (_, upstream) = via_port(&db.url(), 0);
    let relay = Relay::to(upstream).await;
    let (url, _) = via_port(&db.url(), relay.port);
    let store = Store::connect(&url)
        .await
        .expect("connect through the relay");
    let first = sample::event(EventType::PageViewed, TENANT, "c1");
    store.apply_batch(&[first]).await.expect("apply");

    relay.cut();
    let batch = [sample::event(EventType::PageViewed, TENANT, "c2")];
    let err = store
        .apply_batch(&batch)
        .await
        .expect_err("the server is gone");
    assert_eq!(err.class(), FailureClass::Unavailable, "{err}");
    let err = store
        .profile(TENANT, "c1")
        .await
        .expect_err("reads fail too");
    assert_eq!(err.class(), FailureClass::Unavailable, "{err}");

    relay.restore();
    let outcomes = store.apply_batch(&batch).await.expect("back").outcomes;
    assert_eq!(
        outcomes,
        [Applied::Applied],
        "the failed batch left nothing"
    );
}

/// SQLite BUSY (another writer holds the lock past the busy timeout) is Transient.
#[tokio::test]
async fn a_locked_sqlite_database_is_transient() {
    let db = TempSqlite::new();
    let _store = Store::connect(&db.url()).await.expect("create the schema");
    let mut holder = sqlx::SqliteConnection::connect(&db.url())
        .await
        .expect("connect");
    holder
        .execute("BEGIN IMMEDIATE")
        .await
        .expect("take the write lock");
    let options: sqlx::sqlite::SqliteConnectOptions = db.url().parse().expect("options");
    let mut other = sqlx::SqliteConnection::connect_with(&options.busy_timeout(Duration::ZERO))
        .await
        .expect("connect");
    let busy = other
        .execute("BEGIN IMMEDIATE")
        .await
        .expect_err("the lock is held");
    assert_eq!(query_error("sqlite", busy).class(), FailureClass::Transient);
}

/// A PostgreSQL deadlock (40P01) is Transient: two transactions lock two rows in opposite order.
#[tokio::test]
async fn a_postgres_deadlock_is_transient() {
    let db = TempPostgres::create().await;
    let mut setup = sqlx::PgConnection::connect(&db.url())
        .await
        .expect("connect");
    setup
        .execute("CREATE TABLE pair (id INT PRIMARY KEY); INSERT INTO pair VALUES (1), (2)")
        .await
        .expect("setup");
    let lock_both = |first: i32, second: i32| {
        let url = db.url();
        async move {
            let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
            let mut tx = conn.begin().await.expect("begin");
            sqlx::query("SELECT id FROM pair WHERE id = $1 FOR UPDATE")
                .bind(first)
                .execute(&mut *tx)
                .await
                .expect("first lock");
            tokio::time::sleep(Duration::from_millis(300)).await;
            sqlx::query("SELECT id FROM pair WHERE id = $1 FOR UPDATE")
                .bind(second)
                .execute(&mut *tx)
                .await
                .map(drop)
        }
    };
    let (a, b) = tokio::join!(lock_both(1, 2), lock_both(2, 1));
    let deadlock = a
        .err()
        .or(b.err())
        .expect("one of them is the deadlock victim");
    let err = query_error("postgres", deadlock);
    assert_eq!(err.class(), FailureClass::Transient, "{err}");
}

/// A NUL byte in text (which PostgreSQL cannot store) fails the batch as Rejected, and the batch
/// leaves nothing: no ledger row, no profile, no count. Without the event at fault, the rest
/// applies, as a caller splitting the batch will find.
#[tokio::test]
async fn a_nul_byte_on_postgres_is_rejected_and_leaves_nothing() {
    let db = TempPostgres::create().await;
    let store = Store::connect(&db.url()).await.expect("connect");
    let good = vec![
        sample::event(EventType::ContactCreated, TENANT, "good"),
        won("good", 1, "d1", "USD", 500),
    ];
    let bad = update("bad", 2, "title", "CT\0O");
    let bad_deal = won("bad", 3, "d\0", "USD", 5);

    let mut batch = good.clone();
    batch.push(bad.clone());
    let err = store.apply_batch(&batch).await.expect_err("refused");
    assert_eq!(err.class(), FailureClass::Rejected, "{err}");
    assert_eq!(store.processed_count().await.expect("count"), 0);
    assert_eq!(store.profile(TENANT, "good").await.expect("read"), None);

    let mut batch = good.clone();
    batch.push(bad_deal.clone());
    let err = store.apply_analytics(&batch).await.expect_err("refused");
    assert_eq!(err.class(), FailureClass::Rejected, "{err}");
    let summary = store.analytics_summary(TENANT).await.expect("summary");
    assert_eq!(summary.events_counted, 0);
    assert!(summary.events_by_type.is_empty(), "{summary:?}");

    assert_eq!(
        store.apply_batch(&good).await.expect("apply").outcomes,
        [Applied::Applied; 2]
    );
    assert_eq!(
        store.apply_analytics(&good).await.expect("count"),
        [Applied::Applied; 2]
    );
}

/// SQLite stores any text, so its refusal is made with a trigger (a constraint the data breaks,
/// SQLITE_CONSTRAINT_TRIGGER): Rejected, and the failed transaction leaves nothing, whichever
/// statement of the batch failed.
#[tokio::test]
async fn a_refused_sqlite_write_is_rejected_and_leaves_nothing() {
    let db = TempSqlite::new();
    let store = Store::connect(&db.url()).await.expect("connect");
    common::refuse_poison(&db.url(), "profile_fields", "value").await;
    // Analytics counts in a file of its own.
    let analytics_url = format!(
        "sqlite://{}",
        store::sqlite_analytics_path(&db.path()).display()
    );
    common::refuse_poison(&analytics_url, "analytics_deals", "deal_id").await;
    let good = vec![
        sample::event(EventType::ContactCreated, TENANT, "good"),
        won("good", 1, "d1", "USD", 500),
        at("good", 2, sample::payload(EventType::PaymentFailed)),
    ];
    let mut batch = good.clone();
    batch.push(update("bad", 3, "title", "poison"));
    let err = store.apply_batch(&batch).await.expect_err("refused");
    assert_eq!(err.class(), FailureClass::Rejected, "{err}");
    assert_eq!(store.processed_count().await.expect("count"), 0);
    assert_eq!(store.profile(TENANT, "good").await.expect("read"), None);

    let mut batch = good.clone();
    batch.push(won("bad", 4, "poison", "USD", 5));
    let err = store.apply_analytics(&batch).await.expect_err("refused");
    assert_eq!(err.class(), FailureClass::Rejected, "{err}");
    assert_eq!(events_counted(&store, TENANT).await, 0);

    assert_eq!(
        store.apply_batch(&good).await.expect("apply").outcomes,
        [Applied::Applied; 3]
    );
    let p = store
        .profile(TENANT, "good")
        .await
        .expect("read")
        .expect("applied");
    assert_eq!((p.events_applied, p.payment_failures), (3, 1));
}

/// An error shared by concurrent cache lookups keeps its class.
#[test]
fn a_shared_error_keeps_its_class() {
    let err = query_error("postgres", sqlx::Error::PoolClosed);
    assert_eq!(
        StoreError::Shared(Arc::new(err)).class(),
        FailureClass::Unavailable
    );
}
