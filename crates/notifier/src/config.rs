//! `[notifier]` configuration: the webhook subscriptions and the delivery parameters, checked
//! once at start so that a bad entry is refused with the field path at fault.

use events::{EventType, Lane};
use serde::Deserialize;
use std::{collections::HashSet, fmt, sync::Arc, time::Duration};

/// The default `max_deliveries`. The provisioned consumers leave giving up to the runtime
/// (`max_deliver: -1`); [`run`](crate::run) refuses a consumer whose server-side limit is lower
/// than `max_deliveries`, since the server would then drop an event without a dead letter.
pub const DEFAULT_MAX_DELIVERIES: i64 = 10;
/// The most `max_deliveries` may be: the delivered-memory is kept for as long as an event can
/// keep being redelivered, which grows with it.
pub const MAX_MAX_DELIVERIES: i64 = 100;

/// How long the JetStream consumers wait for an ack before redelivering.
const CONSUMER_ACK_WAIT: Duration = Duration::from_secs(30);

/// Notifier settings (`[notifier]` in crm.toml). Durations are humantime strings (`"10s"`,
/// `"5m"`); missing keys take the [`Default`] values, unknown keys are refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifierConfig {
    /// The subscriptions. Default none (every lane event is acked without a request).
    pub webhooks: Vec<WebhookConfig>,
    /// Whole-request limit (connect, send, response, body excerpt). Default 10 s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Requests in flight per endpoint; beyond it, events are retried later. Default 8.
    pub endpoint_concurrency: usize,
    /// Consecutive failures that open an endpoint's circuit breaker. Default 5.
    pub breaker_failure_threshold: u32,
    /// How long an open breaker refuses requests before one trial. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub breaker_cool_down: Duration,
    /// First retry delay after a failed request; doubles per delivery, with jitter. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Cap on every retry delay, including what a receiver asks for with `Retry-After`.
    /// Default 5 min.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// First retry delay for an event whose endpoint was at its concurrency limit; doubles per
    /// delivery, with jitter. Default 250 ms.
    #[serde(with = "humantime_serde")]
    pub busy_retry_base: Duration,
    /// Deliveries of an event before it is dead-lettered (1..=100).
    /// Default 10.
    pub max_deliveries: i64,
    /// Events handled at once, across all endpoints. Default 64.
    pub concurrency: usize,
    /// Share of picks that go to the lowest lane with work, so it never starves. Default 0.05.
    pub lower_lane_share: f64,
    /// (subscription, event) pairs remembered as accepted, so a redelivered event is not sent
    /// again where it already arrived. Default 100,000.
    pub remember_accepted: u64,
}

impl Default for NotifierConfig {
    fn default() -> Self {
        Self {
            webhooks: Vec::new(),
            request_timeout: Duration::from_secs(10),
            endpoint_concurrency: 8,
            breaker_failure_threshold: 5,
            breaker_cool_down: Duration::from_secs(30),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(5 * 60),
            busy_retry_base: Duration::from_millis(250),
            max_deliveries: DEFAULT_MAX_DELIVERIES,
            concurrency: 64,
            lower_lane_share: 0.05,
            remember_accepted: 100_000,
        }
    }
}

/// One subscription (`[[notifier.webhooks]]`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the endpoint in metrics (`endpoint` label), logs and dead letters: 1..=64 of
    /// `[A-Za-z0-9_-]`, unique.
    pub id: String,
    /// The tenant whose events this endpoint receives.
    pub tenant: String,
    /// `http://` or `https://`. Redirects are not followed.
    pub url: String,
    /// The signing secret, inline; or
    #[serde(default)]
    pub secret: Option<String>,
    /// the name of the environment variable that holds it (exactly one of the two).
    #[serde(default)]
    pub secret_env: Option<String>,
    /// While rotating: the old secret (or its variable); requests then carry a `v1` for each.
    #[serde(default)]
    pub previous_secret: Option<String>,
    #[serde(default)]
    pub previous_secret_env: Option<String>,
    /// Event type names (`deal_won`, …); every type when absent.
    #[serde(default)]
    pub event_types: Option<Vec<String>>,
    /// Lane names (`critical`, `high`, `standard`); every lane when absent.
    #[serde(default)]
    pub lanes: Option<Vec<String>>,
}

/// Secrets stay out of logs.
impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("WebhookConfig")
            .field("id", &self.id)
            .field("tenant", &self.tenant)
            .field("url", &self.url)
            .field("secret", &redacted(&self.secret))
            .field("secret_env", &self.secret_env)
            .field("previous_secret", &redacted(&self.previous_secret))
            .field("previous_secret_env", &self.previous_secret_env)
            .field("event_types", &self.event_types)
            .field("lanes", &self.lanes)
            .finish()
    }
}

/// A setting that cannot be used; [`field`](Self::field) is its path, e.g.
/// `notifier.webhooks[2].url`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ConfigError {
    field: String,
    problem: String,
}

impl ConfigError {
    pub(crate) fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// The path of the setting at fault.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// What is wrong with it.
    pub fn problem(&self) -> &str {
        &self.problem
    }
}

/// A checked subscription, secrets resolved.
#[derive(Clone)]
pub struct Subscription {
    pub id: Arc<str>,
    pub tenant: String,
    pub url: reqwest::Url,
    /// Current secret first, then the previous one while rotating.
    pub secrets: Vec<String>,
    /// `None`: every type.
    pub event_types: Option<HashSet<EventType>>,
    /// `None`: every lane.
    pub lanes: Option<Vec<Lane>>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .field("tenant", &self.tenant)
            .field("url", &self.url.as_str())
            .field("secrets", &self.secrets.len())
            .field("event_types", &self.event_types)
            .field("lanes", &self.lanes)
            .finish()
    }
}

impl Subscription {
    /// Whether an event of `tenant` and `kind` arriving on `lane` goes to this endpoint.
    pub fn matches(&self, tenant: &str, kind: EventType, lane: Lane) -> bool {
        self.tenant == tenant
            && self.event_types.as_ref().is_none_or(|t| t.contains(&kind))
            && self.lanes.as_ref().is_none_or(|l| l.contains(&lane))
    }
}

fn non_zero(field: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::new(
            format!("notifier.{field}"),
            "must be greater than zero",
        ));
    }
    Ok(())
}

fn at_least_one(field: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::new(
            format!("notifier.{field}"),
            "must be at least 1",
        ));
    }
    Ok(())
}

impl NotifierConfig {
    /// Check every setting and resolve the secrets from the environment.
    pub fn subscriptions(&self) -> Result<Vec<Subscription>, ConfigError> {
        self.subscriptions_with_env(&|name| std::env::var(name).ok())
    }

    /// Like [`subscriptions`](Self::subscriptions), discarding the result.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.subscriptions().map(drop)
    }

    /// The longest an event can keep coming back: every delivery waits at most the longest
    /// retry delay, runs at most a request timeout, and may sit out one ack wait if an ack is
    /// lost. Accepted deliveries are remembered at least this long.
    pub fn redelivery_horizon(&self) -> Duration {
        let longest_delay = self
            .backoff_max
            .max(self.breaker_cool_down)
            .max(self.request_timeout);
        let per_delivery = longest_delay + self.request_timeout + CONSUMER_ACK_WAIT;
        per_delivery.saturating_mul(u32::try_from(self.max_deliveries.max(1)).unwrap_or(u32::MAX))
    }

    pub(crate) fn subscriptions_with_env(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<Subscription>, ConfigError> {
        non_zero("request_timeout", self.request_timeout)?;
        at_least_one("endpoint_concurrency", self.endpoint_concurrency as u64)?;
        at_least_one(
            "breaker_failure_threshold",
            u64::from(self.breaker_failure_threshold),
        )?;
        non_zero("breaker_cool_down", self.breaker_cool_down)?;
        non_zero("backoff_base", self.backoff_base)?;
        non_zero("busy_retry_base", self.busy_retry_base)?;
        if self.backoff_max < self.backoff_base.max(self.busy_retry_base) {
            return Err(ConfigError::new(
                "notifier.backoff_max",
                format!(
                    "must be at least backoff_base and busy_retry_base, got {:?}",
                    self.backoff_max
                ),
            ));
        }
        if !(1..=MAX_MAX_DELIVERIES).contains(&self.max_deliveries) {
            return Err(ConfigError::new(
                "notifier.max_deliveries",
                format!(
                    "must be 1..={MAX_MAX_DELIVERIES}, got {}",
                    self.max_deliveries
                ),
            ));
        }
        at_least_one("concurrency", self.concurrency as u64)?;
        if !(0.0..=1.0).contains(&self.lower_lane_share) {
            return Err(ConfigError::new(
                "notifier.lower_lane_share",
                format!("must be in [0, 1], got {}", self.lower_lane_share),
            ));
        }
        at_least_one("remember_accepted", self.remember_accepted)?;

        let mut ids = HashSet::new();
        let mut subscriptions = Vec::with_capacity(self.webhooks.len());
        for (index, webhook) in self.webhooks.iter().enumerate() {
            let path = format!("notifier.webhooks[{index}]");
            let subscription = webhook.check(&path, env)?;
            if !ids.insert(subscription.id.clone()) {
                return Err(ConfigError::new(
                    format!("{path}.id"),
                    format!("{:?} is used by an earlier webhook", webhook.id),
                ));
            }
            subscriptions.push(subscription);
        }
        Ok(subscriptions)
    }
}

impl WebhookConfig {
    fn check(
        &self,
        path: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Subscription, ConfigError> {
        let field = |name: &str| format!("{path}.{name}");
        if !events::is_subject_token(&self.id) {
            return Err(ConfigError::new(
                field("id"),
                format!("{:?} must be 1..=64 of [A-Za-z0-9_-]", self.id),
            ));
        }
        if !events::is_subject_token(&self.tenant) {
            return Err(ConfigError::new(
                field("tenant"),
                format!(
                    "{:?} is not a tenant id (1..=64 of [A-Za-z0-9_-])",
                    self.tenant
                ),
            ));
        }
        let url = reqwest::Url::parse(&self.url)
            .map_err(|err| ConfigError::new(field("url"), format!("{:?}: {err}", self.url)))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(ConfigError::new(
                field("url"),
                format!(
                    "{:?} must be an http:// or https:// URL with a host",
                    self.url
                ),
            ));
        }
        let mut secrets = vec![
            resolve_secret(
                path,
                ("secret", self.secret.as_deref()),
                ("secret_env", self.secret_env.as_deref()),
                env,
            )?
            .ok_or_else(|| ConfigError::new(field("secret"), "set secret or secret_env"))?,
        ];
        secrets.extend(resolve_secret(
            path,
            ("previous_secret", self.previous_secret.as_deref()),
            ("previous_secret_env", self.previous_secret_env.as_deref()),
            env,
        )?);
        let event_types = match &self.event_types {
            None => None,
            Some(names) => Some(parse_list(
                &field("event_types"),
                names,
                EventType::from_name,
            )?),
        };
        let lanes = match &self.lanes {
            None => None,
            Some(names) => Some(
                parse_list(&field("lanes"), names, Lane::from_name)?
                    .into_iter()
                    .collect(),
            ),
        };
        Ok(Subscription {
            id: Arc::from(self.id.as_str()),
            tenant: self.tenant.clone(),
            url,
            secrets,
            event_types,
            lanes,
        })
    }
}

/// The secret given inline or through an environment variable (not both); `None` when neither.
fn resolve_secret(
    path: &str,
    (inline_key, inline): (&str, Option<&str>),
    (env_key, variable): (&str, Option<&str>),
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>, ConfigError> {
    let secret = match (inline, variable) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                format!("{path}.{inline_key}"),
                format!("set {inline_key} or {env_key}, not both"),
            ));
        }
        (None, None) => return Ok(None),
        (Some(secret), None) => (inline_key, secret.to_owned()),
        (None, Some(variable)) => (
            env_key,
            env(variable).ok_or_else(|| {
                ConfigError::new(
                    format!("{path}.{env_key}"),
                    format!("environment variable {variable} is not set"),
                )
            })?,
        ),
    };
    match secret {
        (key, value) if value.trim().is_empty() => Err(ConfigError::new(
            format!("{path}.{key}"),
            "the secret is empty",
        )),
        (_, value) => Ok(Some(value)),
    }
}

fn parse_list<T: Eq + std::hash::Hash>(
    field: &str,
    names: &[String],
    parse: impl Fn(&str) -> Option<T>,
) -> Result<HashSet<T>, ConfigError> {
    if names.is_empty() {
        return Err(ConfigError::new(
            field,
            "is empty: leave it out to receive all",
        ));
    }
    names
        .iter()
        .enumerate()
        .map(|(index, name)| {
            parse(name).ok_or_else(|| {
                ConfigError::new(
                    format!("{field}[{index}]"),
                    format!("unknown name {name:?}"),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> NotifierConfig {
        toml::from_str(text).expect("parses")
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn error_of(text: &str) -> ConfigError {
        parse(text)
            .subscriptions_with_env(&|name| (name == "HOOK_SECRET").then(|| "s3cret".to_owned()))
            .expect_err("refused")
    }

    const GOOD: &str = r#"
        request_timeout = "5s"
        endpoint_concurrency = 4
        breaker_cool_down = "1m"
        webhooks = [
          { id = "crm-hooks", tenant = "acme", url = "https://hooks.example.com/crm", secret = "whsec_1",
            event_types = ["deal_won", "payment_failed"], lanes = ["critical", "high"] },
          { id = "audit", tenant = "globex", url = "http://127.0.0.1:9000/in", secret_env = "HOOK_SECRET",
            previous_secret = "old" },
        ]
    "#;

    #[test]
    fn a_good_config_parses_and_resolves() {
        let config = parse(GOOD);
        assert_eq!(config.request_timeout, Duration::from_secs(5));
        assert_eq!(config.breaker_cool_down, Duration::from_secs(60));
        assert_eq!(config.backoff_max, Duration::from_secs(300), "default");
        let subs = config
            .subscriptions_with_env(&|name| (name == "HOOK_SECRET").then(|| "env-secret".into()))
            .expect("valid");
        assert_eq!(subs.len(), 2);
        assert_eq!(&*subs[0].id, "crm-hooks");
        assert_eq!(subs[0].secrets, ["whsec_1"]);
        assert_eq!(subs[1].secrets, ["env-secret", "old"]);
        assert!(subs[0].matches("acme", EventType::DealWon, Lane::High));
        assert!(!subs[0].matches("acme", EventType::DealWon, Lane::Standard));
        assert!(!subs[0].matches("acme", EventType::PageViewed, Lane::Critical));
        assert!(!subs[0].matches("globex", EventType::DealWon, Lane::High));
        assert!(subs[1].matches("globex", EventType::PageViewed, Lane::Standard));
        // Secrets never reach logs.
        let debug = format!("{config:?} {subs:?}");
        assert!(
            !debug.contains("whsec_1") && !debug.contains("env-secret"),
            "{debug}"
        );
    }

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let config = NotifierConfig::default();
        assert!(
            config
                .subscriptions_with_env(&no_env)
                .expect("valid")
                .is_empty()
        );
        assert_eq!(config.request_timeout, Duration::from_secs(10));
        assert_eq!(config.endpoint_concurrency, 8);
        assert_eq!(config.breaker_failure_threshold, 5);
        assert_eq!(config.breaker_cool_down, Duration::from_secs(30));
        assert_eq!(config.backoff_base, Duration::from_secs(1));
        assert_eq!(config.backoff_max, Duration::from_secs(300));
        assert_eq!(config.max_deliveries, 10);
        // 10 deliveries × (5 min + 10 s + 30 s).
        assert_eq!(config.redelivery_horizon(), Duration::from_secs(10 * 340));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<NotifierConfig>("request_timeout_ms = 5").expect_err("unknown");
        assert!(err.to_string().contains("request_timeout_ms"), "{err}");
        let err = toml::from_str::<NotifierConfig>(
            r#"webhooks = [{ id = "a", tenant = "t", url = "http://x", secret = "s", tenant_id = "t" }]"#,
        )
        .expect_err("unknown");
        assert!(err.to_string().contains("tenant_id"), "{err}");
        let err = toml::from_str::<NotifierConfig>(r#"request_timeout = "10""#).expect_err("unit");
        assert!(err.to_string().contains("expected a duration"), "{err}");
    }

    fn hooks(entries: &[&str]) -> String {
        let mut text = String::from("webhooks = [\n");
        for entry in entries {
            text.push_str(&format!("  {{ {entry} }},\n"));
        }
        text + "]\n"
    }

    const OK: &str = r#"id = "ok", tenant = "acme", url = "https://a.example", secret = "s""#;

    #[test]
    fn webhook_errors_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            (
                r#"id = "a.b", tenant = "acme", url = "https://x", secret = "s""#,
                "notifier.webhooks[2].id",
                "A-Za-z0-9",
            ),
            (
                r#"id = "ok", tenant = "acme", url = "https://x", secret = "s""#,
                "notifier.webhooks[2].id",
                "earlier webhook",
            ),
            (
                r#"id = "c", tenant = "ac me", url = "https://x", secret = "s""#,
                "notifier.webhooks[2].tenant",
                "tenant id",
            ),
            (
                r#"id = "c", tenant = "acme", url = "ftp://x/y", secret = "s""#,
                "notifier.webhooks[2].url",
                "http",
            ),
            (
                r#"id = "c", tenant = "acme", url = "not a url", secret = "s""#,
                "notifier.webhooks[2].url",
                "not a url",
            ),
            (
                r#"id = "c", tenant = "acme", url = "https://x""#,
                "notifier.webhooks[2].secret",
                "secret_env",
            ),
            (
                r#"id = "c", tenant = "acme", url = "https://x", secret = " ""#,
                "notifier.webhooks[2].secret",
                "empty",
            ),
            (
                r#"id = "c", tenant = "acme", url = "https://x", secret = "s", secret_env = "HOOK_SECRET""#,
                "notifier.webhooks[2].secret",
                "not both",
            ),
            (
                r#"id = "c", tenant = "acme", url = "https://x", secret_env = "NOPE""#,
                "notifier.webhooks[2].secret_env",
                "NOPE is not set",
            ),
            (
                r#"id = "c", tenant = "acme", url = "https://x", secret = "s", previous_secret_env = "NOPE""#,
                "notifier.webhooks[2].previous_secret_env",
                "NOPE",
            ),
            (
                r#"id = "c", tenant = "acme", url = "https://x", secret = "s", event_types = ["deal_won", "deal_wonn"]"#,
                "notifier.webhooks[2].event_types[1]",
                "deal_wonn",
            ),
            (
                r#"id = "c", tenant = "acme", url = "https://x", secret = "s", event_types = []"#,
                "notifier.webhooks[2].event_types",
                "empty",
            ),
            (
                r#"id = "c", tenant = "acme", url = "https://x", secret = "s", lanes = ["urgent"]"#,
                "notifier.webhooks[2].lanes[0]",
                "urgent",
            ),
        ];
        for (entry, field, problem) in cases {
            let other = OK.replace("\"ok\"", "\"other\"");
            let err = error_of(&hooks(&[OK, &other, entry]));
            assert_eq!(err.field(), *field, "{entry}: {err}");
            assert!(err.problem().contains(problem), "{entry}: {err}");
            assert!(err.to_string().starts_with(&format!("{field}: ")), "{err}");
        }
        // The environment variable is used when it is set.
        let from_env = parse(&hooks(&[
            r#"id = "c", tenant = "acme", url = "https://x", secret_env = "HOOK_SECRET""#,
        ]))
        .subscriptions_with_env(&|name| (name == "HOOK_SECRET").then(|| "s3cret".to_owned()))
        .expect("valid");
        assert_eq!(from_env[0].secrets, ["s3cret"]);
    }

    #[test]
    fn parameter_errors_name_the_field() {
        let cases = [
            ("request_timeout = \"0s\"", "notifier.request_timeout"),
            ("endpoint_concurrency = 0", "notifier.endpoint_concurrency"),
            (
                "breaker_failure_threshold = 0",
                "notifier.breaker_failure_threshold",
            ),
            ("breaker_cool_down = \"0s\"", "notifier.breaker_cool_down"),
            ("backoff_base = \"0s\"", "notifier.backoff_base"),
            ("backoff_base = \"10m\"", "notifier.backoff_max"),
            ("max_deliveries = 101", "notifier.max_deliveries"),
            ("max_deliveries = 0", "notifier.max_deliveries"),
            ("concurrency = 0", "notifier.concurrency"),
            ("lower_lane_share = 1.5", "notifier.lower_lane_share"),
            ("remember_accepted = 0", "notifier.remember_accepted"),
        ];
        for (text, field) in cases {
            let err = error_of(text);
            assert_eq!(err.field(), field, "{text}: {err}");
        }
    }
}
