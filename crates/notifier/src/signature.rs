//! Webhook signatures, Stripe style: `Crm-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>` where
//! the MAC is over `"<t>.<body>"` keyed with the subscription's secret. The timestamp is signed
//! too, so a captured request cannot be replayed outside the receiver's tolerance window. During a
//! secret rotation the header carries one `v1` per secret and a receiver accepts any of them.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::Duration;

type HmacSha256 = Hmac<Sha256>;

/// Why a signature header does not prove that the body came from the holder of the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("signature header has no t=<unix seconds>")]
    MissingTimestamp,
    #[error("signature header has no v1=<hex> entry")]
    MissingSignature,
    #[error("signature header part {0:?} is not a key=value pair")]
    Malformed(String),
    #[error("signature timestamp {0:?} is not a number of seconds")]
    BadTimestamp(String),
    #[error(
        "signature timestamp {timestamp} is more than {tolerance_secs} s away from now ({now})"
    )]
    OutsideTolerance {
        timestamp: u64,
        now: u64,
        tolerance_secs: u64,
    },
    #[error("no v1 signature matches the body")]
    Mismatch,
}

fn mac(secret: &str, timestamp: u64, body: &[u8]) -> HmacSha256 {
    let mut mac =
        HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `v1` value: lowercase hex HMAC-SHA256 of `"<timestamp>.<body>"` keyed with `secret`.
fn v1(secret: &str, timestamp: u64, body: &[u8]) -> String {
    hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
}

/// The `Crm-Signature` header value for `body` sent at `timestamp` (Unix seconds):
/// `t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub fn sign(secret: &str, timestamp: u64, body: &[u8]) -> String {
    sign_with_all([secret], timestamp, body)
}

/// Like [`sign`], with one `v1` entry per secret (current first), for a secret rotation.
pub fn sign_with_all<'a>(
    secrets: impl IntoIterator<Item = &'a str>,
    timestamp: u64,
    body: &[u8],
) -> String {
    let mut header = format!("t={timestamp}");
    for secret in secrets {
        header.push_str(",v1=");
        header.push_str(&v1(secret, timestamp, body));
    }
    header
}

/// Check a `Crm-Signature` header against `body` as a receiver would: the timestamp must be within
/// `tolerance` of `now` (Unix seconds, either direction) and at least one `v1` entry must be the
/// HMAC of `"<t>.<body>"` under `secret` (compared in constant time). Unknown keys (future schemes)
/// are ignored; `v1` entries that are not hex simply do not match.
pub fn verify(
    secret: &str,
    header: &str,
    body: &[u8],
    now: u64,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    let mut timestamp = None;
    let mut candidates = Vec::new();
    for part in header.split(',').map(str::trim) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| SignatureError::Malformed(part.to_owned()))?;
        match key {
            "t" => {
                let parsed = value
                    .parse::<u64>()
                    .map_err(|_| SignatureError::BadTimestamp(value.to_owned()))?;
                timestamp = Some(parsed);
            }
            "v1" => candidates.push(value),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::MissingTimestamp)?;
    if candidates.is_empty() {
        return Err(SignatureError::MissingSignature);
    }
    if timestamp.abs_diff(now) > tolerance.as_secs() {
        return Err(SignatureError::OutsideTolerance {
            timestamp,
            now,
            tolerance_secs: tolerance.as_secs(),
        });
    }
    let expected = mac(secret, timestamp, body);
    let matches = candidates.iter().any(|candidate| {
        hex::decode(candidate).is_ok_and(|bytes| expected.clone().verify_slice(&bytes).is_ok())
    });
    if matches {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOLERANCE: Duration = Duration::from_secs(300);
    const T: u64 = 1_700_000_000;
    const BODY: &[u8] = br#"{"eventId":"01a205d0-f719-75c3-bf3d-2b529b52aaba"}"#;

    #[test]
    fn a_signed_body_verifies() {
        let header = sign("whsec", T, BODY);
        assert!(header.starts_with(&format!("t={T},v1=")), "{header}");
        assert_eq!(header.len(), format!("t={T},v1=").len() + 64);
        assert_eq!(verify("whsec", &header, BODY, T, TOLERANCE), Ok(()));
        assert_eq!(verify("whsec", &header, BODY, T + 299, TOLERANCE), Ok(()));
        assert_eq!(verify("whsec", &header, BODY, T - 299, TOLERANCE), Ok(()));
    }

    #[test]
    fn matches_the_documented_scheme_computed_by_openssl() {
        // { printf '1700000000.'; printf '{"eventId":"e1"}'; } | openssl dgst -sha256 -hmac whsec_test
        assert_eq!(
            sign("whsec_test", 1_700_000_000, br#"{"eventId":"e1"}"#),
            "t=1700000000,v1=ead19a02fbe0bb6d0c7f3d25cef8280176aefaac9755cd99505dad3b267a6de9"
        );
    }

    #[test]
    fn tampering_is_rejected() {
        let header = sign("whsec", T, BODY);
        let mut tampered = BODY.to_vec();
        tampered[3] ^= 1;
        assert_eq!(
            verify("whsec", &header, &tampered, T, TOLERANCE),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify("other", &header, BODY, T, TOLERANCE),
            Err(SignatureError::Mismatch)
        );
        // A re-dated header with the old MAC: the timestamp is part of what is signed.
        let redated = header.replace(&format!("t={T}"), &format!("t={}", T + 1));
        assert_eq!(
            verify("whsec", &redated, BODY, T, TOLERANCE),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn stale_and_future_timestamps_are_rejected() {
        let header = sign("whsec", T, BODY);
        assert!(matches!(
            verify("whsec", &header, BODY, T + 301, TOLERANCE),
            Err(SignatureError::OutsideTolerance { .. })
        ));
        assert!(matches!(
            verify("whsec", &header, BODY, T - 301, TOLERANCE),
            Err(SignatureError::OutsideTolerance { .. })
        ));
    }

    #[test]
    fn garbled_headers_are_rejected() {
        let good = v1("whsec", T, BODY);
        let cases = [
            ("", SignatureError::Malformed(String::new())),
            (
                &format!("v1={good}") as &str,
                SignatureError::MissingTimestamp,
            ),
            (&format!("t={T}"), SignatureError::MissingSignature),
            (
                &format!("t=soon,v1={good}"),
                SignatureError::BadTimestamp("soon".into()),
            ),
            (
                &format!("t={T},{good}"),
                SignatureError::Malformed(good.clone()),
            ),
            (
                &format!("t={T},v1=zz{}", &good[2..]),
                SignatureError::Mismatch,
            ),
            (
                &format!("t={T},v1={}", &good[..63]),
                SignatureError::Mismatch,
            ),
            (&format!("t={T},v1="), SignatureError::Mismatch),
            (
                &format!("t={T},v0={good}"),
                SignatureError::MissingSignature,
            ),
        ];
        for (header, expected) in cases {
            assert_eq!(
                verify("whsec", header, BODY, T, TOLERANCE),
                Err(expected),
                "{header:?}"
            );
        }
    }

    #[test]
    fn any_v1_entry_may_match_during_a_rotation() {
        let header = sign_with_all(["new", "old"], T, BODY);
        assert_eq!(header.matches("v1=").count(), 2);
        assert_eq!(verify("new", &header, BODY, T, TOLERANCE), Ok(()));
        assert_eq!(verify("old", &header, BODY, T, TOLERANCE), Ok(()));
        assert_eq!(
            verify("other", &header, BODY, T, TOLERANCE),
            Err(SignatureError::Mismatch)
        );
        // Spaces after commas and unknown schemes are tolerated.
        let spaced = format!("t={T}, v9=abc, v1={}", v1("old", T, BODY));
        assert_eq!(verify("old", &spaced, BODY, T, TOLERANCE), Ok(()));
    }
}
