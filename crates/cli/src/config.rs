//! `crm.toml` with `CRM_<SECTION>__<KEY>` environment overrides.

use anyhow::{Context, Result};
use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub nats: NatsConfig,
    pub store: StoreConfig,
    pub admin: AdminConfig,
    pub cache: CacheConfig,
    pub retention: bus::RetentionConfig,
    pub runtime: crate::sched::RuntimeConfig,
    #[serde(skip_serializing)]
    pub gateway: gateway::GatewayConfig,
    #[serde(skip_serializing)]
    pub router: router::RouterConfig,
    #[serde(skip_serializing)]
    pub projector: projector::ProjectorConfig,
    #[serde(skip_serializing)]
    pub analytics: analytics::AnalyticsConfig,
    #[serde(skip_serializing)]
    pub notifier: notifier::NotifierConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    pub url: String,
    pub credentials_file: Option<PathBuf>,
    /// This process's NKey seed file (`crm nkeys`): its identity on a server configured from
    /// `nats/secure/` (one user per role, each with only the permissions it needs).
    pub nkey_file: Option<PathBuf>,
    /// This process's reply subject prefix (`_INBOX_router`); the secure server config lets each
    /// role subscribe to its own only. Default `_INBOX`.
    pub inbox_prefix: Option<String>,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_client_cert: Option<PathBuf>,
    pub tls_client_key: Option<PathBuf>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:14222".into(),
            credentials_file: None,
            nkey_file: None,
            inbox_prefix: None,
            tls_ca_file: None,
            tls_client_cert: None,
            tls_client_key: None,
        }
    }
}

impl NatsConfig {
    pub fn options(&self, name: &str) -> bus::ConnectOptions {
        let mut options = bus::ConnectOptions::new(&self.url).name(name);
        options.credentials_file = self.credentials_file.clone();
        options.nkey_file = self.nkey_file.clone();
        options.inbox_prefix = self.inbox_prefix.clone();
        options.tls_ca_file = self.tls_ca_file.clone();
        options.tls_client_cert = self
            .tls_client_cert
            .clone()
            .zip(self.tls_client_key.clone());
        options.require_tls = options.tls_ca_file.is_some() || options.tls_client_cert.is_some();
        options
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub url: String,
    /// SQLite only: `full` (an acked event's effect survives an OS crash or power loss) or
    /// `normal` (faster; survives a process crash only). See [`store::SqliteSynchronous`].
    pub sqlite_synchronous: store::SqliteSynchronous,
    /// SQLite only: events per segment of a bulk projector batch while critical events are being
    /// committed; a critical commit waits for at most one segment of bulk work (for none when the
    /// segment is the first of its transaction: it is rolled back and written again). Smaller: faster
    /// critical commits, more statements for bulk (32: about a fifth of the projector's
    /// throughput alone). 0: never segment. See [`store::StoreOptions::sqlite_yield_segment`].
    pub sqlite_yield_segment: usize,
    /// How long the idempotency ledgers keep a processed event: a duplicate (redelivery,
    /// replay, client retry with the same key) is recognised only within it. Longer than any
    /// backlog, replay window or retry; > 0. Pruned by [`store::run_ledger_pruner`].
    #[serde(with = "positive_duration")]
    pub ledger_retention: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://.data/crm.db?mode=rwc".into(),
            sqlite_synchronous: store::SqliteSynchronous::default(),
            sqlite_yield_segment: store::DEFAULT_SQLITE_YIELD_SEGMENT,
            ledger_retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl StoreConfig {
    /// What [`store::Store::connect_with`] needs.
    pub fn options(&self) -> store::StoreOptions {
        store::StoreOptions {
            url: self.url.clone(),
            sqlite_synchronous: self.sqlite_synchronous,
            sqlite_yield_segment: self.sqlite_yield_segment,
        }
    }
}

/// A humantime duration (`"30d"`) that must be more than zero: a zero ledger retention would
/// forget every event at once and make every redelivery a second effect.
mod positive_duration {
    use serde::{Deserializer, Serializer, de::Error};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        humantime_serde::serialize(value, serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let value: Duration = humantime_serde::deserialize(deserializer)?;
        if value.is_zero() {
            return Err(D::Error::custom("must be more than 0 (e.g. \"30d\")"));
        }
        Ok(value)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// `/healthz` fails (503) when a consumer loop has had a batch in hand this long with none
    /// finished: the process is stuck and should be restarted.
    #[serde(with = "positive_duration")]
    pub stall_after: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9100)),
            stall_after: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub max_customers: u64,
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_customers: 100_000,
            ttl: Duration::from_secs(60),
        }
    }
}

impl Config {
    /// Defaults, then the file (when it exists or was named), then the environment.
    pub fn load(path: &Path, must_exist: bool) -> Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if path.exists() {
            figment = figment.merge(Toml::file(path));
        } else if must_exist {
            anyhow::bail!("config file {} not found", path.display());
        }
        figment = figment.merge(
            Env::prefixed("CRM_")
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        );
        let mut config: Config = figment.extract().with_context(|| {
            format!(
                "reading configuration from {} and CRM_* variables",
                path.display()
            )
        })?;
        if let Ok(url) = std::env::var("CRM_NATS_URL") {
            config.nats.url = url;
        }
        // Relative paths in the file are relative to the file.
        if let (Some(rules), Some(dir)) = (&config.router.rules_file, path.parent())
            && rules.is_relative()
            && !dir.as_os_str().is_empty()
        {
            config.router.rules_file = Some(dir.join(rules));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_example_loads_and_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crm.toml");
        let config = Config::load(&path, true).expect("crm.toml loads");
        assert_eq!(
            config.analytics.throttle.target_p99,
            Duration::from_millis(100)
        );
        config
            .analytics
            .validate()
            .expect("analytics settings are valid");
        assert!(
            config
                .router
                .rules_file
                .as_ref()
                .is_some_and(|rules| rules.exists()),
            "the rules file resolves next to crm.toml"
        );
    }

    #[test]
    fn store_defaults_are_durable_and_keep_the_ledgers_30_days() {
        let store = StoreConfig::default();
        assert_eq!(store.sqlite_synchronous, store::SqliteSynchronous::Full);
        assert_eq!(store.ledger_retention, Duration::from_secs(30 * 24 * 3600));
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("crm.toml");
        std::fs::write(
            &path,
            "[store]\nsqlite_synchronous = \"normal\"\nledger_retention = \"7d\"\n",
        )
        .expect("write");
        let config = Config::load(&path, true).expect("loads");
        assert_eq!(
            config.store.options().sqlite_synchronous,
            store::SqliteSynchronous::Normal
        );
        assert_eq!(
            config.store.ledger_retention,
            Duration::from_secs(7 * 24 * 3600)
        );
    }

    #[test]
    fn store_settings_out_of_range_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("crm.toml");
        for (text, needle) in [
            ("[store]\nledger_retention = \"0s\"\n", "ledger_retention"),
            (
                "[store]\nsqlite_synchronous = \"off\"\n",
                "sqlite_synchronous",
            ),
        ] {
            std::fs::write(&path, text).expect("write");
            let err = format!("{:#}", Config::load(&path, true).expect_err("refused"));
            assert!(err.contains(needle), "{needle} in {err}");
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("crm.toml");
        std::fs::write(
            &path,
            "[analytics.throttle]\ntarget_p99 = \"1s\"\nshoe_size = 3\n",
        )
        .expect("write");
        let err = format!("{:#}", Config::load(&path, true).expect_err("refused"));
        assert!(err.contains("shoe_size"), "{err}");
    }
}
