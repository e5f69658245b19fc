//! When to try a webhook again: which answers are worth retrying, `Retry-After`, and backoff.

use std::time::{Duration, SystemTime};

/// What an HTTP status says about the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    /// 2xx: the receiver has the event.
    Accepted,
    /// 408, 429, 5xx: the receiver may take it later.
    Retryable,
    /// Anything else (other 4xx, and 3xx since redirects are not followed): it never will.
    Rejected,
}

pub fn classify(status: u16) -> StatusClass {
    match status {
        200..=299 => StatusClass::Accepted,
        408 | 429 | 500..=599 => StatusClass::Retryable,
        _ => StatusClass::Rejected,
    }
}

/// The wait a `Retry-After` value asks for: delay-seconds (`"120"`) or an HTTP-date (a date in
/// the past means now). `None` when it is neither.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Delay before the next delivery of an event whose `delivered`-th delivery failed: what the
/// receiver asked for with `Retry-After`, else exponential backoff with jitter from `base`
/// (the worker runtime's [`bus::worker::backoff`]); either way at most `max`.
pub fn retry_delay(
    retry_after: Option<Duration>,
    delivered: i64,
    base: Duration,
    max: Duration,
) -> Duration {
    match retry_after {
        Some(asked) => asked.min(max),
        None => bus::worker::backoff(base, max, delivered),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        for status in [200, 201, 202, 204, 299] {
            assert_eq!(classify(status), StatusClass::Accepted, "{status}");
        }
        for status in [408, 429, 500, 502, 503, 504, 599] {
            assert_eq!(classify(status), StatusClass::Retryable, "{status}");
        }
        for status in [301, 302, 400, 401, 403, 404, 409, 410, 413, 422] {
            assert_eq!(classify(status), StatusClass::Rejected, "{status}");
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").expect("date");
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        // The obsolete forms a recipient must still accept.
        assert_eq!(
            parse_retry_after("Sunday, 06-Nov-94 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun Nov  6 08:49:39 1994", now),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        for garbage in ["", "-5", "1.5", "soon", "120s", "Sun, 06 Nov 1994"] {
            assert_eq!(parse_retry_after(garbage, now), None, "{garbage:?}");
        }
    }

    #[test]
    fn retry_after_wins_but_is_capped() {
        let (base, max) = (Duration::from_secs(1), Duration::from_secs(300));
        assert_eq!(
            retry_delay(Some(Duration::from_secs(7)), 1, base, max),
            Duration::from_secs(7)
        );
        assert_eq!(
            retry_delay(Some(Duration::from_secs(86_400)), 1, base, max),
            max
        );
        assert_eq!(
            retry_delay(Some(Duration::ZERO), 9, base, max),
            Duration::ZERO
        );
    }

    #[test]
    fn backoff_stays_within_its_bounds() {
        let (base, max) = (Duration::from_secs(1), Duration::from_secs(300));
        for _ in 0..200 {
            let first = retry_delay(None, 1, base, max);
            assert!(first >= base / 2 && first <= base, "{first:?}");
            let fourth = retry_delay(None, 4, base, max);
            assert!(
                fourth >= Duration::from_secs(4) && fourth <= Duration::from_secs(8),
                "{fourth:?}"
            );
            for delivered in [9, 10, 40, i64::MAX] {
                let late = retry_delay(None, delivered, base, max);
                assert!(late <= max, "{delivered}: {late:?}");
            }
            let capped = retry_delay(None, 40, base, max);
            assert!(capped >= max / 2, "{capped:?}");
        }
    }
}
