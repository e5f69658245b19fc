//! One conformance suite, run against SQLite and PostgreSQL: every scenario is an async fn of a
//! fresh [`Store`], and `conformance!` makes one test per scenario and backend.

#[macro_use]
mod common;

use common::*;
use events::{
    EventType,
    pb::{ConsentChannel, CustomerTier, TicketSeverity},
    sample,
};
use proptest::{
    collection::vec,
    prelude::*,
    test_runner::{Config, TestRunner},
};
use std::time::Duration;
use store::{Applied, CustomerContext, Profile, Store, StoreError};
use test_support::TempSqlite;

conformance!(
    applies_and_reads_a_profile,
    duplicates_have_no_second_effect,
    a_redelivered_batch_changes_nothing,
    an_older_write_loses_and_is_logged,
    an_update_mask_clears_fields,
    consents_deals_and_tickets_are_last_writer_wins,
    the_conflicting_set_converges_in_reverse,
    concurrent_overlapping_batches_apply_each_event_once,
    only_tier_and_deal_writes_change_the_routing_context,
    a_retry_with_the_same_idempotency_key_has_no_second_effect,
    lifetime_value_sums_saturate_instead_of_failing_the_batch,
    pruning_forgets_only_ledger_rows_past_retention,
);

/// Both ledgers lose exactly their rows older than the retention, over several chunks; what is
/// kept still deduplicates, and what was pruned is no longer recognised (the documented limit:
/// idempotency lasts as long as the ledger keeps the row).
async fn pruning_forgets_only_ledger_rows_past_retention(store: Store) {
    let old: Vec<_> = (0..2_500)
        .map(|i| {
            at(
                &format!("o{}", i % 10),
                i,
                sample::payload(EventType::PageViewed),
            )
        })
        .chain([keyed(won("o1", 1, "d1", "USD", 100), "deal-1")])
        .collect();
    apply(&store, &old).await;
    store.apply_analytics(&old).await.expect("count");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let recent = vec![
        keyed(won("r1", 1, "d1", "USD", 100), "deal-2"),
        at("r1", 2, sample::payload(EventType::PageViewed)),
    ];
    apply(&store, &recent).await;
    store.apply_analytics(&recent).await.expect("count");

    let pruned = store
        .prune_ledgers(Duration::from_secs(1))
        .await
        .expect("prune");
    assert_eq!(pruned, 2 * old.len() as u64, "the old rows of both ledgers");
    assert_eq!(store.processed_count().await.expect("count"), 2);
    assert_eq!(events_counted(&store, TENANT).await, 2);
    assert_eq!(
        store
            .prune_ledgers(Duration::from_secs(1))
            .await
            .expect("prune"),
        0
    );

    // Kept rows still deduplicate, in both ledgers.
    let again = [retried(&recent[0]), recent[1].clone()];
    assert_eq!(
        apply(&store, &again).await.outcomes,
        [Applied::Duplicate; 2]
    );
    assert_eq!(
        store.apply_analytics(&again).await.expect("count"),
        [Applied::Duplicate; 2]
    );
    // Pruned ones do not: a retry past the retention is applied again.
    let late = retried(&old[old.len() - 1]);
    assert_eq!(
        apply(&store, std::slice::from_ref(&late)).await.outcomes,
        [Applied::Applied]
    );
    assert_eq!(
        store
            .apply_analytics(std::slice::from_ref(&late))
            .await
            .expect("count"),
        [Applied::Applied]
    );
    // The profile itself is untouched by pruning.
    assert_eq!(profile(&store, "o0").await.events_applied, 250);
}

/// The pruner prunes on its tick and stops when told.
#[tokio::test]
async fn the_pruner_runs_until_shutdown() {
    let db = TempSqlite::new();
    let store = Store::connect(&db.url()).await.expect("connect");
    apply(
        &store,
        &[sample::event(EventType::PageViewed, TENANT, "c1")],
    )
    .await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let pruner = tokio::spawn(store::run_ledger_pruner(
        store.clone(),
        Duration::from_millis(50),
        Duration::from_millis(20),
        shutdown.clone(),
    ));
    test_support::eventually("the ledger to be pruned", || async {
        store.processed_count().await.expect("count") == 0
    })
    .await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), pruner)
        .await
        .expect("stops on shutdown")
        .expect("join");
}

/// A ledger written before migration 0003 (keyed on event ids) still recognises its events:
/// their dedupe key is their event id.
async fn ledger_rows_from_before_dedupe_keys_still_count(url: &str, backend: &str) {
    let event = won("m1", 1, "d1", "USD", 100);
    let migrations = format!("{}/migrations/{backend}", env!("CARGO_MANIFEST_DIR"));
    let all = sqlx::migrate::Migrator::new(std::path::Path::new(&migrations))
        .await
        .expect("migrations");
    let before = sqlx::migrate::Migrator {
        migrations: all
            .migrations
            .iter()
            .filter(|m| m.version < 3)
            .cloned()
            .collect::<Vec<_>>()
            .into(),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    let old_rows = [
        "INSERT INTO processed_events (tenant_id, event_id, customer_id, event_type, processed_at_ns) \
         VALUES ($1, $2, 'm1', 'deal_won', 1)",
        "INSERT INTO analytics_processed (tenant_id, event_id, processed_at_ns) VALUES ($1, $2, 1)",
        "INSERT INTO customers (tenant_id, customer_id, lifetime_value_minor, payment_failures, \
         events_applied, last_event_at_ns) VALUES ($1, 'm1', 100, 0, 1, 1)",
    ];
    // Each backend its own pool type: the same steps twice.
    if backend == "sqlite" {
        let pool = sqlx::SqlitePool::connect(url).await.expect("connect");
        before.run(&pool).await.expect("migrate to 0002");
        for sql in old_rows {
            sqlx::query(sql)
                .bind(TENANT)
                .bind(&event.event_id)
                .execute(&pool)
                .await
                .expect("old row");
        }
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.expect("connect");
        before.run(&pool).await.expect("migrate to 0002");
        for sql in old_rows {
            sqlx::query(sql)
                .bind(TENANT)
                .bind(&event.event_id)
                .execute(&pool)
                .await
                .expect("old row");
        }
        pool.close().await;
    }

    let store = Store::connect(url)
        .await
        .expect("connect and migrate to 0003");
    assert_eq!(
        apply(&store, std::slice::from_ref(&event)).await.outcomes,
        [Applied::Duplicate]
    );
    assert_eq!(
        store
            .apply_analytics(std::slice::from_ref(&event))
            .await
            .expect("count"),
        [Applied::Duplicate]
    );
    let p = profile(&store, "m1").await;
    assert_eq!(p.events_applied, 1);
    let fresh = won("m1", 2, "d2", "USD", 5);
    assert_eq!(apply(&store, &[fresh]).await.outcomes, [Applied::Applied]);
}

#[tokio::test]
async fn sqlite_ledgers_from_before_dedupe_keys_still_count() {
    let db = TempSqlite::new();
    ledger_rows_from_before_dedupe_keys_still_count(&db.url(), "sqlite").await;
}

#[tokio::test]
async fn postgres_ledgers_from_before_dedupe_keys_still_count() {
    let db = test_support::TempPostgres::create().await;
    ledger_rows_from_before_dedupe_keys_still_count(&db.url(), "postgres").await;
}

/// A client retry after the bus's duplicate window: same idempotency key, new event id.
async fn a_retry_with_the_same_idempotency_key_has_no_second_effect(store: Store) {
    let deal = keyed(won("k1", 1, "d1", "USD", 700), "deal-42");
    let failure = keyed(
        at("k1", 2, sample::payload(EventType::PaymentFailed)),
        "pay-42",
    );
    apply(&store, &[deal.clone(), failure.clone()]).await;
    let before = serde_json::to_value(profile(&store, "k1").await).expect("json");

    let retries = [retried(&deal), retried(&failure)];
    let result = apply(&store, &retries).await;
    assert_eq!(result.outcomes, [Applied::Duplicate, Applied::Duplicate]);
    assert!(result.changed_customers.is_empty(), "{result:?}");
    assert_eq!(
        serde_json::to_value(profile(&store, "k1").await).expect("json"),
        before
    );
    let p = profile(&store, "k1").await;
    assert_eq!((p.events_applied, p.payment_failures), (2, 1));
    assert_eq!(store.processed_count().await.expect("count"), 2);

    // Within one batch too: the first copy is applied, the retry beside it is not.
    let page = keyed(
        at("k2", 1, sample::payload(EventType::PaymentFailed)),
        "pay-43",
    );
    let result = apply(&store, &[page.clone(), retried(&page)]).await;
    assert_eq!(result.outcomes, [Applied::Applied, Applied::Duplicate]);
    assert_eq!(profile(&store, "k2").await.payment_failures, 1);

    // The key is the tenant's: another tenant's event with the same key is another event.
    let mut elsewhere = retried(&failure);
    elsewhere.tenant_id = "other".into();
    assert_eq!(
        apply(&store, &[elsewhere]).await.outcomes,
        [Applied::Applied]
    );
    let other = store
        .profile("other", "k1")
        .await
        .expect("read")
        .expect("applied");
    assert_eq!((other.events_applied, other.payment_failures), (1, 1));
    // An event without a key is still deduplicated by its id.
    let plain = at("k3", 1, sample::payload(EventType::PageViewed));
    let result = apply(&store, &[plain.clone(), plain]).await;
    assert_eq!(result.outcomes, [Applied::Applied, Applied::Duplicate]);
}

/// Won amounts are summed with saturation: a sum past i64::MAX neither fails the batch (SQLite's
/// SUM raises "integer overflow", PostgreSQL's bigint is out of range) nor wraps.
async fn lifetime_value_sums_saturate_instead_of_failing_the_batch(store: Store) {
    let result = store
        .apply_batch(&[
            won("rich", 1, "d1", "USD", i64::MAX),
            won("rich", 2, "d2", "USD", 1_000),
        ])
        .await;
    assert!(result.is_ok(), "{result:?}");
    let p = profile(&store, "rich").await;
    assert_eq!(per_currency(&p.lifetime_value), [("USD", i64::MAX)]);
    let context = store
        .customer_context(TENANT, "rich")
        .await
        .expect("context");
    assert_eq!(context.map(|c| c.lifetime_value), Some(p.lifetime_value));
}

async fn only_tier_and_deal_writes_change_the_routing_context(store: Store) {
    let pair = |c: &str| (TENANT.to_owned(), c.to_owned());
    let result = apply(
        &store,
        &[
            sample::event(EventType::PageViewed, TENANT, "views"),
            update("titled", 1, "title", "CTO"),
            update("tiered", 1, "tier", "premium"),
            won("dealer", 1, "d1", "USD", 500),
        ],
    )
    .await;
    assert_eq!(
        result.changed_customers,
        [
            pair("dealer"),
            pair("tiered"),
            pair("titled"),
            pair("views")
        ]
    );
    assert_eq!(result.context_changed, [pair("dealer"), pair("tiered")]);
    // A tier write that loses to a newer one changes nothing.
    let stale = apply(&store, &[update("tiered", 0, "tier", "free")]).await;
    assert_eq!(stale.changed_customers, [pair("tiered")]);
    assert!(stale.context_changed.is_empty(), "{stale:?}");
}

async fn profile(store: &Store, customer: &str) -> Profile {
    store
        .profile(TENANT, customer)
        .await
        .expect("read profile")
        .unwrap_or_else(|| panic!("customer {customer} has a profile"))
}

async fn apply(store: &Store, events: &[events::Event]) -> store::BatchResult {
    store.apply_batch(events).await.expect("apply batch")
}

async fn applies_and_reads_a_profile(store: Store) {
    let created = sample::event(EventType::ContactCreated, TENANT, "c1");
    let result = apply(&store, std::slice::from_ref(&created)).await;
    assert_eq!(result.outcomes, [Applied::Applied]);
    assert_eq!(
        result.changed_customers,
        [(TENANT.to_owned(), "c1".to_owned())]
    );

    let p = profile(&store, "c1").await;
    assert_eq!(
        (p.tenant_id.as_str(), p.customer_id.as_str()),
        (TENANT, "c1")
    );
    assert_eq!(p.fields["email"], "ada@example.com");
    assert_eq!(p.fields["country_code"], "GB");
    assert!(
        !p.fields.contains_key("phone"),
        "empty fields are not written"
    );
    assert_eq!(p.fields["tier"], "standard");
    assert_eq!(p.tier, "standard");
    assert_eq!(p.field_versions["email"].event_id, created.event_id);
    assert_eq!((p.events_applied, p.payment_failures), (1, 0));
    assert!(p.lifetime_value.is_empty(), "{:?}", p.lifetime_value);
    assert_eq!(p.field_versions["email"].occurred_at, p.last_event_at);

    let json = serde_json::to_value(&p).expect("json");
    for key in [
        "fields",
        "field_versions",
        "tier",
        "consents",
        "deals",
        "tickets",
        "last_event_at",
        "lifetime_value",
    ] {
        assert!(json.get(key).is_some(), "{key} in {json}");
    }
    assert_eq!(
        store.customer_context(TENANT, "c1").await.expect("context"),
        Some(CustomerContext {
            tier: CustomerTier::Standard,
            lifetime_value: vec![],
        })
    );
    assert_eq!(store.profile(TENANT, "nobody").await.expect("read"), None);
    assert_eq!(
        store.profile("other-tenant", "c1").await.expect("read"),
        None
    );
    assert_eq!(
        store
            .customer_context(TENANT, "nobody")
            .await
            .expect("context"),
        None
    );
    assert_eq!(store.processed_count().await.expect("count"), 1);
}

async fn duplicates_have_no_second_effect(store: Store) {
    let deal = won("c1", 1, "d1", "USD", 700);
    let failure = at("c1", 2, sample::payload(EventType::PaymentFailed));
    let result = apply(
        &store,
        &[deal.clone(), failure.clone(), deal.clone(), failure.clone()],
    )
    .await;
    assert_eq!(
        result.outcomes,
        [
            Applied::Applied,
            Applied::Applied,
            Applied::Duplicate,
            Applied::Duplicate
        ]
    );
    assert_eq!(result.changed_customers.len(), 1);
    let result = apply(
        &store,
        &[failure, deal.clone(), won("c1", 3, "d2", "EUR", 300)],
    )
    .await;
    assert_eq!(
        result.outcomes,
        [Applied::Duplicate, Applied::Duplicate, Applied::Applied]
    );

    let p = profile(&store, "c1").await;
    assert_eq!(
        per_currency(&p.lifetime_value),
        [("EUR", 300), ("USD", 700)],
        "each deal once, per currency"
    );
    assert_eq!(
        serde_json::to_value(&p.lifetime_value).expect("json"),
        serde_json::json!([
            { "currency_code": "EUR", "minor_units": 300 },
            { "currency_code": "USD", "minor_units": 700 },
        ])
    );
    assert_eq!((p.events_applied, p.payment_failures), (3, 1));
    assert_eq!(store.processed_count().await.expect("count"), 3);

    // Outcomes follow the input order however the batch is applied; customers are reported once.
    let (b, a) = (won("cb", 1, "d", "USD", 1), won("ca", 1, "d", "USD", 1));
    let result = apply(&store, &[b.clone(), a, b]).await;
    assert_eq!(
        result.outcomes,
        [Applied::Applied, Applied::Applied, Applied::Duplicate]
    );
    let customers: Vec<_> = result
        .changed_customers
        .iter()
        .map(|(_, c)| c.as_str())
        .collect();
    assert_eq!(customers, ["ca", "cb"]);

    // The same event id in another tenant is another event.
    let mut elsewhere = deal;
    elsewhere.tenant_id = "other".into();
    assert_eq!(
        apply(&store, &[elsewhere]).await.outcomes,
        [Applied::Applied]
    );
}

async fn a_redelivered_batch_changes_nothing(store: Store) {
    let mut batch = conflicting_set();
    batch.push(sample::event(EventType::ContactCreated, TENANT, "c2"));
    let first = apply(&store, &batch).await;
    assert!(first.outcomes.iter().all(|o| *o == Applied::Applied));
    assert_eq!(first.changed_customers.len(), 2);
    let before = (
        serde_json::to_value(profile(&store, "p").await).expect("json"),
        store.conflicts(TENANT, "p").await.expect("conflicts"),
        store.processed_count().await.expect("count"),
    );

    // The worker crashed after the commit, before the ack: the same batch comes again.
    let again = apply(&store, &batch).await;
    assert!(again.outcomes.iter().all(|o| *o == Applied::Duplicate));
    assert!(again.changed_customers.is_empty());
    assert_eq!(again.conflicts, 0);
    let after = (
        serde_json::to_value(profile(&store, "p").await).expect("json"),
        store.conflicts(TENANT, "p").await.expect("conflicts"),
        store.processed_count().await.expect("count"),
    );
    assert_eq!(before, after);
}

async fn an_older_write_loses_and_is_logged(store: Store) {
    let newer = update("c2", 20, "title", "CEO");
    let older = update("c2", 10, "title", "Intern");
    let same_value = update("c2", 5, "title", "CEO");
    apply(&store, std::slice::from_ref(&newer)).await;
    assert_eq!(
        apply(&store, std::slice::from_ref(&older)).await.conflicts,
        1
    );
    assert_eq!(
        apply(&store, &[same_value]).await.conflicts,
        0,
        "same value: no conflict"
    );

    let p = profile(&store, "c2").await;
    assert_eq!(p.fields["title"], "CEO");
    assert_eq!(p.field_versions["title"].event_id, newer.event_id);
    assert_eq!(
        p.events_applied, 3,
        "a losing write is still applied (and counted)"
    );
    let conflicts = store.conflicts(TENANT, "c2").await.expect("conflicts");
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].field, "title");
    assert_eq!(conflicts[0].losing_value, "Intern");
    assert_eq!(conflicts[0].losing_event_id, older.event_id);
    assert_eq!(conflicts[0].losing_occurred_at, "2023-11-14T22:13:30Z");
    assert_eq!(conflicts[0].winning_event_id, newer.event_id);

    // At the same instant the greater event id wins, whichever comes first.
    let (a, b) = (
        update("c3", 1, "company", "A"),
        update("c3", 1, "company", "B"),
    );
    let winner = if a.event_id > b.event_id { "A" } else { "B" };
    apply(&store, &[b, a]).await;
    assert_eq!(profile(&store, "c3").await.fields["company"], winner);
}

async fn an_update_mask_clears_fields(store: Store) {
    apply(
        &store,
        &[at("c4", 1, sample::payload(EventType::ContactCreated))],
    )
    .await;
    apply(
        &store,
        &[update("c4", 2, "email", ""), update("c4", 2, "tier", "")],
    )
    .await;
    let p = profile(&store, "c4").await;
    assert_eq!(p.fields["email"], "");
    assert_eq!(
        p.fields["first_name"], "Ada",
        "fields outside the mask are untouched"
    );
    assert_eq!(p.tier, "unspecified");
    let context = store.customer_context(TENANT, "c4").await.expect("context");
    assert_eq!(context.map(|c| c.tier), Some(CustomerTier::Unspecified));

    // The sample update names title and tier, not the other fields.
    apply(
        &store,
        &[at("c4", 3, sample::payload(EventType::ContactUpdated))],
    )
    .await;
    let p = profile(&store, "c4").await;
    assert_eq!(
        (p.fields["title"].as_str(), p.tier.as_str()),
        ("CTO", "premium")
    );
    assert_eq!(p.fields["email"], "");
}

async fn consents_deals_and_tickets_are_last_writer_wins(store: Store) {
    let c = "c5";
    // Each pair arrives newest first.
    apply(&store, &[consent(c, 20, ConsentChannel::Email, false)]).await;
    apply(&store, &[consent(c, 10, ConsentChannel::Email, true)]).await;
    apply(&store, &[won(c, 30, "d1", "USD", 500)]).await;
    apply(&store, &[stage(c, 10, "d1", "proposal", Some(100))]).await;
    apply(
        &store,
        &[ticket_escalated(c, 20, "t1", TicketSeverity::High)],
    )
    .await;
    apply(&store, &[ticket_opened(c, 10, "t1", TicketSeverity::Low)]).await;

    let p = profile(&store, c).await;
    assert!(!p.consents["email"].granted);
    assert_eq!(p.consents["email"].occurred_at, "2023-11-14T22:13:40Z");
    let deal = &p.deals[0];
    assert_eq!(
        (deal.stage.as_str(), deal.status.as_str()),
        ("closed_won", "won")
    );
    assert_eq!(
        (deal.amount_minor, deal.currency.as_deref()),
        (Some(500), Some("USD"))
    );
    assert_eq!(per_currency(&p.lifetime_value), [("USD", 500)]);
    let ticket = &p.tickets[0];
    assert_eq!(
        (ticket.status.as_str(), ticket.severity.as_str()),
        ("escalated", "high")
    );

    // A newer loss takes the deal out of the lifetime value; it keeps its last amount.
    apply(&store, &[lost(c, 40, "d1")]).await;
    let p = profile(&store, c).await;
    assert_eq!(
        (p.deals[0].status.as_str(), p.deals[0].amount_minor),
        ("lost", Some(500))
    );
    assert!(p.lifetime_value.is_empty(), "{:?}", p.lifetime_value);
    // Re-won later with a new amount: counted once, at that amount.
    apply(
        &store,
        &[won(c, 50, "d1", "USD", 650), won(c, 45, "d1", "USD", 999)],
    )
    .await;
    let context = store.customer_context(TENANT, c).await.expect("context");
    let context = context.expect("known customer");
    assert_eq!(per_currency(&context.lifetime_value), [("USD", 650)]);
}

/// Workers redelivering overlapping batches at once: no deadlock, and each event counts once.
async fn concurrent_overlapping_batches_apply_each_event_once(store: Store) {
    let customers = ["k0", "k1", "k2", "k3"];
    let events: Vec<_> = (0..40)
        .map(|i| won(customers[i % 4], i as i64, &format!("d{i}"), "USD", 10))
        .collect();
    let tasks: Vec<_> = (0..4)
        .map(|worker| {
            let (store, mut batch) = (store.clone(), events.clone());
            batch.rotate_left(worker * 7);
            if worker % 2 == 1 {
                batch.reverse();
            }
            tokio::spawn(async move {
                for chunk in batch.chunks(8) {
                    store.apply_batch(chunk).await.expect("apply batch");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("worker");
    }
    assert_eq!(store.processed_count().await.expect("count"), 40);
    for customer in customers {
        let p = profile(&store, customer).await;
        assert_eq!(p.events_applied, 10, "{customer}");
        assert_eq!(
            per_currency(&p.lifetime_value),
            [("USD", 100)],
            "{customer}"
        );
    }
}

fn expect_converged(p: &Profile) {
    assert_eq!(p.fields["title"], "CTO");
    assert_eq!(p.fields["email"], "new@example.com");
    assert_eq!(p.fields["phone"], "");
    assert_eq!(p.tier, "enterprise");
    assert!(!p.consents["email"].granted);
    assert!(p.consents["sms"].granted);
    let deals: Vec<_> = p
        .deals
        .iter()
        .map(|d| (d.deal_id.as_str(), d.status.as_str(), d.amount_minor))
        .collect();
    assert_eq!(
        deals,
        [
            ("d1", "won", Some(120_000)),
            ("d2", "lost", Some(5_000)),
            ("d3", "won", Some(30_000))
        ]
    );
    assert_eq!(
        per_currency(&p.lifetime_value),
        [("EUR", 30_000), ("USD", 120_000)]
    );
    assert_eq!(p.tickets[0].status, "escalated");
    assert_eq!((p.payment_failures, p.events_applied), (1, 21));
}

/// Deterministic: reversed, with duplicates, in batches of three, equals the in-order SQLite
/// profile — the same JSON from either backend.
async fn the_conflicting_set_converges_in_reverse(store: Store) {
    let events = conflicting_set();
    let reference = projected_json(
        &events,
        &(0..events.len()).collect::<Vec<_>>(),
        events.len(),
    )
    .await;
    let mut order: Vec<usize> = (0..events.len()).rev().collect();
    order.extend([0, 7, 7, 20]);
    let sequence: Vec<_> = order.iter().map(|&i| events[i].clone()).collect();
    for chunk in sequence.chunks(3) {
        apply(&store, chunk).await;
    }
    let p = profile(&store, "p").await;
    expect_converged(&p);
    assert_eq!(serde_json::to_value(&p).expect("json"), reference);
}

/// The profile JSON of customer `p` after applying `events[order[..]]` in batches of `batch`
/// to a fresh SQLite store.
async fn projected_json(
    events: &[events::Event],
    order: &[usize],
    batch: usize,
) -> serde_json::Value {
    let db = TempSqlite::new();
    let store = Store::connect(&db.url()).await.expect("connect");
    let sequence: Vec<_> = order.iter().map(|&i| events[i].clone()).collect();
    for chunk in sequence.chunks(batch.max(1)) {
        apply(&store, chunk).await;
    }
    serde_json::to_value(profile(&store, "p").await).expect("json")
}

/// Any permutation of the conflicting set, with any duplicates, in any batching, projects the
/// same profile.
#[test]
fn any_order_and_duplication_converge() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let events = conflicting_set();
    let n = events.len();
    let reference = runtime.block_on(projected_json(&events, &(0..n).collect::<Vec<_>>(), n));
    let strategy = (
        Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
        vec(0..n, 0..8),
        1..6usize,
    );
    let mut runner = TestRunner::new(Config {
        cases: 32,
        ..Config::default()
    });
    runner
        .run(&strategy, |(mut order, duplicates, batch)| {
            order.extend(duplicates);
            let projected = runtime.block_on(projected_json(&events, &order, batch));
            prop_assert_eq!(&projected, &reference);
            Ok(())
        })
        .expect("every order converges");
    let converged: Profile = runtime.block_on(async {
        let db = TempSqlite::new();
        let store = Store::connect(&db.url()).await.expect("connect");
        apply(&store, &events).await;
        profile(&store, "p").await
    });
    expect_converged(&converged);
}

#[tokio::test]
async fn unsupported_schemes_are_refused_by_name() {
    let err = Store::connect("mysql://root:hunter2@db/crm")
        .await
        .expect_err("refused");
    assert!(matches!(&err, StoreError::UnsupportedScheme { scheme, .. } if scheme == "mysql"));
    let message = err.to_string();
    assert!(
        message.contains("\"mysql\"") && !message.contains("hunter2"),
        "{message}"
    );
}

#[tokio::test]
async fn connect_errors_name_the_backend_and_the_url() {
    let url = format!("{}_no_such_database", test_support::postgres_admin_url());
    let err = Store::connect(&url).await.expect_err("no such database");
    assert!(
        matches!(
            err,
            StoreError::Connect {
                backend: "postgres",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("no_such_database"), "{err}");
    let url = "sqlite:///nonexistent-dir/crm.db";
    let err = Store::connect(url).await.expect_err("no such directory");
    assert!(
        matches!(
            err,
            StoreError::Connect {
                backend: "sqlite",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(url), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_starting_together_on_a_new_sqlite_file_all_migrate() {
    for _ in 0..5 {
        let db = TempSqlite::new();
        let url = db.url();
        let connects: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { Store::connect(&url).await })
            })
            .collect();
        for connect in connects {
            let store = connect.await.expect("join").expect("connects and migrates");
            assert_eq!(store.processed_count().await.expect("schema in place"), 0);
        }
    }
}
