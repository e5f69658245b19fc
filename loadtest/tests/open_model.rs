//! The open-model clock: a target that stalls for 1 s must show up in the latency of every event
//! that should have been sent during the stall — not only the few requests that were in flight
//! (coordinated omission).

mod common;

use axum::{Router, body::Bytes, extract::State, http::StatusCode, routing::post};
use bus::{Bus, CancellationToken, ConnectOptions, control::ProcessedNotice};
use crm_load::{
    driver::Target,
    run::spawn_collector,
    scenario::{DriverConfig, DriverKind, Load},
    tracker::{Collector, Percentiles, Run, unix_ns},
};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

const RATE: f64 = 200.0;
const LOAD: Duration = Duration::from_secs(3);
const STALL_FROM: Duration = Duration::from_secs(1);
const STALL_UNTIL: Duration = Duration::from_secs(2);

struct Stalling {
    started: Instant,
    bus: Bus,
    /// event id → when it was answered (Unix ns).
    answered: Mutex<HashMap<String, u64>>,
}

/// Answers 202; a request arriving while the stall lasts waits until it ends. Each answer is also
/// reported as processed, the way a worker would.
async fn ingest(State(state): State<Arc<Stalling>>, body: Bytes) -> StatusCode {
    let Ok(event) = events::decode(&body, events::Encoding::Json) else {
        return StatusCode::BAD_REQUEST;
    };
    let now = state.started.elapsed();
    if now >= STALL_FROM && now < STALL_UNTIL {
        tokio::time::sleep_until((state.started + STALL_UNTIL).into()).await;
    }
    let at_ns = unix_ns();
    state
        .answered
        .lock()
        .expect("lock")
        .insert(event.event_id.clone(), at_ns);
    let notice = ProcessedNotice {
        role: "projector".into(),
        lane: "standard".into(),
        at_ns,
        ids: vec![event.event_id],
    };
    let _ = state
        .bus
        .publish_control("crm.control.processed.projector".into(), &notice)
        .await;
    StatusCode::ACCEPTED
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_counts_for_every_event_due_during_it() {
    let nats = test_support::NatsServer::start();
    let bus = Bus::connect(&ConnectOptions::new(nats.url()))
        .await
        .expect("connect");
    let run = Arc::new(Run::new(77, 30));
    let stop = CancellationToken::new();
    let collector = spawn_collector(
        bus.client().clone(),
        Collector::new(Arc::clone(&run), 1),
        stop.clone(),
    )
    .await
    .expect("listening");

    let state = Arc::new(Stalling {
        started: run.started,
        bus: bus.clone(),
        answered: Mutex::new(HashMap::new()),
    });
    let addr = common::serve(
        Router::new()
            .route("/v1/events", post(ingest))
            .with_state(Arc::clone(&state)),
    )
    .await;

    let config = DriverConfig {
        kind: DriverKind::Http,
        connections: 16,
        ..DriverConfig::default()
    };
    let target = Target::Http {
        base_url: format!("http://{addr}"),
        priority_url: None,
        keys: vec!["k".into()],
    };
    let load = Load::Open {
        rate: RATE,
        to_rate: RATE,
    };
    let sent = common::one_phase(&config, target, &run, 1, load, LOAD).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let collector = collector.await.expect("collector");

    let total = run.next_index.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(total, 600);
    assert_eq!(run.acked.load(std::sync::atomic::Ordering::Relaxed), 600);

    // Every event due during the stall waited at least for the rest of the stall, measured from
    // when it was due — the in-flight ones and the ones the stalled senders never got to.
    let answered = state.answered.lock().expect("lock").clone();
    let mut due_in_stall = 0;
    for index in 0..total {
        let view = run.slots.view(index).expect("slot");
        let due = Duration::from_nanos(view.intended_ns);
        if due < STALL_FROM || due >= STALL_UNTIL {
            continue;
        }
        due_in_stall += 1;
        let id = run.event_id(index, view.intended_ns);
        let at = answered
            .get(&id)
            .unwrap_or_else(|| panic!("event {index} ({id}) answered"));
        let latency =
            Duration::from_nanos(at.saturating_sub(run.started_unix_ns + view.intended_ns));
        let left = STALL_UNTIL - due;
        assert!(
            latency + Duration::from_millis(5) >= left,
            "event {index} due at {due:?} has latency {latency:?} < {left:?} left in the stall"
        );
    }
    assert_eq!(due_in_stall, 200);

    // The reported figures include the stall: a third of the events were due during it, so even
    // p90 is far above a healthy answer time, and p99 is close to the whole second.
    let e2e = Percentiles::of(&collector.lanes[0][2]);
    assert_eq!(e2e.count, 600);
    assert!(e2e.p99_ms >= 900.0, "e2e {e2e:?}");
    assert!(e2e.p90_ms >= 500.0, "e2e {e2e:?}");
    assert!(e2e.max_ms >= 980.0, "e2e {e2e:?}");
    let mut ack = sent.ack[0].clone();
    for h in &sent.ack[1..] {
        ack.add(h).expect("same bounds");
    }
    let ack = Percentiles::of(&ack);
    assert!(ack.p99_ms >= 900.0 && ack.p90_ms >= 500.0, "ack {ack:?}");
}
