//! What the store returns: the profile (serialized as the body of `GET /v1/customers/{id}`),
//! customer context and the conflict log.

use events::pb::CustomerTier;
use serde::Serialize;
use std::collections::BTreeMap;

/// What routing may know about a customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerContext {
    pub tier: CustomerTier,
    /// The customer's lifetime value: see [`Profile::lifetime_value`].
    pub lifetime_value: Vec<CurrencyAmount>,
}

/// An amount of one currency, in its minor unit (cents for USD).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CurrencyAmount {
    /// ISO 4217, e.g. `USD`.
    pub currency_code: String,
    pub minor_units: i64,
}

/// A customer's projected profile. Maps are ordered, so equal profiles serialize identically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Profile {
    pub tenant_id: String,
    pub customer_id: String,
    /// Contact fields by proto field name; a cleared field is `""`. `tier` is its lower-case
    /// label (`premium`).
    pub fields: BTreeMap<String, String>,
    /// Which write each field holds.
    pub field_versions: BTreeMap<String, FieldVersion>,
    /// Lower-case tier label; `unspecified` when unknown or cleared.
    pub tier: String,
    /// The sum of the latest amounts of the customer's won deals, one entry per currency
    /// (never added across currencies), ordered by currency code; empty without a won deal.
    /// Sums saturate at `i64::MAX` rather than fail or wrap.
    pub lifetime_value: Vec<CurrencyAmount>,
    /// By lower-case channel name (`email`, `sms`, …).
    pub consents: BTreeMap<String, Consent>,
    /// Ordered by deal id.
    pub deals: Vec<Deal>,
    /// Ordered by ticket id.
    pub tickets: Vec<Ticket>,
    pub payment_failures: i64,
    /// Distinct events applied to this customer.
    pub events_applied: i64,
    /// The latest `occurred_at` of an applied event (RFC 3339).
    pub last_event_at: String,
}

/// The last-writer-wins key of a register: the winning write's time and event id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldVersion {
    /// RFC 3339, UTC.
    pub occurred_at: String,
    pub event_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Consent {
    pub granted: bool,
    pub occurred_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Deal {
    pub deal_id: String,
    /// The latest stage (`closed_won`/`closed_lost` once closed).
    pub stage: String,
    /// `open`, `won` or `lost`.
    pub status: String,
    /// The latest amount any event of the deal carried.
    pub amount_minor: Option<i64>,
    pub currency: Option<String>,
    pub occurred_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ticket {
    pub ticket_id: String,
    /// `low`, `medium`, `high` or `critical`.
    pub severity: String,
    /// `open` or `escalated`.
    pub status: String,
    pub occurred_at: String,
}

/// A profile field write that lost to a newer one with a different value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    pub field: String,
    pub losing_value: String,
    pub losing_event_id: String,
    pub losing_occurred_at: String,
    pub winning_event_id: String,
}

/// Nanoseconds since the epoch as RFC 3339 (UTC, only as many fraction digits as needed).
pub(crate) fn rfc3339(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// Per-currency sums of `(currency, minor_units)` amounts, saturating, ordered by currency code.
pub(crate) fn sum_by_currency(
    amounts: impl IntoIterator<Item = (String, i64)>,
) -> Vec<CurrencyAmount> {
    let mut sums: BTreeMap<String, i64> = BTreeMap::new();
    for (currency, minor_units) in amounts {
        let sum = sums.entry(currency).or_default();
        *sum = sum.saturating_add(minor_units);
    }
    sums.into_iter()
        .map(|(currency_code, minor_units)| CurrencyAmount {
            currency_code,
            minor_units,
        })
        .collect()
}
