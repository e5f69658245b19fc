//! One conformance suite, run against SQLite and PostgreSQL.

use events::pbjson_types::{FieldMask, Timestamp};
use events::{
    EventType,
    pb::{
        ConsentChanged, Contact, ContactUpdated, CustomerTier, DealWon, Event, Money,
        event::Payload,
    },
    sample,
};
use proptest::prelude::*;
use std::time::Duration;
use store::{Applied, ContextCache, Store};
use test_support::{TempPostgres, TempSqlite};

fn at(event: &mut Event, seconds: i64) -> &mut Event {
    event.occurred_at = Some(Timestamp { seconds, nanos: 0 });
    event
}

fn update(customer: &str, seconds: i64, field: &str, value: &str) -> Event {
    let mut contact = Contact::default();
    match field {
        "email" => contact.email = value.into(),
        "title" => contact.title = value.into(),
        "phone" => contact.phone = value.into(),
        "tier" => contact.tier = CustomerTier::from_str_name(value).unwrap_or_default() as i32,
        _ => unreachable!("test field"),
    }
    let mut event = sample::with_payload(
        Payload::ContactUpdated(ContactUpdated {
            contact: Some(contact),
            update_mask: Some(FieldMask {
                paths: vec![field.into()],
            }),
        }),
        "acme",
        customer,
    );
    at(&mut event, seconds);
    event
}

fn won(customer: &str, deal: &str, minor_units: i64) -> Event {
    sample::with_payload(
        Payload::DealWon(DealWon {
            deal_id: deal.into(),
            amount: Some(Money {
                currency_code: "USD".into(),
                minor_units,
            }),
        }),
        "acme",
        customer,
    )
}

async fn suite(store: Store) {
    // Apply and read back.
    let created = sample::event(EventType::ContactCreated, "acme", "c1");
    let result = store
        .apply_batch(std::slice::from_ref(&created))
        .await
        .expect("apply");
    assert_eq!(result.outcomes, [Applied::Applied]);
    assert_eq!(
        result.changed_customers,
        [("acme".to_owned(), "c1".to_owned())]
    );
    let profile = store
        .profile("acme", "c1")
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(profile.fields["email"], "ada@example.com");
    assert_eq!(profile.tier, "standard");
    assert!(
        store
            .profile("acme", "nobody")
            .await
            .expect("read")
            .is_none()
    );
    assert!(
        store
            .profile("other-tenant", "c1")
            .await
            .expect("read")
            .is_none()
    );

    // Duplicates, across and within batches, have no second effect.
    let deal = won("c1", "d1", 700);
    let result = store
        .apply_batch(&[created.clone(), deal.clone(), deal.clone()])
        .await
        .expect("apply");
    assert_eq!(
        result.outcomes,
        [Applied::Duplicate, Applied::Applied, Applied::Duplicate]
    );
    let profile = store
        .profile("acme", "c1")
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(profile.lifetime_value_minor, 700);
    assert_eq!(profile.events_applied, 2);
    // A whole batch redelivered (crash before ack) changes nothing.
    let again = store.apply_batch(&[created, deal]).await.expect("apply");
    assert_eq!(again.outcomes, [Applied::Duplicate, Applied::Duplicate]);
    assert!(again.changed_customers.is_empty());
    assert_eq!(
        store.profile("acme", "c1").await.expect("read"),
        Some(profile)
    );

    // Last writer wins per field; the older write is logged as a conflict.
    let newer = update("c2", 2_000_000_000, "title", "CEO");
    let older = update("c2", 1_900_000_000, "title", "Intern");
    store
        .apply_batch(std::slice::from_ref(&newer))
        .await
        .expect("apply");
    let result = store
        .apply_batch(std::slice::from_ref(&older))
        .await
        .expect("apply");
    assert_eq!(result.conflicts, 1);
    let profile = store
        .profile("acme", "c2")
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(profile.fields["title"], "CEO");
    assert_eq!(profile.field_versions["title"].event_id, newer.event_id);
    let conflicts = store.conflicts("acme", "c2").await.expect("conflicts");
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].losing_value, "Intern");
    assert_eq!(conflicts[0].winning_event_id, newer.event_id);

    // An update mask naming a field with an empty value clears it.
    store
        .apply_batch(&[update("c2", 2_100_000_000, "title", "")])
        .await
        .expect("apply");
    let profile = store
        .profile("acme", "c2")
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(profile.fields["title"], "");

    // Consent: last writer wins regardless of arrival order.
    let mut revoke = sample::with_payload(
        Payload::ConsentChanged(ConsentChanged {
            channel: 1,
            granted: false,
        }),
        "acme",
        "c3",
    );
    at(&mut revoke, 2_000_000_100);
    let mut grant = sample::with_payload(
        Payload::ConsentChanged(ConsentChanged {
            channel: 1,
            granted: true,
        }),
        "acme",
        "c3",
    );
    at(&mut grant, 2_000_000_000);
    store.apply_batch(&[revoke, grant]).await.expect("apply");
    let profile = store
        .profile("acme", "c3")
        .await
        .expect("read")
        .expect("exists");
    assert!(!profile.consents["email"].granted);

    // Tickets and deal state.
    store
        .apply_batch(&[
            sample::event(EventType::TicketOpened, "acme", "c3"),
            sample::event(EventType::TicketEscalated, "acme", "c3"),
        ])
        .await
        .expect("apply");
    let profile = store
        .profile("acme", "c3")
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(profile.tickets[0].status, "escalated");
    assert_eq!(profile.tickets[0].severity, "critical");

    // Customer context through the cache: miss, hit, invalidate, fresh value.
    let cache = ContextCache::new(store.clone(), 100, Duration::from_secs(60));
    assert_eq!(cache.get("acme", "c9").await.expect("ctx"), None);
    store
        .apply_batch(&[update(
            "c9",
            2_000_000_000,
            "tier",
            "CUSTOMER_TIER_ENTERPRISE",
        )])
        .await
        .expect("apply");
    assert_eq!(
        cache.get("acme", "c9").await.expect("ctx"),
        None,
        "negative result cached"
    );
    cache.invalidate("acme", "c9").await;
    let context = cache.get("acme", "c9").await.expect("ctx").expect("known");
    assert_eq!(context.tier, CustomerTier::Enterprise);
    store
        .apply_batch(&[won("c9", "big", 9_000_000)])
        .await
        .expect("apply");
    cache.invalidate("acme", "c9").await;
    assert_eq!(
        cache
            .get("acme", "c9")
            .await
            .expect("ctx")
            .expect("known")
            .lifetime_value_minor,
        9_000_000
    );
}

#[tokio::test]
async fn conformance_sqlite() {
    let db = TempSqlite::new();
    suite(Store::connect(&db.url()).await.expect("sqlite")).await;
}

#[tokio::test]
async fn conformance_postgres() {
    let db = TempPostgres::create().await;
    suite(Store::connect(&db.url()).await.expect("postgres")).await;
}

#[tokio::test]
async fn unsupported_urls_are_refused() {
    let err = Store::connect("mysql://x").await.expect_err("refused");
    assert!(err.to_string().contains("unsupported store URL"), "{err}");
}

/// A fixed set of conflicting updates on one customer.
fn update_set() -> Vec<Event> {
    let mut events = vec![
        update("p", 2_000_000_000, "title", "A"),
        update("p", 2_000_000_005, "title", "B"),
        update("p", 2_000_000_005, "email", "x@example.com"),
        update("p", 2_000_000_001, "email", "y@example.com"),
        update("p", 2_000_000_003, "phone", "1"),
        update("p", 2_000_000_003, "phone", "2"),
        won("p", "d1", 100),
        won("p", "d2", 250),
    ];
    for (i, seconds) in [(0, 2_000_000_010), (1, 2_000_000_002)] {
        let mut consent = sample::with_payload(
            Payload::ConsentChanged(ConsentChanged {
                channel: 2,
                granted: i == 0,
            }),
            "acme",
            "p",
        );
        at(&mut consent, seconds);
        events.push(consent);
    }
    events
}

async fn projected(
    url: &str,
    events: &[Event],
    order: &[usize],
    batch: usize,
) -> serde_json::Value {
    let store = Store::connect(url).await.expect("store");
    let sequence: Vec<Event> = order
        .iter()
        .map(|&i| events[i % events.len()].clone())
        .collect();
    for chunk in sequence.chunks(batch.max(1)) {
        store.apply_batch(chunk).await.expect("apply");
    }
    let mut profile =
        serde_json::to_value(store.profile("acme", "p").await.expect("read")).expect("json");
    profile.as_object_mut().map(|o| o.remove("events_applied"));
    profile
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    /// Any permutation with duplicates, in any batching, gives the same profile.
    #[test]
    fn lww_merge_is_order_and_duplicate_insensitive(
        order in Just((0..10usize).collect::<Vec<_>>()).prop_shuffle(),
        extra in proptest::collection::vec(0usize..10, 0..6),
        batch in 1usize..5,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        let mut shuffled = order.clone();
        shuffled.extend(extra);
        let events = update_set();
        let (a, b) = runtime.block_on(async {
            let reference = TempSqlite::new();
            let shuffled_db = TempSqlite::new();
            (
                projected(&reference.url(), &events, &(0..10).collect::<Vec<_>>(), 10).await,
                projected(&shuffled_db.url(), &events, &shuffled, batch).await,
            )
        });
        prop_assert_eq!(&a["fields"]["title"], "B");
        prop_assert_eq!(&a["lifetime_value_minor"], 350);
        prop_assert_eq!(a, b);
    }
}
