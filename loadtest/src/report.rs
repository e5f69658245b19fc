//! The run's report: `report.json` (everything), `summary.md` (the headline tables) and the SLO
//! verdicts.

use crate::{
    admission::AdmissionPoint,
    client_retry::RetryReport,
    effects::EffectsReport,
    evidence::{FaultCheck, StageRow},
    goodput::ClassGoodput,
    inversion::InversionFigure,
    procs::{Machine, ProcessSeries},
    scenario::Slo,
    tracker::{ErrorLog, Percentiles},
};
use bus::raw::RawRates;
use serde::{Deserialize, Serialize};
use std::{collections::BTreeMap, fmt::Write as _};

/// The seed paper's figures (1,000 concurrent users).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Paper {
    pub event_driven_per_s: f64,
    pub event_driven_latency_ms: f64,
    pub synchronous_per_s: f64,
    pub synchronous_latency_ms: f64,
    pub ratio: f64,
}

impl Default for Paper {
    fn default() -> Self {
        Self {
            event_driven_per_s: 3400.0,
            event_driven_latency_ms: 320.0,
            synchronous_per_s: 1150.0,
            synchronous_latency_ms: 780.0,
            ratio: 2.96,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PhaseReport {
    pub name: String,
    /// `open` or `closed`.
    pub model: String,
    /// Open model: offered events/s at the start and end of the phase.
    pub offered_per_s: Option<f64>,
    pub offered_to_per_s: Option<f64>,
    /// Closed model: users and think time.
    pub users: Option<usize>,
    pub think_ms: Option<f64>,
    pub start_s: f64,
    pub duration_s: f64,
    pub excluded_from_totals: bool,
    pub sent: u64,
    pub acked: u64,
    pub errors: u64,
    /// Never acked: refused with `Retry-After` to the last attempt, or held back by the
    /// admission signal past the phase (not errors, not missing).
    #[serde(default)]
    pub shed: u64,
    /// Events of this phase the projector processed.
    pub processed: u64,
    /// Acks per second over the phase.
    pub ack_per_s: f64,
    /// Projector completions per second while the phase ran (whatever phase they came from).
    pub e2e_per_s: f64,
    /// Intended send → HTTP answer / PubAck, all classes.
    pub ack_latency: Percentiles,
    /// Intended send → HTTP answer / PubAck per generated class (`critical`, `high`,
    /// `standard`, `analytics_only`): with `e2e_latency` it splits a class's time into before
    /// and after the ack.
    #[serde(default)]
    pub ack_latency_by_class: BTreeMap<String, Percentiles>,
    /// Intended send → processed, per lane (`critical`, `high`, `standard`, `all`) and
    /// `analytics` (intended send → counted by analytics).
    pub e2e_latency: BTreeMap<String, Percentiles>,
    /// Per generated class: acked and processed events per second of the phase, and shed.
    #[serde(default)]
    pub goodput: BTreeMap<String, ClassGoodput>,
    /// The critical probe's events (a client of its own beside the load), when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeReport>,
}

/// What the critical probe saw in a phase: its sends, their answers (intended send → ack) and
/// their commits (intended send → projector commit).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProbeReport {
    pub sent: u64,
    pub ack: Percentiles,
    pub e2e: Percentiles,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Loss {
    pub sent: u64,
    pub acked: u64,
    pub errors: u64,
    /// Distinct events the projector reported processed (or, when its notice was lost, that
    /// the store's ledger holds).
    pub processed: u64,
    /// Reports of an event the projector had reported already: a redelivery the ledger made
    /// harmless (effects are checked in the store, see `Report::effects`).
    pub duplicates: u64,
    pub dead_lettered: u64,
    /// This run's dead letters by reason.
    #[serde(default)]
    pub dead_letter_reasons: BTreeMap<String, u64>,
    /// The acked events, each in exactly one bucket: processed, dead-lettered, a retry answered
    /// `duplicate: true`, or missing (acked = the four added up).
    #[serde(default)]
    pub acked_processed: u64,
    #[serde(default)]
    pub acked_dead_lettered: u64,
    #[serde(default)]
    pub acked_deduplicated: u64,
    /// Acked events generated to fail (invalid, poison).
    #[serde(default)]
    pub doomed: u64,
    /// Dead letters that are not an event generated to fail with that reason, and events
    /// generated to fail that were processed instead.
    #[serde(default)]
    pub unexpected_dead_letters: u64,
    #[serde(default)]
    pub doomed_processed: u64,
    /// Acks that said `duplicate: true`.
    #[serde(default)]
    pub deduplicated: u64,
    /// Processed events whose projector notice never reached the harness (found in the ledger).
    #[serde(default)]
    pub found_in_store: u64,
    #[serde(default)]
    pub analytics_found_in_store: u64,
    /// Acked, but neither processed nor dead-lettered by the end of the drain.
    pub missing: u64,
    /// The first of them.
    pub missing_ids: Vec<String>,
    /// Processed although the harness saw no ack (an error answer after the event was stored).
    pub processed_without_ack: u64,
    pub analytics_counted: u64,
    pub analytics_missing: u64,
    pub analytics_duplicates: u64,
    /// Notices of events that were not this run's.
    pub foreign: u64,
    pub drain_s: f64,
    pub drained: bool,
    /// Never acked because the platform refused them (503/429 with `Retry-After`) to the last
    /// attempt, or the admission signal held them back past their phase. Not in `missing`.
    #[serde(default)]
    pub shed: u64,
    /// Of `shed`: never sent at all (deferred by the admission signal).
    #[serde(default)]
    pub shed_unsent: u64,
    /// Refused at least once, acked on a later attempt.
    #[serde(default)]
    pub acked_after_refusal: u64,
    /// Answers refusing an event with `Retry-After`, every attempt counted, and by the problem
    /// type the platform gave.
    #[serde(default)]
    pub refusals: u64,
    #[serde(default)]
    pub refusal_kinds: BTreeMap<String, u64>,
    /// Sends of an event after a refusal.
    #[serde(default)]
    pub retries: u64,
    /// Bulk events the admission signal held back at least once.
    #[serde(default)]
    pub deferred: u64,
}

/// Per-second series (index = second of the run).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Series {
    pub t_s: Vec<f64>,
    /// By intended send time.
    pub sent: Vec<u64>,
    pub errors: Vec<u64>,
    /// By answer time.
    pub acked: Vec<u64>,
    /// Refusals with `Retry-After`, by answer time (every attempt counted).
    #[serde(default)]
    pub shed: Vec<u64>,
    /// Projector completions, all lanes, by completion time.
    pub processed: Vec<u64>,
    pub analytics: Vec<u64>,
    /// Per lane (and `analytics`): p50 / p99 of the events completed in that second, ms.
    pub p50_ms: BTreeMap<String, Vec<Option<f64>>>,
    pub p99_ms: BTreeMap<String, Vec<Option<f64>>>,
    /// Critical and high together.
    pub priority_p99_ms: Vec<Option<f64>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ThrottlePoint {
    pub t_s: f64,
    pub level: u8,
    pub rate: f64,
    pub reason: String,
    pub ingest_rate: f64,
    pub capacity: f64,
    pub priority_p99_ms: f64,
    pub deferred: u64,
    pub oldest_deferred_age_s: f64,
    pub consumer_paused: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SyncReport {
    pub load: String,
    pub duration_s: f64,
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    pub throughput_per_s: f64,
    /// Intended send → answer (everything is done when it answers).
    pub latency: Percentiles,
    pub by_class: BTreeMap<String, Percentiles>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BaselineReport {
    pub raw: Option<RawRates>,
    pub sync: Option<SyncReport>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ratios {
    /// The best phase's projector completions per second while it ran.
    pub ours_e2e_per_s: f64,
    /// Every processed event over the time from the first send to the last completion (backlog
    /// included): what the platform sustains when ingest outruns processing.
    pub sustained_e2e_per_s: f64,
    pub sustained_window_s: f64,
    pub ours_phase: String,
    /// That phase was an open model that kept up with its offered rate: the ratios are floors
    /// (the platform was not saturated), not its capacity.
    pub offered_limited: bool,
    /// The better of the two rates above ÷ raw async publish (the architecture's target ratio,
    /// ≥ 0.19).
    pub ours_vs_raw_publish: Option<f64>,
    /// ÷ raw publish-then-consume (one bare hop).
    pub ours_vs_raw_hop: Option<f64>,
    pub ours_vs_sync: Option<f64>,
    /// Our all-lane e2e p50/p99 in that phase, and the sync baseline's answer p50/p99.
    pub ours_p50_ms: f64,
    pub ours_p99_ms: f64,
    pub ours_mean_ms: f64,
    pub sync_p50_ms: Option<f64>,
    pub sync_p99_ms: Option<f64>,
    pub sync_mean_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OverloadReport {
    pub capacity_per_s: Option<f64>,
    pub offered_per_s: Option<f64>,
    pub idle_critical_p99_ms: f64,
    pub overload_critical_p99_ms: f64,
    pub critical_p99_ratio: Option<f64>,
    pub max_deferred: u64,
    pub min_throttle_level: Option<u8>,
    pub seconds_paused: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FaultReport {
    /// `kill_role`, `restart_nats`, `kill_nats`, `store_down`, `restore_streams`.
    #[serde(default)]
    pub kind: String,
    /// The role killed (`kill_role`), else what the fault acted on.
    pub role: String,
    /// When the fault began and ended (restarted and ready, store back, streams restored).
    pub killed_at_s: f64,
    pub restarted_at_s: f64,
    pub recovery_target_ms: f64,
    /// From the kill until the priority p99 per second is back under target (and stays so for
    /// three seconds, or to the end of the data).
    pub recovery_s: Option<f64>,
    /// The same, counted from the fault's end.
    #[serde(default)]
    pub recovery_after_end_s: Option<f64>,
    pub worst_priority_p99_ms: f64,
}

/// A stream after the drain.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamReport {
    pub name: String,
    pub messages: u64,
    pub bytes: u64,
    pub max_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SloVerdict {
    pub name: String,
    pub limit: String,
    pub measured: String,
    pub passed: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub description: String,
    pub started_at: String,
    pub machine: Machine,
    pub driver: String,
    pub stack: String,
    pub phases: Vec<PhaseReport>,
    pub totals: PhaseReport,
    pub loss: Loss,
    /// Generated class → lane the projector reported → events.
    pub routed: BTreeMap<String, BTreeMap<String, u64>>,
    /// Lower-class events committed before earlier-acked higher-class ones, per pair of classes.
    #[serde(default)]
    pub inversions: Vec<InversionFigure>,
    /// The gateway's bulk admission signals seen during the run.
    #[serde(default)]
    pub admission: Vec<AdmissionPoint>,
    pub series: Series,
    pub throttle: Vec<ThrottlePoint>,
    pub processes: Vec<ProcessSeries>,
    pub baselines: BaselineReport,
    pub ratios: Ratios,
    pub paper: Paper,
    pub overload: Option<OverloadReport>,
    pub fault: Option<FaultReport>,
    /// Effects per tenant, read from the store after the drain (a platform the harness started).
    #[serde(default)]
    pub effects: Option<EffectsReport>,
    /// Each stream after the drain.
    #[serde(default)]
    pub streams: Vec<StreamReport>,
    /// `[retention].high_water` of the run's configuration (CRM_INGEST's trim threshold).
    #[serde(default)]
    pub ingest_high_water: Option<f64>,
    #[serde(default)]
    pub retries: Vec<RetryReport>,
    /// The platform's own metrics over the run (see `evidence`).
    #[serde(default)]
    pub evidence: BTreeMap<String, f64>,
    /// Where the time went, from the roles' stage histograms (see `evidence::StageRow`).
    #[serde(default)]
    pub stages: Vec<StageRow>,
    /// That the fault left its mark.
    #[serde(default)]
    pub fault_checks: Vec<FaultCheck>,
    pub errors: ErrorLog,
    /// Other roles' latency (e.g. a notifier), `role/lane` → percentiles.
    pub other_roles: BTreeMap<String, Percentiles>,
    /// The SLOs the run was held to (so a report can be rendered and judged again).
    #[serde(default)]
    pub slo: Slo,
    pub slos: Vec<SloVerdict>,
    pub passed: bool,
}

fn verdict(name: &str, limit: String, measured: String, passed: bool) -> SloVerdict {
    SloVerdict {
        name: name.into(),
        limit,
        measured,
        passed,
    }
}

impl Report {
    /// How the platform routed each generated class: lanes as the projector reported them. A
    /// class's events can land in a faster lane than generated (a standard event of a top-tier or
    /// high-LTV customer is high-value), which the per-lane latencies must be read with.
    fn routing_markdown(&self, md: &mut String) {
        const LANES: [&str; 3] = ["critical", "high", "standard"];
        if self.routed.is_empty() {
            return;
        }
        let lane_total =
            |lane: &str| -> u64 { self.routed.values().filter_map(|row| row.get(lane)).sum() };
        let all: u64 = LANES.iter().map(|lane| lane_total(lane)).sum();
        let _ = writeln!(
            md,
            "\n## Routing (generated class → lane the projector processed it in)\n"
        );
        let _ = writeln!(md, "| generated | critical | high | standard |");
        let _ = writeln!(md, "|---|---|---|---|");
        for (class, row) in &self.routed {
            let cells: Vec<String> = LANES
                .iter()
                .map(|lane| row.get(*lane).copied().unwrap_or(0).to_string())
                .collect();
            let _ = writeln!(md, "| {class} | {} |", cells.join(" | "));
        }
        let shares: Vec<String> = LANES
            .iter()
            .map(|lane| {
                let n = lane_total(lane);
                format!("{n} ({:.1}%)", 100.0 * n as f64 / all.max(1) as f64)
            })
            .collect();
        let _ = writeln!(md, "| **all** | {} |", shares.join(" | "));
    }

    /// Check `slo` (and the rule that no acked event may go missing); sets `slos` and `passed`.
    pub fn evaluate(&mut self, slo: &Slo) {
        self.slo = slo.clone();
        let mut out = vec![verdict(
            "no acked event missing",
            "0".into(),
            self.loss.missing.to_string(),
            self.loss.missing == 0,
        )];
        let lane = |name: &str| self.totals.e2e_latency.get(name).map_or(0.0, |p| p.p99_ms);
        for (name, limit, lane_name) in [
            ("critical p99 (ms)", slo.critical_p99_ms, "critical"),
            ("high p99 (ms)", slo.high_p99_ms, "high"),
            ("standard p99 (ms)", slo.standard_p99_ms, "standard"),
        ] {
            if let Some(limit) = limit {
                let measured = lane(lane_name);
                out.push(verdict(
                    name,
                    format!("≤ {limit}"),
                    format!("{measured:.1}"),
                    measured <= limit,
                ));
            }
        }
        if let Some(limit) = slo.probe_critical_p99_ms {
            let measured = self.totals.probe.as_ref().map(|p| p.e2e.p99_ms);
            out.push(verdict(
                "critical p99, own client (probe) (ms)",
                format!("≤ {limit}"),
                measured.map_or("not measured".into(), |m| format!("{m:.1}")),
                measured.is_some_and(|m| m <= limit),
            ));
        }
        if let Some(limit) = slo.max_missing {
            out.push(verdict(
                "missing events",
                format!("≤ {limit}"),
                self.loss.missing.to_string(),
                self.loss.missing <= limit,
            ));
        }
        if let Some(limit) = slo.max_error_rate {
            let rate = self.loss.errors as f64 / self.loss.sent.max(1) as f64;
            out.push(verdict(
                "error rate",
                format!("≤ {limit}"),
                format!("{rate:.5}"),
                rate <= limit,
            ));
        }
        let ratio = |name: &str, limit: Option<f64>, value: Option<f64>, out: &mut Vec<_>| {
            if let Some(limit) = limit {
                out.push(verdict(
                    name,
                    format!("≥ {limit}"),
                    value.map_or("not measured".into(), |v| format!("{v:.3}")),
                    value.is_some_and(|v| v >= limit),
                ));
            }
        };
        ratio(
            "ours ÷ raw publish",
            slo.min_throughput_ratio_raw,
            self.ratios.ours_vs_raw_publish,
            &mut out,
        );
        ratio(
            "ours ÷ sync",
            slo.min_throughput_ratio_sync,
            self.ratios.ours_vs_sync,
            &mut out,
        );
        if let Some(limit) = slo.max_critical_p99_overload_ratio {
            let value = self.overload.as_ref().and_then(|o| o.critical_p99_ratio);
            out.push(verdict(
                "critical p99 overload ÷ idle",
                format!("≤ {limit}"),
                value.map_or("not measured".into(), |v| format!("{v:.2}")),
                value.is_some_and(|v| v <= limit),
            ));
        }
        if let Some(limit) = slo.max_recovery_s {
            let value = self.fault.as_ref().and_then(|f| f.recovery_s);
            out.push(verdict(
                "recovery after kill -9 (s)",
                format!("≤ {limit}"),
                value.map_or("never".into(), |v| format!("{v:.1}")),
                value.is_some_and(|v| v <= limit),
            ));
        }
        if let Some(limit) = slo.max_critical_inversion_share {
            let value = self
                .inversions
                .iter()
                .find(|f| f.pair == crate::inversion::CRITICAL_PAIR)
                .map(|f| f.overtaken_share);
            out.push(verdict(
                "critical events overtaken by a later-acked lower class (share)",
                format!("≤ {limit}"),
                value.map_or("not measured".into(), |v| format!("{v:.4}")),
                value.is_some_and(|v| v <= limit),
            ));
        }
        if slo.analytics_complete == Some(true) {
            out.push(verdict(
                "analytics counted every acked event",
                "0 missing".into(),
                format!("{} missing", self.loss.analytics_missing),
                self.loss.analytics_missing == 0,
            ));
        }
        if let Some(limit) = slo.max_duplicate_effects {
            let measured = self.effects.as_ref();
            out.push(verdict(
                "duplicate effects in the store",
                format!("≤ {limit}"),
                measured.map_or("not measured".into(), |e| e.duplicate_effects.to_string()),
                measured.is_some_and(|e| e.duplicate_effects <= limit),
            ));
            out.push(verdict(
                "processed events without an effect in the store",
                "0".into(),
                measured.map_or("not measured".into(), |e| e.missing_effects.to_string()),
                measured.is_some_and(|e| e.missing_effects == 0),
            ));
        }
        if slo.dead_letters_as_expected == Some(true) {
            let l = &self.loss;
            out.push(verdict(
                "dead letters exactly the events meant to fail",
                format!("{} meant to fail, 0 else", l.doomed),
                format!(
                    "{} dead-lettered ({} unexpected), {} meant to fail processed",
                    l.dead_lettered, l.unexpected_dead_letters, l.doomed_processed
                ),
                l.unexpected_dead_letters == 0 && l.doomed_processed == 0,
            ));
        }
        if slo.lanes_empty == Some(true) {
            let lanes: Vec<&StreamReport> = self
                .streams
                .iter()
                .filter(|s| s.name.starts_with("CRM_LANE_"))
                .collect();
            let held: u64 = lanes.iter().map(|s| s.messages).sum();
            out.push(verdict(
                "lanes empty after the drain",
                "0 messages".into(),
                if lanes.is_empty() {
                    "not measured".into()
                } else {
                    format!("{held} messages")
                },
                !lanes.is_empty() && held == 0,
            ));
        }
        if slo.ingest_within_high_water == Some(true) {
            let ingest = self.streams.iter().find(|s| s.name == "CRM_INGEST");
            let high = self.ingest_high_water.unwrap_or(0.8);
            let (measured, passed) = match ingest.and_then(|s| s.max_bytes.map(|m| (s, m))) {
                Some((s, max)) => (
                    format!(
                        "{:.1} of {:.1} MiB ({:.1} %)",
                        s.bytes as f64 / 1048576.0,
                        max as f64 / 1048576.0,
                        100.0 * s.bytes as f64 / max as f64
                    ),
                    s.bytes as f64 <= high * max as f64,
                ),
                None => ("not measured".into(), false),
            };
            out.push(verdict(
                "CRM_INGEST within its high water",
                format!("≤ {:.0} % of max_bytes", high * 100.0),
                measured,
                passed,
            ));
        }
        if slo.fault_observed == Some(true) {
            let failed: Vec<&str> = self
                .fault_checks
                .iter()
                .filter(|c| !c.passed)
                .map(|c| c.what.as_str())
                .collect();
            out.push(verdict(
                "the fault left its mark",
                "every check".into(),
                if self.fault_checks.is_empty() {
                    "no check".into()
                } else if failed.is_empty() {
                    format!("{} of {}", self.fault_checks.len(), self.fault_checks.len())
                } else {
                    format!("not: {}", failed.join("; "))
                },
                !self.fault_checks.is_empty() && failed.is_empty(),
            ));
        }
        self.passed = out.iter().all(|v| v.passed);
        self.slos = out;
    }

    /// The Markdown summary.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(md, "# crm-load: {}\n", self.scenario);
        if !self.description.is_empty() {
            let _ = writeln!(md, "{}\n", self.description);
        }
        let _ = writeln!(
            md,
            "Run {} — **{}**. Machine: {} × {}, {} GiB RAM, Linux {}; nats-server {} \
             (sync_interval {}); driver {}; platform {}.\n",
            self.started_at,
            if self.passed { "PASSED" } else { "FAILED" },
            m.nproc,
            m.cpu_model,
            m.ram_gib,
            m.kernel,
            m.nats_server,
            m.sync_interval,
            self.driver,
            self.stack
        );
        let _ = writeln!(md, "## Phases\n");
        let _ = writeln!(
            md,
            "| phase | load | s | sent | acked | errors | shed | ack/s | processed/s | ack p99 ms | \
             critical ack p50 / p99 ms | critical p50 / p99 / p99.9 ms | high p50 / p99 / p99.9 ms | standard p50 / p99 / p99.9 ms | analytics p99 ms |"
        );
        let _ = writeln!(
            md,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for phase in self.phases.iter().chain(std::iter::once(&self.totals)) {
            let load = match (phase.offered_per_s, phase.users) {
                (Some(rate), _) => match phase.offered_to_per_s {
                    Some(to) if (to - rate).abs() > 0.5 => format!("open {rate:.0}→{to:.0}/s"),
                    _ => format!("open {rate:.0}/s"),
                },
                (None, Some(users)) => format!(
                    "closed {users} users, think {:.0} ms",
                    phase.think_ms.unwrap_or(0.0)
                ),
                _ => "—".into(),
            };
            let lane = |name: &str| {
                phase.e2e_latency.get(name).map_or("—".into(), |p| {
                    if p.count == 0 {
                        "—".into()
                    } else {
                        format!("{:.1} / {:.1} / {:.1}", p.p50_ms, p.p99_ms, p.p999_ms)
                    }
                })
            };
            let _ = writeln!(
                md,
                "| {}{} | {load} | {:.0} | {} | {} | {} | {} | {:.0} | {:.0} | {:.1} | {} | {} | {} | {} | {} |",
                phase.name,
                if phase.excluded_from_totals {
                    " (excluded)"
                } else {
                    ""
                },
                phase.duration_s,
                phase.sent,
                phase.acked,
                phase.errors,
                phase.shed,
                phase.ack_per_s,
                phase.e2e_per_s,
                phase.ack_latency.p99_ms,
                phase
                    .ack_latency_by_class
                    .get("critical")
                    .filter(|p| p.count > 0)
                    .map_or("—".into(), |p| format!(
                        "{:.1} / {:.1}",
                        p.p50_ms, p.p99_ms
                    )),
                lane("critical"),
                lane("high"),
                lane("standard"),
                phase
                    .e2e_latency
                    .get("analytics")
                    .map_or("—".into(), |p| format!("{:.0}", p.p99_ms)),
            );
        }
        if self.totals.probe.is_some() {
            let _ = writeln!(
                md,
                "\n## Critical probe (a client of its own)\n\nCritical events sent at a fixed rate \
                 from a thread, runtime and connection of their own beside the load, as a payment \
                 service would: what the platform gives a critical producer, without the wait for \
                 the harness's own busy client that the load's critical events include.\n"
            );
            let _ = writeln!(
                md,
                "| phase | sent | ack p50 / p99 / max ms | committed p50 / p99 / p99.9 / max ms |"
            );
            let _ = writeln!(md, "|---|---|---|---|");
            for phase in self.phases.iter().chain(std::iter::once(&self.totals)) {
                if let Some(p) = &phase.probe {
                    let _ = writeln!(
                        md,
                        "| {} | {} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} / {:.1} / {:.1} |",
                        phase.name,
                        p.sent,
                        p.ack.p50_ms,
                        p.ack.p99_ms,
                        p.ack.max_ms,
                        p.e2e.p50_ms,
                        p.e2e.p99_ms,
                        p.e2e.p999_ms,
                        p.e2e.max_ms,
                    );
                }
            }
        }
        let l = &self.loss;
        let _ = writeln!(md, "\n## Loss accounting\n");
        let _ = writeln!(
            md,
            "| sent | acked | errors | shed | processed | duplicates | dead-lettered | missing | \
             processed without ack | analytics counted | analytics missing |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | **{}** | {} | {} | {} |",
            l.sent,
            l.acked,
            l.errors,
            l.shed,
            l.processed,
            l.duplicates,
            l.dead_lettered,
            l.missing,
            l.processed_without_ack,
            l.analytics_counted,
            l.analytics_missing
        );
        if !l.missing_ids.is_empty() {
            let _ = writeln!(
                md,
                "\nMissing (first {}): {}",
                l.missing_ids.len(),
                l.missing_ids.join(", ")
            );
        }
        let _ = writeln!(
            md,
            "\nDrained in {:.1} s{}.",
            l.drain_s,
            if l.drained {
                ""
            } else {
                " (drain timeout reached)"
            }
        );
        if l.acked_processed + l.acked_dead_lettered + l.acked_deduplicated > 0 {
            let reasons: Vec<String> = l
                .dead_letter_reasons
                .iter()
                .map(|(reason, n)| format!("{n} {reason}"))
                .collect();
            let _ = writeln!(
                md,
                "\nAcked {} = processed {} + dead-lettered {}{} + retries answered `duplicate` {} + \
                 missing {}. Meant to fail: {} (processed instead: {}; unexpected dead letters: {}). \
                 Notices lost but found in the ledger: {} (analytics {}).",
                l.acked,
                l.acked_processed,
                l.acked_dead_lettered,
                if reasons.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", reasons.join(", "))
                },
                l.acked_deduplicated,
                l.missing,
                l.doomed,
                l.doomed_processed,
                l.unexpected_dead_letters,
                l.found_in_store,
                l.analytics_found_in_store
            );
        }
        if let Some(effects) = &self.effects {
            let _ = writeln!(md, "\n## Effects in the store\n");
            let _ = writeln!(
                md,
                "| tenant | processed (distinct keys) | ledger | events applied | analytics counted (distinct keys) | analytics ledger | analytics events |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|---|");
            for t in &effects.tenants {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    t.tenant,
                    t.expected,
                    t.store.ledger,
                    t.store.events_applied,
                    t.analytics_expected,
                    t.store.analytics_ledger,
                    t.store.analytics_counted
                );
            }
            let _ = writeln!(
                md,
                "\nDuplicate effects **{}**, processed without an effect **{}**.",
                effects.duplicate_effects, effects.missing_effects
            );
        }
        if !self.retries.is_empty() {
            let _ = writeln!(
                md,
                "\n## Client retries (same idempotency key, new event id)\n"
            );
            let _ = writeln!(
                md,
                "| group | after s | expected | sent | acked | answered duplicate | stored again | processed | errors |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
            for r in &self.retries {
                let _ = writeln!(
                    md,
                    "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
                    r.name,
                    r.after_s,
                    if r.within_window {
                        "inside the window: duplicate"
                    } else {
                        "after the window: stored, no effect"
                    },
                    r.sent,
                    r.acked,
                    r.deduplicated,
                    r.acked - r.deduplicated,
                    r.processed,
                    r.errors
                );
            }
        }
        if !self.streams.is_empty() {
            let _ = writeln!(md, "\n## Streams after the drain\n");
            let _ = writeln!(md, "| stream | messages | bytes | max_bytes | used |");
            let _ = writeln!(md, "|---|---|---|---|---|");
            for s in &self.streams {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} |",
                    s.name,
                    s.messages,
                    s.bytes,
                    s.max_bytes.map_or("none".into(), |m| m.to_string()),
                    s.max_bytes
                        .filter(|m| *m > 0)
                        .map_or("—".into(), |m| format!(
                            "{:.2} %",
                            100.0 * s.bytes as f64 / m as f64
                        ))
                );
            }
        }
        if !self.fault_checks.is_empty() || !self.evidence.is_empty() {
            let _ = writeln!(md, "\n## What the fault left\n");
            for c in &self.fault_checks {
                let _ = writeln!(
                    md,
                    "- {}: {} — {}",
                    c.what,
                    c.measured,
                    if c.passed { "yes" } else { "**no**" }
                );
            }
            if !self.evidence.is_empty() {
                let list: Vec<String> = self
                    .evidence
                    .iter()
                    .map(|(k, v)| format!("{k} = {v}"))
                    .collect();
                let _ = writeln!(md, "\nPlatform metrics over the run: {}.", list.join(", "));
            }
        }
        self.routing_markdown(&mut md);
        crate::goodput::markdown(self, &mut md);
        crate::inversion::markdown(&self.inversions, &mut md);
        let r = &self.ratios;
        let b = &self.baselines;
        let _ = writeln!(md, "\n## Baselines and ratios (same machine, same run)\n");
        let _ = writeln!(md, "| what | events/s | latency |");
        let _ = writeln!(md, "|---|---|---|");
        let _ = writeln!(
            md,
            "| ours, in load (phase {}: completions per second while it ran) | **{:.0}** | p50 {:.1} ms, p99 {:.1} ms, mean {:.1} ms (intended send → processed) |",
            r.ours_phase, r.ours_e2e_per_s, r.ours_p50_ms, r.ours_p99_ms, r.ours_mean_ms
        );
        let _ = writeln!(
            md,
            "| ours, sustained (all {} processed events ÷ {:.0} s from the first send to the last completion) | **{:.0}** | |",
            self.loss.processed, r.sustained_window_s, r.sustained_e2e_per_s
        );
        if let Some(raw) = &b.raw {
            let _ = writeln!(
                md,
                "| raw JetStream async publish ({} events) | {:.0} | |",
                raw.events, raw.publish_per_s
            );
            let _ = writeln!(
                md,
                "| raw JetStream pull-consume + ack | {:.0} | |",
                raw.consume_per_s
            );
            let _ = writeln!(
                md,
                "| raw publish then consume (one bare hop) | {:.0} | |",
                raw.publish_then_consume_per_s
            );
        }
        if let Some(sync) = &b.sync {
            let _ = writeln!(
                md,
                "| synchronous baseline ({}) | {:.0} | p50 {:.1} ms, p99 {:.1} ms, mean {:.1} ms (intended send → answer) |",
                sync.load,
                sync.throughput_per_s,
                sync.latency.p50_ms,
                sync.latency.p99_ms,
                sync.latency.mean_ms
            );
        }
        let p = &self.paper;
        let _ = writeln!(
            md,
            "| paper: event-driven / synchronous | {:.0} / {:.0} | {:.0} ms / {:.0} ms |",
            p.event_driven_per_s,
            p.synchronous_per_s,
            p.event_driven_latency_ms,
            p.synchronous_latency_ms
        );
        let fmt = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.2}"));
        let _ = writeln!(
            md,
            "\nWith ours = the better of the two rates above: **ours ÷ raw publish {}** (target ≥ 0.19), \
             ours ÷ raw hop {}, **ours ÷ sync {}** \
             (target ≥ 10; the paper's event-driven ÷ synchronous: {:.2}).",
            fmt(r.ours_vs_raw_publish),
            fmt(r.ours_vs_raw_hop),
            fmt(r.ours_vs_sync),
            p.ratio
        );
        if r.offered_limited {
            let _ = writeln!(
                md,
                "\nPhase {} kept up with its offered rate (open model below capacity): the ratios are \
                 floors, not the platform's capacity; `paper` and `overload` saturate it.",
                r.ours_phase
            );
        }
        if let Some(o) = &self.overload {
            let _ = writeln!(md, "\n## Overload\n");
            let _ = writeln!(
                md,
                "Capacity measured {} ev/s, offered {} ev/s. Critical p99 at idle {:.1} ms, under overload \
                 {:.1} ms: **ratio {}** (target ≤ 1.5). Analytics deferred up to {} events; lowest throttle \
                 level {}; consumer paused in {} throttle reports.",
                o.capacity_per_s.map_or("—".into(), |c| format!("{c:.0}")),
                o.offered_per_s.map_or("—".into(), |c| format!("{c:.0}")),
                o.idle_critical_p99_ms,
                o.overload_critical_p99_ms,
                fmt(o.critical_p99_ratio),
                o.max_deferred,
                o.min_throttle_level.map_or("—".into(), |l| l.to_string()),
                o.seconds_paused
            );
        }
        if let Some(f) = &self.fault {
            let _ = writeln!(md, "\n## Fault\n");
            let what = match f.kind.as_str() {
                "" | "kill_role" => format!("kill -9 of the {}", f.role),
                "restart_nats" => "nats-server stopped (SIGTERM)".into(),
                "kill_nats" => "kill -9 of nats-server".into(),
                "store_down" => "the store cut (its TCP proxy)".into(),
                "restore_streams" => "streams restored (`crm provision`)".into(),
                other => other.to_owned(),
            };
            let _ = writeln!(
                md,
                "{what} at {:.1} s, back (ready) at {:.1} s. Priority p99 back under {:.0} ms \
                 **{}** after the fault began ({} after it ended); worst priority p99 in a second {:.0} ms.",
                f.killed_at_s,
                f.restarted_at_s,
                f.recovery_target_ms,
                f.recovery_s.map_or("never".into(), |s| format!("{s:.1} s")),
                f.recovery_after_end_s
                    .map_or("never".into(), |s| format!("{s:.1} s")),
                f.worst_priority_p99_ms
            );
        }
        if !self.processes.is_empty() {
            let _ = writeln!(md, "\n## Processes\n");
            let _ = writeln!(
                md,
                "| process | CPU mean % | CPU max % | RSS mean MiB | RSS max MiB |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|");
            for p in &self.processes {
                let _ = writeln!(
                    md,
                    "| {} | {:.0} | {:.0} | {:.1} | {:.1} |",
                    p.name, p.cpu_mean, p.cpu_max, p.rss_mean_mib, p.rss_max_mib
                );
            }
        }
        if !self.stages.is_empty() {
            let _ = writeln!(md, "\n## Where the time goes\n");
            let _ = writeln!(
                md,
                "The platform's own histograms over the run (warm-up and drain included): per \
                 batch for worker stages (slot_wait: every batch slot busy; fetch_wait: idle, \
                 waiting for a message; settle: acks and notices after the handler), per \
                 transaction for the store (acquire: the queue for the write connection). \
                 p50 and p99 are bucket upper bounds.\n"
            );
            let _ = writeln!(
                md,
                "| process | metric | labels | count | mean | p50 ≤ | p99 ≤ |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|---|");
            let unit = |metric: &str| {
                if metric.ends_with("_seconds") {
                    " ms"
                } else {
                    ""
                }
            };
            let bound = |v: Option<f64>, u: &str| {
                v.map_or("–".into(), |v| {
                    if v.is_infinite() {
                        format!("∞{u}")
                    } else {
                        let text = format!("{v:.3}");
                        format!("{}{u}", text.trim_end_matches('0').trim_end_matches('.'))
                    }
                })
            };
            for row in &self.stages {
                let u = unit(&row.metric);
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {:.0} | {:.2}{u} | {} | {} |",
                    row.process,
                    row.metric,
                    row.labels,
                    row.count,
                    row.mean,
                    bound(row.p50, u),
                    bound(row.p99, u)
                );
            }
        }
        if !self.errors.by_kind.is_empty() {
            let _ = writeln!(md, "\n## Errors\n");
            for (kind, count) in &self.errors.by_kind {
                let _ = writeln!(md, "- {kind}: {count}");
            }
        }
        let _ = writeln!(md, "\n## SLOs\n");
        let _ = writeln!(md, "| SLO | limit | measured | |");
        let _ = writeln!(md, "|---|---|---|---|");
        for v in &self.slos {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                v.name,
                v.limit,
                v.measured,
                if v.passed { "pass" } else { "**FAIL**" }
            );
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_but_missing_fails_and_duplicates_do_not() {
        let mut report = Report::default();
        report.loss.duplicates = 3;
        report.evaluate(&Slo::default());
        assert!(report.passed, "{:?}", report.slos);
        report.loss.missing = 1;
        report.loss.missing_ids = vec!["x".into()];
        report.evaluate(&Slo::default());
        assert!(!report.passed);
        assert!(report.markdown().contains("Missing (first 1): x"));
    }

    #[test]
    fn slos_compare_and_report_unmeasured_ratios_as_failures() {
        let mut report = Report::default();
        report.totals.e2e_latency.insert(
            "critical".into(),
            Percentiles {
                count: 10,
                p99_ms: 30.0,
                ..Percentiles::default()
            },
        );
        report.loss.sent = 1000;
        report.loss.errors = 2;
        let slo = Slo {
            critical_p99_ms: Some(25.0),
            max_error_rate: Some(0.01),
            min_throughput_ratio_sync: Some(10.0),
            ..Slo::default()
        };
        report.evaluate(&slo);
        let by_name: BTreeMap<_, _> = report
            .slos
            .iter()
            .map(|v| (v.name.as_str(), v.passed))
            .collect();
        assert!(!by_name["critical p99 (ms)"]);
        assert!(by_name["error rate"]);
        assert!(!by_name["ours ÷ sync"], "not measured is not a pass");
        assert!(!report.passed);
        assert!(report.markdown().contains("**FAIL**"));
    }

    #[test]
    fn routing_shows_each_class_by_lane_and_each_lane_share() {
        let mut report = Report::default();
        report.routed.insert(
            "analytics_only".into(),
            BTreeMap::from([("high".into(), 30), ("standard".into(), 50)]),
        );
        report
            .routed
            .insert("critical".into(), BTreeMap::from([("critical".into(), 20)]));
        let md = report.markdown();
        assert!(md.contains("| analytics_only | 0 | 30 | 50 |"), "{md}");
        assert!(md.contains("| critical | 20 | 0 | 0 |"), "{md}");
        assert!(
            md.contains("| **all** | 20 (20.0%) | 30 (30.0%) | 50 (50.0%) |"),
            "{md}"
        );
    }
}
