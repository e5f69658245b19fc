//! What the store says happened, read straight from the run's database after the drain: which of
//! the events the harness heard nothing about are in a ledger anyway (a processed notice is best
//! effort and can be lost while NATS restarts), and how many effects each tenant has — one per
//! (tenant, idempotency key) processed, no more (a duplicate effect) and no fewer.

use crate::scenario::StoreKind;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, HashSet},
    str::FromStr,
};

/// Ids per `IN (…)` list.
const CHUNK: usize = 500;

/// The run's database, opened by the harness. On SQLite analytics has a file of its own
/// (`store::sqlite_analytics_path`).
#[derive(Debug)]
pub enum StoreProbe {
    Sqlite {
        projection: sqlx::SqlitePool,
        analytics: sqlx::SqlitePool,
    },
    Postgres(sqlx::PgPool),
}

/// One of the probe's pools.
enum ProbePool<'a> {
    Sqlite(&'a sqlx::SqlitePool),
    Postgres(&'a sqlx::PgPool),
}

/// A tenant's effects as the store counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreCounts {
    /// Rows of the projection's ledger (one per applied (tenant, key)).
    pub ledger: i64,
    /// `customers.events_applied`, summed: what the projection applied.
    pub events_applied: i64,
    /// Rows of the analytics ledger.
    pub analytics_ledger: i64,
    /// `analytics_event_counts.events`, summed: what analytics counted.
    pub analytics_counted: i64,
}

macro_rules! with_pool {
    ($probe:expr, $pool:ident => $body:expr) => {
        match $probe {
            ProbePool::Sqlite($pool) => $body,
            ProbePool::Postgres($pool) => $body,
        }
    };
}

impl StoreProbe {
    pub async fn connect(kind: StoreKind, url: &str) -> Result<Self> {
        Ok(match kind {
            StoreKind::Sqlite => {
                let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
                    .with_context(|| format!("reading {url}"))?;
                let analytics_file = store::sqlite_analytics_path(options.get_filename());
                let analytics = options.clone().filename(&analytics_file);
                Self::Sqlite {
                    projection: sqlx::SqlitePool::connect_with(options)
                        .await
                        .with_context(|| format!("opening {url}"))?,
                    analytics: sqlx::SqlitePool::connect_with(analytics)
                        .await
                        .with_context(|| format!("opening {}", analytics_file.display()))?,
                }
            }
            StoreKind::Postgres => Self::Postgres(
                sqlx::PgPool::connect(url)
                    .await
                    .with_context(|| format!("opening {url}"))?,
            ),
        })
    }

    /// The pool holding the projection's tables, or (`analytics`) analytics'.
    fn pool(&self, analytics: bool) -> ProbePool<'_> {
        match self {
            Self::Sqlite {
                projection,
                analytics: counted,
            } => ProbePool::Sqlite(if analytics { counted } else { projection }),
            Self::Postgres(pool) => ProbePool::Postgres(pool),
        }
    }

    /// Which of `ids` the projection's ledger (`analytics`: the analytics ledger) holds.
    pub async fn in_ledger(&self, ids: &[String], analytics: bool) -> Result<HashSet<String>> {
        let table = if analytics {
            "analytics_processed"
        } else {
            "processed_events"
        };
        let mut found = HashSet::new();
        for chunk in ids.chunks(CHUNK) {
            with_pool!(self.pool(analytics), pool => {
                let mut query = sqlx::QueryBuilder::new(format!(
                    "SELECT event_id FROM {table} WHERE event_id IN ("
                ));
                let mut list = query.separated(", ");
                for id in chunk {
                    list.push_bind(id.as_str());
                }
                query.push(")");
                let rows: Vec<(String,)> = query
                    .build_query_as()
                    .fetch_all(pool)
                    .await
                    .with_context(|| format!("reading {table}"))?;
                found.extend(rows.into_iter().map(|(id,)| id));
            });
        }
        Ok(found)
    }

    /// Each tenant's effects.
    pub async fn per_tenant(&self) -> Result<BTreeMap<String, StoreCounts>> {
        let mut out: BTreeMap<String, StoreCounts> = BTreeMap::new();
        // (query, whether it reads analytics' tables, the count it fills)
        let queries: [(&str, bool, CountField); 4] = [
            (
                "SELECT tenant_id, COUNT(*) FROM processed_events GROUP BY tenant_id",
                false,
                |c| &mut c.ledger,
            ),
            (
                "SELECT tenant_id, CAST(SUM(events_applied) AS BIGINT) FROM customers GROUP BY tenant_id",
                false,
                |c| &mut c.events_applied,
            ),
            (
                "SELECT tenant_id, COUNT(*) FROM analytics_processed GROUP BY tenant_id",
                true,
                |c| &mut c.analytics_ledger,
            ),
            (
                "SELECT tenant_id, CAST(SUM(events) AS BIGINT) FROM analytics_event_counts GROUP BY tenant_id",
                true,
                |c| &mut c.analytics_counted,
            ),
        ];
        for (sql, analytics, field) in queries {
            let rows: Vec<(String, i64)> = with_pool!(self.pool(analytics), pool => {
                sqlx::query_as(sql)
                    .fetch_all(pool)
                    .await
                    .with_context(|| format!("running {sql}"))?
            });
            for (tenant, n) in rows {
                *field(out.entry(tenant).or_default()) = n;
            }
        }
        Ok(out)
    }

    pub async fn close(self) {
        match self {
            Self::Sqlite {
                projection,
                analytics,
            } => {
                projection.close().await;
                analytics.close().await;
            }
            Self::Postgres(pool) => pool.close().await,
        }
    }
}

/// Which count of [`StoreCounts`] a query fills.
type CountField = fn(&mut StoreCounts) -> &mut i64;

/// One tenant's line: what the harness expects against what the store holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantEffects {
    pub tenant: String,
    /// Distinct (tenant, key) events the projector processed (retries of them excluded).
    pub expected: u64,
    pub store: StoreCounts,
    /// Distinct (tenant, key) events analytics counted.
    pub analytics_expected: u64,
}

/// Effects over every tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectsReport {
    pub tenants: Vec<TenantEffects>,
    /// Effects beyond one per (tenant, key) processed: applied or counted twice.
    pub duplicate_effects: u64,
    /// Processed (or counted), but without an effect in the store.
    pub missing_effects: u64,
}

/// Compare the expected effects per tenant (`(projection, analytics)`) with the store's counts.
/// Every measure of the store — ledger rows and applied counts, for both the projection and
/// analytics — must equal what was processed: above is a duplicate effect, below a missing one.
pub fn compare(
    expected: &BTreeMap<String, (u64, u64)>,
    store: &BTreeMap<String, StoreCounts>,
) -> EffectsReport {
    let mut report = EffectsReport::default();
    let tenants: std::collections::BTreeSet<&String> =
        expected.keys().chain(store.keys()).collect();
    for tenant in tenants {
        let (projection, analytics) = expected.get(tenant).copied().unwrap_or((0, 0));
        let counts = store.get(tenant).copied().unwrap_or_default();
        let mut worst_over = 0u64;
        let mut worst_under = 0u64;
        for (want, have) in [
            (projection, counts.ledger),
            (projection, counts.events_applied),
            (analytics, counts.analytics_ledger),
            (analytics, counts.analytics_counted),
        ] {
            let have = u64::try_from(have).unwrap_or(0);
            worst_over = worst_over.max(have.saturating_sub(want));
            worst_under = worst_under.max(want.saturating_sub(have));
        }
        report.duplicate_effects += worst_over;
        report.missing_effects += worst_under;
        report.tenants.push(TenantEffects {
            tenant: tenant.clone(),
            expected: projection,
            store: counts,
            analytics_expected: analytics,
        });
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(ledger: i64, applied: i64, a_ledger: i64, a_counted: i64) -> StoreCounts {
        StoreCounts {
            ledger,
            events_applied: applied,
            analytics_ledger: a_ledger,
            analytics_counted: a_counted,
        }
    }

    #[test]
    fn effects_match_only_when_every_measure_equals_what_was_processed() {
        let expected = BTreeMap::from([("a".to_owned(), (10, 12)), ("b".to_owned(), (5, 5))]);
        let store = BTreeMap::from([
            ("a".to_owned(), counts(10, 10, 12, 12)),
            ("b".to_owned(), counts(5, 5, 5, 5)),
        ]);
        let report = compare(&expected, &store);
        assert_eq!((report.duplicate_effects, report.missing_effects), (0, 0));
        assert_eq!(report.tenants.len(), 2);

        // A retry after the window applied again: a ledger keyed on the event id has two rows.
        let store = BTreeMap::from([
            ("a".to_owned(), counts(11, 11, 12, 12)),
            ("b".to_owned(), counts(5, 5, 5, 5)),
        ]);
        assert_eq!(compare(&expected, &store).duplicate_effects, 1);

        // Tenant b's events were taken for a's (a key shared across tenants): b has none.
        let store = BTreeMap::from([("a".to_owned(), counts(10, 10, 12, 12))]);
        let report = compare(&expected, &store);
        assert_eq!((report.duplicate_effects, report.missing_effects), (0, 5));

        // Counted twice by analytics while its ledger has one row.
        let store = BTreeMap::from([
            ("a".to_owned(), counts(10, 10, 12, 13)),
            ("b".to_owned(), counts(5, 5, 5, 5)),
        ]);
        assert_eq!(compare(&expected, &store).duplicate_effects, 1);

        // A tenant the harness never wrote for.
        let store = BTreeMap::from([
            ("a".to_owned(), counts(10, 10, 12, 12)),
            ("b".to_owned(), counts(5, 5, 5, 5)),
            ("c".to_owned(), counts(1, 1, 0, 0)),
        ]);
        assert_eq!(compare(&expected, &store).duplicate_effects, 1);
    }
}
