//! Store errors, and what each means for the events at hand: an outage to wait out, a conflict
//! to retry, or data the database refused.

use std::sync::Arc;

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
    /// The error of a lookup that concurrent [`ContextCache::get`](crate::ContextCache::get)
    /// calls shared.
    #[error(transparent)]
    Shared(Arc<StoreError>),
}

/// What a failure says about the events of the operation: whether to wait, retry, or set the
/// data aside. Consumers settle on it: wait out [`Unavailable`](Self::Unavailable), retry
/// [`Transient`](Self::Transient) soon, and split a batch that failed as
/// [`Rejected`](Self::Rejected) until the event at fault is alone, then dead-letter that one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// The store is unreachable or down: connection refused or reset, pool timed out or closed,
    /// I/O and TLS failures; on PostgreSQL SQLSTATE classes 08 (connection), 53 (insufficient
    /// resources: disk full, out of memory, too many connections), 57P01–57P05 (shutdown,
    /// crash, starting up), 58 (system I/O), XX (internal, corruption), 28 (authorization),
    /// 3D000 (no such database), 25006 (a read-only standby); on SQLite CANTOPEN, IOERR, FULL,
    /// NOMEM, READONLY, PERM, CORRUPT, NOTADB, AUTH. Nothing is wrong with the events: wait it
    /// out, never dead-letter.
    Unavailable,
    /// A conflict with concurrent work: PostgreSQL class 40 (deadlock 40P01, serialization
    /// failure 40001, …) but 40002, lock not available (55P03), a cancelled statement (57014);
    /// SQLite BUSY, LOCKED, PROTOCOL, INTERRUPT. The same events should succeed if retried soon.
    Transient,
    /// Everything else: the database refused the statement, in practice because of the data
    /// itself — PostgreSQL class 22 (data exceptions: a NUL byte in text 22021, a number out of
    /// range 22003, …) and 23 (constraint violations), SQLite CONSTRAINT, TOOBIG, MISMATCH,
    /// RANGE and ERROR (e.g. "integer overflow"), values that cannot be encoded or decoded. The
    /// same events fail again whenever they are retried.
    Rejected,
}

impl StoreError {
    /// How to treat the events of the failed operation: see [`FailureClass`].
    pub fn class(&self) -> FailureClass {
        match self {
            Self::Query {
                backend, source, ..
            } => classify(backend, source),
            Self::Shared(inner) => inner.class(),
            // Not reaching, configuring or migrating the store is never the fault of an event.
            Self::UnsupportedScheme { .. } | Self::Connect { .. } | Self::Migrate { .. } => {
                FailureClass::Unavailable
            }
        }
    }
}

pub(crate) fn classify(backend: &str, error: &sqlx::Error) -> FailureClass {
    use sqlx::Error as E;
    match error {
        E::Database(database) => match (backend, database.code()) {
            ("postgres", Some(sqlstate)) => postgres_class(&sqlstate),
            ("sqlite", Some(code)) => code
                .parse::<i32>()
                .map_or(FailureClass::Rejected, sqlite_class),
            _ => FailureClass::Rejected,
        },
        E::Io(_)
        | E::Tls(_)
        | E::Protocol(_)
        | E::Configuration(_)
        | E::PoolTimedOut
        | E::PoolClosed
        | E::WorkerCrashed => FailureClass::Unavailable,
        // The connection was in an unexpected state: another connection will do.
        E::BeginFailed => FailureClass::Transient,
        _ => FailureClass::Rejected,
    }
}

/// By SQLSTATE (PostgreSQL Appendix A, "Error Codes").
fn postgres_class(sqlstate: &str) -> FailureClass {
    let class = sqlstate.get(..2).unwrap_or_default();
    match (class, sqlstate) {
        (_, "40002") => FailureClass::Rejected, // transaction integrity constraint violation
        ("40", _) | (_, "55P03" | "57014") => FailureClass::Transient,
        ("08" | "28" | "53" | "58" | "XX", _)
        | (_, "57P01" | "57P02" | "57P03" | "57P04" | "57P05" | "3D000" | "25006") => {
            FailureClass::Unavailable
        }
        _ => FailureClass::Rejected,
    }
}

/// By the primary result code, the low byte of SQLite's extended code
/// (<https://www.sqlite.org/rescode.html>).
fn sqlite_class(extended_code: i32) -> FailureClass {
    const PERM: i32 = 3;
    const BUSY: i32 = 5;
    const LOCKED: i32 = 6;
    const NOMEM: i32 = 7;
    const READONLY: i32 = 8;
    const INTERRUPT: i32 = 9;
    const IOERR: i32 = 10;
    const CORRUPT: i32 = 11;
    const FULL: i32 = 13;
    const CANTOPEN: i32 = 14;
    const PROTOCOL: i32 = 15;
    const AUTH: i32 = 23;
    const NOTADB: i32 = 26;
    match extended_code & 0xff {
        BUSY | LOCKED | PROTOCOL | INTERRUPT => FailureClass::Transient,
        PERM | NOMEM | READONLY | IOERR | CORRUPT | FULL | CANTOPEN | AUTH | NOTADB => {
            FailureClass::Unavailable
        }
        _ => FailureClass::Rejected,
    }
}

#[cfg(test)]
mod tests {
    use super::{FailureClass::*, postgres_class, sqlite_class};

    #[test]
    fn sqlstates_by_class() {
        for (sqlstate, class) in [
            ("08006", Unavailable),
            ("08001", Unavailable),
            ("57P01", Unavailable),
            ("57P02", Unavailable),
            ("57P03", Unavailable),
            ("53100", Unavailable),
            ("53300", Unavailable),
            ("58030", Unavailable),
            ("XX001", Unavailable),
            ("28P01", Unavailable),
            ("3D000", Unavailable),
            ("25006", Unavailable),
            ("40P01", Transient),
            ("40001", Transient),
            ("55P03", Transient),
            ("57014", Transient),
            ("40002", Rejected),
            ("22021", Rejected),
            ("22003", Rejected),
            ("23505", Rejected),
            ("23514", Rejected),
            ("42601", Rejected),
            ("", Rejected),
        ] {
            assert_eq!(postgres_class(sqlstate), class, "{sqlstate}");
        }
    }

    #[test]
    fn sqlite_codes_by_primary_code() {
        for (code, class) in [
            (5, Transient),     // BUSY
            (517, Transient),   // BUSY_SNAPSHOT
            (6, Transient),     // LOCKED
            (14, Unavailable),  // CANTOPEN
            (10, Unavailable),  // IOERR
            (778, Unavailable), // IOERR_WRITE
            (13, Unavailable),  // FULL
            (1, Rejected),      // ERROR ("integer overflow")
            (19, Rejected),     // CONSTRAINT
            (1555, Rejected),   // CONSTRAINT_PRIMARYKEY
            (18, Rejected),     // TOOBIG
        ] {
            assert_eq!(sqlite_class(code), class, "{code}");
        }
    }
}
