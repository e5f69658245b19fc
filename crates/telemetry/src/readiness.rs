use serde::Serialize;
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

/// Named readiness checks shared by every clone: ready when every registered check passes.
///
/// Register checks up front with [`Readiness::with_checks`] (they start failing) so the process
/// is not ready before each has been confirmed; a set with no checks is ready.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<String, bool>>>,
}

/// The state `/readyz` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReadinessReport {
    pub ready: bool,
    /// Failing checks, by name.
    pub failing: Vec<String>,
}

impl Readiness {
    /// A set whose `checks` are registered and failing.
    pub fn with_checks<I, S>(checks: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let readiness = Self::default();
        readiness
            .lock()
            .extend(checks.into_iter().map(|name| (name.into(), false)));
        readiness
    }

    /// Record whether `check` passes, registering it if new.
    pub fn set(&self, check: &str, ok: bool) {
        let mut checks = self.lock();
        match checks.get_mut(check) {
            Some(state) => *state = ok,
            None => {
                checks.insert(check.to_owned(), ok);
            }
        }
    }

    pub fn is_ready(&self) -> bool {
        self.lock().values().all(|ok| *ok)
    }

    pub fn report(&self) -> ReadinessReport {
        let failing: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, ok)| !**ok)
            .map(|(name, _)| name.clone())
            .collect();
        ReadinessReport {
            ready: failing.is_empty(),
            failing,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, bool>> {
        // The map holds plain flags; a panic elsewhere cannot leave it half-updated.
        self.checks.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_check_passes() {
        assert!(Readiness::default().is_ready(), "no checks: ready");

        let readiness = Readiness::with_checks(["nats", "streams"]);
        let shared = readiness.clone();
        assert!(!readiness.is_ready());
        assert_eq!(readiness.report().failing, ["nats", "streams"]);

        shared.set("streams", true);
        assert_eq!(
            readiness.report(),
            ReadinessReport {
                ready: false,
                failing: vec!["nats".into()]
            }
        );
        shared.set("nats", true);
        assert!(readiness.is_ready());

        readiness.set("store", false);
        assert_eq!(shared.report().failing, ["store"]);
        readiness.set("nats", false);
        assert_eq!(shared.report().failing, ["nats", "store"]);
    }
}
