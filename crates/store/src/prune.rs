//! Ledger retention: an event is recognised as a duplicate only while its ledger row exists, so
//! rows are kept for `[store] ledger_retention` (longer than anything can redeliver or replay an
//! event) and then deleted, a bounded chunk per statement.

use crate::{Store, StoreError, apply::now_ns, with_writer};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Rows deleted per statement: each chunk is its own short transaction, so the pruner never
/// keeps the writer (on SQLite, the one write connection) from the projector for long.
const PRUNE_CHUNK_ROWS: u32 = 1_000;

/// Deletes up to `$2` rows of `$table` processed before `$1` (ns), through its processed_at_ns
/// index. Row values `IN (subquery)` work on both backends.
macro_rules! delete_chunk {
    ($table:literal) => {
        concat!(
            "DELETE FROM ",
            $table,
            " WHERE (tenant_id, dedupe_key) IN (SELECT tenant_id, dedupe_key FROM ",
            $table,
            " WHERE processed_at_ns < $1 ORDER BY processed_at_ns LIMIT $2)"
        )
    };
}
/// Each ledger's delete, and whether it is analytics' (in its own SQLite file).
const DELETE_CHUNKS: [(&str, bool); 2] = [
    (delete_chunk!("processed_events"), false),
    (delete_chunk!("analytics_processed"), true),
];

impl Store {
    /// Delete the rows of both ledgers (the projection's and analytics') processed more than
    /// `older_than` ago; returns how many. An event whose row is gone is no longer recognised:
    /// delivered again, it would be applied again.
    pub async fn prune_ledgers(&self, older_than: Duration) -> Result<u64, StoreError> {
        let failed = self.failed("pruning the ledgers");
        let age_ns = i64::try_from(older_than.as_nanos()).unwrap_or(i64::MAX);
        let cutoff_ns = now_ns().saturating_sub(age_ns);
        let mut pruned = 0;
        for (delete, analytics) in DELETE_CHUNKS {
            let db = if analytics { self.analytics_db() } else { self };
            loop {
                let deleted = with_writer!(db, failed, writer => {
                    sqlx::query(delete)
                        .bind(cutoff_ns)
                        .bind(i64::from(PRUNE_CHUNK_ROWS))
                        .execute(writer.connection())
                        .await
                        .map_err(failed)?
                        .rows_affected()
                });
                pruned += deleted;
                if deleted < u64::from(PRUNE_CHUNK_ROWS) {
                    break;
                }
                // Let a queued projector or analytics batch have the writer between chunks.
                tokio::task::yield_now().await;
            }
        }
        Ok(pruned)
    }
}

/// Prune both ledgers of rows older than `retention`, now and then every `every`, until
/// `shutdown`. Logs and counts (`crm_store_ledger_pruned_total`) each prune; a failed prune is
/// logged and tried again at the next tick (the rows only wait longer).
pub async fn run_ledger_pruner(
    store: Store,
    retention: Duration,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let started = Instant::now();
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return,
            outcome = store.prune_ledgers(retention) => outcome,
        };
        ledger_pruned(outcome, retention, started.elapsed());
    }
}

/// The pruner's one signal: a log line and the counter.
fn ledger_pruned(outcome: Result<u64, StoreError>, retention: Duration, took: Duration) {
    match outcome {
        Ok(rows) => {
            crate::signals::ledger_pruned(rows);
            if rows > 0 {
                tracing::info!(
                    rows,
                    retention_s = retention.as_secs(),
                    took_ms = took.as_millis(),
                    "pruned ledger rows past retention"
                );
            } else {
                tracing::debug!(took_ms = took.as_millis(), "no ledger rows past retention");
            }
        }
        Err(error) => tracing::warn!(%error, "pruning the ledgers failed; trying again later"),
    }
}
