//! What the projector's tests share: a connected bus with the embedded definitions provisioned.

use bus::{Bus, ConnectOptions, Definitions};
use test_support::NatsServer;

pub async fn provisioned(server: &NatsServer) -> Bus {
    let bus = Bus::connect(&ConnectOptions::new(server.url()))
        .await
        .expect("connect");
    bus.provision(&Definitions::embedded().expect("definitions"))
        .await
        .expect("provision");
    bus
}
