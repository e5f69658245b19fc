//! Customer context behind a bounded moka cache with a TTL; unknown customers are cached too.

use crate::{CustomerContext, Store, StoreError};
use moka::future::Cache;
use std::{sync::Arc, time::Duration};

/// [`Store::customer_context`] through a cache. Concurrent misses on one customer share a
/// single lookup. Counts `crm_cache_requests_total{cache="customer_context",result=hit|miss}`.
#[derive(Debug, Clone)]
pub struct ContextCache {
    store: Store,
    cache: Cache<(String, String), Option<CustomerContext>>,
}

impl ContextCache {
    /// At most `max_capacity` customers, each kept at most `ttl` (the bound on staleness when
    /// an invalidation is missed).
    pub fn new(store: Store, max_capacity: u64, ttl: Duration) -> Self {
        Self {
            store,
            cache: Cache::builder()
                .max_capacity(max_capacity)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// The customer's context, from the cache or the store; `None` for an unknown customer.
    pub async fn get(
        &self,
        tenant: &str,
        customer: &str,
    ) -> Result<Option<CustomerContext>, StoreError> {
        let entry = self
            .cache
            .entry((tenant.to_owned(), customer.to_owned()))
            .or_try_insert_with(self.store.customer_context(tenant, customer))
            .await
            .map_err(|shared| Arc::try_unwrap(shared).unwrap_or_else(StoreError::Shared))?;
        let result = if entry.is_fresh() { "miss" } else { "hit" };
        crate::signals::context_lookup(result);
        Ok(entry.into_value())
    }

    /// Forget one customer, e.g. after [`Store::apply_batch`] reported it changed.
    pub async fn invalidate(&self, tenant: &str, customer: &str) {
        self.cache
            .invalidate(&(tenant.to_owned(), customer.to_owned()))
            .await;
    }
}
