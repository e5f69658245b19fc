//! The customer-context cache on both backends, with its hit/miss counters. One test in its own
//! binary, because it installs the process-wide metrics recorder.

mod common;

use common::*;
use events::pb::CustomerTier;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, atomic::AtomicU64, atomic::Ordering},
    time::Duration,
};
use store::{ContextCache, CustomerContext, Store};
use test_support::{TempPostgres, TempSqlite};

/// Counters by `name{label=value,…}`.
#[derive(Debug, Default, Clone)]
struct Counters(Arc<Mutex<BTreeMap<String, Arc<AtomicU64>>>>);

impl Counters {
    fn get(&self, key: &str) -> u64 {
        let counters = self.0.lock().expect("counters lock");
        counters.get(key).map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

impl Recorder for Counters {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let labels: Vec<_> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        let mut counters = self.0.lock().expect("counters lock");
        Counter::from_arc(counters.entry(name).or_default().clone())
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

const HIT: &str = "crm_cache_requests_total{cache=customer_context,result=hit}";
const MISS: &str = "crm_cache_requests_total{cache=customer_context,result=miss}";

async fn cache_scenario(store: Store, counters: &Counters) {
    let (hits, misses) = (counters.get(HIT), counters.get(MISS));
    let cache = ContextCache::new(store.clone(), 100, Duration::from_secs(60));

    assert_eq!(cache.get(TENANT, "c9").await.expect("context"), None);
    store
        .apply_batch(&[update("c9", 1, "tier", "enterprise")])
        .await
        .expect("apply");
    assert_eq!(
        cache.get(TENANT, "c9").await.expect("context"),
        None,
        "an unknown customer is cached too"
    );
    assert_eq!(
        (counters.get(HIT) - hits, counters.get(MISS) - misses),
        (1, 1)
    );

    cache.invalidate(TENANT, "c9").await;
    let enterprise = CustomerContext {
        tier: CustomerTier::Enterprise,
        lifetime_value: vec![],
    };
    assert_eq!(
        cache.get(TENANT, "c9").await.expect("context"),
        Some(enterprise.clone())
    );
    assert_eq!(
        cache.get(TENANT, "c9").await.expect("context"),
        Some(enterprise)
    );
    assert_eq!(
        (counters.get(HIT) - hits, counters.get(MISS) - misses),
        (2, 2)
    );

    let result = store
        .apply_batch(&[won("c9", 2, "big", "USD", 9_000_000)])
        .await
        .expect("apply");
    for (tenant, customer) in &result.context_changed {
        cache.invalidate(tenant, customer).await;
    }
    let context = cache.get(TENANT, "c9").await.expect("context");
    let context = context.expect("known customer");
    assert_eq!(per_currency(&context.lifetime_value), [("USD", 9_000_000)]);
    assert_eq!(
        (counters.get(HIT) - hits, counters.get(MISS) - misses),
        (2, 3)
    );

    // An entry expires after its TTL even without an invalidation.
    let short = ContextCache::new(store.clone(), 100, Duration::from_millis(50));
    assert!(short.get(TENANT, "c10").await.expect("context").is_none());
    store
        .apply_batch(&[update("c10", 1, "tier", "free")])
        .await
        .expect("apply");
    tokio::time::sleep(Duration::from_millis(120)).await;
    let context = short.get(TENANT, "c10").await.expect("context");
    assert_eq!(context.map(|c| c.tier), Some(CustomerTier::Free));
}

#[tokio::test]
async fn context_cache_hits_misses_and_invalidates_on_both_backends() {
    let counters = Counters::default();
    metrics::set_global_recorder(counters.clone()).expect("the only recorder");

    let sqlite = TempSqlite::new();
    cache_scenario(
        Store::connect(&sqlite.url()).await.expect("SQLite"),
        &counters,
    )
    .await;
    let postgres = TempPostgres::create().await;
    cache_scenario(
        Store::connect(&postgres.url()).await.expect("PostgreSQL"),
        &counters,
    )
    .await;
}
