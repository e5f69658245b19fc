//! Wire encodings: protobuf binary (the default on NATS) and proto3 JSON (the HTTP default).

use crate::pb::Event;
use prost::Message;

/// How an event is encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `application/x-protobuf`
    Protobuf,
    /// `application/json`, the proto3 JSON mapping.
    Json,
}

impl Encoding {
    pub const fn content_type(self) -> &'static str {
        match self {
            Self::Protobuf => "application/x-protobuf",
            Self::Json => "application/json",
        }
    }

    /// The encoding a `Content-Type` value names (parameters such as `charset` are ignored).
    pub fn from_content_type(value: &str) -> Option<Self> {
        let essence = value.split(';').next().unwrap_or_default().trim();
        match essence.to_ascii_lowercase().as_str() {
            "application/x-protobuf" | "application/protobuf" => Some(Self::Protobuf),
            "application/json" => Some(Self::Json),
            _ => None,
        }
    }
}

/// Bytes that are not an event in the stated encoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid JSON at line {line} column {column}: {message}")]
    Json {
        message: String,
        line: usize,
        column: usize,
        /// The field whose value could not be read, as a validation error names it
        /// (`payload.deal_won.amount.minor_units`; an unknown member is named too); `None` when
        /// the body is not JSON at all or the problem is with the body as a whole.
        field: Option<String>,
    },
    #[error("invalid protobuf: {0}")]
    Protobuf(String),
}

/// Decode an event from `bytes` in `encoding`.
pub fn decode(bytes: &[u8], encoding: Encoding) -> Result<Event, DecodeError> {
    match encoding {
        Encoding::Protobuf => {
            Event::decode(bytes).map_err(|err| DecodeError::Protobuf(err.to_string()))
        }
        Encoding::Json => {
            let mut reader = serde_json::Deserializer::from_slice(bytes);
            let event = serde_path_to_error::deserialize(&mut reader).map_err(|err| {
                let field = field_path(err.path());
                DecodeError::json(err.inner(), field)
            })?;
            reader.end().map_err(|err| DecodeError::json(&err, None))?;
            Ok(event)
        }
    }
}

impl DecodeError {
    /// A JSON error, at `field` when known.
    pub fn json(err: &serde_json::Error, field: Option<String>) -> Self {
        Self::Json {
            message: err.to_string(),
            line: err.line(),
            column: err.column(),
            field,
        }
    }
}

/// A JSON path (`dealWon.amount.minorUnits`) as validation names fields: proto names, the payload
/// member under `payload.` (`payload.deal_won.amount.minor_units`).
fn field_path(path: &serde_path_to_error::Path) -> Option<String> {
    use serde_path_to_error::Segment;
    let mut field = String::new();
    for (depth, segment) in path.iter().enumerate() {
        match segment {
            Segment::Map { key } => {
                let snake = crate::field_mask::snake(key);
                if !field.is_empty() {
                    field.push('.');
                } else if depth == 0 && crate::EventType::from_name(&snake).is_some() {
                    field.push_str("payload.");
                }
                field.push_str(&snake);
            }
            Segment::Seq { index } => field.push_str(&format!("[{index}]")),
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    (!field.is_empty()).then_some(field)
}

/// Protobuf binary encoding.
pub fn encode_proto(event: &Event) -> Vec<u8> {
    event.encode_to_vec()
}

/// Proto3 JSON encoding.
pub fn encode_json(event: &Event) -> Vec<u8> {
    // Serializing generated types to a Vec cannot fail: no maps with non-string keys, no I/O.
    serde_json::to_vec(event).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EventType, sample};

    #[test]
    fn every_type_round_trips_in_both_encodings() {
        for kind in EventType::ALL {
            let event = sample::event(kind, "acme", "cust-1");
            assert_eq!(
                decode(&encode_proto(&event), Encoding::Protobuf),
                Ok(event.clone())
            );
            let json = encode_json(&event);
            assert_eq!(decode(&json, Encoding::Json), Ok(event.clone()), "{kind}");
            // The proto3 JSON name of the oneof case is the camelCase of the subject token.
            let text = String::from_utf8(json).expect("utf8");
            let camel = kind
                .as_str()
                .split('_')
                .enumerate()
                .map(|(i, part)| {
                    if i == 0 {
                        part.to_owned()
                    } else {
                        part[..1].to_uppercase() + &part[1..]
                    }
                })
                .collect::<String>();
            assert!(text.contains(&format!("\"{camel}\"")), "{text}");
        }
    }

    #[test]
    fn json_uses_rfc3339_timestamps_and_accepts_snake_case() {
        let event = sample::event(EventType::DealWon, "acme", "c1");
        let text = String::from_utf8(encode_json(&event)).expect("utf8");
        assert!(text.contains("\"occurredAt\":\"20"), "{text}");
        let snake = text.replace("occurredAt", "occurred_at");
        assert_eq!(decode(snake.as_bytes(), Encoding::Json), Ok(event));
    }

    #[test]
    fn json_errors_name_the_field_as_validation_does() {
        let field = |body: &str| match decode(body.as_bytes(), Encoding::Json) {
            Err(DecodeError::Json { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(r#"{"dealWon": {"amount": {"minorUnits": "ten"}}}"#).as_deref(),
            Some("payload.deal_won.amount.minor_units")
        );
        assert_eq!(
            field(r#"{"ticket_opened": {"severity": "LOUD"}}"#).as_deref(),
            Some("payload.ticket_opened.severity")
        );
        assert_eq!(
            field(r#"{"occurredAt": "yesterday"}"#).as_deref(),
            Some("occurred_at")
        );
        assert_eq!(field("[1]"), None);
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        assert!(matches!(
            decode(b"{\"eventId\": 5", Encoding::Json),
            Err(DecodeError::Json { line: 1, .. })
        ));
        assert!(matches!(
            decode(b"{\"noSuchField\": 1}", Encoding::Json),
            Err(DecodeError::Json { field: Some(field), .. }) if field == "no_such_field"
        ));
        assert!(matches!(
            decode(b"{\"eventId\": \"x\"} trailing", Encoding::Json),
            Err(DecodeError::Json { field: None, .. })
        ));
        assert!(matches!(
            decode(&[0xff, 0xff, 0xff], Encoding::Protobuf),
            Err(DecodeError::Protobuf(_))
        ));
    }

    #[test]
    fn content_types() {
        assert_eq!(
            Encoding::from_content_type("application/json; charset=utf-8"),
            Some(Encoding::Json)
        );
        assert_eq!(
            Encoding::from_content_type("Application/X-Protobuf"),
            Some(Encoding::Protobuf)
        );
        assert_eq!(Encoding::from_content_type("text/plain"), None);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = decode(&bytes, Encoding::Protobuf);
            let _ = decode(&bytes, Encoding::Json);
        }
    }
}
