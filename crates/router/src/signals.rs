//! Everything the router reports, in one place (the internal-events pattern): the metric and
//! its log line together, handles registered once — a route's counter the first time its lane
//! and reason are seen (reasons are rule names: a bounded set), the refusal counters up front.

use events::Lane;
use metrics::Counter;
use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
};

/// How a lane refused a publish: the `kind` label of `crm_router_lane_refusals_total`.
pub(crate) const REFUSAL_KINDS: [&str; 3] = ["full", "timeout", "unavailable"];

#[derive(Debug)]
pub(crate) struct RouterSignals {
    routed: Mutex<HashMap<(Lane, String), Counter>>,
    refusals: HashMap<(Lane, &'static str), Counter>,
}

impl RouterSignals {
    pub(crate) fn new() -> Self {
        let refusals = Lane::ALL
            .iter()
            .flat_map(|&lane| {
                REFUSAL_KINDS.map(|kind| {
                    let counter = metrics::counter!(
                        "crm_router_lane_refusals_total",
                        "lane" => lane.as_str(),
                        "kind" => kind
                    );
                    ((lane, kind), counter)
                })
            })
            .collect();
        Self {
            routed: Mutex::new(HashMap::new()),
            refusals,
        }
    }

    /// An event's lane copy was stored: it is routed to `lane` for `reason`.
    pub(crate) fn routed(&self, lane: Lane, reason: &str) {
        let mut routed = self.routed.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(counter) = routed.get(&(lane, reason.to_owned())) {
            counter.increment(1);
            return;
        }
        let counter = metrics::counter!(
            "crm_router_routed_total",
            "lane" => lane.as_str(),
            "reason" => reason.to_owned()
        );
        counter.increment(1);
        routed.insert((lane, reason.to_owned()), counter);
    }

    /// `lane` refused a publish (`kind`: one of [`REFUSAL_KINDS`]); the event waits in ingest.
    pub(crate) fn lane_refused(&self, lane: Lane, kind: &'static str) {
        if let Some(counter) = self.refusals.get(&(lane, kind)) {
            counter.increment(1);
        }
    }
}

/// The routing rules file was read again and is in force.
pub(crate) fn rules_reloaded(path: &std::path::Path) {
    metrics::counter!("crm_rules_reloads_total", "result" => "ok").increment(1);
    tracing::info!(path = %path.display(), "routing rules reloaded");
}

/// The routing rules file was refused; the previous rules stay in force.
pub(crate) fn rules_refused(path: &std::path::Path, error: &str) {
    metrics::counter!("crm_rules_reloads_total", "result" => "error").increment(1);
    tracing::error!(path = %path.display(), error, "routing rules refused; keeping the previous rules");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_refusals_count_under_their_labels() {
        let text = test_support::render_metrics(|| {
            let signals = RouterSignals::new();
            signals.routed(Lane::Critical, "consent");
            signals.routed(Lane::Critical, "consent");
            signals.routed(Lane::Standard, "default");
            signals.lane_refused(Lane::High, "full");
            signals.lane_refused(Lane::High, "invented");
            rules_reloaded(std::path::Path::new("routing.toml"));
            rules_refused(std::path::Path::new("routing.toml"), "bad");
        });
        for line in [
            "crm_router_routed_total{lane=\"critical\",reason=\"consent\"} 2",
            "crm_router_routed_total{lane=\"standard\",reason=\"default\"} 1",
            "crm_router_lane_refusals_total{lane=\"high\",kind=\"full\"} 1",
            "crm_rules_reloads_total{result=\"ok\"} 1",
            "crm_rules_reloads_total{result=\"error\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(!text.contains("invented"), "{text}");
    }
}
