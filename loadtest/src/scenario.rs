//! Scenario files (`loadtest/scenarios/*.toml`): the load shape in phases, the event mix, the
//! stack to start, the baselines to run beside it and the SLOs the run must meet. Unknown keys are
//! refused with their name.

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use std::{path::Path, time::Duration};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// How long to wait after the last send for every acked event to be processed.
    #[serde(with = "humantime_serde", default = "default_drain")]
    pub drain_timeout: Duration,
    /// Seed of the event generator (tenants, customers, classes), so runs are repeatable.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// How events are sent.
    #[serde(default)]
    pub driver: DriverConfig,
    /// The load, phase after phase.
    #[serde(rename = "phase")]
    pub phases: Vec<Phase>,
    #[serde(default)]
    pub mix: Mix,
    #[serde(default)]
    pub stack: StackConfig,
    pub fault: Option<Fault>,
    #[serde(default)]
    pub baselines: Baselines,
    #[serde(default)]
    pub slo: Slo,
}

fn default_drain() -> Duration {
    Duration::from_secs(60)
}

fn default_seed() -> u64 {
    1
}

/// Which way events enter the platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DriverKind {
    /// `POST /v1/events`, one event per request, keep-alive pool.
    #[default]
    Http,
    /// `POST /v1/events:batch`, `batch_size` events per request.
    HttpBatch,
    /// Publish to `crm.ingest.<tenant>.<type>` and await the PubAck.
    Nats,
}

impl DriverKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::HttpBatch => "http_batch",
            Self::Nats => "nats",
        }
    }
}

/// The wire encoding of single HTTP requests (batches are always JSON; NATS always protobuf).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WireEncoding {
    #[default]
    Json,
    Protobuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriverConfig {
    pub kind: DriverKind,
    pub encoding: WireEncoding,
    /// Open model: requests in flight at most (the keep-alive pool: one connection each).
    pub connections: usize,
    /// `http_batch`: events per request.
    pub batch_size: usize,
    /// A request (or PubAck) not answered within this is an error.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Sends of one event at most, the first included: a 503/429 with `Retry-After` is sent
    /// again (same id) after the delay while attempts and its phase last (1 = never again).
    pub max_attempts: u32,
    /// `nats`: critical and high events to `crm.priority.<tenant>.<type>`, bulk to
    /// `crm.ingest.…` (false: everything to `crm.ingest.…`).
    pub priority_subjects: bool,
    /// `nats`: hold bulk publishes to the rate `crm.control.admission` allows while it says
    /// `limited`, deferring the rest.
    pub bulk_pacing: bool,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            kind: DriverKind::Http,
            encoding: WireEncoding::Json,
            connections: 64,
            batch_size: 100,
            timeout: Duration::from_secs(10),
            max_attempts: 3,
            priority_subjects: true,
            bulk_pacing: true,
        }
    }
}

/// One phase of load: open model (`rate`, optionally ramping to `to_rate`, or
/// `rate_x_capacity` times the capacity a `measure_capacity` phase found) or closed model
/// (`users`, `think_time`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    pub name: String,
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Open model: events per second at the start of the phase.
    pub rate: Option<f64>,
    /// Open model: events per second at its end (linear ramp); `rate` throughout if absent.
    pub to_rate: Option<f64>,
    /// Open model: this multiple of the capacity measured by an earlier phase.
    pub rate_x_capacity: Option<f64>,
    /// Closed model: concurrent users, each sending, waiting for the answer, thinking.
    pub users: Option<usize>,
    #[serde(with = "humantime_serde", default)]
    pub think_time: Duration,
    /// Take this phase's processed rate as the platform's capacity (for `rate_x_capacity`).
    #[serde(default)]
    pub measure_capacity: bool,
    /// Leave this phase out of the run's totals (warm-up, capacity probes).
    #[serde(default)]
    pub exclude_from_totals: bool,
    /// The phase whose critical p99 is the "idle" reference for the overload ratio.
    #[serde(default)]
    pub idle_reference: bool,
    /// The phase whose critical p99 is compared with the idle reference.
    #[serde(default)]
    pub overload: bool,
}

/// What a phase drives, resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    Open { rate: f64, to_rate: f64 },
    Closed { users: usize, think: Duration },
}

impl Phase {
    /// Open or closed, with the capacity multiplier applied.
    pub fn load(&self, capacity: Option<f64>) -> Result<Load> {
        match (self.rate, self.rate_x_capacity, self.users) {
            (Some(rate), None, None) => Ok(Load::Open {
                rate,
                to_rate: self.to_rate.unwrap_or(rate),
            }),
            (None, Some(factor), None) => {
                let capacity = capacity.with_context(|| {
                    format!(
                        "phase {:?}: rate_x_capacity needs an earlier phase with measure_capacity",
                        self.name
                    )
                })?;
                Ok(Load::Open {
                    rate: capacity * factor,
                    to_rate: capacity * factor,
                })
            }
            (None, None, Some(users)) => Ok(Load::Closed {
                users,
                think: self.think_time,
            }),
            _ => bail!(
                "phase {:?}: set exactly one of rate, rate_x_capacity, users",
                self.name
            ),
        }
    }
}

/// Relative weights of the event classes, and who the events are about.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mix {
    /// payment_failed, consent revoked, ticket escalated to high/critical → critical lane.
    pub critical: f64,
    /// deal_won ≥ 1,000,000 minor units → high lane.
    pub high: f64,
    /// contact_updated, small deal_stage_changed, low-severity ticket_opened → standard lane.
    pub standard: f64,
    /// page_viewed, email_opened, email_clicked (standard lane too; weighted apart).
    pub analytics_only: f64,
    pub tenants: u64,
    /// Zipf exponent of tenant popularity (0 = uniform).
    pub tenant_zipf_s: f64,
    pub customers_per_tenant: u64,
    pub customer_zipf_s: f64,
    /// Pad page views' URL so each event is about this many bytes (0 = natural size).
    pub payload_bytes: usize,
}

impl Default for Mix {
    fn default() -> Self {
        Self {
            critical: 5.0,
            high: 5.0,
            standard: 30.0,
            analytics_only: 60.0,
            tenants: 20,
            tenant_zipf_s: 1.1,
            customers_per_tenant: 10_000,
            customer_zipf_s: 1.0,
            payload_bytes: 0,
        }
    }
}

/// How `sync_interval` is set on the nats-server the harness starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StackConfig {
    /// `crm all` in one process, or each role as its own process (`roles`).
    pub processes: Processes,
    /// nats-server `jetstream.sync_interval`: `default` (lazy, 2 min), `always`, or a duration.
    pub sync_interval: String,
    /// `crm.toml` overrides, merged over the committed crm.toml, e.g. `projector.max_batch = 64`.
    pub config: toml::Table,
    /// `CRM_LOG` for the platform's processes.
    pub log: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Processes {
    #[default]
    All,
    Roles,
}

impl Default for StackConfig {
    fn default() -> Self {
        Self {
            processes: Processes::All,
            sync_interval: "default".into(),
            config: toml::Table::new(),
            log: "warn".into(),
        }
    }
}

/// kill -9 a role mid-run and restart it (needs `processes = "roles"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub role: String,
    /// When, from the start of the load.
    #[serde(with = "humantime_serde")]
    pub kill_at: Duration,
    #[serde(with = "humantime_serde")]
    pub restart_after: Duration,
    /// Recovered when the priority lanes' (critical + high) p99 per second is back under this.
    pub recovery_p99_ms: f64,
}

/// Baselines run against the same nats-server in the same run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Baselines {
    /// Raw JetStream: events published to and consumed from a bare stream (0 = skip).
    pub raw_events: usize,
    /// The synchronous architecture, driven like the main load (or by `sync_users`).
    pub sync: bool,
    #[serde(with = "humantime_serde")]
    pub sync_duration: Duration,
    /// Closed model with this many users instead of the main load's shape.
    pub sync_users: Option<usize>,
}

impl Default for Baselines {
    fn default() -> Self {
        Self {
            raw_events: 50_000,
            sync: true,
            sync_duration: Duration::from_secs(20),
            sync_users: None,
        }
    }
}

/// Service-level objectives; each one set is checked at the end and a breach fails the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Slo {
    pub critical_p99_ms: Option<f64>,
    pub high_p99_ms: Option<f64>,
    pub standard_p99_ms: Option<f64>,
    pub max_missing: Option<u64>,
    pub max_error_rate: Option<f64>,
    pub min_throughput_ratio_raw: Option<f64>,
    pub min_throughput_ratio_sync: Option<f64>,
    pub max_critical_p99_overload_ratio: Option<f64>,
    pub max_recovery_s: Option<f64>,
    /// Analytics must have counted every acked event by the end of the drain.
    pub analytics_complete: Option<bool>,
    /// At most this share of critical events overtaken by a later-acked lower-class event
    /// (the inversion figure's `critical vs lower` pair).
    pub max_critical_inversion_share: Option<f64>,
}

impl Scenario {
    pub fn parse(text: &str) -> Result<Self> {
        let scenario: Scenario = toml::from_str(text)?;
        scenario.validate()?;
        Ok(scenario)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("scenario {}", path.display()))
    }

    fn validate(&self) -> Result<()> {
        ensure!(!self.phases.is_empty(), "at least one [[phase]] is needed");
        let mut measured = false;
        for phase in &self.phases {
            ensure!(
                !phase.duration.is_zero(),
                "phase {:?}: duration must be > 0",
                phase.name
            );
            match phase.load(measured.then_some(1.0))? {
                Load::Open { rate, to_rate } => ensure!(
                    rate > 0.0 && to_rate > 0.0 && rate.is_finite() && to_rate.is_finite(),
                    "phase {:?}: rates must be > 0",
                    phase.name
                ),
                Load::Closed { users, .. } => {
                    ensure!(users > 0, "phase {:?}: users must be > 0", phase.name)
                }
            }
            measured |= phase.measure_capacity;
        }
        let mix = &self.mix;
        let weights = [mix.critical, mix.high, mix.standard, mix.analytics_only];
        ensure!(
            weights.iter().all(|w| *w >= 0.0 && w.is_finite()) && weights.iter().sum::<f64>() > 0.0,
            "mix: weights must be ≥ 0 with a positive sum"
        );
        ensure!(
            mix.tenants >= 1 && mix.customers_per_tenant >= 1,
            "mix: tenants and customers_per_tenant must be ≥ 1"
        );
        ensure!(
            mix.tenant_zipf_s >= 0.0 && mix.customer_zipf_s >= 0.0,
            "mix: zipf exponents must be ≥ 0"
        );
        ensure!(
            self.driver.connections >= 1,
            "driver.connections must be ≥ 1"
        );
        ensure!(
            self.driver.max_attempts >= 1,
            "driver.max_attempts must be ≥ 1 (1: never send a refused event again)"
        );
        ensure!(
            (1..=gateway_batch_limit()).contains(&self.driver.batch_size),
            "driver.batch_size must be 1..={}",
            gateway_batch_limit()
        );
        if let Some(fault) = &self.fault {
            ensure!(
                self.stack.processes == Processes::Roles,
                "[fault] needs stack.processes = \"roles\" (a role of its own to kill)"
            );
            ensure!(
                ["gateway", "router", "projector", "analytics"].contains(&fault.role.as_str()),
                "fault.role: one of gateway, router, projector, analytics"
            );
        }
        Ok(())
    }

    /// The whole load's length (phases back to back).
    pub fn load_duration(&self) -> Duration {
        self.phases.iter().map(|p| p.duration).sum()
    }
}

const fn gateway_batch_limit() -> usize {
    gateway::MAX_BATCH_EVENTS
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "t"
[[phase]]
name = "main"
duration = "2s"
rate = 100
"#;

    #[test]
    fn a_minimal_scenario_gets_defaults() {
        let s = Scenario::parse(MINIMAL).expect("parses");
        assert_eq!(s.driver.kind, DriverKind::Http);
        assert_eq!(s.phases.len(), 1);
        assert_eq!(
            s.phases[0].load(None).expect("load"),
            Load::Open {
                rate: 100.0,
                to_rate: 100.0
            }
        );
        assert_eq!(s.drain_timeout, Duration::from_secs(60));
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        for (text, name) in [
            (format!("{MINIMAL}shoe_size = 3\n"), "shoe_size"),
            (format!("{MINIMAL}[mix]\nhat_size = 3\n"), "hat_size"),
            (
                format!("{MINIMAL}[slo]\ncritical_p98_ms = 3\n"),
                "critical_p98_ms",
            ),
            (MINIMAL.replace("rate = 100", "rate = 100\nrat = 2"), "rat"),
        ] {
            let err = format!("{:#}", Scenario::parse(&text).expect_err("refused"));
            assert!(err.contains(name), "{name}: {err}");
        }
    }

    #[test]
    fn a_phase_is_either_open_or_closed() {
        let both = MINIMAL.replace("rate = 100", "rate = 100\nusers = 3");
        let err = format!("{:#}", Scenario::parse(&both).expect_err("refused"));
        assert!(err.contains("exactly one"), "{err}");
        let early = MINIMAL.replace("rate = 100", "rate_x_capacity = 2.0");
        let err = format!("{:#}", Scenario::parse(&early).expect_err("refused"));
        assert!(err.contains("measure_capacity"), "{err}");
    }

    #[test]
    fn admission_options_default_on_and_attempts_must_be_positive() {
        let s = Scenario::parse(MINIMAL).expect("parses");
        assert_eq!(s.driver.max_attempts, 3);
        assert!(s.driver.priority_subjects && s.driver.bulk_pacing);
        let off = format!(
            "{MINIMAL}[driver]\nkind = \"nats\"\npriority_subjects = false\nbulk_pacing = false\nmax_attempts = 1\n"
        );
        let s = Scenario::parse(&off).expect("parses");
        assert!(!s.driver.priority_subjects && !s.driver.bulk_pacing);
        assert_eq!(s.driver.max_attempts, 1);
        let zero = format!("{MINIMAL}[driver]\nmax_attempts = 0\n");
        let err = format!("{:#}", Scenario::parse(&zero).expect_err("refused"));
        assert!(err.contains("max_attempts"), "{err}");
        let slo = format!("{MINIMAL}[slo]\nmax_critical_inversion_share = 0.01\n");
        let s = Scenario::parse(&slo).expect("parses");
        assert_eq!(s.slo.max_critical_inversion_share, Some(0.01));
    }

    #[test]
    fn every_committed_scenario_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("scenarios dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let scenario = Scenario::load(&path).unwrap_or_else(|e| panic!("{e:#}"));
                assert_eq!(
                    Some(scenario.name.as_str()),
                    path.file_stem().and_then(|s| s.to_str())
                );
                names.push(scenario.name);
            }
        }
        names.sort();
        assert_eq!(
            names,
            [
                "burst",
                "fault",
                "overload",
                "overload-nats",
                "paper",
                "ramp",
                "smoke",
                "steady"
            ]
        );
    }
}
