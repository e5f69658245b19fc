//! Against a real nats-server (started per test on a free port with a temp store).

use bus::{Action, Bus, BusErrorKind, ConnectOptions, Definitions, PublishOptions, headers};
use bytes::Bytes;
use test_support::NatsServer;

async fn connect(server: &NatsServer) -> Bus {
    Bus::connect(&ConnectOptions::new(server.url()))
        .await
        .expect("connects to the test server")
}

async fn provisioned(server: &NatsServer) -> Bus {
    let bus = connect(server).await;
    bus.provision(&Definitions::embedded().expect("definitions"))
        .await
        .expect("provisions");
    bus
}

#[tokio::test]
async fn provisioning_twice_is_a_noop_the_second_time() {
    let server = NatsServer::start();
    let bus = connect(&server).await;
    let definitions = Definitions::embedded().expect("definitions");

    let first = bus.provision(&definitions).await.expect("first run");
    assert_eq!(first.changes.len(), 19);
    assert!(
        first.changes.iter().all(|c| c.action == Action::Created),
        "{first}"
    );

    let second = bus.provision(&definitions).await.expect("second run");
    assert!(second.is_noop(), "second run changed something:\n{second}");

    let mut stream = bus
        .jetstream()
        .get_stream("CRM_INGEST")
        .await
        .expect("stream");
    let info = stream.info().await.expect("info");
    assert_eq!(info.config.duplicate_window.as_secs(), 120);
    assert_eq!(info.config.subjects, ["crm.ingest.>"]);
}

#[tokio::test]
async fn provisioning_updates_mutable_fields_and_refuses_destructive_ones() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;

    let mut definitions = Definitions::embedded().expect("definitions");
    let ingest = definitions
        .streams
        .iter_mut()
        .find(|s| s.name == "CRM_INGEST")
        .expect("ingest definition");
    ingest
        .config
        .insert("max_age".into(), 3_600_000_000_000u64.into());
    let router = definitions
        .consumers
        .iter_mut()
        .find(|c| c.durable == "router")
        .expect("router definition");
    router.config.insert("max_ack_pending".into(), 123.into());

    let report = bus.provision(&definitions).await.expect("update");
    let action = |name: &str| {
        report
            .changes
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.action.clone())
    };
    assert_eq!(
        action("CRM_INGEST"),
        Some(Action::Updated(vec!["max_age".into()]))
    );
    assert_eq!(
        action("CRM_INGEST/router"),
        Some(Action::Updated(vec!["max_ack_pending".into()]))
    );
    assert_eq!(action("CRM_DLQ"), Some(Action::Unchanged));
    let info = bus
        .jetstream()
        .get_stream("CRM_INGEST")
        .await
        .expect("stream")
        .get_info()
        .await
        .expect("info");
    assert_eq!(info.config.max_age.as_secs(), 3600);

    let mut destructive = Definitions::embedded().expect("definitions");
    destructive.streams[0]
        .config
        .insert("storage".into(), "memory".into());
    let err = bus.provision(&destructive).await.expect_err("refused");
    assert_eq!(err.kind(), BusErrorKind::Definition);
    assert!(
        err.to_string().contains("refusing to change storage"),
        "{err}"
    );
    let info = bus
        .jetstream()
        .get_stream("CRM_INGEST")
        .await
        .expect("stream still there")
        .get_info()
        .await
        .expect("info");
    assert_eq!(
        info.config.storage,
        bus::jetstream::stream::StorageType::File
    );
}

#[tokio::test]
async fn same_msg_id_twice_stores_one_message_and_flags_the_duplicate() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    let event = events::sample::event(events::EventType::DealWon, "acme", "c-1");
    let subject = events::ingest_subject("acme", events::EventType::DealWon).expect("subject");
    let payload = Bytes::from(events::encode_proto(&event));
    let options = PublishOptions::with_msg_id(&event.event_id)
        .header(headers::TRACEPARENT, headers::new_traceparent());

    let first = bus
        .publish(&subject, payload.clone(), &options)
        .await
        .expect("first");
    let second = bus
        .publish(&subject, payload, &options)
        .await
        .expect("second");
    assert_eq!(first.stream, "CRM_INGEST");
    assert!(!first.duplicate);
    assert!(second.duplicate, "second publish must be flagged duplicate");
    assert_eq!(second.sequence, first.sequence);

    let stream = bus
        .jetstream()
        .get_stream("CRM_INGEST")
        .await
        .expect("stream");
    let info = stream.get_info().await.expect("info");
    assert_eq!(info.state.messages, 1, "one stored message");

    let stored = stream
        .get_raw_message(first.sequence)
        .await
        .expect("stored message");
    assert_eq!(
        events::decode(&stored.payload, events::Encoding::Protobuf).expect("decodes"),
        event
    );
    assert_eq!(
        headers::get(Some(&stored.headers), headers::MSG_ID),
        Some(event.event_id.as_str())
    );
    assert!(headers::is_traceparent(
        headers::get(Some(&stored.headers), headers::TRACEPARENT).unwrap_or_default()
    ));
}

#[tokio::test]
async fn publishing_to_an_unbound_subject_fails_with_a_kind() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    let err = bus
        .publish(
            "nowhere.at.all",
            Bytes::from_static(b"x"),
            &PublishOptions::with_msg_id("a"),
        )
        .await
        .expect_err("no stream listens");
    assert_eq!(err.kind(), BusErrorKind::Unavailable, "{err}");
}

#[tokio::test]
async fn a_server_without_jetstream_is_refused_with_a_message() {
    let server = NatsServer::start_without_jetstream();
    let err = Bus::connect(&ConnectOptions::new(server.url()))
        .await
        .expect_err("refused");
    assert_eq!(err.kind(), BusErrorKind::Unsupported);
    assert!(err.to_string().contains("JetStream disabled"), "{err}");
}

#[tokio::test]
async fn replaying_a_stream_re_drives_events_into_ingest_under_fresh_ids() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    let subject = events::ingest_subject("acme", events::EventType::PageViewed).expect("subject");
    let mut ids = Vec::new();
    for _ in 0..3 {
        let event = events::sample::event(events::EventType::PageViewed, "acme", "c");
        bus.publish(
            &subject,
            Bytes::from(events::encode_proto(&event)),
            &PublishOptions::with_msg_id(&event.event_id),
        )
        .await
        .expect("stored");
        ids.push(event.event_id);
    }
    let replayed = bus
        .replay_stream(
            "CRM_INGEST",
            bus::jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: 2 },
            None,
        )
        .await
        .expect("replayed");
    assert_eq!(replayed, 2);
    let stream = bus
        .jetstream()
        .get_stream("CRM_INGEST")
        .await
        .expect("stream");
    assert_eq!(stream.get_info().await.expect("info").state.messages, 5);
    let copy = stream.get_raw_message(4).await.expect("replayed copy");
    assert_eq!(
        headers::get(Some(&copy.headers), headers::MSG_ID),
        Some("crm/replay/CRM_INGEST/2")
    );
    let event = events::decode(&copy.payload, events::Encoding::Protobuf).expect("decodes");
    assert_eq!(
        event.event_id, ids[1],
        "the event keeps its id, so effects stay exactly-once"
    );
}

#[tokio::test]
async fn dead_letters_can_be_purged_by_stage() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    for (stage, n) in [("router", 2), ("projector", 3)] {
        for i in 0..n {
            bus.publish(
                &format!("crm.dlq.{stage}.acme.deal_won"),
                Bytes::from_static(b"x"),
                &PublishOptions::with_msg_id(format!("{stage}-{i}")),
            )
            .await
            .expect("stored");
        }
    }
    assert_eq!(bus.dlq_list(1, 100).await.expect("list").len(), 5);
    assert_eq!(bus.dlq_purge(Some("router")).await.expect("purge"), 2);
    let left = bus.dlq_list(1, 100).await.expect("list");
    assert_eq!(left.len(), 3);
    assert!(
        left.iter()
            .all(|e| e.subject.starts_with("crm.dlq.projector."))
    );
    let err = bus.dlq_replay(99, None).await.expect_err("no such letter");
    assert!(
        err.to_string().contains("no dead letter with seq 99"),
        "{err}"
    );
    assert_eq!(bus.dlq_purge(None).await.expect("purge"), 3);
}

#[tokio::test]
async fn a_replay_the_stream_deduplicated_keeps_its_dead_letter() {
    let server = NatsServer::start();
    let bus = provisioned(&server).await;
    let event = events::sample::event(events::EventType::DealWon, "acme", "c");
    let letter = bus
        .publish(
            "crm.dlq.router.acme.deal_won",
            Bytes::from(events::encode_proto(&event)),
            &PublishOptions::with_msg_id("dlq-1"),
        )
        .await
        .expect("stored")
        .sequence;
    // The same replay already went in (a crash between the replay's publish and its delete).
    let first = bus.dlq_replay(letter, None).await.expect("replayed");
    assert!(!first.duplicate);
    let again = bus
        .publish(
            "crm.dlq.router.acme.deal_won",
            Bytes::from(events::encode_proto(&event)),
            &PublishOptions::with_msg_id("dlq-2"),
        )
        .await
        .expect("stored")
        .sequence;
    // A tenant cannot take a replay's id: theirs is `<tenant>:<key>`.
    let mut shadow = event.clone();
    shadow.idempotency_key = format!("crm/replay/CRM_DLQ/{again}");
    bus.publish(
        "crm.ingest.acme.deal_won",
        Bytes::from(events::encode_proto(&shadow)),
        &PublishOptions::with_msg_id(events::ingest_msg_id(&shadow)),
    )
    .await
    .expect("stored");
    let replayed = bus.dlq_replay(again, None).await.expect("replayed");
    assert!(!replayed.duplicate, "a tenant's key never shadows a replay");
    assert!(
        bus.dlq_get(again).await.is_err(),
        "a stored replay deletes its letter"
    );

    // Now a replay that the stream deduplicates: the letter stays.
    let third = bus
        .publish(
            "crm.dlq.router.acme.deal_won",
            Bytes::from(events::encode_proto(&event)),
            &PublishOptions::with_msg_id("dlq-3"),
        )
        .await
        .expect("stored")
        .sequence;
    bus.publish(
        "crm.ingest.acme.deal_won",
        Bytes::from(events::encode_proto(&event)),
        &PublishOptions::with_msg_id(format!("crm/replay/CRM_DLQ/{third}")),
    )
    .await
    .expect("the earlier attempt");
    let deduplicated = bus.dlq_replay(third, None).await.expect("replay answered");
    assert!(deduplicated.duplicate);
    assert!(
        bus.dlq_get(third).await.is_ok(),
        "a deduplicated replay keeps its dead letter"
    );
}
