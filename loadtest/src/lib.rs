//! `crm-load`: the load-test harness. Open and closed models over HTTP or NATS, per-lane
//! end-to-end latency measured from each event's intended send time (no coordinated omission),
//! completion matched by event id from the workers' processed notices, loss accounting, raw
//! JetStream and synchronous baselines in the same run, and JSON / Markdown / HTML reports with
//! SLO verdicts.

pub mod admission;
pub mod chaos;
pub mod client_retry;
pub mod driver;
pub mod effects;
pub mod evidence;
pub mod goodput;
pub mod html;
pub mod inversion;
pub mod mix;
pub mod probe;
pub mod procs;
pub mod replication;
pub mod report;
pub mod retry;
pub mod run;
pub mod scenario;
pub mod stack;
pub mod sync_baseline;
pub mod tracker;
