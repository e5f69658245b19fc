use crate::pb::{Event, event::Payload};

/// The type of an event, one per `Event.payload` case; its name is the subject token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    ContactCreated,
    ContactUpdated,
    DealStageChanged,
    DealWon,
    DealLost,
    TicketOpened,
    TicketEscalated,
    ConsentChanged,
    PaymentFailed,
    PageViewed,
    EmailOpened,
    EmailClicked,
}

impl EventType {
    /// Every event type, in proto field order.
    pub const ALL: [EventType; 12] = [
        Self::ContactCreated,
        Self::ContactUpdated,
        Self::DealStageChanged,
        Self::DealWon,
        Self::DealLost,
        Self::TicketOpened,
        Self::TicketEscalated,
        Self::ConsentChanged,
        Self::PaymentFailed,
        Self::PageViewed,
        Self::EmailOpened,
        Self::EmailClicked,
    ];

    /// The types the router takes first, from their own consumer (`router_express` on
    /// CRM_INGEST), so that they never queue behind a backlog of bulk events: the types the
    /// built-in critical rules name, and won deals (high-value by amount).
    pub const EXPRESS: [EventType; 5] = [
        Self::TicketOpened,
        Self::TicketEscalated,
        Self::ConsentChanged,
        Self::PaymentFailed,
        Self::DealWon,
    ];

    /// Whether the router takes this type from its express consumer.
    pub fn is_express(self) -> bool {
        Self::EXPRESS.contains(&self)
    }

    /// The snake_case name: the proto oneof field name and the subject token.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ContactCreated => "contact_created",
            Self::ContactUpdated => "contact_updated",
            Self::DealStageChanged => "deal_stage_changed",
            Self::DealWon => "deal_won",
            Self::DealLost => "deal_lost",
            Self::TicketOpened => "ticket_opened",
            Self::TicketEscalated => "ticket_escalated",
            Self::ConsentChanged => "consent_changed",
            Self::PaymentFailed => "payment_failed",
            Self::PageViewed => "page_viewed",
            Self::EmailOpened => "email_opened",
            Self::EmailClicked => "email_clicked",
        }
    }

    /// The type named `name` (as returned by [`EventType::as_str`]).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    /// The type of a payload.
    pub const fn of_payload(payload: &Payload) -> Self {
        match payload {
            Payload::ContactCreated(_) => Self::ContactCreated,
            Payload::ContactUpdated(_) => Self::ContactUpdated,
            Payload::DealStageChanged(_) => Self::DealStageChanged,
            Payload::DealWon(_) => Self::DealWon,
            Payload::DealLost(_) => Self::DealLost,
            Payload::TicketOpened(_) => Self::TicketOpened,
            Payload::TicketEscalated(_) => Self::TicketEscalated,
            Payload::ConsentChanged(_) => Self::ConsentChanged,
            Payload::PaymentFailed(_) => Self::PaymentFailed,
            Payload::PageViewed(_) => Self::PageViewed,
            Payload::EmailOpened(_) => Self::EmailOpened,
            Payload::EmailClicked(_) => Self::EmailClicked,
        }
    }

    /// The type of an event, or `None` when its payload is missing.
    pub fn of(event: &Event) -> Option<Self> {
        event.payload.as_ref().map(Self::of_payload)
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for kind in EventType::ALL {
            assert_eq!(EventType::from_name(kind.as_str()), Some(kind));
            assert!(seen.insert(kind.as_str()));
        }
        assert_eq!(EventType::from_name("nope"), None);
    }
}
