//! What the harness's tests share: a stub gateway and one phase of load against it.

#![allow(dead_code)] // not every test file uses every helper

use crm_load::{
    driver::{Driver, PhaseContext, PhaseSent, Target, run_phase},
    mix::tenant_id,
    scenario::{DriverConfig, Load, Mix},
    tracker::Run,
};
use std::{sync::Arc, time::Duration};

pub use test_support::serve;

/// Run one phase of `load` for `duration` (one tenant, default mix) through `config`'s driver
/// at `target`, accounted in `run`.
pub async fn one_phase(
    config: &DriverConfig,
    target: Target,
    run: &Arc<Run>,
    seed: u64,
    load: Load,
    duration: Duration,
) -> PhaseSent {
    let driver = Driver::new(config, target, config.connections).expect("driver");
    let context = PhaseContext {
        run: Arc::clone(run),
        driver: Arc::new(driver),
        mix: Mix {
            tenants: 1,
            ..Mix::default()
        },
        tenant_names: vec![tenant_id(0)].into(),
        seed,
        events_per_send: 1,
        connections: config.connections,
        retries: None,
    };
    run_phase(&context, 0, load, 0, duration).await
}
