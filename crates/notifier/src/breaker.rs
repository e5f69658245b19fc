//! A circuit breaker per endpoint, driven only by tokio's clock (so `tokio::time::pause()` tests
//! it exactly) and free of I/O: the caller asks before a request and reports how it went.
//!
//! Closed: requests pass; `failure_threshold` consecutive failures open it. Open: requests are
//! refused with the time left until `cool_down` has passed. Then half-open: one trial request
//! passes; its success closes the breaker, its failure opens it again. Others are refused while
//! the trial runs, for at most `trial_timeout` (a trial that never reports back counts as lost and
//! the next caller becomes the trial).

use std::time::Duration;
use tokio::time::Instant;

/// What a request was let through as; hand it back to [`CircuitBreaker::on_success`] or
/// [`CircuitBreaker::on_failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Permit {
    /// A request while closed.
    Normal,
    /// The single half-open trial.
    Trial,
}

/// The breaker's state, for inspection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// A change worth telling operators about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Closed or half-open → open.
    Opened,
    /// Half-open → closed.
    Closed,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { trial_deadline: Instant },
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    failure_threshold: u32,
    cool_down: Duration,
    trial_timeout: Duration,
    state: State,
}

impl CircuitBreaker {
    /// `failure_threshold` is at least 1 (0 is taken as 1).
    pub fn new(failure_threshold: u32, cool_down: Duration, trial_timeout: Duration) -> Self {
        Self {
            failure_threshold: failure_threshold.max(1),
            cool_down,
            trial_timeout,
            state: State::Closed { failures: 0 },
        }
    }

    pub fn state(&self) -> BreakerState {
        match self.state {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Let a request through, or say how long until it is worth asking again.
    pub fn try_acquire(&mut self) -> Result<Permit, Duration> {
        let now = Instant::now();
        match self.state {
            State::Closed { .. } => Ok(Permit::Normal),
            State::Open { until } if now < until => Err(until - now),
            State::HalfOpen { trial_deadline } if now < trial_deadline => Err(trial_deadline - now),
            // Cool-down over, or the last trial never reported: this request is the trial.
            State::Open { .. } | State::HalfOpen { .. } => {
                self.state = State::HalfOpen {
                    trial_deadline: now + self.trial_timeout,
                };
                Ok(Permit::Trial)
            }
        }
    }

    /// The request answered well (or at least answered: the endpoint is alive).
    pub fn on_success(&mut self, permit: Permit) -> Option<Transition> {
        match (self.state, permit) {
            (State::Closed { .. }, _) => {
                self.state = State::Closed { failures: 0 };
                None
            }
            (State::HalfOpen { .. }, Permit::Trial) => {
                self.state = State::Closed { failures: 0 };
                Some(Transition::Closed)
            }
            // Results of requests let through before the breaker opened say nothing now.
            _ => None,
        }
    }

    /// The request failed in a way that says the endpoint is unwell (5xx, timeout, refused).
    pub fn on_failure(&mut self, permit: Permit) -> Option<Transition> {
        let now = Instant::now();
        match (self.state, permit) {
            (State::Closed { failures }, _) => {
                let failures = failures.saturating_add(1);
                if failures >= self.failure_threshold {
                    self.state = State::Open {
                        until: now + self.cool_down,
                    };
                    Some(Transition::Opened)
                } else {
                    self.state = State::Closed { failures };
                    None
                }
            }
            (State::HalfOpen { .. }, Permit::Trial) => {
                self.state = State::Open {
                    until: now + self.cool_down,
                };
                Some(Transition::Opened)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL_DOWN: Duration = Duration::from_secs(30);
    const TRIAL_TIMEOUT: Duration = Duration::from_secs(10);

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(3, COOL_DOWN, TRIAL_TIMEOUT)
    }

    fn fail(breaker: &mut CircuitBreaker) -> Option<Transition> {
        let permit = breaker.try_acquire().expect("let through");
        breaker.on_failure(permit)
    }

    /// A breaker that has just opened.
    fn opened() -> CircuitBreaker {
        let mut breaker = breaker();
        for _ in 0..3 {
            let _ = fail(&mut breaker);
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        breaker
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_only() {
        let mut breaker = breaker();
        assert_eq!(fail(&mut breaker), None);
        assert_eq!(fail(&mut breaker), None);
        // A success in between resets the count.
        let permit = breaker.try_acquire().expect("closed");
        assert_eq!(breaker.on_success(permit), None);
        assert_eq!(fail(&mut breaker), None);
        assert_eq!(fail(&mut breaker), None);
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(fail(&mut breaker), Some(Transition::Opened));
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn stays_open_for_the_cool_down_and_says_how_long() {
        let mut breaker = opened();
        assert_eq!(breaker.try_acquire(), Err(COOL_DOWN));
        tokio::time::advance(Duration::from_secs(12)).await;
        assert_eq!(breaker.try_acquire(), Err(Duration::from_secs(18)));
        tokio::time::advance(Duration::from_secs(17)).await;
        assert_eq!(breaker.try_acquire(), Err(Duration::from_secs(1)));
        assert_eq!(breaker.state(), BreakerState::Open);
        // Late results of requests let through before it opened change nothing.
        assert_eq!(breaker.on_success(Permit::Normal), None);
        assert_eq!(breaker.on_failure(Permit::Normal), None);
        assert_eq!(breaker.try_acquire(), Err(Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_lets_one_trial_through_and_closes_on_success() {
        let mut breaker = opened();
        tokio::time::advance(COOL_DOWN).await;
        let trial = breaker.try_acquire();
        assert_eq!(trial, Ok(Permit::Trial));
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        // Everyone else waits for the trial, at most its timeout.
        assert_eq!(breaker.try_acquire(), Err(TRIAL_TIMEOUT));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(breaker.try_acquire(), Err(Duration::from_secs(6)));
        // A straggler from before is not the trial.
        assert_eq!(breaker.on_success(Permit::Normal), None);
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert_eq!(breaker.on_success(Permit::Trial), Some(Transition::Closed));
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.try_acquire(), Ok(Permit::Normal));
        // Closed again with a fresh count: it takes the full threshold to reopen.
        assert_eq!(fail(&mut breaker), None);
        assert_eq!(fail(&mut breaker), None);
        assert_eq!(fail(&mut breaker), Some(Transition::Opened));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_trial_reopens_for_a_full_cool_down() {
        let mut breaker = opened();
        tokio::time::advance(COOL_DOWN + Duration::from_secs(5)).await;
        assert_eq!(breaker.try_acquire(), Ok(Permit::Trial));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(breaker.on_failure(Permit::Trial), Some(Transition::Opened));
        assert_eq!(breaker.state(), BreakerState::Open);
        assert_eq!(breaker.try_acquire(), Err(COOL_DOWN));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_trial_is_replaced_after_its_timeout() {
        let mut breaker = opened();
        tokio::time::advance(COOL_DOWN).await;
        assert_eq!(breaker.try_acquire(), Ok(Permit::Trial));
        tokio::time::advance(TRIAL_TIMEOUT).await;
        assert_eq!(breaker.try_acquire(), Ok(Permit::Trial));
        assert_eq!(breaker.try_acquire(), Err(TRIAL_TIMEOUT));
    }

    #[tokio::test(start_paused = true)]
    async fn a_threshold_of_one_opens_on_the_first_failure() {
        let mut breaker = CircuitBreaker::new(0, COOL_DOWN, TRIAL_TIMEOUT);
        assert_eq!(fail(&mut breaker), Some(Transition::Opened));
    }
}
