//! Applying a batch of events: the ledger, the registers and the aggregates, in one transaction.

use crate::{
    Store, StoreError, with_pool,
    writes::{Write, occurred_at_ns, writes},
};
use events::{Event, EventType, pb::event::Payload};

/// What became of one event of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Applied,
    /// Already in the ledger (or earlier in the same batch): no effect.
    Duplicate,
}

/// The outcome of [`Store::apply_batch`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchResult {
    /// One per input event, in input order.
    pub outcomes: Vec<Applied>,
    /// `(tenant_id, customer_id)` of every customer an applied event touched, each once,
    /// sorted: the caller invalidates their cached context. Empty for an all-duplicate batch.
    pub changed_customers: Vec<(String, String)>,
    /// The subset of `changed_customers` whose routing context (tier or lifetime value) may have
    /// changed: a tier write that won, or a deal event. Only these need their cached context
    /// dropped; a page view does not.
    pub context_changed: Vec<(String, String)>,
    /// Profile field writes that lost to a newer value (logged in `profile_conflicts`).
    pub conflicts: u64,
}

/// Rows per multi-row statement (6 binds each: far below both backends' parameter limits).
pub(crate) const ROWS_PER_STATEMENT: usize = 500;
const INSERT_LEDGER: &str = "INSERT INTO processed_events \
    (tenant_id, dedupe_key, event_id, customer_id, event_type, processed_at_ns) ";
// Counts are added and the latest time kept: commutative, so the order of events does not matter.
// (CASE rather than MAX/GREATEST, which differ between SQLite and PostgreSQL.)
const UPSERT_CUSTOMERS: &str = "INSERT INTO customers AS c \
    (tenant_id, customer_id, payment_failures, events_applied, last_event_at_ns) ";
const CUSTOMERS_ON_CONFLICT: &str = " ON CONFLICT (tenant_id, customer_id) DO UPDATE SET \
    payment_failures = c.payment_failures + excluded.payment_failures, \
    events_applied = c.events_applied + excluded.events_applied, \
    last_event_at_ns = CASE WHEN excluded.last_event_at_ns > c.last_event_at_ns \
        THEN excluded.last_event_at_ns ELSE c.last_event_at_ns END";
const UPSERT_FIELD: &str = "INSERT INTO profile_fields AS p \
    (tenant_id, customer_id, field, value, occurred_at_ns, event_id) VALUES ($1, $2, $3, $4, $5, $6) \
    ON CONFLICT (tenant_id, customer_id, field) DO UPDATE SET value = excluded.value, \
    occurred_at_ns = excluded.occurred_at_ns, event_id = excluded.event_id \
    WHERE (excluded.occurred_at_ns, excluded.event_id) > (p.occurred_at_ns, p.event_id)";
const SELECT_FIELD: &str = "SELECT value, occurred_at_ns, event_id FROM profile_fields \
    WHERE tenant_id = $1 AND customer_id = $2 AND field = $3";
const INSERT_CONFLICT: &str = "INSERT INTO profile_conflicts (tenant_id, customer_id, field, \
    losing_value, losing_event_id, losing_occurred_at_ns, winning_event_id, winning_occurred_at_ns, \
    recorded_at_ns) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
const UPSERT_CONSENT: &str = "INSERT INTO consents AS c \
    (tenant_id, customer_id, channel, granted, occurred_at_ns, event_id) VALUES ($1, $2, $3, $4, $5, $6) \
    ON CONFLICT (tenant_id, customer_id, channel) DO UPDATE SET granted = excluded.granted, \
    occurred_at_ns = excluded.occurred_at_ns, event_id = excluded.event_id \
    WHERE (excluded.occurred_at_ns, excluded.event_id) > (c.occurred_at_ns, c.event_id)";
/// The deal state register of table `$table` (`deals`, `analytics_deals`): binds tenant,
/// customer, deal, stage, status, occurred_at_ns, event_id.
macro_rules! upsert_deal_state {
    ($table:literal) => {
        concat!("INSERT INTO ", $table, " AS d \
        (tenant_id, customer_id, deal_id, stage, status, occurred_at_ns, event_id) \
        VALUES ($1, $2, $3, $4, $5, $6, $7) \
        ON CONFLICT (tenant_id, customer_id, deal_id) DO UPDATE SET stage = excluded.stage, \
        status = excluded.status, occurred_at_ns = excluded.occurred_at_ns, event_id = excluded.event_id \
        WHERE (excluded.occurred_at_ns, excluded.event_id) > (d.occurred_at_ns, d.event_id)")
    };
}
/// The deal amount register of `$table`; runs after the state upsert of the same event, so the
/// row exists. Binds tenant, customer, deal, amount_minor, currency, occurred_at_ns, event_id.
macro_rules! update_deal_amount {
    ($table:literal) => {
        concat!("UPDATE ", $table, " SET amount_minor = $4, currency = $5, \
        amount_occurred_at_ns = $6, amount_event_id = $7 \
        WHERE tenant_id = $1 AND customer_id = $2 AND deal_id = $3 AND (amount_occurred_at_ns IS NULL \
        OR ($6, $7) > (amount_occurred_at_ns, amount_event_id))")
    };
}
/// Writes one deal's state register and, when the event carries one, its amount register, in
/// table `$table`, inside the open transaction `$conn`.
macro_rules! write_deal {
    ($conn:expr, $failed:expr, $table:literal, ($tenant:expr, $customer:expr, $id:expr, $at:expr),
     $deal_id:expr, $stage:expr, $status:expr, $amount:expr) => {{
        sqlx::query(upsert_deal_state!($table))
            .bind($tenant)
            .bind($customer)
            .bind(&$deal_id)
            .bind(&$stage)
            .bind($status)
            .bind($at)
            .bind($id)
            .execute($conn)
            .await
            .map_err($failed)?;
        if let Some((minor_units, currency)) = $amount {
            sqlx::query(update_deal_amount!($table))
                .bind($tenant)
                .bind($customer)
                .bind(&$deal_id)
                .bind(minor_units)
                .bind(&currency)
                .bind($at)
                .bind($id)
                .execute($conn)
                .await
                .map_err($failed)?;
        }
    }};
}
pub(crate) use {update_deal_amount, upsert_deal_state, write_deal};
const UPSERT_TICKET: &str = "INSERT INTO tickets AS t \
    (tenant_id, customer_id, ticket_id, severity, status, occurred_at_ns, event_id) \
    VALUES ($1, $2, $3, $4, $5, $6, $7) \
    ON CONFLICT (tenant_id, customer_id, ticket_id) DO UPDATE SET severity = excluded.severity, \
    status = excluded.status, occurred_at_ns = excluded.occurred_at_ns, event_id = excluded.event_id \
    WHERE (excluded.occurred_at_ns, excluded.event_id) > (t.occurred_at_ns, t.event_id)";

/// Inserts the ledger rows of the events at `order` (indices into `events`) with a few multi-row
/// `INSERT … ON CONFLICT DO NOTHING RETURNING tenant_id, dedupe_key` statements and evaluates to
/// the indices, in `order`, of the events whose `(tenant, events::dedupe_id)` was not in the
/// ledger before. The first of several events with one key within the batch (a repeat, or a
/// client's retry under the same idempotency key) takes the row; the others find it gone. A
/// macro rather than a function because the transaction's type differs per backend (see
/// [`with_pool!`]).
macro_rules! claim_in_ledger {
    ($tx:expr, $failed:expr, $events:expr, $order:expr, $insert:expr,
     |$row:ident, $event:ident| $bind:expr) => {{
        let mut new_ids: std::collections::HashSet<(String, String)> =
            std::collections::HashSet::with_capacity($order.len());
        for chunk in $order.chunks($crate::apply::ROWS_PER_STATEMENT) {
            let mut insert = sqlx::QueryBuilder::new($insert);
            insert.push_values(chunk, |mut $row, &index| {
                let $event = &$events[index];
                $bind;
            });
            insert.push(
                " ON CONFLICT (tenant_id, dedupe_key) DO NOTHING RETURNING tenant_id, dedupe_key",
            );
            let rows: Vec<(String, String)> = insert
                .build_query_as()
                .fetch_all(&mut *$tx)
                .await
                .map_err($failed)?;
            new_ids.extend(rows);
        }
        $order
            .iter()
            .copied()
            .filter(|&index| {
                let event = &$events[index];
                new_ids.remove(&(event.tenant_id.clone(), events::dedupe_id(event).to_owned()))
            })
            .collect::<Vec<usize>>()
    }};
}
pub(crate) use claim_in_ledger;

pub(crate) fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
}

impl Store {
    /// Apply `events` in one transaction (all or nothing). An event whose tenant and
    /// [`events::dedupe_id`] (idempotency key, else event id) are already in the ledger, or
    /// earlier in the same batch, is [`Applied::Duplicate`] and has no effect; every other one
    /// is recorded in the ledger and applied. Redelivering a committed batch changes nothing.
    ///
    /// On error nothing of the batch is kept (the transaction rolls back), so a caller may split
    /// the batch and try again; [`StoreError::class`](crate::StoreError::class) says whether
    /// that is worth it.
    pub async fn apply_batch(&self, events: &[Event]) -> Result<BatchResult, StoreError> {
        if events.is_empty() {
            return Ok(BatchResult::default());
        }
        let failed = self.failed("applying a batch");
        let processed_at_ns = now_ns();
        let mut result = BatchResult {
            outcomes: vec![Applied::Duplicate; events.len()],
            ..BatchResult::default()
        };
        // Row locks are taken in one global order so that concurrent batches cannot deadlock on
        // PostgreSQL: first every ledger row by key, then every customer row by customer,
        // then the registers customer by customer (a transaction holds a customer's row before
        // it touches that customer's registers). The final state does not
        // depend on the order of application. Stable sorts keep the first copy of a repeated
        // event as the applied one.
        let mut by_event: Vec<usize> = (0..events.len()).collect();
        by_event.sort_by_key(|&i| (&events[i].tenant_id, events::dedupe_id(&events[i])));
        with_pool!(self, pool => {
            let mut tx = pool.begin().await.map_err(failed)?;
            let mut applied = claim_in_ledger!(tx, failed, events, by_event, INSERT_LEDGER,
                |row, event| row
                    .push_bind(&event.tenant_id)
                    .push_bind(events::dedupe_id(event))
                    .push_bind(&event.event_id)
                    .push_bind(&event.customer_id)
                    .push_bind(EventType::of(event).map_or("", EventType::as_str))
                    .push_bind(processed_at_ns));
            for &index in &applied {
                result.outcomes[index] = Applied::Applied;
            }
            applied.sort_by_key(|&i| (&events[i].tenant_id, &events[i].customer_id));
            // Customer aggregates, one row per customer, in customer order.
            let mut customers: Vec<(&str, &str, i64, i64, i64)> = Vec::new();
            for &index in &applied {
                let event = &events[index];
                let payment_failed = i64::from(matches!(event.payload, Some(Payload::PaymentFailed(_))));
                let at = occurred_at_ns(event);
                match customers.last_mut() {
                    Some((t, c, failures, count, latest))
                        if *t == event.tenant_id && *c == event.customer_id =>
                    {
                        *failures += payment_failed;
                        *count += 1;
                        *latest = (*latest).max(at);
                    }
                    _ => customers.push((&event.tenant_id, &event.customer_id, payment_failed, 1, at)),
                }
            }
            // The customers rows are the distinct touched customers, already in order.
            result.changed_customers =
                customers.iter().map(|&(t, c, ..)| (t.to_owned(), c.to_owned())).collect();
            for chunk in customers.chunks(ROWS_PER_STATEMENT) {
                let mut upsert = sqlx::QueryBuilder::new(UPSERT_CUSTOMERS);
                upsert.push_values(chunk, |mut row, &(tenant, customer, failures, count, latest)| {
                    row.push_bind(tenant).push_bind(customer).push_bind(failures)
                        .push_bind(count).push_bind(latest);
                });
                upsert.push(CUSTOMERS_ON_CONFLICT);
                upsert.build().execute(&mut *tx).await.map_err(failed)?;
            }
            for index in applied {
                let event = &events[index];
                let (tenant, customer, id) = (&event.tenant_id, &event.customer_id, &event.event_id);
                let at = occurred_at_ns(event);
                let mut deals_changed = false;
                let mut tier_changed = false;
                for write in writes(event) {
                    match write {
                        Write::Field { field, value } => {
                            let won = sqlx::query(UPSERT_FIELD)
                                .bind(tenant).bind(customer).bind(field).bind(&value).bind(at).bind(id)
                                .execute(&mut *tx).await.map_err(failed)?
                                .rows_affected();
                            if won > 0 {
                                tier_changed |= field == "tier";
                                continue;
                            }
                            let (current, current_at, current_id): (String, i64, String) =
                                sqlx::query_as(SELECT_FIELD)
                                    .bind(tenant).bind(customer).bind(field)
                                    .fetch_one(&mut *tx).await.map_err(failed)?;
                            if current != value {
                                tracing::debug!(%tenant, %customer, field, losing = %id, winning = %current_id, "profile field write lost");
                                sqlx::query(INSERT_CONFLICT)
                                    .bind(tenant).bind(customer).bind(field).bind(&value).bind(id).bind(at)
                                    .bind(&current_id).bind(current_at).bind(processed_at_ns)
                                    .execute(&mut *tx).await.map_err(failed)?;
                                result.conflicts += 1;
                            }
                        }
                        Write::Consent { channel, granted } => {
                            sqlx::query(UPSERT_CONSENT)
                                .bind(tenant).bind(customer).bind(&channel).bind(granted).bind(at).bind(id)
                                .execute(&mut *tx).await.map_err(failed)?;
                        }
                        Write::Deal { deal_id, stage, status, amount } => {
                            write_deal!(&mut *tx, failed, "deals", (tenant, customer, id, at),
                                deal_id, stage, status, amount);
                            deals_changed = true;
                        }
                        Write::Ticket { ticket_id, severity, status } => {
                            sqlx::query(UPSERT_TICKET)
                                .bind(tenant).bind(customer).bind(&ticket_id).bind(&severity).bind(status)
                                .bind(at).bind(id)
                                .execute(&mut *tx).await.map_err(failed)?;
                        }
                    }
                }
                // Lifetime value is derived from the deal registers when read: nothing to update.
                if (deals_changed || tier_changed)
                    && result.context_changed.last().is_none_or(|(t, c)| (t, c) != (tenant, customer))
                {
                    result.context_changed.push((tenant.clone(), customer.clone()));
                }
            }
            tx.commit().await.map_err(failed)?;
        });
        metrics::counter!("crm_projector_conflicts_total").increment(result.conflicts);
        Ok(result)
    }
}
