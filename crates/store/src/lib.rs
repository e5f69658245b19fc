//! The only sqlx user: embedded migrations for SQLite (the embedded default, WAL) and
//! PostgreSQL, the customer profile projection, the idempotency ledger and customer context.
//!
//! Every piece of projected state is a last-writer-wins register ordered by
//! `(occurred_at, event_id)` or is derived from the ledger (lifetime value = sum of won deal
//! amounts, counts), so any delivery order and any duplication converge on the same profile.
//! The ledger row is written in the same transaction as the effects, so a redelivered event has
//! no second effect.

mod cache;
mod writes;

pub use cache::ContextCache;
pub use writes::{Write, writes};

use events::{Event, EventType, pb::CustomerTier};
use serde::Serialize;
use sqlx::{
    PgPool, SqlitePool,
    postgres::PgPoolOptions,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};
use std::{collections::BTreeMap, str::FromStr, time::Duration};
use writes::{occurred_at_ns, tier_from_label};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported store URL {0:?}: use sqlite://… or postgres://…")]
    UnsupportedUrl(String),
    #[error("connecting to the store at {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("migrating the store: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("store query failed: {0}")]
    Query(#[from] sqlx::Error),
}

#[derive(Debug, Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A connection pool to SQLite or PostgreSQL. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
}

/// What became of one event of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Applied,
    /// Already in the ledger: no effect.
    Duplicate,
}

/// The outcome of [`Store::apply_batch`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchResult {
    /// One per input event, in order.
    pub outcomes: Vec<Applied>,
    /// Customers an applied event touched (for cache invalidation), deduplicated.
    pub changed_customers: Vec<(String, String)>,
    /// Field writes that lost to a newer value.
    pub conflicts: u64,
}

/// What routing may know about a customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CustomerContext {
    pub tier: CustomerTier,
    /// Sum of won deal amounts in minor units, across currencies (no conversion).
    pub lifetime_value_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Version {
    pub occurred_at: String,
    pub event_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Consent {
    pub granted: bool,
    pub occurred_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Deal {
    pub deal_id: String,
    pub stage: String,
    pub status: String,
    pub amount_minor: Option<i64>,
    pub currency: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ticket {
    pub ticket_id: String,
    pub severity: String,
    pub status: String,
}

/// A customer's projected profile (the body of `GET /v1/customers/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Profile {
    pub tenant_id: String,
    pub customer_id: String,
    pub fields: BTreeMap<String, String>,
    pub field_versions: BTreeMap<String, Version>,
    pub tier: String,
    pub lifetime_value_minor: i64,
    pub consents: BTreeMap<String, Consent>,
    pub deals: Vec<Deal>,
    pub tickets: Vec<Ticket>,
    pub payment_failures: i64,
    pub events_applied: i64,
    pub last_event_at: Option<String>,
}

/// A write that lost to a newer one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    pub field: String,
    pub losing_value: String,
    pub losing_event_id: String,
    pub winning_event_id: String,
}

/// deal_id, stage, status, amount_minor, currency
type DealRow = (String, String, String, Option<i64>, Option<String>);

fn rfc3339(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
}

/// Runs `$body` with `$pool` bound to whichever pool the store has: the SQL is the same for both
/// (`$N` placeholders, `ON CONFLICT … DO UPDATE … WHERE`, row values).
macro_rules! with_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.pool {
            Pool::Sqlite($pool) => $body,
            Pool::Postgres($pool) => $body,
        }
    };
}

const INSERT_LEDGER: &str = "INSERT INTO processed_events \
    (tenant_id, event_id, customer_id, event_type, occurred_at_ns, processed_at_ns) \
    VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, event_id) DO NOTHING";
const UPSERT_FIELD: &str = "INSERT INTO profile_fields AS p \
    (tenant_id, customer_id, field, value, occurred_at_ns, event_id) VALUES ($1, $2, $3, $4, $5, $6) \
    ON CONFLICT (tenant_id, customer_id, field) DO UPDATE SET value = excluded.value, \
    occurred_at_ns = excluded.occurred_at_ns, event_id = excluded.event_id \
    WHERE (excluded.occurred_at_ns, excluded.event_id) > (p.occurred_at_ns, p.event_id)";
const SELECT_FIELD: &str = "SELECT value, occurred_at_ns, event_id FROM profile_fields \
    WHERE tenant_id = $1 AND customer_id = $2 AND field = $3";
const INSERT_CONFLICT: &str = "INSERT INTO profile_conflicts (tenant_id, customer_id, field, \
    losing_value, losing_event_id, losing_occurred_at_ns, winning_event_id, winning_occurred_at_ns) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
const UPSERT_CONSENT: &str = "INSERT INTO consents AS c \
    (tenant_id, customer_id, channel, granted, occurred_at_ns, event_id) VALUES ($1, $2, $3, $4, $5, $6) \
    ON CONFLICT (tenant_id, customer_id, channel) DO UPDATE SET granted = excluded.granted, \
    occurred_at_ns = excluded.occurred_at_ns, event_id = excluded.event_id \
    WHERE (excluded.occurred_at_ns, excluded.event_id) > (c.occurred_at_ns, c.event_id)";
const UPSERT_DEAL_STATE: &str = "INSERT INTO deals AS d \
    (tenant_id, customer_id, deal_id, stage, status, state_ns, state_event_id) VALUES ($1, $2, $3, $4, $5, $6, $7) \
    ON CONFLICT (tenant_id, customer_id, deal_id) DO UPDATE SET stage = excluded.stage, \
    status = excluded.status, state_ns = excluded.state_ns, state_event_id = excluded.state_event_id \
    WHERE (excluded.state_ns, excluded.state_event_id) > (d.state_ns, d.state_event_id)";
// A deal first seen through its amount gets a placeholder state older than any event.
const UPSERT_DEAL_AMOUNT: &str = "INSERT INTO deals AS d \
    (tenant_id, customer_id, deal_id, stage, status, state_ns, state_event_id, amount_minor, currency, amount_ns, amount_event_id) \
    VALUES ($1, $2, $3, '', 'open', -1, '', $4, $5, $6, $7) \
    ON CONFLICT (tenant_id, customer_id, deal_id) DO UPDATE SET amount_minor = excluded.amount_minor, \
    currency = excluded.currency, amount_ns = excluded.amount_ns, amount_event_id = excluded.amount_event_id \
    WHERE (excluded.amount_ns, excluded.amount_event_id) > (COALESCE(d.amount_ns, -1), COALESCE(d.amount_event_id, ''))";
const UPSERT_TICKET: &str = "INSERT INTO tickets AS t \
    (tenant_id, customer_id, ticket_id, severity, status, occurred_at_ns, event_id) VALUES ($1, $2, $3, $4, $5, $6, $7) \
    ON CONFLICT (tenant_id, customer_id, ticket_id) DO UPDATE SET severity = excluded.severity, \
    status = excluded.status, occurred_at_ns = excluded.occurred_at_ns, event_id = excluded.event_id \
    WHERE (excluded.occurred_at_ns, excluded.event_id) > (t.occurred_at_ns, t.event_id)";

impl Store {
    /// Connect and run the embedded migrations. `sqlite://path?mode=rwc` (WAL,
    /// synchronous=NORMAL, busy timeout) or `postgres://…`.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let connect_error = |source| StoreError::Connect {
            url: url.to_owned(),
            source,
        };
        let pool = if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(connect_error)?
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(options)
                .await
                .map_err(connect_error)?;
            sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
            Pool::Sqlite(pool)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await
                .map_err(connect_error)?;
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
            Pool::Postgres(pool)
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_owned()));
        };
        Ok(Self { pool })
    }

    /// Which backend this is (`sqlite` or `postgres`).
    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }

    /// Apply `events` in one transaction. Events already in the ledger (or repeated in the batch)
    /// are [`Applied::Duplicate`] and have no effect.
    pub async fn apply_batch(&self, events: &[Event]) -> Result<BatchResult, StoreError> {
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let mut result = BatchResult::default();
            let processed_at = now_ns();
            for event in events {
                let kind = EventType::of(event).map_or("", EventType::as_str);
                let at = occurred_at_ns(event);
                let (tenant, customer, id) = (&event.tenant_id, &event.customer_id, &event.event_id);
                let inserted = sqlx::query(INSERT_LEDGER)
                    .bind(tenant).bind(id).bind(customer).bind(kind).bind(at).bind(processed_at)
                    .execute(&mut *tx).await?.rows_affected();
                if inserted == 0 {
                    result.outcomes.push(Applied::Duplicate);
                    continue;
                }
                result.outcomes.push(Applied::Applied);
                let key = (tenant.clone(), customer.clone());
                if !result.changed_customers.contains(&key) {
                    result.changed_customers.push(key);
                }
                for write in writes(event) {
                    match write {
                        Write::Field { field, value } => {
                            let won = sqlx::query(UPSERT_FIELD)
                                .bind(tenant).bind(customer).bind(field).bind(&value).bind(at).bind(id)
                                .execute(&mut *tx).await?.rows_affected();
                            if won == 0 {
                                let (current, current_at, current_id): (String, i64, String) =
                                    sqlx::query_as(SELECT_FIELD)
                                        .bind(tenant).bind(customer).bind(field)
                                        .fetch_one(&mut *tx).await?;
                                if current != value || current_id != *id {
                                    sqlx::query(INSERT_CONFLICT)
                                        .bind(tenant).bind(customer).bind(field).bind(&value).bind(id).bind(at)
                                        .bind(&current_id).bind(current_at)
                                        .execute(&mut *tx).await?;
                                    result.conflicts += 1;
                                }
                            }
                        }
                        Write::Consent { channel, granted } => {
                            sqlx::query(UPSERT_CONSENT)
                                .bind(tenant).bind(customer).bind(&channel).bind(granted).bind(at).bind(id)
                                .execute(&mut *tx).await?;
                        }
                        Write::DealState { deal_id, stage, status } => {
                            sqlx::query(UPSERT_DEAL_STATE)
                                .bind(tenant).bind(customer).bind(&deal_id).bind(&stage).bind(status).bind(at).bind(id)
                                .execute(&mut *tx).await?;
                        }
                        Write::DealAmount { deal_id, minor_units, currency } => {
                            sqlx::query(UPSERT_DEAL_AMOUNT)
                                .bind(tenant).bind(customer).bind(&deal_id).bind(minor_units).bind(&currency).bind(at).bind(id)
                                .execute(&mut *tx).await?;
                        }
                        Write::Ticket { ticket_id, severity, status } => {
                            sqlx::query(UPSERT_TICKET)
                                .bind(tenant).bind(customer).bind(&ticket_id).bind(&severity).bind(status).bind(at).bind(id)
                                .execute(&mut *tx).await?;
                        }
                    }
                }
            }
            tx.commit().await?;
            metrics::counter!("crm_projector_conflicts_total").increment(result.conflicts);
            Ok(result)
        })
    }

    /// The projected profile, or `None` if no event for this customer was applied.
    pub async fn profile(
        &self,
        tenant: &str,
        customer: &str,
    ) -> Result<Option<Profile>, StoreError> {
        with_pool!(self, pool => {
            let (events_applied, last_ns, payment_failures): (i64, Option<i64>, i64) = sqlx::query_as(
                "SELECT COUNT(*), MAX(occurred_at_ns), \
                 COALESCE(SUM(CASE WHEN event_type = 'payment_failed' THEN 1 ELSE 0 END), 0) \
                 FROM processed_events WHERE tenant_id = $1 AND customer_id = $2",
            )
            .bind(tenant).bind(customer).fetch_one(pool).await?;
            if events_applied == 0 {
                return Ok(None);
            }
            let fields: Vec<(String, String, i64, String)> = sqlx::query_as(
                "SELECT field, value, occurred_at_ns, event_id FROM profile_fields \
                 WHERE tenant_id = $1 AND customer_id = $2 ORDER BY field",
            )
            .bind(tenant).bind(customer).fetch_all(pool).await?;
            let consents: Vec<(String, bool, i64)> = sqlx::query_as(
                "SELECT channel, granted, occurred_at_ns FROM consents \
                 WHERE tenant_id = $1 AND customer_id = $2 ORDER BY channel",
            )
            .bind(tenant).bind(customer).fetch_all(pool).await?;
            let deals: Vec<DealRow> = sqlx::query_as(
                "SELECT deal_id, stage, status, amount_minor, currency FROM deals \
                 WHERE tenant_id = $1 AND customer_id = $2 ORDER BY deal_id",
            )
            .bind(tenant).bind(customer).fetch_all(pool).await?;
            let tickets: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT ticket_id, severity, status FROM tickets \
                 WHERE tenant_id = $1 AND customer_id = $2 ORDER BY ticket_id",
            )
            .bind(tenant).bind(customer).fetch_all(pool).await?;
            let lifetime_value_minor = deals
                .iter()
                .filter(|d| d.2 == "won")
                .filter_map(|d| d.3)
                .fold(0i64, i64::saturating_add);
            let tier = fields.iter().find(|f| f.0 == "tier").map(|f| f.1.clone()).unwrap_or_default();
            Ok(Some(Profile {
                tenant_id: tenant.to_owned(),
                customer_id: customer.to_owned(),
                field_versions: fields
                    .iter()
                    .map(|(f, _, at, id)| (f.clone(), Version { occurred_at: rfc3339(*at), event_id: id.clone() }))
                    .collect(),
                fields: fields.into_iter().map(|(f, v, _, _)| (f, v)).collect(),
                tier,
                lifetime_value_minor,
                consents: consents
                    .into_iter()
                    .map(|(channel, granted, at)| (channel, Consent { granted, occurred_at: rfc3339(at) }))
                    .collect(),
                deals: deals
                    .into_iter()
                    .map(|(deal_id, stage, status, amount_minor, currency)| Deal { deal_id, stage, status, amount_minor, currency })
                    .collect(),
                tickets: tickets
                    .into_iter()
                    .map(|(ticket_id, severity, status)| Ticket { ticket_id, severity, status })
                    .collect(),
                payment_failures,
                events_applied,
                last_event_at: last_ns.map(rfc3339),
            }))
        })
    }

    /// Tier and lifetime value, or `None` for an unknown customer.
    pub async fn customer_context(
        &self,
        tenant: &str,
        customer: &str,
    ) -> Result<Option<CustomerContext>, StoreError> {
        with_pool!(self, pool => {
            let known: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM processed_events WHERE tenant_id = $1 AND customer_id = $2",
            )
            .bind(tenant).bind(customer).fetch_one(pool).await?;
            if known == 0 {
                return Ok(None);
            }
            let tier: Option<String> = sqlx::query_scalar(
                "SELECT value FROM profile_fields WHERE tenant_id = $1 AND customer_id = $2 AND field = 'tier'",
            )
            .bind(tenant).bind(customer).fetch_optional(pool).await?;
            let ltv: Option<i64> = sqlx::query_scalar(
                "SELECT CAST(SUM(amount_minor) AS BIGINT) FROM deals \
                 WHERE tenant_id = $1 AND customer_id = $2 AND status = 'won'",
            )
            .bind(tenant).bind(customer).fetch_one(pool).await?;
            Ok(Some(CustomerContext {
                tier: tier.as_deref().map_or(CustomerTier::Unspecified, tier_from_label),
                lifetime_value_minor: ltv.unwrap_or(0),
            }))
        })
    }

    /// The conflict log of one customer, oldest first.
    pub async fn conflicts(
        &self,
        tenant: &str,
        customer: &str,
    ) -> Result<Vec<Conflict>, StoreError> {
        with_pool!(self, pool => {
            let rows: Vec<(String, String, String, String)> = sqlx::query_as(
                "SELECT field, losing_value, losing_event_id, winning_event_id FROM profile_conflicts \
                 WHERE tenant_id = $1 AND customer_id = $2 ORDER BY id",
            )
            .bind(tenant).bind(customer).fetch_all(pool).await?;
            Ok(rows
                .into_iter()
                .map(|(field, losing_value, losing_event_id, winning_event_id)| Conflict { field, losing_value, losing_event_id, winning_event_id })
                .collect())
        })
    }

    /// Events in the ledger.
    pub async fn processed_count(&self) -> Result<i64, StoreError> {
        with_pool!(self, pool => {
            Ok(sqlx::query_scalar("SELECT COUNT(*) FROM processed_events").fetch_one(pool).await?)
        })
    }
}
