//! Pure analytics throttle: priority-lane latency, backlog growth and an ingest forecast → the permitted analytics rate. No I/O.
//!
//! Modelled on Vector's adaptive request concurrency: a [`Controller`] fed one [`Sample`] per
//! tick returns a [`Decision`] (rate in events per second, a coarse level, and the reason), using
//! additive increase / multiplicative decrease. A [`Holt`] forecast of the ingest rate lets it cut
//! before a burst exceeds capacity, and a starvation guard keeps deferred analytics draining.
//! A [`Pacer`] (a token bucket whose rate follows the decisions) spends the permitted rate.
//! Time comes only from [`Sample::at`] (tokio's clock), so paused-time tests are exact.

mod config;
mod controller;
mod holt;
mod pacer;

pub use config::{ConfigError, ThrottleConfig};
pub use controller::{Controller, Decision, Reason, Sample};
pub use holt::Holt;
pub use pacer::Pacer;

#[cfg(test)]
mod tests;
