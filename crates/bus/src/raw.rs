//! Raw JetStream, with no pipeline around it: pipelined publishes and a bare pull-consume on a
//! throwaway stream. The physical limit that `crm-bench` and `crm-load` measure the platform
//! against, on the same server in the same run.

use crate::{Bus, BusError, BusErrorKind, PublishOptions};
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use std::time::{Duration, Instant};

/// Publishes awaiting their ack at once in [`Bus::publish_pipelined`] and the raw baseline.
pub const PIPELINE_WINDOW: usize = 1000;

/// One message to publish: subject, `Nats-Msg-Id`, payload.
pub type RawMessage = (String, String, Bytes);

/// Publish and consume rates of raw JetStream over the same messages.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RawRates {
    pub events: usize,
    /// Async publish, windows of [`PIPELINE_WINDOW`] acks, events/s.
    pub publish_per_s: f64,
    /// Pull-consume and ack of the same messages, events/s.
    pub consume_per_s: f64,
    /// Both, one after the other: events / (publish time + consume time). What a single hop
    /// (publish, store, deliver, ack) costs the server per event.
    pub publish_then_consume_per_s: f64,
}

fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

impl Bus {
    /// A fresh throwaway stream `name` on `<subject_prefix>.>` (an old one of that name is
    /// deleted first) with `replicas` copies.
    pub async fn raw_stream(
        &self,
        name: &str,
        subject_prefix: &str,
        replicas: usize,
    ) -> Result<jetstream::stream::Stream, BusError> {
        let _ = self.jetstream().delete_stream(name).await;
        self.jetstream()
            .create_stream(jetstream::stream::Config {
                name: name.to_owned(),
                subjects: vec![format!("{subject_prefix}.>")],
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|err| BusError::unavailable("creating the raw stream", err))
    }

    /// Publish `payloads` one at a time to `subject`, each after the previous one's ack: how long
    /// a producer that waits for its PubAck waits (ids `lat-<n>`).
    pub async fn publish_latencies(
        &self,
        subject: &str,
        payloads: &[Bytes],
    ) -> Result<Vec<Duration>, BusError> {
        let mut latencies = Vec::with_capacity(payloads.len());
        for (i, payload) in payloads.iter().enumerate() {
            let options = PublishOptions::with_msg_id(format!("lat-{i}"));
            let started = Instant::now();
            self.publish(subject, payload.clone(), &options).await?;
            latencies.push(started.elapsed());
        }
        Ok(latencies)
    }

    /// Publish `messages`, pipelined in windows of `window` acks: send a window, then await its
    /// acks.
    pub async fn publish_pipelined(
        &self,
        messages: &[RawMessage],
        window: usize,
    ) -> Result<(), BusError> {
        for chunk in messages.chunks(window.max(1)) {
            let mut acks = Vec::with_capacity(chunk.len());
            for (subject, id, payload) in chunk {
                let options = PublishOptions::with_msg_id(id.clone());
                acks.push((
                    subject,
                    self.send(subject, payload.clone(), &options).await?,
                ));
            }
            for (subject, ack) in acks {
                self.await_ack(subject, ack).await?;
            }
        }
        Ok(())
    }

    /// The raw baseline: `payloads` published to a throwaway stream `stream` (subject
    /// `<prefix>.x`, ids `<n>`), then pulled and acked, then the stream deleted.
    pub async fn raw_rates(
        &self,
        stream: &str,
        subject_prefix: &str,
        payloads: &[Bytes],
    ) -> Result<RawRates, BusError> {
        self.raw_rates_replicated(stream, subject_prefix, payloads, 1)
            .await
    }

    /// [`Bus::raw_rates`] on a stream of `replicas` copies (a cluster's R3: each publish is
    /// acked once a majority stored it, each consumer ack is replicated too).
    pub async fn raw_rates_replicated(
        &self,
        stream: &str,
        subject_prefix: &str,
        payloads: &[Bytes],
        replicas: usize,
    ) -> Result<RawRates, BusError> {
        let n = payloads.len();
        let handle = self.raw_stream(stream, subject_prefix, replicas).await?;
        let subject = format!("{subject_prefix}.x");
        let messages: Vec<RawMessage> = payloads
            .iter()
            .enumerate()
            .map(|(i, payload)| (subject.clone(), format!("raw-{i}"), payload.clone()))
            .collect();
        let started = Instant::now();
        self.publish_pipelined(&messages, PIPELINE_WINDOW).await?;
        let publish_time = started.elapsed();

        let consumer = handle
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some("raw".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: 20_000,
                ..Default::default()
            })
            .await
            .map_err(|err| BusError::unavailable("creating the raw consumer", err))?;
        let started = Instant::now();
        let mut stream_of = consumer
            .stream()
            .max_messages_per_batch(1000)
            .messages()
            .await
            .map_err(|err| BusError::unavailable("pulling from the raw stream", err))?;
        let mut consumed = 0;
        while consumed < n {
            let message = stream_of
                .next()
                .await
                .ok_or_else(|| BusError::new(BusErrorKind::Unavailable, "raw stream ended"))?
                .map_err(|err| BusError::unavailable("pulling from the raw stream", err))?;
            message
                .ack()
                .await
                .map_err(|err| BusError::unavailable("acking a raw message", err))?;
            consumed += 1;
        }
        let consume_time = started.elapsed();
        drop(stream_of);
        let _ = self.jetstream().delete_stream(stream).await;
        Ok(RawRates {
            events: n,
            publish_per_s: rate(n, publish_time),
            consume_per_s: rate(n, consume_time),
            publish_then_consume_per_s: rate(n, publish_time + consume_time),
        })
    }
}
