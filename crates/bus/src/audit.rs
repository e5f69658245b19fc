//! The audit log: every operator action and configuration change (dead-letter replay and purge,
//! stream replay, provisioning, rules reloads, API key changes), who did it, what, when and with what result, as
//! one JSON record in CRM_AUDIT (`crm.audit.<action>`), stored with a JetStream ack: an action
//! whose record cannot be stored says so. `crm audit` lists them.

use crate::{Bus, BusError, BusErrorKind, PublishOptions};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub const AUDIT_STREAM: &str = "CRM_AUDIT";

/// One audited action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Unix milliseconds when the action finished.
    pub at_ms: u64,
    /// Who: `CRM_ACTOR` if set, else `<user>@<host>` for a command, or the role for an automatic
    /// change (a rules reload).
    pub actor: String,
    /// What, as a subject token: `dlq_replay`, `dlq_purge`, `replay`, `provision`,
    /// `rules_reload`, `api_keys`.
    pub action: String,
    /// What it acted on (`CRM_DLQ seq 42`, `CRM_INGEST from seq 100`, a rules file, …).
    pub target: String,
    /// `ok`, or the error.
    pub outcome: String,
    /// What it did, action by action (counts, changes).
    #[serde(default)]
    pub detail: serde_json::Value,
    /// The stream sequence, when read back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

impl AuditRecord {
    pub fn new(actor: &str, action: &str, target: impl Into<String>) -> Self {
        Self {
            at_ms: crate::control::unix_ms(),
            actor: actor.to_owned(),
            action: action.to_owned(),
            target: target.into(),
            outcome: "ok".to_owned(),
            detail: serde_json::Value::Null,
            seq: None,
        }
    }

    /// The outcome of `result`: `ok`, or its error.
    pub fn outcome<T, E: std::fmt::Display>(mut self, result: &Result<T, E>) -> Self {
        if let Err(err) = result {
            self.outcome = err.to_string();
        }
        self
    }

    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }
}

/// Who runs this command: `CRM_ACTOR`, else `<user>@<host>`.
pub fn actor() -> String {
    if let Ok(actor) = std::env::var("CRM_ACTOR")
        && !actor.trim().is_empty()
    {
        return actor.trim().to_owned();
    }
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".to_owned());
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned());
    format!("{user}@{host}")
}

impl Bus {
    /// Store `record` in CRM_AUDIT, acknowledged by JetStream.
    pub async fn audit(&self, record: &AuditRecord) -> Result<u64, BusError> {
        if !events::is_subject_token(&record.action) {
            return Err(BusError::new(
                BusErrorKind::Rejected,
                format!("audit action {:?} is not a subject token", record.action),
            ));
        }
        let payload = serde_json::to_vec(record)
            .map_err(|err| BusError::new(BusErrorKind::Rejected, format!("audit record: {err}")))?;
        let published = self
            .publish(
                &format!("crm.audit.{}", record.action),
                Bytes::from(payload),
                &PublishOptions::default(),
            )
            .await?;
        Ok(published.sequence)
    }

    /// Record a configured set under `action` when it differs from the set the last `action`
    /// record holds (the first time: the whole set), with what was added and removed. `items`
    /// identify entries without their secrets (an API key by tenant and a hash prefix). Returns
    /// whether a record was made.
    pub async fn audit_set_change(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        mut items: Vec<serde_json::Value>,
    ) -> Result<bool, BusError> {
        items.sort_by_key(ToString::to_string);
        items.dedup();
        let last = self.last_audit(action).await?;
        let before: Vec<serde_json::Value> = last
            .as_ref()
            .and_then(|record| record.detail.get("set"))
            .and_then(serde_json::Value::as_array)
            .cloned()
            .unwrap_or_default();
        if last.is_some() && before == items {
            return Ok(false);
        }
        let added: Vec<_> = items.iter().filter(|item| !before.contains(item)).collect();
        let removed: Vec<_> = before.iter().filter(|item| !items.contains(item)).collect();
        let record = AuditRecord::new(actor, action, target).detail(serde_json::json!({
            "set": items,
            "added": added,
            "removed": removed,
        }));
        self.audit(&record).await?;
        Ok(true)
    }

    /// The newest record of `action`, read by subject (one direct get, whatever the log holds).
    async fn last_audit(&self, action: &str) -> Result<Option<AuditRecord>, BusError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let stream = self
            .jetstream()
            .get_stream(AUDIT_STREAM)
            .await
            .map_err(|e| BusError::unavailable("opening CRM_AUDIT", e))?;
        match stream
            .get_last_raw_message_by_subject(&format!("crm.audit.{action}"))
            .await
        {
            Ok(message) => Ok(serde_json::from_slice::<AuditRecord>(&message.payload)
                .ok()
                .map(|record| AuditRecord {
                    seq: Some(message.sequence),
                    ..record
                })),
            Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(err) => Err(BusError::unavailable("reading CRM_AUDIT", err)),
        }
    }

    /// The newest `limit` records (of `action`, when given), oldest first.
    pub async fn audit_list(
        &self,
        action: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, BusError> {
        let stream = self
            .jetstream()
            .get_stream(AUDIT_STREAM)
            .await
            .map_err(|e| BusError::unavailable("opening CRM_AUDIT", e))?;
        let state = stream
            .get_info()
            .await
            .map_err(|e| BusError::unavailable("reading CRM_AUDIT", e))?
            .state;
        let mut out = Vec::new();
        let mut seq = state.last_sequence;
        while seq >= state.first_sequence.max(1) && out.len() < limit {
            if let Ok(message) = stream.get_raw_message(seq).await
                && let Ok(mut record) = serde_json::from_slice::<AuditRecord>(&message.payload)
                && action.is_none_or(|a| a == record.action)
            {
                record.seq = Some(message.sequence);
                out.push(record);
            }
            seq -= 1;
        }
        out.reverse();
        Ok(out)
    }
}
