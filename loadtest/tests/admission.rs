//! The driver against admission at the front door: refusals with `Retry-After` are sent again
//! with the same event, a bounded number of times, and what is never acked is shed (not an
//! error); over NATS, critical and high go to the priority subject and bulk waits for the
//! admission signal's rate.

mod common;

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderValue, StatusCode, header::RETRY_AFTER},
    response::{IntoResponse, Response},
    routing::post,
};
use bus::{Bus, CancellationToken, ConnectOptions, async_nats::jetstream};
use crm_load::{
    admission::{self, AdmissionSignal, BulkPacer, BulkState, SharedPacer},
    driver::{Driver, PhaseContext, Target, run_phase},
    goodput,
    mix::{Class, tenant_id},
    scenario::{DriverConfig, DriverKind, Load, Mix},
    tracker::{ERROR, REFUSED, Run},
};
use events::EventType;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

/// Every request the stub saw, by event id: the event's type, the bodies sent.
#[derive(Default)]
struct Seen {
    by_id: Mutex<HashMap<String, (EventType, Vec<Bytes>)>>,
}

fn refuse(retry_after: Option<&'static str>) -> Response {
    let body = r#"{"type":"https://crm-events.example/problems/overloaded","title":"Overloaded","status":503,"detail":"bulk is shed"}"#;
    let mut response = (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static(seconds));
    }
    response
}

/// Priority types are accepted; contact and deal-stage updates on their second attempt; ticket
/// openings are refused with a delay longer than the phase; page views and opened emails are
/// always refused (retry at once); clicked emails get a 503 without `Retry-After` (an error).
async fn ingest(State(seen): State<Arc<Seen>>, body: Bytes) -> Response {
    let Ok(event) = events::decode(&body, events::Encoding::Json) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let Some(kind) = EventType::of(&event) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let attempt = {
        let mut by_id = seen.by_id.lock().expect("lock");
        let entry = by_id
            .entry(event.event_id.clone())
            .or_insert_with(|| (kind, Vec::new()));
        entry.1.push(body.clone());
        entry.1.len()
    };
    match kind {
        EventType::ContactUpdated | EventType::DealStageChanged if attempt == 1 => {
            refuse(Some("0"))
        }
        EventType::TicketOpened => refuse(Some("60")),
        EventType::PageViewed | EventType::EmailOpened => refuse(Some("0")),
        EventType::EmailClicked => refuse(None),
        _ => StatusCode::ACCEPTED.into_response(),
    }
}

async fn drive_http(load: Load) -> (Arc<Run>, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let addr = common::serve(
        Router::new()
            .route("/v1/events", post(ingest))
            .with_state(Arc::clone(&seen)),
    )
    .await;
    let config = DriverConfig {
        kind: DriverKind::Http,
        connections: 8,
        ..DriverConfig::default()
    };
    assert_eq!(config.max_attempts, 3);
    let target = Target::Http {
        base_url: format!("http://{addr}"),
        priority_url: None,
        keys: vec!["k".into()],
    };
    let run = Arc::new(Run::new(21, 30));
    common::one_phase(&config, target, &run, 3, load, Duration::from_secs(1)).await;
    (run, seen)
}

/// What the stub saw must be what the harness accounted, event by event.
fn check_refusals(run: &Run, seen: &Seen) {
    let total = run.next_index.load(Relaxed);
    let by_id = seen.by_id.lock().expect("lock");
    assert_eq!(by_id.len() as u64, total, "every generated event was sent");
    let (mut refusals, mut retries, mut max_attempts) = (0, 0, 0);
    for index in 0..total {
        let view = run.slots.view(index).expect("slot");
        let id = run.event_id(index, view.intended_ns);
        let (kind, bodies) = by_id.get(&id).expect("the stub saw it");
        let attempts = bodies.len();
        assert!((1..=3).contains(&attempts), "{id}: {attempts} attempts");
        assert!(
            bodies.iter().all(|b| *b == bodies[0]),
            "{id}: a retry is the same event"
        );
        max_attempts = max_attempts.max(attempts);
        retries += attempts as u64 - 1;
        match kind {
            EventType::ContactUpdated | EventType::DealStageChanged => {
                // Acked on its second attempt, unless the phase ended first: then shed.
                refusals += 1;
                assert_ne!(view.flags & REFUSED, 0, "{id}");
                assert_eq!(view.acked(), attempts == 2, "{id}");
                assert_eq!(view.shed(), attempts == 1, "{id}");
            }
            EventType::TicketOpened => {
                refusals += 1;
                assert_eq!(attempts, 1, "{id}: its delay reaches past the phase");
                assert!(view.shed() && !view.acked(), "{id}");
            }
            EventType::PageViewed | EventType::EmailOpened => {
                refusals += attempts as u64;
                assert!(view.shed() && !view.acked(), "{id}");
            }
            EventType::EmailClicked => {
                assert_eq!(attempts, 1, "{id}: no Retry-After, no retry");
                assert_ne!(view.flags & ERROR, 0, "{id}");
                assert!(!view.shed(), "{id}: an error is not shed");
            }
            _ => {
                assert!(admission::is_priority(view.class), "{id}");
                assert!(view.acked() && view.flags & REFUSED == 0, "{id}");
            }
        }
    }
    assert_eq!(
        max_attempts, 3,
        "page views were refused to the last attempt"
    );
    assert_eq!(run.refusals.load(Relaxed), refusals);
    assert_eq!(run.retries.load(Relaxed), retries);
    assert_eq!(
        run.sent.load(Relaxed),
        total,
        "a retry is not another event"
    );
    let kinds = run.refusal_kinds.lock().expect("lock").clone();
    assert_eq!(kinds.get("overloaded"), Some(&refusals), "{kinds:?}");
    assert_eq!(kinds.len(), 1, "{kinds:?}");
    assert_eq!(
        run.errors.load(Relaxed),
        by_id
            .values()
            .filter(|(k, _)| *k == EventType::EmailClicked)
            .count() as u64
    );
    let tally = goodput::tally(run, 1);
    let shed: u64 = tally.phases[0].iter().map(|c| c.shed).sum();
    let expected = (0..total)
        .filter(|i| run.slots.view(*i).is_some_and(|v| v.shed()))
        .count() as u64;
    assert_eq!(shed, expected);
    assert!(shed > 0);
    assert_eq!(tally.phases[0][Class::Critical as usize].shed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_model_refusals_are_retried_with_the_same_event_and_the_rest_is_shed() {
    let (run, seen) = drive_http(Load::Open {
        rate: 200.0,
        to_rate: 200.0,
    })
    .await;
    assert_eq!(run.next_index.load(Relaxed), 200);
    check_refusals(&run, &seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_model_users_wait_out_refusals() {
    let (run, seen) = drive_http(Load::Closed {
        users: 4,
        think: Duration::from_millis(10),
    })
    .await;
    assert!(run.next_index.load(Relaxed) > 0);
    check_refusals(&run, &seen);
}

/// A nats-server with a stream for each ingest subject, a bus and an admission listener.
struct NatsTarget {
    _server: test_support::NatsServer,
    bus: Bus,
    pacer: SharedPacer,
    run: Arc<Run>,
    stop: CancellationToken,
    listener: tokio::task::JoinHandle<Vec<admission::AdmissionPoint>>,
}

impl NatsTarget {
    async fn start() -> Self {
        let server = test_support::NatsServer::start();
        let bus = Bus::connect(&ConnectOptions::new(server.url()))
            .await
            .expect("connect");
        for (name, subject) in [
            ("T_INGEST", "crm.ingest.>"),
            ("T_PRIORITY", "crm.priority.>"),
        ] {
            bus.jetstream()
                .create_stream(jetstream::stream::Config {
                    name: name.into(),
                    subjects: vec![subject.into()],
                    ..Default::default()
                })
                .await
                .expect("stream");
        }
        let run = Arc::new(Run::new(33, 30));
        let pacer: SharedPacer = Arc::new(Mutex::new(BulkPacer::new()));
        let stop = CancellationToken::new();
        let listener = admission::spawn_listener(
            bus.client().clone(),
            Arc::clone(&run),
            Arc::clone(&pacer),
            stop.clone(),
        )
        .await
        .expect("listening");
        Self {
            _server: server,
            bus,
            pacer,
            run,
            stop,
            listener,
        }
    }

    /// Publish `signal` as the gateway would and wait until the pacer has taken it.
    async fn signal(&self, bulk: BulkState, bulk_rate: f64) {
        let signal = AdmissionSignal {
            at_ms: crm_load::mix::unix_ms(),
            bulk,
            bulk_rate,
            retry_after_ms: 100,
            reason: crm_load::admission::LimitReason::PipelineDelay,
        };
        self.bus
            .publish_control(admission::ADMISSION_SUBJECT.into(), &signal)
            .await
            .expect("publish");
        for _ in 0..500 {
            let limited = self
                .pacer
                .lock()
                .expect("pacer")
                .is_limited(self.run.now_ns());
            if limited == (bulk == BulkState::Limited) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the listener never took the signal");
    }

    async fn drive(&self, config: &DriverConfig, duration: Duration) {
        let driver = Driver::new(config, Target::Nats(Box::new(self.bus.clone())), 16)
            .expect("driver")
            .with_pacer(Arc::clone(&self.pacer), config);
        let context = PhaseContext {
            run: Arc::clone(&self.run),
            driver: Arc::new(driver),
            mix: Mix {
                tenants: 2,
                ..Mix::default()
            },
            tenant_names: vec![tenant_id(0), tenant_id(1)].into(),
            seed: 5,
            events_per_send: 1,
            connections: 16,
            retries: None,
        };
        let start = self.run.now_ns();
        run_phase(
            &context,
            0,
            Load::Open {
                rate: 200.0,
                to_rate: 200.0,
            },
            start,
            duration,
        )
        .await;
    }

    async fn stored(&self, stream: &str) -> u64 {
        self.bus.stream_state(stream).await.expect("state").messages
    }

    /// Generated events by priority (critical, high) or bulk.
    fn counts(&self) -> (u64, u64) {
        let total = self.run.next_index.load(Relaxed);
        (0..total)
            .filter_map(|i| self.run.slots.view(i))
            .fold((0, 0), |(priority, bulk), v| {
                if admission::is_priority(v.class) {
                    (priority + 1, bulk)
                } else {
                    (priority, bulk + 1)
                }
            })
    }
}

/// The NATS driver with its defaults (priority subjects and bulk pacing on).
fn nats() -> DriverConfig {
    DriverConfig {
        kind: DriverKind::Nats,
        connections: 16,
        ..DriverConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_priority_goes_to_its_subject_and_limited_bulk_waits() {
    let target = NatsTarget::start().await;
    // Limited to nothing: every bulk event is deferred to the phase's end, and shed unsent.
    target.signal(BulkState::Limited, 0.0).await;
    target.drive(&nats(), Duration::from_millis(500)).await;
    let (priority, bulk) = target.counts();
    assert!(priority > 0 && bulk > 0, "{priority} / {bulk}");
    assert_eq!(target.stored("T_PRIORITY").await, priority);
    assert_eq!(target.stored("T_INGEST").await, 0);
    let run = &target.run;
    assert_eq!(run.acked.load(Relaxed), priority);
    assert_eq!(run.deferrals.load(Relaxed), bulk);
    let tally = goodput::tally(run, 1);
    assert_eq!(tally.shed_unsent, bulk);
    assert_eq!(tally.phases[0][Class::Critical as usize].shed, 0);
    assert_eq!(run.errors.load(Relaxed), 0);

    // Open again: bulk flows to crm.ingest.
    target.signal(BulkState::Open, -1.0).await;
    let acked_before = run.acked.load(Relaxed);
    let (priority_before, bulk_before) = (priority, bulk);
    target.drive(&nats(), Duration::from_millis(500)).await;
    let (priority, bulk) = target.counts();
    assert_eq!(target.stored("T_INGEST").await, bulk - bulk_before);
    assert_eq!(target.stored("T_PRIORITY").await, priority);
    assert_eq!(
        run.acked.load(Relaxed) - acked_before,
        (priority - priority_before) + (bulk - bulk_before)
    );
    target.stop.cancel();
    let points = target.listener.await.expect("listener");
    assert_eq!(
        points.iter().map(|p| p.limited).collect::<Vec<_>>(),
        [true, false]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_bulk_is_held_to_the_allowed_rate() {
    let target = NatsTarget::start().await;
    let limited_at = Instant::now();
    target.signal(BulkState::Limited, 20.0).await;
    target.drive(&nats(), Duration::from_secs(1)).await;
    let elapsed = limited_at.elapsed().as_secs_f64();
    let (_, bulk) = target.counts();
    let stored = target.stored("T_INGEST").await;
    // One send when the limit starts, then 20/s: never more, however the scheduler ran.
    let allowed = 1 + (20.0 * elapsed).floor() as u64;
    assert!(stored >= 1 && stored <= allowed, "{stored} > {allowed}");
    assert!(
        bulk > allowed,
        "the phase offered more bulk than the rate allows"
    );
    let tally = goodput::tally(&target.run, 1);
    assert_eq!(tally.shed_unsent, bulk - stored, "the rest was held back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_options_off_send_everything_to_ingest_unpaced() {
    let target = NatsTarget::start().await;
    target.signal(BulkState::Limited, 0.0).await;
    let config = DriverConfig {
        priority_subjects: false,
        bulk_pacing: false,
        ..nats()
    };
    target.drive(&config, Duration::from_millis(500)).await;
    let (priority, bulk) = target.counts();
    assert_eq!(target.stored("T_INGEST").await, priority + bulk);
    assert_eq!(target.stored("T_PRIORITY").await, 0);
    assert_eq!(target.run.deferrals.load(Relaxed), 0);
}

/// Types of the events one door accepted.
async fn accept(State(seen): State<Arc<Mutex<Vec<EventType>>>>, body: Bytes) -> Response {
    match events::decode(&body, events::Encoding::Json)
        .ok()
        .as_ref()
        .and_then(EventType::of)
    {
        Some(kind) => {
            seen.lock().expect("lock").push(kind);
            StatusCode::ACCEPTED.into_response()
        }
        None => StatusCode::BAD_REQUEST.into_response(),
    }
}

async fn door() -> (String, Arc<Mutex<Vec<EventType>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let addr = common::serve(
        Router::new()
            .route("/v1/events", post(accept))
            .with_state(Arc::clone(&seen)),
    )
    .await;
    (format!("http://{addr}"), seen)
}

/// Over HTTP, critical and high events go to the gateway's priority door when it has one (as a
/// payment service would send them), bulk to the main door; with `priority_subjects = false`
/// everything goes to the main door.
#[tokio::test]
async fn http_critical_and_high_take_the_priority_door() {
    for priority_path in [true, false] {
        let (main_url, main) = door().await;
        let (priority_url, priority) = door().await;
        let config = DriverConfig {
            kind: DriverKind::Http,
            connections: 4,
            priority_subjects: priority_path,
            ..DriverConfig::default()
        };
        let target = Target::Http {
            base_url: main_url,
            priority_url: Some(priority_url),
            keys: vec!["k".into()],
        };
        let load = Load::Open {
            rate: 400.0,
            to_rate: 400.0,
        };
        let run = Arc::new(Run::new(22, 30));
        common::one_phase(&config, target, &run, 5, load, Duration::from_secs(1)).await;
        let (main, priority) = (
            main.lock().expect("lock").clone(),
            priority.lock().expect("lock").clone(),
        );
        assert_eq!(
            (main.len() + priority.len()) as u64,
            run.next_index.load(Relaxed),
            "every event was sent once"
        );
        let is_priority = |kind: &EventType| {
            matches!(
                kind,
                EventType::PaymentFailed
                    | EventType::ConsentChanged
                    | EventType::TicketEscalated
                    | EventType::DealWon
            )
        };
        if priority_path {
            assert!(
                !priority.is_empty() && priority.iter().all(is_priority),
                "{priority:?}"
            );
            assert!(
                !main.is_empty() && !main.iter().any(is_priority),
                "{main:?}"
            );
        } else {
            assert!(priority.is_empty(), "{priority:?}");
            assert!(main.iter().any(is_priority), "{main:?}");
        }
    }
}
