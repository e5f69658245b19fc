//! What the analytics consumer reports besides the throttler's decisions (those go out with the
//! throttle report, in `throttler`).

/// An ingest message analytics could not read (`reason`: `invalid_event`); the router
/// dead-letters it with its reason.
pub(crate) fn skipped(reason: &'static str) {
    metrics::counter!("crm_analytics_skipped_total", "reason" => reason).increment(1);
}

/// Events already counted (a redelivery or a replay): no second effect.
pub(crate) fn duplicates(count: u64) {
    metrics::counter!("crm_analytics_duplicates_total").increment(count);
}
