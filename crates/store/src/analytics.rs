//! Analytics aggregates per tenant: events per type per minute, ticket events by severity, consent
//! changes, and deal registers from which pipeline value by stage and won revenue are derived.
//!
//! Like the projection, a batch is one transaction with its own ledger (`analytics_processed`),
//! so redelivered events are counted once; counters are sums (commutative) and deals are
//! last-writer-wins registers, so the result does not depend on delivery order.

use crate::{
    Applied, Store, StoreError,
    apply::{ROWS_PER_STATEMENT, claim_in_ledger, now_ns, write_deals},
    registers::Plan,
    with_read_pool, with_writer,
    writes::{channel_label, occurred_at_ns, severity_label},
};
use events::{Event, EventType, pb::event::Payload};
use serde::Serialize;
use sqlx::Connection as _;
use std::collections::BTreeMap;

const INSERT_LEDGER: &str =
    "INSERT INTO analytics_processed (tenant_id, dedupe_key, event_id, processed_at_ns) ";
const ADD_EVENT_COUNTS: &str = "INSERT INTO analytics_event_counts AS a \
    (tenant_id, minute_start_s, event_type, events) ";
const EVENT_COUNTS_ON_CONFLICT: &str = " ON CONFLICT (tenant_id, minute_start_s, event_type) \
    DO UPDATE SET events = a.events + excluded.events";
const ADD_TICKET: &str = "INSERT INTO analytics_tickets AS a (tenant_id, kind, severity, events) \
    VALUES ($1, $2, $3, $4) \
    ON CONFLICT (tenant_id, kind, severity) DO UPDATE SET events = a.events + excluded.events";
const ADD_CONSENT: &str = "INSERT INTO analytics_consents AS a (tenant_id, channel, granted, events) \
    VALUES ($1, $2, $3, $4) \
    ON CONFLICT (tenant_id, channel, granted) DO UPDATE SET events = a.events + excluded.events";

/// A tenant's analytics, as `GET /v1/analytics/summary` returns it. Maps and lists are ordered,
/// so equal aggregates serialize identically.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AnalyticsSummary {
    pub tenant_id: String,
    /// Distinct events counted.
    pub events_counted: i64,
    /// Events by type name, all time.
    pub events_by_type: BTreeMap<String, i64>,
    /// Ticket events by kind (`opened`, `escalated`) and severity label.
    pub tickets: BTreeMap<String, BTreeMap<String, i64>>,
    /// Consent changes by channel label: how many granted and how many revoked.
    pub consents: BTreeMap<String, ConsentCounts>,
    /// Open deals by stage: count and value per currency.
    pub pipeline: BTreeMap<String, StageValue>,
    /// Won deals per currency: count and value.
    pub won_revenue: BTreeMap<String, MoneyTotal>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ConsentCounts {
    pub granted: i64,
    pub revoked: i64,
}

/// Deals in one pipeline stage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StageValue {
    pub deals: i64,
    /// Value in minor units by currency code (deals without an amount count, with no value).
    pub value_minor: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MoneyTotal {
    pub deals: i64,
    pub amount_minor: i64,
}

/// One row of events per type per minute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MinuteCount {
    /// The minute's start, RFC 3339 UTC.
    pub minute: String,
    pub event_type: String,
    pub events: i64,
}

fn minute_start_s(event: &Event) -> i64 {
    occurred_at_ns(event)
        .div_euclid(1_000_000_000)
        .div_euclid(60)
        * 60
}

fn rfc3339_seconds(seconds: i64) -> String {
    chrono::DateTime::from_timestamp(seconds, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

type Key3 = (String, String, String);
/// status, stage, currency, deals, SUM(amount_minor)
type DealGroupRow = (String, String, Option<String>, i64, Option<i64>);

impl Store {
    /// Count `events` into the analytics aggregates in one transaction. An event whose tenant
    /// and [`events::dedupe_id`] were already counted (or earlier in the batch) is
    /// [`Applied::Duplicate`] and changes nothing. On error nothing of the batch is kept.
    pub async fn apply_analytics(&self, events: &[Event]) -> Result<Vec<Applied>, StoreError> {
        let mut outcomes = vec![Applied::Duplicate; events.len()];
        if events.is_empty() {
            return Ok(outcomes);
        }
        let failed = self.failed("counting analytics");
        let processed_at_ns = now_ns();
        // One global lock order (ledger by key, then each table by key) keeps concurrent
        // batches on PostgreSQL from deadlocking; stable sorts keep a repeat's first copy.
        let mut by_event: Vec<usize> = (0..events.len()).collect();
        by_event.sort_by_key(|&i| (&events[i].tenant_id, events::dedupe_id(&events[i])));
        let db = self.analytics_db();
        let acquire = std::time::Instant::now();
        with_writer!(db, failed, writer => {
            let mut tx = writer.connection().begin().await.map_err(failed)?;
            let writing = crate::stage("analytics", "acquire", acquire);
            let applied = claim_in_ledger!(tx, failed, events, by_event, INSERT_LEDGER,
                |row, event| row
                    .push_bind(&event.tenant_id)
                    .push_bind(events::dedupe_id(event))
                    .push_bind(&event.event_id)
                    .push_bind(processed_at_ns));
            for &index in &applied {
                outcomes[index] = Applied::Applied;
            }
            let mut counts: BTreeMap<(String, i64, &'static str), i64> = BTreeMap::new();
            let mut tickets: BTreeMap<Key3, i64> = BTreeMap::new();
            let mut consents: BTreeMap<(String, String, bool), i64> = BTreeMap::new();
            let mut deals = Vec::new();
            for &index in &applied {
                let event = &events[index];
                let tenant = &event.tenant_id;
                let Some(kind) = EventType::of(event) else { continue };
                *counts.entry((tenant.clone(), minute_start_s(event), kind.as_str())).or_default() += 1;
                match &event.payload {
                    Some(Payload::TicketOpened(p)) => {
                        *tickets.entry((tenant.clone(), "opened".into(), severity_label(p.severity))).or_default() += 1;
                    }
                    Some(Payload::TicketEscalated(p)) => {
                        *tickets.entry((tenant.clone(), "escalated".into(), severity_label(p.severity))).or_default() += 1;
                    }
                    Some(Payload::ConsentChanged(p)) => {
                        *consents.entry((tenant.clone(), channel_label(p.channel), p.granted)).or_default() += 1;
                    }
                    Some(Payload::DealStageChanged(_) | Payload::DealWon(_) | Payload::DealLost(_)) => {
                        deals.push(index);
                    }
                    _ => {}
                }
            }
            let counts: Vec<_> = counts.into_iter().collect();
            for chunk in counts.chunks(ROWS_PER_STATEMENT) {
                let mut add = sqlx::QueryBuilder::new(ADD_EVENT_COUNTS);
                add.push_values(chunk, |mut row, ((tenant, minute, kind), n)| {
                    row.push_bind(tenant).push_bind(*minute).push_bind(*kind).push_bind(*n);
                });
                add.push(EVENT_COUNTS_ON_CONFLICT);
                add.build().execute(&mut *tx).await.map_err(failed)?;
            }
            for ((tenant, kind, severity), n) in &tickets {
                sqlx::query(ADD_TICKET).bind(tenant).bind(kind).bind(severity).bind(n)
                    .execute(&mut *tx).await.map_err(failed)?;
            }
            for ((tenant, channel, granted), n) in &consents {
                sqlx::query(ADD_CONSENT).bind(tenant).bind(channel).bind(granted).bind(n)
                    .execute(&mut *tx).await.map_err(failed)?;
            }
            let mut plan = Plan::default();
            for index in deals {
                plan.add(&events[index]);
            }
            write_deals!(tx, failed, "analytics_deals", plan);
            let commit = crate::stage("analytics", "write", writing);
            tx.commit().await.map_err(failed)?;
            crate::stage("analytics", "commit", commit);
        });
        Ok(outcomes)
    }

    /// Everything analytics knows about `tenant`.
    pub async fn analytics_summary(&self, tenant: &str) -> Result<AnalyticsSummary, StoreError> {
        let failed = self.failed("reading analytics");
        let mut summary = AnalyticsSummary {
            tenant_id: tenant.to_owned(),
            ..AnalyticsSummary::default()
        };
        with_read_pool!(self.analytics_db(), pool => {
            summary.events_counted = sqlx::query_scalar(
                "SELECT COUNT(*) FROM analytics_processed WHERE tenant_id = $1",
            )
            .bind(tenant).fetch_one(pool).await.map_err(failed)?;
            let by_type: Vec<(String, i64)> = sqlx::query_as(
                "SELECT event_type, CAST(SUM(events) AS BIGINT) FROM analytics_event_counts \
                 WHERE tenant_id = $1 GROUP BY event_type",
            )
            .bind(tenant).fetch_all(pool).await.map_err(failed)?;
            summary.events_by_type = by_type.into_iter().collect();
            let tickets: Vec<(String, String, i64)> = sqlx::query_as(
                "SELECT kind, severity, events FROM analytics_tickets WHERE tenant_id = $1",
            )
            .bind(tenant).fetch_all(pool).await.map_err(failed)?;
            for (kind, severity, events) in tickets {
                summary.tickets.entry(kind).or_default().insert(severity, events);
            }
            let consents: Vec<(String, bool, i64)> = sqlx::query_as(
                "SELECT channel, granted, events FROM analytics_consents WHERE tenant_id = $1",
            )
            .bind(tenant).fetch_all(pool).await.map_err(failed)?;
            for (channel, granted, events) in consents {
                let entry = summary.consents.entry(channel).or_default();
                if granted { entry.granted += events } else { entry.revoked += events }
            }
            let deals: Vec<DealGroupRow> = sqlx::query_as(
                "SELECT status, stage, currency, COUNT(*), CAST(SUM(amount_minor) AS BIGINT) \
                 FROM analytics_deals WHERE tenant_id = $1 AND status IN ('open', 'won') \
                 GROUP BY status, stage, currency",
            )
            .bind(tenant).fetch_all(pool).await.map_err(failed)?;
            for (status, stage, currency, count, amount) in deals {
                if status == "won" {
                    let total = summary.won_revenue.entry(currency.unwrap_or_default()).or_default();
                    total.deals += count;
                    total.amount_minor += amount.unwrap_or(0);
                } else {
                    let value = summary.pipeline.entry(stage).or_default();
                    value.deals += count;
                    if let Some(currency) = currency {
                        *value.value_minor.entry(currency).or_default() += amount.unwrap_or(0);
                    }
                }
            }
        });
        Ok(summary)
    }

    /// Events per type per minute of `tenant` with `from_s <= minute < to_s` (Unix seconds),
    /// optionally of one type, oldest first.
    pub async fn analytics_events_per_minute(
        &self,
        tenant: &str,
        from_s: i64,
        to_s: i64,
        event_type: Option<EventType>,
    ) -> Result<Vec<MinuteCount>, StoreError> {
        let failed = self.failed("reading analytics");
        let rows: Vec<(i64, String, i64)> = with_read_pool!(self.analytics_db(), pool => {
            sqlx::query_as(
                "SELECT minute_start_s, event_type, events FROM analytics_event_counts \
                 WHERE tenant_id = $1 AND minute_start_s >= $2 AND minute_start_s < $3 \
                 AND ($4 = '' OR event_type = $4) ORDER BY minute_start_s, event_type",
            )
            .bind(tenant).bind(from_s).bind(to_s)
            .bind(event_type.map_or("", EventType::as_str))
            .fetch_all(pool).await.map_err(failed)?
        });
        Ok(rows
            .into_iter()
            .map(|(minute, event_type, events)| MinuteCount {
                minute: rfc3339_seconds(minute),
                event_type,
                events,
            })
            .collect())
    }
}
