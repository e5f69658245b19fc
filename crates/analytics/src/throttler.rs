//! The throttler's driver: every tick it gathers the signals (lane health from the workers'
//! reports, backlogs from consumer info, the ingest rate from CRM_INGEST), asks the pure
//! [`Controller`] for a decision, hands the rate to the pacer, pauses or resumes the analytics
//! consumer on the server, and publishes the decision and its metrics.
//!
//! Several analytics instances share the analytics consumer, so one decision must be in force:
//! the instance holding the `throttler` lease ([`bus::lease`]) decides, pauses and resumes, and
//! publishes its decision on `crm.control.throttle`; the others pace their own fetches at the
//! rate it published (each at that rate) and take the lease when the holder stops renewing it.

use crate::{AnalyticsConfig, DURABLE, INGEST_STREAM, signals::HealthBoard};
use bus::{
    Bus, CancellationToken,
    control::{HEALTH_SUBJECT_PREFIX, HealthReport, THROTTLE_SUBJECT, ThrottleReport, unix_ms},
};
use events::Lane;
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};
use throttle::{Controller, Decision, Pacer, Sample};
use tokio::{sync::watch, time::Instant};

/// What the consumer loop shares with the throttler.
#[derive(Debug, Clone)]
pub(crate) struct Shared {
    pub pacer: Arc<Mutex<Pacer>>,
    /// Bumped on every decision, so a consumer waiting on a paused pacer wakes up.
    pub decisions: watch::Receiver<u64>,
}

/// Measured capacity: the workers' processing rate while they had a standard backlog (they were
/// busy, so that rate is what they can do), smoothed.
#[derive(Debug, Default)]
struct CapacityEstimate {
    value: Option<f64>,
}

impl CapacityEstimate {
    fn observe(&mut self, processed_per_sec: f64, saturated: bool) {
        if !(processed_per_sec.is_finite() && processed_per_sec > 0.0) {
            return;
        }
        self.value = match self.value {
            _ if !saturated => self.value.map(|v| v.max(processed_per_sec)),
            None => Some(processed_per_sec),
            Some(v) => Some(0.8 * v + 0.2 * processed_per_sec),
        };
    }
}

/// Everything read in one tick.
#[derive(Debug, Default)]
struct Readings {
    priority_backlog: u64,
    standard_backlog: u64,
    ingest_last_seq: Option<u64>,
    deferred: u64,
    oldest_deferred_age: Option<Duration>,
}

async fn read(bus: &Bus, roles: &[String]) -> Readings {
    let mut readings = Readings::default();
    for role in roles {
        for lane in Lane::ALL {
            match bus.consumer_info(lane.stream(), role).await {
                Ok(info) => {
                    let waiting = info.num_pending + info.num_ack_pending as u64;
                    if lane == Lane::Standard {
                        readings.standard_backlog += waiting;
                    } else {
                        readings.priority_backlog += waiting;
                    }
                }
                Err(err) => tracing::debug!(error = %err, %lane, role, "lane consumer info"),
            }
        }
    }
    match bus.stream_state(INGEST_STREAM).await {
        Ok(state) => readings.ingest_last_seq = Some(state.last_sequence),
        Err(err) => tracing::debug!(error = %err, "ingest stream state"),
    }
    match bus.consumer_info(INGEST_STREAM, DURABLE).await {
        Ok(info) => {
            readings.deferred = info.num_pending + info.num_ack_pending as u64;
            if readings.deferred > 0 {
                // The oldest event not yet counted is the first one after the ack floor.
                match bus
                    .message_time(INGEST_STREAM, info.ack_floor.stream_sequence + 1)
                    .await
                {
                    Ok(Some(stored)) => {
                        let age = time::OffsetDateTime::now_utc() - stored;
                        readings.oldest_deferred_age =
                            Some(Duration::try_from(age).unwrap_or(Duration::ZERO));
                    }
                    Ok(None) => {}
                    Err(err) => tracing::debug!(error = %err, "oldest deferred message"),
                }
            }
        }
        Err(err) => tracing::debug!(error = %err, "analytics consumer info"),
    }
    readings
}

/// Gather `crm.control.health.>` into `board` until `shutdown`.
async fn listen_for_health(bus: Bus, board: HealthBoard, shutdown: CancellationToken) {
    let subject = format!("{HEALTH_SUBJECT_PREFIX}.>");
    let degraded = "throttling on backlogs and forecast only";
    bus::control::follow(&bus, subject, degraded, shutdown, |message| {
        match serde_json::from_slice::<HealthReport>(&message.payload) {
            Ok(report) => board.record(report),
            Err(err) => tracing::debug!(error = %err, "ignoring a malformed health report"),
        }
        std::future::ready(())
    })
    .await;
}

/// The newest decision another instance published, and when it arrived.
type Published = Arc<Mutex<Option<(Instant, ThrottleReport)>>>;

/// Keep `latest` at the newest decision published on `crm.control.throttle` until `shutdown`.
async fn listen_for_decisions(bus: Bus, latest: Published, shutdown: CancellationToken) {
    let (subject, degraded) = (THROTTLE_SUBJECT.to_owned(), "a follower paces on its own");
    bus::control::follow(&bus, subject, degraded, shutdown, |message| {
        if let Ok(report) = serde_json::from_slice::<ThrottleReport>(&message.payload) {
            *latest.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), report));
        }
        std::future::ready(())
    })
    .await;
}

/// The lease that makes one analytics instance the deciding one.
const LEASE: &str = "throttler";

/// Start the throttler; returns what the consumer loop needs. The task runs until `shutdown`.
pub(crate) fn start(
    bus: Bus,
    config: &AnalyticsConfig,
    shutdown: CancellationToken,
) -> Result<Shared, throttle::ConfigError> {
    let controller = Controller::try_new(config.throttle.clone())?;
    let now = Instant::now();
    let burst = (config.max_batch as f64).max(1.0);
    let pacer = Arc::new(Mutex::new(Pacer::new(controller.rate(), burst, now)));
    let (decided, decisions) = watch::channel(0u64);
    let board = HealthBoard::default();
    tokio::spawn(listen_for_health(
        bus.clone(),
        board.clone(),
        shutdown.clone(),
    ));
    let published: Published = Arc::default();
    tokio::spawn(listen_for_decisions(
        bus.clone(),
        published.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(drive(
        bus,
        Heard { board, published },
        config.clone(),
        controller,
        pacer.clone(),
        decided,
        shutdown,
    ));
    Ok(Shared { pacer, decisions })
}

/// What the throttler hears on the control plane: the workers' health, the deciding instance's
/// decisions.
struct Heard {
    board: HealthBoard,
    published: Published,
}

async fn drive(
    bus: Bus,
    heard: Heard,
    config: AnalyticsConfig,
    mut controller: Controller,
    pacer: Arc<Mutex<Pacer>>,
    decided: watch::Sender<u64>,
    shutdown: CancellationToken,
) {
    let Heard { board, published } = heard;
    let tick = controller.config().tick;
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut capacity = CapacityEstimate::default();
    let mut previous_ingest: Option<(Instant, u64)> = None;
    let mut paused = false;
    let instance = bus::control::instance_id("analytics");
    let mut lease = bus::lease::Lease::new(bus.clone(), LEASE, instance.clone());
    let mut lease_warned = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let leading = match lease.hold().await {
            Ok(leading) => leading,
            Err(err) => {
                // No lease bucket (streams not provisioned since it came): decide alone, as one
                // instance always could.
                if !lease_warned {
                    tracing::warn!(error = %err, "no throttler lease; this instance decides on its own (run `crm provision`)");
                    lease_warned = true;
                }
                true
            }
        };
        metrics::gauge!("crm_throttle_leader").set(if leading { 1.0 } else { 0.0 });
        let readings = read(&bus, &config.health_roles).await;
        let now = Instant::now();
        let ingest_rate = match (previous_ingest, readings.ingest_last_seq) {
            (Some((at, seq)), Some(last)) if now > at => {
                last.saturating_sub(seq) as f64 / now.duration_since(at).as_secs_f64()
            }
            _ => f64::NAN, // unknown: left out of the forecast
        };
        if let Some(last) = readings.ingest_last_seq {
            previous_ingest = Some((now, last));
        }
        let health = board.health(&config.health_roles, tick * 3 + Duration::from_secs(1));
        if config.measure_capacity {
            capacity.observe(
                health.processed_per_sec,
                readings.standard_backlog > 0 || health.standard_pending > 0,
            );
        }
        let decision = controller.observe(Sample {
            at: now,
            priority_p99: Duration::from_secs_f64(health.priority_p99_ms.max(0.0) / 1000.0),
            priority_backlog: readings.priority_backlog,
            ingest_rate,
            oldest_deferred_age: readings.oldest_deferred_age,
            measured_capacity: capacity.value,
        });
        // A follower paces at the rate the holder published while it is fresh, else at its own
        // until the lease changes hands.
        let holders = (!leading)
            .then(|| {
                published
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .filter(|(at, report)| {
                        report.instance != instance && now.duration_since(*at) <= tick * 3
                    })
                    .map(|(_, report)| report.rate)
            })
            .flatten();
        pacer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_rate(holders.unwrap_or(decision.rate), now);
        decided.send_modify(|n| *n = n.wrapping_add(1));
        if !leading {
            // The consumer's pause, and the published decision, are the holder's.
            paused = false;
            continue;
        }
        paused = apply_pause(&bus, &config, decision, paused).await;
        let report = ThrottleReport {
            at_ms: unix_ms(),
            instance: instance.clone(),
            rate: decision.rate,
            level: decision.level,
            levels: controller.config().levels,
            reason: decision.reason.as_str().to_owned(),
            ingest_rate: if ingest_rate.is_finite() {
                ingest_rate
            } else {
                0.0
            },
            forecast: decision.forecast,
            capacity: capacity
                .value
                .unwrap_or(controller.config().capacity_per_sec),
            priority_p99_ms: health.priority_p99_ms,
            priority_backlog: readings.priority_backlog,
            deferred: readings.deferred,
            oldest_deferred_age_s: readings
                .oldest_deferred_age
                .map_or(0.0, |a| a.as_secs_f64()),
            consumer_paused: paused,
        };
        observe(&report, decision);
        if let Err(err) = bus
            .publish_control(THROTTLE_SUBJECT.to_owned(), &report)
            .await
        {
            tracing::debug!(error = %err, "publishing the throttle decision failed");
        }
    }
    // Leave the consumer running for whoever comes next; a pause would lapse by itself anyway.
    if paused && let Err(err) = bus.resume_consumer(INGEST_STREAM, DURABLE).await {
        tracing::warn!(error = %err, "resuming the analytics consumer at shutdown failed");
    }
}

/// Level 0 pauses the consumer on the server for `pause_for`, renewed every tick while it lasts
/// (so a crashed throttler's pause lapses by itself); any other level resumes it.
async fn apply_pause(
    bus: &Bus,
    config: &AnalyticsConfig,
    decision: Decision,
    paused: bool,
) -> bool {
    if decision.level == 0 {
        match bus
            .pause_consumer(INGEST_STREAM, DURABLE, config.pause_for)
            .await
        {
            Ok(()) => {
                if !paused {
                    tracing::info!(reason = decision.reason.as_str(), "analytics paused");
                }
                true
            }
            Err(err) => {
                tracing::warn!(error = %err, "pausing the analytics consumer failed");
                paused
            }
        }
    } else if paused {
        match bus.resume_consumer(INGEST_STREAM, DURABLE).await {
            Ok(()) => {
                tracing::info!(rate = decision.rate, "analytics resumed");
                false
            }
            Err(err) => {
                tracing::warn!(error = %err, "resuming the analytics consumer failed");
                true
            }
        }
    } else {
        false
    }
}

/// The decision as metrics and, when the level changes, a log line (one place for both).
fn observe(report: &ThrottleReport, decision: Decision) {
    metrics::gauge!("crm_throttle_analytics_rate").set(report.rate);
    metrics::gauge!("crm_throttle_level").set(f64::from(report.level));
    metrics::gauge!("crm_forecast_ingest_rate").set(report.forecast);
    metrics::gauge!("crm_throttle_ingest_rate").set(report.ingest_rate);
    metrics::gauge!("crm_throttle_capacity_rate").set(report.capacity);
    metrics::gauge!("crm_analytics_deferred_messages").set(report.deferred as f64);
    metrics::gauge!("crm_analytics_oldest_deferred_age_seconds").set(report.oldest_deferred_age_s);
    metrics::counter!("crm_throttle_decisions_total", "reason" => decision.reason.as_str())
        .increment(1);
    tracing::debug!(
        rate = report.rate,
        level = report.level,
        reason = %report.reason,
        ingest = report.ingest_rate,
        forecast = report.forecast,
        capacity = report.capacity,
        p99_ms = report.priority_p99_ms,
        deferred = report.deferred,
        "throttle decision"
    );
}

#[cfg(test)]
mod tests {
    use super::CapacityEstimate;

    #[test]
    fn capacity_follows_saturated_rates_and_only_rises_otherwise() {
        let mut capacity = CapacityEstimate::default();
        capacity.observe(500.0, false);
        assert_eq!(
            capacity.value, None,
            "an idle rate says nothing about capacity"
        );
        capacity.observe(1000.0, true);
        assert_eq!(capacity.value, Some(1000.0));
        capacity.observe(500.0, true);
        assert_eq!(capacity.value, Some(900.0));
        capacity.observe(100.0, false);
        assert_eq!(capacity.value, Some(900.0));
        capacity.observe(2000.0, false);
        assert_eq!(capacity.value, Some(2000.0));
        capacity.observe(f64::NAN, true);
        capacity.observe(0.0, true);
        assert_eq!(capacity.value, Some(2000.0));
    }
}
