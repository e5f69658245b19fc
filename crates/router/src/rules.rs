//! The live rule set: swapped atomically on reload; a bad file is refused and the old rules stay.

use routing::Rules;
use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

/// Shared, reloadable rules.
#[derive(Debug, Clone)]
pub struct RulesHandle {
    current: Arc<RwLock<Arc<Rules>>>,
}

impl RulesHandle {
    pub fn new(rules: Rules) -> Self {
        Self {
            current: Arc::new(RwLock::new(Arc::new(rules))),
        }
    }

    /// Load from `path` (refusing a bad file with an error naming the problem).
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        Ok(Self::new(read(path)?))
    }

    pub fn current(&self) -> Arc<Rules> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, rules: Rules) {
        match self.current.write() {
            Ok(mut guard) => *guard = Arc::new(rules),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(rules),
        }
    }

    /// Re-read `path`; on error keep the current rules and return the error.
    pub fn reload(&self, path: &std::path::Path) -> Result<(), String> {
        match read(path) {
            Ok(rules) => {
                self.replace(rules);
                crate::signals::rules_reloaded(path);
                Ok(())
            }
            Err(error) => {
                crate::signals::rules_refused(path, &error);
                Err(error)
            }
        }
    }
}

fn read(path: &std::path::Path) -> Result<Rules, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| format!("reading {}: {err}", path.display()))?;
    Rules::from_toml(&text).map_err(|err| format!("{}: {err}", path.display()))
}

fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Reload `path` when it changes (checked every `interval`) or on SIGHUP, until `shutdown`.
/// With `audit` (a connection and the actor to name), each reload, taken or refused, is recorded
/// in the audit log.
pub async fn watch_rules(
    handle: RulesHandle,
    path: PathBuf,
    interval: Duration,
    audit: Option<(bus::Bus, String)>,
    shutdown: bus::CancellationToken,
) {
    let reload = |trigger: &'static str| {
        let result = handle.reload(&path);
        let audit = audit.clone();
        let target = path.display().to_string();
        async move {
            let Some((bus, actor)) = audit else { return };
            let record = bus::AuditRecord::new(&actor, "rules_reload", target)
                .outcome(&result)
                .detail(serde_json::json!({ "trigger": trigger }));
            if let Err(err) = bus.audit(&record).await {
                tracing::error!(error = %err, "the rules reload's audit record could not be stored");
            }
        }
    };
    let mut last = modified(&path);
    let mut ticker = tokio::time::interval(interval);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hup = async {
            match hangup.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hup = std::future::pending::<()>();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hup => { reload("sighup").await; last = modified(&path); }
            _ = ticker.tick() => {
                let now = modified(&path);
                if now != last {
                    last = now;
                    reload("file_changed").await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_file_is_refused_and_the_old_rules_stay() {
        let dir = std::env::temp_dir().join(format!("crm-rules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("routing.toml");
        std::fs::write(
            &path,
            "[[critical]]\nreason = \"only_deals\"\ntypes = [\"deal_lost\"]\n",
        )
        .expect("write");
        let handle = RulesHandle::load(&path).expect("valid rules");
        let lost = events::sample::event(events::EventType::DealLost, "t", "c");
        assert_eq!(handle.current().classify(&lost, None).reason, "only_deals");

        std::fs::write(
            &path,
            "[[critical]]\nreason = \"x\"\ntypes = [\"no_such_type\"]\n",
        )
        .expect("write");
        let error = handle.reload(&path).expect_err("refused");
        assert!(error.contains("critical[0].types[0]"), "{error}");
        assert_eq!(
            handle.current().classify(&lost, None).reason,
            "only_deals",
            "old rules kept"
        );

        std::fs::write(&path, "").expect("write");
        handle.reload(&path).expect("empty rules are valid");
        assert_eq!(handle.current().classify(&lost, None).reason, "default");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
