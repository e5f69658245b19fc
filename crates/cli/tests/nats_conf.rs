//! The nats-server configs the repository ships parse with the pinned server (`nats-server -t`),
//! with the environment they document.

use std::{path::Path, process::Command};

fn check(file: &str, env: &[(String, String)]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../nats")
        .join(file);
    let output = Command::new(test_support::nats_server_binary())
        .arg("-t")
        .arg("-c")
        .arg(&path)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("nats-server runs");
    assert!(
        output.status.success(),
        "{file}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn every_shipped_server_config_parses() {
    let keys = tempfile::tempdir().expect("dir");
    let mut env = cli::nkeys::generate(keys.path()).expect("keys");
    check("dev.conf", &[]);
    check("prod.conf", &env);
    env.push(("NATS_NODE".into(), "nats-1".into()));
    check("cluster/node.conf", &env);
}

#[test]
fn the_secure_configs_need_every_key() {
    let keys = tempfile::tempdir().expect("dir");
    let mut env = cli::nkeys::generate(keys.path()).expect("keys");
    env.retain(|(name, _)| name != "CRM_NKEY_ROUTER");
    let output = Command::new(test_support::nats_server_binary())
        .args(["-t", "-c"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nats/prod.conf"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("nats-server runs");
    assert!(!output.status.success(), "a missing key was not noticed");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(said.contains("CRM_NKEY_ROUTER"), "{said}");
}
