//! `crm nkeys`: one NKey per identity of `nats/secure/accounts.conf`. Each role keeps its seed
//! (`[nats] nkey_file`); the server's environment gets the public keys (`CRM_NKEY_<IDENTITY>`).

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// An identity of `nats/secure/accounts.conf`: who connects, and where its replies come to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// `router`: the seed file is `router.nk`, the server variable `CRM_NKEY_ROUTER`.
    pub name: &'static str,
    /// `[nats] inbox_prefix` for it: the only reply subjects its permissions let it read.
    pub inbox_prefix: &'static str,
}

impl Identity {
    /// The server config's variable for its public key.
    pub fn variable(&self) -> String {
        format!("CRM_NKEY_{}", self.name.to_ascii_uppercase())
    }

    pub fn seed_file(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.nk", self.name))
    }
}

const fn identity(name: &'static str, inbox_prefix: &'static str) -> Identity {
    Identity { name, inbox_prefix }
}

/// Every identity the secure server config lists.
pub const IDENTITIES: [Identity; 8] = [
    identity("gateway", "_INBOX_gateway"),
    identity("router", "_INBOX_router"),
    identity("projector", "_INBOX_projector"),
    identity("notifier", "_INBOX_notifier"),
    identity("analytics", "_INBOX_analytics"),
    identity("operator", "_INBOX"),
    identity("lane_reader", "_INBOX_reader"),
    identity("producer", "_INBOX_producer"),
];

/// The identity called `name`.
pub fn identity_named(name: &str) -> Option<Identity> {
    IDENTITIES.into_iter().find(|i| i.name == name)
}

/// The server's environment file `crm nkeys` writes beside the seeds.
pub const ENV_FILE: &str = "nkeys.env";

/// Make a key pair per identity in `dir` (created if missing): `<name>.nk` holds the seed
/// (readable by its owner only), [`ENV_FILE`] the public keys as `CRM_NKEY_<NAME>=U…` lines for
/// the server. Refuses to replace existing files: a new key locks the old holder out.
/// Returns `(variable, public key)` per identity.
pub fn generate(dir: &Path) -> Result<Vec<(String, String)>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let env_file = dir.join(ENV_FILE);
    let mut existing: Vec<PathBuf> = IDENTITIES.iter().map(|i| i.seed_file(dir)).collect();
    existing.push(env_file.clone());
    existing.retain(|path| path.exists());
    if !existing.is_empty() {
        bail!(
            "{} already exist: remove them to make new keys (every role holding an old seed is \
             then refused until it gets its new one)",
            existing
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut publics = Vec::with_capacity(IDENTITIES.len());
    for identity in IDENTITIES {
        let pair = ::nkeys::KeyPair::new_user();
        let seed = pair.seed().context("encoding an NKey seed")?;
        write_private(
            &identity.seed_file(dir),
            &format!(
                "# crm-events NKey seed of `{}` ([nats] nkey_file; inbox_prefix = \"{}\")\n{seed}\n",
                identity.name, identity.inbox_prefix
            ),
        )?;
        publics.push((identity.variable(), pair.public_key()));
    }
    let env: String = publics.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    std::fs::write(&env_file, env).with_context(|| format!("writing {}", env_file.display()))?;
    Ok(publics)
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_has_a_private_seed_per_identity_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().expect("temp dir");
        let publics = generate(dir.path()).expect("generate");
        assert_eq!(publics.len(), IDENTITIES.len());
        let env = std::fs::read_to_string(dir.path().join(ENV_FILE)).expect("env file");
        for (identity, (variable, public)) in IDENTITIES.iter().zip(&publics) {
            assert!(public.starts_with('U'), "{public}");
            assert!(env.contains(&format!("{variable}={public}\n")));
            let seed_file = identity.seed_file(dir.path());
            let text = std::fs::read_to_string(&seed_file).expect("seed file");
            let seed = text.lines().last().expect("a seed line");
            let pair = ::nkeys::KeyPair::from_seed(seed).expect("a valid seed");
            assert_eq!(&pair.public_key(), public);
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                let mode = std::fs::metadata(&seed_file)
                    .expect("meta")
                    .permissions()
                    .mode();
                assert_eq!(
                    mode & 0o077,
                    0,
                    "{} is readable by others",
                    seed_file.display()
                );
            }
        }
        let again = generate(dir.path()).expect_err("existing keys are kept");
        assert!(again.to_string().contains("already exist"), "{again}");
    }

    #[test]
    fn the_secure_config_lists_every_identity() {
        let accounts = include_str!("../../../nats/secure/accounts.conf");
        for identity in IDENTITIES {
            assert!(
                accounts.contains(&format!("nkey: ${},", identity.variable())),
                "{} is not in nats/secure/accounts.conf",
                identity.variable()
            );
        }
    }
}
