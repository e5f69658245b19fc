//! Reading `crm.ingest.<tenant>.<type>` messages, as every CRM_INGEST consumer must.

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
        return Err(format!(
            "subject {} does not match the event (tenant_id {:?}, type {kind})",
            message.subject, event.tenant_id
        ));
    }
    Ok((event, kind, encoding))
}
