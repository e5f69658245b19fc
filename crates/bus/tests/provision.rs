//! The two provisioning modes against a real nats-server (one per test): `provision` (the
//! operator's `crm provision`) applies the definitions; `ensure` (every role at start) creates
//! what is missing, checks the platform's contract and leaves every other setting to the operator.

use bus::{Action, Bus, BusErrorKind, ConnectOptions, Definitions, PublishOptions};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use std::time::Duration;
use test_support::{NatsServer, eventually};

async fn connect(server: &NatsServer) -> Bus {
    Bus::connect(&ConnectOptions::new(server.url()))
        .await
        .expect("connects to the test server")
}

fn embedded() -> Definitions {
    Definitions::embedded().expect("definitions")
}

fn action<'a>(report: &'a bus::ProvisionReport, name: &str) -> &'a Action {
    &report
        .changes
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("{name} not in the report:\n{report}"))
        .action
}

/// The server's JSON config of a stream or consumer, as the JetStream API reports it.
async fn server_config(bus: &Bus, subject: &str) -> Value {
    let info: Value = bus
        .jetstream()
        .request(subject.to_owned(), &serde_json::json!({}))
        .await
        .expect("info");
    info["config"].clone()
}

/// Change a stream's config on the server the way an operator would (`nats stream edit`).
async fn operator_edits_stream(bus: &Bus, stream: &str, edit: impl FnOnce(&mut Value)) {
    let mut config = server_config(bus, &format!("STREAM.INFO.{stream}")).await;
    edit(&mut config);
    let answer: Value = bus
        .jetstream()
        .request(format!("STREAM.UPDATE.{stream}"), &config)
        .await
        .expect("update");
    assert!(answer.get("error").is_none(), "{answer}");
}

/// Change a consumer's config on the server the way an operator would (`nats consumer edit`).
async fn operator_edits_consumer(
    bus: &Bus,
    stream: &str,
    durable: &str,
    edit: impl FnOnce(&mut Value),
) {
    let mut config = server_config(bus, &format!("CONSUMER.INFO.{stream}.{durable}")).await;
    edit(&mut config);
    let request = serde_json::json!({"stream_name": stream, "config": config, "action": "update"});
    let answer: Value = bus
        .jetstream()
        .request(format!("CONSUMER.CREATE.{stream}.{durable}"), &request)
        .await
        .expect("update");
    assert!(answer.get("error").is_none(), "{answer}");
}

#[tokio::test]
async fn ensure_creates_what_is_missing_and_then_has_nothing_to_do() {
    let server = NatsServer::start();
    let bus = connect(&server).await;
    let first = bus.ensure(&embedded()).await.expect("first start");
    assert_eq!(first.changes.len(), 19);
    assert!(
        first.changes.iter().all(|c| c.action == Action::Created),
        "{first}"
    );
    let second = bus.ensure(&embedded()).await.expect("second start");
    assert!(second.is_noop(), "{second}");
    assert!(
        second.changes.iter().all(|c| c.action == Action::Unchanged),
        "{second}"
    );

    // An operator deleted a consumer: the next role start brings it back, and only it.
    bus.jetstream()
        .get_stream("CRM_INGEST")
        .await
        .expect("stream")
        .delete_consumer("analytics")
        .await
        .expect("deleted");
    let third = bus.ensure(&embedded()).await.expect("third start");
    let created: Vec<_> = third
        .changes
        .iter()
        .filter(|c| c.action == Action::Created)
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(created, ["CRM_INGEST/analytics"]);
}

#[tokio::test]
async fn ensure_leaves_the_operators_settings_alone_and_provision_applies_the_definitions() {
    let server = NatsServer::start();
    let bus = connect(&server).await;
    bus.provision(&embedded()).await.expect("provisioned");

    // The operator gave ingest more room and the router more time and a bigger window.
    operator_edits_stream(&bus, "CRM_INGEST", |c| {
        c["max_bytes"] = 4_294_967_296u64.into()
    })
    .await;
    operator_edits_consumer(&bus, "CRM_INGEST", "router", |c| {
        c["ack_wait"] = 60_000_000_000u64.into();
        c["max_ack_pending"] = 50_000.into();
    })
    .await;
    // And runs the lanes at R3 in a cluster while the shipped files say R1 (on this single
    // server the definitions say 3 instead: applying that would fail, ensure must not try).
    let mut definitions = embedded();
    for stream in &mut definitions.streams {
        stream.config.insert("num_replicas".into(), 3.into());
    }

    let report = bus.ensure(&definitions).await.expect("a role starts");
    assert!(report.is_noop(), "nothing created or updated:\n{report}");
    match action(&report, "CRM_INGEST") {
        Action::Kept(diffs) => {
            let fields: Vec<_> = diffs.iter().map(|d| d.field.as_str()).collect();
            assert_eq!(fields, ["max_bytes", "num_replicas"], "{report}");
            assert_eq!(diffs[0].actual, Value::from(4_294_967_296u64));
            assert_eq!(diffs[0].defined, Value::from(2_147_483_648u64));
        }
        other => panic!("CRM_INGEST: {other:?}"),
    }
    match action(&report, "CRM_INGEST/router") {
        Action::Kept(diffs) => {
            let fields: Vec<_> = diffs.iter().map(|d| d.field.as_str()).collect();
            assert_eq!(fields, ["ack_wait", "max_ack_pending"], "{report}");
        }
        other => panic!("CRM_INGEST/router: {other:?}"),
    }
    assert!(
        report.to_string().contains(
            "stream CRM_INGEST: kept the operator's max_bytes = 4294967296 (defined 2147483648)"
        ),
        "{report}"
    );
    let ingest = server_config(&bus, "STREAM.INFO.CRM_INGEST").await;
    assert_eq!(ingest["max_bytes"], 4_294_967_296u64);
    let router = server_config(&bus, "CONSUMER.INFO.CRM_INGEST.router").await;
    assert_eq!(router["ack_wait"], 60_000_000_000u64);
    assert_eq!(router["max_ack_pending"], 50_000);

    // `crm provision` is the operator saying "apply the files": it puts them back.
    let report = bus.provision(&embedded()).await.expect("provision");
    assert_eq!(
        action(&report, "CRM_INGEST"),
        &Action::Updated(vec!["max_bytes".into()])
    );
    assert_eq!(
        action(&report, "CRM_INGEST/router"),
        &Action::Updated(vec!["ack_wait".into(), "max_ack_pending".into()])
    );
    let ingest = server_config(&bus, "STREAM.INFO.CRM_INGEST").await;
    assert_eq!(ingest["max_bytes"], 2_147_483_648u64);
}

#[tokio::test]
async fn ensure_refuses_a_contract_conflict_naming_it_and_provision_repairs_it() {
    let server = NatsServer::start();
    let bus = connect(&server).await;
    bus.provision(&embedded()).await.expect("provisioned");

    operator_edits_stream(&bus, "CRM_LANE_HIGH", |c| c["retention"] = "limits".into()).await;
    operator_edits_consumer(&bus, "CRM_LANE_CRITICAL", "projector", |c| {
        c["max_deliver"] = 5.into();
    })
    .await;
    operator_edits_consumer(&bus, "CRM_INGEST", "router", |c| {
        c["filter_subject"] = "crm.ingest.acme.>".into();
    })
    .await;

    let err = bus
        .ensure(&embedded())
        .await
        .expect_err("a role must not start");
    assert_eq!(err.kind(), BusErrorKind::Definition);
    let message = err.to_string();
    for expected in [
        r#"stream CRM_LANE_HIGH: retention is "limits" on the server, the platform needs "interest""#,
        "consumer CRM_LANE_CRITICAL/projector: max_deliver is 5 on the server, the platform needs -1",
        r#"consumer CRM_INGEST/router: filter_subjects is ["crm.ingest.acme.>"] on the server, the platform needs []"#,
        "crm provision",
    ] {
        assert!(
            message.contains(expected),
            "missing {expected:?} in:\n{message}"
        );
    }

    let report = bus.provision(&embedded()).await.expect("provision repairs");
    assert_eq!(
        action(&report, "CRM_LANE_HIGH"),
        &Action::Updated(vec!["retention".into()])
    );
    assert!(matches!(
        action(&report, "CRM_LANE_CRITICAL/projector"),
        Action::Updated(fields) if fields == &["max_deliver"]
    ));
    let repaired = bus.ensure(&embedded()).await.expect("a role starts now");
    assert!(repaired.is_noop(), "{repaired}");
}

#[tokio::test]
async fn ensure_refuses_a_stream_kept_in_memory() {
    // A stream the server keeps in memory loses acked events on restart: a contract field.
    let server = NatsServer::start();
    let bus = connect(&server).await;
    let mut memory = embedded();
    memory.streams.retain(|s| s.name == "CRM_DLQ");
    memory.consumers.clear();
    memory.streams[0]
        .config
        .insert("storage".into(), "memory".into());
    bus.provision(&memory)
        .await
        .expect("an operator's memory DLQ");
    let err = bus.ensure(&embedded()).await.expect_err("refused");
    assert!(
        err.to_string().contains(
            r#"stream CRM_DLQ: storage is "memory" on the server, the platform needs "file""#
        ),
        "{err}"
    );
    // `crm provision` cannot fix that in place either, and says so.
    let err = bus.provision(&embedded()).await.expect_err("refused");
    assert!(
        err.to_string().contains("refusing to change storage"),
        "{err}"
    );
}

/// The definitions of the previous release: lanes `limits` with a 7-day max_age, consumers with
/// a server-side `max_deliver` of 10.
fn previous_release() -> Definitions {
    let mut definitions = embedded();
    for stream in &mut definitions.streams {
        stream
            .config
            .insert("max_age".into(), 604_800_000_000_000u64.into());
        if stream.name.starts_with("CRM_LANE_") {
            stream.config.insert("retention".into(), "limits".into());
        }
    }
    for consumer in &mut definitions.consumers {
        consumer.config.insert("max_deliver".into(), 10.into());
    }
    definitions
}

#[tokio::test]
async fn provision_moves_a_lane_from_limits_to_interest_in_place_keeping_its_backlog() {
    let server = NatsServer::start();
    let bus = connect(&server).await;
    bus.provision(&previous_release())
        .await
        .expect("old release");
    let subject = "crm.lane.standard.acme.page_viewed";
    for i in 0..6 {
        bus.publish(
            subject,
            Bytes::from_static(b"event"),
            &PublishOptions::with_msg_id(format!("m{i}")),
        )
        .await
        .expect("stored");
    }
    // Both consumers processed the first 4; the notifier still owes the last 2.
    for (durable, n) in [("projector", 6), ("notifier", 4)] {
        let consumer: bus::jetstream::consumer::PullConsumer = bus
            .jetstream()
            .get_consumer_from_stream(durable, "CRM_LANE_STANDARD")
            .await
            .expect("consumer");
        let mut messages = consumer
            .fetch()
            .max_messages(n)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .expect("fetch");
        while let Some(message) = messages.next().await {
            message.expect("message").double_ack().await.expect("acked");
        }
    }

    // A role of the new release will not run on the old objects …
    let err = bus.ensure(&embedded()).await.expect_err("refused");
    assert!(
        err.to_string().contains(
            r#"stream CRM_LANE_STANDARD: retention is "limits" on the server, the platform needs "interest""#
        ),
        "{err}"
    );
    // … `crm provision` changes them in place (no new stream, no data moved) …
    let report = bus.provision(&embedded()).await.expect("upgrade");
    assert_eq!(
        action(&report, "CRM_LANE_STANDARD"),
        &Action::Updated(vec!["max_age".into(), "retention".into()])
    );
    assert_eq!(
        action(&report, "CRM_INGEST"),
        &Action::Updated(vec!["max_age".into()])
    );
    assert_eq!(
        action(&report, "CRM_LANE_STANDARD/notifier"),
        &Action::Updated(vec!["max_deliver".into()])
    );
    // … the notifier's backlog survives the change, the history goes …
    let info = bus
        .jetstream()
        .get_stream("CRM_LANE_STANDARD")
        .await
        .expect("lane")
        .get_info()
        .await
        .expect("info");
    assert_eq!(
        info.config.retention,
        bus::jetstream::stream::RetentionPolicy::Interest
    );
    assert_eq!(info.config.max_age, Duration::ZERO);
    eventually("the history both consumers acked to go", || async {
        bus.stream_state("CRM_LANE_STANDARD")
            .await
            .is_ok_and(|s| s.messages == 2 && s.first_sequence == 5)
    })
    .await;
    // … and the roles start.
    bus.ensure(&embedded()).await.expect("a role starts");
}

#[tokio::test]
async fn every_consumer_on_the_server_leaves_giving_up_to_the_application() {
    let server = NatsServer::start();
    let bus = connect(&server).await;
    let definitions = embedded();
    bus.ensure(&definitions).await.expect("created");
    for consumer in &definitions.consumers {
        let config = server_config(
            &bus,
            &format!("CONSUMER.INFO.{}.{}", consumer.stream, consumer.durable),
        )
        .await;
        assert_eq!(
            config["max_deliver"], -1,
            "{}/{}",
            consumer.stream, consumer.durable
        );
    }
}

#[tokio::test]
async fn a_store_without_room_for_the_streams_fails_start_with_what_to_change() {
    // 3 GiB cannot reserve 2 GiB of ingest plus three 1 GiB lanes.
    let server = NatsServer::start_with_config("jetstream { max_file_store: 3GB }");
    let bus = connect(&server).await;
    let err = bus
        .ensure(&embedded())
        .await
        .expect_err("the store cannot hold every stream's max_bytes");
    let message = err.to_string();
    assert_eq!(err.kind(), BusErrorKind::Rejected, "{message}");
    for needle in [
        "max_file_store",
        "bytes",
        "crm provision --definitions",
        "CRM_LANE",
    ] {
        assert!(
            message.contains(needle),
            "{needle:?} missing from: {message}"
        );
    }
}
