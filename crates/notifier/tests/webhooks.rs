//! The notifier against a real nats-server and a real HTTP receiver (axum on 127.0.0.1:0) that
//! records every request and answers as each test scripts it.

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use bus::{Bus, CancellationToken, PublishOptions, headers, jetstream};
use events::{Encoding, Event, EventType, Lane};
use notifier::{NotifierConfig, WebhookConfig, header};
use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};
use test_support::{NatsServer, eventually};

const SECRET: &str = "whsec_test_0123456789";
const TOLERANCE: Duration = Duration::from_secs(5 * 60);

// ---------------------------------------------------------------------------------------------
// The receiver

#[derive(Debug, Clone)]
struct Recorded {
    path: String,
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn event_id(&self) -> String {
        self.header(header::EVENT_ID).unwrap_or_default().to_owned()
    }
}

/// How the receiver answers one request.
enum Reply {
    Status(u16, &'static [(&'static str, &'static str)], String),
    /// Never answer (within any test's patience).
    Hang,
}

fn ok() -> Reply {
    Reply::Status(200, &[], "ok".into())
}

/// Decides the reply from the path and how many earlier requests that path had.
type Script = dyn Fn(&str, usize) -> Reply + Send + Sync;

struct Inner {
    requests: Mutex<Vec<Recorded>>,
    script: Box<Script>,
}

#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    inner: Arc<Inner>,
}

async fn record(
    State(inner): State<Arc<Inner>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let nth = {
        let mut requests = inner.requests.lock().expect("lock");
        let nth = requests.iter().filter(|r| r.path == path).count();
        requests.push(Recorded {
            path: path.clone(),
            headers,
            body,
            at: Instant::now(),
        });
        nth
    };
    match (inner.script)(&path, nth) {
        Reply::Status(status, extra, body) => {
            let mut response =
                (StatusCode::from_u16(status).expect("status"), body).into_response();
            for (name, value) in extra {
                response
                    .headers_mut()
                    .insert(*name, HeaderValue::from_static(value));
            }
            response
        }
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(120)).await;
            StatusCode::OK.into_response()
        }
    }
}

impl Receiver {
    async fn start(script: impl Fn(&str, usize) -> Reply + Send + Sync + 'static) -> Self {
        let inner = Arc::new(Inner {
            requests: Mutex::new(Vec::new()),
            script: Box::new(script),
        });
        let app = Router::new().fallback(record).with_state(inner.clone());
        let addr = test_support::serve(app).await;
        Self { addr, inner }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn requests(&self, path: &str) -> Vec<Recorded> {
        let requests = self.inner.requests.lock().expect("lock");
        requests
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    fn count(&self, path: &str) -> usize {
        self.requests(path).len()
    }
}

// ---------------------------------------------------------------------------------------------
// The platform

/// A nats-server of its own with every stream and consumer provisioned (keep the server alive).
async fn platform() -> (NatsServer, Bus) {
    let server = NatsServer::start();
    let bus = test_support::provisioned_bus(&server.url()).await;
    (server, bus)
}

fn webhook(id: &str, tenant: &str, url: String) -> WebhookConfig {
    WebhookConfig {
        id: id.into(),
        tenant: tenant.into(),
        url,
        secret: Some(SECRET.into()),
        secret_env: None,
        previous_secret: None,
        previous_secret_env: None,
        event_types: None,
        lanes: None,
    }
}

/// Small delays so that every test runs in seconds.
fn config(webhooks: Vec<WebhookConfig>) -> NotifierConfig {
    NotifierConfig {
        webhooks,
        request_timeout: Duration::from_secs(2),
        endpoint_concurrency: 4,
        breaker_cool_down: Duration::from_secs(1),
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        busy_retry_base: Duration::from_millis(20),
        ..NotifierConfig::default()
    }
}

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), bus::BusError>>,
}

fn start(bus: &Bus, config: NotifierConfig) -> Running {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(notifier::run(bus.clone(), config, shutdown.clone()));
    Running { shutdown, task }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("stops in time")
            .expect("join")
            .expect("notifier ran without error");
    }
}

async fn publish(bus: &Bus, lane: Lane, event: &Event, traceparent: Option<&str>) {
    let kind = EventType::of(event).expect("payload");
    let subject = events::lane_subject(lane, &event.tenant_id, kind).expect("subject");
    let mut options = PublishOptions::with_msg_id(event.event_id.clone());
    if let Some(traceparent) = traceparent {
        options = options.header(headers::TRACEPARENT, traceparent);
    }
    bus.publish(&subject, events::encode_proto(event).into(), &options)
        .await
        .expect("publish");
}

async fn publish_new(bus: &Bus, lane: Lane, kind: EventType, tenant: &str) -> Event {
    let event = events::sample::event(kind, tenant, "cust-1");
    publish(bus, lane, &event, None).await;
    event
}

/// Every lane event acked (or dead-lettered) by the notifier consumer.
async fn drained(bus: &Bus) -> bool {
    for lane in Lane::ALL {
        let mut consumer: jetstream::consumer::PullConsumer = bus
            .jetstream()
            .get_consumer_from_stream(notifier::DURABLE, lane.stream())
            .await
            .expect("consumer");
        let info = consumer.info().await.expect("info");
        if info.num_pending + info.num_ack_pending as u64 > 0 {
            return false;
        }
    }
    true
}

async fn dead_letters(bus: &Bus) -> Vec<bus::ops::DlqEntry> {
    bus.dlq_list(1, 100).await.expect("dlq list")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

// ---------------------------------------------------------------------------------------------
// The tests

#[tokio::test]
async fn matching_subscriptions_get_signed_requests_with_the_documented_headers() {
    let (_server, bus) = platform().await;
    let receiver = Receiver::start(|_, _| ok()).await;
    let mut deals = webhook("acme-deals", "acme", receiver.url("/deals"));
    deals.event_types = Some(vec!["deal_won".into()]);
    deals.lanes = Some(vec!["high".into()]);
    deals.secret = Some("new-secret".into());
    deals.previous_secret = Some("old-secret".into());
    let running = start(
        &bus,
        config(vec![
            webhook("acme-all", "acme", receiver.url("/all")),
            deals,
            webhook("globex", "globex", receiver.url("/globex")),
        ]),
    );

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let won = events::sample::event(EventType::DealWon, "acme", "cust-1");
    publish(&bus, Lane::High, &won, Some(traceparent)).await;
    let viewed = publish_new(&bus, Lane::Standard, EventType::PageViewed, "acme").await;
    // Same type, other lane: not for acme-deals.
    let won_standard = publish_new(&bus, Lane::Standard, EventType::DealWon, "acme").await;
    // Nobody subscribes to initech: acked without a request.
    publish_new(&bus, Lane::Critical, EventType::PaymentFailed, "initech").await;

    eventually("deliveries", || async {
        receiver.count("/all") >= 3 && receiver.count("/deals") >= 1 && drained(&bus).await
    })
    .await;
    running.stop().await;

    let all = receiver.requests("/all");
    assert_eq!(all.len(), 3, "one request per event");
    assert_eq!(receiver.count("/deals"), 1);
    assert_eq!(receiver.count("/globex"), 0);
    assert_eq!(receiver.inner.requests.lock().expect("lock").len(), 4);

    for (event, kind, lane_trace) in [
        (&won, "deal_won", Some(traceparent)),
        (&viewed, "page_viewed", None),
        (&won_standard, "deal_won", None),
    ] {
        let request = all
            .iter()
            .find(|r| r.event_id() == event.event_id)
            .expect("delivered");
        let signature = request.header(header::SIGNATURE).expect("signed");
        assert_eq!(
            notifier::verify(SECRET, signature, &request.body, unix_now(), TOLERANCE),
            Ok(())
        );
        assert!(
            notifier::verify("wrong", signature, &request.body, unix_now(), TOLERANCE).is_err()
        );
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert_eq!(request.header(header::EVENT_TYPE), Some(kind));
        assert_eq!(
            request.header(header::IDEMPOTENCY_KEY),
            Some(event.event_id.as_str())
        );
        assert_eq!(request.header(header::DELIVERY_ATTEMPT), Some("1"));
        assert_eq!(request.header(header::TRACEPARENT), lane_trace);
        // The body is the event in proto3 JSON.
        assert_eq!(
            &events::decode(&request.body, Encoding::Json).expect("json"),
            event
        );
    }

    // During a rotation the header carries both secrets' signatures; either verifies.
    let deal = &receiver.requests("/deals")[0];
    assert_eq!(deal.event_id(), won.event_id);
    let signature = deal.header(header::SIGNATURE).expect("signed");
    assert_eq!(signature.matches("v1=").count(), 2, "{signature}");
    for secret in ["new-secret", "old-secret"] {
        assert_eq!(
            notifier::verify(secret, signature, &deal.body, unix_now(), TOLERANCE),
            Ok(())
        );
    }
    assert!(dead_letters(&bus).await.is_empty());
}

#[tokio::test]
async fn a_failing_endpoint_is_retried_and_one_that_accepted_is_not_sent_again() {
    let (_server, bus) = platform().await;
    let receiver = Receiver::start(|path, nth| match (path, nth) {
        ("/flaky", 0 | 1) => Reply::Status(503, &[], "down for maintenance".into()),
        _ => ok(),
    })
    .await;
    let running = start(
        &bus,
        config(vec![
            webhook("flaky", "acme", receiver.url("/flaky")),
            webhook("steady", "acme", receiver.url("/steady")),
        ]),
    );
    let event = publish_new(&bus, Lane::Critical, EventType::PaymentFailed, "acme").await;

    eventually("the third attempt", || async {
        receiver.count("/flaky") >= 3 && drained(&bus).await
    })
    .await;
    // Room for a wrong extra delivery to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.stop().await;

    let flaky = receiver.requests("/flaky");
    assert_eq!(flaky.len(), 3, "two 503s, then one accepted delivery");
    for (index, request) in flaky.iter().enumerate() {
        assert_eq!(
            request.header(header::IDEMPOTENCY_KEY),
            Some(event.event_id.as_str())
        );
        assert_eq!(
            request.header(header::DELIVERY_ATTEMPT),
            Some((index + 1).to_string().as_str())
        );
    }
    assert_eq!(
        receiver.count("/steady"),
        1,
        "the endpoint that accepted on the first try is not sent the retries"
    );
    assert!(dead_letters(&bus).await.is_empty());
}

#[tokio::test]
async fn retries_wait_in_jetstream_and_survive_a_restart() {
    let (_server, bus) = platform().await;
    let receiver = Receiver::start(|_, nth| match nth {
        0 => Reply::Status(503, &[("retry-after", "1")], String::new()),
        _ => ok(),
    })
    .await;
    let hooks = vec![webhook("hook", "acme", receiver.url("/hook"))];
    let first = start(&bus, config(hooks.clone()));
    let event = publish_new(&bus, Lane::High, EventType::DealWon, "acme").await;
    eventually("the first attempt", || async {
        receiver.count("/hook") == 1
    })
    .await;
    first.stop().await;

    let second = start(&bus, config(hooks));
    eventually("the retry", || async {
        receiver.count("/hook") == 2 && drained(&bus).await
    })
    .await;
    second.stop().await;
    let requests = receiver.requests("/hook");
    assert_eq!(requests[1].event_id(), event.event_id);
    assert_eq!(requests[1].header(header::DELIVERY_ATTEMPT), Some("2"));
}

#[tokio::test]
async fn refusals_and_undecodable_events_are_dead_lettered() {
    let (_server, bus) = platform().await;
    let long_tail = "x".repeat(2_000);
    let receiver = Receiver::start(move |_, _| {
        Reply::Status(
            400,
            &[],
            format!("{{\"error\":\"unknown customer\"}}{long_tail}"),
        )
    })
    .await;
    let running = start(
        &bus,
        config(vec![webhook("strict", "acme", receiver.url("/strict"))]),
    );
    let event = publish_new(&bus, Lane::Standard, EventType::ContactCreated, "acme").await;
    let subject = events::lane_subject(Lane::High, "acme", EventType::DealWon).expect("subject");
    bus.publish(
        &subject,
        Bytes::from_static(&[0xff, 0xff, 0xff]),
        &PublishOptions::with_msg_id("garbage-1"),
    )
    .await
    .expect("publish");

    eventually("two dead letters", || async {
        dead_letters(&bus).await.len() >= 2 && drained(&bus).await
    })
    .await;
    running.stop().await;

    assert_eq!(receiver.count("/strict"), 1, "a refusal is not retried");
    let letters = dead_letters(&bus).await;
    assert_eq!(letters.len(), 2);
    let rejected = letters
        .iter()
        .find(|l| l.reason == notifier::REJECTED_REASON)
        .expect("webhook_rejected letter");
    assert_eq!(rejected.stage, "notifier");
    assert_eq!(rejected.subject, "crm.dlq.notifier.acme.contact_created");
    assert_eq!(rejected.origin_stream, "CRM_LANE_STANDARD");
    assert!(rejected.error.contains("400"), "{}", rejected.error);
    assert!(
        rejected.error.contains("{\"error\":\"unknown customer\"}"),
        "{}",
        rejected.error
    );
    assert!(
        rejected.error.len() < notifier::BODY_EXCERPT_BYTES + 100,
        "the body is quoted only in part: {} bytes",
        rejected.error.len()
    );
    assert_eq!(
        events::decode(&rejected.payload, Encoding::Protobuf).expect("original payload"),
        event
    );
    let invalid = letters
        .iter()
        .find(|l| l.reason == "invalid_event")
        .expect("invalid_event letter");
    assert_eq!(invalid.stage, "notifier");
    assert!(invalid.error.contains("protobuf"), "{}", invalid.error);
}

#[tokio::test]
async fn exhausted_retries_are_dead_lettered_with_the_last_status_and_body() {
    let (_server, bus) = platform().await;
    let receiver =
        Receiver::start(|_, _| Reply::Status(503, &[], "maintenance until noon".into())).await;
    let mut settings = config(vec![webhook("down", "acme", receiver.url("/down"))]);
    settings.max_deliveries = 3;
    let running = start(&bus, settings);
    publish_new(&bus, Lane::High, EventType::TicketEscalated, "acme").await;
    eventually("a dead letter", || async {
        !dead_letters(&bus).await.is_empty() && drained(&bus).await
    })
    .await;
    running.stop().await;

    assert_eq!(receiver.count("/down"), 3);
    let letters = dead_letters(&bus).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, "max_deliveries");
    assert_eq!(letters[0].stage, "notifier");
    assert_eq!(letters[0].deliveries, "3");
    assert!(letters[0].error.contains("503"), "{}", letters[0].error);
    assert!(
        letters[0].error.contains("maintenance until noon"),
        "{}",
        letters[0].error
    );
}

#[tokio::test]
async fn a_dead_endpoint_does_not_delay_another_tenant() {
    let (_server, bus) = platform().await;
    let receiver = Receiver::start(|path, _| match path {
        "/hangs" => Reply::Hang,
        _ => ok(),
    })
    .await;
    // A port that refuses connections.
    let refused = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let mut settings = config(vec![
        webhook("hangs", "tenant-a", receiver.url("/hangs")),
        webhook("refuses", "tenant-c", format!("http://{refused}/hook")),
        webhook("healthy", "tenant-b", receiver.url("/healthy")),
    ]);
    settings.request_timeout = Duration::from_secs(5);
    settings.endpoint_concurrency = 2;
    // Fewer worker slots than A has events: if A's events waited for A's endpoint instead of
    // stepping aside, they alone would fill every slot.
    settings.concurrency = 16;
    // The dead tenants' events are ahead of B's in the same lane.
    for _ in 0..20 {
        publish_new(&bus, Lane::Standard, EventType::PageViewed, "tenant-a").await;
    }
    for _ in 0..20 {
        publish_new(&bus, Lane::Standard, EventType::PageViewed, "tenant-c").await;
    }
    let mut b_events = HashSet::new();
    for _ in 0..20 {
        b_events.insert(
            publish_new(&bus, Lane::Standard, EventType::PageViewed, "tenant-b")
                .await
                .event_id,
        );
    }

    let started = Instant::now();
    let running = start(&bus, settings);
    eventually("all of B's events", || async {
        receiver.count("/healthy") >= 20
    })
    .await;
    let b_done = started.elapsed();
    let hanging = receiver.requests("/hangs");
    running.shutdown.cancel();

    let delivered: HashSet<String> = receiver
        .requests("/healthy")
        .iter()
        .map(Recorded::event_id)
        .collect();
    assert_eq!(delivered, b_events);
    assert!(
        b_done < Duration::from_secs(4),
        "B's 20 events took {b_done:?}: they waited for A's 5 s timeouts"
    );
    // A's endpoint is still hanging on its first requests, and never held more than its own
    // two slots.
    assert!(
        !hanging.is_empty() && hanging.len() <= 2,
        "A received {} requests at once",
        hanging.len()
    );
    tokio::time::timeout(Duration::from_secs(30), running.task)
        .await
        .expect("stops after the in-flight timeouts")
        .expect("join")
        .expect("ok");
}

#[tokio::test]
async fn retry_after_is_honoured_and_capped() {
    let (_server, bus) = platform().await;
    let receiver = Receiver::start(|path, nth| match (path, nth) {
        ("/limited", 0) => Reply::Status(429, &[("retry-after", "1")], "slow down".into()),
        ("/far", 0) => Reply::Status(503, &[("retry-after", "3600")], String::new()),
        _ => ok(),
    })
    .await;
    let mut settings = config(vec![
        webhook("limited", "acme", receiver.url("/limited")),
        webhook("far", "globex", receiver.url("/far")),
    ]);
    settings.backoff_max = Duration::from_millis(1500);
    let running = start(&bus, settings);
    publish_new(&bus, Lane::High, EventType::DealWon, "acme").await;
    publish_new(&bus, Lane::High, EventType::DealWon, "globex").await;
    eventually("both retried", || async {
        receiver.count("/limited") >= 2 && receiver.count("/far") >= 2 && drained(&bus).await
    })
    .await;
    running.stop().await;

    let limited = receiver.requests("/limited");
    let waited = limited[1].at - limited[0].at;
    assert!(
        waited >= Duration::from_secs(1),
        "Retry-After: 1 asked for a second, the retry came after {waited:?}"
    );
    let far = receiver.requests("/far");
    let waited = far[1].at - far[0].at;
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(3),
        "Retry-After: 3600 is capped at backoff_max (1.5 s), the retry came after {waited:?}"
    );
}

#[tokio::test]
async fn an_open_breaker_pauses_requests_until_a_trial_succeeds() {
    let (_server, bus) = platform().await;
    let receiver = Receiver::start(|_, nth| match nth {
        0 | 1 => Reply::Status(500, &[], "boom".into()),
        _ => ok(),
    })
    .await;
    let mut settings = config(vec![webhook("fragile", "acme", receiver.url("/fragile"))]);
    settings.breaker_failure_threshold = 2;
    settings.endpoint_concurrency = 1;
    let running = start(&bus, settings);
    let mut ids = HashSet::new();
    for _ in 0..10 {
        ids.insert(
            publish_new(&bus, Lane::Critical, EventType::PaymentFailed, "acme")
                .await
                .event_id,
        );
    }
    eventually("all delivered", || async {
        receiver.count("/fragile") >= 12 && drained(&bus).await
    })
    .await;
    running.stop().await;

    let requests = receiver.requests("/fragile");
    assert_eq!(
        requests.len(),
        12,
        "two failures, then one success per event"
    );
    let paused = requests[2].at - requests[1].at;
    assert!(
        paused >= Duration::from_millis(950),
        "the breaker opened after two failures and let the trial through only after its 1 s \
         cool-down; the third request came {paused:?} after the second"
    );
    let accepted: HashSet<String> = requests[2..].iter().map(Recorded::event_id).collect();
    assert_eq!(accepted, ids);
    assert!(dead_letters(&bus).await.is_empty());
}

#[tokio::test]
async fn a_replayed_event_goes_only_where_it_was_not_yet_accepted() {
    let (_server, bus) = platform().await;
    let receiver = Receiver::start(|path, nth| match (path, nth) {
        ("/strict", 0) => Reply::Status(422, &[], "missing field".into()),
        _ => ok(),
    })
    .await;
    let running = start(
        &bus,
        config(vec![
            webhook("strict", "acme", receiver.url("/strict")),
            webhook("easy", "acme", receiver.url("/easy")),
        ]),
    );
    let event = publish_new(&bus, Lane::High, EventType::DealWon, "acme").await;
    eventually("the dead letter", || async {
        !dead_letters(&bus).await.is_empty() && drained(&bus).await
    })
    .await;
    assert_eq!(
        dead_letters(&bus).await[0].reason,
        notifier::REJECTED_REASON
    );

    // The receiver was fixed and the event replayed: the router publishes it to the lane again
    // (a new message, as after its duplicate window).
    let subject = events::lane_subject(Lane::High, "acme", EventType::DealWon).expect("subject");
    bus.publish(
        &subject,
        events::encode_proto(&event).into(),
        &PublishOptions::with_msg_id("replay-1"),
    )
    .await
    .expect("publish");
    eventually("the replay", || async {
        receiver.count("/strict") >= 2 && drained(&bus).await
    })
    .await;
    running.stop().await;

    assert_eq!(
        receiver.count("/strict"),
        2,
        "the refusal is not remembered past its message"
    );
    assert_eq!(
        receiver.count("/easy"),
        1,
        "the accepting endpoint is not sent the replay"
    );
    assert_eq!(dead_letters(&bus).await.len(), 1);
}
