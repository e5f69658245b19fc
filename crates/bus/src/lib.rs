//! The only user of async-nats: connect (with version and JetStream checks), provision streams
//! and consumers from `nats/`, publish with a JetStream ack, and the one consumer runtime
//! ([`run_worker`], [`settle`]) every role reads with.

pub mod audit;
mod connect;
pub mod control;
mod dlq;
mod error;
pub mod headers;
pub mod health;
mod ingest;
pub mod lease;
pub mod liveness;
pub mod ops;
mod provision;
mod publish;
pub mod raw;
pub mod retention;
pub mod signals;
pub mod trace;
mod usage;
pub mod worker;

pub use async_nats::{self, HeaderMap, jetstream};
pub use audit::{AuditRecord, actor};
pub use connect::{Bus, ConnectOptions, MIN_SERVER_VERSION, ServerVersion, read_nkey_seed};
pub use dlq::DeadLetter;
pub use error::{BusError, BusErrorKind};
pub use health::{HealthRecorder, e2e_latency};
pub use ingest::{decode_ingest, decode_lane};
pub use liveness::Liveness;
pub use provision::{Action, Change, Definitions, FieldDiff, ObjectKind, ProvisionReport};
pub use publish::{PublishOptions, Published};
pub use retention::{
    INGEST_STREAMS, PRIORITY_INGEST_STREAM, RetentionConfig, TrimReport, run_ingest_retention,
};
pub use tokio_util::sync::CancellationToken;
pub use usage::{StreamUsage, watch_streams};
pub use worker::{
    Handler, Holding, Outcome, Runtime, Settlement, Source, WaitPolicy, WorkerConfig, isolate,
    run_on, run_worker, settle, settlement,
};
