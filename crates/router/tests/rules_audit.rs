//! Rules reloads are audited: each reload of the routing rules file, taken or refused, is a
//! record in CRM_AUDIT naming the process, the file and the outcome.

use bus::{Bus, CancellationToken, ConnectOptions, Definitions};
use router::RulesHandle;
use std::time::Duration;
use test_support::{NatsServer, eventually};

const GOOD: &str = "[[critical]]\nreason = \"only_deals\"\ntypes = [\"deal_lost\"]\n";

#[tokio::test]
async fn each_rules_reload_taken_or_refused_is_in_the_audit_log() {
    let server = NatsServer::start();
    let bus = Bus::connect(&ConnectOptions::new(server.url()))
        .await
        .expect("connect");
    bus.provision(&Definitions::embedded().expect("definitions"))
        .await
        .expect("provision");
    let dir = std::env::temp_dir().join(format!("crm-rules-audit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("routing.toml");
    std::fs::write(&path, GOOD).expect("write");
    let handle = RulesHandle::load(&path).expect("good rules");
    let shutdown = CancellationToken::new();
    let watcher = tokio::spawn(router::watch_rules(
        handle,
        path.clone(),
        Duration::from_millis(20),
        Some((bus.clone(), "router-test".to_owned())),
        shutdown.clone(),
    ));
    let reloads = || async {
        bus.audit_list(Some("rules_reload"), 10)
            .await
            .expect("audit list")
    };

    // A change the watcher takes. (Written twice a moment apart: a file system with a coarse
    // clock may not show the first change in its modification time.)
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::fs::write(&path, format!("{GOOD}\n")).expect("write");
    eventually("the reload is audited", || async {
        !reloads().await.is_empty()
    })
    .await;
    let taken = reloads().await;
    assert_eq!(taken[0].actor, "router-test");
    assert_eq!(taken[0].target, path.display().to_string());
    assert_eq!(taken[0].outcome, "ok");
    assert_eq!(taken[0].detail["trigger"], "file_changed");

    // A bad file: refused, the old rules stay, and the refusal is recorded with its error.
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::fs::write(&path, "[[critical]]\nreason = 7\n").expect("write");
    eventually("the refusal is audited", || async {
        reloads().await.iter().any(|r| r.outcome != "ok")
    })
    .await;
    let refused = reloads().await.into_iter().find(|r| r.outcome != "ok");
    assert!(
        refused.is_some_and(|r| r.outcome.contains("routing.toml")),
        "the error names the file"
    );
    shutdown.cancel();
    watcher.await.expect("join");
    let _ = std::fs::remove_dir_all(&dir);
}
