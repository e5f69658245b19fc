//! Applies the stream and consumer definitions under `nats/` (nats-CLI JSON, the server's own
//! field names) idempotently: creates what is missing, updates what may change, refuses
//! destructive changes, and reports what it did.

use crate::{Bus, BusError, BusErrorKind};
use serde_json::{Map, Value, json};
use std::{fmt, path::Path};

/// Stream fields the server cannot change in place (changing them means a new stream).
const IMMUTABLE_STREAM_FIELDS: [&str; 2] = ["storage", "retention"];
/// Consumer fields the server cannot change in place.
const IMMUTABLE_CONSUMER_FIELDS: [&str; 4] = [
    "deliver_policy",
    "ack_policy",
    "opt_start_seq",
    "replay_policy",
];

const JS_STREAM_NOT_FOUND: u64 = 10059;
const JS_CONSUMER_NOT_FOUND: u64 = 10014;

/// One stream definition (`nats/streams/<NAME>.json`).
#[derive(Debug, Clone)]
pub struct StreamDef {
    pub name: String,
    pub config: Map<String, Value>,
}

/// One durable consumer definition (`nats/consumers/<STREAM>/<durable>.json`).
#[derive(Debug, Clone)]
pub struct ConsumerDef {
    pub stream: String,
    pub durable: String,
    pub config: Map<String, Value>,
}

/// All definitions to apply.
#[derive(Debug, Clone)]
pub struct Definitions {
    pub streams: Vec<StreamDef>,
    pub consumers: Vec<ConsumerDef>,
}

macro_rules! embedded {
    ($($path:literal),* $(,)?) => {
        [$(($path, include_str!(concat!("../../../nats/", $path)))),*]
    };
}

/// The definitions shipped in the repository, compiled into the binary.
const EMBEDDED: [(&str, &str); 14] = embedded![
    "streams/CRM_INGEST.json",
    "streams/CRM_LANE_CRITICAL.json",
    "streams/CRM_LANE_HIGH.json",
    "streams/CRM_LANE_STANDARD.json",
    "streams/CRM_DLQ.json",
    "consumers/CRM_INGEST/router.json",
    "consumers/CRM_INGEST/router_express.json",
    "consumers/CRM_INGEST/analytics.json",
    "consumers/CRM_LANE_CRITICAL/projector.json",
    "consumers/CRM_LANE_HIGH/projector.json",
    "consumers/CRM_LANE_STANDARD/projector.json",
    "consumers/CRM_LANE_CRITICAL/notifier.json",
    "consumers/CRM_LANE_HIGH/notifier.json",
    "consumers/CRM_LANE_STANDARD/notifier.json",
];

fn definition_error(path: &str, message: impl fmt::Display) -> BusError {
    BusError::new(BusErrorKind::Definition, format!("{path}: {message}"))
}

impl Definitions {
    /// The definitions compiled into this binary from the repository's `nats/`.
    pub fn embedded() -> Result<Self, BusError> {
        Self::parse(
            EMBEDDED
                .iter()
                .map(|(path, text)| ((*path).to_owned(), (*text).to_owned())),
        )
    }

    /// Read `streams/*.json` and `consumers/<STREAM>/*.json` under `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, BusError> {
        let read_dir = |sub: &Path| -> Result<Vec<std::path::PathBuf>, BusError> {
            let mut paths: Vec<_> = std::fs::read_dir(sub)
                .map_err(|err| definition_error(&sub.display().to_string(), err))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .collect();
            paths.sort();
            Ok(paths)
        };
        let mut files = Vec::new();
        for path in read_dir(&dir.join("streams"))? {
            files.push(path);
        }
        let consumers = dir.join("consumers");
        if consumers.exists() {
            for stream_dir in read_dir(&consumers)?.into_iter().filter(|p| p.is_dir()) {
                files.extend(read_dir(&stream_dir)?);
            }
        }
        let mut texts = Vec::new();
        for path in files
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
        {
            let text = std::fs::read_to_string(&path)
                .map_err(|err| definition_error(&path.display().to_string(), err))?;
            let relative = path
                .strip_prefix(dir)
                .unwrap_or(&path)
                .display()
                .to_string();
            texts.push((relative, text));
        }
        Self::parse(texts.into_iter())
    }

    fn parse(files: impl Iterator<Item = (String, String)>) -> Result<Self, BusError> {
        let mut definitions = Self {
            streams: Vec::new(),
            consumers: Vec::new(),
        };
        for (path, text) in files {
            let config = match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(map)) => map,
                Ok(_) => return Err(definition_error(&path, "must be a JSON object")),
                Err(err) => return Err(definition_error(&path, err)),
            };
            let parts: Vec<&str> = path.trim_end_matches(".json").split('/').collect();
            match parts.as_slice() {
                ["streams", name] => {
                    let declared = config.get("name").and_then(Value::as_str);
                    if declared != Some(name) {
                        return Err(definition_error(
                            &path,
                            format!("\"name\" must be {name:?}"),
                        ));
                    }
                    definitions.streams.push(StreamDef {
                        name: (*name).to_owned(),
                        config,
                    });
                }
                ["consumers", stream, durable] => {
                    let declared = config.get("durable_name").and_then(Value::as_str);
                    if declared != Some(durable) {
                        return Err(definition_error(
                            &path,
                            format!("\"durable_name\" must be {durable:?}"),
                        ));
                    }
                    definitions.consumers.push(ConsumerDef {
                        stream: (*stream).to_owned(),
                        durable: (*durable).to_owned(),
                        config,
                    });
                }
                _ => {
                    return Err(definition_error(
                        &path,
                        "expected streams/<NAME>.json or consumers/<STREAM>/<durable>.json",
                    ));
                }
            }
        }
        for consumer in &definitions.consumers {
            if !definitions
                .streams
                .iter()
                .any(|s| s.name == consumer.stream)
            {
                return Err(definition_error(
                    &format!("consumers/{}/{}.json", consumer.stream, consumer.durable),
                    format!("no stream definition for {}", consumer.stream),
                ));
            }
        }
        Ok(definitions)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Stream,
    Consumer,
}

/// What provisioning did to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Created,
    /// Updated in place; the names of the fields that changed.
    Updated(Vec<String>),
    Unchanged,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: ObjectKind,
    /// `CRM_INGEST` or `CRM_INGEST/router`.
    pub name: String,
    pub action: Action,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ObjectKind::Stream => "stream",
            ObjectKind::Consumer => "consumer",
        };
        match &self.action {
            Action::Created => write!(f, "{kind} {}: created", self.name),
            Action::Updated(fields) => {
                write!(f, "{kind} {}: updated ({})", self.name, fields.join(", "))
            }
            Action::Unchanged => write!(f, "{kind} {}: unchanged", self.name),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProvisionReport {
    pub changes: Vec<Change>,
}

impl ProvisionReport {
    /// Whether nothing had to be created or updated.
    pub fn is_noop(&self) -> bool {
        self.changes.iter().all(|c| c.action == Action::Unchanged)
    }
}

impl fmt::Display for ProvisionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for change in &self.changes {
            writeln!(f, "{change}")?;
        }
        Ok(())
    }
}

/// The fields of `desired` whose values differ from `actual` (fields the file leaves out are
/// the server's business and not compared).
fn differing_fields(desired: &Map<String, Value>, actual: &Value) -> Vec<String> {
    desired
        .iter()
        .filter(|(key, value)| !same_value(value, actual.get(key.as_str())))
        .map(|(key, _)| key.clone())
        .collect()
}

fn same_value(desired: &Value, actual: Option<&Value>) -> bool {
    match (desired, actual) {
        // The server omits empty/false/zero fields.
        (Value::Bool(false), None) | (Value::Null, None) => true,
        (Value::String(s), None) => s.is_empty(),
        (Value::Number(n), None) => n.as_f64() == Some(0.0),
        (Value::Array(a), None) => a.is_empty(),
        (Value::Object(map), Some(Value::Object(_))) => {
            differing_fields(map, actual.unwrap_or(&Value::Null)).is_empty()
        }
        (desired, Some(actual)) => desired == actual,
        _ => false,
    }
}

impl Bus {
    /// Apply `definitions`: create what is missing, update what differs and may change, refuse
    /// destructive changes. Safe to run any number of times.
    pub async fn provision(&self, definitions: &Definitions) -> Result<ProvisionReport, BusError> {
        let mut report = ProvisionReport::default();
        for stream in &definitions.streams {
            report.changes.push(self.provision_stream(stream).await?);
        }
        for consumer in &definitions.consumers {
            report
                .changes
                .push(self.provision_consumer(consumer).await?);
        }
        Ok(report)
    }

    async fn api(&self, subject: &str, body: &Value) -> Result<Value, BusError> {
        let response: Value = self
            .jetstream()
            .request(subject.to_owned(), body)
            .await
            .map_err(|err| {
                let kind = match err.kind() {
                    async_nats::jetstream::context::RequestErrorKind::TimedOut => {
                        BusErrorKind::Timeout
                    }
                    _ => BusErrorKind::Unavailable,
                };
                BusError::with_source(kind, format!("JetStream API {subject}"), err)
            })?;
        Ok(response)
    }

    async fn provision_stream(&self, def: &StreamDef) -> Result<Change, BusError> {
        let name = &def.name;
        let info = self.api(&format!("STREAM.INFO.{name}"), &json!({})).await?;
        let change = |action| Change {
            kind: ObjectKind::Stream,
            name: name.clone(),
            action,
        };
        if api_error_code(&info) == Some(JS_STREAM_NOT_FOUND) {
            let created = self
                .api(
                    &format!("STREAM.CREATE.{name}"),
                    &Value::Object(def.config.clone()),
                )
                .await?;
            check_api(&created, &format!("creating stream {name}"))?;
            return Ok(change(Action::Created));
        }
        check_api(&info, &format!("reading stream {name}"))?;
        let actual = &info["config"];
        let fields = differing_fields(&def.config, actual);
        if fields.is_empty() {
            return Ok(change(Action::Unchanged));
        }
        refuse_immutable(
            &fields,
            &IMMUTABLE_STREAM_FIELDS,
            &format!("stream {name}"),
            &def.config,
            actual,
        )?;
        let merged = merge(actual, &def.config);
        let updated = self.api(&format!("STREAM.UPDATE.{name}"), &merged).await?;
        check_api(&updated, &format!("updating stream {name}"))?;
        Ok(change(Action::Updated(fields)))
    }

    async fn provision_consumer(&self, def: &ConsumerDef) -> Result<Change, BusError> {
        let (stream, durable) = (&def.stream, &def.durable);
        let info = self
            .api(&format!("CONSUMER.INFO.{stream}.{durable}"), &json!({}))
            .await?;
        let change = |action| Change {
            kind: ObjectKind::Consumer,
            name: format!("{stream}/{durable}"),
            action,
        };
        let request = |config: Value, action: &str| json!({ "stream_name": stream, "config": config, "action": action });
        if api_error_code(&info) == Some(JS_CONSUMER_NOT_FOUND) {
            let created = self
                .api(
                    &format!("CONSUMER.CREATE.{stream}.{durable}"),
                    &request(Value::Object(def.config.clone()), "create"),
                )
                .await?;
            check_api(&created, &format!("creating consumer {stream}/{durable}"))?;
            return Ok(change(Action::Created));
        }
        check_api(&info, &format!("reading consumer {stream}/{durable}"))?;
        let actual = &info["config"];
        let fields = differing_fields(&def.config, actual);
        if fields.is_empty() {
            return Ok(change(Action::Unchanged));
        }
        let what = format!("consumer {stream}/{durable}");
        refuse_immutable(
            &fields,
            &IMMUTABLE_CONSUMER_FIELDS,
            &what,
            &def.config,
            actual,
        )?;
        let updated = self
            .api(
                &format!("CONSUMER.CREATE.{stream}.{durable}"),
                &request(merge(actual, &def.config), "update"),
            )
            .await?;
        check_api(&updated, &format!("updating {what}"))?;
        Ok(change(Action::Updated(fields)))
    }
}

fn merge(actual: &Value, desired: &Map<String, Value>) -> Value {
    let mut merged = actual.as_object().cloned().unwrap_or_default();
    for (key, value) in desired {
        merged.insert(key.clone(), value.clone());
    }
    Value::Object(merged)
}

fn refuse_immutable(
    fields: &[String],
    immutable: &[&str],
    what: &str,
    desired: &Map<String, Value>,
    actual: &Value,
) -> Result<(), BusError> {
    if let Some(field) = fields.iter().find(|f| immutable.contains(&f.as_str())) {
        return Err(BusError::new(
            BusErrorKind::Definition,
            format!(
                "{what}: refusing to change {field} from {} to {} — the server cannot do that in \
                 place; migrate by hand (new object, move data, delete the old one)",
                actual.get(field).unwrap_or(&Value::Null),
                desired.get(field).unwrap_or(&Value::Null),
            ),
        ));
    }
    Ok(())
}

fn api_error_code(response: &Value) -> Option<u64> {
    response.get("error")?.get("err_code")?.as_u64()
}

fn check_api(response: &Value, doing: &str) -> Result<(), BusError> {
    match response.get("error") {
        None => Ok(()),
        Some(error) => Err(BusError::new(
            BusErrorKind::Rejected,
            format!(
                "{doing}: {} (code {})",
                error
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or("error"),
                error.get("err_code").unwrap_or(&Value::Null)
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_definitions_parse() {
        let defs = Definitions::embedded().expect("embedded definitions are valid");
        assert_eq!(defs.streams.len(), 5);
        assert_eq!(defs.consumers.len(), 9);
        assert!(defs.streams.iter().any(|s| s.name == "CRM_INGEST"
            && s.config["duplicate_window"].as_u64() == Some(120_000_000_000)));
    }

    #[test]
    fn from_dir_matches_embedded() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nats");
        let from_dir = Definitions::from_dir(&dir).expect("nats/ parses");
        let embedded = Definitions::embedded().expect("embedded parses");
        let names = |d: &Definitions| {
            let mut n: Vec<_> = d
                .streams
                .iter()
                .map(|s| s.name.clone())
                .chain(
                    d.consumers
                        .iter()
                        .map(|c| format!("{}/{}", c.stream, c.durable)),
                )
                .collect();
            n.sort();
            n
        };
        assert_eq!(
            names(&from_dir),
            names(&embedded),
            "every file in nats/ is embedded"
        );
    }

    #[test]
    fn definitions_are_checked() {
        let parse = |path: &str, text: &str| {
            Definitions::parse([(path.to_owned(), text.to_owned())].into_iter())
        };
        assert!(parse("streams/A.json", r#"{"name":"B"}"#).is_err());
        assert!(parse("streams/A.json", "[1]").is_err());
        assert!(parse("streams/A.json", "{").is_err());
        assert!(parse("other/A.json", r#"{"name":"A"}"#).is_err());
        let err = parse("consumers/NOPE/x.json", r#"{"durable_name":"x"}"#).expect_err("no stream");
        assert!(
            err.to_string().contains("no stream definition for NOPE"),
            "{err}"
        );
    }

    #[test]
    fn compares_only_fields_the_file_sets() {
        let desired =
            json!({"max_age": 10, "discard": "new", "sealed": false, "subjects": ["a.>"]});
        let actual = json!({"max_age": 10, "discard": "new", "subjects": ["a.>"], "max_msgs": -1});
        assert!(differing_fields(desired.as_object().expect("object"), &actual).is_empty());
        let actual = json!({"max_age": 11, "discard": "old", "subjects": ["a.>"]});
        assert_eq!(
            differing_fields(desired.as_object().expect("object"), &actual),
            ["discard", "max_age"]
        );
    }
}
