//! `[gateway]` configuration and API keys (stored only as SHA-256 digests).

use crate::GatewayError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::{net::SocketAddr, sync::Arc, time::Duration};

pub const DEFAULT_MAX_INFLIGHT: usize = 4096;
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

/// The gateway's settings; every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address to listen on (default `0.0.0.0:8080`): every route, every class.
    pub listen: SocketAddr,
    /// The priority door: a second listener for critical and high events only (`POST
    /// /v1/events` and `/v1/events:batch`; a bulk event there is answered 421), served by a
    /// thread of its own with its own NATS connection, so its requests never wait behind bulk
    /// requests for the main door's thread. `None` (the default): no second listener.
    pub priority_listen: Option<SocketAddr>,
    pub api_keys: Vec<ApiKey>,
    /// Bulk requests (and reads) handled at once; more are shed with 503. Critical and high
    /// events have budgets of their own (`[gateway.admission]`).
    pub max_inflight: usize,
    /// How long a publish may wait for JetStream's ack, shared by its two attempts, e.g. `"2s"`;
    /// past it the caller gets 503 with `Retry-After`.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Largest accepted request body, for single events and batches alike.
    pub max_body_bytes: usize,
    /// Admission by class: the critical and high budgets, the bulk controller's targets.
    pub admission: crate::AdmissionConfig,
    /// HTTPS on both doors: the server certificate chain and its private key (PEM). Both or
    /// neither; without them the gateway speaks plain HTTP (behind a TLS-terminating proxy).
    pub tls_cert_file: Option<std::path::PathBuf>,
    pub tls_key_file: Option<std::path::PathBuf>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            priority_listen: None,
            api_keys: Vec::new(),
            max_inflight: DEFAULT_MAX_INFLIGHT,
            publish_timeout: DEFAULT_PUBLISH_TIMEOUT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            admission: crate::AdmissionConfig::default(),
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// One accepted API key: the lowercase hex SHA-256 of the key (see [`hash_key`]) and the tenant
/// it may write for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    pub sha256: String,
    pub tenant: String,
}

/// The lowercase hex SHA-256 of `key`, as [`ApiKey::sha256`] stores it.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

type Digest32 = [u8; 32];

/// The configured keys, decoded once.
#[derive(Clone)]
pub(crate) struct KeyRing {
    keys: Vec<(Digest32, Arc<str>)>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl KeyRing {
    pub(crate) fn new(keys: &[ApiKey]) -> Result<Self, GatewayError> {
        let mut ring: Vec<(Digest32, Arc<str>)> = Vec::with_capacity(keys.len());
        for (index, key) in keys.iter().enumerate() {
            let invalid = |reason: String| GatewayError::InvalidApiKey { index, reason };
            let is_lower_hex = key
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            let digest = hex::decode(&key.sha256)
                .ok()
                .and_then(|bytes| Digest32::try_from(bytes).ok())
                .filter(|_| is_lower_hex)
                .ok_or_else(|| {
                    invalid("sha256 must be 64 lowercase hex digits (see `hash_key`)".into())
                })?;
            if !events::is_subject_token(&key.tenant) {
                return Err(invalid(format!(
                    "tenant {:?} must be 1 to 64 of [A-Za-z0-9_-]",
                    key.tenant
                )));
            }
            if ring.iter().any(|(known, _)| *known == digest) {
                return Err(invalid("the same key is listed twice".into()));
            }
            ring.push((digest, key.tenant.as_str().into()));
        }
        Ok(Self { keys: ring })
    }

    /// The tenant `key` belongs to. Every entry is compared, without an early exit, and only
    /// digests are compared, so timing says nothing useful about the configured keys.
    pub(crate) fn tenant_for(&self, key: &str) -> Option<Arc<str>> {
        let digest: Digest32 = Sha256::digest(key.as_bytes()).into();
        let mut found = None;
        for (known, tenant) in &self.keys {
            let diff = known
                .iter()
                .zip(&digest)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(Arc::clone(tenant));
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sha256: &str, tenant: &str) -> ApiKey {
        ApiKey {
            sha256: sha256.into(),
            tenant: tenant.into(),
        }
    }

    #[test]
    fn hashes_are_lowercase_hex_sha256() {
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn keys_map_to_their_tenant() {
        let ring = KeyRing::new(&[key(&hash_key("k1"), "acme"), key(&hash_key("k2"), "globex")])
            .expect("valid");
        assert_eq!(ring.tenant_for("k1").as_deref(), Some("acme"));
        assert_eq!(ring.tenant_for("k2").as_deref(), Some("globex"));
        assert_eq!(ring.tenant_for("k3"), None);
        assert_eq!(ring.tenant_for(""), None);
    }

    #[test]
    fn bad_keys_are_refused_with_their_index() {
        let good = key(&hash_key("k1"), "acme");
        let cases = [
            key("abc", "acme"),
            key(&hash_key("k").to_uppercase(), "acme"),
            key(&hash_key("k"), "bad tenant"),
            good.clone(),
        ];
        for (i, bad) in cases.into_iter().enumerate() {
            let err = KeyRing::new(&[good.clone(), bad]).expect_err("refused");
            assert!(
                matches!(err, GatewayError::InvalidApiKey { index: 1, .. }),
                "case {i}: {err}"
            );
        }
    }

    #[test]
    fn config_reads_humantime_and_refuses_unknown_fields() {
        let config: GatewayConfig = serde_json::from_value(serde_json::json!({
            "listen": "127.0.0.1:0",
            "publish_timeout": "500ms",
            "api_keys": [{"sha256": hash_key("k"), "tenant": "acme"}],
        }))
        .expect("parses");
        assert_eq!(config.publish_timeout, Duration::from_millis(500));
        assert_eq!(config.max_inflight, DEFAULT_MAX_INFLIGHT);
        assert_eq!(config.max_body_bytes, 1 << 20);
        let err = serde_json::from_value::<GatewayConfig>(serde_json::json!({"max_infligt": 1}))
            .expect_err("typo refused");
        assert!(err.to_string().contains("max_infligt"), "{err}");
    }
}
