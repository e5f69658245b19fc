//! What an event writes, as last-writer-wins register writes (pure; no I/O).

use events::{
    CONTACT_FIELDS, Event,
    pb::{ConsentChannel, Contact, CustomerTier, TicketSeverity, event::Payload},
};

/// One register write of one event; all of an event's writes share its `(occurred_at, event_id)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Write {
    /// A contact field; an empty value clears it.
    Field {
        field: &'static str,
        value: String,
    },
    Consent {
        channel: String,
        granted: bool,
    },
    /// The deal's state register, and its amount register when the event carries an amount.
    Deal {
        deal_id: String,
        stage: String,
        status: &'static str,
        amount: Option<(i64, String)>,
    },
    Ticket {
        ticket_id: String,
        severity: String,
        status: &'static str,
    },
}

/// `CUSTOMER_TIER_PREMIUM` → `premium`: proto enum names without their type prefix, lower-case.
fn label(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// The stored label of a tier (`premium`); `unspecified` for 0 and unknown values.
pub(crate) fn tier_label(tier: CustomerTier) -> String {
    label(tier.as_str_name(), "CUSTOMER_TIER_")
}

/// The tier a stored label names; `Unspecified` for a cleared or unknown one.
pub(crate) fn tier_from_label(value: &str) -> CustomerTier {
    CustomerTier::from_str_name(&format!("CUSTOMER_TIER_{}", value.to_ascii_uppercase()))
        .unwrap_or(CustomerTier::Unspecified)
}

pub(crate) fn channel_label(channel: i32) -> String {
    ConsentChannel::try_from(channel).map_or_else(
        |_| "unspecified".into(),
        |c| label(c.as_str_name(), "CONSENT_CHANNEL_"),
    )
}

pub(crate) fn severity_label(severity: i32) -> String {
    TicketSeverity::try_from(severity).map_or_else(
        |_| "unspecified".into(),
        |s| label(s.as_str_name(), "TICKET_SEVERITY_"),
    )
}

/// The stored value of `field` in `contact` ("" when unset; the tier as its label).
fn contact_value(contact: &Contact, field: &str) -> String {
    match field {
        "email" => contact.email.clone(),
        "first_name" => contact.first_name.clone(),
        "last_name" => contact.last_name.clone(),
        "phone" => contact.phone.clone(),
        "company" => contact.company.clone(),
        "title" => contact.title.clone(),
        "tier" => match CustomerTier::try_from(contact.tier) {
            Ok(CustomerTier::Unspecified) | Err(_) => String::new(),
            Ok(tier) => tier_label(tier),
        },
        "lifecycle_stage" => contact.lifecycle_stage.clone(),
        "country_code" => contact.country_code.clone(),
        _ => String::new(),
    }
}

fn deal(
    deal_id: &str,
    stage: &str,
    status: &'static str,
    amount: Option<&events::pb::Money>,
) -> Write {
    Write::Deal {
        deal_id: deal_id.to_owned(),
        stage: stage.to_owned(),
        status,
        amount: amount.map(|m| (m.minor_units, m.currency_code.clone())),
    }
}

/// The writes `event` makes. ContactCreated writes every non-empty field; ContactUpdated writes
/// exactly the fields its mask names (an empty value clears the field; unknown paths are ignored).
pub(crate) fn writes(event: &Event) -> Vec<Write> {
    let Some(payload) = event.payload.as_ref() else {
        return Vec::new();
    };
    let field = |field: &'static str, contact: &Contact| Write::Field {
        field,
        value: contact_value(contact, field),
    };
    match payload {
        Payload::ContactCreated(p) => p.contact.as_ref().map_or_else(Vec::new, |contact| {
            CONTACT_FIELDS
                .into_iter()
                .map(|name| field(name, contact))
                .filter(|w| !matches!(w, Write::Field { value, .. } if value.is_empty()))
                .collect()
        }),
        Payload::ContactUpdated(p) => {
            let contact = p.contact.clone().unwrap_or_default();
            let paths = p.update_mask.as_ref().map_or(&[][..], |m| &m.paths[..]);
            // In CONTACT_FIELDS order, each once, however often the mask names it.
            CONTACT_FIELDS
                .into_iter()
                .filter(|name| paths.iter().any(|path| path == name))
                .map(|name| field(name, &contact))
                .collect()
        }
        Payload::DealStageChanged(p) => {
            vec![deal(&p.deal_id, &p.to_stage, "open", p.amount.as_ref())]
        }
        Payload::DealWon(p) => vec![deal(&p.deal_id, "closed_won", "won", p.amount.as_ref())],
        Payload::DealLost(p) => vec![deal(&p.deal_id, "closed_lost", "lost", None)],
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
            channel: channel_label(p.channel),
            granted: p.granted,
        }],
        Payload::PaymentFailed(_)
        | Payload::PageViewed(_)
        | Payload::EmailOpened(_)
        | Payload::EmailClicked(_) => Vec::new(),
    }
}

/// `occurred_at` in nanoseconds since the Unix epoch (0 when missing; validation requires it).
pub(crate) fn occurred_at_ns(event: &Event) -> i64 {
    event.occurred_at.as_ref().map_or(0, |t| {
        t.seconds
            .saturating_mul(1_000_000_000)
            .saturating_add(i64::from(t.nanos))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::{EventType, FieldMask, sample};

    fn fields(event: &Event) -> Vec<(&'static str, String)> {
        writes(event)
            .into_iter()
            .filter_map(|w| match w {
                Write::Field { field, value } => Some((field, value)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn contact_created_writes_every_non_empty_field() {
        let created = sample::event(EventType::ContactCreated, "t", "c");
        let names: Vec<_> = fields(&created).into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            names,
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
    fn contact_updated_writes_exactly_the_mask_once_and_clears() {
        let mut event = sample::event(EventType::ContactUpdated, "t", "c");
        if let Some(Payload::ContactUpdated(update)) = event.payload.as_mut() {
            update.update_mask = Some(FieldMask {
                paths: ["tier", "title", "phone", "title", "nonsense"]
                    .map(String::from)
                    .to_vec(),
            });
        }
        assert_eq!(
            fields(&event),
            [
                ("phone", String::new()),
                ("title", "CTO".into()),
                ("tier", "premium".into())
            ]
        );
    }

    #[test]
    fn labels_round_trip() {
        for tier in [
            CustomerTier::Free,
            CustomerTier::Standard,
            CustomerTier::Premium,
            CustomerTier::Enterprise,
        ] {
            assert_eq!(tier_from_label(&tier_label(tier)), tier);
        }
        assert_eq!(tier_from_label(""), CustomerTier::Unspecified);
        assert_eq!(channel_label(ConsentChannel::Sms as i32), "sms");
        assert_eq!(severity_label(99), "unspecified");
    }

    #[test]
    fn deals_keep_the_amount_only_when_carried() {
        let won = sample::event(EventType::DealWon, "t", "c");
        assert!(matches!(
            &writes(&won)[..],
            [Write::Deal {
                status: "won",
                amount: Some((1_250_000, _)),
                ..
            }]
        ));
        let lost = sample::event(EventType::DealLost, "t", "c");
        assert!(matches!(
            &writes(&lost)[..],
            [Write::Deal {
                status: "lost",
                amount: None,
                ..
            }]
        ));
        assert!(writes(&sample::event(EventType::PageViewed, "t", "c")).is_empty());
    }
}
