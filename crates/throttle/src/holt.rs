//! Holt double exponential smoothing (level + trend) for irregularly spaced samples.

use std::time::Duration;

use crate::config::{ConfigError, smoothing};

/// Holt's linear trend method: a smoothed level (never below zero: the series is a rate) and a
/// smoothed trend (units per second).
///
/// The trend is a per-second slope so samples need not be evenly spaced; `alpha` and `beta` apply
/// per sample, so they mean the same thing only while samples arrive at a roughly regular tick.
/// With `alpha = beta = 1` the forecast is an exact linear extrapolation of the last two samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Holt {
    alpha: f64,
    beta: f64,
    /// `(level, trend per second)`; `None` until the first value.
    state: Option<(f64, f64)>,
}

impl Holt {
    /// Smoothing factors must be in `(0, 1]`; errors name them `forecast_alpha` and
    /// `forecast_beta`, the [`ThrottleConfig`](crate::ThrottleConfig) keys they come from.
    pub fn try_new(alpha: f64, beta: f64) -> Result<Self, ConfigError> {
        smoothing("forecast_alpha", alpha)?;
        smoothing("forecast_beta", beta)?;
        Ok(Self {
            alpha,
            beta,
            state: None,
        })
    }

    /// Folds in `value` observed `dt` after the previous one.
    ///
    /// The first value sets the level with a zero trend. A negative or non-finite value is ignored
    /// (a rate cannot be either), and a zero `dt` updates only the level, since no slope can be
    /// measured over no time.
    pub fn update(&mut self, value: f64, dt: Duration) {
        if !(value.is_finite() && value >= 0.0) {
            return;
        }
        let Some((level, trend)) = self.state else {
            self.state = Some((value, 0.0));
            return;
        };
        let secs = dt.as_secs_f64();
        let projected = level + trend * secs;
        // The series is a rate: a level below zero means nothing, and letting it go there after
        // a sudden drop makes the trend swing back positive and forecast a phantom burst.
        let new_level = (self.alpha * value + (1.0 - self.alpha) * projected).max(0.0);
        let new_trend = if secs > 0.0 {
            self.beta * (new_level - level) / secs + (1.0 - self.beta) * trend
        } else {
            trend
        };
        // Extreme inputs could overflow; restart from the value rather than carry infinities.
        self.state = if new_level.is_finite() && new_trend.is_finite() {
            Some((new_level, new_trend))
        } else {
            Some((value, 0.0))
        };
    }

    /// The value expected `horizon` after the last update, never below 0; 0 before any value.
    pub fn forecast(&self, horizon: Duration) -> f64 {
        match self.state {
            // Level and trend are finite, so this is never NaN; clamp turns overflow into MAX.
            Some((level, trend)) => (level + trend * horizon.as_secs_f64()).clamp(0.0, f64::MAX),
            None => 0.0,
        }
    }

    /// The smoothed current value, if any value has been seen.
    pub fn level(&self) -> Option<f64> {
        self.state.map(|(level, _)| level)
    }

    /// The smoothed slope in units per second, if any value has been seen.
    pub fn trend(&self) -> Option<f64> {
        self.state.map(|(_, trend)| trend)
    }
}
