//! Pure classifier: TOML rules plus optional customer context decide an event's lane. No I/O.

use events::{
    Event, EventType, Lane,
    pb::{CustomerTier, TicketSeverity, event::Payload},
};
use serde::Deserialize;

/// The built-in rules (the committed `routing.toml`).
pub const DEFAULT_RULES: &str = include_str!("../../../routing.toml");

/// What the store knows about a customer that routing may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CustomerContext {
    pub tier: CustomerTier,
    pub lifetime_value_minor: i64,
}

/// Lane and why (a bounded label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub lane: Lane,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    #[error("invalid rules TOML: {0}")]
    Toml(String),
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

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
    when: RawWhen,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWhen {
    consent_granted: Option<bool>,
    min_ticket_severity: Option<String>,
    min_amount_minor: Option<i64>,
    min_customer_tier: Option<String>,
    min_lifetime_value_minor: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    lane: Lane,
    reason: String,
    types: Option<Vec<EventType>>,
    consent_granted: Option<bool>,
    min_severity: Option<TicketSeverity>,
    min_amount_minor: Option<i64>,
    min_tier: Option<CustomerTier>,
    min_lifetime_value_minor: Option<i64>,
}

/// A validated rule set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    rules: Vec<Rule>,
}

fn severity(name: &str) -> Option<TicketSeverity> {
    match name {
        "low" => Some(TicketSeverity::Low),
        "medium" => Some(TicketSeverity::Medium),
        "high" => Some(TicketSeverity::High),
        "critical" => Some(TicketSeverity::Critical),
        _ => None,
    }
}

fn tier(name: &str) -> Option<CustomerTier> {
    match name {
        "free" => Some(CustomerTier::Free),
        "standard" => Some(CustomerTier::Standard),
        "premium" => Some(CustomerTier::Premium),
        "enterprise" => Some(CustomerTier::Enterprise),
        _ => None,
    }
}

impl Default for Rules {
    fn default() -> Self {
        // The committed file is checked by a test, so this cannot fail.
        Self::from_toml(DEFAULT_RULES).unwrap_or(Self { rules: Vec::new() })
    }
}

impl Rules {
    pub fn from_toml(text: &str) -> Result<Self, RulesError> {
        let raw: RawRules = toml::from_str(text).map_err(|e| RulesError::Toml(e.to_string()))?;
        let mut rules = Vec::new();
        for (lane, section, list) in [
            (Lane::Critical, "critical", raw.critical),
            (Lane::High, "high", raw.high),
        ] {
            for (index, rule) in list.into_iter().enumerate() {
                let invalid = |field: &str, message: String| RulesError::Invalid {
                    path: format!("{section}[{index}].{field}"),
                    message,
                };
                if rule.reason.is_empty()
                    || rule.reason == "default"
                    || !rule
                        .reason
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                {
                    return Err(invalid(
                        "reason",
                        format!(
                            "{:?} must be a non-empty [a-z0-9_] label other than \"default\"",
                            rule.reason
                        ),
                    ));
                }
                let types = match rule.types {
                    None => None,
                    Some(names) => Some(
                        names
                            .iter()
                            .enumerate()
                            .map(|(i, name)| {
                                EventType::from_name(name).ok_or_else(|| {
                                    invalid(
                                        &format!("types[{i}]"),
                                        format!("unknown event type {name:?}"),
                                    )
                                })
                            })
                            .collect::<Result<Vec<_>, _>>()?,
                    ),
                };
                let when = rule.when;
                let min_severity = when
                    .min_ticket_severity
                    .map(|n| {
                        severity(&n).ok_or_else(|| {
                            invalid(
                                "when.min_ticket_severity",
                                format!("unknown severity {n:?}"),
                            )
                        })
                    })
                    .transpose()?;
                let min_tier = when
                    .min_customer_tier
                    .map(|n| {
                        tier(&n).ok_or_else(|| {
                            invalid("when.min_customer_tier", format!("unknown tier {n:?}"))
                        })
                    })
                    .transpose()?;
                rules.push(Rule {
                    lane,
                    reason: rule.reason,
                    types,
                    consent_granted: when.consent_granted,
                    min_severity,
                    min_amount_minor: when.min_amount_minor,
                    min_tier,
                    min_lifetime_value_minor: when.min_lifetime_value_minor,
                });
            }
        }
        Ok(Self { rules })
    }

    /// Whether classifying `event` may need the customer's context: some rule that applies to
    /// this type needs it, and no context-free rule before it already matches.
    pub fn needs_customer_context(&self, event: &Event) -> bool {
        let Some(kind) = EventType::of(event) else {
            return false;
        };
        for rule in &self.rules {
            if !rule.applies_to(kind) {
                continue;
            }
            if rule.needs_context() {
                return true;
            }
            if rule.matches(event, None) {
                return false;
            }
        }
        false
    }

    /// The lane for `event`. Rules needing context do not match when `context` is `None`.
    pub fn classify(&self, event: &Event, context: Option<&CustomerContext>) -> Decision {
        self.rules
            .iter()
            .find(|rule| {
                EventType::of(event).is_some_and(|k| rule.applies_to(k))
                    && rule.matches(event, context)
            })
            .map_or_else(
                || Decision {
                    lane: Lane::Standard,
                    reason: "default".into(),
                },
                |rule| Decision {
                    lane: rule.lane,
                    reason: rule.reason.clone(),
                },
            )
    }

    /// Every reason a decision can carry.
    pub fn reasons(&self) -> impl Iterator<Item = &str> {
        self.rules
            .iter()
            .map(|r| r.reason.as_str())
            .chain(["default"])
    }
}

fn amount(payload: &Payload) -> Option<i64> {
    match payload {
        Payload::DealWon(p) => p.amount.as_ref().map(|m| m.minor_units),
        Payload::DealStageChanged(p) => p.amount.as_ref().map(|m| m.minor_units),
        Payload::PaymentFailed(p) => p.amount.as_ref().map(|m| m.minor_units),
        _ => None,
    }
}

fn ticket_severity(payload: &Payload) -> Option<i32> {
    match payload {
        Payload::TicketOpened(p) => Some(p.severity),
        Payload::TicketEscalated(p) => Some(p.severity),
        _ => None,
    }
}

impl Rule {
    fn applies_to(&self, kind: EventType) -> bool {
        self.types
            .as_ref()
            .is_none_or(|types| types.contains(&kind))
    }

    fn needs_context(&self) -> bool {
        self.min_tier.is_some() || self.min_lifetime_value_minor.is_some()
    }

    fn matches(&self, event: &Event, context: Option<&CustomerContext>) -> bool {
        let Some(payload) = event.payload.as_ref() else {
            return false;
        };
        if let Some(granted) = self.consent_granted {
            let Payload::ConsentChanged(consent) = payload else {
                return false;
            };
            if consent.granted != granted {
                return false;
            }
        }
        if let Some(min) = self.min_severity
            && ticket_severity(payload).is_none_or(|s| s < min as i32)
        {
            return false;
        }
        if let Some(min) = self.min_amount_minor
            && amount(payload).is_none_or(|a| a < min)
        {
            return false;
        }
        if self.needs_context() {
            let Some(context) = context else { return false };
            if self
                .min_tier
                .is_some_and(|min| (context.tier as i32) < min as i32)
            {
                return false;
            }
            if self
                .min_lifetime_value_minor
                .is_some_and(|min| context.lifetime_value_minor < min)
            {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::{
        pb::{ConsentChanged, Money},
        sample,
    };
    use proptest::prelude::*;

    fn event(kind: EventType) -> Event {
        sample::event(kind, "acme", "c1")
    }

    fn decide(event: &Event, context: Option<&CustomerContext>) -> (Lane, String) {
        let d = Rules::default().classify(event, context);
        (d.lane, d.reason)
    }

    #[test]
    fn default_rules_parse_and_cover_both_lanes() {
        let rules = Rules::from_toml(DEFAULT_RULES).expect("committed routing.toml is valid");
        assert_eq!(rules, Rules::default());
        assert_eq!(rules.rules.len(), 6);
    }

    #[test]
    fn critical_by_type_and_predicate() {
        assert_eq!(
            decide(&event(EventType::PaymentFailed), None),
            (Lane::Critical, "payment_failed".into())
        );
        let mut consent = event(EventType::ConsentChanged);
        assert_eq!(
            decide(&consent, None),
            (Lane::Critical, "consent_revoked".into())
        );
        consent.payload = Some(Payload::ConsentChanged(ConsentChanged {
            channel: 1,
            granted: true,
        }));
        assert_eq!(decide(&consent, None), (Lane::Standard, "default".into()));
        // Sample escalation is critical severity; sample opening is medium.
        assert_eq!(
            decide(&event(EventType::TicketEscalated), None),
            (Lane::Critical, "ticket_severity".into())
        );
        assert_eq!(
            decide(&event(EventType::TicketOpened), None),
            (Lane::Standard, "default".into())
        );
    }

    #[test]
    fn high_value_by_amount_and_context() {
        let mut won = event(EventType::DealWon);
        assert_eq!(decide(&won, None), (Lane::High, "deal_amount".into()));
        if let Some(Payload::DealWon(p)) = won.payload.as_mut() {
            p.amount = Some(Money {
                currency_code: "USD".into(),
                minor_units: 999_999,
            });
        }
        assert_eq!(decide(&won, None), (Lane::Standard, "default".into()));
        let premium = CustomerContext {
            tier: CustomerTier::Premium,
            lifetime_value_minor: 0,
        };
        let whale = CustomerContext {
            tier: CustomerTier::Free,
            lifetime_value_minor: 5_000_000,
        };
        let small = CustomerContext {
            tier: CustomerTier::Standard,
            lifetime_value_minor: 10,
        };
        let page = event(EventType::PageViewed);
        assert_eq!(
            decide(&page, Some(&premium)),
            (Lane::High, "customer_tier".into())
        );
        assert_eq!(
            decide(&page, Some(&whale)),
            (Lane::High, "lifetime_value".into())
        );
        assert_eq!(
            decide(&page, Some(&small)),
            (Lane::Standard, "default".into())
        );
        assert_eq!(decide(&page, None), (Lane::Standard, "default".into()));
    }

    #[test]
    fn context_is_looked_up_only_when_it_can_matter() {
        let rules = Rules::default();
        assert!(
            !rules.needs_customer_context(&event(EventType::PaymentFailed)),
            "critical by type already"
        );
        assert!(
            !rules.needs_customer_context(&event(EventType::DealWon)),
            "big deal matches first"
        );
        assert!(rules.needs_customer_context(&event(EventType::PageViewed)));
        let no_context_rules =
            Rules::from_toml("[[critical]]\nreason = \"x\"\ntypes = [\"deal_lost\"]\n")
                .expect("rules");
        assert!(!no_context_rules.needs_customer_context(&event(EventType::PageViewed)));
    }

    #[test]
    fn errors_name_the_rule_and_field() {
        let err = |text: &str| Rules::from_toml(text).expect_err("invalid").to_string();
        assert_eq!(
            err(
                "[[high]]\nreason = \"a\"\n[[high]]\nreason = \"b\"\nwhen = { min_customer_tier = \"gold\" }\n"
            ),
            "high[1].when.min_customer_tier: unknown tier \"gold\""
        );
        assert_eq!(
            err("[[critical]]\nreason = \"a\"\ntypes = [\"deal_won\", \"nope\"]\n"),
            "critical[0].types[1]: unknown event type \"nope\""
        );
        assert!(err("[[critical]]\nreason = \"Bad Label\"\n").starts_with("critical[0].reason"));
        assert!(
            err("[[critical]]\nreason = \"a\"\nwhen = { colour = 1 }\n").contains("unknown field")
        );
        assert!(err("[[medium]]\nreason = \"a\"\n").contains("unknown field"));
    }

    proptest! {
        #[test]
        fn decisions_carry_a_known_reason(kind in 0usize..12, tier in 0i32..5, ltv in any::<i64>(), with_context in any::<bool>()) {
            let rules = Rules::default();
            let event = event(EventType::ALL[kind]);
            let context = CustomerContext { tier: CustomerTier::try_from(tier).unwrap_or_default(), lifetime_value_minor: ltv };
            let decision = rules.classify(&event, with_context.then_some(&context));
            prop_assert!(rules.reasons().any(|r| r == decision.reason));
            prop_assert_eq!(decision.lane == Lane::Standard, decision.reason == "default");
        }
    }
}
