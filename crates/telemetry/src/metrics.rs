//! Every metric of the platform in one place: its name, kind, unit, labels and help text.
//!
//! Names follow `crm_<component>_<what>_<unit>[_total]`. Labels are bounded: never tenant or
//! customer ids. Record with the `metrics` macros and these names, e.g.
//! `metrics::counter!(ROUTER_ROUTED_TOTAL, "lane" => "high", "reason" => "deal_amount")`.

use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const GATEWAY_REQUESTS_TOTAL: &str = "crm_gateway_requests_total";
pub const GATEWAY_REQUEST_DURATION_SECONDS: &str = "crm_gateway_request_duration_seconds";
pub const GATEWAY_INFLIGHT_REQUESTS: &str = "crm_gateway_inflight_requests";
pub const GATEWAY_SHED_TOTAL: &str = "crm_gateway_shed_total";
pub const GATEWAY_ADMITTED_TOTAL: &str = "crm_gateway_admitted_total";
pub const GATEWAY_REFUSED_TOTAL: &str = "crm_gateway_refused_total";
pub const GATEWAY_BULK_RATE_LIMIT: &str = "crm_gateway_bulk_rate_limit";
pub const GATEWAY_PIPELINE_DELAY_SECONDS: &str = "crm_gateway_pipeline_delay_seconds";
pub const LANE_E2E_LATENCY_SECONDS: &str = "crm_lane_e2e_latency_seconds";
pub const ROUTER_ROUTED_TOTAL: &str = "crm_router_routed_total";
pub const WORKER_PROCESSED_TOTAL: &str = "crm_worker_processed_total";
pub const WORKER_BATCH_DURATION_SECONDS: &str = "crm_worker_batch_duration_seconds";
pub const WORKER_BATCH_SIZE: &str = "crm_worker_batch_size";
pub const WORKER_STAGE_SECONDS: &str = "crm_worker_stage_seconds";
pub const STORE_STAGE_SECONDS: &str = "crm_store_stage_seconds";
pub const STORE_WRITER_YIELDS_TOTAL: &str = "crm_store_writer_yields_total";
pub const STORE_PRIORITY_COMBINED_TOTAL: &str = "crm_store_priority_combined_total";
pub const WORKER_WAITING: &str = "crm_worker_waiting";
pub const DLQ_WRITE_FAILURES_TOTAL: &str = "crm_dlq_write_failures_total";
pub const ROUTER_LANE_REFUSALS_TOTAL: &str = "crm_router_lane_refusals_total";
pub const DLQ_EVENTS_TOTAL: &str = "crm_dlq_events_total";
pub const CONSUMER_PENDING_MESSAGES: &str = "crm_consumer_pending_messages";
pub const CONSUMER_ACK_PENDING_MESSAGES: &str = "crm_consumer_ack_pending_messages";
pub const CACHE_REQUESTS_TOTAL: &str = "crm_cache_requests_total";
pub const PROJECTOR_CONFLICTS_TOTAL: &str = "crm_projector_conflicts_total";
pub const PROJECTOR_DUPLICATES_TOTAL: &str = "crm_projector_duplicates_total";
pub const STORE_LEDGER_PRUNED_TOTAL: &str = "crm_store_ledger_pruned_total";
pub const RULES_RELOADS_TOTAL: &str = "crm_rules_reloads_total";
pub const NATS_CONNECTED: &str = "crm_nats_connected";
pub const GATEWAY_TLS_HANDSHAKE_FAILURES_TOTAL: &str = "crm_gateway_tls_handshake_failures_total";
pub const NATS_PERMISSION_DENIED_TOTAL: &str = "crm_nats_permission_denied_total";
pub const THROTTLE_ANALYTICS_RATE: &str = "crm_throttle_analytics_rate";
pub const THROTTLE_LEVEL: &str = "crm_throttle_level";
pub const ANALYTICS_DEFERRED_MESSAGES: &str = "crm_analytics_deferred_messages";
pub const ANALYTICS_OLDEST_DEFERRED_AGE_SECONDS: &str = "crm_analytics_oldest_deferred_age_seconds";
pub const FORECAST_INGEST_RATE: &str = "crm_forecast_ingest_rate";
pub const THROTTLE_LEADER: &str = "crm_throttle_leader";
pub const THROTTLE_INGEST_RATE: &str = "crm_throttle_ingest_rate";
pub const THROTTLE_CAPACITY_RATE: &str = "crm_throttle_capacity_rate";
pub const THROTTLE_DECISIONS_TOTAL: &str = "crm_throttle_decisions_total";
pub const ANALYTICS_SKIPPED_TOTAL: &str = "crm_analytics_skipped_total";
pub const ANALYTICS_DUPLICATES_TOTAL: &str = "crm_analytics_duplicates_total";
pub const NOTIFIER_DELIVERIES_TOTAL: &str = "crm_notifier_deliveries_total";
pub const NOTIFIER_DELIVERY_DURATION_SECONDS: &str = "crm_notifier_delivery_duration_seconds";
pub const NOTIFIER_BREAKER_OPEN: &str = "crm_notifier_breaker_open";
pub const STREAM_BYTES: &str = "crm_stream_bytes";
pub const STREAM_MESSAGES: &str = "crm_stream_messages";
pub const STREAM_MAX_BYTES: &str = "crm_stream_max_bytes";
pub const INGEST_REPLAY_WINDOW_SECONDS: &str = "crm_ingest_replay_window_seconds";
pub const INGEST_PURGED_MESSAGES_TOTAL: &str = "crm_ingest_purged_messages_total";
pub const INGEST_UNPROCESSED_MESSAGES: &str = "crm_ingest_unprocessed_messages";

/// How a metric is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric's definition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: MetricKind,
    pub unit: Option<Unit>,
    /// The label names it is recorded with (all bounded sets).
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn def(
    name: &'static str,
    kind: MetricKind,
    unit: Option<Unit>,
    labels: &'static [&'static str],
    help: &'static str,
) -> MetricDef {
    MetricDef {
        name,
        kind,
        unit,
        labels,
        help,
    }
}

use MetricKind::{Counter, Gauge, Histogram};

const COUNT: Option<Unit> = Some(Unit::Count);
const SECONDS: Option<Unit> = Some(Unit::Seconds);
const PER_SECOND: Option<Unit> = Some(Unit::CountPerSecond);
const BYTES: Option<Unit> = Some(Unit::Bytes);

/// Every metric, grouped by component.
#[rustfmt::skip]
pub const ALL: &[MetricDef] = &[
    def(GATEWAY_REQUESTS_TOTAL, Counter, COUNT, &["route", "status", "door"],
        "HTTP requests by route template, status code and door (main, or priority: the \
         critical and high events' own listener)"),
    def(GATEWAY_REQUEST_DURATION_SECONDS, Histogram, SECONDS, &["route", "door"],
        "HTTP request duration by route template and door (main or priority)"),
    def(GATEWAY_INFLIGHT_REQUESTS, Gauge, COUNT, &[],
        "HTTP requests being handled"),
    def(GATEWAY_SHED_TOTAL, Counter, COUNT, &[],
        "HTTP requests refused with 503 because the gateway was at capacity"),
    def(GATEWAY_ADMITTED_TOTAL, Counter, COUNT, &["class"],
        "Events admitted at the front door, by admission class (critical, high, bulk)"),
    def(GATEWAY_REFUSED_TOTAL, Counter, COUNT, &["class", "reason"],
        "Events refused before they were stored (503 + Retry-After), by class and reason (budget: the class's in-flight budget was spent; rate: bulk over the admission controller's rate)"),
    def(GATEWAY_BULK_RATE_LIMIT, Gauge, COUNT, &[],
        "Bulk events per second the admission controller allows; -1 while bulk is open"),
    def(GATEWAY_PIPELINE_DELAY_SECONDS, Gauge, SECONDS, &[],
        "Queueing delay behind the front door the admission controller sees: the largest p50 sojourn of the router's bulk source and the projector's high and standard lanes"),
    def(LANE_E2E_LATENCY_SECONDS, Histogram, SECONDS, &["role", "lane"],
        "Time from entry into the platform to the end of processing, by worker role and lane"),
    def(ROUTER_ROUTED_TOTAL, Counter, COUNT, &["lane", "reason"],
        "Events routed, by lane and the reason label of the deciding rule"),
    def(WORKER_PROCESSED_TOTAL, Counter, COUNT, &["role", "lane", "outcome"],
        "Messages settled by the consumer runtime, by role, source (a lane, express, bulk, \
         analytics) and outcome (done, retry, wait, dead_lettered, dead_letter_failed)"),
    def(WORKER_BATCH_DURATION_SECONDS, Histogram, SECONDS, &["role", "lane"],
        "Handler time per batch, by role and lane"),
    def(WORKER_BATCH_SIZE, Histogram, COUNT, &["role", "lane"],
        "Messages per batch handed to the handler, by role and the batch's source (a batch \
         topped up from lower sources counts under its first source)"),
    def(WORKER_STAGE_SECONDS, Histogram, SECONDS, &["role", "lane", "stage"],
        "Where a consumer's time goes, per batch: slot_wait (every batch slot busy), fetch_wait \
         (a slot free, no message yet: idle), settle (acks, dead letters and processed notices \
         after the handler); by role and the batch's source"),
    def(STORE_STAGE_SECONDS, Histogram, SECONDS, &["op", "stage"],
        "Where a store transaction's time goes: acquire (waiting for the write connection and \
         BEGIN; on SQLite one writer, so this is the queue behind other transactions), write \
         (the statements), commit (COMMIT, the fsync), yielded (a bulk batch's wait to get the \
         writer back after letting a priority transaction in); op is apply (projector, bulk), \
         apply_priority (projector, critical worker) or analytics"),
    def(STORE_WRITER_YIELDS_TOTAL, Counter, COUNT, &[],
        "SQLite: times a bulk batch committed what it had written and let a waiting priority \
         transaction take the writer before its next segment"),
    def(STORE_PRIORITY_COMBINED_TOTAL, Counter, COUNT, &[],
        "SQLite: priority batches (the projector's critical worker) applied in a transaction \
         shared with other priority batches that waited for the writer at the same time; each \
         such transaction saves all its batches' commits but one"),
    def(WORKER_WAITING, Gauge, None, &["role"],
        "1 while the role holds a batch for a dependency that is down (the store) and takes no \
         new work, else 0"),
    def(DLQ_WRITE_FAILURES_TOTAL, Counter, COUNT, &["stage"],
        "Dead letters that could not be written (DLQ full or unreachable); the message is kept \
         and retried"),
    def(ROUTER_LANE_REFUSALS_TOTAL, Counter, COUNT, &["lane", "kind"],
        "Lane publishes refused (kind: full, timeout, unavailable); the event waits in ingest"),
    def(DLQ_EVENTS_TOTAL, Counter, COUNT, &["stage", "reason"],
        "Messages dead-lettered, by stage and reason"),
    def(CONSUMER_PENDING_MESSAGES, Gauge, COUNT, &["stream", "consumer"],
        "Messages in the stream not yet delivered to the durable consumer"),
    def(CONSUMER_ACK_PENDING_MESSAGES, Gauge, COUNT, &["stream", "consumer"],
        "Messages delivered to the durable consumer and not yet acknowledged"),
    def(CACHE_REQUESTS_TOTAL, Counter, COUNT, &["cache", "result"],
        "Cache lookups by cache and result (hit, miss, error)"),
    def(PROJECTOR_CONFLICTS_TOTAL, Counter, COUNT, &[],
        "Profile field updates lost to a newer write (last-writer-wins)"),
    def(PROJECTOR_DUPLICATES_TOTAL, Counter, COUNT, &[],
        "Redelivered events recognised by the processed-event ledger and skipped"),
    def(STORE_LEDGER_PRUNED_TOTAL, Counter, COUNT, &[],
        "Idempotency ledger rows (projection and analytics) deleted past [store] ledger_retention"),
    def(RULES_RELOADS_TOTAL, Counter, COUNT, &["result"],
        "Routing rule reloads by result (ok, error)"),
    def(NATS_CONNECTED, Gauge, None, &[],
        "1 while connected to NATS, else 0"),
    def(GATEWAY_TLS_HANDSHAKE_FAILURES_TOTAL, Counter, COUNT, &[],
        "HTTPS connections to the gateway whose TLS handshake failed or took over 10 s (a client \
         that does not trust the certificate, speaks plain HTTP, or stalls)"),
    def(NATS_PERMISSION_DENIED_TOTAL, Counter, COUNT, &["operation"],
        "Publishes and subscriptions the NATS server refused this process (operation: publish, \
         subscribe): a role's permissions (nats/secure/permissions.conf) lack something it does"),
    def(THROTTLE_ANALYTICS_RATE, Gauge, PER_SECOND, &[],
        "Analytics processing rate currently allowed by the throttler"),
    def(THROTTLE_LEVEL, Gauge, None, &[],
        "Throttle level (0 = analytics paused; the top level = full analytics rate)"),
    def(ANALYTICS_DEFERRED_MESSAGES, Gauge, COUNT, &[],
        "Analytics messages deferred (left in the stream) by the throttler"),
    def(ANALYTICS_OLDEST_DEFERRED_AGE_SECONDS, Gauge, SECONDS, &[],
        "Age of the oldest deferred analytics message"),
    def(FORECAST_INGEST_RATE, Gauge, PER_SECOND, &[],
        "Forecast ingest rate (events per second) the throttler plans with"),
    def(THROTTLE_LEADER, Gauge, None, &[],
        "1 while this analytics instance holds the throttler's lease (its decision is in force), \
         else 0: across instances exactly one should read 1"),
    def(THROTTLE_INGEST_RATE, Gauge, PER_SECOND, &[],
        "Ingest rate into CRM_INGEST measured over the last throttle tick"),
    def(THROTTLE_CAPACITY_RATE, Gauge, PER_SECOND, &[],
        "Worker capacity the forecast is compared with (measured while busy, else configured)"),
    def(THROTTLE_DECISIONS_TOTAL, Counter, COUNT, &["reason"],
        "Throttle decisions by reason (healthy, hold, latency_breach, backlog_growth, forecast_over_capacity, starvation_guard)"),
    def(ANALYTICS_SKIPPED_TOTAL, Counter, COUNT, &["reason"],
        "Ingest messages analytics acked without counting (invalid input the router dead-letters)"),
    def(ANALYTICS_DUPLICATES_TOTAL, Counter, COUNT, &[],
        "Redelivered events the analytics ledger recognised and did not count again"),
    def(NOTIFIER_DELIVERIES_TOTAL, Counter, COUNT, &["endpoint", "result"],
        "Webhook deliveries by endpoint (subscription id) and result (delivered, retry, rejected, \
         breaker_open, busy)"),
    def(NOTIFIER_DELIVERY_DURATION_SECONDS, Histogram, SECONDS, &["endpoint"],
        "Webhook request duration by endpoint (subscription id), whatever the answer"),
    def(NOTIFIER_BREAKER_OPEN, Gauge, None, &["endpoint"],
        "1 while the endpoint's circuit breaker is open or half-open, else 0"),
    def(STREAM_BYTES, Gauge, BYTES, &["stream"],
        "Bytes stored in the stream"),
    def(STREAM_MESSAGES, Gauge, COUNT, &["stream"],
        "Messages stored in the stream"),
    def(STREAM_MAX_BYTES, Gauge, BYTES, &["stream"],
        "The stream's max_bytes; not exported for a stream without a byte limit (NaN once a \
         limit is lifted)"),
    def(INGEST_REPLAY_WINDOW_SECONDS, Gauge, SECONDS, &["stream"],
        "Age of the oldest event an ingest stream (CRM_INGEST, CRM_INGEST_PRIORITY) keeps (the replay window actually available)"),
    def(INGEST_PURGED_MESSAGES_TOTAL, Counter, COUNT, &["stream"],
        "Processed events the ingest retention keeper purged from an ingest stream"),
    def(INGEST_UNPROCESSED_MESSAGES, Gauge, COUNT, &["stream"],
        "Events in an ingest stream some durable consumer has not processed (last sequence - processed floor)"),
];

/// Register help text and unit of every metric with the installed recorder (a no-op without
/// one). [`install_recorder`](crate::install_recorder) calls it.
pub fn describe_all() {
    for metric in ALL {
        let (name, help) = (metric.name, metric.help);
        match (metric.kind, metric.unit) {
            (Counter, Some(unit)) => describe_counter!(name, unit, help),
            (Counter, None) => describe_counter!(name, help),
            (Gauge, Some(unit)) => describe_gauge!(name, unit, help),
            (Gauge, None) => describe_gauge!(name, help),
            (Histogram, Some(unit)) => describe_histogram!(name, unit, help),
            (Histogram, None) => describe_histogram!(name, help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn names_follow_the_conventions() {
        let mut seen = HashSet::new();
        for metric in ALL {
            let name = metric.name;
            assert!(seen.insert(name), "{name} listed twice");
            assert!(name.starts_with("crm_"), "{name}");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{name}"
            );
            assert_eq!(
                metric.kind == Counter,
                name.ends_with("_total"),
                "{name}: counters and only counters end in _total"
            );
            assert_eq!(
                metric.unit == Some(Unit::Seconds),
                name.ends_with("_seconds"),
                "{name}: the unit is in the name"
            );
            assert!(!metric.help.is_empty(), "{name}");
            for label in metric.labels {
                assert!(
                    !label.contains("tenant") && !label.contains("customer") && *label != "id",
                    "{name}: label {label} is unbounded"
                );
            }
        }
        assert_eq!(ALL.len(), 51);
    }

    #[test]
    fn describe_all_without_a_recorder_is_a_no_op() {
        describe_all();
    }
}
