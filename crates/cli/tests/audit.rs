//! The audit log, through the `crm` binary against a real nats-server: operator actions are
//! recorded with who, what, when and the result, and `crm audit` lists them.

use std::process::Command;
use test_support::NatsServer;

fn crm(server: &NatsServer, actor: &str, args: &[&str]) -> (bool, String, String) {
    // Run where there is no crm.toml: the defaults, with the test's server.
    let dir = std::env::temp_dir().join(format!("crm-audit-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a working directory");
    let output = Command::new(env!("CARGO_BIN_EXE_crm"))
        .current_dir(&dir)
        .args(["--nats-url", &server.url()])
        .args(args)
        .env("CRM_ACTOR", actor)
        .env_remove("CRM_CONFIG")
        .output()
        .expect("run crm");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn records(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON record"))
        .collect()
}

#[test]
fn operator_actions_are_recorded_with_who_what_when_and_result() {
    let server = NatsServer::start();
    let before = bus::control::unix_ms();
    let (ok, _, err) = crm(&server, "alice", &["provision"]);
    assert!(ok, "{err}");
    let (ok, out, err) = crm(&server, "bob", &["dlq", "purge", "--stage", "router"]);
    assert!(ok, "{err}");
    assert!(out.contains("purged 0"), "{out}");
    // A failed action is recorded with its error.
    let (ok, _, _) = crm(&server, "carol", &["dlq", "replay", "--seq", "99"]);
    assert!(!ok, "there is no dead letter 99");

    let (ok, out, err) = crm(&server, "auditor", &["audit"]);
    assert!(ok, "{err}");
    let all = records(&out);
    let actions: Vec<(&str, &str)> = all
        .iter()
        .map(|r| {
            (
                r["actor"].as_str().unwrap_or_default(),
                r["action"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        vec![
            ("alice", "provision"),
            ("bob", "dlq_purge"),
            ("carol", "dlq_replay")
        ],
        "{out}"
    );
    let provision = &all[0];
    assert_eq!(provision["outcome"], "ok");
    assert!(
        provision["detail"]["changes"].as_array().is_some_and(|c| c
            .iter()
            .any(|c| c.as_str().unwrap_or_default().contains("CRM_AUDIT"))),
        "the changes it made: {provision}"
    );
    let purge = &all[1];
    assert_eq!(purge["target"], "CRM_DLQ stage router");
    assert_eq!(purge["detail"]["purged"], 0);
    assert!(
        purge["at_ms"].as_u64().is_some_and(|at| at >= before),
        "{purge}"
    );
    let replay = &all[2];
    assert_eq!(replay["target"], "CRM_DLQ seq 99");
    assert!(
        replay["outcome"].as_str().is_some_and(|o| o.contains("99")),
        "the error: {replay}"
    );

    // Filtered by action, newest last, at most --limit.
    let (ok, out, _) = crm(&server, "auditor", &["audit", "--action", "dlq_purge"]);
    assert!(ok);
    assert_eq!(records(&out).len(), 1, "{out}");
    let (ok, out, _) = crm(&server, "auditor", &["audit", "--limit", "1"]);
    assert!(ok);
    let newest = records(&out);
    assert_eq!(newest.len(), 1);
    assert_eq!(newest[0]["action"], "dlq_replay");
}

mod common;

/// API keys live in the configuration: the gateway records the set when it differs from the last
/// recorded one (at the first start, the whole set), by tenant and hash prefix, never the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_api_key_set_is_audited_at_the_gateways_start() {
    let server = NatsServer::start();
    let db = test_support::TempSqlite::new();
    let mut config = common::config(&server, &db.url());
    let gateway_only = cli::roles::Roles::GATEWAY;
    let key_records = |bus: bus::Bus| async move {
        bus.audit_list(Some("api_keys"), 10)
            .await
            .expect("CRM_AUDIT reads")
    };
    let bus = common::bus(&server).await;

    common::Platform::start(&config, gateway_only)
        .await
        .shutdown()
        .await;
    let first = key_records(bus.clone()).await;
    assert_eq!(first.len(), 1, "{first:?}");
    let prefix = &gateway::hash_key(common::KEY)[..12];
    assert_eq!(
        first[0].detail["added"],
        serde_json::json!([{"tenant": "acme", "sha256_prefix": prefix}])
    );
    assert!(
        !first[0]
            .detail
            .to_string()
            .contains(&gateway::hash_key(common::KEY))
    );

    // The same keys again: nothing to record.
    common::Platform::start(&config, gateway_only)
        .await
        .shutdown()
        .await;
    assert_eq!(key_records(bus.clone()).await.len(), 1);

    // A key for another tenant added, the old one rotated out.
    config.gateway.api_keys = vec![gateway::ApiKey {
        sha256: gateway::hash_key("globex-key"),
        tenant: "globex".into(),
    }];
    common::Platform::start(&config, gateway_only)
        .await
        .shutdown()
        .await;
    let records = key_records(bus).await;
    assert_eq!(records.len(), 2, "{records:?}");
    let change = &records[1];
    assert!(change.actor.starts_with("gateway"), "{change:?}");
    assert_eq!(change.detail["added"][0]["tenant"], "globex");
    assert_eq!(change.detail["removed"][0]["tenant"], "acme");
    assert_eq!(change.detail["set"].as_array().map(Vec::len), Some(1));
}
