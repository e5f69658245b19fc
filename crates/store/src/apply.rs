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
    /// Profile field writes that lost to a newer value (logged in `profile_conflicts`).
    pub conflicts: u64,
}

const INSERT_LEDGER: &str = "INSERT INTO processed_events \
    (tenant_id, event_id, customer_id, event_type, processed_at_ns) VALUES ($1, $2, $3, $4, $5) \
    ON CONFLICT (tenant_id, event_id) DO NOTHING";
// Counts are added and the latest time kept: commutative, so the order of events does not matter.
// (CASE rather than MAX/GREATEST, which differ between SQLite and PostgreSQL.)
const UPSERT_CUSTOMER: &str = "INSERT INTO customers AS c \
    (tenant_id, customer_id, payment_failures, events_applied, last_event_at_ns) \
    VALUES ($1, $2, $3, 1, $4) \
    ON CONFLICT (tenant_id, customer_id) DO UPDATE SET \
    payment_failures = c.payment_failures + excluded.payment_failures, \
    events_applied = c.events_applied + 1, \
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
const UPSERT_DEAL_STATE: &str = "INSERT INTO deals AS d \
    (tenant_id, customer_id, deal_id, stage, status, occurred_at_ns, event_id) \
    VALUES ($1, $2, $3, $4, $5, $6, $7) \
    ON CONFLICT (tenant_id, customer_id, deal_id) DO UPDATE SET stage = excluded.stage, \
    status = excluded.status, occurred_at_ns = excluded.occurred_at_ns, event_id = excluded.event_id \
    WHERE (excluded.occurred_at_ns, excluded.event_id) > (d.occurred_at_ns, d.event_id)";
// Runs after UPSERT_DEAL_STATE of the same event, so the row exists.
const UPDATE_DEAL_AMOUNT: &str = "UPDATE deals SET amount_minor = $4, currency = $5, \
    amount_occurred_at_ns = $6, amount_event_id = $7 \
    WHERE tenant_id = $1 AND customer_id = $2 AND deal_id = $3 AND (amount_occurred_at_ns IS NULL \
    OR ($6, $7) > (amount_occurred_at_ns, amount_event_id))";
// Derived from the deal registers, not added up per event: a deal counts once, with its latest
// amount, and only while it is won — whatever the order its events arrived in.
const UPDATE_LIFETIME_VALUE: &str = "UPDATE customers SET lifetime_value_minor = \
    (SELECT COALESCE(SUM(amount_minor), 0) FROM deals \
     WHERE tenant_id = $1 AND customer_id = $2 AND status = 'won') \
    WHERE tenant_id = $1 AND customer_id = $2";
const UPSERT_TICKET: &str = "INSERT INTO tickets AS t \
    (tenant_id, customer_id, ticket_id, severity, status, occurred_at_ns, event_id) \
    VALUES ($1, $2, $3, $4, $5, $6, $7) \
    ON CONFLICT (tenant_id, customer_id, ticket_id) DO UPDATE SET severity = excluded.severity, \
    status = excluded.status, occurred_at_ns = excluded.occurred_at_ns, event_id = excluded.event_id \
    WHERE (excluded.occurred_at_ns, excluded.event_id) > (t.occurred_at_ns, t.event_id)";

fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
}

impl Store {
    /// Apply `events` in one transaction (all or nothing). An event already in the ledger, or
    /// earlier in the same batch, is [`Applied::Duplicate`] and has no effect; every other one
    /// is recorded in the ledger and applied. Redelivering a committed batch changes nothing.
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
        // PostgreSQL: first every ledger row by event id, then customer by customer (the
        // customer row is locked before that customer's registers). The final state does not
        // depend on the order of application. Stable sorts keep the first copy of a repeated
        // event as the applied one.
        let mut by_event: Vec<usize> = (0..events.len()).collect();
        by_event.sort_by_key(|&i| (&events[i].tenant_id, &events[i].event_id));
        with_pool!(self, pool => {
            let mut tx = pool.begin().await.map_err(failed)?;
            let mut applied = Vec::with_capacity(events.len());
            for index in by_event {
                let event = &events[index];
                let kind = EventType::of(event).map_or("", EventType::as_str);
                let inserted = sqlx::query(INSERT_LEDGER)
                    .bind(&event.tenant_id).bind(&event.event_id).bind(&event.customer_id)
                    .bind(kind).bind(processed_at_ns)
                    .execute(&mut *tx).await.map_err(failed)?
                    .rows_affected();
                if inserted > 0 {
                    result.outcomes[index] = Applied::Applied;
                    applied.push(index);
                }
            }
            applied.sort_by_key(|&i| (&events[i].tenant_id, &events[i].customer_id));
            for index in applied {
                let event = &events[index];
                let (tenant, customer, id) = (&event.tenant_id, &event.customer_id, &event.event_id);
                let at = occurred_at_ns(event);
                // Sorted by customer, so a repeat can only be the last one pushed.
                if result.changed_customers.last().is_none_or(|(t, c)| (t, c) != (tenant, customer)) {
                    result.changed_customers.push((tenant.clone(), customer.clone()));
                }
                let payment_failed = matches!(event.payload, Some(Payload::PaymentFailed(_)));
                sqlx::query(UPSERT_CUSTOMER)
                    .bind(tenant).bind(customer).bind(i64::from(payment_failed)).bind(at)
                    .execute(&mut *tx).await.map_err(failed)?;
                let mut deals_changed = false;
                for write in writes(event) {
                    match write {
                        Write::Field { field, value } => {
                            let won = sqlx::query(UPSERT_FIELD)
                                .bind(tenant).bind(customer).bind(field).bind(&value).bind(at).bind(id)
                                .execute(&mut *tx).await.map_err(failed)?
                                .rows_affected();
                            if won > 0 {
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
                            sqlx::query(UPSERT_DEAL_STATE)
                                .bind(tenant).bind(customer).bind(&deal_id).bind(&stage).bind(status)
                                .bind(at).bind(id)
                                .execute(&mut *tx).await.map_err(failed)?;
                            if let Some((minor_units, currency)) = amount {
                                sqlx::query(UPDATE_DEAL_AMOUNT)
                                    .bind(tenant).bind(customer).bind(&deal_id).bind(minor_units)
                                    .bind(&currency).bind(at).bind(id)
                                    .execute(&mut *tx).await.map_err(failed)?;
                            }
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
                if deals_changed {
                    sqlx::query(UPDATE_LIFETIME_VALUE)
                        .bind(tenant).bind(customer)
                        .execute(&mut *tx).await.map_err(failed)?;
                }
            }
            tx.commit().await.map_err(failed)?;
        });
        metrics::counter!("crm_projector_conflicts_total").increment(result.conflicts);
        Ok(result)
    }
}
