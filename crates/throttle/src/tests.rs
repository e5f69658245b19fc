use std::time::Duration;

use proptest::prelude::*;
use tokio::time::{Instant, advance};

use crate::{Controller, Decision, Holt, Pacer, Reason, Sample, ThrottleConfig};

const TICK: Duration = Duration::from_secs(1);

/// Round numbers so every expected rate is exact: 10 → 100 in steps of 10, halving on a breach,
/// and `alpha = beta = 1` makes the forecast an exact linear extrapolation.
fn config() -> ThrottleConfig {
    ThrottleConfig {
        target_p99: Duration::from_millis(100),
        tick: TICK,
        min_rate_per_sec: 10.0,
        max_rate_per_sec: 100.0,
        increase_step_per_sec: 10.0,
        decrease_factor: 0.5,
        backlog_growth_limit_per_sec: 50.0,
        capacity_per_sec: 1000.0,
        forecast_alpha: 1.0,
        forecast_beta: 1.0,
        forecast_horizon: Duration::from_secs(5),
        max_deferral: Duration::from_secs(60),
        starvation_drain_rate_per_sec: 20.0,
        levels: 4,
    }
}

fn controller() -> Controller {
    match Controller::try_new(config()) {
        Ok(controller) => controller,
        Err(err) => panic!("test config is valid: {err}"),
    }
}

/// A sample with every signal healthy, taken now.
fn healthy() -> Sample {
    Sample {
        at: Instant::now(),
        priority_p99: Duration::from_millis(50),
        priority_backlog: 0,
        ingest_rate: 100.0,
        oldest_deferred_age: None,
        measured_capacity: None,
    }
}

fn breach() -> Sample {
    Sample {
        priority_p99: Duration::from_millis(101),
        ..healthy()
    }
}

/// Advances tokio's paused clock by one tick, then observes `sample()` taken at the new now.
async fn tick(controller: &mut Controller, sample: impl FnOnce() -> Sample) -> Decision {
    advance(TICK).await;
    controller.observe(sample())
}

fn rate_and_reason(decision: Decision) -> (f64, u8, Reason) {
    (decision.rate, decision.level, decision.reason)
}

/// Climbs from the initial `min_rate` to `max_rate` (9 healthy ticks).
async fn climb_to_max(controller: &mut Controller) {
    for _ in 0..9 {
        tick(controller, healthy).await;
    }
    assert_eq!(controller.rate(), 100.0);
}

#[tokio::test(start_paused = true)]
async fn starts_at_min_rate_and_climbs_linearly_to_max() {
    let mut controller = controller();
    assert_eq!((controller.rate(), controller.level()), (10.0, 1));
    assert_eq!(controller.decision().reason, Reason::Hold);

    let mut rates = Vec::new();
    for _ in 0..11 {
        let decision = tick(&mut controller, healthy).await;
        assert_eq!(decision.reason, Reason::Healthy);
        rates.push(decision.rate);
    }
    assert_eq!(
        rates,
        [
            20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0, 100.0, 100.0
        ]
    );
    assert_eq!(controller.level(), 4);
}

#[tokio::test(start_paused = true)]
async fn latency_breach_cuts_on_the_first_breached_tick() {
    let mut controller = controller();
    climb_to_max(&mut controller).await;

    // Exactly at target is healthy; the first sample above it cuts.
    let at_target = tick(&mut controller, || Sample {
        priority_p99: Duration::from_millis(100),
        ..healthy()
    })
    .await;
    assert_eq!(rate_and_reason(at_target), (100.0, 4, Reason::Healthy));

    let cut = tick(&mut controller, breach).await;
    assert_eq!(rate_and_reason(cut), (50.0, 2, Reason::LatencyBreach));
    assert_eq!((controller.rate(), controller.level()), (50.0, 2));
}

#[tokio::test(start_paused = true)]
async fn repeated_breaches_pause_at_level_zero() {
    let mut controller = controller();
    climb_to_max(&mut controller).await;

    let mut decisions = Vec::new();
    for _ in 0..5 {
        decisions.push(rate_and_reason(tick(&mut controller, breach).await));
    }
    let breached = Reason::LatencyBreach;
    assert_eq!(
        decisions,
        [
            (50.0, 2, breached),
            (25.0, 1, breached),
            (12.5, 1, breached),
            // 6.25 is below min_rate: paused.
            (0.0, 0, breached),
            (0.0, 0, breached),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn recovery_holds_one_tick_then_climbs_linearly_to_max() {
    let mut controller = controller();
    climb_to_max(&mut controller).await;
    for _ in 0..4 {
        tick(&mut controller, breach).await;
    }
    assert_eq!(controller.rate(), 0.0);

    let hold = tick(&mut controller, healthy).await;
    assert_eq!(rate_and_reason(hold), (0.0, 0, Reason::Hold));

    let mut rates = Vec::new();
    for _ in 0..11 {
        let decision = tick(&mut controller, healthy).await;
        assert_eq!(decision.reason, Reason::Healthy);
        rates.push((decision.rate, decision.level));
    }
    assert_eq!(
        rates,
        [
            (10.0, 1),
            (20.0, 1),
            (30.0, 2),
            (40.0, 2),
            (50.0, 2),
            (60.0, 3),
            (70.0, 3),
            (80.0, 4),
            (90.0, 4),
            (100.0, 4),
            (100.0, 4),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_single_cut_holds_one_tick_and_a_breach_during_hold_cuts_again() {
    let mut controller = controller();
    climb_to_max(&mut controller).await;

    assert_eq!(tick(&mut controller, breach).await.rate, 50.0);
    let hold = tick(&mut controller, healthy).await;
    assert_eq!(rate_and_reason(hold), (50.0, 2, Reason::Hold));
    assert_eq!(
        rate_and_reason(tick(&mut controller, healthy).await),
        (60.0, 3, Reason::Healthy)
    );

    assert_eq!(tick(&mut controller, breach).await.rate, 30.0);
    assert_eq!(
        rate_and_reason(tick(&mut controller, breach).await),
        (15.0, 1, Reason::LatencyBreach)
    );
    assert_eq!(tick(&mut controller, healthy).await.reason, Reason::Hold);
    assert_eq!(tick(&mut controller, healthy).await.rate, 25.0);
}

#[tokio::test(start_paused = true)]
async fn backlog_growth_cuts_but_a_large_steady_backlog_does_not() {
    let mut controller = controller();
    let backlog = |priority_backlog| {
        move || Sample {
            priority_backlog,
            ..healthy()
        }
    };
    // The first sample has nothing to grow from; a big backlog that is not growing, or is
    // shrinking, is healthy.
    controller.observe(backlog(1_000_000)());
    for _ in 0..9 {
        tick(&mut controller, backlog(1_000_000)).await;
    }
    let shrinking = tick(&mut controller, backlog(999_000)).await;
    assert_eq!(rate_and_reason(shrinking), (100.0, 4, Reason::Healthy));
    // Growing at exactly the limit (50/s) is tolerated.
    let at_limit = tick(&mut controller, backlog(999_050)).await;
    assert_eq!(rate_and_reason(at_limit), (100.0, 4, Reason::Healthy));
    // Growing at 51/s cuts.
    let growing = tick(&mut controller, backlog(999_101)).await;
    assert_eq!(rate_and_reason(growing), (50.0, 2, Reason::BacklogGrowth));

    // Growth is per second of elapsed time: +100 over two ticks is 50/s, within the limit.
    advance(TICK).await;
    let decision = tick(&mut controller, backlog(999_201)).await;
    assert_eq!(rate_and_reason(decision), (50.0, 2, Reason::Hold));
}

#[tokio::test(start_paused = true)]
async fn backlog_samples_at_the_same_instant_give_no_growth_reading() {
    let mut controller = controller();
    controller.observe(healthy());
    let decision = controller.observe(Sample {
        priority_backlog: 1_000_000,
        ..healthy()
    });
    assert_eq!(decision.reason, Reason::Healthy);
}

#[tokio::test(start_paused = true)]
async fn forecast_cuts_before_the_measured_ingest_rate_exceeds_capacity() {
    let mut controller = controller();
    climb_to_max(&mut controller).await;
    // Ingest climbs 100/s each second from 100; capacity is 1000, horizon 5 s. With alpha = beta
    // = 1 the forecast is ingest + 5 × 100: 600, 700, 800, 900, 1000 (not above), then 1100.
    let mut forecasts = Vec::new();
    for ingest in [100.0, 200.0, 300.0, 400.0, 500.0, 600.0] {
        let decision = tick(&mut controller, || Sample {
            ingest_rate: ingest,
            ..healthy()
        })
        .await;
        forecasts.push((ingest, decision.forecast, decision.rate, decision.reason));
    }
    assert_eq!(
        forecasts,
        [
            // The first rising sample still sees the flat 100/s trend before it.
            (100.0, 100.0, 100.0, Reason::Healthy),
            (200.0, 700.0, 100.0, Reason::Healthy),
            (300.0, 800.0, 100.0, Reason::Healthy),
            (400.0, 900.0, 100.0, Reason::Healthy),
            (500.0, 1000.0, 100.0, Reason::Healthy),
            (600.0, 1100.0, 50.0, Reason::ForecastOverCapacity),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn smoothed_forecast_also_cuts_before_the_burst() {
    let mut controller = match Controller::try_new(ThrottleConfig {
        forecast_alpha: 0.5,
        forecast_beta: 0.3,
        forecast_horizon: Duration::from_secs(10),
        ..config()
    }) {
        Ok(controller) => controller,
        Err(err) => panic!("valid config: {err}"),
    };
    let mut ingest = 100.0;
    let cut_at = loop {
        ingest += 50.0;
        let decision = tick(&mut controller, || Sample {
            ingest_rate: ingest,
            ..healthy()
        })
        .await;
        assert!(ingest <= 1000.0, "no cut before ingest reached capacity");
        if decision.reason == Reason::ForecastOverCapacity {
            break ingest;
        }
    };
    assert!(cut_at < 1000.0, "cut at measured ingest {cut_at}");
}

#[tokio::test(start_paused = true)]
async fn a_measured_capacity_replaces_the_configured_one() {
    let mut controller = controller();
    // 500/s is far below the configured 1000/s capacity: healthy without a measurement…
    let unmeasured = tick(&mut controller, || Sample {
        ingest_rate: 500.0,
        ..healthy()
    })
    .await;
    assert_eq!(unmeasured.reason, Reason::Healthy);
    // …but over a measured capacity of 400/s.
    let measured = tick(&mut controller, || Sample {
        ingest_rate: 500.0,
        measured_capacity: Some(400.0),
        ..healthy()
    })
    .await;
    assert_eq!(measured.reason, Reason::ForecastOverCapacity);
    // Unusable readings fall back to the configured capacity.
    let steady = || Sample {
        ingest_rate: 500.0,
        ..healthy()
    };
    for reading in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        tick(&mut controller, steady).await; // a steady ingest (no trend); holds after the cut
        let decision = tick(&mut controller, || Sample {
            ingest_rate: 500.0,
            measured_capacity: Some(reading),
            ..healthy()
        })
        .await;
        assert_eq!(decision.reason, Reason::Healthy, "reading {reading}");
    }
}

#[test]
fn holt_after_a_sudden_stop_never_forecasts_a_phantom_burst() {
    let mut holt = match Holt::try_new(0.5, 0.3) {
        Ok(holt) => holt,
        Err(err) => panic!("valid factors: {err}"),
    };
    let tick = Duration::from_millis(200);
    for _ in 0..20 {
        holt.update(4400.0, tick);
    }
    for step in 0..100 {
        holt.update(0.0, tick);
        let forecast = holt.forecast(Duration::from_secs(10));
        assert!(forecast <= 4400.0, "step {step}: {forecast}");
        if step >= 10 {
            assert_eq!(
                forecast,
                0.0,
                "step {step}: the level is {:?}",
                holt.level()
            );
        }
    }
    assert!(holt.level().is_some_and(|level| level >= 0.0));
}

#[tokio::test(start_paused = true)]
async fn pacer_permits_exactly_the_rate_and_follows_changes() {
    let start = Instant::now();
    let mut pacer = Pacer::new(10.0, 5.0, start);
    assert_eq!(pacer.available(start), 0);
    assert_eq!(pacer.wait_time(start), Some(Duration::from_millis(100)));

    advance(Duration::from_millis(300)).await;
    assert_eq!(pacer.available(Instant::now()), 3);
    pacer.take(3, Instant::now());
    assert_eq!(pacer.available(Instant::now()), 0);

    // Idle time earns at most `burst` tokens.
    advance(Duration::from_secs(10)).await;
    assert_eq!(pacer.available(Instant::now()), 5);

    // Taking more than available (a fetch that returned extra) is a debt repaid by waiting.
    pacer.take(7, Instant::now());
    assert_eq!(
        pacer.wait_time(Instant::now()),
        Some(Duration::from_millis(300))
    );

    // A pause stops accrual; the wait has no end until the rate changes.
    pacer.set_rate(0.0, Instant::now());
    advance(Duration::from_secs(60)).await;
    assert_eq!(pacer.wait_time(Instant::now()), None);
    assert_eq!(pacer.rate(), 0.0);

    // Resuming at 100/s: the debt of 2 tokens takes 30 ms to become one whole token.
    pacer.set_rate(100.0, Instant::now());
    assert_eq!(
        pacer.wait_time(Instant::now()),
        Some(Duration::from_millis(30))
    );
    advance(Duration::from_millis(1020)).await;
    assert_eq!(pacer.available(Instant::now()), 5, "capped at burst");
}

#[tokio::test(start_paused = true)]
async fn pacer_over_a_minute_lets_through_rate_times_seconds() {
    let mut pacer = Pacer::new(37.0, 10.0, Instant::now());
    let mut taken = 0;
    for _ in 0..600 {
        advance(Duration::from_millis(100)).await;
        let n = pacer.available(Instant::now());
        pacer.take(n, Instant::now());
        taken += n;
    }
    // 60 s at 37/s, minus at most one token still accruing.
    assert!((2219..=2220).contains(&taken), "{taken}");
    for bad in [f64::NAN, -5.0, f64::INFINITY] {
        pacer.set_rate(bad, Instant::now());
        assert_eq!(pacer.rate(), 0.0, "{bad} is treated as paused");
    }
}

#[tokio::test(start_paused = true)]
async fn starvation_guard_drains_a_paused_controller() {
    let mut controller = controller();
    for _ in 0..2 {
        tick(&mut controller, breach).await;
    }
    assert_eq!(controller.rate(), 0.0);
    let starving = |age| {
        move || Sample {
            oldest_deferred_age: Some(age),
            ..breach()
        }
    };

    let young = tick(&mut controller, starving(Duration::from_secs(59))).await;
    assert_eq!(rate_and_reason(young), (0.0, 0, Reason::LatencyBreach));

    // Still breaching, but the oldest deferred event reached max_deferral.
    for age in [60, 61, 600] {
        let guarded = tick(&mut controller, starving(Duration::from_secs(age))).await;
        assert_eq!(rate_and_reason(guarded), (20.0, 1, Reason::StarvationGuard));
        assert_eq!(controller.rate(), 20.0);
    }

    // Once drained, the rate is what the signals allow again: still breaching, still paused.
    let drained = tick(&mut controller, breach).await;
    assert_eq!(rate_and_reason(drained), (0.0, 0, Reason::LatencyBreach));
}

#[tokio::test(start_paused = true)]
async fn starvation_guard_never_lowers_a_higher_rate() {
    let mut controller = controller();
    climb_to_max(&mut controller).await;
    let decision = tick(&mut controller, || Sample {
        oldest_deferred_age: Some(Duration::from_secs(3600)),
        ..healthy()
    })
    .await;
    assert_eq!(rate_and_reason(decision), (100.0, 4, Reason::Healthy));
}

#[test]
fn default_config_is_valid_and_documented_values_hold() {
    let config = ThrottleConfig::default();
    assert_eq!(config.validate(), Ok(()));
    assert_eq!(config.target_p99, Duration::from_millis(500));
    assert_eq!(config.levels, 4);
    assert!(Controller::try_new(config).is_ok());
}

#[test]
fn config_validation_names_the_field() {
    type Breaks = fn(&mut ThrottleConfig);
    let cases: [(Breaks, &str); 20] = [
        (|c| c.target_p99 = Duration::ZERO, "target_p99"),
        (|c| c.tick = Duration::ZERO, "tick"),
        (|c| c.min_rate_per_sec = 0.0, "min_rate_per_sec"),
        (|c| c.min_rate_per_sec = f64::NAN, "min_rate_per_sec"),
        (|c| c.max_rate_per_sec = f64::INFINITY, "max_rate_per_sec"),
        (|c| c.max_rate_per_sec = 5.0, "max_rate_per_sec"),
        (|c| c.increase_step_per_sec = -1.0, "increase_step_per_sec"),
        (|c| c.decrease_factor = 1.0, "decrease_factor"),
        (|c| c.decrease_factor = -0.1, "decrease_factor"),
        (
            |c| c.backlog_growth_limit_per_sec = -1.0,
            "backlog_growth_limit_per_sec",
        ),
        (|c| c.capacity_per_sec = 0.0, "capacity_per_sec"),
        (|c| c.forecast_alpha = 0.0, "forecast_alpha"),
        (|c| c.forecast_alpha = 1.5, "forecast_alpha"),
        (|c| c.forecast_beta = f64::NAN, "forecast_beta"),
        (|c| c.max_deferral = Duration::ZERO, "max_deferral"),
        (
            |c| c.starvation_drain_rate_per_sec = 0.0,
            "starvation_drain_rate_per_sec",
        ),
        (
            |c| c.starvation_drain_rate_per_sec = 101.0,
            "starvation_drain_rate_per_sec",
        ),
        (|c| c.levels = 0, "levels"),
        // Edges that are valid.
        (|c| c.decrease_factor = 0.0, ""),
        (|c| c.forecast_horizon = Duration::ZERO, ""),
    ];
    for (breaks, field) in cases {
        let mut config = config();
        breaks(&mut config);
        match (config.validate(), field) {
            (Ok(()), "") => {}
            (Err(err), field) => {
                assert_eq!(err.field(), field, "{err}");
                assert!(err.to_string().contains(&format!("`{field}`")), "{err}");
                assert_eq!(
                    Controller::try_new(config).err().map(|err| err.field()),
                    Some(field)
                );
            }
            (Ok(()), field) => panic!("{field} should be rejected"),
        }
    }
}

#[test]
fn config_from_toml_fills_defaults_and_rejects_unknown_keys() {
    let config: ThrottleConfig = match toml::from_str(
        r#"
        target_p99 = "250ms"
        max_deferral = "2m"
        max_rate_per_sec = 500.0
        "#,
    ) {
        Ok(config) => config,
        Err(err) => panic!("valid toml: {err}"),
    };
    assert_eq!(
        config,
        ThrottleConfig {
            target_p99: Duration::from_millis(250),
            max_deferral: Duration::from_secs(120),
            max_rate_per_sec: 500.0,
            ..ThrottleConfig::default()
        }
    );

    let unknown = toml::from_str::<ThrottleConfig>("max_rate = 500.0");
    let err = match unknown {
        Ok(config) => panic!("unknown key accepted: {config:?}"),
        Err(err) => err.to_string(),
    };
    assert!(err.contains("max_rate"), "{err}");
}

#[test]
fn holt_extrapolates_a_line_exactly_with_unit_smoothing() {
    let mut holt = match Holt::try_new(1.0, 1.0) {
        Ok(holt) => holt,
        Err(err) => panic!("{err}"),
    };
    assert_eq!(holt.forecast(TICK), 0.0);
    holt.update(10.0, Duration::ZERO);
    assert_eq!((holt.level(), holt.trend()), (Some(10.0), Some(0.0)));
    // 10 → 30 over 2 s is 10/s.
    holt.update(30.0, Duration::from_secs(2));
    assert_eq!(holt.trend(), Some(10.0));
    assert_eq!(holt.forecast(Duration::from_secs(3)), 60.0);
    // A falling line never forecasts below zero.
    holt.update(0.0, Duration::from_secs(1));
    assert_eq!(holt.forecast(Duration::from_secs(10)), 0.0);
}

#[test]
fn holt_smooths_and_ignores_impossible_values() {
    let mut holt = match Holt::try_new(0.5, 0.5) {
        Ok(holt) => holt,
        Err(err) => panic!("{err}"),
    };
    holt.update(100.0, TICK);
    holt.update(200.0, TICK);
    // level = 0.5·200 + 0.5·100 = 150; trend = 0.5·(150 − 100)/1 + 0.5·0 = 25.
    assert_eq!((holt.level(), holt.trend()), (Some(150.0), Some(25.0)));
    for bad in [f64::NAN, f64::INFINITY, -1.0] {
        holt.update(bad, TICK);
    }
    assert_eq!((holt.level(), holt.trend()), (Some(150.0), Some(25.0)));
    assert_eq!(holt.forecast(Duration::from_secs(2)), 200.0);

    assert_eq!(
        Holt::try_new(0.5, 0.0).err().map(|err| err.field()),
        Some("forecast_beta")
    );
}

#[test]
fn reason_labels_are_snake_case() {
    assert_eq!(
        Reason::ForecastOverCapacity.as_str(),
        "forecast_over_capacity"
    );
    assert_eq!(Reason::StarvationGuard.as_str(), "starvation_guard");
}

fn any_config() -> impl Strategy<Value = ThrottleConfig> {
    (
        0.1..100.0f64,
        1.0..1000.0f64,
        0.1..1000.0f64,
        0.0..1.0f64,
        0.01..=1.0f64,
        0.01..=1.0f64,
        0.01..1.0f64,
        1u8..=10,
        0.0..500.0f64,
    )
        .prop_map(
            |(min, spread, step, factor, alpha, beta, drain, levels, growth)| ThrottleConfig {
                min_rate_per_sec: min,
                max_rate_per_sec: min * spread,
                increase_step_per_sec: step,
                decrease_factor: factor,
                forecast_alpha: alpha,
                forecast_beta: beta,
                starvation_drain_rate_per_sec: drain * min * spread,
                levels,
                backlog_growth_limit_per_sec: growth,
                ..config()
            },
        )
}

/// `(ms since the previous sample, p99 ms, backlog, ingest rate, oldest deferred age s)`.
fn any_sample() -> impl Strategy<Value = (u64, u64, u64, f64, Option<u64>)> {
    (
        0..3000u64,
        0..300u64,
        prop_oneof![0..10_000u64, any::<u64>()],
        prop_oneof![0.0..3000.0f64, any::<f64>()],
        proptest::option::of(0..120u64),
    )
}

proptest! {
    #[test]
    fn rate_and_level_stay_in_bounds(
        config in any_config(),
        samples in proptest::collection::vec(any_sample(), 1..200),
    ) {
        let mut controller = match Controller::try_new(config.clone()) {
            Ok(controller) => controller,
            Err(err) => panic!("generated config is valid: {err}"),
        };
        let floor = config.min_rate_per_sec.min(config.starvation_drain_rate_per_sec);
        let mut at = Instant::now();
        for (gap_ms, p99_ms, backlog, ingest_rate, age_s) in samples {
            at += Duration::from_millis(gap_ms);
            let decision = controller.observe(Sample {
                at,
                priority_p99: Duration::from_millis(p99_ms),
                priority_backlog: backlog,
                ingest_rate,
                oldest_deferred_age: age_s.map(Duration::from_secs),
                measured_capacity: None,
            });
            prop_assert!((0.0..=config.max_rate_per_sec).contains(&decision.rate), "{decision:?}");
            prop_assert!(decision.level <= config.levels, "{decision:?}");
            prop_assert_eq!(decision.level == 0, decision.rate == 0.0, "{:?}", decision);
            prop_assert!(decision.rate == 0.0 || decision.rate >= floor, "{decision:?}");
            prop_assert!(decision.forecast >= 0.0, "{decision:?}");
            if age_s.is_some_and(|age| Duration::from_secs(age) >= config.max_deferral) {
                prop_assert!(decision.rate >= config.starvation_drain_rate_per_sec, "{decision:?}");
            }
            prop_assert_eq!(controller.decision(), decision);
        }
    }
}
