//! What an event writes, as last-writer-wins registers (pure; no I/O).

use events::{
    Event,
    pb::{ConsentChannel, CustomerTier, TicketSeverity, event::Payload},
};

/// One register write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Field {
        field: &'static str,
        value: String,
    },
    Consent {
        channel: String,
        granted: bool,
    },
    DealState {
        deal_id: String,
        stage: String,
        status: &'static str,
    },
    DealAmount {
        deal_id: String,
        minor_units: i64,
        currency: String,
    },
    Ticket {
        ticket_id: String,
        severity: String,
        status: &'static str,
    },
}

/// Lower-case name of a proto enum value without its type prefix (`CUSTOMER_TIER_PREMIUM` → `premium`).
pub fn enum_label(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

pub fn tier_label(tier: i32) -> String {
    CustomerTier::try_from(tier)
        .map(|t| enum_label(t.as_str_name(), "CUSTOMER_TIER_"))
        .unwrap_or_else(|_| "unspecified".into())
}

pub fn tier_from_label(label: &str) -> CustomerTier {
    CustomerTier::from_str_name(&format!("CUSTOMER_TIER_{}", label.to_ascii_uppercase()))
        .unwrap_or(CustomerTier::Unspecified)
}

fn contact_value(contact: &events::pb::Contact, field: &str) -> Option<String> {
    Some(match field {
        "email" => contact.email.clone(),
        "first_name" => contact.first_name.clone(),
        "last_name" => contact.last_name.clone(),
        "phone" => contact.phone.clone(),
        "company" => contact.company.clone(),
        "title" => contact.title.clone(),
        "tier" => {
            if contact.tier == 0 {
                String::new()
            } else {
                tier_label(contact.tier)
            }
        }
        "lifecycle_stage" => contact.lifecycle_stage.clone(),
        "country_code" => contact.country_code.clone(),
        _ => return None,
    })
}

/// The writes `event` makes. ContactCreated writes every non-empty field; ContactUpdated writes
/// exactly the fields its mask names (an empty value clears the field).
pub fn writes(event: &Event) -> Vec<Write> {
    let Some(payload) = event.payload.as_ref() else {
        return Vec::new();
    };
    let field = |name: &str, value: String| {
        events::CONTACT_FIELDS
            .iter()
            .find(|f| **f == name)
            .map(|field| Write::Field { field, value })
    };
    match payload {
        Payload::ContactCreated(p) => p
            .contact
            .as_ref()
            .map(|c| {
                events::CONTACT_FIELDS
                    .iter()
                    .filter_map(|name| {
                        contact_value(c, name)
                            .filter(|v| !v.is_empty())
                            .and_then(|v| field(name, v))
                    })
                    .collect()
            })
            .unwrap_or_default(),
        Payload::ContactUpdated(p) => {
            let default = events::pb::Contact::default();
            let contact = p.contact.as_ref().unwrap_or(&default);
            let mut paths: Vec<&str> = p
                .update_mask
                .as_ref()
                .map(|m| m.paths.iter().map(String::as_str).collect())
                .unwrap_or_default();
            paths.sort_unstable();
            paths.dedup();
            paths
                .into_iter()
                .filter_map(|name| contact_value(contact, name).and_then(|v| field(name, v)))
                .collect()
        }
        Payload::DealStageChanged(p) => {
            let mut out = vec![Write::DealState {
                deal_id: p.deal_id.clone(),
                stage: p.to_stage.clone(),
                status: "open",
            }];
            if let Some(amount) = &p.amount {
                out.push(Write::DealAmount {
                    deal_id: p.deal_id.clone(),
                    minor_units: amount.minor_units,
                    currency: amount.currency_code.clone(),
                });
            }
            out
        }
        Payload::DealWon(p) => {
            let mut out = vec![Write::DealState {
                deal_id: p.deal_id.clone(),
                stage: "closed_won".into(),
                status: "won",
            }];
            if let Some(amount) = &p.amount {
                out.push(Write::DealAmount {
                    deal_id: p.deal_id.clone(),
                    minor_units: amount.minor_units,
                    currency: amount.currency_code.clone(),
                });
            }
            out
        }
        Payload::DealLost(p) => vec![Write::DealState {
            deal_id: p.deal_id.clone(),
            stage: "closed_lost".into(),
            status: "lost",
        }],
        Payload::TicketOpened(p) => vec![Write::Ticket {
            ticket_id: p.ticket_id.clone(),
            severity: severity_label(p.severity),
            status: "open",
        }],
        Payload::TicketEscalated(p) => vec![Write::Ticket {
            ticket_id: p.ticket_id.clone(),
            severity: severity_label(p.severity),
            status: "escalated",
        }],
        Payload::ConsentChanged(p) => vec![Write::Consent {
            channel: ConsentChannel::try_from(p.channel)
                .map(|c| enum_label(c.as_str_name(), "CONSENT_CHANNEL_"))
                .unwrap_or_else(|_| "unspecified".into()),
            granted: p.granted,
        }],
        Payload::PaymentFailed(_)
        | Payload::PageViewed(_)
        | Payload::EmailOpened(_)
        | Payload::EmailClicked(_) => Vec::new(),
    }
}

fn severity_label(severity: i32) -> String {
    TicketSeverity::try_from(severity)
        .map(|s| enum_label(s.as_str_name(), "TICKET_SEVERITY_"))
        .unwrap_or_else(|_| "unspecified".into())
}

/// `occurred_at` in nanoseconds since the Unix epoch.
pub fn occurred_at_ns(event: &Event) -> i64 {
    event
        .occurred_at
        .as_ref()
        .map(|t| {
            t.seconds
                .saturating_mul(1_000_000_000)
                .saturating_add(i64::from(t.nanos))
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::{EventType, sample};

    #[test]
    fn contact_updates_write_exactly_the_mask() {
        let event = sample::event(EventType::ContactUpdated, "t", "c");
        assert_eq!(
            writes(&event),
            [
                Write::Field {
                    field: "tier",
                    value: "premium".into()
                },
                Write::Field {
                    field: "title",
                    value: "CTO".into()
                },
            ]
        );
        let created = sample::event(EventType::ContactCreated, "t", "c");
        let fields: Vec<_> = writes(&created)
            .into_iter()
            .filter_map(|w| match w {
                Write::Field { field, .. } => Some(field),
                _ => None,
            })
            .collect();
        assert_eq!(
            fields,
            [
                "email",
                "first_name",
                "last_name",
                "company",
                "tier",
                "country_code"
            ]
        );
    }

    #[test]
    fn labels_round_trip() {
        assert_eq!(tier_label(CustomerTier::Enterprise as i32), "enterprise");
        assert_eq!(tier_from_label("enterprise"), CustomerTier::Enterprise);
        assert_eq!(tier_from_label(""), CustomerTier::Unspecified);
    }
}
