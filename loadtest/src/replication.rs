//! `crm-load replication`: what durability costs JetStream here. Raw publish, pull-consume and a
//! producer's wait for its PubAck on one server (R1) and on a 3-node cluster (R3), each with the
//! server's default lazy fsync and with `sync_interval: always`, measured one after the other in
//! one run on the same machine.

use anyhow::Result;
use bus::{ConnectOptions, raw::RawRates};
use bytes::Bytes;
use events::EventType;
use std::time::{Duration, Instant};
use test_support::{NatsCluster, NatsServer, connect_when_ready, jetstream_conf};

/// One server or cluster setup.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Setup {
    pub name: &'static str,
    pub nodes: usize,
    pub replicas: usize,
    pub sync_always: bool,
}

pub const SETUPS: [Setup; 4] = [
    Setup {
        name: "R1, one server, fsync lazy (default)",
        nodes: 1,
        replicas: 1,
        sync_always: false,
    },
    Setup {
        name: "R1, one server, sync_interval: always",
        nodes: 1,
        replicas: 1,
        sync_always: true,
    },
    Setup {
        name: "R3, 3-node cluster, fsync lazy (default)",
        nodes: 3,
        replicas: 3,
        sync_always: false,
    },
    Setup {
        name: "R3, 3-node cluster, sync_interval: always",
        nodes: 3,
        replicas: 3,
        sync_always: true,
    },
];

/// What one setup measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Measured {
    pub setup: Setup,
    pub rates: RawRates,
    /// A producer that waits for each PubAck before the next publish.
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
    pub sequential_per_s: f64,
}

/// The servers of one setup, stopped on drop.
enum Servers {
    One(NatsServer),
    Cluster(NatsCluster),
}

impl Servers {
    fn start(setup: &Setup) -> Self {
        let conf = if setup.sync_always {
            jetstream_conf("sync_interval: always")
        } else {
            String::new()
        };
        if setup.nodes == 1 {
            Self::One(NatsServer::start_with_config(&conf))
        } else {
            Self::Cluster(NatsCluster::start_with_config(setup.nodes, &conf))
        }
    }

    fn url(&self) -> String {
        match self {
            Self::One(server) => server.url(),
            Self::Cluster(cluster) => cluster.url(),
        }
    }
}

fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1e3
}

/// Measure every setup of [`SETUPS`]: `events` pipelined publishes then pulls, and
/// `sequential` publishes one at a time.
pub async fn measure(events: usize, sequential: usize) -> Result<Vec<Measured>> {
    let event = events::sample::event(EventType::ContactUpdated, "acme", "cust-1");
    let payload = Bytes::from(events::encode_proto(&event));
    let payloads = vec![payload; events.max(sequential)];
    let mut out = Vec::new();
    for setup in SETUPS {
        eprintln!("{} …", setup.name);
        let servers = Servers::start(&setup);
        let mut options = ConnectOptions::new(servers.url()).name("crm-load-replication");
        options.connect_timeout = Duration::from_secs(2);
        options.request_timeout = Duration::from_secs(10);
        let bus = connect_when_ready(&options).await;
        let rates = bus
            .raw_rates_replicated(
                "CRM_REPLICATION",
                "crmrepl",
                &payloads[..events],
                setup.replicas,
            )
            .await?;
        bus.raw_stream("CRM_REPLICATION", "crmrepl", setup.replicas)
            .await?;
        let started = Instant::now();
        let mut latencies = bus
            .publish_latencies("crmrepl.x", &payloads[..sequential])
            .await?;
        let elapsed = started.elapsed();
        latencies.sort();
        out.push(Measured {
            setup,
            rates,
            ack_p50_ms: percentile_ms(&latencies, 0.50),
            ack_p99_ms: percentile_ms(&latencies, 0.99),
            sequential_per_s: sequential as f64 / elapsed.as_secs_f64().max(1e-9),
        });
        drop(bus);
        drop(servers);
    }
    Ok(out)
}

/// The table: every setup beside the first (R1, lazy fsync).
pub fn render(measured: &[Measured]) -> String {
    let base = measured.first().map_or(1.0, |m| m.rates.publish_per_s);
    let mut text = String::from(
        "| setup | publish/s (pipelined) | ÷ R1 lazy | pull-consume + ack/s | one producer, ack p50 / p99 ms | one producer, events/s |\n\
         |---|---|---|---|---|---|\n",
    );
    for m in measured {
        text.push_str(&format!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.2} / {:.2} | {:.0} |\n",
            m.setup.name,
            m.rates.publish_per_s,
            m.rates.publish_per_s / base.max(1e-9),
            m.rates.consume_per_s,
            m.ack_p50_ms,
            m.ack_p99_ms,
            m.sequential_per_s
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let sorted: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&sorted, 0.50), 50.0);
        assert_eq!(percentile_ms(&sorted, 0.99), 99.0);
        assert_eq!(percentile_ms(&[], 0.99), 0.0);
    }
}
