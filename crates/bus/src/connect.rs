use crate::{BusError, BusErrorKind};
use async_nats::jetstream;
use std::{fmt, path::PathBuf, time::Duration};

/// The oldest nats-server we run against: consumer pause and priority groups (2.11) and the
/// 2.12 fixes for the durability faults Jepsen found.
pub const MIN_SERVER_VERSION: ServerVersion = ServerVersion {
    major: 2,
    minor: 12,
    patch: 0,
};

/// A nats-server version, `major.minor.patch` (pre-release suffixes ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl ServerVersion {
    pub fn parse(text: &str) -> Option<Self> {
        let core = text.trim().trim_start_matches('v');
        let core = core.split(['-', '+']).next()?;
        let mut parts = core.split('.').map(str::parse::<u32>);
        let version = Self {
            major: parts.next()?.ok()?,
            minor: parts.next()?.ok()?,
            patch: parts.next().unwrap_or(Ok(0)).ok()?,
        };
        parts.next().is_none().then_some(version)
    }
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// How to reach NATS.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// One or more comma-separated server URLs.
    pub url: String,
    /// Client name shown in the server's connection list.
    pub name: String,
    /// A `.creds` file (JWT + NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// A file holding an NKey user seed (`SU…`): the role's identity on a server that lists its
    /// public key (`nats/secure/accounts.conf`; `crm nkeys` makes a set).
    pub nkey_file: Option<PathBuf>,
    /// Where replies come to (`_INBOX` by default): a role's own prefix (`_INBOX_router`) lets the
    /// server's permissions keep every other reply, pull deliveries included, away from it.
    pub inbox_prefix: Option<String>,
    /// CA certificate(s) to trust for TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub tls_client_cert: Option<(PathBuf, PathBuf)>,
    pub require_tls: bool,
    /// How long to wait for the first connection.
    pub connect_timeout: Duration,
    /// How long to wait for any JetStream API answer or publish ack.
    pub request_timeout: Duration,
}

impl ConnectOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            name: "crm".into(),
            credentials_file: None,
            nkey_file: None,
            inbox_prefix: None,
            tls_ca_file: None,
            tls_client_cert: None,
            require_tls: false,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        }
    }

    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

/// A connection to NATS with its JetStream context. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Bus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    request_timeout: Duration,
    /// What this connection was made with, for [`Bus::connect_another`]; `None` for a bus made
    /// from an existing client.
    options: Option<std::sync::Arc<ConnectOptions>>,
    /// The consumer loops of this process (shared with every `connect_another`).
    liveness: crate::Liveness,
}

impl Bus {
    /// Connect, then check that the server is new enough and has JetStream, failing with a
    /// message that says what is missing. Reconnects forever after the first connection.
    pub async fn connect(options: &ConnectOptions) -> Result<Self, BusError> {
        let mut nats = async_nats::ConnectOptions::new()
            .name(&options.name)
            .connection_timeout(options.connect_timeout)
            .request_timeout(Some(options.request_timeout))
            .require_tls(options.require_tls)
            .max_reconnects(None)
            .event_callback(|event| async move { log_event(&event) });
        if let Some(prefix) = &options.inbox_prefix {
            nats = nats.custom_inbox_prefix(prefix);
        }
        if let Some(path) = &options.nkey_file {
            nats = nats.nkey(read_nkey_seed(path)?);
        }
        if let Some(path) = &options.credentials_file {
            nats = nats.credentials_file(path).await.map_err(|err| {
                BusError::with_source(
                    BusErrorKind::Connect,
                    format!("reading NATS credentials {}", path.display()),
                    err,
                )
            })?;
        }
        if let Some(ca) = &options.tls_ca_file {
            nats = nats.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &options.tls_client_cert {
            nats = nats.add_client_certificate(cert.clone(), key.clone());
        }
        let servers = server_addrs(&options.url)?;
        let client = nats.connect(servers).await.map_err(|err| {
            BusError::with_source(
                BusErrorKind::Connect,
                format!("connecting to NATS at {}", options.url),
                err,
            )
        })?;
        let mut bus = Self::from_client(client, options.request_timeout);
        bus.check_server(&options.url).await?;
        bus.options = Some(std::sync::Arc::new(options.clone()));
        Ok(bus)
    }

    /// A second connection to the same servers with the same credentials, named
    /// `<name>-<purpose>`: its own socket, read loop and write buffer, so what it carries never
    /// queues behind this connection's traffic (the priority path's publishes and fetches).
    /// A bus made from an existing client has nothing to reconnect with and returns a clone.
    pub async fn connect_another(&self, purpose: &str) -> Result<Self, BusError> {
        match &self.options {
            Some(options) => {
                let options = ConnectOptions {
                    name: format!("{}-{purpose}", options.name),
                    ..ConnectOptions::clone(options)
                };
                let mut another = Self::connect(&options).await?;
                another.liveness = self.liveness.clone();
                Ok(another)
            }
            None => Ok(self.clone()),
        }
    }

    fn from_client(client: async_nats::Client, request_timeout: Duration) -> Self {
        let mut jetstream = jetstream::new(client.clone());
        jetstream.set_timeout(request_timeout);
        Self {
            client,
            jetstream,
            request_timeout,
            options: None,
            liveness: crate::Liveness::default(),
        }
    }

    async fn check_server(&self, url: &str) -> Result<(), BusError> {
        let info = self.client.server_info();
        let version = ServerVersion::parse(&info.version).ok_or_else(|| {
            BusError::new(
                BusErrorKind::Unsupported,
                format!(
                    "NATS at {url} reports an unreadable version {:?}",
                    info.version
                ),
            )
        })?;
        if version < MIN_SERVER_VERSION {
            return Err(BusError::new(
                BusErrorKind::Unsupported,
                format!(
                    "nats-server at {url} is {version}; crm-events needs {MIN_SERVER_VERSION} or newer \
                     with JetStream (run `make tools` and `make nats` for a pinned dev server)"
                ),
            ));
        }
        if !info.jetstream {
            return Err(no_jetstream(url, version));
        }
        self.jetstream.query_account().await.map_err(|err| {
            BusError::with_source(
                BusErrorKind::Unsupported,
                no_jetstream(url, version).to_string(),
                err,
            )
        })?;
        Ok(())
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The process's consumer loops, for `/healthz` ([`crate::liveness`]).
    pub fn liveness(&self) -> &crate::Liveness {
        &self.liveness
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    pub fn server_version(&self) -> Option<ServerVersion> {
        ServerVersion::parse(&self.client.server_info().version)
    }

    /// Whether the connection is up right now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

/// The servers of a comma-separated URL list (`nats://n1:4222,nats://n2:4222`): the client
/// connects to one and moves to another when it goes.
fn server_addrs(urls: &str) -> Result<Vec<async_nats::ServerAddr>, BusError> {
    let servers = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse::<async_nats::ServerAddr>().map_err(|err| {
                BusError::with_source(
                    BusErrorKind::Connect,
                    format!("NATS server URL {url:?} in {urls:?}"),
                    err,
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if servers.is_empty() {
        return Err(BusError::new(
            BusErrorKind::Connect,
            format!("no NATS server URL in {urls:?}"),
        ));
    }
    Ok(servers)
}

/// The seed in an NKey seed file: its first non-empty line that is not a comment.
pub fn read_nkey_seed(path: &std::path::Path) -> Result<String, BusError> {
    let unreadable = |detail: String| {
        BusError::new(
            BusErrorKind::Connect,
            format!("NKey seed file {}: {detail}", path.display()),
        )
    };
    let text = std::fs::read_to_string(path).map_err(|err| unreadable(err.to_string()))?;
    let seed = text
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'))
        .ok_or_else(|| unreadable("no seed in it".into()))?;
    if !seed.starts_with("SU") {
        return Err(unreadable(
            "not a user seed (one starts with SU; `crm nkeys` makes them)".into(),
        ));
    }
    Ok(seed.to_owned())
}

/// What the connection reports, logged; a permission the server refused is also counted
/// (`crm_nats_permission_denied_total`): a role whose permissions lack something it does shows
/// it there, not only as a request that timed out.
fn log_event(event: &async_nats::Event) {
    use async_nats::{Event, ServerError};
    match event {
        Event::ServerError(ServerError::Other(text)) => {
            let lower = text.to_ascii_lowercase();
            if lower.contains("permissions violation") {
                let operation = if lower.contains("for subscription") {
                    "subscribe"
                } else {
                    "publish"
                };
                metrics::counter!(PERMISSION_DENIED_TOTAL, "operation" => operation).increment(1);
                tracing::error!(error = %text, "NATS refused this connection a permission");
            } else {
                tracing::warn!(error = %text, "NATS server error");
            }
        }
        Event::ServerError(ServerError::AuthorizationViolation) => {
            tracing::error!("NATS refused this connection's credentials (authorization violation)");
        }
        Event::Connected => tracing::info!("NATS connection up"),
        Event::Disconnected => tracing::warn!("NATS connection lost; reconnecting"),
        other => tracing::warn!(event = %other, "NATS connection event"),
    }
}

const PERMISSION_DENIED_TOTAL: &str = "crm_nats_permission_denied_total";

fn no_jetstream(url: &str, version: ServerVersion) -> BusError {
    BusError::new(
        BusErrorKind::Unsupported,
        format!(
            "nats-server {version} at {url} has JetStream disabled; crm-events needs JetStream \
             (start the server with -js or a jetstream {{}} block, as nats/dev.conf does)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_list_is_every_server_of_it() {
        let servers = server_addrs("nats://127.0.0.1:4222, nats://10.0.0.2:4223,").expect("list");
        let ports: Vec<u16> = servers.iter().map(|s| s.port()).collect();
        assert_eq!(ports, [4222, 4223]);
        assert!(server_addrs(" , ").is_err());
        let bad = server_addrs("nats://127.0.0.1:4222,nats://:x").expect_err("a bad URL");
        assert!(bad.to_string().contains("nats://:x"), "{bad}");
    }

    #[test]
    fn parses_versions() {
        let v = |s| ServerVersion::parse(s);
        assert_eq!(
            v("2.12.8"),
            Some(ServerVersion {
                major: 2,
                minor: 12,
                patch: 8
            })
        );
        assert_eq!(
            v("v2.11.0-RC.3"),
            Some(ServerVersion {
                major: 2,
                minor: 11,
                patch: 0
            })
        );
        assert_eq!(
            v("2.10"),
            Some(ServerVersion {
                major: 2,
                minor: 10,
                patch: 0
            })
        );
        assert_eq!(v("two"), None);
        assert_eq!(v("2.1.2.3"), None);
        assert!(v("2.9.25") < Some(MIN_SERVER_VERSION));
        assert!(v("2.12.0") >= Some(MIN_SERVER_VERSION));
        assert!(v("3.0.0") > Some(MIN_SERVER_VERSION));
    }
}
