//! The controller's parameters and their validation.

use std::time::Duration;

use serde::Deserialize;

/// A parameter that cannot be used; [`field`](Self::field) is the config key at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("throttle config `{field}`: {problem}")]
pub struct ConfigError {
    field: &'static str,
    problem: String,
}

impl ConfigError {
    fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }

    /// The config key at fault, e.g. `"decrease_factor"`.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What is wrong with it, including the rejected value.
    pub fn problem(&self) -> &str {
        &self.problem
    }
}

/// Parameters of the [`Controller`](crate::Controller).
///
/// Rates are events per second and carry a `_per_sec` suffix; durations are humantime strings
/// (`"250ms"`, `"5m"`) in config files. Missing keys take the [`Default`] values, unknown keys are
/// rejected. Check a deserialized config with [`validate`](Self::validate), or let
/// [`Controller::try_new`](crate::Controller::try_new) do it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThrottleConfig {
    /// Priority-lane end-to-end p99 latency above which analytics is cut. Default 500 ms.
    #[serde(with = "humantime_serde")]
    pub target_p99: Duration,
    /// How often the caller is expected to call `observe` (one sample per tick). The controller
    /// itself measures elapsed time from the samples' instants; this is the period a driver loop
    /// should use. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// Lowest non-zero rate: a cut that would go below it pauses analytics (rate 0) instead, and
    /// an increase from a pause restarts here. Default 10/s.
    pub min_rate_per_sec: f64,
    /// Highest rate; also the rate the level scale is relative to. Default 1000/s.
    pub max_rate_per_sec: f64,
    /// Added to the rate on each healthy tick (additive increase). Default 50/s.
    pub increase_step_per_sec: f64,
    /// Multiplies the rate on each breached tick (multiplicative decrease), in `[0, 1)`. Default 0.5.
    pub decrease_factor: f64,
    /// Priority backlog growth (messages per second, measured between consecutive samples)
    /// tolerated before cutting. Default 100/s.
    pub backlog_growth_limit_per_sec: f64,
    /// Ingest rate the workers can process, used until (and whenever) no measurement is given
    /// in [`Sample::measured_capacity`](crate::Sample::measured_capacity); a forecast above the
    /// capacity cuts before the burst arrives. Default 2000/s.
    pub capacity_per_sec: f64,
    /// Holt level smoothing in `(0, 1]`; higher follows the ingest rate faster. Default 0.5.
    pub forecast_alpha: f64,
    /// Holt trend smoothing in `(0, 1]`; higher follows changes in slope faster. Default 0.3.
    pub forecast_beta: f64,
    /// How far ahead the ingest forecast compared with the capacity looks. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub forecast_horizon: Duration,
    /// Oldest deferred analytics event age at which the starvation guard applies. Default 5 min.
    #[serde(with = "humantime_serde")]
    pub max_deferral: Duration,
    /// Rate the starvation guard guarantees, at most `max_rate_per_sec`. Default 10/s.
    pub starvation_drain_rate_per_sec: f64,
    /// Number of non-zero levels: level = ceil(rate / max_rate × levels), 0 when paused.
    /// At least 1. Default 4.
    pub levels: u8,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            target_p99: Duration::from_millis(500),
            tick: Duration::from_secs(1),
            min_rate_per_sec: 10.0,
            max_rate_per_sec: 1000.0,
            increase_step_per_sec: 50.0,
            decrease_factor: 0.5,
            backlog_growth_limit_per_sec: 100.0,
            capacity_per_sec: 2000.0,
            forecast_alpha: 0.5,
            forecast_beta: 0.3,
            forecast_horizon: Duration::from_secs(10),
            max_deferral: Duration::from_secs(5 * 60),
            starvation_drain_rate_per_sec: 10.0,
            levels: 4,
        }
    }
}

impl ThrottleConfig {
    /// Checks every parameter; the first problem found names its field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        non_zero("target_p99", self.target_p99)?;
        non_zero("tick", self.tick)?;
        positive("min_rate_per_sec", self.min_rate_per_sec)?;
        positive("max_rate_per_sec", self.max_rate_per_sec)?;
        if self.max_rate_per_sec < self.min_rate_per_sec {
            return Err(ConfigError::new(
                "max_rate_per_sec",
                format!(
                    "must be at least min_rate_per_sec ({}), got {}",
                    self.min_rate_per_sec, self.max_rate_per_sec
                ),
            ));
        }
        positive("increase_step_per_sec", self.increase_step_per_sec)?;
        if !(0.0..1.0).contains(&self.decrease_factor) {
            return Err(ConfigError::new(
                "decrease_factor",
                format!("must be in [0, 1), got {}", self.decrease_factor),
            ));
        }
        non_negative(
            "backlog_growth_limit_per_sec",
            self.backlog_growth_limit_per_sec,
        )?;
        positive("capacity_per_sec", self.capacity_per_sec)?;
        smoothing("forecast_alpha", self.forecast_alpha)?;
        smoothing("forecast_beta", self.forecast_beta)?;
        non_zero("max_deferral", self.max_deferral)?;
        positive(
            "starvation_drain_rate_per_sec",
            self.starvation_drain_rate_per_sec,
        )?;
        if self.starvation_drain_rate_per_sec > self.max_rate_per_sec {
            return Err(ConfigError::new(
                "starvation_drain_rate_per_sec",
                format!(
                    "must be at most max_rate_per_sec ({}), got {}",
                    self.max_rate_per_sec, self.starvation_drain_rate_per_sec
                ),
            ));
        }
        if self.levels == 0 {
            return Err(ConfigError::new("levels", "must be at least 1, got 0"));
        }
        Ok(())
    }
}

fn non_zero(field: &'static str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::new(field, "must be greater than zero, got 0s"));
    }
    Ok(())
}

fn positive(field: &'static str, value: f64) -> Result<(), ConfigError> {
    if !(value.is_finite() && value > 0.0) {
        return Err(ConfigError::new(
            field,
            format!("must be a finite number greater than 0, got {value}"),
        ));
    }
    Ok(())
}

fn non_negative(field: &'static str, value: f64) -> Result<(), ConfigError> {
    if !(value.is_finite() && value >= 0.0) {
        return Err(ConfigError::new(
            field,
            format!("must be a finite number at least 0, got {value}"),
        ));
    }
    Ok(())
}

/// Holt smoothing factors live in `(0, 1]`.
pub(crate) fn smoothing(field: &'static str, value: f64) -> Result<(), ConfigError> {
    if !(value > 0.0 && value <= 1.0) {
        return Err(ConfigError::new(
            field,
            format!("must be in (0, 1], got {value}"),
        ));
    }
    Ok(())
}
