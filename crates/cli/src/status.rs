//! `crm status`: the platform at a glance, from any machine that reaches NATS: every durable
//! consumer's backlog, each worker role's lane throughput and p99 (from their health reports),
//! the throttler's latest decision, and the dead-letter count.

use anyhow::Result;
use bus::{
    Bus, Definitions,
    control::{HEALTH_SUBJECT_PREFIX, HealthReport, THROTTLE_SUBJECT, ThrottleReport},
    ops::DLQ_STREAM,
};
use futures::StreamExt;
use serde::Serialize;
use std::{collections::BTreeMap, time::Duration};

/// One durable consumer's backlog.
#[derive(Debug, Clone, Serialize)]
pub struct ConsumerStatus {
    pub stream: String,
    pub consumer: String,
    pub pending: u64,
    pub ack_pending: u64,
    pub paused: bool,
}

/// One lane of one worker role, summed over the role's processes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LaneStatus {
    pub processed_per_sec: f64,
    /// The highest p99 any process reported, ms.
    pub p99_ms: f64,
}

/// Everything `crm status` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub consumers: Vec<ConsumerStatus>,
    /// role → lane → figures, from the health reports heard while listening.
    pub lanes: BTreeMap<String, BTreeMap<String, LaneStatus>>,
    pub throttle: Option<ThrottleReport>,
    pub dead_letters: u64,
}

/// Listen to the control plane for `listen` (health reports come every second) and read the
/// consumers and the DLQ.
pub async fn gather(bus: &Bus, listen: Duration) -> Result<Status> {
    let mut health = bus
        .client()
        .subscribe(format!("{HEALTH_SUBJECT_PREFIX}.>"))
        .await?;
    let mut throttle = bus.client().subscribe(THROTTLE_SUBJECT).await?;
    let mut reports: BTreeMap<(String, String), HealthReport> = BTreeMap::new();
    let mut decision: Option<ThrottleReport> = None;
    let deadline = tokio::time::sleep(listen);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            Some(message) = health.next() => {
                if let Ok(report) = serde_json::from_slice::<HealthReport>(&message.payload) {
                    reports.insert((report.role.clone(), report.instance.clone()), report);
                }
            }
            Some(message) = throttle.next() => {
                if let Ok(report) = serde_json::from_slice::<ThrottleReport>(&message.payload) {
                    decision = Some(report);
                }
            }
        }
    }
    let mut lanes: BTreeMap<String, BTreeMap<String, LaneStatus>> = BTreeMap::new();
    for report in reports.values() {
        for lane in &report.lanes {
            let entry = lanes
                .entry(report.role.clone())
                .or_default()
                .entry(lane.lane.clone())
                .or_default();
            entry.processed_per_sec += report.per_second(lane.processed);
            entry.p99_ms = entry.p99_ms.max(lane.p99_ms);
        }
    }
    let mut consumers = Vec::new();
    for def in Definitions::embedded()?.consumers {
        match bus.consumer_info(&def.stream, &def.durable).await {
            Ok(info) => consumers.push(ConsumerStatus {
                stream: def.stream,
                consumer: def.durable,
                pending: info.num_pending,
                ack_pending: info.num_ack_pending as u64,
                paused: info.paused,
            }),
            Err(err) => tracing::warn!(error = %err, "consumer info"),
        }
    }
    let dead_letters = bus.stream_state(DLQ_STREAM).await?.messages;
    Ok(Status {
        consumers,
        lanes,
        throttle: decision,
        dead_letters,
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The consumer column is as wide as its longest name (router_express, analytics, …).
        let width = self
            .consumers
            .iter()
            .map(|c| c.consumer.len())
            .max()
            .unwrap_or(0)
            .max("CONSUMER".len());
        writeln!(
            f,
            "{:<20} {:<width$} {:>10} {:>12} {:>8}",
            "STREAM", "CONSUMER", "PENDING", "ACK PENDING", "PAUSED"
        )?;
        for c in &self.consumers {
            writeln!(
                f,
                "{:<20} {:<width$} {:>10} {:>12} {:>8}",
                c.stream,
                c.consumer,
                c.pending,
                c.ack_pending,
                if c.paused { "yes" } else { "no" }
            )?;
        }
        writeln!(f)?;
        if self.lanes.is_empty() {
            writeln!(f, "lanes: no worker reported (are any running?)")?;
        } else {
            writeln!(
                f,
                "{:<12} {:<10} {:>12} {:>10}",
                "ROLE", "LANE", "RATE/S", "P99 MS"
            )?;
            for (role, lanes) in &self.lanes {
                for (lane, status) in lanes {
                    writeln!(
                        f,
                        "{role:<12} {lane:<10} {:>12.0} {:>10.1}",
                        status.processed_per_sec, status.p99_ms
                    )?;
                }
            }
        }
        writeln!(f)?;
        match &self.throttle {
            Some(t) => {
                writeln!(
                    f,
                    "throttle: level {}/{}, analytics rate {:.0}/s ({}); ingest {:.0}/s, forecast {:.0}/s, capacity {:.0}/s; priority p99 {:.1} ms, backlog {}",
                    t.level,
                    t.levels,
                    t.rate,
                    t.reason,
                    t.ingest_rate,
                    t.forecast,
                    t.capacity,
                    t.priority_p99_ms,
                    t.priority_backlog
                )?;
                writeln!(
                    f,
                    "analytics: {} deferred, oldest {:.1} s, consumer {}",
                    t.deferred,
                    t.oldest_deferred_age_s,
                    if t.consumer_paused {
                        "paused"
                    } else {
                        "running"
                    }
                )?;
            }
            None => writeln!(
                f,
                "throttle: no decision heard (is the analytics role running?)"
            )?,
        }
        write!(f, "dead letters: {}", self.dead_letters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_columns_line_up_whatever_the_names() {
        let consumer = |name: &str, pending| ConsumerStatus {
            stream: "CRM_INGEST".into(),
            consumer: name.into(),
            pending,
            ack_pending: 0,
            paused: false,
        };
        let status = Status {
            consumers: vec![consumer("router", 7), consumer("router_express", 123_456)],
            lanes: BTreeMap::new(),
            throttle: None,
            dead_letters: 0,
        };
        let text = status.to_string();
        let rows: Vec<&str> = text.lines().take(3).collect();
        // Each column ends at the same place on every row: PENDING right-aligned under its header.
        let end = |row: &str, needle: &str| row.find(needle).map(|at| at + needle.len());
        let header_end = end(rows[0], "PENDING").expect("header");
        assert_eq!(end(rows[1], " 7 "), Some(header_end + 1), "{text}");
        assert_eq!(end(rows[2], " 123456 "), Some(header_end + 1), "{text}");
    }
}
