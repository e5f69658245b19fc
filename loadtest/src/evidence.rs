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

/// Histograms kept from each role's last scrape for the report's "where the time goes" table.
pub const STAGE_HISTOGRAMS: [&str; 4] = [
    "crm_worker_stage_seconds",
    "crm_worker_batch_duration_seconds",
    "crm_store_stage_seconds",
    "crm_worker_batch_size",
];

/// One histogram series as last scraped: cumulative buckets, sum and count.
#[derive(Debug, Clone, Default, PartialEq)]
struct Histogram {
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

impl Histogram {
    /// The upper bound of the bucket holding quantile `q` (the exposition's resolution).
    fn quantile(&self, q: f64) -> Option<f64> {
        let rank = q * self.count;
        self.buckets
            .iter()
            .find(|(_, cumulative)| *cumulative >= rank && *cumulative > 0.0)
            .map(|(le, _)| *le)
    }
}

/// One row of "where the time goes": a stage histogram of one role over the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageRow {
    /// The process scraped (`all`, `router`, …).
    pub process: String,
    /// The metric without its `crm_` prefix.
    pub metric: String,
    /// Its labels, `name=value` joined by `,`.
    pub labels: String,
    pub count: f64,
    /// Mean, in ms for `_seconds` histograms, else in the metric's unit.
    pub mean: f64,
    /// Upper bounds of the buckets holding p50 and p99 (same unit as `mean`).
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

/// The samples so far.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    /// (process, metric, labels without `le`) → the last scrape's histogram.
    histograms: BTreeMap<(String, String, String), Histogram>,
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
        self.absorb_histograms(role, text);
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

    /// The [`STAGE_HISTOGRAMS`] series of one scrape replace that process's earlier ones (a
    /// restarted process starts again: the table covers its life).
    fn absorb_histograms(&mut self, role: &str, text: &str) {
        let mut fresh: BTreeMap<(String, String, String), Histogram> = BTreeMap::new();
        for line in text.lines() {
            let Some(name) = STAGE_HISTOGRAMS.iter().find(|n| line.starts_with(*n)) else {
                continue;
            };
            let rest = &line[name.len()..];
            let (part, rest) = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|p| rest.strip_prefix(p).map(|r| (*p, r)))
                .unwrap_or(("", rest));
            let (labels, value) = match rest.strip_prefix('{').and_then(|r| r.split_once("} ")) {
                Some((labels, value)) => (labels, value),
                None => ("", rest.trim_start()),
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let mut le = None;
            let kept: Vec<&str> = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .filter(|l| match l.strip_prefix("le=") {
                    Some(bound) => {
                        le = bound.trim_matches('"').parse::<f64>().ok();
                        false
                    }
                    None => true,
                })
                .collect();
            let key = (
                role.to_owned(),
                name.to_string(),
                kept.join(",").replace('"', ""),
            );
            let histogram = fresh.entry(key).or_default();
            match (part, le) {
                ("_bucket", Some(le)) => histogram.buckets.push((le, value)),
                ("_sum", _) => histogram.sum = value,
                ("_count", _) => histogram.count = value,
                _ => {}
            }
        }
        if !fresh.is_empty() {
            self.histograms.retain(|(process, ..), _| process != role);
            self.histograms.extend(fresh);
        }
    }

    /// Every stage histogram that saw samples, by process, metric and labels.
    pub fn stages(&self) -> Vec<StageRow> {
        self.histograms
            .iter()
            .filter(|(_, h)| h.count > 0.0)
            .map(|((process, metric, labels), h)| {
                let scale = if metric.ends_with("_seconds") {
                    1000.0
                } else {
                    1.0
                };
                StageRow {
                    process: process.clone(),
                    metric: metric.trim_start_matches("crm_").to_owned(),
                    labels: labels.clone(),
                    count: h.count,
                    mean: h.sum / h.count * scale,
                    p50: h.quantile(0.5).map(|v| v * scale),
                    p99: h.quantile(0.99).map(|v| v * scale),
                }
            })
            .collect()
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

    #[test]
    fn stage_histograms_keep_the_last_scrape_per_process_in_ms() {
        let scrape = |n: u32| {
            format!(
                "crm_store_stage_seconds_bucket{{op=\"apply\",stage=\"acquire\",le=\"0.001\"}} {}\n\
                 crm_store_stage_seconds_bucket{{op=\"apply\",stage=\"acquire\",le=\"0.01\"}} {n}\n\
                 crm_store_stage_seconds_bucket{{op=\"apply\",stage=\"acquire\",le=\"+Inf\"}} {n}\n\
                 crm_store_stage_seconds_sum{{op=\"apply\",stage=\"acquire\"}} {}\n\
                 crm_store_stage_seconds_count{{op=\"apply\",stage=\"acquire\"}} {n}\n\
                 crm_worker_batch_size_count{{role=\"router\",lane=\"bulk\"}} 0\n\
                 crm_other_seconds_sum 5\n",
                n / 2,
                f64::from(n) * 0.004
            )
        };
        let mut evidence = Evidence::default();
        evidence.absorb("all", &scrape(10));
        evidence.absorb("all", &scrape(100));
        let rows = evidence.stages();
        assert_eq!(rows.len(), 1, "{rows:?}");
        let row = &rows[0];
        assert_eq!(
            (
                row.process.as_str(),
                row.metric.as_str(),
                row.labels.as_str()
            ),
            ("all", "store_stage_seconds", "op=apply,stage=acquire")
        );
        assert_eq!(row.count, 100.0);
        assert!((row.mean - 4.0).abs() < 1e-9, "{row:?}");
        assert_eq!((row.p50, row.p99), (Some(1.0), Some(10.0)));
    }
}
