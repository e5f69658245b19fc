//! The projection's SQLite transactions, written in one go on the write connection's own handle.
//!
//! Through sqlx every statement is a round trip to the connection's worker thread and back: a
//! batch is BEGIN, about ten statements per segment and COMMIT. On two busy cores each round trip
//! waits for a thread to be scheduled, so under load the writer (the one every projector
//! transaction queues for) spent most of its time handing work between threads: 13 ms to write
//! a segment whose statements take a fraction of one. Here sqlx's worker hands the handle over
//! once (`lock_handle`) and the whole transaction runs on the calling thread
//! ([`tokio::task::block_in_place`] on a multi-threaded runtime, so its other tasks go on).
//!
//! The statements, their order and the yielding rules are those of the PostgreSQL path in
//! [`crate::apply`]; only the way they reach the database differs.

use crate::{
    apply::{
        CONSENTS_ON_CONFLICT, CUSTOMERS_ON_CONFLICT, FIELDS_ON_CONFLICT, INSERT_CONFLICTS,
        INSERT_LEDGER, LEDGER_ON_CONFLICT, ROWS_PER_STATEMENT, SELECT_FIELD, SELECT_FIELDS,
        TICKETS_ON_CONFLICT, UPSERT_CONSENTS, UPSERT_CUSTOMERS, UPSERT_FIELDS, UPSERT_TICKETS,
        Written, customer_rows, field_written, log_lost,
    },
    registers::{Key, Plan, SettledFields, Version, settle_fields},
};
use events::{Event, EventType};
use rusqlite::{Connection, ToSql, params_from_iter};
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// A batch being applied: its segments, where it is, and what its committed segments wrote.
pub(crate) struct Job<'e> {
    pub events: &'e [Event],
    pub segments: Vec<&'e [usize]>,
    /// The next segment to write.
    pub next: usize,
    /// Whether that segment gave way part-way once already (it then goes through: no livelock).
    pub again: bool,
    /// Whether segments give way to a waiting priority transaction.
    pub segmented: bool,
    pub processed_at_ns: i64,
    pub written: Vec<Written>,
}

/// How a transaction ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Every segment is committed.
    Done,
    /// A priority transaction waits: what was written is committed (at a boundary) or rolled
    /// back (part-way through the transaction's first segment); the job goes on from `next`.
    Yielded,
}

/// Run `f` on this thread, letting a multi-threaded runtime move its other tasks elsewhere.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// One transaction of `job` on `conn`: BEGIN, segments from `job.next` while no priority
/// transaction waits, COMMIT. `op` labels the stage metrics. On error it rolls back and the
/// job's segments since the last commit are to be forgotten (the caller returns the error).
pub(crate) fn transaction(
    conn: &Connection,
    job: &mut Job<'_>,
    priority_waits: &dyn Fn() -> bool,
    op: &'static str,
    began: std::time::Instant,
) -> rusqlite::Result<Step> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let kept = job.written.len();
    let result = segments(conn, job, priority_waits, op, began);
    if result.is_err() || result == Ok(Step::Yielded) && job.again {
        // Failed, or gave way inside the first segment: nothing of this transaction stays.
        job.written.truncate(kept);
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

fn segments(
    conn: &Connection,
    job: &mut Job<'_>,
    priority_waits: &dyn Fn() -> bool,
    op: &'static str,
    began: std::time::Instant,
) -> rusqlite::Result<Step> {
    let mut in_transaction = 0;
    let commit = |step| {
        let committing = crate::stage(op, "write", began);
        conn.execute_batch("COMMIT")?;
        crate::stage(op, "commit", committing);
        Ok(step)
    };
    while let Some(&order) = job.segments.get(job.next) {
        if in_transaction > 0 && priority_waits() {
            // At a boundary: the segments written so far commit.
            return commit(Step::Yielded);
        }
        // The first segment of a transaction gives way between its statements; nothing of the
        // transaction is committed yet, so it rolls back (no fsync) and is written again, through.
        let preemptible = job.segmented && in_transaction == 0 && !job.again;
        let preempt = || preemptible && priority_waits();
        match segment(conn, job.events, order, job.processed_at_ns, &preempt)? {
            None => {
                job.again = true;
                return Ok(Step::Yielded);
            }
            Some(written) => {
                job.written.push(written);
                (job.next, job.again, in_transaction) = (job.next + 1, false, in_transaction + 1);
            }
        }
    }
    commit(Step::Done)
}

/// `head VALUES (?, …), … tail` for `rows` rows of `columns` values.
fn values_sql(head: &str, tail: &str, rows: usize, columns: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(", "));
    format!("{head}VALUES {}{tail}", vec![row; rows].join(", "))
}

/// Where a statement's returned rows go, and how one is read.
type Returned<'o, R> = (
    &'o mut Vec<R>,
    fn(&rusqlite::Row<'_>) -> rusqlite::Result<R>,
);

/// Runs `rows` as multi-row statements `head VALUES … tail`, [`ROWS_PER_STATEMENT`] rows each;
/// `bind` gives one row's values. Each statement's returned rows go to `returned`.
fn execute_rows<'r, T, R>(
    conn: &Connection,
    (head, tail): (&str, &str),
    columns: usize,
    rows: &'r [T],
    bind: impl Fn(&'r T) -> Vec<&'r dyn ToSql>,
    mut returned: Option<Returned<'_, R>>,
) -> rusqlite::Result<()> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut statement = conn.prepare_cached(&values_sql(head, tail, chunk.len(), columns))?;
        let params = params_from_iter(chunk.iter().flat_map(&bind));
        match returned.as_mut() {
            Some((out, read)) => {
                for row in statement.query_map(params, *read)? {
                    out.push(row?);
                }
            }
            None => {
                statement.execute(params)?;
            }
        }
    }
    Ok(())
}

/// The rows of a table-wide `(tenant, customer, key)` register upsert.
type Rows<'p, V> = Vec<(&'p Key, &'p Version<V>)>;

/// Write one segment (the events at `order`); `None` when `preempt` says to give way first.
fn segment(
    conn: &Connection,
    events: &[Event],
    order: &[usize],
    processed_at_ns: i64,
    preempt: &dyn Fn() -> bool,
) -> rusqlite::Result<Option<Written>> {
    if preempt() {
        return Ok(None);
    }
    let ledger: Vec<(&Event, &str, &str)> = order
        .iter()
        .map(|&index| {
            let event = &events[index];
            let kind = EventType::of(event).map_or("", EventType::as_str);
            (event, events::dedupe_id(event), kind)
        })
        .collect();
    let mut new_ids: Vec<(String, String)> = Vec::with_capacity(order.len());
    execute_rows(
        conn,
        (INSERT_LEDGER, LEDGER_ON_CONFLICT),
        6,
        &ledger,
        |(event, dedupe, kind)| {
            vec![
                &event.tenant_id,
                dedupe,
                &event.event_id,
                &event.customer_id,
                kind,
                &processed_at_ns,
            ]
        },
        Some((&mut new_ids, |row| Ok((row.get(0)?, row.get(1)?)))),
    )?;
    let mut new_ids: HashSet<(String, String)> = new_ids.into_iter().collect();
    let mut applied: Vec<usize> = order
        .iter()
        .copied()
        .filter(|&index| {
            let event = &events[index];
            new_ids.remove(&(event.tenant_id.clone(), events::dedupe_id(event).to_owned()))
        })
        .collect();
    let claimed = applied.clone();
    if preempt() {
        return Ok(None);
    }
    applied.sort_by_key(|&i| (&events[i].tenant_id, &events[i].customer_id));
    let customers = customer_rows(events, &applied);
    execute_rows(
        conn,
        (UPSERT_CUSTOMERS, CUSTOMERS_ON_CONFLICT),
        5,
        &customers,
        |(tenant, customer, failures, count, latest)| {
            vec![tenant, customer, failures, count, latest]
        },
        None::<(&mut Vec<()>, _)>,
    )?;
    let changed: Vec<(String, String)> = customers
        .iter()
        .map(|&(t, c, ..)| (t.to_owned(), c.to_owned()))
        .collect();
    let mut plan = Plan::default();
    for &index in &applied {
        plan.add(&events[index]);
    }
    if preempt() {
        return Ok(None);
    }
    let mut context: BTreeSet<(String, String)> = std::mem::take(&mut plan.deal_customers);
    let mut conflicts = 0_u64;
    if !plan.fields.is_empty() {
        let keys = plan.field_keys();
        let mut rows: Vec<(Key, Version<String>)> = Vec::new();
        execute_rows(
            conn,
            (SELECT_FIELDS, ")"),
            3,
            &keys,
            |(tenant, customer, field)| vec![tenant, customer, field],
            Some((&mut rows, |row| {
                Ok((
                    (row.get(0)?, row.get(1)?, row.get(2)?),
                    Version {
                        value: row.get(3)?,
                        at: row.get(4)?,
                        id: row.get(5)?,
                    },
                ))
            })),
        )?;
        let stored: BTreeMap<Key, Version<String>> = rows.into_iter().collect();
        let SettledFields { winners, mut lost } = settle_fields(&plan.fields, stored);
        let mut won: Vec<Key> = Vec::with_capacity(winners.len());
        execute_rows(
            conn,
            (UPSERT_FIELDS, FIELDS_ON_CONFLICT),
            6,
            &winners,
            |((tenant, customer, field), version)| {
                vec![
                    tenant,
                    customer,
                    field,
                    &version.value,
                    &version.at,
                    &version.id,
                ]
            },
            Some((&mut won, |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))),
        )?;
        let won: HashSet<Key> = won.into_iter().collect();
        for (key, version) in &winners {
            let current = if won.contains(key) {
                None
            } else {
                let mut select = conn.prepare_cached(SELECT_FIELD)?;
                Some(select.query_row([&key.0, &key.1, &key.2], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })?)
            };
            field_written(key, version, current, &mut context, &mut lost);
        }
        log_lost(&lost);
        execute_rows(
            conn,
            (INSERT_CONFLICTS, ""),
            9,
            &lost,
            |lost| {
                vec![
                    &lost.key.0,
                    &lost.key.1,
                    &lost.key.2,
                    &lost.losing.value,
                    &lost.losing.id,
                    &lost.losing.at,
                    &lost.winning_id,
                    &lost.winning_at,
                    &processed_at_ns,
                ]
            },
            None::<(&mut Vec<()>, _)>,
        )?;
        conflicts += lost.len() as u64;
    }
    if preempt() {
        return Ok(None);
    }
    let consents: Rows<'_, bool> = plan.consents.iter().collect();
    execute_rows(
        conn,
        (UPSERT_CONSENTS, CONSENTS_ON_CONFLICT),
        6,
        &consents,
        |((tenant, customer, channel), version)| {
            vec![
                tenant,
                customer,
                channel,
                &version.value,
                &version.at,
                &version.id,
            ]
        },
        None::<(&mut Vec<()>, _)>,
    )?;
    let tickets: Rows<'_, (String, &'static str)> = plan.tickets.iter().collect();
    execute_rows(
        conn,
        (UPSERT_TICKETS, TICKETS_ON_CONFLICT),
        7,
        &tickets,
        |((tenant, customer, ticket), version)| {
            vec![
                tenant,
                customer,
                ticket,
                &version.value.0,
                &version.value.1,
                &version.at,
                &version.id,
            ]
        },
        None::<(&mut Vec<()>, _)>,
    )?;
    if preempt() {
        return Ok(None);
    }
    let states: Rows<'_, crate::registers::DealState> = plan.deal_states.iter().collect();
    execute_rows(
        conn,
        crate::apply::upsert_deal_states!("deals"),
        7,
        &states,
        |((tenant, customer, deal), version)| {
            vec![
                tenant,
                customer,
                deal,
                &version.value.0,
                &version.value.1,
                &version.at,
                &version.id,
            ]
        },
        None::<(&mut Vec<()>, _)>,
    )?;
    let amounts: Rows<'_, crate::registers::DealAmount> = plan.deal_amounts.iter().collect();
    execute_rows(
        conn,
        crate::apply::upsert_deal_amounts!("deals"),
        11,
        &amounts,
        |((tenant, customer, deal), version)| {
            vec![
                tenant,
                customer,
                deal,
                &"",
                &"open",
                &version.at,
                &version.id,
                &version.value.0,
                &version.value.1,
                &version.at,
                &version.id,
            ]
        },
        None::<(&mut Vec<()>, _)>,
    )?;
    Ok(Some(Written {
        claimed,
        changed,
        context,
        conflicts,
    }))
}
