//! Header names used across hops. Values are ASCII; ids are validated before they get here.

use async_nats::HeaderMap;

/// JetStream deduplication id. On ingest: `<tenant>:<idempotency key or event id>` (see
/// `events::ingest_msg_id`); on a lane: `crm/ingest/<ingest sequence>`, one per stored ingest
/// message; ids the platform makes for itself contain a `/` before any `:`, which no tenant's can.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// The event's id, on every message that carries an event (processed notices list these).
pub const EVENT_ID: &str = "Crm-Event-Id";
/// W3C trace context, carried from the gateway through every hop.
pub const TRACEPARENT: &str = "traceparent";
/// Encoding of the payload; absent means protobuf.
pub const CONTENT_TYPE: &str = "Content-Type";
/// Why the router chose a lane (e.g. `type:payment_failed`, `deal_amount`, `tier`).
pub const ROUTE_REASON: &str = "Crm-Route-Reason";
/// Nanoseconds since the Unix epoch when the event entered the platform (for e2e latency).
pub const INGESTED_AT: &str = "Crm-Ingested-At";
/// Dead-letter headers.
pub const DLQ_REASON: &str = "Crm-Dlq-Reason";
pub const DLQ_STAGE: &str = "Crm-Dlq-Stage";
pub const DLQ_ORIGIN_STREAM: &str = "Crm-Dlq-Origin-Stream";
pub const DLQ_ORIGIN_SEQ: &str = "Crm-Dlq-Origin-Seq";
pub const DLQ_ORIGIN_SUBJECT: &str = "Crm-Dlq-Origin-Subject";
pub const DLQ_DELIVERIES: &str = "Crm-Dlq-Deliveries";
pub const DLQ_ERROR: &str = "Crm-Dlq-Error";

/// A fresh W3C `traceparent` (version 00, sampled) for a request that arrived without one.
pub fn new_traceparent() -> String {
    let trace: u128 = rand::random::<u128>().max(1);
    let span: u64 = rand::random::<u64>().max(1);
    format!("00-{trace:032x}-{span:016x}-01")
}

/// Whether `value` is a well-formed W3C `traceparent` (version 00).
pub fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
}

/// The value of header `name`, if present. Looks standard NATS names (`Nats-Msg-Id`, …) up by
/// their parsed form: async-nats stores received ones that way, so a plain `&str` lookup misses.
pub fn get<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    let name: async_nats::header::HeaderName = name.parse().ok()?;
    headers?.get(name).map(|value| value.as_str())
}

/// `text` fit for a header value: control characters (line breaks included) blanked, cut to at
/// most `max` bytes on a character boundary.
pub fn single_line(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > max {
        let mut cut = max;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_values_are_bounded() {
        assert_eq!(single_line("a\r\nb", 100), "a  b");
        assert_eq!(single_line("ééé", 3), "é");
    }

    #[test]
    fn traceparents_are_well_formed() {
        let value = new_traceparent();
        assert!(is_traceparent(&value), "{value}");
        assert!(!is_traceparent("00-0000-0000-01"));
        assert!(!is_traceparent(
            "00-00000000000000000000000000000000-0000000000000001-01"
        ));
        assert!(!is_traceparent(
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"
        ));
        assert!(is_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
    }
}
