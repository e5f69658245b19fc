//! Everything the consumer runtime reports, in one place (the internal-events pattern: one
//! struct per component, its metric handles registered once, then reused for every batch). The
//! names, help and label sets are `telemetry::metrics`' catalogue; a test here records every
//! signal and checks the labels against it.

use metrics::{Counter, Gauge, Histogram};
use std::time::Duration;

/// How a message was settled: the `outcome` label of `crm_worker_processed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Done,
    Retry,
    Wait,
    DeadLettered,
    DeadLetterFailed,
}

impl Settled {
    pub const ALL: [Settled; 5] = [
        Settled::Done,
        Settled::Retry,
        Settled::Wait,
        Settled::DeadLettered,
        Settled::DeadLetterFailed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Settled::Done => "done",
            Settled::Retry => "retry",
            Settled::Wait => "wait",
            Settled::DeadLettered => "dead_lettered",
            Settled::DeadLetterFailed => "dead_letter_failed",
        }
    }
}

/// Where a consumer's time goes: the `stage` label of `crm_worker_stage_seconds`.
pub const STAGES: [&str; 3] = ["slot_wait", "fetch_wait", "settle"];

/// One source's (lane's) signals.
#[derive(Debug)]
struct LaneSignals {
    lane: &'static str,
    batch_size: Histogram,
    batch_duration: Histogram,
    e2e: Histogram,
    processed: [Counter; 5],
    stages: [Histogram; 3],
}

/// The signals of one consumer runtime: a role reading one or more sources.
#[derive(Debug)]
pub struct WorkerSignals {
    lanes: Vec<LaneSignals>,
    waiting: Gauge,
    dead_letter_write_failures: Counter,
}

impl WorkerSignals {
    /// Registers every handle of `role` reading `lanes` (labels are bounded: roles, lanes,
    /// outcomes and stages are fixed sets), dead-lettering at `dlq_stage`.
    pub fn new(role: &'static str, lanes: &[&'static str], dlq_stage: &'static str) -> Self {
        let lanes = lanes
            .iter()
            .map(|&lane| LaneSignals {
                lane,
                batch_size: metrics::histogram!(
                    "crm_worker_batch_size", "role" => role, "lane" => lane
                ),
                batch_duration: metrics::histogram!(
                    "crm_worker_batch_duration_seconds", "role" => role, "lane" => lane
                ),
                e2e: metrics::histogram!(
                    "crm_lane_e2e_latency_seconds", "role" => role, "lane" => lane
                ),
                processed: Settled::ALL.map(|outcome| {
                    metrics::counter!(
                        "crm_worker_processed_total",
                        "role" => role, "lane" => lane, "outcome" => outcome.label()
                    )
                }),
                stages: STAGES.map(|stage| {
                    metrics::histogram!(
                        "crm_worker_stage_seconds",
                        "role" => role, "lane" => lane, "stage" => stage
                    )
                }),
            })
            .collect();
        Self {
            lanes,
            waiting: metrics::gauge!("crm_worker_waiting", "role" => role),
            dead_letter_write_failures: metrics::counter!(
                "crm_dlq_write_failures_total", "stage" => dlq_stage
            ),
        }
    }

    fn lane(&self, lane: &str) -> Option<&LaneSignals> {
        self.lanes.iter().find(|signals| signals.lane == lane)
    }

    /// A batch of `size` messages was taken from `lane`.
    pub fn batch_taken(&self, lane: &str, size: usize) {
        if let Some(signals) = self.lane(lane) {
            signals.batch_size.record(size as f64);
        }
    }

    /// The handler took `took` over a batch from `lane`.
    pub fn batch_handled(&self, lane: &str, took: Duration) {
        if let Some(signals) = self.lane(lane) {
            signals.batch_duration.record(took.as_secs_f64());
        }
    }

    /// `count` messages from `lane` were settled as `outcome`.
    pub fn settled(&self, lane: &str, outcome: Settled, count: u64) {
        if let Some(signals) = self.lane(lane) {
            signals.processed[outcome as usize].increment(count);
        }
    }

    /// An event from `lane` was done `latency` after it entered the platform.
    pub fn e2e_latency(&self, lane: &str, latency: Duration) {
        if let Some(signals) = self.lane(lane) {
            signals.e2e.record(latency.as_secs_f64());
        }
    }

    /// A batch from `lane` spent `took` in `stage` (one of [`STAGES`]).
    pub fn stage(&self, lane: &str, stage: &str, took: Duration) {
        if let (Some(signals), Some(index)) = (
            self.lane(lane),
            STAGES.iter().position(|known| *known == stage),
        ) {
            signals.stages[index].record(took.as_secs_f64());
        }
    }

    /// Whether some batch is being held for an unavailable dependency.
    pub fn waiting(&self, waiting: bool) {
        self.waiting.set(if waiting { 1.0 } else { 0.0 });
    }

    /// A dead letter could not be written (the message is kept and comes back).
    pub fn dead_letter_write_failed(&self) {
        self.dead_letter_write_failures.increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every signal, recorded once, renders with exactly the catalogue's labels.
    #[test]
    fn every_signal_has_the_catalogues_name_and_labels() {
        let text = test_support::render_metrics(|| {
            let signals = WorkerSignals::new("projector", &["critical"], "projector");
            signals.batch_taken("critical", 3);
            signals.batch_handled("critical", Duration::from_millis(2));
            for outcome in Settled::ALL {
                signals.settled("critical", outcome, 1);
            }
            signals.e2e_latency("critical", Duration::from_millis(5));
            for stage in STAGES {
                signals.stage("critical", stage, Duration::from_millis(1));
            }
            signals.waiting(true);
            signals.dead_letter_write_failed();
            // Unknown lanes and stages record nothing rather than invent a label value.
            signals.settled("elsewhere", Settled::Done, 1);
            signals.stage("critical", "invented", Duration::from_millis(1));
        });
        let mut seen = std::collections::BTreeSet::new();
        for line in text.lines().filter(|line| line.starts_with("crm_")) {
            let (series, _) = line.rsplit_once(' ').expect("name{labels} value");
            let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            let mut keys: Vec<&str> = labels
                .trim_end_matches('}')
                .split(',')
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| pair.split_once('=').map(|(key, _)| key))
                .filter(|key| *key != "le" && *key != "quantile")
                .collect();
            keys.sort_unstable();
            let declared = telemetry_catalogue(name)
                .unwrap_or_else(|| panic!("{name} is not in the catalogue"));
            let mut expected = declared.to_vec();
            expected.sort_unstable();
            assert_eq!(keys, expected, "{line}");
            assert!(
                !line.contains("elsewhere") && !line.contains("invented"),
                "{line}"
            );
            seen.insert(name.to_owned());
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            [
                "crm_dlq_write_failures_total",
                "crm_lane_e2e_latency_seconds",
                "crm_worker_batch_duration_seconds",
                "crm_worker_batch_size",
                "crm_worker_processed_total",
                "crm_worker_stage_seconds",
                "crm_worker_waiting",
            ]
        );
        for outcome in Settled::ALL {
            assert!(text.contains(&format!("outcome=\"{}\"", outcome.label())));
        }
    }

    /// The catalogue's label names for `name` (kept in telemetry, which depends on this crate,
    /// so read from its source here).
    fn telemetry_catalogue(name: &str) -> Option<Vec<&'static str>> {
        let source = include_str!("../../telemetry/src/metrics.rs");
        let constant = source.lines().find_map(|line| {
            let rest = line.trim().strip_prefix("pub const ")?;
            let (ident, value) = rest.split_once(": &str = ")?;
            (value.trim().trim_end_matches(';').trim_matches('"') == name).then_some(ident)
        })?;
        let at = source.find(&format!("def({constant},"))?;
        let labels = &source[at..];
        let open = labels.find("&[")? + 2;
        let close = labels[open..].find(']')? + open;
        Some(
            labels[open..close]
                .split(',')
                .map(|label| label.trim().trim_matches('"'))
                .filter(|label| !label.is_empty())
                .collect(),
        )
    }
}
