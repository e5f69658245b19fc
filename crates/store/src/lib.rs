//! The only sqlx user: the customer profile projection, its idempotency ledger, customer
//! context and the analytics aggregates, on SQLite (the embedded default, WAL) or PostgreSQL, with embedded migrations.
//!
//! Every piece of projected state is a last-writer-wins register ordered by
//! `(occurred_at in ns, event_id)`, or an aggregate that is either commutative (counts, latest
//! time) or derived from those registers (lifetime value). The ledger row is written in the same
//! transaction as the effects, so any delivery order and any duplication converge on the same
//! profile, and a redelivered event has no second effect.

mod analytics;
mod apply;
mod cache;
mod combine;
mod error;
mod gate;
mod model;
mod prune;
mod read;
mod registers;
mod signals;
mod writes;

pub use analytics::{AnalyticsSummary, ConsentCounts, MinuteCount, MoneyTotal, StageValue};
pub use apply::{Applied, BatchResult};
pub use cache::ContextCache;
pub use error::{FailureClass, StoreError};
pub use gate::WritePriority;
pub use model::{
    Conflict, Consent, CurrencyAmount, CustomerContext, Deal, FieldVersion, Profile, Ticket,
};
pub use prune::run_ledger_pruner;

use serde::{Deserialize, Serialize};
use sqlx::{
    PgPool, SqliteConnection, SqlitePool,
    postgres::PgPoolOptions,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions},
};
use std::{str::FromStr, time::Duration};

/// How to open a store: [`Store::connect_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// `sqlite://path?mode=rwc` or `postgres://…` / `postgresql://…`.
    pub url: String,
    /// SQLite only: when a commit reaches the disk.
    pub sqlite_synchronous: SqliteSynchronous,
    /// SQLite only: events per segment of a bulk batch while the priority path is active; a
    /// priority transaction waiting for the writer goes in at the next segment boundary (see
    /// [`Store::apply_batch`]). Smaller: shorter waits for critical commits, more statements
    /// for bulk. 0: bulk batches are never segmented.
    pub sqlite_yield_segment: usize,
}

/// [`StoreOptions::sqlite_yield_segment`] by default.
pub const DEFAULT_SQLITE_YIELD_SEGMENT: usize = 32;

impl StoreOptions {
    /// `url` with the durable defaults.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            sqlite_synchronous: SqliteSynchronous::default(),
            sqlite_yield_segment: DEFAULT_SQLITE_YIELD_SEGMENT,
        }
    }
}

/// SQLite's `synchronous` setting (in WAL mode), i.e. what a commit promises. The projector and
/// analytics ack their events after the commit, so this decides whether an acked event's effect
/// survives an OS crash or power loss. PostgreSQL always flushes its WAL at commit (with its
/// default `synchronous_commit = on`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSynchronous {
    /// Every commit is fsynced to the WAL before it returns: a committed (and so acked) batch
    /// survives a process crash, an OS crash and power loss.
    #[default]
    Full,
    /// Commits are fsynced only at checkpoints: a committed batch survives a process crash, but
    /// an OS crash or power loss can roll back the last commits, whose events were already acked
    /// and are not delivered again. Faster; for data that can be rebuilt by replaying the streams.
    Normal,
}

impl SqliteSynchronous {
    fn pragma(self) -> sqlx::sqlite::SqliteSynchronous {
        match self {
            Self::Full => sqlx::sqlite::SqliteSynchronous::Full,
            Self::Normal => sqlx::sqlite::SqliteSynchronous::Normal,
        }
    }
}

#[derive(Debug, Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Where write transactions run.
#[derive(Debug, Clone)]
enum Write {
    /// SQLite's one write connection, behind the writer's queue (priority transactions first,
    /// see [`gate`]).
    Sqlite(std::sync::Arc<gate::WriteGate<SqliteConnection>>),
    /// PostgreSQL's writers run side by side.
    Postgres(PgPool),
}

/// Connection pools to SQLite or PostgreSQL: one for writes, one for reads, so that a burst of
/// reads (the router's context lookups, profile and analytics reads) can never keep a projector
/// or analytics transaction waiting for a connection. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    /// Transactions that write. On SQLite a single connection: SQLite has one writer at a time
    /// anyway, and writers queueing for the connection (priority first) beats writers spinning
    /// on the database lock.
    write: Write,
    /// Plain reads (WAL lets them run beside the writer).
    read: Pool,
    /// SQLite: events per segment of a bulk batch while the priority path is active (0: none).
    yield_segment: usize,
    /// Where this handle's write transactions queue.
    priority: WritePriority,
    /// SQLite: priority batches waiting for the writer, applied together ([`combine`]).
    combiner: Option<std::sync::Arc<combine::Combiner>>,
    /// SQLite: the analytics tables' own database file ([`sqlite_analytics_path`]), with its own
    /// writer, so analytics transactions and the projection's never wait for each other. `None`
    /// where the analytics tables live beside the projection (PostgreSQL, in-memory SQLite).
    analytics: Option<std::sync::Arc<Store>>,
}

/// Runs `$body` with `$writer` bound to a write connection held for the body: on SQLite the
/// writer's [`gate::Pass`] (queued as the store's [`WritePriority`]), on PostgreSQL a
/// [`gate::Pooled`] connection; `$failed` maps a failure to get one. Both offer
/// `connection()`, `watch()` and `yield_to_priority()`. The SQL is the same for both backends:
/// `$N` placeholders, row values and `ON CONFLICT … DO UPDATE … WHERE`.
macro_rules! with_writer {
    ($store:expr, $failed:expr, $writer:ident => $body:expr) => {
        $crate::with_writer!(
            $store,
            $failed,
            None::<$crate::gate::Pass<sqlx::SqliteConnection>>,
            $writer => $body
        )
    };
    // `$pass`: SQLite's writer when the caller already holds it (`None`: queue for it).
    ($store:expr, $failed:expr, $pass:expr, $writer:ident => $body:expr) => {
        match &$store.write {
            $crate::Write::Sqlite(gate) => {
                #[allow(unused_mut)]
                let mut $writer = match $pass {
                    Some(pass) => pass,
                    None => gate.enter($store.priority).await,
                };
                $body
            }
            $crate::Write::Postgres(pool) => {
                drop($pass);
                #[allow(unused_mut)]
                let mut $writer = $crate::gate::Pooled(pool.acquire().await.map_err($failed)?);
                $body
            }
        }
    };
}
/// Runs `$body` with `$pool` bound to whichever read pool the store has.
macro_rules! with_read_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.read {
            $crate::Pool::Sqlite($pool) => $body,
            $crate::Pool::Postgres($pool) => $body,
        }
    };
}
pub(crate) use {with_read_pool, with_writer};

enum OpenError {
    Connect(sqlx::Error),
    Migrate(sqlx::migrate::MigrateError),
}

/// SQLite readers, every one opened with the store.
const SQLITE_READERS: u32 = 4;

/// SQLite's write connection, taken out of the pool that opened it and migrated it, for the
/// writer's gate to own.
async fn sqlite_writer(
    write: &SqlitePool,
) -> Result<std::sync::Arc<gate::WriteGate<SqliteConnection>>, sqlx::Error> {
    let connection = write.acquire().await?.detach();
    write.close().await;
    Ok(std::sync::Arc::new(gate::WriteGate::new(connection)))
}
/// Readers of analytics' file (the summary endpoints: rare reads).
const ANALYTICS_READERS: u32 = 1;

/// The SQLite writer (one connection) migrated, then the readers (which then see the schema).
///
/// sqlx runs each SQLite connection on a thread of its own, and a new thread takes the operating
/// system priority of the thread that starts it. A pool opens connections lazily, from whichever
/// task needs one, and recycles them (idle timeout, lifetime); in a process whose bulk threads run
/// lowered (`[runtime] bulk_nice`), the writer that critical commits go through would sooner or
/// later be opened by a bulk thread and run at bulk's priority. So every connection is opened
/// here, from the thread that opens the store, and kept for the life of the process (a
/// connection that breaks is replaced by the task that finds it broken).
async fn open_sqlite(
    options: &SqliteConnectOptions,
    readers: u32,
) -> Result<(SqlitePool, SqlitePool), OpenError> {
    let write = SqlitePoolOptions::new()
        .max_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options.clone())
        .await
        .map_err(OpenError::Connect)?;
    sqlx::migrate!("./migrations/sqlite")
        .run(&write)
        .await
        .map_err(OpenError::Migrate)?;
    let read = SqlitePoolOptions::new()
        .max_connections(readers)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_lazy_with(options.clone().read_only(true));
    let mut open = Vec::with_capacity(readers as usize);
    for _ in 0..readers {
        open.push(read.acquire().await.map_err(OpenError::Connect)?);
    }
    drop(open);
    Ok((write, read))
}

impl OpenError {
    fn into_store_error(self, backend: &'static str, url: &str) -> StoreError {
        match self {
            Self::Connect(source) => StoreError::Connect {
                backend,
                url: redacted(url),
                source,
            },
            Self::Migrate(source) => StoreError::Migrate { backend, source },
        }
    }
}

/// [`open_sqlite`], tried again while the failure is transient.
///
/// SQLite has no advisory lock: when several roles start at once over a new file, one may be
/// switching it to WAL or applying a migration while another starts to ("database is locked",
/// or a table that already exists). The loser tries again and then finds the work done. A file
/// that cannot be opened at all fails at once.
async fn open_sqlite_retrying(
    options: &SqliteConnectOptions,
    readers: u32,
) -> Result<(SqlitePool, SqlitePool), OpenError> {
    let mut attempt: u32 = 0;
    loop {
        match open_sqlite(options, readers).await {
            Ok(pools) => return Ok(pools),
            Err(OpenError::Connect(err))
                if error::classify("sqlite", &err) != FailureClass::Transient =>
            {
                return Err(OpenError::Connect(err));
            }
            Err(_) if attempt < 10 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
            }
            Err(err) => return Err(err),
        }
    }
}

/// Where analytics keeps its SQLite database beside the projection's at `main`:
/// `crm.db` → `crm-analytics.db`. SQLite has one writer per database file; with a file of its
/// own, counting analytics never queues behind a projector commit (nor one behind it). The file
/// has the same schema; only its `analytics_*` tables are used.
pub fn sqlite_analytics_path(main: &std::path::Path) -> std::path::PathBuf {
    let stem = main
        .file_stem()
        .map_or_else(|| "crm".into(), |s| s.to_string_lossy().into_owned());
    let name = match main.extension() {
        Some(extension) => format!("{stem}-analytics.{}", extension.to_string_lossy()),
        None => format!("{stem}-analytics"),
    };
    main.with_file_name(name)
}

/// The analytics file's options, from the projection's; `None` for an in-memory database.
fn sqlite_analytics_options(main: &SqliteConnectOptions) -> Option<SqliteConnectOptions> {
    let file = main.get_filename();
    let name = file.to_string_lossy();
    if name.is_empty() || name == ":memory:" || name.starts_with("file:") {
        return None;
    }
    Some(main.clone().filename(sqlite_analytics_path(file)))
}

/// The tables analytics writes, moved to its own file by [`adopt_legacy_analytics`].
const ANALYTICS_TABLES: [&str; 5] = [
    "analytics_processed",
    "analytics_event_counts",
    "analytics_tickets",
    "analytics_consents",
    "analytics_deals",
];

/// A database from before analytics had a file of its own counted into the projection's file:
/// when the analytics file is still empty and the projection's holds analytics rows, they move
/// (copied, then deleted from the projection's file), so nothing counted is counted again or
/// lost. Runs on the analytics writer, before anything else uses it.
async fn adopt_legacy_analytics(
    analytics: &SqlitePool,
    main: &SqliteConnectOptions,
) -> Result<(), sqlx::Error> {
    // EXISTS, not COUNT(*): this runs at every start, over a ledger that may hold millions.
    let counted: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM analytics_processed)")
        .fetch_one(analytics)
        .await?;
    if counted {
        return Ok(());
    }
    let mut conn = analytics.acquire().await?;
    sqlx::query("ATTACH DATABASE $1 AS projection")
        .bind(main.get_filename().to_string_lossy().into_owned())
        .execute(&mut *conn)
        .await?;
    let moved = async {
        let legacy: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM projection.analytics_processed)")
                .fetch_one(&mut *conn)
                .await?;
        if !legacy {
            return Ok(0);
        }
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let mut events = 0;
        // The table names are the constant ANALYTICS_TABLES, never input.
        for table in ANALYTICS_TABLES {
            let copied = sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO main.{table} SELECT * FROM projection.{table}"
            )))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if table == "analytics_processed" {
                events = copied;
            }
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM projection.{table}"
            )))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok::<u64, sqlx::Error>(events)
    }
    .await;
    sqlx::query("DETACH DATABASE projection")
        .execute(&mut *conn)
        .await?;
    let moved = moved?;
    if moved > 0 {
        tracing::info!(
            events = moved,
            "analytics moved to its own database file beside the projection's"
        );
    }
    Ok(())
}

pub(crate) use signals::stage;

/// `url` without a password, for messages.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            match url[scheme_end + 3..at].split_once(':') {
                Some((user, _password)) => {
                    format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..])
                }
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

impl Store {
    /// Connect with the defaults of [`StoreOptions::new`] (on SQLite `synchronous=FULL`) and
    /// run the embedded migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(&StoreOptions::new(url)).await
    }

    /// Connect and run the embedded migrations. SQLite runs in WAL mode with
    /// `options.sqlite_synchronous`, a busy timeout and foreign keys.
    pub async fn connect_with(options: &StoreOptions) -> Result<Self, StoreError> {
        let url = options.url.as_str();
        let scheme = url.split_once(':').map_or(url, |(scheme, _)| scheme);
        let backend = match scheme {
            "sqlite" => "sqlite",
            "postgres" | "postgresql" => "postgres",
            _ => {
                return Err(StoreError::UnsupportedScheme {
                    scheme: scheme.to_owned(),
                    url: redacted(url),
                });
            }
        };
        let connect_error = |source| StoreError::Connect {
            backend,
            url: redacted(url),
            source,
        };
        let migrate_error = |source| StoreError::Migrate { backend, source };
        let (write, read, analytics) = if backend == "sqlite" {
            let sqlite = SqliteConnectOptions::from_str(url)
                .map_err(connect_error)?
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(options.sqlite_synchronous.pragma())
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true);
            let (write, read) = open_sqlite_retrying(&sqlite, SQLITE_READERS)
                .await
                .map_err(|err| err.into_store_error(backend, url))?;
            let analytics = match sqlite_analytics_options(&sqlite) {
                Some(options) => {
                    // Analytics is bulk work: its connections are opened from a task on the
                    // runtime's worker threads, so its SQLite threads take their priority (in a
                    // role process, the lowered bulk threads), not the opener's.
                    let (write, read) = tokio::spawn(async move {
                        open_sqlite_retrying(&options, ANALYTICS_READERS).await
                    })
                    .await
                    // The task ends only by finishing, unless the runtime is shutting down.
                    .map_err(|_shutting_down| StoreError::Connect {
                        backend,
                        url: redacted(url),
                        source: sqlx::Error::WorkerCrashed,
                    })
                    .and_then(|opened| opened.map_err(|err| err.into_store_error(backend, url)))?;
                    adopt_legacy_analytics(&write, &sqlite)
                        .await
                        .map_err(|err| StoreError::Migrate {
                            backend,
                            source: sqlx::migrate::MigrateError::Execute(err),
                        })?;
                    let write = sqlite_writer(&write).await.map_err(connect_error)?;
                    Some(std::sync::Arc::new(Self {
                        write: Write::Sqlite(write),
                        read: Pool::Sqlite(read),
                        // Analytics counts; it applies no projector batches.
                        yield_segment: 0,
                        priority: WritePriority::Bulk,
                        combiner: None,
                        analytics: None,
                    }))
                }
                None => None,
            };
            let write = sqlite_writer(&write).await.map_err(connect_error)?;
            (Write::Sqlite(write), Pool::Sqlite(read), analytics)
        } else {
            let write = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await
                .map_err(connect_error)?;
            sqlx::migrate!("./migrations/postgres")
                .run(&write)
                .await
                .map_err(migrate_error)?;
            let read = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await
                .map_err(connect_error)?;
            (Write::Postgres(write), Pool::Postgres(read), None)
        };
        Ok(Self {
            combiner: matches!(write, Write::Sqlite(_)).then(Default::default),
            write,
            read,
            yield_segment: options.sqlite_yield_segment,
            priority: WritePriority::Bulk,
            analytics,
        })
    }

    /// The store analytics writes and reads: its own SQLite file, else this one.
    pub(crate) fn analytics_db(&self) -> &Store {
        self.analytics.as_deref().unwrap_or(self)
    }

    /// The same store whose write transactions queue as `priority`: on SQLite a
    /// [`WritePriority::Priority`] transaction takes the writer before every queued bulk one.
    pub fn with_write_priority(&self, priority: WritePriority) -> Self {
        Self {
            priority,
            ..self.clone()
        }
    }

    /// Which backend this is: `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self.write {
            Write::Sqlite(_) => "sqlite",
            Write::Postgres(_) => "postgres",
        }
    }

    /// Wraps a sqlx error with the backend and the operation that failed.
    fn failed(&self, operation: &'static str) -> impl Fn(sqlx::Error) -> StoreError + Copy {
        let backend = self.backend();
        move |source| StoreError::Query {
            backend,
            operation,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{ContextCache, Store, redacted};

    /// Callers box these futures as `Send` (axum handlers, `BoxFuture`s): a compile-time check.
    #[allow(dead_code)]
    fn futures_are_send(store: &Store, cache: &ContextCache) {
        fn send<T: Send>(_: T) {}
        send(store.apply_batch(&[]));
        send(store.profile("t", "c"));
        send(store.processed_count());
        send(cache.get("t", "c"));
        send(cache.invalidate("t", "c"));
    }

    /// What a commit promises is what was asked for; FULL unless told otherwise.
    #[tokio::test]
    async fn sqlite_synchronous_is_full_by_default_and_normal_on_request() {
        use super::{SqliteSynchronous, StoreOptions, Write, WritePriority};
        // PRAGMA synchronous reads 2 for FULL, 1 for NORMAL.
        for (synchronous, pragma) in [
            (None, 2),
            (Some(SqliteSynchronous::Full), 2),
            (Some(SqliteSynchronous::Normal), 1),
        ] {
            let db = test_support::TempSqlite::new();
            let store = match synchronous {
                None => Store::connect(&db.url()).await,
                Some(sqlite_synchronous) => {
                    Store::connect_with(&StoreOptions {
                        sqlite_synchronous,
                        ..StoreOptions::new(db.url())
                    })
                    .await
                }
            }
            .expect("connect");
            let Write::Sqlite(gate) = &store.write else {
                panic!("a SQLite store")
            };
            let mut writer = gate.enter(WritePriority::Bulk).await;
            let value: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(writer.connection())
                .await
                .expect("pragma");
            assert_eq!(value, pragma, "{synchronous:?}");
        }
    }

    #[test]
    fn synchronous_reads_from_config_words() {
        use super::SqliteSynchronous;
        #[derive(serde::Deserialize)]
        struct Section {
            sqlite_synchronous: SqliteSynchronous,
        }
        let parsed =
            |text: &str| serde_json::from_str::<Section>(text).map(|s| s.sqlite_synchronous);
        assert_eq!(
            parsed(r#"{"sqlite_synchronous":"full"}"#).ok(),
            Some(SqliteSynchronous::Full)
        );
        assert_eq!(
            parsed(r#"{"sqlite_synchronous":"normal"}"#).ok(),
            Some(SqliteSynchronous::Normal)
        );
        assert!(parsed(r#"{"sqlite_synchronous":"off"}"#).is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redacted("postgres://crm:s3cret@db:5432/crm"),
            "postgres://crm:***@db:5432/crm"
        );
        assert_eq!(redacted("postgres://crm@db/crm"), "postgres://crm@db/crm");
        assert_eq!(redacted("sqlite://.data/crm.db"), "sqlite://.data/crm.db");
    }
}
