//! Operator actions: list, show, replay and purge dead letters; re-drive a stream into ingest.

use crate::{Bus, BusError, BusErrorKind, PublishOptions, Published, headers};
use async_nats::jetstream::{self, consumer::DeliverPolicy};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;

pub const DLQ_STREAM: &str = "CRM_DLQ";

/// One dead letter, as `crm dlq list/show` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct DlqEntry {
    pub seq: u64,
    pub subject: String,
    pub stage: String,
    pub reason: String,
    pub error: String,
    pub origin_stream: String,
    pub origin_seq: String,
    pub deliveries: String,
    pub time: String,
    #[serde(skip)]
    pub payload: Bytes,
    #[serde(skip)]
    pub content_type: Option<String>,
}

fn entry(message: jetstream::message::StreamMessage) -> DlqEntry {
    let get = |name| {
        headers::get(Some(&message.headers), name)
            .unwrap_or_default()
            .to_owned()
    };
    DlqEntry {
        seq: message.sequence,
        subject: message.subject.to_string(),
        stage: get(headers::DLQ_STAGE),
        reason: get(headers::DLQ_REASON),
        error: get(headers::DLQ_ERROR),
        origin_stream: get(headers::DLQ_ORIGIN_STREAM),
        origin_seq: get(headers::DLQ_ORIGIN_SEQ),
        deliveries: get(headers::DLQ_DELIVERIES),
        time: message.time.to_string(),
        content_type: headers::get(Some(&message.headers), headers::CONTENT_TYPE)
            .map(str::to_owned),
        payload: message.payload,
    }
}

/// The `Nats-Msg-Id` of a replay of message `seq` of `stream` into ingest. It carries a `/` before
/// any `:`, which no tenant's id can (`<tenant>:<key>`, tenants being subject tokens), so a
/// tenant's key can never shadow a replay, nor a replay a tenant's event.
fn replay_msg_id(stream: &str, seq: u64) -> String {
    format!("crm/replay/{stream}/{seq}")
}

/// Where a replayed event goes: `crm.ingest.<tenant>.<type>` from the DLQ subject.
fn ingest_subject_of(dlq_subject: &str) -> Option<String> {
    if !dlq_subject.starts_with("crm.dlq.") {
        return None;
    }
    match events::tenant_and_type_tokens(dlq_subject)? {
        ("_unknown", _) | (_, "_unknown") => None,
        (tenant, kind) => Some(format!("crm.ingest.{tenant}.{kind}")),
    }
}

impl Bus {
    async fn dlq_stream(&self) -> Result<jetstream::stream::Stream, BusError> {
        self.jetstream()
            .get_stream(DLQ_STREAM)
            .await
            .map_err(|e| BusError::unavailable("opening CRM_DLQ", e))
    }

    /// Dead letters from `from_seq` on, at most `limit`.
    pub async fn dlq_list(&self, from_seq: u64, limit: usize) -> Result<Vec<DlqEntry>, BusError> {
        let stream = self.dlq_stream().await?;
        let last = stream
            .get_info()
            .await
            .map_err(|e| BusError::unavailable("reading CRM_DLQ", e))?
            .state
            .last_sequence;
        let mut out = Vec::new();
        let mut seq = from_seq.max(1);
        while seq <= last && out.len() < limit {
            // Deleted (replayed) sequences are gaps: skip them.
            if let Ok(message) = stream.get_raw_message(seq).await {
                out.push(entry(message));
            }
            seq += 1;
        }
        Ok(out)
    }

    /// One dead letter by sequence.
    pub async fn dlq_get(&self, seq: u64) -> Result<DlqEntry, BusError> {
        let stream = self.dlq_stream().await?;
        let message = stream.get_raw_message(seq).await.map_err(|e| {
            BusError::with_source(
                BusErrorKind::Rejected,
                format!("no dead letter with seq {seq}"),
                e,
            )
        })?;
        Ok(entry(message))
    }

    /// Re-drive dead letter `seq` into ingest — as it was, or `replacement` (a fixed event,
    /// protobuf) — then delete it from the DLQ. The ingest publish is acked before the delete, so
    /// a crash between the two replays it twice at worst (effects are idempotent). A replay the
    /// stream deduplicated (`duplicate: true`: the same dead letter was replayed within the
    /// duplicate window) stored nothing new, so the dead letter is kept.
    pub async fn dlq_replay(
        &self,
        seq: u64,
        replacement: Option<(String, Bytes)>,
    ) -> Result<Published, BusError> {
        let letter = self.dlq_get(seq).await?;
        let mut options = PublishOptions::with_msg_id(replay_msg_id(DLQ_STREAM, seq));
        let (subject, payload) = match replacement {
            Some((subject, payload)) => (subject, payload),
            None => {
                let subject = ingest_subject_of(&letter.subject).ok_or_else(|| {
                    BusError::new(
                        BusErrorKind::Rejected,
                        format!(
                            "dead letter {seq} ({}) has no tenant/type to replay to; replay it with a fixed event",
                            letter.subject
                        ),
                    )
                })?;
                if let Some(content_type) = &letter.content_type {
                    options = options.header(headers::CONTENT_TYPE, content_type);
                }
                (subject, letter.payload.clone())
            }
        };
        let published = self.publish(&subject, payload, &options).await?;
        if published.duplicate {
            return Ok(published);
        }
        let stream = self.dlq_stream().await?;
        stream
            .delete_message(seq)
            .await
            .map_err(|e| BusError::unavailable("deleting a replayed dead letter", e))?;
        Ok(published)
    }

    /// Delete dead letters, all or those of one stage. Returns how many were purged.
    pub async fn dlq_purge(&self, stage: Option<&str>) -> Result<u64, BusError> {
        let stream = self.dlq_stream().await?;
        let purge = stream.purge();
        let response = match stage {
            Some(stage) => purge.filter(format!("crm.dlq.{stage}.>")).await,
            None => purge.await,
        }
        .map_err(|e| BusError::unavailable("purging CRM_DLQ", e))?;
        Ok(response.purged)
    }

    /// Re-publish messages of `stream` (from a sequence or a time) into ingest under fresh
    /// dedupe ids, e.g. to rebuild a projection; events keep their ids, so effects stay
    /// exactly-once. Returns how many were re-driven.
    pub async fn replay_stream(
        &self,
        stream: &str,
        start: DeliverPolicy,
        limit: Option<u64>,
    ) -> Result<u64, BusError> {
        let source = self
            .jetstream()
            .get_stream(stream)
            .await
            .map_err(|e| BusError::unavailable("opening the stream to replay", e))?;
        let consumer = source
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy: start,
                ..Default::default()
            })
            .await
            .map_err(|e| BusError::unavailable("creating a replay consumer", e))?;
        let pending = consumer.cached_info().num_pending;
        let total = limit.map_or(pending, |l| l.min(pending));
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| BusError::unavailable("reading the stream to replay", e))?;
        let mut done = 0;
        while done < total {
            let Some(message) = messages.next().await else {
                break;
            };
            let message =
                message.map_err(|e| BusError::unavailable("reading the stream to replay", e))?;
            let info = message
                .info()
                .map_err(|e| BusError::unavailable("message info", e))?;
            let subject = if message.subject.starts_with("crm.ingest.") {
                message.subject.to_string()
            } else if let Some((tenant, kind)) = events::tenant_and_type_tokens(&message.subject) {
                format!("crm.ingest.{tenant}.{kind}")
            } else {
                continue;
            };
            let mut options =
                PublishOptions::with_msg_id(replay_msg_id(stream, info.stream_sequence));
            for name in [
                headers::CONTENT_TYPE,
                headers::TRACEPARENT,
                headers::EVENT_ID,
            ] {
                if let Some(value) = headers::get(message.headers.as_ref(), name) {
                    options = options.header(name, value);
                }
            }
            self.publish(&subject, message.payload.clone(), &options)
                .await?;
            done += 1;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_ids_cannot_be_a_tenants() {
        let id = replay_msg_id("CRM_DLQ", 5);
        assert_eq!(id, "crm/replay/CRM_DLQ/5");
        // A tenant's id is `<tenant>:<key>` with a subject-token tenant: no `/` before the `:`.
        let before_colon = id.split(':').next().unwrap_or_default();
        assert!(!events::is_subject_token(before_colon));
        let mut event = events::sample::event(events::EventType::PageViewed, "crm", "c");
        event.idempotency_key = "replay/CRM_DLQ/5".into();
        assert_ne!(events::ingest_msg_id(&event), id);
    }

    #[test]
    fn replay_targets_ingest() {
        assert_eq!(
            ingest_subject_of("crm.dlq.router.acme.deal_won").as_deref(),
            Some("crm.ingest.acme.deal_won")
        );
        assert_eq!(ingest_subject_of("crm.dlq.router._unknown._unknown"), None);
    }
}
