//! The CRM event contract: generated protobuf types, proto3 JSON, validation, ids and subjects.
//!
//! `proto/crm/v1` is the source of truth; this crate compiles it at build time with protox
//! (no system `protoc`) and adds what every role needs around the generated types.

mod codec;
mod id;
mod kind;
pub mod sample;
mod subject;
mod validate;

/// Generated prost types for `crm.v1`, with proto3-JSON serde impls from pbjson.
#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::unwrap_used
)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/crm.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/crm.v1.serde.rs"));
}

pub use codec::{DecodeError, Encoding, decode, encode_json, encode_proto};
pub use id::{is_uuid_v7, new_event_id};
pub use kind::EventType;
pub use pb::Event;
pub use pbjson_types;
pub use subject::{
    CUSTOMER_CHANGED_SUBJECT, DlqStage, IngestSubject, Lane, SubjectError, dlq_subject,
    ingest_subject, is_subject_token, lane_subject, parse_ingest_subject, tenant_and_type_tokens,
};
pub use validate::{
    CONTACT_FIELDS, FieldError, MAX_FUTURE_SKEW, ValidationErrors, validate, validate_at,
};

/// The schema version this build understands.
pub const SCHEMA_VERSION: u32 = 1;

/// The `Nats-Msg-Id` an event is deduplicated by: its idempotency key, else its event id.
pub fn dedupe_id(event: &Event) -> &str {
    if event.idempotency_key.is_empty() {
        &event.event_id
    } else {
        &event.idempotency_key
    }
}
