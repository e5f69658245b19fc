//! Applying a batch of events: the ledger, the registers and the aggregates, in one transaction.

use crate::{
    Store, StoreError, Write, WritePriority,
    combine::{Reply, Role},
    registers::{Key, Lost, Plan, SettledFields, Version, settle_fields},
    with_writer,
    writes::occurred_at_ns,
};
use events::{Event, EventType, pb::event::Payload};
use sqlx::Connection as _;
use std::collections::{BTreeMap, BTreeSet, HashSet};

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
const UPSERT_FIELDS: &str = "INSERT INTO profile_fields AS p \
    (tenant_id, customer_id, field, value, occurred_at_ns, event_id) ";
const FIELDS_ON_CONFLICT: &str = " ON CONFLICT (tenant_id, customer_id, field) DO UPDATE SET \
    value = excluded.value, occurred_at_ns = excluded.occurred_at_ns, event_id = excluded.event_id \
    WHERE (excluded.occurred_at_ns, excluded.event_id) > (p.occurred_at_ns, p.event_id) \
    RETURNING tenant_id, customer_id, field";
const SELECT_FIELDS: &str = "SELECT tenant_id, customer_id, field, value, occurred_at_ns, event_id \
    FROM profile_fields WHERE (tenant_id, customer_id, field) IN (";
const SELECT_FIELD: &str = "SELECT value, occurred_at_ns, event_id FROM profile_fields \
    WHERE tenant_id = $1 AND customer_id = $2 AND field = $3";
const INSERT_CONFLICTS: &str = "INSERT INTO profile_conflicts (tenant_id, customer_id, field, \
    losing_value, losing_event_id, losing_occurred_at_ns, winning_event_id, winning_occurred_at_ns, \
    recorded_at_ns) ";
const UPSERT_CONSENTS: &str = "INSERT INTO consents AS c \
    (tenant_id, customer_id, channel, granted, occurred_at_ns, event_id) ";
const CONSENTS_ON_CONFLICT: &str = " ON CONFLICT (tenant_id, customer_id, channel) DO UPDATE SET \
    granted = excluded.granted, occurred_at_ns = excluded.occurred_at_ns, event_id = excluded.event_id \
    WHERE (excluded.occurred_at_ns, excluded.event_id) > (c.occurred_at_ns, c.event_id)";
const UPSERT_TICKETS: &str = "INSERT INTO tickets AS t \
    (tenant_id, customer_id, ticket_id, severity, status, occurred_at_ns, event_id) ";
const TICKETS_ON_CONFLICT: &str = " ON CONFLICT (tenant_id, customer_id, ticket_id) DO UPDATE SET \
    severity = excluded.severity, status = excluded.status, occurred_at_ns = excluded.occurred_at_ns, \
    event_id = excluded.event_id \
    WHERE (excluded.occurred_at_ns, excluded.event_id) > (t.occurred_at_ns, t.event_id)";
/// The deal state registers of table `$table` (`deals`, `analytics_deals`).
macro_rules! upsert_deal_states {
    ($table:literal) => {
        (
            concat!("INSERT INTO ", $table, " AS d \
            (tenant_id, customer_id, deal_id, stage, status, occurred_at_ns, event_id) "),
            " ON CONFLICT (tenant_id, customer_id, deal_id) DO UPDATE SET stage = excluded.stage, \
            status = excluded.status, occurred_at_ns = excluded.occurred_at_ns, \
            event_id = excluded.event_id \
            WHERE (excluded.occurred_at_ns, excluded.event_id) > (d.occurred_at_ns, d.event_id)",
        )
    };
}
/// The deal amount registers of `$table`; run after the state upserts of the same batch, so
/// every row exists and only the conflict branch runs (the inserted columns are placeholders
/// the NOT NULL constraints ask for).
macro_rules! upsert_deal_amounts {
    ($table:literal) => {
        (
            concat!(
                "INSERT INTO ",
                $table,
                " AS d \
            (tenant_id, customer_id, deal_id, stage, status, occurred_at_ns, event_id, \
            amount_minor, currency, amount_occurred_at_ns, amount_event_id) "
            ),
            " ON CONFLICT (tenant_id, customer_id, deal_id) DO UPDATE SET \
            amount_minor = excluded.amount_minor, currency = excluded.currency, \
            amount_occurred_at_ns = excluded.amount_occurred_at_ns, \
            amount_event_id = excluded.amount_event_id \
            WHERE d.amount_occurred_at_ns IS NULL OR \
            (excluded.amount_occurred_at_ns, excluded.amount_event_id) > \
            (d.amount_occurred_at_ns, d.amount_event_id)",
        )
    };
}
/// Runs `$rows` (a slice) as multi-row statements `head VALUES … tail` (`$statement` is the
/// pair) inside the open
/// transaction `$tx`, [`ROWS_PER_STATEMENT`] rows each; `|$row, $item| $bind` binds one row.
macro_rules! execute_rows {
    ($tx:expr, $failed:expr, $statement:expr, $rows:expr, |$row:ident, $item:pat_param| $bind:expr) => {{
        let (head, tail): (&str, &str) = $statement;
        for chunk in $rows.chunks($crate::apply::ROWS_PER_STATEMENT) {
            let mut statement = sqlx::QueryBuilder::new(head);
            statement.push_values(chunk, |mut $row, $item| {
                $bind;
            });
            statement.push(tail);
            statement
                .build()
                .execute(&mut *$tx)
                .await
                .map_err($failed)?;
        }
    }};
}
/// Writes the deal registers of `$plan` ([`crate::registers::Plan`]) to table `$table`.
macro_rules! write_deals {
    ($tx:expr, $failed:expr, $table:literal, $plan:expr) => {{
        let states: Vec<_> = $plan.deal_states.iter().collect();
        $crate::apply::execute_rows!(
            $tx,
            $failed,
            $crate::apply::upsert_deal_states!($table),
            states,
            |row, ((tenant, customer, deal), version)| row
                .push_bind(tenant)
                .push_bind(customer)
                .push_bind(deal)
                .push_bind(&version.value.0)
                .push_bind(version.value.1)
                .push_bind(version.at)
                .push_bind(&version.id)
        );
        let amounts: Vec<_> = $plan.deal_amounts.iter().collect();
        $crate::apply::execute_rows!(
            $tx,
            $failed,
            $crate::apply::upsert_deal_amounts!($table),
            amounts,
            |row, ((tenant, customer, deal), version)| row
                .push_bind(tenant)
                .push_bind(customer)
                .push_bind(deal)
                .push_bind("")
                .push_bind("open")
                .push_bind(version.at)
                .push_bind(&version.id)
                .push_bind(version.value.0)
                .push_bind(&version.value.1)
                .push_bind(version.at)
                .push_bind(&version.id)
        );
    }};
}
pub(crate) use {execute_rows, upsert_deal_amounts, upsert_deal_states, write_deals};

/// Inserts the ledger rows of the events at `order` (indices into `events`) with a few multi-row
/// `INSERT … ON CONFLICT DO NOTHING RETURNING tenant_id, dedupe_key` statements and evaluates to
/// the indices, in `order`, of the events whose `(tenant, events::dedupe_id)` was not in the
/// ledger before. The first of several events with one key within the batch (a repeat, or a
/// client's retry under the same idempotency key) takes the row; the others find it gone. A
/// macro rather than a function because the transaction's type differs per backend (see
/// [`with_writer!`]).
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

/// What one segment of a batch wrote, kept once the segment is through.
struct Written {
    /// The events it applied (new in the ledger).
    claimed: Vec<usize>,
    /// Customers it touched, and those whose cached context it may have changed.
    changed: Vec<(String, String)>,
    context: BTreeSet<(String, String)>,
    /// Field writes that lost.
    conflicts: u64,
}

impl Store {
    /// Apply `events` in one transaction (all or nothing), except that on SQLite a bulk batch
    /// commits what it has written when a priority transaction waits for the writer (every
    /// [`StoreOptions::sqlite_yield_segment`](crate::StoreOptions) events) and goes on in a new
    /// transaction. An event whose tenant and [`events::dedupe_id`] (idempotency key, else
    /// event id) are already in the ledger, or earlier in the same batch, is
    /// [`Applied::Duplicate`] and has no effect; every other one is recorded in the ledger and
    /// applied, with its effects, in the same transaction.
    /// Redelivering a committed batch changes nothing.
    ///
    /// On error the failing transaction rolls back, so a caller may split the batch and try
    /// again: segments committed before it are in the ledger and come back as duplicates, with
    /// no second effect (their customers' cached context then expires by TTL rather than by
    /// announcement). [`StoreError::class`](crate::StoreError::class) says whether trying again
    /// is worth it.
    ///
    /// On SQLite, priority batches that wait for the writer at the same time are applied in one
    /// transaction ([`crate::combine`]); each caller gets its own events' outcomes.
    pub async fn apply_batch(&self, events: &[Event]) -> Result<BatchResult, StoreError> {
        if events.is_empty() {
            return Ok(BatchResult::default());
        }
        let acquire = std::time::Instant::now();
        let (Write::Sqlite(gate), Some(combiner), WritePriority::Priority) =
            (&self.write, &self.combiner, self.priority)
        else {
            return self.apply_in(events, None, acquire).await;
        };
        match combiner.join(events) {
            Role::Lead(leader) => {
                let pass = gate.enter(WritePriority::Priority).await;
                let taken = leader.take();
                if taken.batches() == 1 {
                    return self.apply_in(&taken.events, Some(pass), acquire).await;
                }
                crate::signals::priority_combined(taken.batches());
                match self.apply_in(&taken.events, Some(pass), acquire).await {
                    Ok(result) => Ok(taken.settle(result)),
                    Err(err) => {
                        tracing::debug!(error = %err, batches = taken.batches(),
                            "a combined priority transaction failed; each batch goes alone");
                        taken.alone();
                        self.apply_in(events, None, std::time::Instant::now()).await
                    }
                }
            }
            Role::Follow(answer) => match answer.await {
                Ok(Reply::Done(result)) => Ok(result),
                Ok(Reply::Alone) | Err(_) => {
                    self.apply_in(events, None, std::time::Instant::now()).await
                }
            },
        }
    }

    /// [`Store::apply_batch`] in a transaction of its own; `pass`: SQLite's writer, when the
    /// caller holds it already; `acquire`: when the caller began to wait for it.
    async fn apply_in(
        &self,
        events: &[Event],
        pass: Option<crate::gate::Pass<sqlx::SqliteConnection>>,
        acquire: std::time::Instant,
    ) -> Result<BatchResult, StoreError> {
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
        // The stage metrics tell the priority path's transactions (the projector's critical
        // worker) from bulk ones: how long a critical commit waits for the writer is its own figure.
        let op = match self.priority {
            WritePriority::Priority => "apply_priority",
            WritePriority::Bulk => "apply",
        };
        let mut changed: BTreeSet<(String, String)> = BTreeSet::new();
        let mut context: BTreeSet<(String, String)> = BTreeSet::new();
        with_writer!(self, failed, pass, writer => {
            let watch = writer.watch();
            let mut tx = writer.connection().begin().await.map_err(failed)?;
            let mut writing = crate::stage(op, "acquire", acquire);
            // On SQLite, while the priority path is active, a bulk batch is written in segments:
            // when a priority transaction waits for the writer at a segment boundary, what is
            // written so far commits and the priority transaction goes in before the rest (which
            // commits in a transaction of its own). A priority transaction so waits for one
            // segment, not a whole batch. Without a waiter the segments share one transaction
            // (one commit); with no priority traffic for a second the batch is one segment
            // (segments cost statements: 20 % of the projector's throughput alone). PostgreSQL's
            // writers run side by side: one segment, in the global lock order above.
            let segmented = self.priority == WritePriority::Bulk
                && self.yield_segment > 0
                && watch.priority_active();
            let segment = if segmented {
                self.yield_segment
            } else {
                by_event.len()
            };
            let segments: Vec<&[usize]> = by_event.chunks(segment).collect();
            // Segments written in the open transaction; whether the segment at `next` is being
            // written again after it gave way (it then goes through: no livelock).
            let (mut next, mut in_transaction, mut again) = (0, 0, false);
            while let Some(&order) = segments.get(next) {
                // The first segment of a transaction gives way between its statements: a
                // priority transaction that starts waiting meanwhile does not wait for the rest
                // of it. Nothing of the transaction is committed yet, so it rolls back (no
                // fsync), lets the priority one in, and writes the segment again, through.
                let preemptible = segmented && in_transaction == 0 && !again;
                macro_rules! preempt {
                    () => {
                        if preemptible && watch.priority_waits() {
                            return Ok(None);
                        }
                    };
                }
                // `None`: the writer goes to a waiting priority transaction first, at this
                // boundary or part-way through the segment.
                let written: Option<Written> = if in_transaction > 0 && watch.priority_waits() {
                    None
                } else {
                    async {
                        preempt!();
                        let mut applied = claim_in_ledger!(tx, failed, events, order, INSERT_LEDGER,
                            |row, event| row
                                .push_bind(&event.tenant_id)
                                .push_bind(events::dedupe_id(event))
                                .push_bind(&event.event_id)
                                .push_bind(&event.customer_id)
                                .push_bind(EventType::of(event).map_or("", EventType::as_str))
                                .push_bind(processed_at_ns));
                        let claimed = applied.clone();
                        preempt!();
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
                        let changed: Vec<(String, String)> =
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
                        // Register writes: reduced in memory, one multi-row statement per table.
                        let mut plan = Plan::default();
                        for &index in &applied {
                            plan.add(&events[index]);
                        }
                        let mut conflicts = 0_u64;
                        preempt!();
                        let mut context_changed: BTreeSet<(String, String)> =
                            std::mem::take(&mut plan.deal_customers);
                        if !plan.fields.is_empty() {
                            let mut stored = BTreeMap::new();
                            for chunk in plan.field_keys().chunks(ROWS_PER_STATEMENT) {
                                let mut select = sqlx::QueryBuilder::new(SELECT_FIELDS);
                                select.push_values(chunk, |mut row, (tenant, customer, field)| {
                                    row.push_bind(tenant).push_bind(customer).push_bind(field);
                                });
                                select.push(")");
                                let rows: Vec<(String, String, String, String, i64, String)> =
                                    select.build_query_as().fetch_all(&mut *tx).await.map_err(failed)?;
                                for (tenant, customer, field, value, at, id) in rows {
                                    stored.insert((tenant, customer, field), Version { value, at, id });
                                }
                            }
                            let SettledFields { winners, mut lost } = settle_fields(&plan.fields, stored);
                            let mut won: HashSet<Key> = HashSet::with_capacity(winners.len());
                            for chunk in winners.chunks(ROWS_PER_STATEMENT) {
                                let mut upsert = sqlx::QueryBuilder::new(UPSERT_FIELDS);
                                upsert.push_values(chunk, |mut row, ((tenant, customer, field), version)| {
                                    row.push_bind(tenant).push_bind(customer).push_bind(field)
                                        .push_bind(&version.value).push_bind(version.at).push_bind(&version.id);
                                });
                                upsert.push(FIELDS_ON_CONFLICT);
                                let rows: Vec<Key> =
                                    upsert.build_query_as().fetch_all(&mut *tx).await.map_err(failed)?;
                                won.extend(rows);
                            }
                            for (key, version) in &winners {
                                if won.contains(key) {
                                    if key.2 == "tier" {
                                        context_changed.insert((key.0.clone(), key.1.clone()));
                                    }
                                    continue;
                                }
                                // A concurrent transaction (PostgreSQL) stored a newer version after the
                                // read: this write lost to it.
                                let (value, at, id): (String, i64, String) = sqlx::query_as(SELECT_FIELD)
                                    .bind(&key.0).bind(&key.1).bind(&key.2)
                                    .fetch_one(&mut *tx).await.map_err(failed)?;
                                if value != version.value {
                                    lost.push(Lost { key: key.clone(), losing: version.clone(), winning_id: id, winning_at: at });
                                }
                            }
                            for lost in &lost {
                                tracing::debug!(tenant = %lost.key.0, customer = %lost.key.1, field = %lost.key.2,
                                    losing = %lost.losing.id, winning = %lost.winning_id, "profile field write lost");
                            }
                            execute_rows!(tx, failed, (INSERT_CONFLICTS, ""), lost, |row, lost| row
                                .push_bind(&lost.key.0).push_bind(&lost.key.1).push_bind(&lost.key.2)
                                .push_bind(&lost.losing.value).push_bind(&lost.losing.id).push_bind(lost.losing.at)
                                .push_bind(&lost.winning_id).push_bind(lost.winning_at).push_bind(processed_at_ns));
                            conflicts += lost.len() as u64;
                        }
                        preempt!();
                        let consents: Vec<_> = plan.consents.iter().collect();
                        execute_rows!(tx, failed, (UPSERT_CONSENTS, CONSENTS_ON_CONFLICT), consents,
                            |row, ((tenant, customer, channel), version)| row
                                .push_bind(tenant).push_bind(customer).push_bind(channel)
                                .push_bind(version.value).push_bind(version.at).push_bind(&version.id));
                        let tickets: Vec<_> = plan.tickets.iter().collect();
                        execute_rows!(tx, failed, (UPSERT_TICKETS, TICKETS_ON_CONFLICT), tickets,
                            |row, ((tenant, customer, ticket), version)| row
                                .push_bind(tenant).push_bind(customer).push_bind(ticket)
                                .push_bind(&version.value.0).push_bind(version.value.1)
                                .push_bind(version.at).push_bind(&version.id));
                        preempt!();
                        write_deals!(tx, failed, "deals", plan);
                        // Lifetime value is derived from the deal registers when read: nothing to update.
                        Ok::<_, StoreError>(Some(Written { claimed, changed, context: context_changed, conflicts }))
                    }
                    .await?
                };
                let Some(written) = written else {
                    if in_transaction > 0 {
                        // At a boundary: the segments written so far commit.
                        let commit = crate::stage(op, "write", writing);
                        tx.commit().await.map_err(failed)?;
                        crate::stage(op, "commit", commit);
                    } else {
                        // Part-way through the transaction's first segment: nothing to keep.
                        tx.rollback().await.map_err(failed)?;
                        again = true;
                    }
                    crate::signals::writer_yielded();
                    let yielded = std::time::Instant::now();
                    writer = writer.yield_to_priority().await;
                    tx = writer.connection().begin().await.map_err(failed)?;
                    writing = crate::stage(op, "yielded", yielded);
                    in_transaction = 0;
                    continue;
                };
                for &index in &written.claimed {
                    result.outcomes[index] = Applied::Applied;
                }
                changed.extend(written.changed);
                context.extend(written.context);
                result.conflicts += written.conflicts;
                (next, in_transaction, again) = (next + 1, in_transaction + 1, false);
            }
            let commit = crate::stage(op, "write", writing);
            tx.commit().await.map_err(failed)?;
            crate::stage(op, "commit", commit);
            drop(writer);
        });
        result.changed_customers = changed.into_iter().collect();
        result.context_changed = context.into_iter().collect();
        crate::signals::conflicts(result.conflicts);
        Ok(result)
    }
}
