//! The critical probe: critical events sent at a fixed rate by a client of its own — its own
//! thread, runtime and connection — beside the load.
//!
//! The load's critical events share the harness's client with thousands of bulk sends: on a
//! loaded machine a critical send can wait for the harness's own threads before it reaches the
//! socket, and that wait counts in its latency (from the intended send). Real critical
//! producers (a payment service, a consent form) are clients of their own. The probe measures
//! what such a client sees, so the report can tell the platform's tail from the harness's.
//! Probe events are ordinary events of the run (slots, loss accounting, lanes) marked
//! [`PROBE`]; their latencies are also kept apart, per phase. The schedule is open (event `k`
//! is due at `k / rate`), and latency counts from the due time, so a slow answer delays the
//! next sends and is measured, not hidden (no coordinated omission).

use crate::{
    driver::{Attempt, Driver, Settled, Target, settle},
    mix::Generator,
    scenario::{DriverConfig, Mix},
    tracker::{PROBE, Run, histogram, record, tenant_flags},
};
use bus::{Bus, CancellationToken};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

/// No phase is running (between phases, or after the last).
pub const NO_PHASE: usize = usize::MAX;

/// `[critical_probe]` in a scenario.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// Critical events per second (0: no probe).
    pub rate: f64,
}

/// Where the probe sends: the gateway (its own HTTP connection) or NATS (its own connection).
#[derive(Debug)]
pub enum ProbeTarget {
    /// A [`Target::Http`].
    Http(Target),
    Nats(Box<Bus>),
}

/// What the probe measured itself, per phase: answers (intended send → ack).
#[derive(Debug)]
pub struct ProbeSent {
    pub sent: Vec<u64>,
    pub ack: Vec<Histogram<u64>>,
}

/// A running probe; [`Probe::finish`] returns what it measured.
#[derive(Debug)]
pub struct Probe {
    thread: std::thread::JoinHandle<anyhow::Result<ProbeSent>>,
}

/// What the probe needs from the run.
#[derive(Debug)]
pub struct ProbeSetup {
    pub rate: f64,
    pub driver: DriverConfig,
    pub target: ProbeTarget,
    pub mix: Mix,
    pub tenant_names: Arc<[String]>,
    pub seed: u64,
    pub phases: usize,
    /// The phase running now ([`NO_PHASE`] between phases).
    pub phase: Arc<AtomicUsize>,
}

/// Only critical events, otherwise `mix`'s tenants and customers.
fn critical_only(mix: &Mix) -> Mix {
    Mix {
        critical: 1.0,
        high: 0.0,
        standard: 0.0,
        analytics_only: 0.0,
        invalid_share: 0.0,
        poison_share: 0.0,
        ..mix.clone()
    }
}

impl Probe {
    /// Start the probe on a thread of its own; it sends until `stop`.
    pub fn spawn(setup: ProbeSetup, run: Arc<Run>, stop: CancellationToken) -> Self {
        let thread = std::thread::Builder::new()
            .name("crm-load-probe".into())
            .spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(probe(setup, run, stop))
            })
            .expect("spawning the probe thread");
        Self { thread }
    }

    pub fn finish(self) -> anyhow::Result<ProbeSent> {
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the probe thread panicked"))?
    }
}

async fn probe(
    setup: ProbeSetup,
    run: Arc<Run>,
    stop: CancellationToken,
) -> anyhow::Result<ProbeSent> {
    let mut measured = ProbeSent {
        sent: vec![0; setup.phases],
        ack: (0..setup.phases).map(|_| histogram(3)).collect(),
    };
    let target = match setup.target {
        ProbeTarget::Http(target) => target,
        // Connected here, so that the connection's I/O runs on this thread.
        ProbeTarget::Nats(bus) => Target::Nats(Box::new(bus.connect_another("probe").await?)),
    };
    let driver = Driver::new(&setup.driver, target, 1)?;
    let mix = critical_only(&setup.mix);
    let mut generator = Generator::new(&mix, &setup.tenant_names, run.run_tag, setup.seed ^ PROBE);
    let interval_ns = (1e9 / setup.rate.max(1e-3)) as u64;
    let mut due_ns = run.now_ns();
    let mut results = Vec::with_capacity(1);
    loop {
        let now = run.now_ns();
        if due_ns > now {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_nanos(due_ns - now)) => {}
                () = stop.cancelled() => break,
            }
        }
        if stop.is_cancelled() {
            break;
        }
        let intended_ns = due_ns;
        due_ns += interval_ns;
        let phase = setup.phase.load(Relaxed);
        if phase >= setup.phases {
            continue;
        }
        let index = run.next_index();
        let id_millis = (run.started_unix_ns + intended_ns) / 1_000_000;
        let generated = generator.next_for(index, None, id_millis);
        run.slots
            .generate(index, intended_ns, generated.class, phase);
        run.slots
            .mark(index, tenant_flags(generated.tenant) | PROBE);
        run.mark_sent(index, intended_ns);
        measured.sent[phase] += 1;
        let attempt = Attempt {
            index,
            intended_ns,
            number: 1,
        };
        driver
            .send(std::slice::from_ref(&generated), &mut results)
            .await;
        let now = run.now_ns();
        if let Some(outcome) = results.pop()
            && let Settled::Acked(latency) = settle(&run, &attempt, outcome, now)
        {
            record(&mut measured.ack[phase], latency);
        }
    }
    Ok(measured)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mix::Class;

    #[test]
    fn the_probe_generates_critical_events_only() {
        let mix = critical_only(&Mix::default());
        let names: Vec<String> = vec!["t0".into(), "t1".into()];
        let mut generator = Generator::new(&mix, &names, 7, 1);
        for index in 0..500 {
            assert_eq!(generator.next_for(index, None, 0).class, Class::Critical);
        }
    }
}
