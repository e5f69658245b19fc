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
mod model;
mod read;
mod writes;

pub use analytics::{AnalyticsSummary, ConsentCounts, MinuteCount, MoneyTotal, StageValue};
pub use apply::{Applied, BatchResult};
pub use cache::ContextCache;
pub use model::{Conflict, Consent, CustomerContext, Deal, FieldVersion, Profile, Ticket};

use sqlx::{
    PgPool, SqlitePool,
    postgres::PgPoolOptions,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};
use std::{str::FromStr, sync::Arc, time::Duration};

/// A store operation that failed; each variant names what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported store URL scheme {scheme:?} (in {url}): use sqlite:… or postgres:…")]
    UnsupportedScheme { scheme: String, url: String },
    #[error("connecting to the {backend} store at {url}: {source}")]
    Connect {
        backend: &'static str,
        url: String,
        source: sqlx::Error,
    },
    #[error("migrating the {backend} store: {source}")]
    Migrate {
        backend: &'static str,
        source: sqlx::migrate::MigrateError,
    },
    #[error("{operation} on the {backend} store: {source}")]
    Query {
        backend: &'static str,
        operation: &'static str,
        source: sqlx::Error,
    },
    /// The error of a lookup that concurrent [`ContextCache::get`] calls shared.
    #[error(transparent)]
    Shared(Arc<StoreError>),
}

#[derive(Debug, Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Connection pools to SQLite or PostgreSQL: one for writes, one for reads, so that a burst of
/// reads (the router's context lookups, profile and analytics reads) can never keep a projector
/// or analytics transaction waiting for a connection. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    /// Transactions that write. On SQLite a single connection: SQLite has one writer at a time
    /// anyway, and writers queueing for the connection (in order) beats writers spinning on
    /// the database lock.
    pool: Pool,
    /// Plain reads (WAL lets them run beside the writer).
    read: Pool,
}

/// Runs `$body` with `$pool` bound to whichever write pool the store has. The SQL is the same
/// for both backends: `$N` placeholders, row values and `ON CONFLICT … DO UPDATE … WHERE`.
macro_rules! with_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.pool {
            $crate::Pool::Sqlite($pool) => $body,
            $crate::Pool::Postgres($pool) => $body,
        }
    };
}
/// [`with_pool!`] for reads: the read pool.
macro_rules! with_read_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.read {
            $crate::Pool::Sqlite($pool) => $body,
            $crate::Pool::Postgres($pool) => $body,
        }
    };
}
pub(crate) use {with_pool, with_read_pool};

enum OpenError {
    Connect(sqlx::Error),
    Migrate(sqlx::migrate::MigrateError),
}

/// The SQLite writer (one connection) migrated, then the readers (which then see the schema).
async fn open_sqlite(
    options: &SqliteConnectOptions,
) -> Result<(SqlitePool, SqlitePool), OpenError> {
    let write = SqlitePoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options.clone())
        .await
        .map_err(OpenError::Connect)?;
    sqlx::migrate!("./migrations/sqlite")
        .run(&write)
        .await
        .map_err(OpenError::Migrate)?;
    let read = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options.clone().read_only(true))
        .await
        .map_err(OpenError::Connect)?;
    Ok((write, read))
}

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
    /// Connect and run the embedded migrations. `sqlite://path?mode=rwc` (WAL,
    /// `synchronous=NORMAL`, a busy timeout, foreign keys) or `postgres://…`/`postgresql://…`.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
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
        let (pool, read) = if backend == "sqlite" {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(connect_error)?
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true);
            // SQLite has no advisory lock: when several roles start at once over a new file,
            // one may be switching it to WAL or applying a migration while another starts to
            // ("database is locked", or a table that already exists). The loser tries again and
            // then finds the work done.
            let mut attempt: u32 = 0;
            let (write, read) = loop {
                match open_sqlite(&options).await {
                    Ok(pools) => break pools,
                    Err(_) if attempt < 10 => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                    }
                    Err(OpenError::Connect(err)) => return Err(connect_error(err)),
                    Err(OpenError::Migrate(err)) => return Err(migrate_error(err)),
                }
            };
            (Pool::Sqlite(write), Pool::Sqlite(read))
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
            (Pool::Postgres(write), Pool::Postgres(read))
        };
        Ok(Self { pool, read })
    }

    /// Which backend this is: `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
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
