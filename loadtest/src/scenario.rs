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
    /// Client retries: a share of acked events sent again later with the same idempotency key
    /// and a new event id.
    #[serde(default, rename = "retry")]
    pub retries: Vec<Retry>,
    #[serde(default)]
    pub baselines: Baselines,
    #[serde(default)]
    pub slo: Slo,
    /// Critical events from a client of its own beside the load (`crate::probe`).
    #[serde(default)]
    pub critical_probe: crate::probe::ProbeConfig,
}

fn default_drain() -> Duration {
    Duration::from_secs(60)
}

fn default_seed() -> u64 {
    1
}

/// A scenario as written, or its `[short]` form (CI's chaos matrix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Variant {
    #[default]
    Full,
    Short,
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
    /// The priority path for critical and high events: `nats` publishes them to
    /// `crm.priority.<tenant>.<type>` over a connection of their own, bulk to `crm.ingest.…`;
    /// `http` sends them to the gateway's priority door when it has one (its own connections).
    /// False: everything by the bulk path.
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
    /// Share (0..1) of events sent invalid (no customer id): they pass no validation, so the
    /// router dead-letters them with reason `invalid_event`. Only the NATS driver can send them
    /// (the gateway refuses them with a 400).
    pub invalid_share: f64,
    /// Share (0..1) of events about the customer `poison`, whom a database trigger the harness
    /// installs refuses: valid events the store rejects, dead-lettered with `store_rejected`.
    pub poison_share: f64,
    /// Every event carries an idempotency key (`k-<n>`), which retries (`[[retry]]`) reuse.
    pub idempotency_keys: bool,
    /// Tenant `n mod tenants`, idempotency key `k-<n div tenants>`: each key is used once by every
    /// tenant, back to back (idempotency must be per tenant).
    pub same_key_across_tenants: bool,
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
            invalid_share: 0.0,
            poison_share: 0.0,
            idempotency_keys: false,
            same_key_across_tenants: false,
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
    /// The store: SQLite in the run's temp dir, or a throwaway PostgreSQL database reached
    /// through a TCP proxy the harness owns (so a fault can cut it).
    pub store: StoreKind,
    /// Stream definition overrides, by stream name, in the server's JSON field names (e.g.
    /// `[stack.streams.CRM_LANE_STANDARD] max_bytes = 65536`): the harness provisions an edited
    /// copy of `nats/` with `crm provision --definitions`.
    pub streams: toml::Table,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    #[default]
    Sqlite,
    Postgres,
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
            store: StoreKind::Sqlite,
            streams: toml::Table::new(),
        }
    }
}

/// The roles a fault can kill (each runs as its own process with `processes = "roles"`).
pub const ROLES: [&str; 5] = ["gateway", "router", "projector", "analytics", "notifier"];

/// What a fault does at `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// kill -9 `role`, start it again after `down_for`.
    #[default]
    KillRole,
    /// SIGTERM nats-server, start it again after `down_for` on the same port and store.
    RestartNats,
    /// kill -9 nats-server, start it again after `down_for` on the same port and store.
    KillNats,
    /// Cut the store's TCP proxy (open connections closed, new ones dropped) for `down_for`
    /// (needs `stack.store = "postgres"`).
    StoreDown,
    /// `crm provision` with the committed definitions: the operator undoes
    /// `[stack.streams]` (e.g. makes room in a DLQ that filled).
    RestoreStreams,
}

impl FaultKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::KillRole => "kill_role",
            Self::RestartNats => "restart_nats",
            Self::KillNats => "kill_nats",
            Self::StoreDown => "store_down",
            Self::RestoreStreams => "restore_streams",
        }
    }
}

/// One fault mid-run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    #[serde(default)]
    pub kind: FaultKind,
    /// `kill_role`: which role.
    #[serde(default)]
    pub role: Option<String>,
    /// When, from the start of the load.
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    /// How long the process stays down or the store cut (`restore_streams`: unused).
    #[serde(with = "humantime_serde", default)]
    pub down_for: Duration,
    /// Recovered when the priority lanes' (critical + high) p99 per second is back under this.
    pub recovery_p99_ms: f64,
}

/// A group of client retries: `share` of the acked events are sent again `after` their ack, with
/// the same tenant, idempotency key and payload and a new event id. Within the ingest stream's
/// duplicate window the retry is answered `duplicate: true`; after it the retry is stored and
/// routed again, and the store's ledger (tenant, key) must keep it from having a second effect.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    pub name: String,
    pub share: f64,
    #[serde(with = "humantime_serde")]
    pub after: Duration,
    /// Whether the retry is expected to fall inside the duplicate window (answered
    /// `duplicate: true`) or after it (stored again).
    pub within_window: bool,
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
    /// Critical p99 (intended send → projector commit) of the probe's events: a client of its
    /// own, beside the load (`[critical_probe]`).
    pub probe_critical_p99_ms: Option<f64>,
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
    /// Effects in the store beyond one per (tenant, idempotency key) processed (needs the store
    /// check, i.e. a platform the harness started).
    pub max_duplicate_effects: Option<u64>,
    /// Dead letters are exactly the events meant to fail (`invalid_share` → `invalid_event`,
    /// `poison_share` → `store_rejected`) and nothing else.
    pub dead_letters_as_expected: Option<bool>,
    /// The lane streams hold no message after the drain (they are interest streams).
    pub lanes_empty: Option<bool>,
    /// CRM_INGEST holds no more than `[retention].high_water` of its max_bytes after the drain.
    pub ingest_within_high_water: Option<bool>,
    /// The fault left its mark (lane refusals, DLQ write failures, the projector waiting for the
    /// store, retries stored again after the window, …): a row whose fault did not happen
    /// cannot pass.
    pub fault_observed: Option<bool>,
}

impl Scenario {
    pub fn parse(text: &str) -> Result<Self> {
        Self::parse_variant(text, Variant::Full)
    }

    pub fn load(path: &Path) -> Result<Self> {
        Self::load_variant(path, Variant::Full)
    }

    /// The scenario in `path`, or its short form: the file's `[short]` table merged over it
    /// (tables key by key, anything else replaced, `[[phase]]` lists included).
    pub fn load_variant(path: &Path, variant: Variant) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse_variant(&text, variant).with_context(|| format!("scenario {}", path.display()))
    }

    pub fn parse_variant(text: &str, variant: Variant) -> Result<Self> {
        let mut table: toml::Table = toml::from_str(text)?;
        let short = match table.remove("short") {
            None => None,
            Some(toml::Value::Table(short)) => Some(short),
            Some(_) => bail!("[short] must be a table"),
        };
        if variant == Variant::Short {
            let short = short.context("this scenario has no [short] form")?;
            crate::stack::merge_toml(&mut table, &short);
        }
        let scenario: Scenario = toml::Value::Table(table).try_into()?;
        scenario.validate()?;
        Ok(scenario)
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
        for (name, share) in [
            ("invalid_share", mix.invalid_share),
            ("poison_share", mix.poison_share),
        ] {
            ensure!((0.0..=1.0).contains(&share), "mix.{name} must be in 0..=1");
        }
        ensure!(
            mix.invalid_share == 0.0 || self.driver.kind == DriverKind::Nats,
            "mix.invalid_share needs driver.kind = \"nats\" (the gateway refuses invalid events)"
        );
        ensure!(
            mix.tenants <= MAX_TENANTS,
            "mix.tenants must be ≤ {MAX_TENANTS}"
        );
        ensure!(
            !(mix.same_key_across_tenants && mix.idempotency_keys),
            "mix: same_key_across_tenants and idempotency_keys are two key schemes; set one"
        );
        ensure!(
            !mix.same_key_across_tenants || mix.tenants >= 2,
            "mix.same_key_across_tenants needs at least 2 tenants"
        );
        let mut retry_share = 0.0;
        for retry in &self.retries {
            ensure!(
                retry.share > 0.0 && retry.share <= 1.0,
                "retry {:?}: share must be in (0, 1]",
                retry.name
            );
            retry_share += retry.share;
        }
        ensure!(
            retry_share <= 1.0,
            "the [[retry]] groups' shares add up to more than 1"
        );
        ensure!(
            self.retries.is_empty() || mix.idempotency_keys,
            "[[retry]] needs mix.idempotency_keys = true (a retry reuses its event's key)"
        );
        for name in self.stack.streams.keys() {
            ensure!(
                self.stack.streams[name].is_table(),
                "stack.streams.{name} must be a table of the stream's JSON fields"
            );
        }
        if let Some(fault) = &self.fault {
            match fault.kind {
                FaultKind::KillRole => {
                    ensure!(
                        self.stack.processes == Processes::Roles,
                        "a kill_role [fault] needs stack.processes = \"roles\" (a role of its own to kill)"
                    );
                    let role = fault.role.as_deref().unwrap_or_default();
                    ensure!(
                        ROLES.contains(&role),
                        "fault.role: one of {}",
                        ROLES.join(", ")
                    );
                }
                FaultKind::StoreDown => ensure!(
                    self.stack.store == StoreKind::Postgres,
                    "a store_down [fault] needs stack.store = \"postgres\" (the harness cuts its proxy)"
                ),
                FaultKind::RestartNats | FaultKind::KillNats | FaultKind::RestoreStreams => {}
            }
            ensure!(
                fault.kind == FaultKind::KillRole || fault.role.is_none(),
                "fault.role is for kind = \"kill_role\""
            );
        }
        Ok(())
    }

    /// The whole load's length (phases back to back).
    pub fn load_duration(&self) -> Duration {
        self.phases.iter().map(|p| p.duration).sum()
    }
}

/// Tenants a run can address (the tracker keeps each event's tenant in 12 bits).
pub const MAX_TENANTS: u64 = 4096;

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
                "paper-postgres",
                "ramp",
                "smoke",
                "soak",
                "steady"
            ]
        );
    }

    #[test]
    fn every_chaos_row_parses_in_both_forms_and_holds_the_matrix_invariants() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/chaos");
        let files = crate::chaos::row_files(&dir).expect("rows");
        assert!(files.len() >= 15, "{files:?}");
        for path in files {
            for variant in [Variant::Full, Variant::Short] {
                let scenario = Scenario::load_variant(&path, variant)
                    .unwrap_or_else(|e| panic!("{variant:?}: {e:#}"));
                assert_eq!(
                    Some(scenario.name.as_str()),
                    path.file_stem().and_then(|s| s.to_str())
                );
                let slo = &scenario.slo;
                assert_eq!(slo.max_missing, Some(0), "{}", scenario.name);
                assert_eq!(slo.max_duplicate_effects, Some(0), "{}", scenario.name);
                assert_eq!(
                    slo.dead_letters_as_expected,
                    Some(true),
                    "{}",
                    scenario.name
                );
                assert_eq!(slo.lanes_empty, Some(true), "{}", scenario.name);
                assert_eq!(slo.fault_observed, Some(true), "{}", scenario.name);
                if variant == Variant::Short {
                    let load = scenario.load_duration().as_secs();
                    assert!((10..=25).contains(&load), "{}: {load} s", scenario.name);
                }
            }
        }
    }

    #[test]
    fn the_short_form_is_merged_over_the_scenario() {
        let text = format!(
            "{MINIMAL}[stack.streams.CRM_DLQ]\nmax_bytes = 1\n\
             [fault]\nkind = \"kill_nats\"\nat = \"20s\"\ndown_for = \"5s\"\nrecovery_p99_ms = 100\n\
             [short]\nphase = [{{ name = \"s\", duration = \"1s\", rate = 5 }}]\n\
             fault = {{ at = \"2s\" }}\n\
             [short.stack.streams.CRM_INGEST]\nduplicate_window = 5\n"
        );
        let full = Scenario::parse_variant(&text, Variant::Full).expect("full");
        assert_eq!(full.phases[0].name, "main");
        assert_eq!(
            full.fault.as_ref().map(|f| f.at),
            Some(Duration::from_secs(20))
        );
        assert!(!full.stack.streams.contains_key("CRM_INGEST"));
        let short = Scenario::parse_variant(&text, Variant::Short).expect("short");
        assert_eq!(short.phases.len(), 1);
        assert_eq!(short.phases[0].name, "s");
        let fault = short.fault.expect("fault");
        assert_eq!(
            (fault.kind, fault.at, fault.down_for),
            (
                FaultKind::KillNats,
                Duration::from_secs(2),
                Duration::from_secs(5)
            ),
            "a table is merged key by key"
        );
        assert!(short.stack.streams.contains_key("CRM_DLQ"));
        assert!(short.stack.streams.contains_key("CRM_INGEST"));
        let err = Scenario::parse_variant(MINIMAL, Variant::Short).expect_err("no short form");
        assert!(format!("{err:#}").contains("no [short] form"), "{err:#}");
    }

    #[test]
    fn faults_and_shares_are_checked_against_the_stack() {
        let with = |extra: &str| format!("{MINIMAL}{extra}");
        for (text, expected) in [
            (
                with("[fault]\nrole = \"projector\"\nat = \"1s\"\nrecovery_p99_ms = 1\n"),
                "processes = \"roles\"",
            ),
            (
                with(
                    "[stack]\nprocesses = \"roles\"\n[fault]\nrole = \"janitor\"\nat = \"1s\"\nrecovery_p99_ms = 1\n",
                ),
                "fault.role",
            ),
            (
                with("[fault]\nkind = \"store_down\"\nat = \"1s\"\nrecovery_p99_ms = 1\n"),
                "postgres",
            ),
            (with("[mix]\ninvalid_share = 0.1\n"), "nats"),
            (with("[mix]\npoison_share = 2.0\n"), "poison_share"),
            (
                with(
                    "[[retry]]\nname = \"r\"\nshare = 0.1\nafter = \"1s\"\nwithin_window = true\n",
                ),
                "idempotency_keys",
            ),
        ] {
            let err = format!("{:#}", Scenario::parse(&text).expect_err(expected));
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }
}
