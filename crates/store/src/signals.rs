//! Everything the store reports, in one place: transaction stages, the context cache, writer
//! yields, conflicts and ledger pruning.

use std::time::Instant;

/// Record how long a transaction spent in `stage` since `since` (`crm_store_stage_seconds`);
/// returns now, where the next stage starts.
pub(crate) fn stage(op: &'static str, stage: &'static str, since: Instant) -> Instant {
    let now = Instant::now();
    metrics::histogram!("crm_store_stage_seconds", "op" => op, "stage" => stage)
        .record(now.duration_since(since).as_secs_f64());
    now
}

/// A customer-context lookup: `hit` or `miss`.
pub(crate) fn context_lookup(result: &'static str) {
    metrics::counter!("crm_cache_requests_total", "cache" => "customer_context", "result" => result)
        .increment(1);
}

/// A bulk batch let a priority transaction in between its segments.
pub(crate) fn writer_yielded() {
    metrics::counter!("crm_store_writer_yields_total").increment(1);
}

/// Priority batches that shared one transaction (`batches` of them, so `batches - 1` commits
/// saved).
pub(crate) fn priority_combined(batches: usize) {
    metrics::counter!("crm_store_priority_combined_total").increment(batches as u64);
}

/// Field writes that lost to a newer value (last writer wins).
pub(crate) fn conflicts(count: u64) {
    metrics::counter!("crm_projector_conflicts_total").increment(count);
}

/// Ledger rows removed past retention.
pub(crate) fn ledger_pruned(rows: u64) {
    metrics::counter!("crm_store_ledger_pruned_total").increment(rows);
}
