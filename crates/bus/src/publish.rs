//! The one publish-and-wait-for-ack helper: every producer (gateway, router, DLQ, replay) uses it.

use crate::{Bus, BusError, BusErrorKind, headers};
use async_nats::{
    HeaderMap,
    jetstream::context::{PublishAckFuture, PublishErrorKind},
};
use bytes::Bytes;
use std::time::Duration;

/// How to publish one message.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// `Nats-Msg-Id`: the stream stores a second message with the same id only after its
    /// duplicate window has passed.
    pub msg_id: Option<String>,
    /// Extra headers (trace context, route reason, …).
    pub headers: HeaderMap,
    /// Ack deadline for each attempt (defaults to the bus request timeout).
    pub timeout: Option<Duration>,
    /// Attempts on transient errors (timeout, no responders); 1 = no retry. Retrying is safe
    /// only with a `msg_id`, so without one a single attempt is made.
    pub max_attempts: u32,
}

impl Default for PublishOptions {
    fn default() -> Self {
        Self {
            msg_id: None,
            headers: HeaderMap::new(),
            timeout: None,
            max_attempts: 3,
        }
    }
}

impl PublishOptions {
    pub fn with_msg_id(msg_id: impl Into<String>) -> Self {
        Self {
            msg_id: Some(msg_id.into()),
            ..Self::default()
        }
    }

    pub fn header(mut self, name: &'static str, value: impl AsRef<str>) -> Self {
        self.headers.insert(name, value.as_ref());
        self
    }
}

/// A stored message, as the stream acknowledged it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Published {
    pub stream: String,
    pub sequence: u64,
    /// The stream already held a message with this `Nats-Msg-Id`; nothing new was stored.
    pub duplicate: bool,
}

const RETRY_BASE: Duration = Duration::from_millis(25);

impl Bus {
    /// Publish `payload` to `subject` and wait until JetStream has stored it.
    /// Transient failures are retried (with the same `Nats-Msg-Id`, so never stored twice).
    pub async fn publish(
        &self,
        subject: &str,
        payload: Bytes,
        options: &PublishOptions,
    ) -> Result<Published, BusError> {
        let attempts = if options.msg_id.is_some() {
            options.max_attempts.max(1)
        } else {
            1
        };
        let mut attempt = 1;
        loop {
            let result = async {
                let ack = self.send(subject, payload.clone(), options).await?;
                wait_ack(
                    subject,
                    ack,
                    options.timeout.unwrap_or(self.request_timeout()),
                )
                .await
            }
            .await;
            match result {
                Err(err) if err.kind().is_transient() && attempt < attempts => {
                    tracing::debug!(subject, attempt, error = %err, "publish failed, retrying");
                    tokio::time::sleep(RETRY_BASE * 2u32.pow(attempt - 1)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Send without waiting: the caller awaits the returned future (through [`Bus::await_ack`])
    /// to pipeline many publishes in one round trip.
    pub async fn send(
        &self,
        subject: &str,
        payload: Bytes,
        options: &PublishOptions,
    ) -> Result<PublishAckFuture, BusError> {
        let mut headers = options.headers.clone();
        if let Some(id) = &options.msg_id {
            headers.insert(headers::MSG_ID, id.as_str());
        }
        self.send_with_headers(subject, payload, headers).await
    }

    /// [`Bus::send`] with a ready header map (which must carry `Nats-Msg-Id` if dedupe is
    /// wanted), for hot paths that build their headers once.
    pub async fn send_with_headers(
        &self,
        subject: &str,
        payload: Bytes,
        headers: HeaderMap,
    ) -> Result<PublishAckFuture, BusError> {
        self.jetstream()
            .publish_with_headers(subject.to_owned(), headers, payload)
            .await
            .map_err(|err| publish_error(subject, err))
    }

    /// Wait for a pipelined publish's ack.
    pub async fn await_ack(
        &self,
        subject: &str,
        ack: PublishAckFuture,
    ) -> Result<Published, BusError> {
        wait_ack(subject, ack, self.request_timeout()).await
    }
}

async fn wait_ack(
    subject: &str,
    ack: PublishAckFuture,
    timeout: Duration,
) -> Result<Published, BusError> {
    let ack = tokio::time::timeout(timeout, ack)
        .await
        .map_err(|_| {
            BusError::new(
                BusErrorKind::Timeout,
                format!("no JetStream ack for {subject} within {timeout:?}"),
            )
        })?
        .map_err(|err| publish_error(subject, err))?;
    Ok(Published {
        stream: ack.stream,
        sequence: ack.sequence,
        duplicate: ack.duplicate,
    })
}

fn publish_error(subject: &str, err: async_nats::jetstream::context::PublishError) -> BusError {
    use async_nats::jetstream::ErrorCode;
    let api_code = std::error::Error::source(&err)
        .and_then(|source| source.downcast_ref::<async_nats::jetstream::Error>())
        .map(async_nats::jetstream::Error::error_code);
    let kind = match err.kind() {
        // Store failures with `discard: new` are the stream's limits ("maximum bytes exceeded",
        // "maximum messages exceeded") or the server's storage running out.
        PublishErrorKind::Other
            if matches!(
                api_code,
                Some(ErrorCode::STREAM_STORE_FAILED | ErrorCode::STORAGE_RESOURCES_EXCEEDED)
            ) =>
        {
            BusErrorKind::Full
        }
        PublishErrorKind::TimedOut => BusErrorKind::Timeout,
        PublishErrorKind::StreamNotFound | PublishErrorKind::BrokenPipe => {
            BusErrorKind::Unavailable
        }
        PublishErrorKind::MaxAckPending => BusErrorKind::Unavailable,
        // A message over the server's max_payload is refused as it is: retrying cannot help.
        PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence
        | PublishErrorKind::MaxPayloadExceeded
        | PublishErrorKind::Other => BusErrorKind::Rejected,
    };
    BusError::with_source(kind, format!("publishing to {subject}"), err)
}
