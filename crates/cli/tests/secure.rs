//! Least privilege on NATS: the platform runs with one identity per role under exactly the
//! permissions of `nats/secure/`, and what a role (or an external lane reader) must not do, the
//! server refuses. TLS with certificates made here.

use bus::{Bus, ConnectOptions, Definitions, async_nats};
use cli::{
    nkeys::{Identity, identity_named},
    roles::Roles,
};
use events::EventType;
use serde_json::Value;
use std::{path::Path, time::Duration};
use test_support::{NatsServer, ServerSetup, TempPostgres, eventually};

mod common;
use common::*;

/// A nats-server configured from `nats/secure/` (its files as committed), with a fresh key per
/// identity.
struct SecureNats {
    server: NatsServer,
    keys: tempfile::TempDir,
}

impl SecureNats {
    fn start() -> Self {
        let keys = tempfile::tempdir().expect("keys dir");
        let publics = cli::nkeys::generate(keys.path()).expect("keys");
        let secure = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nats/secure");
        let files = ["accounts.conf", "permissions.conf"]
            .map(|name| {
                let text = std::fs::read(secure.join(name)).expect("nats/secure file");
                (name.to_owned(), text)
            })
            .to_vec();
        let server = NatsServer::start_with(ServerSetup {
            conf: "include \"accounts.conf\"\n".into(),
            files,
            env: publics,
        });
        Self { server, keys }
    }

    fn identity(name: &str) -> Identity {
        identity_named(name).unwrap_or_else(|| panic!("no identity {name}"))
    }

    /// How `identity` connects: its seed and its inbox prefix.
    fn options(&self, identity: &str) -> ConnectOptions {
        let identity = Self::identity(identity);
        let mut options = ConnectOptions::new(self.server.url()).name(identity.name);
        options.nkey_file = Some(identity.seed_file(self.keys.path()));
        options.inbox_prefix = Some(identity.inbox_prefix.to_owned());
        options.request_timeout = Duration::from_secs(2);
        options
    }

    async fn bus(&self, identity: &str) -> Bus {
        Bus::connect(&self.options(identity))
            .await
            .unwrap_or_else(|err| panic!("{identity} connects: {err}"))
    }

    /// A bare client of `identity` whose server errors (permission violations) come out of the
    /// receiver.
    async fn client(
        &self,
        identity: &str,
    ) -> (
        async_nats::Client,
        tokio::sync::mpsc::UnboundedReceiver<String>,
    ) {
        let identity = Self::identity(identity);
        let seed = bus::read_nkey_seed(&identity.seed_file(self.keys.path())).expect("seed");
        let (errors, received) = tokio::sync::mpsc::unbounded_channel();
        let client = async_nats::ConnectOptions::with_nkey(seed)
            .custom_inbox_prefix(identity.inbox_prefix)
            .request_timeout(Some(Duration::from_secs(1)))
            .event_callback(move |event| {
                let errors = errors.clone();
                async move {
                    if let async_nats::Event::ServerError(err) = event {
                        let _ = errors.send(err.to_string());
                    }
                }
            })
            .connect(self.server.url())
            .await
            .expect("connect");
        (client, received)
    }

    /// Every permission or authorization violation in the server's log.
    fn violations(&self) -> Vec<String> {
        self.server
            .log()
            .lines()
            // `Publish Violation`, `Subscription Violation` (the client hears
            // `Permissions Violation for …`).
            .filter(|line| line.contains(" Violation"))
            .map(str::to_owned)
            .collect()
    }
}

/// Waits for the server to refuse something naming `subject`.
async fn refused(errors: &mut tokio::sync::mpsc::UnboundedReceiver<String>, subject: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let error = tokio::time::timeout_at(deadline, errors.recv())
            .await
            .unwrap_or_else(|_| panic!("the server did not refuse {subject}"))
            .expect("the client is open");
        if error.to_ascii_lowercase().contains("permissions violation") && error.contains(subject) {
            return;
        }
    }
}

/// Each role as a process of its own would be configured: its seed, its inbox.
fn role_config(nats: &SecureNats, store_url: &str, role: &str) -> cli::config::Config {
    let identity = SecureNats::identity(role);
    let mut config = config(&nats.server, store_url);
    config.nats.nkey_file = Some(identity.seed_file(nats.keys.path()));
    config.nats.inbox_prefix = Some(identity.inbox_prefix.to_owned());
    // The router's retention keeper purges processed events at once: its purge is exercised.
    config.retention.replay_window = Duration::from_millis(1);
    config.retention.interval = Duration::from_millis(500);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_role_runs_under_its_own_identity_and_is_refused_nothing() {
    let nats = SecureNats::start();
    let postgres = TempPostgres::create().await;
    // The operator provisions; no role may (their start-up only checks the contract).
    let operator = nats.bus("operator").await;
    operator
        .provision(&Definitions::embedded().expect("definitions"))
        .await
        .expect("the operator provisions");

    let mut platforms = Vec::new();
    for (role, roles) in [
        ("projector", Roles::PROJECTOR),
        ("router", Roles::ROUTER),
        ("notifier", Roles::NOTIFIER),
        ("analytics", Roles::ANALYTICS),
        ("gateway", Roles::GATEWAY),
    ] {
        let config = role_config(&nats, &postgres.url(), role);
        platforms.push(Platform::start(&config, roles).await);
    }
    let gateway = platforms.last().expect("the gateway");

    let client = reqwest::Client::new();
    let created = events::sample::event(EventType::ContactCreated, "acme", "cust-1");
    let consent = events::sample::event(EventType::ConsentChanged, "acme", "cust-1");
    for event in [&created, &consent] {
        let (status, body) = post(&client, gateway, event).await;
        assert_eq!(status, 202, "{body}");
    }
    let read = |path: &'static str| {
        let request = client.get(gateway.url(path)).bearer_auth(KEY);
        async move {
            let response = request.send().await.expect("GET");
            if response.status() != 200 {
                return Value::Null;
            }
            response.json::<Value>().await.expect("json")
        }
    };
    eventually("the projector applied both", || async {
        read("/v1/customers/cust-1").await["events_applied"] == 2
    })
    .await;
    eventually("analytics counted both", || async {
        read("/v1/analytics/summary").await["events_counted"] == 2
    })
    .await;
    // Every platform consumer took its events and acked them, the notifier's included.
    let definitions = Definitions::embedded().expect("definitions");
    for consumer in &definitions.consumers {
        let (stream, durable) = (consumer.stream.as_str(), consumer.durable.as_str());
        eventually(&format!("{stream}/{durable} has acked all"), || async {
            let info = operator.consumer_info(stream, durable).await.expect("info");
            info.num_pending == 0 && info.num_ack_pending == 0
        })
        .await;
    }
    // The router's retention keeper purged the processed events (its permission to purge).
    eventually("CRM_INGEST and CRM_INGEST_PRIORITY purged", || async {
        let mut left = 0;
        for stream in ["CRM_INGEST", "CRM_INGEST_PRIORITY"] {
            let mut stream = operator
                .jetstream()
                .get_stream(stream)
                .await
                .expect("stream");
            left += stream.info().await.expect("info").state.messages;
        }
        left == 0
    })
    .await;
    // A sliver for late control messages (health, throttle) to meet their permissions.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(nats.violations(), Vec::<String>::new());
    for platform in platforms {
        platform.shutdown().await;
    }
}

#[tokio::test]
async fn a_connection_without_a_listed_key_is_refused() {
    let nats = SecureNats::start();
    let anonymous = Bus::connect(&ConnectOptions::new(nats.server.url())).await;
    assert!(anonymous.is_err(), "an anonymous connection was accepted");
    let stranger = tempfile::tempdir().expect("dir");
    let seed = stranger.path().join("stranger.nk");
    std::fs::write(&seed, nkeys::KeyPair::new_user().seed().expect("seed")).expect("write");
    let mut options = ConnectOptions::new(nats.server.url());
    options.nkey_file = Some(seed);
    assert!(
        Bus::connect(&options).await.is_err(),
        "an unlisted key was accepted"
    );
    let mut options = ConnectOptions::new(nats.server.url());
    options.nkey_file = Some(stranger.path().join("missing.nk"));
    let missing = Bus::connect(&options).await.expect_err("no seed file");
    assert!(missing.to_string().contains("missing.nk"), "{missing}");
}

#[tokio::test]
async fn roles_and_lane_readers_are_refused_what_is_not_theirs() {
    use async_nats::jetstream::{self, consumer::pull};
    let nats = SecureNats::start();
    let operator = nats.bus("operator").await;
    operator
        .provision(&Definitions::embedded().expect("definitions"))
        .await
        .expect("provision");
    let stored = |stream: &'static str| {
        let operator = operator.clone();
        async move {
            let mut stream = operator
                .jetstream()
                .get_stream(stream)
                .await
                .expect("stream");
            stream.info().await.expect("info").state.messages
        }
    };

    // The notifier cannot publish events, nor write a lane.
    let (notifier, mut errors) = nats.client("notifier").await;
    let notifier_js = jetstream::new(notifier.clone());
    for subject in [
        "crm.ingest.acme.page_viewed",
        "crm.lane.critical.acme.consent_changed",
    ] {
        let _ = notifier_js.publish(subject, "forged".into()).await;
        refused(&mut errors, subject).await;
    }
    assert_eq!(stored("CRM_INGEST").await, 0);
    assert_eq!(stored("CRM_LANE_CRITICAL").await, 0);
    // Nor read another role's replies.
    let _ = notifier.subscribe("_INBOX.>").await;
    refused(&mut errors, "_INBOX.>").await;

    // The gateway cannot take the projector's lane deliveries.
    let (gateway, mut errors) = nats.client("gateway").await;
    let projector = jetstream::new(gateway.clone())
        .get_consumer_from_stream::<pull::Config, _, _>("projector", "CRM_LANE_HIGH")
        .await
        .expect("consumer info is readable")
        .fetch()
        .max_messages(1)
        .expires(Duration::from_millis(500))
        .messages()
        .await
        .expect("fetch request");
    drop(projector);
    refused(&mut errors, "CONSUMER.MSG.NEXT.CRM_LANE_HIGH.projector").await;

    // The router purges ingest, never the dead letters.
    let (router, mut errors) = nats.client("router").await;
    let _ = jetstream::new(router.clone())
        .get_stream_no_info("CRM_DLQ")
        .await
        .expect("handle")
        .purge()
        .await;
    refused(&mut errors, "STREAM.PURGE.CRM_DLQ").await;

    // A lane reader makes a consumer of its own on a lane and reads it …
    let event = events::sample::event(EventType::DealWon, "acme", "cust-9");
    operator
        .publish(
            "crm.lane.high.acme.deal_won",
            events::encode_proto(&event).into(),
            &bus::PublishOptions::with_msg_id(event.event_id.clone()),
        )
        .await
        .expect("the operator writes a lane");
    let (reader, mut errors) = nats.client("lane_reader").await;
    let reader_js = jetstream::new(reader.clone());
    let lane = reader_js
        .get_stream("CRM_LANE_HIGH")
        .await
        .expect("lane info");
    let own = lane
        .get_or_create_consumer(
            "billing",
            pull::Config {
                durable_name: Some("billing".into()),
                ..pull::Config::default()
            },
        )
        .await
        .expect("its own consumer");
    let mut batch = own
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .expect("fetch");
    use futures::StreamExt as _;
    let message = batch.next().await.expect("a message").expect("delivered");
    message.ack().await.expect("ack");
    let read: events::Event =
        events::decode(&message.payload, events::Encoding::Protobuf).expect("an event");
    assert_eq!(read.event_id, event.event_id);
    // … but cannot take the platform's consumers, redefine them, purge, or read dead letters.
    let _ = lane
        .create_consumer(pull::Config {
            durable_name: Some("projector".into()),
            ..pull::Config::default()
        })
        .await;
    refused(&mut errors, "CONSUMER.CREATE.CRM_LANE_HIGH.projector").await;
    let _ = reader_js
        .get_stream_no_info("CRM_LANE_HIGH")
        .await
        .expect("handle")
        .purge()
        .await;
    refused(&mut errors, "STREAM.PURGE.CRM_LANE_HIGH").await;
    let _ = reader_js.get_stream("CRM_DLQ").await;
    refused(&mut errors, "STREAM.INFO.CRM_DLQ").await;
    let _ = reader.subscribe("crm.>").await;
    refused(&mut errors, "crm.>").await;
    let _ = reader_js
        .publish("crm.ingest.acme.page_viewed", "forged".into())
        .await;
    refused(&mut errors, "crm.ingest.acme.page_viewed").await;
    assert_eq!(stored("CRM_INGEST").await, 0);
    assert_eq!(
        stored("CRM_LANE_HIGH").await,
        1,
        "the reader purged nothing"
    );

    // A producer publishes its own tenant's events, and no other tenant's.
    let (producer, mut errors) = nats.client("producer").await;
    let producer_js = jetstream::new(producer.clone());
    producer_js
        .publish("crm.ingest.demo.page_viewed", "stored".into())
        .await
        .expect("sent")
        .await
        .expect("its own tenant's event is stored");
    let _ = producer_js
        .publish("crm.ingest.acme.page_viewed", "forged".into())
        .await;
    refused(&mut errors, "crm.ingest.acme.page_viewed").await;
    assert_eq!(stored("CRM_INGEST").await, 1);
}

/// A CA, and certificates it signed for the server (127.0.0.1, localhost) and a client, as PEM
/// files in a temp dir.
struct Certificates {
    dir: tempfile::TempDir,
}

impl Certificates {
    fn make() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().expect("certificates dir");
        let write = |name: &str, pem: String| {
            std::fs::write(dir.path().join(name), pem).expect("write a certificate");
        };
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        write("ca.pem", ca.self_signed(&ca_key).expect("CA").pem());
        let issuer = Issuer::new(ca, ca_key);
        for (name, names) in [
            (
                "server",
                vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
            ),
            ("client", vec!["crm-router".to_owned()]),
        ] {
            let key = KeyPair::generate().expect("key");
            let params = CertificateParams::new(names).expect("params");
            let cert = params.signed_by(&key, &issuer).expect("signed");
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}-key.pem"), key.serialize_pem());
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// The server's `tls {}` block: clients must present a certificate of this CA.
    fn server_conf(&self) -> String {
        format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n}}\n",
            self.path("server.pem").display(),
            self.path("server-key.pem").display(),
            self.path("ca.pem").display()
        )
    }
}

#[tokio::test]
async fn roles_reach_nats_over_mutual_tls_and_nothing_else_gets_in() {
    let certificates = Certificates::make();
    let server = NatsServer::start_with_config(&certificates.server_conf());
    let mut config = config(&server, "sqlite::memory:");
    config.nats.tls_ca_file = Some(certificates.path("ca.pem"));
    config.nats.tls_client_cert = Some(certificates.path("client.pem"));
    config.nats.tls_client_key = Some(certificates.path("client-key.pem"));
    let bus = Bus::connect(&config.nats.options("crm-router"))
        .await
        .expect("a client with a certificate of the CA connects over TLS");
    bus.provision(&Definitions::embedded().expect("definitions"))
        .await
        .expect("and uses JetStream");
    let event = events::sample::event(EventType::PageViewed, "acme", "cust-1");
    publish_event(&bus, &event).await;

    // Without a client certificate, or without trusting the CA, or in plain text: refused.
    let mut no_client_cert = config.nats.clone();
    no_client_cert.tls_client_cert = None;
    no_client_cert.tls_client_key = None;
    let mut untrusting = config.nats.clone();
    untrusting.tls_ca_file = None;
    let plain = cli::config::NatsConfig {
        url: server.url(),
        ..cli::config::NatsConfig::default()
    };
    for (what, nats) in [
        ("no client certificate", no_client_cert),
        ("the CA not trusted", untrusting),
        ("plain text", plain),
    ] {
        let mut options = nats.options("crm-stranger");
        options.connect_timeout = Duration::from_secs(2);
        assert!(
            Bus::connect(&options).await.is_err(),
            "connected with {what}"
        );
    }
}

#[tokio::test]
async fn the_gateway_serves_https_on_both_doors_with_its_certificate() {
    let certificates = Certificates::make();
    let nats = NatsServer::start();
    let sqlite = test_support::TempSqlite::new();
    let mut config = config(&nats, &sqlite.url());
    config.gateway.tls_cert_file = Some(certificates.path("server.pem"));
    config.gateway.tls_key_file = Some(certificates.path("server-key.pem"));
    config.gateway.priority_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let platform = Platform::start(&config, Roles::ALL).await;
    let ca =
        reqwest::Certificate::from_pem(&std::fs::read(certificates.path("ca.pem")).expect("CA"))
            .expect("a CA certificate");
    let trusting = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .expect("client");
    let addr = platform.gateway.expect("the gateway runs");
    let event = events::sample::event(EventType::PaymentFailed, "acme", "cust-1");
    let response = trusting
        .post(format!("https://{addr}/v1/events"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(events::encode_json(&event))
        .send()
        .await
        .expect("HTTPS");
    assert_eq!(response.status(), 202, "{:?}", response.text().await);

    // Plain HTTP, or a client that does not trust the certificate: no answer.
    let plain = reqwest::Client::new()
        .get(format!("http://{addr}/v1/customers/cust-1"))
        .bearer_auth(KEY)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err() || !plain.expect("answered").status().is_success());
    let untrusting = reqwest::Client::new()
        .get(format!("https://{addr}/v1/customers/cust-1"))
        .bearer_auth(KEY)
        .send()
        .await;
    assert!(
        untrusting.is_err(),
        "a client that does not trust the CA got in"
    );
    platform.shutdown().await;
}
