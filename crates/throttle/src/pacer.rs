//! A token bucket whose rate the controller changes every tick.

use std::time::Duration;

use tokio::time::Instant;

/// Paces work to a rate that may change at any time (the controller's decision).
///
/// Tokens accrue at `rate` per second up to `burst`; [`take`](Self::take) spends them. At rate 0
/// (paused) nothing accrues and [`wait_time`](Self::wait_time) is `None`. A rate change keeps the
/// tokens already earned, so a cut applies from that moment on and never takes back work that was
/// already permitted. Time comes only from the instants passed in (tokio's clock).
#[derive(Debug, Clone)]
pub struct Pacer {
    rate: f64,
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl Pacer {
    /// Starts empty at `rate` events per second, holding at most `burst` tokens (at least 1).
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate: sanitize(rate),
            burst: burst.max(1.0),
            tokens: 0.0,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.updated = now;
    }

    /// Changes the rate from `now` on; tokens earned at the old rate are kept.
    pub fn set_rate(&mut self, rate: f64, now: Instant) {
        self.refill(now);
        self.rate = sanitize(rate);
    }

    /// The current rate in events per second (0 = paused).
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Whole tokens available at `now`.
    pub fn available(&mut self, now: Instant) -> usize {
        self.refill(now);
        // Bounded by `burst`, so the cast cannot overflow for any sane burst.
        self.tokens.floor().max(0.0) as usize
    }

    /// Spends `n` tokens (what was actually taken; it may exceed what was available, e.g. when a
    /// fetch returned more than asked, and then the debt delays the next permit).
    pub fn take(&mut self, n: usize, now: Instant) {
        self.refill(now);
        self.tokens -= n as f64;
    }

    /// How long until one whole token is available: zero when one is, `None` while paused and
    /// empty (only a rate change can end the wait).
    pub fn wait_time(&mut self, now: Instant) -> Option<Duration> {
        self.wait_time_for(1, now)
    }

    /// How long until `n` whole tokens are available (at most `burst`): zero when they are,
    /// `None` while paused and short of them. A consumer that takes work in batches waits for
    /// a batch's worth rather than one event: one transaction per event would spend the store's
    /// writer on commits.
    pub fn wait_time_for(&mut self, n: usize, now: Instant) -> Option<Duration> {
        self.refill(now);
        let want = (n as f64).clamp(1.0, self.burst);
        if self.tokens >= want {
            return Some(Duration::ZERO);
        }
        if self.rate <= 0.0 {
            return None;
        }
        Some(Duration::from_secs_f64((want - self.tokens) / self.rate))
    }
}

fn sanitize(rate: f64) -> f64 {
    if rate.is_finite() && rate > 0.0 {
        rate
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_waited_for_whole() {
        let start = Instant::now();
        let mut pacer = Pacer::new(100.0, 50.0, start);
        let full = pacer.available(start);
        pacer.take(full, start);
        // 20 tokens at 100/s: 200 ms; never more than the burst.
        let wait = pacer.wait_time_for(20, start).expect("not paused");
        assert!((wait.as_secs_f64() - 0.2).abs() < 1e-6, "{wait:?}");
        let capped = pacer.wait_time_for(1_000, start).expect("not paused");
        assert!((capped.as_secs_f64() - 0.5).abs() < 1e-6, "{capped:?}");
        assert_eq!(
            pacer.wait_time_for(20, start + Duration::from_millis(200)),
            Some(Duration::ZERO)
        );
        pacer.set_rate(0.0, start);
        // Paused with 20 in hand: a batch of 21 never comes.
        assert_eq!(pacer.wait_time_for(21, start), None);
    }
}
