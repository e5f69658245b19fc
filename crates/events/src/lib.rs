//! The CRM event contract: generated protobuf types, proto3 JSON, validation, ids and subjects.
//!
//! `proto/crm/v1` is the source of truth; this crate compiles it at build time with protox
//! (no system `protoc`) and adds what every role needs around the generated types.

mod codec;
mod field_mask;
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
pub use field_mask::FieldMask;
pub use id::{is_uuid_v7, new_event_id};
pub use kind::EventType;
pub use pb::Event;
pub use pbjson_types;
pub use subject::{
    CUSTOMER_CHANGED_SUBJECT, DlqStage, IngestSubject, Lane, SubjectError, dlq_subject,
    ingest_subject, is_subject_token, lane_subject, parse_ingest_subject, priority_subject,
    tenant_and_type_tokens,
};
pub use validate::{
    CONTACT_FIELDS, FieldError, MAX_FUTURE_SKEW, ValidationErrors, validate, validate_at,
};

/// The schema version this build understands.
pub const SCHEMA_VERSION: u32 = 1;

/// What an event is deduplicated by within its tenant: its idempotency key, else its event id.
/// The store's ledgers key effects on `(tenant_id, dedupe_id)`, so a retry with the same key
/// has no second effect for as long as the ledger keeps it.
pub fn dedupe_id(event: &Event) -> &str {
    if event.idempotency_key.is_empty() {
        &event.event_id
    } else {
        &event.idempotency_key
    }
}

/// The `Nats-Msg-Id` of an event on CRM_INGEST: `<tenant>:<dedupe id>`, so two tenants' keys
/// never meet. Tenant ids are subject tokens (no `:` or `/`), so no such id can equal one the
/// platform makes for itself (those carry a `/` before any `:`).
pub fn ingest_msg_id(event: &Event) -> String {
    format!("{}:{}", event.tenant_id, dedupe_id(event))
}

/// The `Nats-Msg-Id` of a routed event on its lane: one per stored ingest message, so a
/// redelivered ingest message is stored on its lane once, and a replay (a new ingest message)
/// is routed again.
pub fn lane_msg_id(ingest_sequence: u64) -> String {
    format!("crm/ingest/{ingest_sequence}")
}

/// [`lane_msg_id`] for a message of the priority ingest stream (CRM_INGEST_PRIORITY): its
/// sequences are another stream's, so its ids are another namespace.
pub fn priority_lane_msg_id(priority_sequence: u64) -> String {
    format!("crm/priority/{priority_sequence}")
}
