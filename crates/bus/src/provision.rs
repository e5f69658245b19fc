//! The stream and consumer definitions under `nats/` (nats-CLI JSON, the server's own field
//! names) in two modes. [`Bus::provision`] (`crm provision`, the operator's command) applies
//! them: creates what is missing, updates what differs and may change in place, refuses what
//! cannot. [`Bus::ensure`] (every role at start) creates what is missing and checks only the
//! platform's contract on what exists, so a role start never undoes an operator's change.

use crate::{Bus, BusError, BusErrorKind};
use serde_json::{Map, Value, json};
use std::{fmt, path::Path};

/// Stream fields the server cannot change in place (changing them means a new stream).
/// `retention` is special-cased: nats-server 2.12 changes `limits` ⇄ `interest` in place but
/// refuses any change to or from `workqueue` (see [`refuse_retention_change`]).
const IMMUTABLE_STREAM_FIELDS: [&str; 1] = ["storage"];
/// Consumer fields the server cannot change in place.
const IMMUTABLE_CONSUMER_FIELDS: [&str; 4] = [
    "deliver_policy",
    "ack_policy",
    "opt_start_seq",
    "replay_policy",
];

/// The stream fields the platform relies on; any other field (max_bytes, num_replicas,
/// duplicate_window, description, …) is the operator's to tune.
/// - `subjects`: producers publish and the router routes to these subjects; others go nowhere.
/// - `retention`: lanes must be `interest` (they empty as consumers ack; `limits` fills them up
///   with history until every write is refused), ingest and the DLQ `limits` (the retention
///   keeper and `crm dlq` decide what goes, not the consumers' acks).
/// - `discard`: `new` is the no-loss promise: a full stream refuses a write the producer is told
///   about; `old` would silently drop the oldest, possibly unprocessed, events.
/// - `storage`: `file`; a memory stream loses acked events on a server restart.
/// - `max_age`: 0; age must never remove an unprocessed event or a dead letter.
/// - `allow_direct`: the retention keeper and the throttler's starvation guard read message
///   times by direct get.
const STREAM_CONTRACT: [&str; 6] = [
    "subjects",
    "retention",
    "discard",
    "storage",
    "max_age",
    "allow_direct",
];
/// The consumer fields the platform relies on; any other field (ack_wait, max_ack_pending,
/// description, …) is the operator's to tune.
/// - `ack_policy`: `explicit`; the runtimes ack each message after its effect.
/// - `deliver_policy`: `all`; a consumer created later must still see the backlog.
/// - `filter_subjects` (with `filter_subject`): which events a consumer sees; `router` must see
///   everything, `router_express` exactly the express types, or events go unrouted.
/// - `max_deliver`: -1; the application dead-letters after its own `max_deliveries`, a server
///   limit would drop a message silently when even the dead-letter write failed.
const CONSUMER_CONTRACT: [&str; 4] = [
    "ack_policy",
    "deliver_policy",
    "filter_subjects",
    "max_deliver",
];

const JS_STREAM_NOT_FOUND: u64 = 10059;
/// JetStream API error: the store (or memory) limit cannot hold what is asked for.
const JS_INSUFFICIENT_RESOURCES: u64 = 10047;
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
const EMBEDDED: [(&str, &str); 19] = embedded![
    "streams/CRM_INGEST.json",
    "streams/CRM_INGEST_PRIORITY.json",
    "streams/CRM_LANE_CRITICAL.json",
    "streams/CRM_LANE_HIGH.json",
    "streams/CRM_LANE_STANDARD.json",
    "streams/CRM_DLQ.json",
    "streams/CRM_AUDIT.json",
    "streams/KV_CRM_LEASES.json",
    "consumers/CRM_INGEST/router.json",
    "consumers/CRM_INGEST/router_express.json",
    "consumers/CRM_INGEST/analytics.json",
    "consumers/CRM_INGEST_PRIORITY/router_priority.json",
    "consumers/CRM_INGEST_PRIORITY/analytics.json",
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
    /// Every stream with `replicas` copies (`num_replicas`: 1, or 3 or 5 on a cluster of at least
    /// as many JetStream servers); consumers follow their stream's. `crm provision --replicas 3` is
    /// the clustered production profile: an acked event survives the loss of a node.
    pub fn with_replicas(mut self, replicas: u8) -> Self {
        for stream in &mut self.streams {
            stream
                .config
                .insert("num_replicas".into(), Value::from(replicas));
        }
        self
    }

    /// The names of the defined streams (e.g. for [`crate::watch_streams`]).
    pub fn stream_names(&self) -> Vec<String> {
        self.streams.iter().map(|s| s.name.clone()).collect()
    }

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
    /// Updated in place; the names of the fields that changed ([`Bus::provision`] only).
    Updated(Vec<String>),
    /// Exists with the platform's contract; these fields differ from the definition and were
    /// left as the operator set them ([`Bus::ensure`] only).
    Kept(Vec<FieldDiff>),
    Unchanged,
}

/// A field whose value on the server differs from its definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDiff {
    pub field: String,
    /// The value in the definition.
    pub defined: Value,
    /// The value on the server (`null` when the server does not report it).
    pub actual: Value,
}

impl fmt::Display for FieldDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} = {} (defined {})",
            self.field, self.actual, self.defined
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: ObjectKind,
    /// `CRM_INGEST` or `CRM_INGEST/router`.
    pub name: String,
    pub action: Action,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Stream => "stream",
            Self::Consumer => "consumer",
        })
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, name) = (self.kind, &self.name);
        match &self.action {
            Action::Created => write!(f, "{kind} {name}: created"),
            Action::Updated(fields) => {
                write!(f, "{kind} {name}: updated ({})", fields.join(", "))
            }
            Action::Kept(diffs) => {
                let diffs: Vec<String> = diffs.iter().map(ToString::to_string).collect();
                write!(f, "{kind} {name}: kept the operator's {}", diffs.join(", "))
            }
            Action::Unchanged => write!(f, "{kind} {name}: unchanged"),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProvisionReport {
    pub changes: Vec<Change>,
}

impl ProvisionReport {
    /// Whether nothing had to be created or updated (operator settings kept by
    /// [`Bus::ensure`] change nothing).
    pub fn is_noop(&self) -> bool {
        self.changes
            .iter()
            .all(|c| matches!(c.action, Action::Unchanged | Action::Kept(_)))
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

/// Which of the two provisioning modes runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `crm provision`: make the server match the definitions where it can.
    Apply,
    /// A role at start: create what is missing, check the contract, change nothing else.
    Ensure,
}

/// A contract field whose value on the server is not the one the platform relies on.
#[derive(Debug)]
struct Conflict {
    /// `stream CRM_LANE_HIGH` or `consumer CRM_INGEST/router`.
    what: String,
    field: &'static str,
    actual: Value,
    needed: Value,
}

impl Bus {
    /// Apply `definitions` (what `crm provision` does): create what is missing, update what
    /// differs and may change in place, refuse what the server cannot change in place. Safe to
    /// run any number of times.
    pub async fn provision(&self, definitions: &Definitions) -> Result<ProvisionReport, BusError> {
        self.apply_definitions(definitions, Mode::Apply).await
    }

    /// What a role does at start: create the streams and consumers that are missing; for those
    /// that exist, check only the platform's contract (streams: subjects, retention, discard,
    /// storage, max_age, allow_direct; consumers: ack_policy, deliver_policy, filter subjects,
    /// max_deliver) and fail naming every object, field and both values when it is broken.
    /// Every other difference is the operator's: left alone and reported as [`Action::Kept`].
    pub async fn ensure(&self, definitions: &Definitions) -> Result<ProvisionReport, BusError> {
        self.apply_definitions(definitions, Mode::Ensure).await
    }

    async fn apply_definitions(
        &self,
        definitions: &Definitions,
        mode: Mode,
    ) -> Result<ProvisionReport, BusError> {
        let mut report = ProvisionReport::default();
        let mut conflicts = Vec::new();
        for stream in &definitions.streams {
            let change = self.apply_stream(stream, mode, &mut conflicts).await?;
            report.changes.push(change);
        }
        for consumer in &definitions.consumers {
            let change = self.apply_consumer(consumer, mode, &mut conflicts).await?;
            report.changes.push(change);
        }
        if conflicts.is_empty() {
            Ok(report)
        } else {
            Err(contract_error(&conflicts))
        }
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

    async fn apply_stream(
        &self,
        def: &StreamDef,
        mode: Mode,
        conflicts: &mut Vec<Conflict>,
    ) -> Result<Change, BusError> {
        let name = &def.name;
        let what = format!("stream {name}");
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
            if api_error_code(&created) == Some(JS_INSUFFICIENT_RESOURCES) {
                let max_bytes = def.config.get("max_bytes").and_then(Value::as_i64);
                return Err(BusError::new(
                    BusErrorKind::Rejected,
                    format!(
                        "creating {what}: the server's JetStream store has no room to reserve its \
                         max_bytes ({}) beside the streams it already holds (code 10047). Raise \
                         `jetstream {{ max_file_store }}` in the server's config (nats/dev.conf \
                         sets 8GB; unset, it is 75 % of the free disk) or lower max_bytes with \
                         `crm provision --definitions <dir>`",
                        max_bytes.map_or("unlimited".to_owned(), |b| format!("{b} bytes"))
                    ),
                ));
            }
            check_api(&created, &format!("creating {what}"))?;
            return Ok(change(Action::Created));
        }
        check_api(&info, &format!("reading {what}"))?;
        let actual = &info["config"];
        if mode == Mode::Ensure {
            conflicts.extend(contract_conflicts(
                &what,
                &STREAM_CONTRACT,
                &def.config,
                actual,
            ));
            return Ok(change(kept_or_unchanged(
                &def.config,
                actual,
                &STREAM_CONTRACT,
            )));
        }
        let fields = differing_fields(&def.config, actual);
        if fields.is_empty() {
            return Ok(change(Action::Unchanged));
        }
        refuse_immutable(
            &fields,
            &IMMUTABLE_STREAM_FIELDS,
            &what,
            &def.config,
            actual,
        )?;
        refuse_retention_change(&what, &def.config, actual)?;
        let merged = merge(actual, &def.config);
        let updated = self.api(&format!("STREAM.UPDATE.{name}"), &merged).await?;
        check_api(&updated, &format!("updating {what}"))?;
        Ok(change(Action::Updated(fields)))
    }

    async fn apply_consumer(
        &self,
        def: &ConsumerDef,
        mode: Mode,
        conflicts: &mut Vec<Conflict>,
    ) -> Result<Change, BusError> {
        let (stream, durable) = (&def.stream, &def.durable);
        let what = format!("consumer {stream}/{durable}");
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
            check_api(&created, &format!("creating {what}"))?;
            return Ok(change(Action::Created));
        }
        check_api(&info, &format!("reading {what}"))?;
        let actual = &info["config"];
        if mode == Mode::Ensure {
            conflicts.extend(contract_conflicts(
                &what,
                &CONSUMER_CONTRACT,
                &def.config,
                actual,
            ));
            return Ok(change(kept_or_unchanged(
                &def.config,
                actual,
                &CONSUMER_CONTRACT,
            )));
        }
        let mut fields = differing_fields(&def.config, actual);
        // A filter the file does not set is still a difference: `router` must see everything.
        let filters_differ = filters(&Value::Object(def.config.clone())) != filters(actual);
        if filters_differ && !fields.iter().any(|f| f.starts_with("filter_subject")) {
            fields.push("filter_subjects".into());
        }
        if fields.is_empty() {
            return Ok(change(Action::Unchanged));
        }
        refuse_immutable(
            &fields,
            &IMMUTABLE_CONSUMER_FIELDS,
            &what,
            &def.config,
            actual,
        )?;
        let mut base = actual.clone();
        if filters_differ && let Some(config) = base.as_object_mut() {
            // The file's filter replaces the server's whole, in either spelling.
            config.remove("filter_subject");
            config.remove("filter_subjects");
        }
        let updated = self
            .api(
                &format!("CONSUMER.CREATE.{stream}.{durable}"),
                &request(merge(&base, &def.config), "update"),
            )
            .await?;
        check_api(&updated, &format!("updating {what}"))?;
        Ok(change(Action::Updated(fields)))
    }
}

/// The subjects a consumer is filtered on, in either spelling (`filter_subject` or
/// `filter_subjects`), sorted: empty means every subject of the stream.
fn filters(config: &Value) -> Vec<String> {
    let mut subjects: Vec<String> = config
        .get("filter_subjects")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .chain(config.get("filter_subject"))
        .filter_map(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    subjects.sort();
    subjects.dedup();
    subjects
}

/// The contract fields of `desired` (those the file sets, and always the consumer filter) whose
/// value on the server differs. Lists compare as sets: their order means nothing to the server.
fn contract_conflicts(
    what: &str,
    contract: &[&'static str],
    desired: &Map<String, Value>,
    actual: &Value,
) -> Vec<Conflict> {
    let conflict = |field, actual, needed| Conflict {
        what: what.to_owned(),
        field,
        actual,
        needed,
    };
    let mut conflicts = Vec::new();
    for field in contract {
        if *field == "filter_subjects" {
            let (needed, found) = (filters(&Value::Object(desired.clone())), filters(actual));
            if needed != found {
                conflicts.push(conflict(*field, json!(found), json!(needed)));
            }
            continue;
        }
        let Some(needed) = desired.get(*field) else {
            continue;
        };
        let found = actual.get(*field);
        let same = match (needed.as_array(), found.and_then(Value::as_array)) {
            (Some(needed), Some(found)) => sorted(needed) == sorted(found),
            _ => same_value(needed, found),
        };
        if !same {
            conflicts.push(conflict(
                *field,
                found.cloned().unwrap_or(Value::Null),
                needed.clone(),
            ));
        }
    }
    conflicts
}

fn sorted(values: &[Value]) -> Vec<String> {
    let mut values: Vec<String> = values.iter().map(Value::to_string).collect();
    values.sort();
    values
}

/// [`Action::Kept`] with the non-contract fields that differ from the definition, or
/// [`Action::Unchanged`].
fn kept_or_unchanged(desired: &Map<String, Value>, actual: &Value, contract: &[&str]) -> Action {
    let diffs: Vec<FieldDiff> = differing_fields(desired, actual)
        .into_iter()
        .filter(|field| !contract.contains(&field.as_str()) && field != "filter_subject")
        .map(|field| FieldDiff {
            defined: desired.get(&field).cloned().unwrap_or(Value::Null),
            actual: actual.get(&field).cloned().unwrap_or(Value::Null),
            field,
        })
        .collect();
    if diffs.is_empty() {
        Action::Unchanged
    } else {
        Action::Kept(diffs)
    }
}

fn contract_error(conflicts: &[Conflict]) -> BusError {
    let lines: Vec<String> = conflicts
        .iter()
        .map(|c| {
            format!(
                "  {}: {} is {} on the server, the platform needs {}",
                c.what, c.field, c.actual, c.needed
            )
        })
        .collect();
    BusError::new(
        BusErrorKind::Definition,
        format!(
            "the streams and consumers on the server break what this build relies on:\n{}\n\
             run `crm provision` to apply the definitions (it changes in place what the server \
             allows and names what it does not)",
            lines.join("\n")
        ),
    )
}

/// nats-server changes a stream's retention between `limits` and `interest` in place (checked
/// against 2.12 by the provisioning tests), never to or from `workqueue`.
fn refuse_retention_change(
    what: &str,
    desired: &Map<String, Value>,
    actual: &Value,
) -> Result<(), BusError> {
    let (Some(wanted), Some(current)) = (desired.get("retention"), actual.get("retention")) else {
        return Ok(());
    };
    if wanted != current && (wanted == "workqueue" || current == "workqueue") {
        return Err(BusError::new(
            BusErrorKind::Definition,
            format!(
                "{what}: refusing to change retention from {current} to {wanted} — the server \
                 cannot do that in place; migrate by hand (new object, move data, delete the old one)"
            ),
        ));
    }
    Ok(())
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
        assert_eq!(defs.streams.len(), 8);
        assert_eq!(defs.consumers.len(), 11);
        assert!(defs.streams.iter().any(|s| s.name == "CRM_INGEST"
            && s.config["duplicate_window"].as_u64() == Some(120_000_000_000)));
    }

    #[test]
    fn lanes_hold_backlog_ingest_and_dlq_hold_until_trimmed_and_nothing_ages_out() {
        let defs = Definitions::embedded().expect("embedded definitions are valid");
        for stream in &defs.streams {
            let (name, config) = (&stream.name, &stream.config);
            let retention = if name.starts_with("CRM_LANE_") {
                "interest"
            } else {
                "limits"
            };
            assert_eq!(config["retention"], retention, "{name}");
            assert_eq!(config["discard"], "new", "{name}: a full stream refuses");
            assert_eq!(config["storage"], "file", "{name}");
            // Set explicitly, so `crm provision` removes an older release's max_age. The lease
            // bucket holds no events: its keys expire by design.
            let max_age = if name == "KV_CRM_LEASES" {
                10_000_000_000_u64
            } else {
                0
            };
            assert_eq!(
                config["max_age"], max_age,
                "{name}: age never removes an event"
            );
            assert!(
                config["max_bytes"].as_i64().is_some_and(|b| b > 0),
                "{name}"
            );
            for field in STREAM_CONTRACT {
                if field != "subjects" {
                    assert!(config.contains_key(field), "{name} sets {field}");
                }
            }
        }
    }

    #[test]
    fn the_application_not_the_server_gives_up_on_a_message() {
        let defs = Definitions::embedded().expect("embedded definitions are valid");
        for consumer in &defs.consumers {
            assert_eq!(
                consumer.config["max_deliver"], -1,
                "{}/{}",
                consumer.stream, consumer.durable
            );
            assert_eq!(consumer.config["ack_policy"], "explicit");
            assert_eq!(consumer.config["deliver_policy"], "all");
        }
    }

    #[test]
    fn filters_read_both_spellings_as_a_set() {
        assert!(filters(&json!({})).is_empty());
        assert!(filters(&json!({"filter_subject": ""})).is_empty());
        assert_eq!(filters(&json!({"filter_subject": "a.>"})), ["a.>"]);
        assert_eq!(
            filters(&json!({"filter_subjects": ["b", "a"], "filter_subject": "a"})),
            ["a", "b"]
        );
    }

    #[test]
    fn the_contract_check_names_field_and_values_and_leaves_the_rest_to_the_operator() {
        let desired = json!({
            "subjects": ["a.>", "b.>"], "retention": "interest", "discard": "new",
            "max_bytes": 100, "num_replicas": 1
        });
        let desired = desired.as_object().expect("object");
        let actual = json!({
            "subjects": ["b.>", "a.>"], "retention": "limits", "discard": "new",
            "max_bytes": 500, "num_replicas": 3, "max_msgs": -1
        });
        let conflicts = contract_conflicts("stream S", &STREAM_CONTRACT, desired, &actual);
        assert_eq!(
            conflicts.len(),
            1,
            "subjects compare as a set: {conflicts:?}"
        );
        assert_eq!(conflicts[0].field, "retention");
        let err = contract_error(&conflicts).to_string();
        assert!(
            err.contains(
                r#"stream S: retention is "limits" on the server, the platform needs "interest""#
            ),
            "{err}"
        );
        assert!(err.contains("crm provision"), "{err}");
        assert_eq!(
            kept_or_unchanged(desired, &actual, &STREAM_CONTRACT),
            Action::Kept(vec![
                FieldDiff {
                    field: "max_bytes".into(),
                    defined: json!(100),
                    actual: json!(500)
                },
                FieldDiff {
                    field: "num_replicas".into(),
                    defined: json!(1),
                    actual: json!(3)
                },
            ])
        );

        // A filter the definition does not have is a conflict: the consumer would miss events.
        let consumer = json!({"durable_name": "router", "max_deliver": -1});
        let consumer = consumer.as_object().expect("object");
        let filtered =
            json!({"durable_name": "router", "max_deliver": -1, "filter_subject": "x.>"});
        let conflicts =
            contract_conflicts("consumer S/router", &CONSUMER_CONTRACT, consumer, &filtered);
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].actual, json!(["x.>"]));
        assert_eq!(conflicts[0].needed, json!([]));
    }

    #[test]
    fn retention_changes_only_between_limits_and_interest() {
        let desired = |r: &str| {
            json!({ "retention": r })
                .as_object()
                .cloned()
                .expect("object")
        };
        let actual = |r: &str| json!({ "retention": r });
        assert!(
            refuse_retention_change("stream S", &desired("interest"), &actual("limits")).is_ok()
        );
        assert!(
            refuse_retention_change("stream S", &desired("limits"), &actual("interest")).is_ok()
        );
        let err = refuse_retention_change("stream S", &desired("workqueue"), &actual("limits"))
            .expect_err("refused");
        assert!(
            err.to_string().contains("refusing to change retention"),
            "{err}"
        );
        assert!(
            refuse_retention_change("stream S", &desired("interest"), &actual("workqueue"))
                .is_err()
        );
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
