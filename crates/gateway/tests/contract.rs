//! `/openapi.json` is the contract, checked property by property against the gateway over real
//! HTTP and a real nats-server. Requests are generated from the document's own schemas
//! (proptest), and every generated body is first checked against the document by an independent
//! JSON Schema validator (`jsonschema`), so the generator cannot drift from the document:
//!
//! - every event the document accepts is stored: 202, with an answer the document describes;
//! - an event made invalid in one place the document constrains is refused: 400, naming that
//!   field as a validation error names it (`payload.deal_won.amount.minor_units`);
//! - a batch mixing both answers 200 with each item's own status, as the document says.
//!
//! Two rules JSON Schema cannot state are stated in the document's descriptions and honoured by
//! the generator: `tenantId` must be the API key's tenant, and `occurredAt` lies between 2000 and
//! five minutes ahead of the gateway's clock.

use chrono::{DateTime, Utc};
use proptest::{
    prelude::*,
    sample::Index,
    strategy::{BoxedStrategy, Union},
    test_runner::{Config, TestCaseError, TestRunner},
};
use serde_json::{Map, Value, json};
use std::sync::Arc;

mod common;
use common::*;

/// The keywords the generator understands; any other keyword in a request schema fails the test
/// (extend the generator rather than generate values the document does not describe).
const KNOWN: &[&str] = &[
    "$ref",
    "type",
    "properties",
    "required",
    "additionalProperties",
    "oneOf",
    "title",
    "description",
    "examples",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "format",
    "enum",
    "const",
];

fn document() -> Arc<Value> {
    Arc::new(serde_json::from_str(gateway::OPENAPI_JSON).expect("the document is JSON"))
}

/// Follows `$ref`s (local JSON pointers) to the schema itself.
fn resolve<'a>(doc: &'a Value, mut schema: &'a Value) -> &'a Value {
    while let Some(pointer) = schema.get("$ref").and_then(Value::as_str) {
        schema = doc
            .pointer(pointer.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling $ref {pointer}"));
    }
    schema
}

/// A JSON Schema validator (draft 2020-12, formats checked) for the schema at `pointer`.
fn validator(doc: &Value, pointer: &str) -> jsonschema::Validator {
    let mut schema = doc.clone();
    schema["$ref"] = Value::from(format!("#{pointer}"));
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("the schema compiles")
}

/// Values valid under `schema`.
fn generate(doc: &Arc<Value>, schema: &Value) -> BoxedStrategy<Value> {
    let schema = resolve(doc, schema);
    let object = schema.as_object().expect("a schema object");
    if let Some(unknown) = object.keys().find(|key| !KNOWN.contains(&key.as_str())) {
        panic!("the generator does not know {unknown:?} in {schema}");
    }
    if let Some(value) = object.get("const") {
        return Just(value.clone()).boxed();
    }
    if let Some(values) = object.get("enum").and_then(Value::as_array) {
        return proptest::sample::select(values.clone()).boxed();
    }
    let types: Vec<&str> = match &object["type"] {
        Value::String(one) => vec![one.as_str()],
        Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
        other => panic!("type {other}"),
    };
    Union::new(types.into_iter().map(|kind| match kind {
        "object" => generate_object(doc, object),
        "string" => generate_string(object),
        "integer" => {
            let bound = |key: &str, default: i64| {
                object.get(key).and_then(Value::as_i64).unwrap_or(default)
            };
            (bound("minimum", i64::MIN)..=bound("maximum", i64::MAX))
                .prop_map(Value::from)
                .boxed()
        }
        "boolean" => any::<bool>().prop_map(Value::from).boxed(),
        other => panic!("the generator does not know type {other}"),
    }))
    .boxed()
}

fn generate_object(doc: &Arc<Value>, object: &Map<String, Value>) -> BoxedStrategy<Value> {
    let properties = object
        .get("properties")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let names = |value: Option<&Value>| -> Vec<String> {
        value
            .and_then(Value::as_array)
            .map(|names| {
                names
                    .iter()
                    .filter_map(|n| n.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let required = names(object.get("required"));
    // `oneOf` of `required` branches: exactly one of those members is present.
    let branches: Vec<Vec<String>> = object
        .get("oneOf")
        .and_then(Value::as_array)
        .map(|branches| branches.iter().map(|b| names(b.get("required"))).collect())
        .unwrap_or_else(|| vec![Vec::new()]);
    let exclusive: Vec<String> = branches.iter().flatten().cloned().collect();
    Union::new(branches.into_iter().map(|branch| {
        let members: Vec<BoxedStrategy<Option<(String, Value)>>> = properties
            .iter()
            .filter(|(name, _)| !exclusive.contains(name) || branch.contains(name))
            .map(|(name, schema)| {
                let name = name.clone();
                let value = generate(doc, schema);
                if required.contains(&name) || branch.contains(&name) {
                    value.prop_map(move |v| Some((name.clone(), v))).boxed()
                } else {
                    proptest::option::of(value.prop_map(move |v| (name.clone(), v))).boxed()
                }
            })
            .collect();
        members
            .prop_map(|members| Value::Object(members.into_iter().flatten().collect()))
            .boxed()
    }))
    .boxed()
}

fn generate_string(object: &Map<String, Value>) -> BoxedStrategy<Value> {
    if object.get("format").and_then(Value::as_str) == Some("date-time") {
        // Between 2000 and now (the document's stated window), with or without a fraction.
        let now = Utc::now().timestamp();
        return (946_684_800..now, proptest::option::of(0u32..1_000_000_000))
            .prop_map(|(seconds, nanos)| {
                let at = DateTime::from_timestamp(seconds, nanos.unwrap_or(0)).expect("in range");
                let format = if nanos.is_some() {
                    "%Y-%m-%dT%H:%M:%S%.fZ"
                } else {
                    "%Y-%m-%dT%H:%M:%SZ"
                };
                Value::from(at.format(format).to_string())
            })
            .boxed();
    }
    let pattern = object
        .get("pattern")
        .and_then(Value::as_str)
        .unwrap_or("(?s).*");
    let min = object.get("minLength").and_then(Value::as_u64).unwrap_or(0) as usize;
    let max = object
        .get("maxLength")
        .and_then(Value::as_u64)
        .map_or(usize::MAX, |m| m as usize);
    let unanchored = pattern.trim_start_matches('^').trim_end_matches('$');
    proptest::string::string_regex(unanchored)
        .unwrap_or_else(|err| panic!("pattern {pattern}: {err}"))
        .prop_filter("length within bounds", move |s| {
            (min..=max).contains(&s.chars().count())
        })
        .prop_map(Value::from)
        .boxed()
}

/// A generated event for the test key's tenant.
fn event(doc: &Arc<Value>) -> BoxedStrategy<Value> {
    generate(doc, &json!({"$ref": "#/components/schemas/Event"}))
        .prop_map(|mut event| {
            event["tenantId"] = Value::from("acme");
            event
        })
        .boxed()
}

/// One way to break a valid event: the JSON pointer of what changes, the replacement (`None`:
/// remove it), and the field a validation error would name.
#[derive(Debug, Clone)]
struct Break {
    pointer: String,
    value: Option<Value>,
    field: String,
}

/// Every single-place break of `event` that its schema forbids and the gateway checks.
fn breaks(doc: &Value, event: &Value) -> Vec<Break> {
    let mut out = Vec::new();
    let schema = json!({"$ref": "#/components/schemas/Event"});
    walk(doc, &schema, event, "", &mut out);
    out
}

fn walk(doc: &Value, schema: &Value, value: &Value, pointer: &str, out: &mut Vec<Break>) {
    let schema = resolve(doc, schema);
    // Outside the key's tenant is a 403, covered by the HTTP tests; an update's contact fields
    // outside its updateMask are only checked for control characters, as the document says.
    if pointer == "/tenantId" || pointer.starts_with("/contactUpdated/contact/") {
        return;
    }
    let field = field_of(pointer);
    let mut add = |value: Option<Value>| {
        out.push(Break {
            pointer: pointer.to_owned(),
            value,
            field: field.clone(),
        })
    };
    if schema.get("const").is_some() {
        add(Some(json!(2)));
    }
    if schema.get("enum").is_some() {
        add(Some(json!("NOT_A_KNOWN_VALUE")));
    }
    if let Some(text) = value.as_str() {
        if schema.get("pattern").is_some() || schema.get("format").is_some() {
            add(Some(Value::from(format!("{text}\u{7}"))));
        }
        if schema.get("minLength").and_then(Value::as_u64) == Some(1) {
            add(Some(json!("")));
        }
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64) {
            let pad = (max as usize + 1).saturating_sub(text.chars().count());
            add(Some(Value::from(format!("{text}{}", "x".repeat(pad)))));
        }
    }
    if let Some(min) = schema.get("minimum").and_then(Value::as_i64) {
        add(Some(json!(min - 1)));
    }
    if let Some(max) = schema.get("maximum").and_then(Value::as_i64) {
        add(Some(json!(max + 1)));
    }
    if let (Some(properties), Some(members)) = (
        schema.get("properties").and_then(Value::as_object),
        value.as_object(),
    ) {
        for required in schema["required"].as_array().into_iter().flatten() {
            let name = required.as_str().unwrap_or_default();
            if members.contains_key(name) {
                let pointer = format!("{pointer}/{name}");
                out.push(Break {
                    field: field_of(&pointer),
                    pointer,
                    value: None,
                });
            }
        }
        for (name, member) in members {
            if let Some(schema) = properties.get(name) {
                walk(doc, schema, member, &format!("{pointer}/{name}"), out);
            }
        }
    }
}

/// `/dealWon/amount/minorUnits` → `payload.deal_won.amount.minor_units`.
fn field_of(pointer: &str) -> String {
    let snake = |name: &str| {
        name.chars().fold(String::new(), |mut out, c| {
            if c.is_ascii_uppercase() {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
            out
        })
    };
    let segments: Vec<String> = pointer.split('/').skip(1).map(snake).collect();
    match segments.first() {
        Some(first) if events::EventType::from_name(first).is_some() => {
            format!("payload.{}", segments.join("."))
        }
        _ => segments.join("."),
    }
}

fn apply(event: &Value, broken: &Break) -> Value {
    let mut event = event.clone();
    let (parent, name) = broken.pointer.rsplit_once('/').expect("a member");
    let members = event
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .expect("the member's object");
    match &broken.value {
        Some(value) => members.insert(name.to_owned(), value.clone()),
        None => members.remove(name),
    };
    event
}

/// A valid event and one break of it.
fn broken_event(doc: &Arc<Value>) -> BoxedStrategy<(Value, Break)> {
    let doc = doc.clone();
    (event(&doc), any::<Index>())
        .prop_filter_map("an event with something to break", move |(event, pick)| {
            let breaks = breaks(&doc, &event);
            (!breaks.is_empty()).then(|| {
                let broken = breaks[pick.index(breaks.len())].clone();
                (apply(&event, &broken), broken)
            })
        })
        .boxed()
}

struct Contract {
    runtime: tokio::runtime::Runtime,
    gateway: Gateway,
    doc: Arc<Value>,
    event: jsonschema::Validator,
    accepted: jsonschema::Validator,
    problem: jsonschema::Validator,
    batch: jsonschema::Validator,
}

impl Contract {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let gateway = runtime.block_on(start());
        let doc = document();
        let served: Value = runtime.block_on(async {
            reqwest::get(gateway.url("/openapi.json"))
                .await
                .expect("GET /openapi.json")
                .json()
                .await
                .expect("JSON")
        });
        assert_eq!(
            &served,
            doc.as_ref(),
            "the document tested is the one served"
        );
        Self {
            event: validator(&doc, "/components/schemas/Event"),
            accepted: validator(&doc, "/components/schemas/Accepted"),
            problem: validator(&doc, "/components/schemas/Problem"),
            batch: validator(
                &doc,
                "/paths/~1v1~1events:batch/post/responses/200/content/application~1json/schema",
            ),
            runtime,
            gateway,
            doc,
        }
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.runtime.block_on(async {
            let response = self
                .gateway
                .post(path, "application/json", body.to_string())
                .send()
                .await
                .expect("request");
            let status = response.status().as_u16();
            (status, response.json().await.expect("a JSON answer"))
        })
    }

    fn run<S: Strategy>(
        &self,
        cases: u32,
        strategy: S,
        test: impl Fn(S::Value) -> Result<(), TestCaseError>,
    ) {
        let config = Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        };
        if let Err(failure) = TestRunner::new(config).run(&strategy, test) {
            panic!("{failure}");
        }
    }
}

fn errors(problem: &Value) -> Vec<String> {
    problem["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["field"].as_str().map(str::to_owned))
        .collect()
}

fn names(errors: &[String], field: &str) -> bool {
    errors
        .iter()
        .any(|named| named == field || named.starts_with(&format!("{field}.")))
}

#[test]
fn every_event_the_document_accepts_is_stored() {
    let contract = Contract::start();
    let stored = std::sync::atomic::AtomicU64::new(0);
    contract.run(200, event(&contract.doc), |event| {
        prop_assert!(
            contract.event.is_valid(&event),
            "generated off-schema: {event}"
        );
        let (status, body) = contract.post("/v1/events", &event);
        prop_assert_eq!(status, 202, "{} refused: {}", event, body);
        prop_assert!(
            contract.accepted.is_valid(&body),
            "undocumented answer {}",
            body
        );
        prop_assert_eq!(&body["event_id"], &event["eventId"]);
        if body["duplicate"] == false {
            stored.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    });
    let stored = stored.into_inner();
    assert!(stored >= 190, "only {stored} of 200 events were new");
    let in_streams = contract.runtime.block_on(async {
        let bus = &contract.gateway.bus;
        messages_in(bus, "CRM_INGEST").await + messages_in(bus, "CRM_INGEST_PRIORITY").await
    });
    assert_eq!(
        in_streams, stored,
        "every event answered 202 is stored, once"
    );
}

#[test]
fn an_event_the_document_refuses_is_refused_naming_the_field() {
    let contract = Contract::start();
    contract.run(300, broken_event(&contract.doc), |(event, broken)| {
        prop_assert!(
            !contract.event.is_valid(&event),
            "{:?} leaves the event valid per the document",
            broken
        );
        let (status, body) = contract.post("/v1/events", &event);
        prop_assert_eq!(status, 400, "{:?} was not refused: {}", broken, body);
        prop_assert!(
            contract.problem.is_valid(&body),
            "undocumented problem {}",
            body
        );
        prop_assert!(
            names(&errors(&body), &broken.field),
            "{:?}: the problem does not name {}: {}",
            broken,
            broken.field,
            body
        );
        Ok(())
    });
}

#[test]
fn a_batch_answers_each_item_as_the_document_says() {
    let contract = Contract::start();
    let item = prop_oneof![
        event(&contract.doc).prop_map(|event| (event, true)),
        broken_event(&contract.doc).prop_map(|(event, _)| (event, false)),
    ];
    contract.run(40, proptest::collection::vec(item, 1..8), |items| {
        let body = json!({"events": items.iter().map(|(event, _)| event).collect::<Vec<_>>()});
        let (status, answer) = contract.post("/v1/events:batch", &body);
        // 200 even when every item was refused: the statuses are per item.
        prop_assert_eq!(status, 200, "{}", answer);
        prop_assert!(
            contract.batch.is_valid(&answer),
            "undocumented answer {}",
            answer
        );
        let results = answer["results"].as_array().cloned().unwrap_or_default();
        prop_assert_eq!(results.len(), items.len());
        for (index, ((event, valid), result)) in items.iter().zip(&results).enumerate() {
            prop_assert_eq!(result["index"].as_u64(), Some(index as u64));
            let expected = if *valid { 202 } else { 400 };
            prop_assert_eq!(
                result["status"].as_u64(),
                Some(expected),
                "{}: {}",
                event,
                result
            );
        }
        Ok(())
    });
}
