//! Validation that reports every problem at once, each with the field path at fault
//! (`payload.deal_won.amount.minor_units: must be > 0`).
//!
//! It refuses what the store cannot hold or should not pass on, so that an event the store
//! rejects is a bug, not a matter of input: no string field carries a control character (C0
//! including NUL, which PostgreSQL text cannot store, DEL, or C1) — each is either limited to a
//! character set without them (ids, tenant, idempotency key, codes, mask paths) or checked as
//! text — and every amount is within [`MAX_MINOR_UNITS`].

use crate::{
    SCHEMA_VERSION, is_subject_token, is_uuid_v7,
    pb::{ConsentChannel, Contact, CustomerTier, Event, Money, TicketSeverity, event::Payload},
};
use chrono::{DateTime, TimeDelta, Utc};

/// How far in the future `occurred_at` may be (clock skew between producers).
pub const MAX_FUTURE_SKEW: TimeDelta = TimeDelta::minutes(5);
/// Lower bound for `occurred_at`: nothing in a CRM happened before this.
pub const MIN_OCCURRED_AT_SECONDS: i64 = 946_684_800; // 2000-01-01T00:00:00Z
const MAX_ID_LEN: usize = 128;
const MAX_TEXT_LEN: usize = 2048;
/// The largest amount an event may carry, in minor units: 10^15, i.e. ten trillion dollars or a
/// quadrillion yen, far beyond any real deal or payment. The bound leaves room to add 9,223 such
/// amounts in an `i64` before the store's (saturating) sums reach its limit, and keeps every
/// amount below 2^53, so JSON consumers that read numbers as doubles (JavaScript) read it exactly.
pub const MAX_MINOR_UNITS: i64 = 1_000_000_000_000_000;

/// The contact fields an `update_mask` may name (the proto field names of `crm.v1.Contact`).
pub const CONTACT_FIELDS: [&str; 9] = [
    "email",
    "first_name",
    "last_name",
    "phone",
    "company",
    "title",
    "tier",
    "lifecycle_stage",
    "country_code",
];

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    /// Dotted proto field path, e.g. `payload.contact_updated.update_mask.paths[1]`.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem found in one event (never empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid event: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct ValidationErrors(pub Vec<FieldError>);

impl ValidationErrors {
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|e| e.field.as_str())
    }
}

/// Validate `event` against the wall clock.
pub fn validate(event: &Event) -> Result<(), ValidationErrors> {
    validate_at(event, Utc::now())
}

/// Validate `event` as of `now` (for deterministic tests).
pub fn validate_at(event: &Event, now: DateTime<Utc>) -> Result<(), ValidationErrors> {
    let mut v = Validator::default();
    v.envelope(event, now);
    match event.payload.as_ref() {
        None => v.push("payload", "is required: set exactly one event type"),
        Some(payload) => v.payload(payload),
    }
    if v.errors.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(v.errors))
    }
}

#[derive(Default)]
struct Validator {
    errors: Vec<FieldError>,
}

impl Validator {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    /// A required identifier: non-empty, bounded, no control characters.
    fn id(&mut self, field: &str, value: &str) {
        if value.is_empty() {
            self.push(field, "is required");
        } else {
            self.text(field, value, MAX_ID_LEN);
        }
    }

    /// Optional free text: at most `max_len` characters (as JSON Schema's `maxLength` counts
    /// them), no control characters.
    fn text(&mut self, field: &str, value: &str, max_len: usize) {
        if value.chars().count() > max_len {
            self.push(field, format!("must be at most {max_len} characters"));
        } else {
            self.no_control(field, value);
        }
    }

    /// No C0 (NUL included), DEL or C1 character (`char::is_control`: Unicode category Cc).
    /// Returns whether `value` is clean.
    fn no_control(&mut self, field: &str, value: &str) -> bool {
        let clean = !value.chars().any(char::is_control);
        if !clean {
            self.push(field, "must not contain control characters");
        }
        clean
    }

    fn envelope(&mut self, event: &Event, now: DateTime<Utc>) {
        if event.event_id.is_empty() {
            self.push("event_id", "is required");
        } else if !is_uuid_v7(&event.event_id) {
            self.push("event_id", "must be a UUIDv7 in hyphenated form");
        }
        if event.tenant_id.is_empty() {
            self.push("tenant_id", "is required");
        } else if !is_subject_token(&event.tenant_id) {
            self.push("tenant_id", "must be 1 to 64 of [A-Za-z0-9_-]");
        }
        self.id("customer_id", &event.customer_id);
        self.id("source", &event.source);
        let key = &event.idempotency_key;
        if key.len() > MAX_ID_LEN {
            self.push(
                "idempotency_key",
                format!("must be at most {MAX_ID_LEN} characters"),
            );
        } else if !key.bytes().all(|b| b.is_ascii_graphic()) {
            self.push("idempotency_key", "must be printable ASCII without spaces");
        }
        match event.schema_version {
            0 => self.push("schema_version", "is required"),
            SCHEMA_VERSION => {}
            other => self.push(
                "schema_version",
                format!("{other} is not supported (this build reads {SCHEMA_VERSION})"),
            ),
        }
        match &event.occurred_at {
            None => self.push("occurred_at", "is required"),
            Some(ts) => {
                if !(0..1_000_000_000).contains(&ts.nanos) {
                    self.push("occurred_at.nanos", "must be in 0..1e9");
                } else if ts.seconds < MIN_OCCURRED_AT_SECONDS {
                    self.push("occurred_at", "must not be before 2000-01-01T00:00:00Z");
                } else if ts.seconds > (now + MAX_FUTURE_SKEW).timestamp() {
                    self.push(
                        "occurred_at",
                        "must not be more than 5 minutes in the future",
                    );
                }
            }
        }
    }

    fn payload(&mut self, payload: &Payload) {
        let base = format!("payload.{}", crate::EventType::of_payload(payload));
        let at = |field: &str| format!("{base}.{field}");
        match payload {
            Payload::ContactCreated(p) => match &p.contact {
                None => self.push(at("contact"), "is required"),
                Some(contact) => {
                    self.contact(&at("contact"), contact, CONTACT_FIELDS.iter().copied())
                }
            },
            Payload::ContactUpdated(p) => {
                let paths = p
                    .update_mask
                    .as_ref()
                    .map(|m| m.paths.as_slice())
                    .unwrap_or_default();
                if paths.is_empty() {
                    self.push(at("update_mask"), "must name at least one contact field");
                }
                for (i, path) in paths.iter().enumerate() {
                    if !CONTACT_FIELDS.contains(&path.as_str()) {
                        self.push(
                            format!("{base}.update_mask.paths[{i}]"),
                            format!(
                                "{path:?} is not a contact field (one of {})",
                                CONTACT_FIELDS.join(", ")
                            ),
                        );
                    }
                }
                match &p.contact {
                    None => self.push(at("contact"), "is required"),
                    Some(contact) => self.contact(
                        &at("contact"),
                        contact,
                        paths
                            .iter()
                            .map(String::as_str)
                            .filter(|f| CONTACT_FIELDS.contains(f)),
                    ),
                }
            }
            Payload::DealStageChanged(p) => {
                self.id(&at("deal_id"), &p.deal_id);
                self.id(&at("to_stage"), &p.to_stage);
                self.text(&at("from_stage"), &p.from_stage, MAX_ID_LEN);
                if let Some(amount) = &p.amount {
                    self.money(&at("amount"), amount, false);
                }
            }
            Payload::DealWon(p) => {
                self.id(&at("deal_id"), &p.deal_id);
                self.required_money(&at("amount"), p.amount.as_ref());
            }
            Payload::DealLost(p) => {
                self.id(&at("deal_id"), &p.deal_id);
                self.text(&at("reason"), &p.reason, MAX_TEXT_LEN);
            }
            Payload::TicketOpened(p) => {
                self.id(&at("ticket_id"), &p.ticket_id);
                self.text(&at("subject"), &p.subject, MAX_TEXT_LEN);
                self.severity(&at("severity"), p.severity);
            }
            Payload::TicketEscalated(p) => {
                self.id(&at("ticket_id"), &p.ticket_id);
                self.severity(&at("severity"), p.severity);
                self.text(&at("reason"), &p.reason, MAX_TEXT_LEN);
            }
            Payload::ConsentChanged(p) => match ConsentChannel::try_from(p.channel) {
                Ok(ConsentChannel::Unspecified) => self.push(at("channel"), "is required"),
                Ok(_) => {}
                Err(_) => self.push(
                    at("channel"),
                    format!("{} is not a known channel", p.channel),
                ),
            },
            Payload::PaymentFailed(p) => {
                self.id(&at("payment_id"), &p.payment_id);
                self.required_money(&at("amount"), p.amount.as_ref());
                self.text(&at("failure_code"), &p.failure_code, MAX_ID_LEN);
            }
            Payload::PageViewed(p) => {
                self.url(&at("url"), &p.url, true);
                self.url(&at("referrer"), &p.referrer, false);
            }
            Payload::EmailOpened(p) => {
                self.id(&at("message_id"), &p.message_id);
                self.text(&at("campaign_id"), &p.campaign_id, MAX_ID_LEN);
            }
            Payload::EmailClicked(p) => {
                self.id(&at("message_id"), &p.message_id);
                self.text(&at("campaign_id"), &p.campaign_id, MAX_ID_LEN);
                self.url(&at("url"), &p.url, true);
            }
        }
    }

    /// Checks the contact fields in `set` (those the event writes) by their rules, and every
    /// other string field of the contact for control characters only: an update's unwritten
    /// fields are not projected, but they travel on in webhooks and replays.
    fn contact<'a>(&mut self, base: &str, c: &Contact, set: impl Iterator<Item = &'a str>) {
        let set: Vec<&str> = set.collect();
        if set.contains(&"tier") && CustomerTier::try_from(c.tier).is_err() {
            self.push(
                format!("{base}.tier"),
                format!("{} is not a known tier", c.tier),
            );
        }
        for field in CONTACT_FIELDS {
            let path = format!("{base}.{field}");
            let value = match field {
                "email" => &c.email,
                "first_name" => &c.first_name,
                "last_name" => &c.last_name,
                "phone" => &c.phone,
                "company" => &c.company,
                "title" => &c.title,
                "lifecycle_stage" => &c.lifecycle_stage,
                "country_code" => &c.country_code,
                _ => continue, // the tier, an enum
            };
            if !set.contains(&field) {
                self.no_control(&path, value);
                continue;
            }
            match field {
                "email" => {
                    if !value.is_empty()
                        && self.no_control(&path, value)
                        && (!value.contains('@')
                            || value.chars().count() > 254
                            || value.contains(char::is_whitespace))
                    {
                        self.push(path, "must be an email address");
                    }
                }
                "country_code" => {
                    if !value.is_empty()
                        && (value.len() != 2 || !value.bytes().all(|b| b.is_ascii_uppercase()))
                    {
                        self.push(path, "must be an ISO 3166-1 alpha-2 code such as \"DE\"");
                    }
                }
                _ => self.text(&path, value, MAX_ID_LEN),
            }
        }
    }

    fn required_money(&mut self, field: &str, money: Option<&Money>) {
        match money {
            None => self.push(field, "is required"),
            Some(money) => self.money(field, money, true),
        }
    }

    fn money(&mut self, field: &str, money: &Money, positive: bool) {
        let code = &money.currency_code;
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
            self.push(
                format!("{field}.currency_code"),
                "must be an ISO 4217 code such as \"USD\"",
            );
        }
        if positive && money.minor_units <= 0 {
            self.push(format!("{field}.minor_units"), "must be > 0");
        } else if money.minor_units < 0 {
            self.push(format!("{field}.minor_units"), "must be >= 0");
        } else if money.minor_units > MAX_MINOR_UNITS {
            self.push(
                format!("{field}.minor_units"),
                format!("must be at most {MAX_MINOR_UNITS}"),
            );
        }
    }

    fn severity(&mut self, field: &str, value: i32) {
        match TicketSeverity::try_from(value) {
            Ok(TicketSeverity::Unspecified) => self.push(field, "is required"),
            Ok(_) => {}
            Err(_) => self.push(field, format!("{value} is not a known severity")),
        }
    }

    fn url(&mut self, field: &str, value: &str, required: bool) {
        if value.is_empty() {
            if required {
                self.push(field, "is required");
            }
        } else if !(value.starts_with("https://")
            || value.starts_with("http://")
            || value.starts_with('/'))
        {
            self.push(field, "must be an http(s) URL or an absolute path");
        } else {
            self.text(field, value, MAX_TEXT_LEN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FieldMask;
    use crate::{EventType, sample};
    use pbjson_types::Timestamp;

    fn now() -> DateTime<Utc> {
        Utc::now()
    }

    fn errors(event: &Event) -> Vec<String> {
        match validate_at(event, now()) {
            Ok(()) => vec![],
            Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn samples_of_every_type_are_valid() {
        for kind in EventType::ALL {
            let event = sample::event(kind, "acme", "c-1");
            assert_eq!(errors(&event), Vec::<String>::new(), "{kind}");
        }
    }

    #[test]
    fn empty_event_reports_every_missing_field() {
        let fields: Vec<_> = validate_at(&Event::default(), now())
            .expect_err("invalid")
            .fields()
            .map(str::to_owned)
            .collect();
        assert_eq!(
            fields,
            [
                "event_id",
                "tenant_id",
                "customer_id",
                "source",
                "schema_version",
                "occurred_at",
                "payload"
            ]
        );
    }

    #[test]
    fn envelope_rules() {
        let mut event = sample::event(EventType::PageViewed, "acme", "c");
        event.event_id = uuid::Uuid::new_v4().to_string();
        event.tenant_id = "acme.eu".into();
        event.idempotency_key = "has space".into();
        event.schema_version = 9;
        event.occurred_at = Some(Timestamp {
            seconds: (now() + TimeDelta::hours(1)).timestamp(),
            nanos: 0,
        });
        assert_eq!(
            errors(&event),
            [
                "event_id: must be a UUIDv7 in hyphenated form",
                "tenant_id: must be 1 to 64 of [A-Za-z0-9_-]",
                "idempotency_key: must be printable ASCII without spaces",
                "schema_version: 9 is not supported (this build reads 1)",
                "occurred_at: must not be more than 5 minutes in the future",
            ]
        );
        event = sample::event(EventType::PageViewed, "acme", "c");
        event.occurred_at = Some(Timestamp {
            seconds: 5,
            nanos: 0,
        });
        assert_eq!(
            errors(&event),
            ["occurred_at: must not be before 2000-01-01T00:00:00Z"]
        );
        event.occurred_at = Some(Timestamp {
            seconds: now().timestamp() + 60,
            nanos: 0,
        });
        assert_eq!(
            errors(&event),
            Vec::<String>::new(),
            "small skew is tolerated"
        );
    }

    #[test]
    fn payload_paths_name_the_field() {
        let mut event = sample::event(EventType::DealWon, "acme", "c");
        let Some(Payload::DealWon(won)) = event.payload.as_mut() else {
            unreachable!()
        };
        won.amount = Some(Money {
            currency_code: "usd".into(),
            minor_units: 0,
        });
        assert_eq!(
            errors(&event),
            [
                "payload.deal_won.amount.currency_code: must be an ISO 4217 code such as \"USD\"",
                "payload.deal_won.amount.minor_units: must be > 0",
            ]
        );

        let mut event = sample::event(EventType::ContactUpdated, "acme", "c");
        let Some(Payload::ContactUpdated(update)) = event.payload.as_mut() else {
            unreachable!()
        };
        update.update_mask = Some(FieldMask {
            paths: vec!["email".into(), "shoe_size".into()],
        });
        update.contact.as_mut().expect("contact").email = "nope".into();
        assert_eq!(
            errors(&event),
            [
                "payload.contact_updated.update_mask.paths[1]: \"shoe_size\" is not a contact field (one of email, first_name, last_name, phone, company, title, tier, lifecycle_stage, country_code)",
                "payload.contact_updated.contact.email: must be an email address",
            ]
        );

        let mut event = sample::event(EventType::TicketEscalated, "acme", "c");
        let Some(Payload::TicketEscalated(t)) = event.payload.as_mut() else {
            unreachable!()
        };
        t.severity = 0;
        t.ticket_id.clear();
        assert_eq!(
            errors(&event),
            [
                "payload.ticket_escalated.ticket_id: is required",
                "payload.ticket_escalated.severity: is required"
            ]
        );

        let mut event = sample::event(EventType::ConsentChanged, "acme", "c");
        let Some(Payload::ConsentChanged(c)) = event.payload.as_mut() else {
            unreachable!()
        };
        c.channel = 99;
        assert_eq!(
            errors(&event),
            ["payload.consent_changed.channel: 99 is not a known channel"]
        );
    }

    #[test]
    fn update_mask_may_clear_a_field() {
        let mut event = sample::event(EventType::ContactUpdated, "acme", "c");
        let Some(Payload::ContactUpdated(update)) = event.payload.as_mut() else {
            unreachable!()
        };
        update.update_mask = Some(FieldMask {
            paths: vec!["phone".into()],
        });
        update.contact.as_mut().expect("contact").phone.clear();
        assert_eq!(errors(&event), Vec::<String>::new());
    }

    /// Every string field of the contract, with a valid value and a way to set it: the table is
    /// written from the proto files, not from the validator, so a field the validator forgets
    /// fails here.
    type Setter = fn(&mut Event, String);
    fn string_fields() -> Vec<(EventType, &'static str, &'static str, Setter)> {
        fn contact(event: &mut Event) -> &mut Contact {
            match event.payload.as_mut() {
                Some(Payload::ContactCreated(p)) => p.contact.get_or_insert_default(),
                Some(Payload::ContactUpdated(p)) => p.contact.get_or_insert_default(),
                _ => unreachable!("a contact event"),
            }
        }
        macro_rules! payload_field {
            ($variant:ident, $($field:ident).+) => {
                |event: &mut Event, value: String| {
                    let Some(Payload::$variant(p)) = event.payload.as_mut() else { unreachable!() };
                    p.$($field).+ = value;
                }
            };
        }
        macro_rules! money_code {
            ($variant:ident) => {
                |event: &mut Event, value: String| {
                    let Some(Payload::$variant(p)) = event.payload.as_mut() else {
                        unreachable!()
                    };
                    p.amount.get_or_insert_default().currency_code = value;
                }
            };
        }
        use EventType as T;
        vec![
            (T::PageViewed, "tenant_id", "acme", |e, v| e.tenant_id = v),
            (T::PageViewed, "customer_id", "c-1", |e, v| {
                e.customer_id = v
            }),
            (T::PageViewed, "source", "web", |e, v| e.source = v),
            (T::PageViewed, "idempotency_key", "order-42", |e, v| {
                e.idempotency_key = v
            }),
            (
                T::ContactCreated,
                "payload.contact_created.contact.email",
                "ada@example.com",
                |e, v| contact(e).email = v,
            ),
            (
                T::ContactCreated,
                "payload.contact_created.contact.first_name",
                "Ada",
                |e, v| contact(e).first_name = v,
            ),
            (
                T::ContactCreated,
                "payload.contact_created.contact.last_name",
                "Lovelace",
                |e, v| contact(e).last_name = v,
            ),
            (
                T::ContactCreated,
                "payload.contact_created.contact.phone",
                "+1 555 0100",
                |e, v| contact(e).phone = v,
            ),
            (
                T::ContactCreated,
                "payload.contact_created.contact.company",
                "Engines",
                |e, v| contact(e).company = v,
            ),
            (
                T::ContactCreated,
                "payload.contact_created.contact.title",
                "CTO",
                |e, v| contact(e).title = v,
            ),
            (
                T::ContactCreated,
                "payload.contact_created.contact.lifecycle_stage",
                "lead",
                |e, v| contact(e).lifecycle_stage = v,
            ),
            (
                T::ContactCreated,
                "payload.contact_created.contact.country_code",
                "GB",
                |e, v| contact(e).country_code = v,
            ),
            // The sample update's mask names title and tier: the other fields are not written,
            // but they travel on (webhooks, replays) and must be as clean.
            (
                T::ContactUpdated,
                "payload.contact_updated.contact.title",
                "CTO",
                |e, v| contact(e).title = v,
            ),
            (
                T::ContactUpdated,
                "payload.contact_updated.contact.email",
                "ada@example.com",
                |e, v| contact(e).email = v,
            ),
            (
                T::ContactUpdated,
                "payload.contact_updated.contact.company",
                "Engines",
                |e, v| contact(e).company = v,
            ),
            (
                T::ContactUpdated,
                "payload.contact_updated.update_mask.paths[0]",
                "title",
                |e, v| {
                    let Some(Payload::ContactUpdated(p)) = e.payload.as_mut() else {
                        unreachable!()
                    };
                    p.update_mask.get_or_insert_default().paths[0] = v;
                },
            ),
            (
                T::DealStageChanged,
                "payload.deal_stage_changed.deal_id",
                "deal-1",
                payload_field!(DealStageChanged, deal_id),
            ),
            (
                T::DealStageChanged,
                "payload.deal_stage_changed.from_stage",
                "qualified",
                payload_field!(DealStageChanged, from_stage),
            ),
            (
                T::DealStageChanged,
                "payload.deal_stage_changed.to_stage",
                "proposal",
                payload_field!(DealStageChanged, to_stage),
            ),
            (
                T::DealStageChanged,
                "payload.deal_stage_changed.amount.currency_code",
                "USD",
                money_code!(DealStageChanged),
            ),
            (
                T::DealWon,
                "payload.deal_won.deal_id",
                "deal-1",
                payload_field!(DealWon, deal_id),
            ),
            (
                T::DealWon,
                "payload.deal_won.amount.currency_code",
                "USD",
                money_code!(DealWon),
            ),
            (
                T::DealLost,
                "payload.deal_lost.deal_id",
                "deal-2",
                payload_field!(DealLost, deal_id),
            ),
            (
                T::DealLost,
                "payload.deal_lost.reason",
                "budget",
                payload_field!(DealLost, reason),
            ),
            (
                T::TicketOpened,
                "payload.ticket_opened.ticket_id",
                "t-1",
                payload_field!(TicketOpened, ticket_id),
            ),
            (
                T::TicketOpened,
                "payload.ticket_opened.subject",
                "Cannot log in",
                payload_field!(TicketOpened, subject),
            ),
            (
                T::TicketEscalated,
                "payload.ticket_escalated.ticket_id",
                "t-1",
                payload_field!(TicketEscalated, ticket_id),
            ),
            (
                T::TicketEscalated,
                "payload.ticket_escalated.reason",
                "outage",
                payload_field!(TicketEscalated, reason),
            ),
            (
                T::PaymentFailed,
                "payload.payment_failed.payment_id",
                "pay-1",
                payload_field!(PaymentFailed, payment_id),
            ),
            (
                T::PaymentFailed,
                "payload.payment_failed.amount.currency_code",
                "USD",
                money_code!(PaymentFailed),
            ),
            (
                T::PaymentFailed,
                "payload.payment_failed.failure_code",
                "card_declined",
                payload_field!(PaymentFailed, failure_code),
            ),
            (
                T::PageViewed,
                "payload.page_viewed.url",
                "https://example.com/a",
                payload_field!(PageViewed, url),
            ),
            (
                T::PageViewed,
                "payload.page_viewed.referrer",
                "https://example.com/",
                payload_field!(PageViewed, referrer),
            ),
            (
                T::EmailOpened,
                "payload.email_opened.campaign_id",
                "spring",
                payload_field!(EmailOpened, campaign_id),
            ),
            (
                T::EmailOpened,
                "payload.email_opened.message_id",
                "m-1",
                payload_field!(EmailOpened, message_id),
            ),
            (
                T::EmailClicked,
                "payload.email_clicked.campaign_id",
                "spring",
                payload_field!(EmailClicked, campaign_id),
            ),
            (
                T::EmailClicked,
                "payload.email_clicked.message_id",
                "m-1",
                payload_field!(EmailClicked, message_id),
            ),
            (
                T::EmailClicked,
                "payload.email_clicked.url",
                "https://example.com/b",
                payload_field!(EmailClicked, url),
            ),
        ]
    }

    /// `value` with `c` inserted after its first `at` characters (at most its length).
    fn with_char_at(value: &str, c: char, at: usize) -> String {
        let at = value.char_indices().nth(at).map_or(value.len(), |(i, _)| i);
        format!("{}{c}{}", &value[..at], &value[at..])
    }

    #[test]
    fn the_string_field_table_starts_valid() {
        for (kind, path, valid, set) in string_fields() {
            let mut event = sample::event(kind, "acme", "c");
            set(&mut event, valid.to_owned());
            assert_eq!(errors(&event), Vec::<String>::new(), "{path}");
        }
    }

    #[test]
    fn control_characters_are_refused_in_every_string_field() {
        // C0 (NUL: PostgreSQL text cannot hold it), DEL, and C1 (NEL, CSI, APC).
        for c in [
            '\0', '\u{1}', '\n', '\u{1b}', '\u{1f}', '\u{7f}', '\u{80}', '\u{85}', '\u{9b}',
            '\u{9f}',
        ] {
            for (kind, path, valid, set) in string_fields() {
                let mut event = sample::event(kind, "acme", "c");
                set(&mut event, with_char_at(valid, c, 1));
                let refused = validate_at(&event, now()).err();
                assert!(
                    refused
                        .as_ref()
                        .is_some_and(|e| e.fields().any(|f| f == path)),
                    "{path} with {c:?}: {refused:?}"
                );
            }
        }
    }

    #[test]
    fn amounts_are_bounded() {
        let set = |minor_units: i64| {
            let mut event = sample::event(EventType::PaymentFailed, "acme", "c");
            let Some(Payload::PaymentFailed(p)) = event.payload.as_mut() else {
                unreachable!()
            };
            p.amount = Some(Money {
                currency_code: "JPY".into(),
                minor_units,
            });
            errors(&event)
        };
        assert_eq!(set(MAX_MINOR_UNITS), Vec::<String>::new());
        let too_large =
            ["payload.payment_failed.amount.minor_units: must be at most 1000000000000000"];
        assert_eq!(set(MAX_MINOR_UNITS + 1), too_large);
        assert_eq!(set(i64::MAX), too_large);
        assert_eq!(
            set(i64::MIN),
            ["payload.payment_failed.amount.minor_units: must be > 0"]
        );
        // Optional amounts (deal_stage_changed) are bounded too.
        let mut event = sample::event(EventType::DealStageChanged, "acme", "c");
        let Some(Payload::DealStageChanged(p)) = event.payload.as_mut() else {
            unreachable!()
        };
        p.amount = Some(Money {
            currency_code: "USD".into(),
            minor_units: i64::MAX,
        });
        assert_eq!(
            errors(&event),
            ["payload.deal_stage_changed.amount.minor_units: must be at most 1000000000000000"]
        );
    }

    proptest::proptest! {
        #[test]
        fn a_control_character_anywhere_is_refused_by_its_field(
            field in 0usize..38, at in 0usize..24,
            c in proptest::prop_oneof![
                proptest::char::range('\0', '\u{1f}'),
                proptest::char::range('\u{7f}', '\u{9f}'),
            ],
        ) {
            let fields = string_fields();
            let (kind, path, valid, set) = fields[field % fields.len()];
            let mut event = sample::event(kind, "acme", "c");
            set(&mut event, with_char_at(valid, c, at));
            let refused = validate_at(&event, now()).err();
            proptest::prop_assert!(
                refused.as_ref().is_some_and(|e| e.fields().any(|f| f == path)),
                "{} with {:?}: {:?}", path, c, refused
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_errors_always_name_a_field(
            event_id in ".{0,40}", tenant in ".{0,70}", customer in ".{0,10}",
            seconds in proptest::num::i64::ANY, nanos in proptest::num::i32::ANY, version in 0u32..4,
            kind in 0usize..12, minor in proptest::num::i64::ANY,
        ) {
            let mut event = sample::event(EventType::ALL[kind], "acme", "c");
            event.event_id = event_id;
            event.tenant_id = tenant;
            event.customer_id = customer;
            event.schema_version = version;
            event.occurred_at = Some(Timestamp { seconds, nanos });
            if let Some(Payload::DealWon(won)) = event.payload.as_mut() {
                won.amount = Some(Money { currency_code: "EUR".into(), minor_units: minor });
            }
            if let Err(errors) = validate_at(&event, now()) {
                proptest::prop_assert!(!errors.0.is_empty());
                for error in &errors.0 {
                    proptest::prop_assert!(!error.field.is_empty() && !error.message.is_empty());
                }
            }
        }
    }
}
