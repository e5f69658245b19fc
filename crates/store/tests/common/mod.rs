//! Event builders for the store tests: explicit times, so last-writer-wins order is controlled.

#![allow(dead_code, unused_macros)]

use events::{
    Event, FieldMask,
    pb::{
        ConsentChanged, ConsentChannel, Contact, ContactUpdated, CustomerTier, DealLost,
        DealStageChanged, DealWon, Money, TicketEscalated, TicketOpened, TicketSeverity,
        event::Payload,
    },
    pbjson_types::Timestamp,
    sample,
};

/// One test per scenario and backend: each scenario is an async fn of a fresh [`store::Store`].
#[allow(unused_macros)] // not every test file runs a conformance suite
macro_rules! conformance {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let db = test_support::TempSqlite::new();
                    let store = store::Store::connect(&db.url()).await.expect("connect to SQLite");
                    super::$scenario(store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let db = test_support::TempPostgres::create().await;
                    let store = store::Store::connect(&db.url()).await.expect("connect to PostgreSQL");
                    super::$scenario(store).await;
                }
            )*
        }
    };
}

/// Make the SQLite database at `url` refuse a row of `table` whose `column` is `poison` (a
/// trigger, SQLITE_CONSTRAINT_TRIGGER: SQLite stores any text, so a refusal in the data is made
/// this way).
pub async fn refuse_poison(url: &str, table: &str, column: &str) {
    use sqlx::Connection;
    let mut admin = sqlx::SqliteConnection::connect(url).await.expect("connect");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TRIGGER refuse_poison_{table} BEFORE INSERT ON {table} WHEN NEW.{column} = \
         'poison' BEGIN SELECT RAISE(ABORT, 'poison refused'); END;"
    )))
    .execute(&mut admin)
    .await
    .expect("trigger");
}

pub const TENANT: &str = "acme";
/// 2023-11-14T22:13:20Z; test events occur `offset` seconds after it.
pub const BASE: i64 = 1_700_000_000;

/// An event of `customer` occurring `offset` seconds after [`BASE`], with a fresh id.
pub fn at(customer: &str, offset: i64, payload: Payload) -> Event {
    let mut event = sample::with_payload(payload, TENANT, customer);
    event.occurred_at = Some(Timestamp {
        seconds: BASE + offset,
        nanos: 0,
    });
    event
}

/// A ContactUpdated whose mask names exactly `field`, set to `value` (a tier by its label).
pub fn update(customer: &str, offset: i64, field: &str, value: &str) -> Event {
    let mut contact = Contact::default();
    match field {
        "email" => contact.email = value.into(),
        "title" => contact.title = value.into(),
        "phone" => contact.phone = value.into(),
        "company" => contact.company = value.into(),
        "tier" => {
            let name = format!("CUSTOMER_TIER_{}", value.to_ascii_uppercase());
            contact.tier = CustomerTier::from_str_name(&name).unwrap_or_default() as i32;
        }
        other => panic!("no test support for field {other}"),
    }
    let mask = FieldMask {
        paths: vec![field.into()],
    };
    at(
        customer,
        offset,
        Payload::ContactUpdated(ContactUpdated {
            contact: Some(contact),
            update_mask: Some(mask),
        }),
    )
}

pub fn consent(customer: &str, offset: i64, channel: ConsentChannel, granted: bool) -> Event {
    at(
        customer,
        offset,
        Payload::ConsentChanged(ConsentChanged {
            channel: channel as i32,
            granted,
        }),
    )
}

fn money(currency: &str, minor_units: i64) -> Option<Money> {
    Some(Money {
        currency_code: currency.into(),
        minor_units,
    })
}

pub fn stage(customer: &str, offset: i64, deal: &str, to: &str, amount: Option<i64>) -> Event {
    at(
        customer,
        offset,
        Payload::DealStageChanged(DealStageChanged {
            deal_id: deal.into(),
            from_stage: String::new(),
            to_stage: to.into(),
            amount: amount.and_then(|minor| money("USD", minor)),
        }),
    )
}

pub fn won(customer: &str, offset: i64, deal: &str, currency: &str, minor: i64) -> Event {
    at(
        customer,
        offset,
        Payload::DealWon(DealWon {
            deal_id: deal.into(),
            amount: money(currency, minor),
        }),
    )
}

pub fn lost(customer: &str, offset: i64, deal: &str) -> Event {
    at(
        customer,
        offset,
        Payload::DealLost(DealLost {
            deal_id: deal.into(),
            reason: "budget".into(),
        }),
    )
}

pub fn ticket_opened(customer: &str, offset: i64, ticket: &str, severity: TicketSeverity) -> Event {
    at(
        customer,
        offset,
        Payload::TicketOpened(TicketOpened {
            ticket_id: ticket.into(),
            subject: "help".into(),
            severity: severity as i32,
        }),
    )
}

pub fn ticket_escalated(
    customer: &str,
    offset: i64,
    ticket: &str,
    severity: TicketSeverity,
) -> Event {
    at(
        customer,
        offset,
        Payload::TicketEscalated(TicketEscalated {
            ticket_id: ticket.into(),
            severity: severity as i32,
            reason: "outage".into(),
        }),
    )
}

/// A set of events on customer `p` that conflict in every way the projection resolves: field
/// writes at equal and different times, a cleared field, consents, one deal through its
/// lifecycle with and without amounts, a deal in another currency, a ticket and a payment
/// failure.
pub fn conflicting_set() -> Vec<Event> {
    let c = "p";
    vec![
        update(c, 10, "title", "Engineer"),
        update(c, 50, "title", "CTO"),
        update(c, 30, "email", "old@example.com"),
        update(c, 30, "email", "tie@example.com"),
        update(c, 60, "email", "new@example.com"),
        update(c, 20, "phone", "+1 555 0100"),
        update(c, 40, "phone", ""),
        update(c, 15, "tier", "standard"),
        update(c, 45, "tier", "enterprise"),
        consent(c, 5, ConsentChannel::Email, true),
        consent(c, 25, ConsentChannel::Email, false),
        consent(c, 25, ConsentChannel::Sms, true),
        stage(c, 1, "d1", "qualified", Some(100_000)),
        stage(c, 2, "d1", "proposal", None),
        won(c, 3, "d1", "USD", 120_000),
        stage(c, 3, "d2", "proposal", Some(5_000)),
        lost(c, 4, "d2"),
        won(c, 7, "d3", "EUR", 30_000),
        ticket_opened(c, 8, "t1", TicketSeverity::Low),
        ticket_escalated(c, 9, "t1", TicketSeverity::Critical),
        at(c, 11, sample::payload(events::EventType::PaymentFailed)),
    ]
}

/// `event` with `key` as its idempotency key: a client's retry of one operation.
pub fn keyed(mut event: Event, key: &str) -> Event {
    event.idempotency_key = key.into();
    event
}

/// `event` again as a client retry would send it: the same idempotency key, a new event id.
pub fn retried(event: &Event) -> Event {
    let mut retry = event.clone();
    retry.event_id = events::new_event_id();
    retry
}

/// A lifetime value as `(currency, minor units)` pairs, for assertions.
pub fn per_currency(value: &[store::CurrencyAmount]) -> Vec<(&str, i64)> {
    value
        .iter()
        .map(|v| (v.currency_code.as_str(), v.minor_units))
        .collect()
}

/// How many events analytics has counted for `tenant`.
pub async fn events_counted(store: &store::Store, tenant: &str) -> i64 {
    store
        .analytics_summary(tenant)
        .await
        .expect("summary")
        .events_counted
}
