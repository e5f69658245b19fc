//! Test helpers: a real nats-server per test on a free port with a temp store, and temporary
//! SQLite files and PostgreSQL databases. Tests stay hermetic and parallel-safe.

mod proxy;

pub use proxy::TcpProxy;

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Every server gets this config: dead letters carry an event of up to 1 MiB plus headers, as in
/// `nats/dev.conf`.
const BASE_CONF: &str = "max_payload: 2MB\n";

/// JetStream limits for a test server. The platform's streams reserve their `max_bytes`
/// (5.5 GiB in all) against the server's store limit; left unset, that limit is 75 % of the free
/// disk, so a machine with a few GiB free would refuse to create them. An explicit limit is
/// accepted whatever the disk holds (tests write megabytes, not gigabytes).
const JETSTREAM_CONF: &str = "jetstream {\n  max_file_store: 64GB\n  max_memory_store: 1GB\n}\n";

/// The test servers' `jetstream {}` block with `settings` (e.g. `sync_interval: always`) added:
/// for a config of one's own that keeps the store limits.
pub fn jetstream_conf(settings: &str) -> String {
    JETSTREAM_CONF.replace("\n}\n", &format!("\n  {settings}\n}}\n"))
}

/// Where the pinned nats-server lives: `$CRM_NATS_SERVER`, else `<workspace>/.tools/bin/nats-server`.
/// Panics when it is missing.
pub fn nats_server_binary() -> PathBuf {
    let path = std::env::var_os("CRM_NATS_SERVER").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/bin/nats-server"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "nats-server not found at {} — run `make tools` (or set CRM_NATS_SERVER)",
        path.display()
    );
    path
}

/// A nats-server with its own temp store, killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
    jetstream: bool,
    /// The server's environment beyond ours (values for `$VAR` references in its config).
    env: Vec<(String, String)>,
}

/// What a server starts with beyond the defaults (see [`NatsServer::start_with`]).
#[derive(Debug, Clone, Default)]
pub struct ServerSetup {
    /// Appended to the server's config file (which may `include` the files below by name).
    pub conf: String,
    /// Files written beside the config file: `(name, contents)`.
    pub files: Vec<(String, Vec<u8>)>,
    /// Environment variables for the server process.
    pub env: Vec<(String, String)>,
}

impl NatsServer {
    /// Start a JetStream-enabled server on a free port (never 4222).
    pub fn start() -> Self {
        Self::launch(true, "")
    }

    /// Like [`NatsServer::start`], with `extra_conf` appended to the server's config file
    /// (plain nats-server config, no `include`). It is kept across [`NatsServer::restart`].
    pub fn start_with_config(extra_conf: &str) -> Self {
        Self::launch(true, extra_conf)
    }

    /// Like [`NatsServer::start_with_config`], with files beside the config (for its `include`s:
    /// nats-server resolves them relative to the including file) and an environment of its own.
    pub fn start_with(setup: ServerSetup) -> Self {
        Self::launch_with(true, setup)
    }

    /// Start a server with JetStream disabled (to test that we refuse it).
    pub fn start_without_jetstream() -> Self {
        Self::launch(false, "")
    }

    fn launch(jetstream: bool, extra_conf: &str) -> Self {
        Self::launch_with(
            jetstream,
            ServerSetup {
                conf: extra_conf.to_owned(),
                ..ServerSetup::default()
            },
        )
    }

    fn launch_with(jetstream: bool, setup: ServerSetup) -> Self {
        let extra_conf = setup.conf.as_str();
        let dir = tempfile::tempdir().expect("temp dir for nats-server");
        for (name, contents) in &setup.files {
            std::fs::write(dir.path().join(name), contents).expect("write a server file");
        }
        // A caller's own `jetstream { … }` block replaces ours (the server takes one).
        let js_conf = if jetstream && !extra_conf.contains("jetstream") {
            JETSTREAM_CONF
        } else {
            ""
        };
        std::fs::write(
            dir.path().join("server.conf"),
            format!("{BASE_CONF}{js_conf}{extra_conf}\n"),
        )
        .expect("write server.conf");
        let mut server = Self {
            child: None,
            dir,
            port: 0,
            jetstream,
            env: setup.env,
        };
        server.spawn(None);
        server
    }

    fn spawn(&mut self, port: Option<u16>) {
        let dir = self.dir.path();
        let ports_dir = dir.join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).expect("ports dir");
        let stderr = std::fs::File::create(dir.join("stderr.log")).expect("stderr file");
        let binary = nats_server_binary();
        let mut command = Command::new(&binary);
        // `-p -1` lets the server pick a free port and write it to the ports file: no race.
        let port_arg = port.map_or("-1".to_owned(), |p| p.to_string());
        command
            .args(["-a", "127.0.0.1", "-p", &port_arg, "--ports_file_dir"])
            .arg(&ports_dir)
            .arg("-l")
            .arg(dir.join("server.log"))
            .arg("-c")
            .arg(dir.join("server.conf"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(stderr);
        if self.jetstream {
            command.arg("-js").arg("-sd").arg(dir.join("store"));
        }
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot spawn {}: {err}", binary.display()));
        let ports_file = ports_dir.join(format!("nats-server_{}.ports", child.id()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(found) = read_port(&ports_file) {
                self.port = found;
                break;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "nats-server did not write its ports file within 10 s ({exited:?}); log:\n{}\nstderr:\n{}",
                self.log(),
                std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        wait_for_port(self.port, true);
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port; it stays the same across [`NatsServer::restart`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (`-sd`), kept across restarts.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The server's log file so far (all runs, as `-l` appends).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Kill the server (its store stays), e.g. to test behaviour while NATS is down.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            wait_for_port(self.port, false);
        }
    }

    /// Start again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn(Some(self.port));
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A JetStream cluster of nats-servers on loopback ports, each with its own store (a node can be
/// stopped and restarted: it rejoins on the same ports with what it had stored).
#[derive(Debug)]
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Start `size` nodes (`n1`, `n2`, …) routed to each other; returns once every node listens.
    /// JetStream answers once they have elected a meta leader, a few seconds later.
    pub fn start(size: usize) -> Self {
        Self::start_with_config(size, "")
    }

    /// Like [`NatsCluster::start`], with `extra_conf` in every node's config (a `jetstream {}`
    /// block of its own replaces the default one, as in [`NatsServer::start_with_config`]).
    pub fn start_with_config(size: usize, extra_conf: &str) -> Self {
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes: Vec<String> = route_ports
            .iter()
            .map(|port| format!("nats-route://127.0.0.1:{port}"))
            .collect();
        let nodes = route_ports
            .iter()
            .enumerate()
            .map(|(index, port)| {
                NatsServer::start_with_config(&format!(
                    "server_name: n{}\ncluster {{\n  name: crm-test\n  listen: 127.0.0.1:{port}\n  \
                     routes: [{}]\n}}\n{extra_conf}",
                    index + 1,
                    routes.join(", ")
                ))
            })
            .collect();
        Self { nodes }
    }

    /// Every node's client URL, comma-separated (what `[nats] url` takes).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node named `name` (`n2`).
    pub fn node_named(&mut self, name: &str) -> &mut NatsServer {
        let index: usize = name
            .strip_prefix('n')
            .and_then(|n| n.parse().ok())
            .filter(|n| (1..=self.nodes.len()).contains(n))
            .unwrap_or_else(|| panic!("no node {name}"));
        &mut self.nodes[index - 1]
    }
}

/// A port that was free a moment ago (for listeners a config must name before it starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

fn read_port(ports_file: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(ports_file).ok()?;
    let ports: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = ports.get("nats")?.get(0)?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

fn wait_for_port(port: u16, open: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() == open {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "port {port} did not become {}",
        if open { "open" } else { "closed" }
    );
}

/// A SQLite database file in a temp dir, removed on drop.
#[derive(Debug)]
pub struct TempSqlite {
    dir: tempfile::TempDir,
}

impl TempSqlite {
    /// A fresh temp dir; the database file is created on first connect (`mode=rwc`).
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir for SQLite"),
        }
    }

    /// The database file, inside the temp dir.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("crm.db")
    }

    /// `sqlite://<path>?mode=rwc`.
    pub fn url(&self) -> String {
        format!("sqlite://{}?mode=rwc", self.path().display())
    }
}

impl Default for TempSqlite {
    fn default() -> Self {
        Self::new()
    }
}

/// The PostgreSQL server tests use: `$CRM_TEST_POSTGRES_URL`, else the local one.
pub fn postgres_admin_url() -> String {
    std::env::var("CRM_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `url` (a `postgres://…` URL) with its host and port replaced by `addr`, e.g. to reach the
/// database through a [`TcpProxy`].
pub fn via(url: &str, addr: std::net::SocketAddr) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let user = authority.rsplit_once('@').map(|(user, _)| user);
    match user {
        Some(user) => format!("{scheme}://{user}@{addr}/{path}"),
        None => format!("{scheme}://{addr}/{path}"),
    }
}

/// A fresh PostgreSQL database, dropped (with its connections) on drop.
#[derive(Debug)]
pub struct TempPostgres {
    admin_url: String,
    name: String,
}

impl TempPostgres {
    /// Create a database named `crm_test_<uuid>`. Panics with a clear message when PostgreSQL is
    /// unreachable: store tests never skip silently.
    pub async fn create() -> Self {
        use sqlx::Connection;
        let admin_url = postgres_admin_url();
        let name = format!("crm_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|err| {
                panic!(
                    "PostgreSQL is unreachable at {admin_url}: {err}. Start it \
                 (pg_ctlcluster 15 main start) or set CRM_TEST_POSTGRES_URL."
                )
            });
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let _ = admin.close().await;
        Self { admin_url, name }
    }

    /// The database name, `crm_test_<uuid>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The admin URL with the database swapped for this one.
    pub fn url(&self) -> String {
        database_url(&self.admin_url, &self.name)
    }
}

/// `admin_url` with its database path replaced by `name`, keeping any `?query`.
fn database_url(admin_url: &str, name: &str) -> String {
    let (url, query) = admin_url
        .split_once('?')
        .map_or((admin_url, ""), |(u, q)| (u, q));
    let base = url.rsplit_once('/').map_or(url, |(base, _)| base);
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("{base}/{name}{query}")
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop may run inside a runtime; do the async work on a thread with its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime for dropping the test database");
            runtime.block_on(async {
                use sqlx::Connection;
                if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut admin)
                    .await;
                    let _ = admin.close().await;
                }
            });
        })
        .join();
    }
}

/// A bus connected to `url` with the embedded stream and consumer definitions provisioned.
pub async fn provisioned_bus(url: &str) -> bus::Bus {
    let bus = bus::Bus::connect(&bus::ConnectOptions::new(url))
        .await
        .expect("connect");
    bus.provision(&bus::Definitions::embedded().expect("definitions"))
        .await
        .expect("provision");
    bus
}

/// Connect with `options` once the servers answer JetStream requests: a cluster answers only
/// after its nodes have elected a meta leader, a few seconds after they listen. Panics with the
/// last error after 60 s.
pub async fn connect_when_ready(options: &bus::ConnectOptions) -> bus::Bus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match bus::Bus::connect(options).await {
            Ok(bus) => return bus,
            Err(err) => assert!(
                Instant::now() < deadline,
                "JetStream at {} did not answer within 60 s: {err}",
                options.url
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Poll `check` every 25 ms until it holds; panics naming `what` after 60 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Serve `app` on a free loopback port for the rest of the test (a webhook receiver, a collector,
/// a fake upstream).
pub async fn serve(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// What `record` records, rendered as Prometheus text by a recorder of its own (the process's
/// global recorder is left alone), to check a component's signals: names, labels, values.
pub fn render_metrics(record: impl FnOnce()) -> String {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, record);
    handle.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    #[test]
    fn server_starts_stops_and_restarts_on_the_same_port() {
        let mut server = NatsServer::start();
        let port = server.port();
        assert_ne!(port, 4222);
        assert_eq!(server.url(), format!("nats://127.0.0.1:{port}"));
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(server.store_dir().is_dir(), "JetStream store created");
        server.stop();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        server.restart();
        assert_eq!(server.port(), port);
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert_eq!(server.log().matches("Server is ready").count(), 2);
    }

    #[test]
    fn servers_started_in_parallel_get_distinct_ports() {
        let servers: Vec<NatsServer> = (0..3)
            .map(|_| std::thread::spawn(NatsServer::start))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|handle| handle.join().expect("server thread"))
            .collect();
        let mut ports: Vec<u16> = servers.iter().map(NatsServer::port).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), servers.len(), "{ports:?}");
    }

    #[test]
    fn a_jetstream_block_keeps_the_limits_and_adds_settings() {
        assert_eq!(
            jetstream_conf("sync_interval: always"),
            "jetstream {\n  max_file_store: 64GB\n  max_memory_store: 1GB\n  sync_interval: always\n}\n"
        );
    }

    #[test]
    fn extra_config_is_applied() {
        let server = NatsServer::start_with_config("server_name: crm_test_extra");
        assert!(server.log().contains("crm_test_extra"), "{}", server.log());
    }

    #[test]
    fn temp_sqlite_dir_is_removed_on_drop() {
        let db = TempSqlite::new();
        let path = db.path();
        let dir = path.parent().expect("parent dir").to_path_buf();
        std::fs::write(&path, b"x").expect("write");
        assert_eq!(db.url(), format!("sqlite://{}?mode=rwc", path.display()));
        drop(db);
        assert!(!dir.exists());
    }

    #[test]
    fn urls_can_be_pointed_at_a_proxy() {
        let addr: std::net::SocketAddr = "127.0.0.1:6000".parse().expect("addr");
        assert_eq!(
            via(
                "postgres://postgres@127.0.0.1:5432/crm_x?sslmode=disable",
                addr
            ),
            "postgres://postgres@127.0.0.1:6000/crm_x?sslmode=disable"
        );
        assert_eq!(via("postgres://h/db", addr), "postgres://127.0.0.1:6000/db");
    }

    #[test]
    fn postgres_url_keeps_the_query() {
        assert_eq!(
            database_url("postgres://u@h:1/postgres?sslmode=disable", "x"),
            "postgres://u@h:1/x?sslmode=disable"
        );
        assert_eq!(
            database_url("postgres://u@h/postgres", "x"),
            "postgres://u@h/x"
        );
    }

    #[tokio::test]
    async fn temp_postgres_is_created_and_dropped() {
        let db = TempPostgres::create().await;
        let name = db.name().to_owned();
        let mut conn = sqlx::PgConnection::connect(&db.url())
            .await
            .expect("connect");
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut conn)
            .await
            .expect("select");
        assert_eq!(one, 1);
        // Left open on purpose: the drop must force it closed.
        drop(db);
        let mut admin = sqlx::PgConnection::connect(&postgres_admin_url())
            .await
            .expect("admin");
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&name)
                .fetch_one(&mut admin)
                .await
                .expect("query");
        assert!(!exists, "database {name} dropped");
        drop(conn);
    }
}
