//! Customer context behind a bounded moka cache with TTL; negative results are cached too.

use crate::{CustomerContext, Store, StoreError};
use moka::future::Cache;
use std::time::Duration;

/// Cached [`Store::customer_context`].
#[derive(Debug, Clone)]
pub struct ContextCache {
    store: Store,
    cache: Cache<(String, String), Option<CustomerContext>>,
}

impl ContextCache {
    pub fn new(store: Store, max_capacity: u64, ttl: Duration) -> Self {
        Self {
            store,
            cache: Cache::builder()
                .max_capacity(max_capacity)
                .time_to_live(ttl)
                .build(),
        }
    }

    pub async fn get(
        &self,
        tenant: &str,
        customer: &str,
    ) -> Result<Option<CustomerContext>, StoreError> {
        let key = (tenant.to_owned(), customer.to_owned());
        if let Some(hit) = self.cache.get(&key).await {
            metrics::counter!("crm_cache_requests_total", "cache" => "customer_context", "result" => "hit").increment(1);
            return Ok(hit);
        }
        metrics::counter!("crm_cache_requests_total", "cache" => "customer_context", "result" => "miss").increment(1);
        let context = self.store.customer_context(tenant, customer).await?;
        self.cache.insert(key, context).await;
        Ok(context)
    }

    pub async fn invalidate(&self, tenant: &str, customer: &str) {
        self.cache
            .invalidate(&(tenant.to_owned(), customer.to_owned()))
            .await;
    }
}
