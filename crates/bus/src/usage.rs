//! Stream usage (bytes, messages, the byte limit) as gauges, so a stream filling up alerts
//! before its writes are refused.

use crate::{Bus, BusError, CancellationToken};
use std::{collections::HashSet, time::Duration};

/// How full a stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StreamUsage {
    pub messages: u64,
    pub bytes: u64,
    /// The stream's `max_bytes`; `None` when unlimited.
    pub max_bytes: Option<u64>,
}

impl StreamUsage {
    /// `bytes / max_bytes`, `None` for an unlimited stream.
    pub fn ratio(&self) -> Option<f64> {
        self.max_bytes
            .filter(|max| *max > 0)
            .map(|max| self.bytes as f64 / max as f64)
    }
}

impl Bus {
    /// The stream's usage, fresh from the server (one STREAM.INFO).
    pub async fn stream_usage(&self, stream: &str) -> Result<StreamUsage, BusError> {
        // The lookup is a STREAM.INFO request: its answer is the fresh state and config.
        let handle = self
            .jetstream()
            .get_stream(stream)
            .await
            .map_err(|err| BusError::unavailable(format!("reading stream {stream}"), err))?;
        let info = handle.cached_info();
        Ok(StreamUsage {
            messages: info.state.messages,
            bytes: info.state.bytes,
            max_bytes: u64::try_from(info.config.max_bytes)
                .ok()
                .filter(|max| *max > 0),
        })
    }
}

/// Every `every` until `shutdown`, set `crm_stream_bytes{stream}`, `crm_stream_messages{stream}`
/// and, for streams with a byte limit, `crm_stream_max_bytes{stream}` (one STREAM.INFO per stream
/// per tick). An unlimited stream exports no limit, so `bytes / max_bytes` has no series to
/// alert on; a limit lifted while running is set to NaN, which compares false. A stream that
/// cannot be read is skipped for the tick (logged once until it can be read again).
pub async fn watch_streams(
    bus: Bus,
    streams: Vec<String>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut limited: HashSet<String> = HashSet::new();
    let mut failing: HashSet<String> = HashSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for stream in &streams {
            let usage = match bus.stream_usage(stream).await {
                Ok(usage) => {
                    failing.remove(stream);
                    usage
                }
                Err(err) => {
                    if failing.insert(stream.clone()) {
                        tracing::warn!(stream, error = %err, "cannot read stream usage");
                    }
                    continue;
                }
            };
            let labels = [("stream", stream.clone())];
            metrics::gauge!("crm_stream_bytes", &labels).set(usage.bytes as f64);
            metrics::gauge!("crm_stream_messages", &labels).set(usage.messages as f64);
            match usage.max_bytes {
                Some(max) => {
                    limited.insert(stream.clone());
                    metrics::gauge!("crm_stream_max_bytes", &labels).set(max as f64);
                }
                None if limited.remove(stream) => {
                    metrics::gauge!("crm_stream_max_bytes", &labels).set(f64::NAN);
                }
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ratio_only_with_a_limit() {
        let usage = |max_bytes| StreamUsage {
            messages: 10,
            bytes: 800,
            max_bytes,
        };
        assert_eq!(usage(Some(1000)).ratio(), Some(0.8));
        assert_eq!(usage(None).ratio(), None);
        assert_eq!(usage(Some(0)).ratio(), None);
    }
}
