//! The ingest retention keeper: CRM_INGEST keeps every event some durable consumer still has to
//! process, plus processed events for a configured replay window, and nothing older.
//!
//! The stream itself has no `max_age` (age must never remove an unprocessed event) and
//! `discard: new` (a full stream refuses writes). Every few seconds the keeper reads the stream
//! state, then every durable consumer, and purges below
//! `min(processed floor + 1, first sequence inside the replay window)`. Above a high-water
//! fraction of `max_bytes` the window gives way to processed history's oldest part, never to an
//! unprocessed event. Purging only ever removes what every durable consumer has processed, so
//! any number of keepers (one per router) may run at once: each purge is safe on its own.

use crate::{Bus, BusError, BusErrorKind, CancellationToken};
use async_nats::jetstream::{
    consumer,
    stream::{DirectGetErrorKind, Stream},
};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use time::OffsetDateTime;

/// The stream the keeper trims.
pub const INGEST_STREAM: &str = "CRM_INGEST";
/// The priority ingest stream (`crm.priority.>`), kept by the same rules as CRM_INGEST.
pub const PRIORITY_INGEST_STREAM: &str = "CRM_INGEST_PRIORITY";
/// Every stream the keeper trims.
pub const INGEST_STREAMS: [&str; 2] = [INGEST_STREAM, PRIORITY_INGEST_STREAM];

/// Under size pressure the keeper trims to this fraction of the high-water mark, so it does
/// not trim a sliver on every tick while ingest keeps arriving.
const PRESSURE_TARGET: f64 = 0.9;

/// `[retention]` in crm.toml: how long CRM_INGEST keeps processed events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Processed events younger than this stay for `crm replay` (e.g. to rebuild a projection).
    #[serde(with = "humantime_serde")]
    pub replay_window: Duration,
    /// Fraction of CRM_INGEST's `max_bytes` above which processed events inside the window are
    /// trimmed too, oldest first (unprocessed events never are).
    pub high_water: f64,
    /// How often the keeper looks.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            replay_window: Duration::from_secs(24 * 3600),
            high_water: 0.8,
            interval: Duration::from_secs(5),
        }
    }
}

impl RetentionConfig {
    /// Check the values a keeper cannot work with, naming the field.
    pub fn validate(&self) -> Result<(), BusError> {
        let invalid = |message: String| {
            Err(BusError::new(
                BusErrorKind::Definition,
                format!("[retention] {message}"),
            ))
        };
        if !(self.high_water > 0.0 && self.high_water <= 1.0) {
            return invalid(format!(
                "high_water = {} must be in (0, 1]",
                self.high_water
            ));
        }
        if self.interval.is_zero() {
            return invalid("interval must be above zero".to_owned());
        }
        Ok(())
    }
}

/// One durable consumer's progress, as CONSUMER.LIST reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerProgress {
    pub name: String,
    pub num_pending: u64,
    pub num_ack_pending: u64,
    /// `ack_floor.stream_seq`: every message up to it is acknowledged.
    pub ack_floor: u64,
}

impl ConsumerProgress {
    /// The last stream sequence this consumer no longer needs, given the stream's last sequence
    /// read *before* the consumer's info: with nothing pending and nothing awaiting an ack it has
    /// processed (or, filtered, never wanted) everything up to it, whatever its ack floor says;
    /// otherwise its ack floor.
    pub fn processed_through(&self, last_seq: u64) -> u64 {
        if self.num_pending == 0 && self.num_ack_pending == 0 {
            last_seq
        } else {
            self.ack_floor.min(last_seq)
        }
    }
}

/// The stream as the keeper read it, before any consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSnapshot {
    pub first_seq: u64,
    pub last_seq: u64,
    pub messages: u64,
    pub bytes: u64,
    /// `max_bytes` from the stream's config; ≤ 0 means unlimited.
    pub max_bytes: i64,
}

/// What the keeper found and did in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrimReport {
    /// The stream's first and last sequence before the purge.
    pub first_seq: u64,
    pub last_seq: u64,
    /// Every durable consumer has processed every event up to here.
    pub processed_through: u64,
    /// The consumer with the lowest floor (`None` without durable consumers).
    pub pinned_by: Option<String>,
    /// Events some durable consumer has not processed (`last_seq − processed_through`).
    pub unprocessed: u64,
    /// Purged every sequence below this (`first_seq` when nothing was purged).
    pub purge_below: u64,
    /// Messages removed.
    pub purged: u64,
    /// The stream was at or above the high-water mark, so the window gave way.
    pub under_pressure: bool,
    /// Age of the oldest event kept (`None` when the stream is empty).
    pub oldest_kept_age: Option<Duration>,
}

/// The processed floor over all durable consumers and the consumer that sets it. Without any
/// durable consumer nothing counts as processed: a stream whose consumers are not (yet) created
/// keeps its events rather than losing them.
pub fn processed_floor(last_seq: u64, consumers: &[ConsumerProgress]) -> (u64, Option<String>) {
    consumers
        .iter()
        .map(|c| (c.processed_through(last_seq), Some(c.name.clone())))
        .min_by_key(|(floor, _)| *floor)
        .unwrap_or((0, None))
}

/// Under size pressure, the sequence to purge below (before the processed floor caps it) so that
/// the stream drops to [`PRESSURE_TARGET`] of the high-water mark; `None` below the mark or
/// without a byte limit. Assumes messages of average size: the next pass corrects any error.
pub fn pressure_bound(snapshot: &StreamSnapshot, high_water: f64) -> Option<u64> {
    if snapshot.max_bytes <= 0 || snapshot.messages == 0 {
        return None;
    }
    let high = high_water * snapshot.max_bytes as f64;
    let bytes = snapshot.bytes as f64;
    if bytes < high {
        return None;
    }
    let excess = bytes - high * PRESSURE_TARGET;
    let average = bytes / snapshot.messages as f64;
    let count = (excess / average).ceil().max(1.0) as u64;
    Some(snapshot.first_seq.saturating_add(count))
}

fn unavailable(
    doing: String,
    err: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> BusError {
    BusError::unavailable(doing, err)
}

impl Bus {
    /// One keeper pass over CRM_INGEST (see the module docs). Reads the stream first, then its
    /// consumers: an event stored after the stream read cannot be counted as processed.
    pub async fn trim_ingest(&self, config: &RetentionConfig) -> Result<TrimReport, BusError> {
        self.trim_stream(INGEST_STREAM, config).await
    }

    /// [`Bus::trim_ingest`] for any stream kept the same way (CRM_INGEST_PRIORITY).
    pub async fn trim_stream(
        &self,
        stream_name: &str,
        config: &RetentionConfig,
    ) -> Result<TrimReport, BusError> {
        // The lookup is a STREAM.INFO request: its answer is the fresh state and config.
        let stream = self
            .jetstream()
            .get_stream(stream_name)
            .await
            .map_err(|err| unavailable(format!("reading stream {stream_name}"), err))?;
        let info = stream.cached_info();
        let snapshot = StreamSnapshot {
            first_seq: info.state.first_sequence,
            last_seq: info.state.last_sequence,
            messages: info.state.messages,
            bytes: info.state.bytes,
            max_bytes: info.config.max_bytes,
        };
        let consumers = durable_progress(&stream, stream_name).await?;
        let (processed_through, pinned_by) = processed_floor(snapshot.last_seq, &consumers);
        // Never past what every consumer processed, never past what was read.
        let cap = processed_through.min(snapshot.last_seq).saturating_add(1);
        let pressure = pressure_bound(&snapshot, config.high_water);
        let mut purge_below = snapshot.first_seq;
        if snapshot.messages > 0 && cap > snapshot.first_seq {
            purge_below = match pressure {
                // Pressure alone reaches the cap: no need to look for the window.
                Some(bound) if bound >= cap => cap,
                _ => {
                    let cutoff = OffsetDateTime::now_utc() - config.replay_window;
                    let window_start =
                        first_at_or_after(&stream, stream_name, snapshot.first_seq, cap, cutoff)
                            .await?;
                    window_start.max(pressure.unwrap_or(0)).min(cap)
                }
            };
        }
        let mut purged = 0;
        if purge_below > snapshot.first_seq {
            purged = stream
                .purge()
                .sequence(purge_below)
                .await
                .map_err(|err| {
                    unavailable(
                        format!("purging {stream_name} below sequence {purge_below}"),
                        err,
                    )
                })?
                .purged;
        }
        let oldest = message_at_or_after(
            &stream,
            stream_name,
            purge_below.max(snapshot.first_seq).max(1),
        )
        .await?;
        let oldest_kept_age = oldest.map(|(_, time)| age(time));
        Ok(TrimReport {
            first_seq: snapshot.first_seq,
            last_seq: snapshot.last_seq,
            processed_through,
            pinned_by,
            unprocessed: snapshot.last_seq.saturating_sub(processed_through),
            purge_below,
            purged,
            under_pressure: pressure.is_some(),
            oldest_kept_age,
        })
    }
}

/// Every durable consumer's progress (ephemeral consumers, such as a replay's ordered
/// consumer, come and go and do not hold the stream).
async fn durable_progress(
    stream: &Stream,
    stream_name: &str,
) -> Result<Vec<ConsumerProgress>, BusError> {
    let infos: Vec<consumer::Info> = stream
        .consumers()
        .try_collect()
        .await
        .map_err(|err| unavailable(format!("listing the consumers of {stream_name}"), err))?;
    Ok(infos
        .into_iter()
        .filter(|info| info.config.durable_name.is_some())
        .map(|info| ConsumerProgress {
            name: info.name,
            num_pending: info.num_pending,
            num_ack_pending: info.num_ack_pending as u64,
            ack_floor: info.ack_floor.stream_sequence,
        })
        .collect())
}

/// The first stored message at or after `sequence`: its sequence and store time.
async fn message_at_or_after(
    stream: &Stream,
    stream_name: &str,
    sequence: u64,
) -> Result<Option<(u64, OffsetDateTime)>, BusError> {
    match stream
        .direct_get_next_for_subject(">", Some(sequence))
        .await
    {
        Ok(message) => Ok(Some((message.sequence, message.time))),
        Err(err) if err.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(err) => Err(unavailable(
            format!("reading {stream_name} at sequence {sequence}"),
            err,
        )),
    }
}

/// The smallest sequence in `[from, until)` whose message was stored at or after `cutoff`, or
/// `until` when there is none: a binary search by direct get (about 30 reads for a billion
/// messages), relying on store times rising with the sequence.
async fn first_at_or_after(
    stream: &Stream,
    stream_name: &str,
    from: u64,
    until: u64,
    cutoff: OffsetDateTime,
) -> Result<u64, BusError> {
    let (mut low, mut high) = (from.max(1), until);
    // The common case on a young or freshly trimmed stream: nothing is older than the cutoff.
    match message_at_or_after(stream, stream_name, low).await? {
        Some((sequence, time)) if sequence >= until || time >= cutoff => return Ok(low),
        None => return Ok(low),
        Some((sequence, _)) => low = sequence + 1,
    }
    while low < high {
        let middle = low + (high - low) / 2;
        // A gap (deleted messages) answers with the next stored one; past the end, nothing is
        // older than the cutoff.
        let inside = match message_at_or_after(stream, stream_name, middle).await? {
            Some((sequence, time)) => sequence >= until || time >= cutoff,
            None => true,
        };
        if inside {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    Ok(low)
}

fn age(time: OffsetDateTime) -> Duration {
    Duration::try_from(OffsetDateTime::now_utc() - time).unwrap_or_default()
}

/// Trim CRM_INGEST every `config.interval` until `shutdown`: logs, never panics, and keeps going
/// through errors (a missing stream, a lost connection). Records
/// `crm_ingest_replay_window_seconds`, `crm_ingest_purged_messages_total` and
/// `crm_ingest_unprocessed_messages`. Run one per router process; several at once are safe.
pub async fn run_ingest_retention(bus: Bus, config: RetentionConfig, shutdown: CancellationToken) {
    if let Err(err) = config.validate() {
        tracing::error!(error = %err, "ingest retention keeper not started");
        return;
    }
    tracing::info!(
        replay_window = ?config.replay_window,
        high_water = config.high_water,
        interval = ?config.interval,
        "ingest retention keeper started"
    );
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut outcome = Ok(());
        for stream in INGEST_STREAMS {
            match bus.trim_stream(stream, &config).await {
                Ok(report) => record(stream, &report),
                Err(err) => outcome = Err(err),
            }
        }
        match outcome {
            Ok(()) => {
                if failing {
                    tracing::info!("ingest retention keeper recovered");
                    failing = false;
                }
            }
            // One warning per outage, not one per tick.
            Err(err) if !failing => {
                tracing::warn!(error = %err, "ingest retention keeper cannot trim; retrying");
                failing = true;
            }
            Err(err) => tracing::debug!(error = %err, "ingest retention keeper still failing"),
        }
    }
}

fn record(stream: &'static str, report: &TrimReport) {
    if report.purged > 0 {
        metrics::counter!("crm_ingest_purged_messages_total", "stream" => stream)
            .increment(report.purged);
        tracing::debug!(
            stream,
            purged = report.purged,
            below = report.purge_below,
            under_pressure = report.under_pressure,
            "ingest trimmed"
        );
    }
    if report.under_pressure {
        tracing::debug!(
            stream,
            pinned_by = report.pinned_by.as_deref().unwrap_or("-"),
            unprocessed = report.unprocessed,
            "ingest above its high-water mark: trimming into the replay window"
        );
    }
    metrics::gauge!("crm_ingest_unprocessed_messages", "stream" => stream)
        .set(report.unprocessed as f64);
    metrics::gauge!("crm_ingest_replay_window_seconds", "stream" => stream)
        .set(report.oldest_kept_age.unwrap_or_default().as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(name: &str, pending: u64, ack_pending: u64, floor: u64) -> ConsumerProgress {
        ConsumerProgress {
            name: name.into(),
            num_pending: pending,
            num_ack_pending: ack_pending,
            ack_floor: floor,
        }
    }

    #[test]
    fn an_idle_consumer_has_processed_everything_read_before_it() {
        // A filtered consumer that never matched has an ack floor of 0.
        assert_eq!(progress("express", 0, 0, 0).processed_through(100), 100);
        assert_eq!(progress("busy", 3, 0, 40).processed_through(100), 40);
        assert_eq!(progress("acking", 0, 2, 98).processed_through(100), 98);
        // A floor read after newer messages arrived never reaches past what was read.
        assert_eq!(progress("fast", 1, 0, 120).processed_through(100), 100);
    }

    #[test]
    fn the_floor_is_the_slowest_consumer_and_nothing_without_consumers() {
        let consumers = [
            progress("router", 0, 0, 90),
            progress("router_express", 0, 0, 0),
            progress("analytics", 50, 10, 40),
        ];
        assert_eq!(
            processed_floor(100, &consumers),
            (40, Some("analytics".into()))
        );
        assert_eq!(processed_floor(100, &[]), (0, None));
    }

    #[test]
    fn pressure_trims_to_below_the_high_water_mark() {
        let snapshot = |bytes| StreamSnapshot {
            first_seq: 101,
            last_seq: 200,
            messages: 100,
            bytes,
            max_bytes: 100_000,
        };
        assert_eq!(pressure_bound(&snapshot(79_999), 0.8), None);
        // 80,000 bytes in 100 messages of 800: down to 72,000 means 10 messages.
        assert_eq!(pressure_bound(&snapshot(80_000), 0.8), Some(111));
        assert_eq!(pressure_bound(&snapshot(100_000), 0.8), Some(129));
        let unlimited = StreamSnapshot {
            max_bytes: -1,
            ..snapshot(100_000)
        };
        assert_eq!(pressure_bound(&unlimited, 0.8), None);
        let empty = StreamSnapshot {
            messages: 0,
            bytes: 0,
            ..snapshot(0)
        };
        assert_eq!(pressure_bound(&empty, 0.8), None);
    }

    #[test]
    fn config_defaults_parse_and_are_checked() {
        let config: RetentionConfig =
            serde_json::from_str(r#"{"replay_window": "2h", "interval": "1s"}"#).expect("parses");
        assert_eq!(config.replay_window, Duration::from_secs(7200));
        assert_eq!(config.high_water, 0.8);
        assert!(config.validate().is_ok());
        assert_eq!(
            serde_json::from_str::<RetentionConfig>("{}").expect("defaults"),
            RetentionConfig::default()
        );
        assert_eq!(
            RetentionConfig::default().replay_window,
            Duration::from_secs(86_400)
        );
        assert!(serde_json::from_str::<RetentionConfig>(r#"{"max_age": "1h"}"#).is_err());
        let bad = RetentionConfig {
            high_water: 1.5,
            ..RetentionConfig::default()
        };
        assert!(
            bad.validate()
                .expect_err("refused")
                .to_string()
                .contains("high_water")
        );
    }
}
