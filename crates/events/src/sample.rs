//! Valid example events of every type, for `crm publish`, tests and load generation.

use crate::FieldMask;
use crate::{
    EventType, SCHEMA_VERSION, new_event_id,
    pb::{
        ConsentChanged, ConsentChannel, Contact, ContactCreated, ContactUpdated, CustomerTier,
        DealLost, DealStageChanged, DealWon, EmailClicked, EmailOpened, Event, Money, PageViewed,
        PaymentFailed, TicketEscalated, TicketOpened, TicketSeverity, event::Payload,
    },
};
use pbjson_types::Timestamp;

fn usd(minor_units: i64) -> Option<Money> {
    Some(Money {
        currency_code: "USD".into(),
        minor_units,
    })
}

/// A valid payload of `kind` with plausible content.
pub fn payload(kind: EventType) -> Payload {
    match kind {
        EventType::ContactCreated => Payload::ContactCreated(ContactCreated {
            contact: Some(Contact {
                email: "ada@example.com".into(),
                first_name: "Ada".into(),
                last_name: "Lovelace".into(),
                company: "Analytical Engines".into(),
                tier: CustomerTier::Standard as i32,
                country_code: "GB".into(),
                ..Contact::default()
            }),
        }),
        EventType::ContactUpdated => Payload::ContactUpdated(ContactUpdated {
            contact: Some(Contact {
                title: "CTO".into(),
                tier: CustomerTier::Premium as i32,
                ..Contact::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["title".into(), "tier".into()],
            }),
        }),
        EventType::DealStageChanged => Payload::DealStageChanged(DealStageChanged {
            deal_id: "deal-1".into(),
            from_stage: "qualified".into(),
            to_stage: "proposal".into(),
            amount: usd(1_250_000),
        }),
        EventType::DealWon => Payload::DealWon(DealWon {
            deal_id: "deal-1".into(),
            amount: usd(1_250_000),
        }),
        EventType::DealLost => Payload::DealLost(DealLost {
            deal_id: "deal-2".into(),
            reason: "budget".into(),
        }),
        EventType::TicketOpened => Payload::TicketOpened(TicketOpened {
            ticket_id: "t-1".into(),
            subject: "Cannot log in".into(),
            severity: TicketSeverity::Medium as i32,
        }),
        EventType::TicketEscalated => Payload::TicketEscalated(TicketEscalated {
            ticket_id: "t-1".into(),
            severity: TicketSeverity::Critical as i32,
            reason: "customer outage".into(),
        }),
        EventType::ConsentChanged => Payload::ConsentChanged(ConsentChanged {
            channel: ConsentChannel::Email as i32,
            granted: false,
        }),
        EventType::PaymentFailed => Payload::PaymentFailed(PaymentFailed {
            payment_id: "pay-1".into(),
            amount: usd(4_900),
            failure_code: "card_declined".into(),
        }),
        EventType::PageViewed => Payload::PageViewed(PageViewed {
            url: "https://example.com/pricing".into(),
            referrer: "https://example.com/".into(),
        }),
        EventType::EmailOpened => Payload::EmailOpened(EmailOpened {
            campaign_id: "spring".into(),
            message_id: "m-1".into(),
        }),
        EventType::EmailClicked => Payload::EmailClicked(EmailClicked {
            campaign_id: "spring".into(),
            message_id: "m-1".into(),
            url: "https://example.com/offer".into(),
        }),
    }
}

/// A valid event of `kind` for `tenant`/`customer`, with a fresh id, occurring now.
pub fn event(kind: EventType, tenant: &str, customer: &str) -> Event {
    with_payload(payload(kind), tenant, customer)
}

/// A valid envelope around `payload`.
pub fn with_payload(payload: Payload, tenant: &str, customer: &str) -> Event {
    let now = chrono::Utc::now();
    Event {
        event_id: new_event_id(),
        tenant_id: tenant.into(),
        customer_id: customer.into(),
        occurred_at: Some(Timestamp {
            seconds: now.timestamp(),
            nanos: i32::try_from(now.timestamp_subsec_nanos()).unwrap_or(0),
        }),
        source: "sample".into(),
        idempotency_key: String::new(),
        schema_version: SCHEMA_VERSION,
        payload: Some(payload),
    }
}
