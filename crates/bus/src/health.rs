//! Worker-side lane health: end-to-end latency and processed counts per lane over each reporting
//! interval, published as a [`HealthReport`] on `crm.control.health.<role>` every interval.

use crate::{
    Bus, CancellationToken,
    control::{HEALTH_SUBJECT_PREFIX, HealthReport, LaneReport, instance_id, unix_ms},
    headers,
};
use async_nats::HeaderMap;
use hdrhistogram::Histogram;
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

/// Latencies are recorded in microseconds up to an hour, 3 significant digits.
const MAX_LATENCY_US: u64 = 3_600_000_000;

#[derive(Debug)]
struct Window {
    lane: String,
    latency_us: Histogram<u64>,
    processed: u64,
    pending: u64,
}

impl Window {
    fn new(lane: &str) -> Self {
        Self {
            lane: lane.to_owned(),
            // 1 µs .. 1 h at 3 digits is a fixed, valid configuration.
            latency_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!())),
            processed: 0,
            pending: 0,
        }
    }
}

/// Collects one role's lane figures between reports. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct HealthRecorder {
    role: String,
    instance: String,
    state: Mutex<(std::time::Instant, Vec<Window>)>,
}

impl HealthRecorder {
    /// A recorder for `role` covering `lanes` (labels such as `critical` or `analytics`).
    pub fn new(role: &str, lanes: &[&str]) -> Arc<Self> {
        Arc::new(Self {
            role: role.to_owned(),
            instance: instance_id(role),
            state: Mutex::new((
                std::time::Instant::now(),
                lanes.iter().map(|lane| Window::new(lane)).collect(),
            )),
        })
    }

    pub fn role(&self) -> &str {
        &self.role
    }

    fn with_lane(&self, lane: &str, update: impl FnOnce(&mut Window)) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let windows = &mut state.1;
        match windows.iter_mut().find(|w| w.lane == lane) {
            Some(window) => update(window),
            None => {
                let mut window = Window::new(lane);
                update(&mut window);
                windows.push(window);
            }
        }
    }

    /// One message of `lane` processed, `latency` after it entered the platform (if known).
    pub fn record(&self, lane: &str, latency: Option<Duration>) {
        self.with_lane(lane, |window| {
            window.processed += 1;
            if let Some(latency) = latency {
                let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                window
                    .latency_us
                    .saturating_record(micros.clamp(1, MAX_LATENCY_US));
            }
        });
    }

    /// Messages waiting for the consumer of `lane`, as the server last told us.
    pub fn set_pending(&self, lane: &str, pending: u64) {
        self.with_lane(lane, |window| window.pending = pending);
    }

    /// The figures since the previous report, then starts a new interval (pending is kept).
    pub fn report(&self) -> HealthReport {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let interval = state.0.elapsed();
        state.0 = std::time::Instant::now();
        let ms = |micros: u64| micros as f64 / 1000.0;
        let lanes = state
            .1
            .iter_mut()
            .map(|window| {
                let histogram = &window.latency_us;
                let empty = histogram.is_empty();
                let report = LaneReport {
                    lane: window.lane.clone(),
                    processed: window.processed,
                    p50_ms: if empty {
                        0.0
                    } else {
                        ms(histogram.value_at_quantile(0.5))
                    },
                    p99_ms: if empty {
                        0.0
                    } else {
                        ms(histogram.value_at_quantile(0.99))
                    },
                    max_ms: if empty { 0.0 } else { ms(histogram.max()) },
                    pending: window.pending,
                };
                window.latency_us.reset();
                window.processed = 0;
                report
            })
            .collect();
        HealthReport {
            role: self.role.clone(),
            instance: self.instance.clone(),
            at_ms: unix_ms(),
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            lanes,
        }
    }
}

/// Publish `recorder`'s report every `interval` until `shutdown`.
pub async fn report_health(
    bus: Bus,
    recorder: Arc<HealthRecorder>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let subject = format!("{HEALTH_SUBJECT_PREFIX}.{}", recorder.role());
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let report = recorder.report();
                if let Err(err) = bus.publish_control(subject.clone(), &report).await {
                    tracing::debug!(error = %err, "publishing lane health failed");
                }
            }
        }
    }
}

/// Time since the message entered the platform (its `Crm-Ingested-At` header), at `now_ns`.
pub fn e2e_latency(message_headers: Option<&HeaderMap>, now_ns: u128) -> Option<Duration> {
    let ingested: u128 = headers::get(message_headers, headers::INGESTED_AT)?
        .parse()
        .ok()?;
    Some(Duration::from_nanos(
        u64::try_from(now_ns.saturating_sub(ingested)).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_covers_the_interval_then_resets_but_keeps_pending() {
        let recorder = HealthRecorder::new("projector", &["critical", "standard"]);
        for ms in 1..=100 {
            recorder.record("critical", Some(Duration::from_millis(ms)));
        }
        recorder.record("standard", None);
        recorder.set_pending("standard", 42);
        let report = recorder.report();
        assert_eq!(report.role, "projector");
        assert!(report.instance.starts_with("projector-"));
        let critical = &report.lanes[0];
        assert_eq!(
            (critical.lane.as_str(), critical.processed),
            ("critical", 100)
        );
        assert!((critical.p50_ms - 50.0).abs() < 0.1, "{critical:?}");
        assert!((critical.p99_ms - 99.0).abs() < 0.1, "{critical:?}");
        assert!((critical.max_ms - 100.0).abs() < 0.1, "{critical:?}");
        let standard = &report.lanes[1];
        assert_eq!(
            (standard.processed, standard.pending, standard.p99_ms),
            (1, 42, 0.0)
        );

        let next = recorder.report();
        assert_eq!(next.lanes[0].processed, 0);
        assert_eq!(next.lanes[0].p99_ms, 0.0);
        assert_eq!(next.lanes[1].pending, 42);
    }

    #[test]
    fn unknown_lanes_are_added_and_latency_comes_from_the_header() {
        let recorder = HealthRecorder::new("analytics", &[]);
        recorder.record("analytics", Some(Duration::from_secs(7200)));
        let report = recorder.report();
        assert_eq!(report.lanes.len(), 1);
        assert!(report.lanes[0].max_ms >= 3_599_000.0, "clamped to an hour");

        let mut map = HeaderMap::new();
        map.insert(headers::INGESTED_AT, "1000000000");
        assert_eq!(
            e2e_latency(Some(&map), 3_500_000_000),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(e2e_latency(None, 1), None);
        map.insert(headers::INGESTED_AT, "soon");
        assert_eq!(e2e_latency(Some(&map), 1), None);
    }
}
