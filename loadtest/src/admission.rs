//! Admission at the front door, as a producer sees it: the gateway's `Retry-After` answers, the
//! priority ingest subject critical and high events are published to, and the bulk back-pressure
//! signal on `crm.control.admission` with the token bucket that paces bulk publishes to the rate
//! it allows.

use crate::{mix::Class, tracker::Run};
use bus::CancellationToken;
use events::{EventType, SubjectError};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

/// Core-NATS subject of the gateway's bulk admission signal (about one message a second).
pub const ADMISSION_SUBJECT: &str = "crm.control.admission";

/// `crm.priority.<tenant>.<type>`: stream CRM_INGEST_PRIORITY, same headers and dedupe ids as
/// `crm.ingest.<tenant>.<type>`.
pub fn priority_subject(tenant: &str, kind: EventType) -> Result<String, SubjectError> {
    // The ingest subject checks the tenant token; the priority subject has the same tail.
    let ingest = events::ingest_subject(tenant, kind)?;
    let tail = ingest.strip_prefix("crm.ingest.").unwrap_or(&ingest);
    Ok(format!("crm.priority.{tail}"))
}

/// Classes a NATS-native producer publishes to the priority subject; the rest is bulk.
pub const fn is_priority(class: Class) -> bool {
    matches!(class, Class::Critical | Class::High)
}

/// Whether the gateway lets bulk in freely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BulkState {
    Open,
    Limited,
}

/// One message on [`ADMISSION_SUBJECT`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdmissionSignal {
    pub at_ms: u64,
    pub bulk: BulkState,
    /// Bulk events per second allowed for all bulk producers together; −1 when open.
    pub bulk_rate: f64,
    pub retry_after_ms: u64,
    /// Why the gateway's controller is where it is.
    #[serde(default)]
    pub reason: LimitReason,
}

/// The gateway's `reason` for its bulk state (an unknown one reads as `other`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitReason {
    #[default]
    Healthy,
    PipelineDelay,
    PublishDelay,
    #[serde(other)]
    Other,
}

impl LimitReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::PipelineDelay => "pipeline_delay",
            Self::PublishDelay => "publish_delay",
            Self::Other => "other",
        }
    }
}

/// A `limited` signal holds this long without a newer one (the gateway sends one a second; a
/// gateway that stopped must not hold bulk back for ever).
pub const SIGNAL_LIFETIME: Duration = Duration::from_secs(3);
/// The bucket holds this much of the allowed rate, so bulk leaves smoothly rather than in bursts.
const BURST: Duration = Duration::from_millis(100);
/// With a limited rate of 0, ask again after this long at most (the signal may open meanwhile).
const MAX_HOLD: Duration = Duration::from_secs(1);

/// Paces bulk sends to the rate the latest `limited` signal allows: a token bucket in its
/// virtual-time form (GCRA: one "theoretical arrival time", integer ns), driven by the caller's
/// clock so it is tested without time passing. A newly limited pacer starts with one send
/// allowed; while limited, idle time earns up to [`BURST`] worth of the rate.
#[derive(Debug, Clone)]
pub struct BulkPacer {
    limited: bool,
    /// ns between sends at the allowed rate; 0 when the rate is 0 (nothing may go).
    interval_ns: u64,
    /// How far ahead of the schedule sends may run (the burst).
    tolerance_ns: u64,
    /// When the next send is due on the schedule.
    due_ns: u64,
    valid_until_ns: u64,
    hold: Duration,
}

impl Default for BulkPacer {
    fn default() -> Self {
        Self::new()
    }
}

fn as_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl BulkPacer {
    /// Open until a `limited` signal arrives.
    pub const fn new() -> Self {
        Self {
            limited: false,
            interval_ns: 0,
            tolerance_ns: 0,
            due_ns: 0,
            valid_until_ns: 0,
            hold: MAX_HOLD,
        }
    }

    /// Take a signal received at `now_ns`.
    pub fn on_signal(&mut self, signal: &AdmissionSignal, now_ns: u64) {
        match signal.bulk {
            BulkState::Open => self.limited = false,
            BulkState::Limited => {
                // A limited signal without a usable rate holds bulk back entirely.
                let rate = if signal.bulk_rate.is_finite() {
                    signal.bulk_rate.max(0.0)
                } else {
                    0.0
                };
                let (interval_ns, burst) = if rate > 0.0 {
                    (
                        ((1e9 / rate) as u64).max(1),
                        ((rate * BURST.as_secs_f64()) as u64).max(1),
                    )
                } else {
                    (0, 1)
                };
                self.interval_ns = interval_ns;
                self.tolerance_ns = interval_ns.saturating_mul(burst - 1);
                if !self.is_limited(now_ns) {
                    // Newly limited: one send now, then the rate.
                    self.due_ns = now_ns;
                }
                self.limited = true;
                self.valid_until_ns = now_ns.saturating_add(as_ns(SIGNAL_LIFETIME));
                self.hold = Duration::from_millis(signal.retry_after_ms)
                    .clamp(Duration::from_millis(10), MAX_HOLD);
            }
        }
    }

    /// Bulk is held to a rate at `now_ns`.
    pub fn is_limited(&self, now_ns: u64) -> bool {
        self.limited && now_ns < self.valid_until_ns
    }

    /// One bulk send at `now_ns`: allowed (its slot taken), or how long until one may be.
    pub fn try_acquire(&mut self, now_ns: u64) -> Result<(), Duration> {
        if !self.is_limited(now_ns) {
            return Ok(());
        }
        if self.interval_ns == 0 {
            return Err(self.hold);
        }
        // Idle time earns at most the burst: the schedule never lags now by more.
        let due = self.due_ns.max(now_ns.saturating_sub(self.tolerance_ns));
        if due <= now_ns {
            self.due_ns = due + self.interval_ns;
            return Ok(());
        }
        let wait = Duration::from_nanos(due - now_ns);
        // Never past the signal's lifetime: it may lapse (open) before the slot comes.
        let lapse = Duration::from_nanos(self.valid_until_ns - now_ns);
        Err(wait.min(lapse))
    }
}

/// A shared pacer: the admission listener feeds it, NATS senders ask it.
pub type SharedPacer = Arc<Mutex<BulkPacer>>;

/// One admission signal as the report keeps it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AdmissionPoint {
    /// Seconds after the run's start (by the signal's own clock).
    pub t_s: f64,
    pub limited: bool,
    /// Allowed bulk events/s while limited.
    pub bulk_rate: Option<f64>,
    pub retry_after_ms: u64,
    #[serde(default)]
    pub reason: LimitReason,
}

/// Listen to [`ADMISSION_SUBJECT`] (subscribed before this returns) until `stop`: feed `pacer`
/// and keep every signal for the report.
pub async fn spawn_listener(
    client: bus::async_nats::Client,
    run: Arc<Run>,
    pacer: SharedPacer,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<Vec<AdmissionPoint>>> {
    let mut signals = client.subscribe(ADMISSION_SUBJECT).await?;
    client.flush().await?;
    Ok(tokio::spawn(async move {
        let mut points = Vec::new();
        loop {
            tokio::select! {
                message = signals.next() => match message {
                    Some(message) => {
                        let Ok(signal) = serde_json::from_slice::<AdmissionSignal>(&message.payload)
                        else {
                            continue;
                        };
                        pacer
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .on_signal(&signal, run.now_ns());
                        let t_s = (signal.at_ms as f64 * 1e6 - run.started_unix_ns as f64) / 1e9;
                        let limited = signal.bulk == BulkState::Limited;
                        points.push(AdmissionPoint {
                            t_s: (t_s * 100.0).round() / 100.0,
                            limited,
                            bulk_rate: limited.then_some(signal.bulk_rate),
                            retry_after_ms: signal.retry_after_ms,
                            reason: signal.reason,
                        });
                    }
                    None => break,
                },
                _ = stop.cancelled() => break,
            }
        }
        points
    }))
}

/// Longest `Retry-After` the driver honours as given (a longer one still ends the event's
/// attempts when it reaches past the phase).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The gateway's exact wait of a refusal, in milliseconds (`Retry-After` counts whole seconds).
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// A `Retry-After` value in delay-seconds; `None` for anything else (HTTP dates included: the
/// gateway sends seconds, and the caller falls back to a default delay).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    parse_count(value).map(|seconds| Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
}

/// A `Retry-After-Ms` value; `None` unless it is all digits.
pub fn parse_retry_after_ms(value: &str) -> Option<Duration> {
    parse_count(value).map(|ms| Duration::from_millis(ms).min(MAX_RETRY_AFTER))
}

fn parse_count(value: &str) -> Option<u64> {
    let value = value.trim();
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // All digits: only overflow fails, which is "very long".
    Some(value.parse::<u64>().unwrap_or(u64::MAX))
}

/// The last segment of a problem+json `type` (`…/overloaded` → `overloaded`), if the body is one.
pub fn problem_kind(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Problem {
        r#type: String,
    }
    let problem: Problem = serde_json::from_slice(body).ok()?;
    let kind = problem.r#type.rsplit('/').next().unwrap_or_default();
    (!kind.is_empty()).then(|| kind.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn limited(rate: f64) -> AdmissionSignal {
        AdmissionSignal {
            at_ms: 0,
            bulk: BulkState::Limited,
            bulk_rate: rate,
            retry_after_ms: 200,
            reason: LimitReason::PipelineDelay,
        }
    }

    const OPEN: AdmissionSignal = AdmissionSignal {
        at_ms: 0,
        bulk: BulkState::Open,
        bulk_rate: -1.0,
        retry_after_ms: 0,
        reason: LimitReason::Healthy,
    };

    /// Sends allowed when asking every `step_ns` from `from_ns` for `count` steps.
    fn allowed(pacer: &mut BulkPacer, from_ns: u64, step_ns: u64, count: u64) -> u64 {
        (0..count)
            .filter(|k| pacer.try_acquire(from_ns + k * step_ns).is_ok())
            .count() as u64
    }

    #[test]
    fn open_lets_everything_through() {
        let mut pacer = BulkPacer::new();
        assert_eq!(allowed(&mut pacer, 0, 1, 10_000), 10_000);
        pacer.on_signal(&limited(100.0), 0);
        pacer.on_signal(&OPEN, MS);
        assert!(!pacer.is_limited(MS));
        assert_eq!(allowed(&mut pacer, MS, 1, 10_000), 10_000);
    }

    #[test]
    fn limited_holds_bulk_to_the_rate() {
        let mut pacer = BulkPacer::new();
        pacer.on_signal(&limited(1000.0), 0);
        // Asking every 0.1 ms for 1 s (10,000 asks): 1,000 allowed, give or take the start.
        let n = allowed(&mut pacer, 0, MS / 10, 10_000);
        assert!((999..=1001).contains(&n), "{n}");
        // A refused send is told how long until the next token: about 1 ms at 1,000/s.
        pacer.on_signal(&limited(1000.0), 1_000 * MS);
        while pacer.try_acquire(1_000 * MS).is_ok() {}
        let wait = pacer.try_acquire(1_000 * MS).expect_err("empty bucket");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(1),
            "{wait:?}"
        );
    }

    #[test]
    fn a_new_rate_applies_from_its_signal_and_zero_holds_everything() {
        let mut pacer = BulkPacer::new();
        pacer.on_signal(&limited(1000.0), 0);
        let _ = allowed(&mut pacer, 0, MS, 1000);
        pacer.on_signal(&limited(100.0), 1_000 * MS);
        let n = allowed(&mut pacer, 1_000 * MS, MS, 1000);
        assert!((99..=111).contains(&n), "{n}");
        pacer.on_signal(&limited(0.0), 2_000 * MS);
        assert_eq!(allowed(&mut pacer, 2_001 * MS, MS, 900), 0);
        assert_eq!(
            pacer.try_acquire(2_999 * MS),
            Err(Duration::from_millis(200)),
            "held back for the signal's retry_after"
        );
        let mut nan = BulkPacer::new();
        nan.on_signal(&limited(f64::NAN), 0);
        assert_eq!(allowed(&mut nan, 0, MS, 100), 0, "no usable rate: hold");
    }

    #[test]
    fn a_limited_signal_lapses_without_a_newer_one() {
        let mut pacer = BulkPacer::new();
        pacer.on_signal(&limited(0.0), 0);
        let lifetime = as_ns(SIGNAL_LIFETIME);
        assert!(pacer.try_acquire(lifetime - 1).is_err());
        assert!(pacer.try_acquire(lifetime).is_ok());
        // A refresh before the lapse keeps it.
        pacer.on_signal(&limited(0.0), lifetime);
        pacer.on_signal(&limited(0.0), 2 * lifetime - 1);
        assert!(pacer.try_acquire(2 * lifetime + 1).is_err());
    }

    #[test]
    fn retry_after_is_delay_seconds() {
        assert_eq!(parse_retry_after("1"), Some(Duration::from_secs(1)));
        assert_eq!(parse_retry_after(" 5 "), Some(Duration::from_secs(5)));
        assert_eq!(parse_retry_after("0"), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after_ms(" 250 "),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_retry_after_ms("0.5"), None);
        assert_eq!(
            parse_retry_after("99999999999999999999999"),
            Some(MAX_RETRY_AFTER)
        );
        for bad in ["", "-1", "1.5", "soon", "Wed, 21 Oct 2015 07:28:00 GMT"] {
            assert_eq!(parse_retry_after(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn problem_kind_is_the_types_last_segment() {
        let body =
            br#"{"type":"https://crm.example/problems/overloaded","title":"x","status":503}"#;
        assert_eq!(problem_kind(body).as_deref(), Some("overloaded"));
        assert_eq!(problem_kind(b"not json"), None);
        assert_eq!(problem_kind(br#"{"type":""}"#), None);
    }

    #[test]
    fn priority_subjects_mirror_ingest_subjects() {
        assert_eq!(
            priority_subject("load001", EventType::PaymentFailed).expect("subject"),
            "crm.priority.load001.payment_failed"
        );
        assert!(priority_subject("bad.tenant", EventType::DealWon).is_err());
        assert!(is_priority(Class::Critical) && is_priority(Class::High));
        assert!(!is_priority(Class::Standard) && !is_priority(Class::AnalyticsOnly));
    }
}
