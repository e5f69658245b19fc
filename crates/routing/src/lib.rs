//! Pure event classifier: TOML rules plus optional customer context decide an event's lane. No I/O.
//!
//! Critical rules are checked first, then high, in file order; the first match wins and anything
//! else goes to the standard lane with reason [`DEFAULT_REASON`]. The format is documented in
//! [`EXAMPLE_TOML`], which is also what [`Rules::default`] holds.

use events::{
    Event, EventType, Lane,
    pb::{CustomerTier, TicketSeverity, event::Payload},
};
use serde::Deserialize;
use std::collections::BTreeMap;

#[cfg(test)]
mod tests;

/// The documented example rule file; [`Rules::default`] is equal to it (a test checks).
pub const EXAMPLE_TOML: &str = include_str!("../routing.example.toml");

/// The reason of every standard-lane decision.
pub const DEFAULT_REASON: &str = "default";

/// Longest accepted reason label (it is a metric label and a header value).
pub const MAX_REASON_LEN: usize = 64;

/// What the store knows about a customer that routing may use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CustomerContext {
    pub tier: CustomerTier,
    /// Lifetime value in minor units by ISO 4217 currency code (`USD`); amounts in different
    /// currencies are never added, and a currency the customer never paid in is absent.
    pub lifetime_value: BTreeMap<String, i64>,
}

/// The lane an event goes to and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub lane: Lane,
    /// The deciding rule's reason, or [`DEFAULT_REASON`]: a bounded label.
    pub reason: String,
}

/// A rule file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("routing rules are not valid: {0}")]
    Toml(#[from] toml::de::Error),
    /// A rule breaks a constraint; `path` is e.g. `high[1].when.min_customer_tier`.
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// A validated rule set; cheap to evaluate, immutable once built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// Critical rules, then high rules, each in file order.
    rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    lane: Lane,
    reason: String,
    types: TypeSet,
    when: Conditions,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Conditions {
    consent_granted: Option<bool>,
    min_ticket_severity: Option<TicketSeverity>,
    min_amount_minor: Option<i64>,
    min_customer_tier: Option<CustomerTier>,
    /// Thresholds by currency code (never empty): holds when the lifetime value in any of
    /// them reaches its threshold.
    min_lifetime_value: Option<BTreeMap<String, i64>>,
}

/// A set of event types as a bit mask (bit = declaration index of [`EventType`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TypeSet(u16);

impl TypeSet {
    const ALL: Self = Self::of(&EventType::ALL);

    const fn of(kinds: &[EventType]) -> Self {
        let mut bits = 0;
        let mut i = 0;
        while i < kinds.len() {
            bits |= 1 << kinds[i] as u16;
            i += 1;
        }
        Self(bits)
    }

    const fn contains(self, kind: EventType) -> bool {
        self.0 & (1 << kind as u16) != 0
    }

    fn names(self) -> String {
        let names: Vec<_> = EventType::ALL
            .into_iter()
            .filter(|kind| self.contains(*kind))
            .map(EventType::as_str)
            .collect();
        names.join(", ")
    }
}

/// The types whose payload carries what each event condition looks at.
const CONSENT_TYPES: TypeSet = TypeSet::of(&[EventType::ConsentChanged]);
const SEVERITY_TYPES: TypeSet = TypeSet::of(&[EventType::TicketOpened, EventType::TicketEscalated]);
const AMOUNT_TYPES: TypeSet = TypeSet::of(&[
    EventType::DealStageChanged,
    EventType::DealWon,
    EventType::PaymentFailed,
]);

const SEVERITY_NAMES: [(&str, TicketSeverity); 4] = [
    ("low", TicketSeverity::Low),
    ("medium", TicketSeverity::Medium),
    ("high", TicketSeverity::High),
    ("critical", TicketSeverity::Critical),
];

const TIER_NAMES: [(&str, CustomerTier); 4] = [
    ("free", CustomerTier::Free),
    ("standard", CustomerTier::Standard),
    ("premium", CustomerTier::Premium),
    ("enterprise", CustomerTier::Enterprise),
];

/// What the event conditions look at, read from an event once per decision.
struct Facts {
    kind: EventType,
    consent_granted: Option<bool>,
    /// `None` for a value this build does not know.
    ticket_severity: Option<TicketSeverity>,
    amount_minor: Option<i64>,
}

impl Facts {
    fn of(event: &Event) -> Option<Self> {
        let payload = event.payload.as_ref()?;
        let severity = |value: i32| TicketSeverity::try_from(value).ok();
        let (consent_granted, ticket_severity, amount) = match payload {
            Payload::ConsentChanged(p) => (Some(p.granted), None, None),
            Payload::TicketOpened(p) => (None, severity(p.severity), None),
            Payload::TicketEscalated(p) => (None, severity(p.severity), None),
            Payload::DealWon(p) => (None, None, p.amount.as_ref()),
            Payload::DealStageChanged(p) => (None, None, p.amount.as_ref()),
            Payload::PaymentFailed(p) => (None, None, p.amount.as_ref()),
            _ => (None, None, None),
        };
        Some(Self {
            kind: EventType::of_payload(payload),
            consent_granted,
            ticket_severity,
            amount_minor: amount.map(|money| money.minor_units),
        })
    }
}

impl Rules {
    /// Parse and validate a rule file (format: [`EXAMPLE_TOML`]).
    pub fn from_toml(text: &str) -> Result<Self, RulesError> {
        let raw: RawRules = toml::from_str(text)?;
        let mut rules = Vec::with_capacity(raw.critical.len() + raw.high.len());
        for (lane, list) in [(Lane::Critical, raw.critical), (Lane::High, raw.high)] {
            for (index, rule) in list.into_iter().enumerate() {
                rules.push(rule.validate(lane, index)?);
            }
        }
        Ok(Self { rules })
    }

    /// Whether [`classify`](Self::classify) could decide differently with the customer's
    /// context: the first rule whose event conditions hold needs it. When this is `false` the
    /// caller can skip the lookup and pass `None`.
    pub fn needs_customer_context(&self, event: &Event) -> bool {
        Facts::of(event).is_some_and(|facts| {
            self.rules
                .iter()
                .find(|rule| rule.matches_event(&facts))
                .is_some_and(|rule| rule.when.needs_context())
        })
    }

    /// The lane for `event`. Conditions on the customer never hold when `context` is `None`.
    pub fn classify(&self, event: &Event, context: Option<&CustomerContext>) -> Decision {
        let rule = Facts::of(event).and_then(|facts| {
            self.rules
                .iter()
                .find(|rule| rule.matches_event(&facts) && rule.when.matches_context(context))
        });
        match rule {
            Some(rule) => Decision {
                lane: rule.lane,
                reason: rule.reason.clone(),
            },
            None => Decision {
                lane: Lane::Standard,
                reason: DEFAULT_REASON.to_owned(),
            },
        }
    }

    /// Every reason a decision can carry, in rule order, ending with [`DEFAULT_REASON`]
    /// (a reason used by several rules repeats).
    pub fn reasons(&self) -> impl Iterator<Item = &str> {
        self.rules
            .iter()
            .map(|rule| rule.reason.as_str())
            .chain([DEFAULT_REASON])
    }
}

impl Default for Rules {
    /// The rules of [`EXAMPLE_TOML`], built without parsing so this cannot fail.
    fn default() -> Self {
        let rule = |lane, reason: &str, types, when| Rule {
            lane,
            reason: reason.to_owned(),
            types,
            when,
        };
        let none = Conditions::default();
        Self {
            rules: vec![
                rule(
                    Lane::Critical,
                    "consent_revoked",
                    CONSENT_TYPES,
                    Conditions {
                        consent_granted: Some(false),
                        ..none.clone()
                    },
                ),
                rule(
                    Lane::Critical,
                    "payment_failed",
                    TypeSet::of(&[EventType::PaymentFailed]),
                    none.clone(),
                ),
                rule(
                    Lane::Critical,
                    "ticket_severity",
                    SEVERITY_TYPES,
                    Conditions {
                        min_ticket_severity: Some(TicketSeverity::High),
                        ..none.clone()
                    },
                ),
                rule(
                    Lane::High,
                    "deal_amount",
                    TypeSet::of(&[EventType::DealWon, EventType::DealStageChanged]),
                    Conditions {
                        min_amount_minor: Some(1_000_000),
                        ..none.clone()
                    },
                ),
                rule(
                    Lane::High,
                    "customer_tier",
                    TypeSet::ALL,
                    Conditions {
                        min_customer_tier: Some(CustomerTier::Premium),
                        ..none.clone()
                    },
                ),
                rule(
                    Lane::High,
                    "lifetime_value",
                    TypeSet::ALL,
                    Conditions {
                        min_lifetime_value: Some(BTreeMap::from([
                            ("EUR".to_owned(), 4_500_000),
                            ("USD".to_owned(), 5_000_000),
                        ])),
                        ..none
                    },
                ),
            ],
        }
    }
}

impl Rule {
    fn matches_event(&self, facts: &Facts) -> bool {
        let when = &self.when;
        self.types.contains(facts.kind)
            && when
                .consent_granted
                .is_none_or(|want| facts.consent_granted == Some(want))
            && when
                .min_ticket_severity
                .is_none_or(|min| facts.ticket_severity.is_some_and(|s| s >= min))
            && when
                .min_amount_minor
                .is_none_or(|min| facts.amount_minor.is_some_and(|a| a >= min))
    }
}

impl Conditions {
    fn needs_context(&self) -> bool {
        self.min_customer_tier.is_some() || self.min_lifetime_value.is_some()
    }

    fn matches_context(&self, context: Option<&CustomerContext>) -> bool {
        if !self.needs_context() {
            return true;
        }
        context.is_some_and(|context| {
            self.min_customer_tier.is_none_or(|min| context.tier >= min)
                && self.min_lifetime_value.as_ref().is_none_or(|thresholds| {
                    thresholds.iter().any(|(currency, min)| {
                        context
                            .lifetime_value
                            .get(currency)
                            .is_some_and(|value| value >= min)
                    })
                })
        })
    }
}

// ---- the file format -------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    #[serde(default)]
    critical: Vec<RawRule>,
    #[serde(default)]
    high: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    reason: String,
    types: Option<Vec<String>>,
    #[serde(default)]
    when: RawConditions,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConditions {
    consent_granted: Option<bool>,
    min_ticket_severity: Option<String>,
    min_amount_minor: Option<i64>,
    min_customer_tier: Option<String>,
    min_lifetime_value: Option<BTreeMap<String, i64>>,
    /// Replaced by `min_lifetime_value`; read only to be refused with a message that says so.
    min_lifetime_value_minor: Option<toml::Value>,
}

impl RawRule {
    fn validate(self, lane: Lane, index: usize) -> Result<Rule, RulesError> {
        let invalid = |field: &str, message: String| RulesError::Invalid {
            path: format!("{lane}[{index}].{field}"),
            message,
        };

        let reason = self.reason;
        let label_ok = !reason.is_empty()
            && reason.len() <= MAX_REASON_LEN
            && reason
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !label_ok || reason == DEFAULT_REASON {
            return Err(invalid(
                "reason",
                format!(
                    "{reason:?} must be 1 to {MAX_REASON_LEN} of [a-z0-9_] and not {DEFAULT_REASON:?}"
                ),
            ));
        }

        let types = match &self.types {
            None => TypeSet::ALL,
            Some(names) if names.is_empty() => {
                return Err(invalid(
                    "types",
                    "names no event type (omit it to match every type)".into(),
                ));
            }
            Some(names) => {
                let mut kinds = Vec::with_capacity(names.len());
                for (i, name) in names.iter().enumerate() {
                    let kind = EventType::from_name(name).ok_or_else(|| {
                        invalid(
                            &format!("types[{i}]"),
                            format!("unknown event type {name:?}"),
                        )
                    })?;
                    kinds.push(kind);
                }
                TypeSet::of(&kinds)
            }
        };

        let raw = self.when;
        if raw.min_lifetime_value_minor.is_some() {
            return Err(invalid(
                "when.min_lifetime_value_minor",
                "is no longer supported: lifetime value is kept per currency; use \
                 min_lifetime_value = { USD = 5000000, EUR = 4500000 } (matches when the value in \
                 any listed currency reaches its threshold)"
                    .into(),
            ));
        }
        let when = Conditions {
            consent_granted: raw.consent_granted,
            min_ticket_severity: named(&raw.min_ticket_severity, &SEVERITY_NAMES).map_err(
                |msg| {
                    invalid(
                        "when.min_ticket_severity",
                        format!("unknown severity {msg}"),
                    )
                },
            )?,
            min_amount_minor: non_negative(raw.min_amount_minor)
                .map_err(|msg| invalid("when.min_amount_minor", msg))?,
            min_customer_tier: named(&raw.min_customer_tier, &TIER_NAMES)
                .map_err(|msg| invalid("when.min_customer_tier", format!("unknown tier {msg}")))?,
            min_lifetime_value: raw
                .min_lifetime_value
                .map(|thresholds| per_currency(thresholds, "when.min_lifetime_value", &invalid))
                .transpose()?,
        };

        // A condition on a field the event type does not carry can never hold: refuse rules
        // that could never match rather than silently never routing by them.
        let mut scope = types;
        for (field, present, applies) in [
            (
                "consent_granted",
                when.consent_granted.is_some(),
                CONSENT_TYPES,
            ),
            (
                "min_ticket_severity",
                when.min_ticket_severity.is_some(),
                SEVERITY_TYPES,
            ),
            (
                "min_amount_minor",
                when.min_amount_minor.is_some(),
                AMOUNT_TYPES,
            ),
        ] {
            if !present {
                continue;
            }
            let path = format!("when.{field}");
            if self.types.is_some()
                && let Some(kind) = EventType::ALL
                    .into_iter()
                    .find(|kind| scope.contains(*kind) && !applies.contains(*kind))
            {
                return Err(invalid(
                    &path,
                    format!(
                        "does not apply to {:?}, only to {}",
                        kind.as_str(),
                        applies.names()
                    ),
                ));
            }
            scope = TypeSet(scope.0 & applies.0);
            if scope.0 == 0 {
                return Err(invalid(
                    &path,
                    "no event type carries both this and an earlier condition".into(),
                ));
            }
        }

        Ok(Rule {
            lane,
            reason,
            types,
            when,
        })
    }
}

/// The value `name` stands for in `table`; the error lists the accepted names.
fn named<T: Copy>(name: &Option<String>, table: &[(&str, T)]) -> Result<Option<T>, String> {
    let Some(name) = name else { return Ok(None) };
    match table.iter().find(|(n, _)| n == name) {
        Some((_, value)) => Ok(Some(*value)),
        None => {
            let known: Vec<_> = table.iter().map(|(n, _)| *n).collect();
            Err(format!("{name:?} (one of {})", known.join(", ")))
        }
    }
}

/// Thresholds by currency: at least one, each code ISO 4217-shaped (three capital letters, as
/// events carry them), each threshold >= 0.
fn per_currency(
    thresholds: BTreeMap<String, i64>,
    path: &str,
    invalid: &impl Fn(&str, String) -> RulesError,
) -> Result<BTreeMap<String, i64>, RulesError> {
    if thresholds.is_empty() {
        return Err(invalid(
            path,
            "names no currency (e.g. { USD = 5000000 })".into(),
        ));
    }
    for (currency, &threshold) in &thresholds {
        let field = format!("{path}.{currency}");
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(invalid(
                &field,
                "is not an ISO 4217 currency code such as \"USD\"".into(),
            ));
        }
        non_negative(Some(threshold)).map_err(|msg| invalid(&field, msg))?;
    }
    Ok(thresholds)
}

fn non_negative(value: Option<i64>) -> Result<Option<i64>, String> {
    match value {
        Some(v) if v < 0 => Err(format!("{v} must be >= 0")),
        _ => Ok(value),
    }
}
