//! The only user of async-nats: connect (with version and JetStream checks), provision streams
//! and consumers from `nats/`, and publish with a JetStream ack.

mod connect;
mod dlq;
mod error;
pub mod headers;
pub mod ops;
mod provision;
mod publish;
pub mod worker;

pub use async_nats::{self, HeaderMap, jetstream};
pub use connect::{Bus, ConnectOptions, MIN_SERVER_VERSION, ServerVersion};
pub use dlq::DeadLetter;
pub use error::{BusError, BusErrorKind};
pub use provision::{Action, Change, Definitions, ObjectKind, ProvisionReport};
pub use publish::{PublishOptions, Published};
pub use tokio_util::sync::CancellationToken;
pub use worker::{Handler, Outcome, WorkerConfig, run_worker};
