//! Dead letters: the original payload and headers plus why, where from and how often it was tried,
//! stored in CRM_DLQ **before** the original is terminated, so nothing is lost between the two.

use crate::{Bus, BusError, PublishOptions, Published, headers};
use async_nats::jetstream::{self, AckKind};
use events::{DlqStage, EventType, dlq_subject};

/// Why and where a message is dead-lettered.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    pub stage: DlqStage,
    /// Short bounded label (`invalid_event`, `max_deliveries`, `webhook_rejected`, …).
    pub reason: &'a str,
    /// The last error, free text (truncated to 1 KiB in the header).
    pub error: &'a str,
}

/// Tenant and type of the subject a message arrived on, where it names them.
fn tenant_and_type(subject: &str) -> (Option<&str>, Option<EventType>) {
    match events::tenant_and_type_tokens(subject) {
        Some((tenant, kind)) => (Some(tenant), EventType::from_name(kind)),
        None => (None, None),
    }
}

impl Bus {
    /// Store `message` in CRM_DLQ with its reason, then terminate it. If the DLQ publish fails,
    /// the message is left as it is and the error returned: the caller keeps it (see
    /// [`crate::settle`]), it is never terminated without its dead letter.
    pub async fn dead_letter(
        &self,
        message: &jetstream::Message,
        letter: &DeadLetter<'_>,
    ) -> Result<Published, BusError> {
        let info = message.info().ok();
        let (origin_stream, origin_seq, deliveries) = info
            .as_ref()
            .map(|i| (i.stream.to_owned(), i.stream_sequence, i.delivered))
            .unwrap_or_default();
        let (tenant, kind) = tenant_and_type(&message.subject);
        let subject = dlq_subject(letter.stage, tenant, kind);
        let mut options = PublishOptions::with_msg_id(format!(
            "dlq:{}:{origin_stream}:{origin_seq}",
            letter.stage
        ));
        if let Some(original) = &message.headers {
            for (name, values) in original.iter() {
                let name: &str = name.as_ref();
                if name.eq_ignore_ascii_case(headers::MSG_ID) {
                    continue;
                }
                for value in values {
                    options.headers.append(name, value.as_str());
                }
            }
        }
        options = options
            .header(headers::DLQ_REASON, letter.reason)
            .header(headers::DLQ_STAGE, letter.stage.as_str())
            .header(headers::DLQ_ORIGIN_STREAM, &origin_stream)
            .header(headers::DLQ_ORIGIN_SEQ, origin_seq.to_string())
            .header(headers::DLQ_ORIGIN_SUBJECT, message.subject.as_str())
            .header(headers::DLQ_DELIVERIES, deliveries.to_string())
            .header(headers::DLQ_ERROR, headers::single_line(letter.error, 1024));
        match self
            .publish(&subject, message.payload.clone(), &options)
            .await
        {
            Ok(published) => {
                metrics::counter!(
                    "crm_dlq_events_total",
                    "stage" => letter.stage.as_str(),
                    "reason" => letter.reason.to_owned()
                )
                .increment(1);
                tracing::warn!(
                    stage = %letter.stage, reason = letter.reason, error = letter.error,
                    origin_stream, origin_seq, dlq_seq = published.sequence, "dead-lettered"
                );
                if let Err(err) = message.ack_with(AckKind::Term).await {
                    // Stored in the DLQ already; a redelivery would be dead-lettered again and
                    // deduplicated by the DLQ msg id.
                    tracing::warn!(error = %err, "terminating a dead-lettered message failed");
                }
                Ok(published)
            }
            Err(err) => Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tenant_and_type_from_subjects() {
        assert_eq!(
            tenant_and_type("crm.ingest.acme.deal_won"),
            (Some("acme"), Some(EventType::DealWon))
        );
        assert_eq!(
            tenant_and_type("crm.lane.critical.acme.payment_failed"),
            (Some("acme"), Some(EventType::PaymentFailed))
        );
        assert_eq!(
            tenant_and_type("crm.ingest.acme.bogus"),
            (Some("acme"), None)
        );
        assert_eq!(tenant_and_type("other"), (None, None));
    }
}
