//! What the platform's own metrics say happened while a run went on: each role's `/metrics`,
//! scraped every second, reduced to a few counters (lane refusals, dead-letter write failures,
//! dead letters, ledger duplicates) and gauges (seconds a role waited for its store). A fault that
//! left no mark did not happen, and a run cannot pass on it. Counters survive a role's restart
//! (a drop in value starts a new process's count on top of the old one).

use serde::{Deserialize, Serialize};
use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

/// Counters summed over their labels, per role.
pub const COUNTERS: [&str; 6] = [
    "crm_router_lane_refusals_total",
    "crm_dlq_write_failures_total",
    "crm_dlq_events_total",
    "crm_projector_duplicates_total",
    "crm_analytics_duplicates_total",
    "crm_gateway_shed_total",
];
/// Gauges whose seconds above zero are counted, per role.
pub const GAUGES: [&str; 1] = ["crm_worker_waiting"];

/// The samples so far.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    /// (role, counter) → (sum of earlier processes' last values, this process's last value).
    counters: BTreeMap<(String, String), (f64, f64)>,
    /// (role, gauge) → scrapes in which it was above zero.
    gauge_scrapes: BTreeMap<(String, String), u64>,
}

/// Sum of every series of `name` in a Prometheus text exposition.
fn sum_of(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if let Some(value) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

impl Evidence {
    /// Take one scrape of `role`'s metrics.
    pub fn absorb(&mut self, role: &str, text: &str) {
        for name in COUNTERS {
            let Some(value) = sum_of(text, name) else {
                continue;
            };
            let entry = self
                .counters
                .entry((role.to_owned(), name.to_owned()))
                .or_insert((0.0, 0.0));
            if value < entry.1 {
                // A new process: its count starts again.
                entry.0 += entry.1;
            }
            entry.1 = value;
        }
        for name in GAUGES {
            if sum_of(text, name).is_some_and(|v| v > 0.0) {
                *self
                    .gauge_scrapes
                    .entry((role.to_owned(), name.to_owned()))
                    .or_default() += 1;
            }
        }
    }

    /// `<role> <counter>` → total, `<role> <gauge> seconds` → scrapes above zero.
    pub fn totals(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for ((role, name), (base, last)) in &self.counters {
            if base + last > 0.0 {
                out.insert(format!("{role} {name}"), base + last);
            }
        }
        for ((role, name), n) in &self.gauge_scrapes {
            out.insert(format!("{role} {name} seconds"), *n as f64);
        }
        out
    }
}

/// A counter's total over every role (`name` without labels).
pub fn total(totals: &BTreeMap<String, f64>, name: &str) -> f64 {
    totals
        .iter()
        .filter(|(key, _)| key.split(' ').nth(1) == Some(name) && !key.ends_with(" seconds"))
        .fold(0.0, |sum, (_, v)| sum + v)
}

/// Scrape every endpoint once a second until `stop`; hands the evidence back.
pub fn spawn_poller(
    endpoints: Vec<(String, SocketAddr)>,
    stop: bus::CancellationToken,
) -> tokio::task::JoinHandle<Evidence> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(800))
            .build()
            .unwrap_or_default();
        let mut evidence = Evidence::default();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            for (role, addr) in &endpoints {
                if let Ok(response) = client.get(format!("http://{addr}/metrics")).send().await
                    && let Ok(text) = response.text().await
                {
                    evidence.absorb(role, &text);
                }
            }
        }
        evidence
    })
}

/// One check that the fault happened, for the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultCheck {
    pub what: String,
    pub measured: String,
    pub passed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up_across_labels_and_restarts_and_gauges_count_seconds() {
        let mut evidence = Evidence::default();
        let scrape = |refusals: u32, waiting: u32| {
            format!(
                "# TYPE crm_router_lane_refusals_total counter\n\
                 crm_router_lane_refusals_total{{lane=\"standard\",kind=\"full\"}} {refusals}\n\
                 crm_router_lane_refusals_total{{lane=\"high\",kind=\"full\"}} 1\n\
                 crm_router_lane_refusals_total_other 99\n\
                 crm_worker_waiting{{role=\"projector\"}} {waiting}\n"
            )
        };
        evidence.absorb("router", &scrape(4, 0));
        evidence.absorb("router", &scrape(9, 1));
        // Restarted: the new process counts from 0.
        evidence.absorb("router", &scrape(2, 1));
        let totals = evidence.totals();
        assert_eq!(totals["router crm_router_lane_refusals_total"], 10.0 + 3.0);
        assert_eq!(totals["router crm_worker_waiting seconds"], 2.0);
        assert_eq!(total(&totals, "crm_router_lane_refusals_total"), 13.0);
        assert_eq!(total(&totals, "crm_dlq_write_failures_total"), 0.0);
        assert_eq!(sum_of("crm_x 1\n", "crm_y"), None);
    }
}
