//! Test helpers: a real nats-server per test on a free port with a temp store, and temporary
//! SQLite files and PostgreSQL databases. Tests stay hermetic and parallel-safe.

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Where the pinned nats-server lives: `$CRM_NATS_SERVER`, else `.tools/bin/nats-server`.
pub fn nats_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CRM_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/bin/nats-server");
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
}

impl NatsServer {
    /// Start a JetStream-enabled server on a free port.
    pub fn start() -> Self {
        Self::launch(true)
    }

    /// Start a server with JetStream disabled (to test that we refuse it).
    pub fn start_without_jetstream() -> Self {
        Self::launch(false)
    }

    fn launch(jetstream: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for nats-server");
        let mut server = Self {
            child: None,
            dir,
            port: 0,
            jetstream,
        };
        server.spawn(None);
        server
    }

    fn spawn(&mut self, port: Option<u16>) {
        let dir = self.dir.path();
        let ports_dir = dir.join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).expect("ports dir");
        let conf = dir.join("server.conf");
        std::fs::write(&conf, "max_payload: 2MB\n").expect("write server.conf");
        let stderr = std::fs::File::create(dir.join("stderr.log")).expect("stderr file");
        let mut command = Command::new(nats_server_binary());
        // `-p -1` lets the server pick a free port and write it to the ports file: no race.
        let port_arg = port.map_or("-1".to_owned(), |p| p.to_string());
        command
            .args(["-a", "127.0.0.1", "-p", &port_arg, "--ports_file_dir"])
            .arg(&ports_dir)
            .arg("-l")
            .arg(dir.join("server.log"))
            // Dead letters carry an event of up to 1 MiB plus headers, as in nats/dev.conf.
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(stderr);
        if self.jetstream {
            command.arg("-js").arg("-sd").arg(dir.join("store"));
        }
        let child = command.spawn().expect("spawn nats-server");
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
                "nats-server did not start ({exited:?}); log:\n{}\nstderr:\n{}",
                self.log(),
                std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        wait_for_port(self.port, true);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

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
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir for SQLite"),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("crm.db")
    }

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
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let _ = admin.close().await;
        Self { admin_url, name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn url(&self) -> String {
        let base = self
            .admin_url
            .rsplit_once('/')
            .map_or(self.admin_url.as_str(), |(b, _)| b);
        format!("{base}/{}", self.name)
    }
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
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                    let _ = admin.close().await;
                }
            });
        })
        .join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    #[test]
    fn servers_start_on_distinct_ports_stop_and_restart() {
        let mut a = NatsServer::start();
        let b = NatsServer::start();
        assert_ne!(a.port(), b.port());
        assert_ne!(a.port(), 4222);
        assert!(a.store_dir().exists(), "JetStream store created");
        let port = a.port();
        a.stop();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        a.restart();
        assert_eq!(a.port(), port);
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(a.log().contains("Server is ready"), "{}", a.log());
    }

    #[test]
    fn temp_sqlite_is_removed_on_drop() {
        let db = TempSqlite::new();
        let path = db.path();
        std::fs::write(&path, b"x").expect("write");
        assert!(db.url().starts_with("sqlite://"));
        drop(db);
        assert!(!path.exists());
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
        conn.close().await.expect("close");
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
    }
}
