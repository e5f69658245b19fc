//! The `crm` binary's library half: configuration and starting roles, so tests can run the whole
//! platform in-process.

pub mod config;
pub mod nkeys;
pub mod probe;
pub mod roles;
pub mod sched;
pub mod status;
