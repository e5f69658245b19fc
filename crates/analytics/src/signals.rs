//! Lane health as the throttler sees it: the latest [`HealthReport`] of every worker process,
//! gathered from `crm.control.health.>`, so it works whether roles share a process or not.

use bus::control::{HealthReport, unix_ms};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

/// The latest report per (role, instance). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct HealthBoard {
    reports: Arc<Mutex<HashMap<(String, String), HealthReport>>>,
}

/// What the reports of the watched roles say, summed or maximised over their processes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LaneHealth {
    /// The highest p99 (ms) any process reported for a priority lane (critical, high) in which it
    /// processed something; 0 when none did.
    pub priority_p99_ms: f64,
    /// Events per second processed across all lanes.
    pub processed_per_sec: f64,
    /// The highest pending count any process saw in the standard lane.
    pub standard_pending: u64,
    /// Processes that reported.
    pub reporters: usize,
}

impl HealthBoard {
    /// Keep `report` as its process's latest.
    pub fn record(&self, report: HealthReport) {
        let key = (report.role.clone(), report.instance.clone());
        self.reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, report);
    }

    /// Health of `roles` from reports younger than `max_age`; older ones are dropped (a process
    /// that stopped reporting no longer counts).
    pub fn health(&self, roles: &[String], max_age: Duration) -> LaneHealth {
        let now = unix_ms();
        let max_age_ms = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
        let mut reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        reports.retain(|_, report| now.saturating_sub(report.at_ms) <= max_age_ms);
        let mut health = LaneHealth::default();
        for report in reports.values().filter(|r| roles.contains(&r.role)) {
            health.reporters += 1;
            for lane in &report.lanes {
                health.processed_per_sec += report.per_second(lane.processed);
                if lane.processed > 0 && (lane.lane == "critical" || lane.lane == "high") {
                    health.priority_p99_ms = health.priority_p99_ms.max(lane.p99_ms);
                }
                if lane.lane == "standard" {
                    health.standard_pending = health.standard_pending.max(lane.pending);
                }
            }
        }
        health
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus::control::LaneReport;

    fn lane(name: &str, processed: u64, p99_ms: f64, pending: u64) -> LaneReport {
        LaneReport {
            lane: name.into(),
            processed,
            p50_ms: p99_ms / 2.0,
            p99_ms,
            max_ms: p99_ms,
            pending,
        }
    }

    fn report(role: &str, instance: &str, at_ms: u64, lanes: Vec<LaneReport>) -> HealthReport {
        HealthReport {
            role: role.into(),
            instance: instance.into(),
            at_ms,
            interval_ms: 500,
            lanes,
        }
    }

    #[test]
    fn combines_processes_of_the_watched_roles_only() {
        let board = HealthBoard::default();
        let now = unix_ms();
        board.record(report(
            "projector",
            "a",
            now,
            vec![
                lane("critical", 10, 12.0, 0),
                lane("standard", 90, 900.0, 5000),
            ],
        ));
        board.record(report(
            "projector",
            "b",
            now,
            vec![lane("high", 5, 30.0, 0), lane("critical", 0, 99.0, 0)],
        ));
        // Another role's slow webhooks must not count.
        board.record(report(
            "notifier",
            "n",
            now,
            vec![lane("critical", 1, 5000.0, 0)],
        ));
        // A newer report of the same process replaces the older one.
        board.record(report(
            "projector",
            "a",
            now,
            vec![
                lane("critical", 20, 15.0, 0),
                lane("standard", 80, 900.0, 6000),
            ],
        ));
        let health = board.health(&["projector".into()], Duration::from_secs(5));
        assert_eq!(health.reporters, 2);
        // A lane that processed nothing has no latency to speak of; standard never counts.
        assert_eq!(health.priority_p99_ms, 30.0);
        assert_eq!(health.processed_per_sec, (20.0 + 80.0 + 5.0) * 2.0);
        assert_eq!(health.standard_pending, 6000);
    }

    #[test]
    fn stale_reports_are_dropped() {
        let board = HealthBoard::default();
        board.record(report(
            "projector",
            "old",
            unix_ms() - 10_000,
            vec![lane("critical", 1, 800.0, 0)],
        ));
        let health = board.health(&["projector".into()], Duration::from_secs(3));
        assert_eq!(health, LaneHealth::default());
    }
}
