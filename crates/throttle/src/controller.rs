//! The AIMD rate controller.

use std::time::Duration;

use tokio::time::Instant;

use crate::{ConfigError, Holt, ThrottleConfig};

/// One tick's measurements. Take `at` from [`Instant::now`] (tokio's clock) when the other fields
/// are read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// When the measurements were taken; elapsed time between samples comes only from this.
    pub at: Instant,
    /// Priority-lane end-to-end latency p99 over the last tick.
    pub priority_p99: Duration,
    /// Messages waiting in the priority lanes now; its growth since the previous sample matters,
    /// not its size (a large but draining backlog is not a reason to cut analytics).
    pub priority_backlog: u64,
    /// Ingest rate (events per second) measured over the last tick; negative or non-finite values
    /// are left out of the forecast.
    pub ingest_rate: f64,
    /// Age of the oldest deferred analytics event, `None` when nothing is deferred.
    pub oldest_deferred_age: Option<Duration>,
    /// The workers' measured capacity (events per second) when the caller has a reading; the
    /// forecast is compared with it instead of `capacity_per_sec`. Non-finite or non-positive
    /// readings are ignored.
    pub measured_capacity: Option<f64>,
}

/// Why a [`Decision`] has its rate. Breach reasons are checked in declaration order and the first
/// that applies is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// All signals within limits: the rate went up by one step (or stays at the maximum).
    Healthy,
    /// Priority p99 above `target_p99`: the rate was cut.
    LatencyBreach,
    /// Priority backlog grew faster than `backlog_growth_limit_per_sec`: the rate was cut.
    BacklogGrowth,
    /// The ingest forecast at `forecast_horizon` exceeds `capacity_per_sec`: the rate was cut.
    ForecastOverCapacity,
    /// The oldest deferred event reached `max_deferral`, so the rate was raised to
    /// `starvation_drain_rate_per_sec`. Reported only when the guard actually raised the rate,
    /// and it replaces whatever reason the signals gave.
    StarvationGuard,
    /// Healthy, but the previous tick cut the rate, so it is held for one tick before increasing
    /// (avoids flapping). Also the reason before the first sample.
    Hold,
}

impl Reason {
    /// A short snake_case label, e.g. for a metric label or a log field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::LatencyBreach => "latency_breach",
            Self::BacklogGrowth => "backlog_growth",
            Self::ForecastOverCapacity => "forecast_over_capacity",
            Self::StarvationGuard => "starvation_guard",
            Self::Hold => "hold",
        }
    }
}

/// What the controller permits until the next sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Permitted analytics rate in events per second, in `[0, max_rate_per_sec]`; 0 is paused.
    pub rate: f64,
    /// `ceil(rate / max_rate_per_sec × levels)`: 0 when paused, `levels` at full rate.
    pub level: u8,
    pub reason: Reason,
    /// Ingest rate forecast at `forecast_horizon` (events per second), never negative.
    pub forecast: f64,
}

/// A pure AIMD controller for the analytics rate: feed it one [`Sample`] per tick with
/// [`observe`](Self::observe) and apply the returned [`Decision`].
///
/// - Breach (p99 above target, priority backlog growing too fast, or the ingest forecast above
///   capacity): rate × `decrease_factor`; a result below `min_rate_per_sec` pauses (rate 0).
/// - Healthy: rate + `increase_step_per_sec`, at least `min_rate_per_sec` (so a pause restarts
///   there) and at most `max_rate_per_sec`, except on the tick right after a cut ([`Reason::Hold`]).
/// - Starvation guard: while the oldest deferred event is at least `max_deferral` old, the
///   permitted rate is at least `starvation_drain_rate_per_sec`, even during a breach. It is a
///   floor on the output only: the AIMD rate underneath keeps following the signals, so once
///   the deferred events drain the rate returns to what the signals allow.
///
/// It starts at `min_rate_per_sec` (a slow start: health is unknown until samples arrive). It does
/// no I/O and reads no clock; time comes only from [`Sample::at`], so tests drive it exactly with
/// tokio's paused clock.
#[derive(Debug, Clone)]
pub struct Controller {
    config: ThrottleConfig,
    /// The AIMD rate, before the starvation floor.
    aimd_rate: f64,
    /// The previous tick cut the rate, so the next healthy tick holds.
    hold: bool,
    forecaster: Holt,
    /// `(at, priority_backlog)` of the previous sample, to measure backlog growth.
    previous: Option<(Instant, u64)>,
    decision: Decision,
}

impl Controller {
    /// Validates `config` ([`ThrottleConfig::validate`]) and starts at `min_rate_per_sec`.
    pub fn try_new(config: ThrottleConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let forecaster = Holt::try_new(config.forecast_alpha, config.forecast_beta)?;
        let aimd_rate = config.min_rate_per_sec;
        let decision = Decision {
            rate: aimd_rate,
            level: level_of(&config, aimd_rate),
            reason: Reason::Hold,
            forecast: 0.0,
        };
        Ok(Self {
            config,
            aimd_rate,
            hold: false,
            forecaster,
            previous: None,
            decision,
        })
    }

    /// Folds in one tick's sample and returns the new decision (also kept for [`rate`](Self::rate),
    /// [`level`](Self::level) and [`decision`](Self::decision)).
    ///
    /// Backlog growth is measured against the previous sample; the first sample, or one not later
    /// than the previous, gives no growth reading.
    pub fn observe(&mut self, sample: Sample) -> Decision {
        let config = &self.config;
        let elapsed = self.previous.map_or(Duration::ZERO, |(at, _)| {
            sample.at.saturating_duration_since(at)
        });
        let backlog_growth = match self.previous {
            Some((_, backlog)) if !elapsed.is_zero() => {
                Some((sample.priority_backlog as f64 - backlog as f64) / elapsed.as_secs_f64())
            }
            _ => None,
        };
        self.previous = Some((sample.at, sample.priority_backlog));

        self.forecaster.update(sample.ingest_rate, elapsed);
        let forecast = self.forecaster.forecast(config.forecast_horizon);

        let breach = if sample.priority_p99 > config.target_p99 {
            Some(Reason::LatencyBreach)
        } else if backlog_growth.is_some_and(|growth| growth > config.backlog_growth_limit_per_sec)
        {
            Some(Reason::BacklogGrowth)
        } else if forecast > capacity_of(config, sample.measured_capacity) {
            Some(Reason::ForecastOverCapacity)
        } else {
            None
        };

        let mut reason = match breach {
            Some(reason) => {
                let cut = self.aimd_rate * config.decrease_factor;
                self.aimd_rate = if cut < config.min_rate_per_sec {
                    0.0
                } else {
                    cut
                };
                self.hold = true;
                reason
            }
            None if self.hold => {
                self.hold = false;
                Reason::Hold
            }
            None => {
                self.aimd_rate = (self.aimd_rate + config.increase_step_per_sec)
                    .clamp(config.min_rate_per_sec, config.max_rate_per_sec);
                Reason::Healthy
            }
        };

        let mut rate = self.aimd_rate;
        let starving = sample
            .oldest_deferred_age
            .is_some_and(|age| age >= config.max_deferral);
        if starving && rate < config.starvation_drain_rate_per_sec {
            rate = config.starvation_drain_rate_per_sec;
            reason = Reason::StarvationGuard;
        }

        self.decision = Decision {
            rate,
            level: level_of(config, rate),
            reason,
            forecast,
        };
        self.decision
    }

    /// The permitted analytics rate (events per second) from the last decision.
    pub fn rate(&self) -> f64 {
        self.decision.rate
    }

    /// The level from the last decision (0 = paused).
    pub fn level(&self) -> u8 {
        self.decision.level
    }

    /// The last decision; before any sample, `min_rate_per_sec` with [`Reason::Hold`].
    pub fn decision(&self) -> Decision {
        self.decision
    }

    /// The validated configuration; a driver loop ticks every `config().tick`.
    pub fn config(&self) -> &ThrottleConfig {
        &self.config
    }
}

/// The capacity the forecast is compared with: a usable measurement, else the configured one.
fn capacity_of(config: &ThrottleConfig, measured: Option<f64>) -> f64 {
    measured
        .filter(|capacity| capacity.is_finite() && *capacity > 0.0)
        .unwrap_or(config.capacity_per_sec)
}

/// `ceil(rate / max × levels)` within `1..=levels` for any positive rate, 0 when paused.
fn level_of(config: &ThrottleConfig, rate: f64) -> u8 {
    if rate <= 0.0 {
        return 0;
    }
    let levels = f64::from(config.levels);
    // Clamped to 1..=levels first, so the cast cannot truncate.
    (rate / config.max_rate_per_sec * levels)
        .ceil()
        .clamp(1.0, levels) as u8
}
