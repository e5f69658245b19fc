//! Reading `crm.ingest.<tenant>.<type>` and `crm.lane.<lane>.<tenant>.<type>` messages, as every
//! consumer must: the event, checked against the tenant and type its subject names.

use crate::headers;
use async_nats::jetstream;
use events::{Encoding, Event, EventType};

/// The event an ingest message carries (decoded per its `Content-Type`, validated, and matching
/// its subject's tenant and type), or why it is not an acceptable event.
pub fn decode_ingest(message: &jetstream::Message) -> Result<(Event, EventType, Encoding), String> {
    let encoding = match headers::get(message.headers.as_ref(), headers::CONTENT_TYPE) {
        None => Encoding::Protobuf,
        Some(value) => Encoding::from_content_type(value)
            .ok_or_else(|| format!("unsupported Content-Type {value:?}"))?,
    };
    let event = events::decode(&message.payload, encoding).map_err(|err| err.to_string())?;
    events::validate(&event).map_err(|err| err.to_string())?;
    let subject = events::parse_ingest_subject(&message.subject).map_err(|err| err.to_string())?;
    let kind = EventType::of(&event).ok_or("payload: is required")?;
    if subject.tenant != event.tenant_id || subject.kind != kind {
        return Err(mismatch(message, &event, kind));
    }
    Ok((event, kind, encoding))
}

/// The event a lane message carries, decoded (protobuf, as the router writes lanes) and checked
/// against its subject `crm.lane.<lane>.<tenant>.<type>`: a lane worker applies an event only for
/// the tenant and type its subject names, so subject permissions on the lanes bound what a
/// producer can change. `Err` is the dead-letter reason (`invalid_event`, `subject_mismatch`)
/// and why.
pub fn decode_lane(
    message: &jetstream::Message,
) -> Result<(Event, EventType), (&'static str, String)> {
    let event = events::decode(&message.payload, Encoding::Protobuf)
        .map_err(|err| ("invalid_event", err.to_string()))?;
    let kind = EventType::of(&event).ok_or(("invalid_event", "payload: is required".to_owned()))?;
    match events::tenant_and_type_tokens(&message.subject) {
        Some((tenant, token)) if tenant == event.tenant_id && token == kind.as_str() => {
            Ok((event, kind))
        }
        _ => Err(("subject_mismatch", mismatch(message, &event, kind))),
    }
}

/// Why `message`'s subject does not carry `event` of `kind`.
fn mismatch(message: &jetstream::Message, event: &Event, kind: EventType) -> String {
    format!(
        "subject {} does not match the event (tenant_id {:?}, type {kind})",
        message.subject, event.tenant_id
    )
}
