//! The platform under test, started and stopped by the harness: a nats-server on a free port with
//! a temp store (and the scenario's `sync_interval`), `crm provision` (of an edited copy of
//! `nats/` when the scenario overrides stream definitions), then `crm all` — or each role as its
//! own process — over a temp SQLite store or a throwaway PostgreSQL database behind a TCP proxy
//! the harness can cut, with API keys the harness hashes itself and the gateway and admin
//! endpoints on free ports. Logs land in the output directory. Every child is killed if the
//! harness stops early. Faults act through it: kill -9 and restart a role, stop nats-server
//! (SIGTERM or kill -9) and start it again on the same port and store, cut the store.

use crate::{
    mix::{POISON_CUSTOMER, api_key, tenant_id},
    scenario::{Processes, ROLES, Scenario, StoreKind},
};
use anyhow::{Context, Result, bail};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use test_support::{TcpProxy, TempPostgres};
use tokio::process::{Child, Command};

/// Where the binaries and the base configuration are.
#[derive(Debug, Clone)]
pub struct StackPaths {
    pub crm: PathBuf,
    pub nats_server: PathBuf,
    /// The committed crm.toml the run's configuration starts from.
    pub base_config: PathBuf,
    /// The committed stream and consumer definitions (`nats/`), edited for `[stack.streams]`.
    pub definitions: PathBuf,
}

/// The run's store as the harness reaches it (directly, never through the proxy).
#[derive(Debug)]
pub struct StoreHandle {
    pub kind: StoreKind,
    /// The URL the harness queries (the platform's goes through the proxy for PostgreSQL).
    pub direct_url: String,
    proxy: Option<TcpProxy>,
    /// Dropped with the stack: the throwaway database goes with it.
    _database: Option<TempPostgres>,
}

/// How nats-server is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGTERM: a clean shutdown.
    Term,
    /// SIGKILL.
    Kill,
}

/// (name, pid) of every process worth sampling; updated when a role restarts.
pub type Pids = Arc<Mutex<Vec<(String, u32)>>>;

#[derive(Debug)]
struct RoleProcess {
    name: String,
    command: Vec<String>,
    admin: SocketAddr,
    child: Child,
}

/// A running platform.
#[derive(Debug)]
pub struct Stack {
    pub nats_url: String,
    pub gateway_url: String,
    /// The gateway's priority door (`gateway.priority_listen`), critical and high events only.
    pub gateway_priority_url: Option<String>,
    /// API key of tenant k, for k in 0..tenants.
    pub api_keys: Vec<String>,
    pub nats_version: String,
    pub pids: Pids,
    pub store: StoreHandle,
    /// `[retention].high_water` of the run's configuration.
    pub high_water: f64,
    crm: PathBuf,
    config_path: PathBuf,
    log_dir: PathBuf,
    log_level: String,
    nats: Option<Child>,
    nats_binary: PathBuf,
    nats_conf: PathBuf,
    nats_port: u16,
    roles: Vec<RoleProcess>,
    data: tempfile::TempDir,
}

/// A port nothing listens on right now.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn log_file(dir: &Path, name: &str) -> Result<(Stdio, Stdio)> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .with_context(|| format!("opening {name}.log"))?;
    Ok((file.try_clone()?.into(), file.into()))
}

/// `base` with `overrides` merged in, table by table.
pub fn merge_toml(base: &mut toml::Table, overrides: &toml::Table) {
    for (key, value) in overrides {
        match (base.get_mut(key), value) {
            (Some(toml::Value::Table(mine)), toml::Value::Table(theirs)) => {
                merge_toml(mine, theirs)
            }
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

fn table<'a>(root: &'a mut toml::Table, name: &str) -> Result<&'a mut toml::Table> {
    root.entry(name)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .with_context(|| format!("[{name}] in the base configuration is not a table"))
}

/// The nats-server version line (`nats-server: v2.12.8` → `2.12.8`).
pub fn nats_server_version(binary: &Path) -> String {
    std::process::Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| {
            text.split_whitespace()
                .last()
                .map(|v| v.trim_start_matches('v').to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// `crm` processes: drop inherited `CRM_*` settings so only the run's file and ours apply.
fn crm_command(crm: &Path, config: &Path, log_level: &str, args: &[String]) -> Command {
    let mut command = Command::new(crm);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CRM_") {
            command.env_remove(key);
        }
    }
    command
        .arg("--config")
        .arg(config)
        .args(args)
        .env("CRM_LOG", log_level)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

async fn wait_ready(name: &str, admin: SocketAddr, child: &mut Child, log: &Path) -> Result<()> {
    let client = reqwest::Client::new();
    let url = format!("http://{admin}/readyz");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = client.get(&url).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: String = tail
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            bail!("{name} exited ({status}) before it was ready; its log ends:\n{tail}");
        }
        if Instant::now() > deadline {
            bail!("{name} was not ready at {url} within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM: the process finishes what it is doing and exits.
async fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
}

/// The stream definitions in `dir` (`streams/*.json`, `consumers/…`) copied to `to`, with each
/// stream named in `overrides` given the fields its table sets (JSON field names).
pub fn write_definitions(dir: &Path, overrides: &toml::Table, to: &Path) -> Result<()> {
    fn copy_tree(from: &Path, to: &Path) -> Result<()> {
        std::fs::create_dir_all(to)?;
        for entry in
            std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))?
        {
            let path = entry?.path();
            let target = to.join(path.file_name().unwrap_or_default());
            if path.is_dir() {
                copy_tree(&path, &target)?;
            } else if path.extension().is_some_and(|e| e == "json") {
                std::fs::copy(&path, &target)?;
            }
        }
        Ok(())
    }
    for sub in ["streams", "consumers"] {
        if dir.join(sub).exists() {
            copy_tree(&dir.join(sub), &to.join(sub))?;
        }
    }
    for (name, fields) in overrides {
        let path = to.join("streams").join(format!("{name}.json"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("stack.streams.{name}: no {}", path.display()))?;
        let mut definition: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let fields = serde_json::to_value(fields)?;
        let Some(fields) = fields.as_object() else {
            bail!("stack.streams.{name} must be a table");
        };
        for (key, value) in fields {
            definition.insert(key.clone(), value.clone());
        }
        std::fs::write(&path, serde_json::to_string_pretty(&definition)?)?;
    }
    Ok(())
}

/// Whether the platform reaches the store through the harness's proxy: only when the scenario
/// cuts the store (a `store_down` fault). Otherwise the proxy would be one more hop in every
/// statement's round trip, run by the harness's busy runtime, and measured as the store's.
pub fn store_needs_proxy(scenario: &Scenario) -> bool {
    scenario
        .fault
        .as_ref()
        .is_some_and(|fault| fault.kind == crate::scenario::FaultKind::StoreDown)
}

/// A throwaway PostgreSQL database, with a proxy in front of it when `proxied`; `Err` (not a
/// panic) when PostgreSQL does not answer.
async fn postgres_store(proxied: bool) -> Result<(StoreHandle, String)> {
    let admin = test_support::postgres_admin_url();
    let host_port = admin
        .split_once("://")
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|authority| authority.rsplit('@').next())
        .with_context(|| format!("no host in {admin}"))?
        .to_owned();
    let host_port = if host_port.contains(':') {
        host_port
    } else {
        format!("{host_port}:5432")
    };
    let upstream = tokio::net::lookup_host(&host_port)
        .await
        .with_context(|| format!("resolving {host_port}"))?
        .next()
        .with_context(|| format!("no address for {host_port}"))?;
    tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(upstream),
    )
    .await
    .map_err(anyhow::Error::from)
    .and_then(|r| r.map_err(anyhow::Error::from))
    .with_context(|| {
        format!(
            "PostgreSQL is unreachable at {admin} (stack.store = \"postgres\" needs it; \
             set CRM_TEST_POSTGRES_URL)"
        )
    })?;
    let database = TempPostgres::create().await;
    let (proxy, platform_url) = if proxied {
        let proxy = TcpProxy::start(upstream).await;
        let url = test_support::via(&database.url(), proxy.addr());
        (Some(proxy), url)
    } else {
        (None, database.url())
    };
    Ok((
        StoreHandle {
            kind: StoreKind::Postgres,
            direct_url: database.url(),
            proxy,
            _database: Some(database),
        },
        platform_url,
    ))
}

/// Make the store refuse every event about [`POISON_CUSTOMER`] (a trigger on the projection's
/// ledger): events that pass validation and that the database rejects.
async fn install_poison_trigger(store: &StoreHandle) -> Result<()> {
    match store.kind {
        StoreKind::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&store.direct_url).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE TRIGGER IF NOT EXISTS crm_load_refuse_poison BEFORE INSERT ON processed_events \
                 WHEN NEW.customer_id = '{POISON_CUSTOMER}' \
                 BEGIN SELECT RAISE(ABORT, 'poison refused by crm-load'); END"
            )))
            .execute(&pool)
            .await
            .context("installing the poison trigger")?;
            pool.close().await;
        }
        StoreKind::Postgres => {
            let pool = sqlx::PgPool::connect(&store.direct_url).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE OR REPLACE FUNCTION crm_load_refuse_poison() RETURNS trigger AS $$ \
                 BEGIN IF NEW.customer_id = '{POISON_CUSTOMER}' THEN \
                 RAISE EXCEPTION 'poison refused by crm-load'; END IF; RETURN NEW; END $$ \
                 LANGUAGE plpgsql"
            )))
            .execute(&pool)
            .await
            .context("installing the poison trigger function")?;
            sqlx::query(
                "CREATE TRIGGER crm_load_refuse_poison BEFORE INSERT ON processed_events \
                 FOR EACH ROW EXECUTE FUNCTION crm_load_refuse_poison()",
            )
            .execute(&pool)
            .await
            .context("installing the poison trigger")?;
            pool.close().await;
        }
    }
    Ok(())
}

/// Start nats-server with `conf` on `port` (0: a free one, read back from its ports file).
async fn spawn_nats(
    binary: &Path,
    conf: &Path,
    port: u16,
    ports_dir: &Path,
    log_dir: &Path,
) -> Result<(Child, String)> {
    let (out, err) = log_file(log_dir, "nats-server")?;
    let port_arg = if port == 0 {
        "-1".to_owned()
    } else {
        port.to_string()
    };
    let nats = Command::new(binary)
        .args(["-a", "127.0.0.1", "-p", &port_arg, "-c"])
        .arg(conf)
        .arg("--ports_file_dir")
        .arg(ports_dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let pid = nats.id().context("nats-server has no pid")?;
    let ports_file = ports_dir.join(format!("nats-server_{pid}.ports"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = loop {
        if let Ok(text) = std::fs::read_to_string(&ports_file)
            && let Ok(ports) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(url) = ports["nats"][0].as_str()
        {
            break url.to_owned();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "nats-server did not report its port within 30 s (see nats-server.log)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Ok((nats, url))
}

impl Stack {
    pub async fn start(scenario: &Scenario, paths: &StackPaths, log_dir: &Path) -> Result<Self> {
        for (what, path) in [("crm", &paths.crm), ("nats-server", &paths.nats_server)] {
            anyhow::ensure!(
                path.exists(),
                "{what} not found at {} (build it with `cargo build --release --bin crm`, \
                 install nats-server with `make tools`)",
                path.display()
            );
        }
        let data = tempfile::tempdir().context("temp dir for the run's stores")?;
        let nats_version = nats_server_version(&paths.nats_server);

        // nats-server: free port (-p -1, read back from the ports file), temp store.
        let sync = match scenario.stack.sync_interval.as_str() {
            "" | "default" => String::new(),
            "always" => "  sync_interval: always\n".to_owned(),
            other => format!("  sync_interval: \"{other}\"\n"),
        };
        let conf = data.path().join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "max_payload: 2MB\njetstream {{\n  store_dir: \"{}\"\n  max_file_store: 64GB\n{sync}}}\n",
                data.path().join("jetstream").display()
            ),
        )?;
        let ports_dir = data.path().join("ports");
        std::fs::create_dir_all(&ports_dir)?;
        let (nats, nats_url) =
            spawn_nats(&paths.nats_server, &conf, 0, &ports_dir, log_dir).await?;
        let pid = nats.id().context("nats-server has no pid")?;
        let nats_port = nats_url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("no port in {nats_url}"))?;

        // The store: a file in the temp dir, or a throwaway PostgreSQL database (behind a proxy
        // when a fault will cut it).
        let (store, platform_store_url) = match scenario.stack.store {
            StoreKind::Sqlite => {
                let url = format!("sqlite://{}?mode=rwc", data.path().join("crm.db").display());
                (
                    StoreHandle {
                        kind: StoreKind::Sqlite,
                        direct_url: url.clone(),
                        proxy: None,
                        _database: None,
                    },
                    url,
                )
            }
            StoreKind::Postgres => postgres_store(store_needs_proxy(scenario)).await?,
        };

        // The run's crm.toml: the committed one, our addresses and keys, the scenario's overrides.
        let text = std::fs::read_to_string(&paths.base_config)
            .with_context(|| format!("reading {}", paths.base_config.display()))?;
        let mut config: toml::Table = toml::from_str(&text)?;
        let gateway_port = free_port()?;
        let priority_port = free_port()?;
        let tenants = scenario.mix.tenants;
        let api_keys: Vec<String> = (0..tenants).map(api_key).collect();
        table(&mut config, "nats")?.insert("url".into(), nats_url.clone().into());
        table(&mut config, "store")?.insert("url".into(), platform_store_url.into());
        table(&mut config, "admin")?.insert("listen".into(), "127.0.0.1:0".into());
        let gateway = table(&mut config, "gateway")?;
        gateway.insert("listen".into(), format!("127.0.0.1:{gateway_port}").into());
        gateway.insert(
            "priority_listen".into(),
            format!("127.0.0.1:{priority_port}").into(),
        );
        let keys: Vec<toml::Value> = (0..tenants)
            .map(|k| {
                let mut key = toml::Table::new();
                key.insert("sha256".into(), gateway::hash_key(&api_key(k)).into());
                key.insert("tenant".into(), tenant_id(k).into());
                toml::Value::Table(key)
            })
            .collect();
        gateway.insert("api_keys".into(), keys.into());
        let router = table(&mut config, "router")?;
        let rules = router
            .get("rules_file")
            .and_then(|v| v.as_str())
            .unwrap_or("routing.toml")
            .to_owned();
        let base_dir = paths
            .base_config
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let rules = std::fs::canonicalize(base_dir.join(&rules))
            .with_context(|| format!("routing rules {rules}"))?;
        router.insert("rules_file".into(), rules.display().to_string().into());
        merge_toml(&mut config, &scenario.stack.config);
        let high_water = config
            .get("retention")
            .and_then(|r| r.get("high_water"))
            .and_then(toml::Value::as_float)
            .unwrap_or(0.8);
        let gateway_priority_url = config
            .get("gateway")
            .and_then(|g| g.get("priority_listen"))
            .and_then(toml::Value::as_str)
            .map(|addr| format!("http://{addr}"));
        let config_path = log_dir.join("crm.toml");
        std::fs::write(&config_path, toml::to_string(&config)?)?;

        let mut stack = Self {
            nats_url,
            gateway_url: format!("http://127.0.0.1:{gateway_port}"),
            gateway_priority_url,
            api_keys,
            nats_version,
            pids: Arc::new(Mutex::new(vec![("nats-server".to_owned(), pid)])),
            store,
            high_water,
            crm: paths.crm.clone(),
            config_path,
            log_dir: log_dir.to_owned(),
            log_level: scenario.stack.log.clone(),
            nats: Some(nats),
            nats_binary: paths.nats_server.clone(),
            nats_conf: conf,
            nats_port,
            roles: Vec::new(),
            data,
        };

        // Provision the committed definitions, or an edited copy of them.
        let definitions = if scenario.stack.streams.is_empty() {
            None
        } else {
            let dir = stack.data.path().join("nats-definitions");
            write_definitions(&paths.definitions, &scenario.stack.streams, &dir)?;
            Some(dir)
        };
        stack.provision(definitions.as_deref()).await?;

        let names: &[&str] = match scenario.stack.processes {
            Processes::All => &["all"],
            Processes::Roles => &ROLES,
        };
        // One after the other: processes that start together over a fresh SQLite file race to
        // run its migrations, and all but one fail.
        for name in names {
            let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
            let mut role = RoleProcess {
                name: (*name).to_owned(),
                command: vec![(*name).to_owned()],
                admin,
                child: stack.spawn_role(name, &[(*name).to_owned()], admin)?,
            };
            let log = stack.log_dir.join(format!("crm-{name}.log"));
            wait_ready(name, admin, &mut role.child, &log).await?;
            stack.roles.push(role);
        }
        // The roles have migrated the store by now.
        if scenario.mix.poison_share > 0.0 {
            install_poison_trigger(&stack.store).await?;
        }
        Ok(stack)
    }

    /// `crm provision`, of `definitions` (a directory) or of the committed ones built into crm.
    pub async fn provision(&self, definitions: Option<&Path>) -> Result<()> {
        let mut args = vec!["provision".to_owned()];
        if let Some(dir) = definitions {
            args.push("--definitions".into());
            args.push(dir.display().to_string());
        }
        let status = crm_command(&self.crm, &self.config_path, &self.log_level, &args)
            .stdout(Stdio::null())
            .stderr(log_file(&self.log_dir, "crm-provision")?.1)
            .status()
            .await?;
        anyhow::ensure!(
            status.success(),
            "crm provision failed (see crm-provision.log)"
        );
        Ok(())
    }

    /// Every role process's name and admin address (for /metrics).
    pub fn admin_endpoints(&self) -> Vec<(String, SocketAddr)> {
        self.roles
            .iter()
            .map(|r| (r.name.clone(), r.admin))
            .collect()
    }

    /// Stop nats-server (SIGTERM and wait for it, or kill -9).
    pub async fn stop_nats(&mut self, signal: StopSignal) -> Result<()> {
        let Some(mut nats) = self.nats.take() else {
            bail!("nats-server is not running");
        };
        match signal {
            StopSignal::Kill => nats.start_kill()?,
            StopSignal::Term => terminate(&nats).await,
        }
        if tokio::time::timeout(Duration::from_secs(30), nats.wait())
            .await
            .is_err()
        {
            nats.start_kill()?;
            let _ = nats.wait().await;
        }
        Ok(())
    }

    /// Start nats-server again on the same port, configuration and store.
    pub async fn start_nats(&mut self) -> Result<()> {
        anyhow::ensure!(self.nats.is_none(), "nats-server is running");
        let ports_dir = self.data.path().join("ports");
        let (nats, _) = spawn_nats(
            &self.nats_binary,
            &self.nats_conf,
            self.nats_port,
            &ports_dir,
            &self.log_dir,
        )
        .await?;
        let pid = nats.id().context("nats-server has no pid")?;
        self.nats = Some(nats);
        let mut pids = self.pids.lock().unwrap_or_else(|e| e.into_inner());
        pids.retain(|(n, _)| n != "nats-server");
        pids.push(("nats-server".to_owned(), pid));
        Ok(())
    }

    /// Cut the store's proxy (`false`: every open connection closed, new ones dropped) or let it
    /// through again.
    pub fn set_store_up(&self, up: bool) -> Result<()> {
        let proxy = self
            .store
            .proxy
            .as_ref()
            .context("the store has no proxy (stack.store = \"postgres\" has one)")?;
        proxy.set_up(up);
        Ok(())
    }

    fn spawn_role(&self, name: &str, args: &[String], admin: SocketAddr) -> Result<Child> {
        let (out, err) = log_file(&self.log_dir, &format!("crm-{name}"))?;
        let child = crm_command(&self.crm, &self.config_path, &self.log_level, args)
            .env("CRM_ADMIN__LISTEN", admin.to_string())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting crm {name}"))?;
        let pid = child.id().context("crm has no pid")?;
        let mut pids = self.pids.lock().unwrap_or_else(|e| e.into_inner());
        pids.retain(|(n, _)| n != &format!("crm-{name}"));
        pids.push((format!("crm-{name}"), pid));
        Ok(child)
    }

    fn role_index(&self, name: &str) -> Result<usize> {
        self.roles
            .iter()
            .position(|r| r.name == name)
            .with_context(|| format!("no process runs role {name}"))
    }

    /// kill -9 the role's process.
    pub async fn kill_role(&mut self, name: &str) -> Result<()> {
        let index = self.role_index(name)?;
        let role = &mut self.roles[index];
        role.child.start_kill()?;
        let _ = role.child.wait().await;
        Ok(())
    }

    /// Start the role's process again and wait until it is ready.
    pub async fn restart_role(&mut self, name: &str) -> Result<()> {
        let index = self.role_index(name)?;
        let (command, admin) = (self.roles[index].command.clone(), self.roles[index].admin);
        let child = self.spawn_role(name, &command, admin)?;
        let role = &mut self.roles[index];
        role.child = child;
        let log = self.log_dir.join(format!("crm-{name}.log"));
        wait_ready(name, admin, &mut role.child, &log).await
    }

    /// SIGTERM every crm process (they finish in-flight work), then the nats-server.
    pub async fn stop(mut self) -> Result<()> {
        for role in &self.roles {
            terminate(&role.child).await;
        }
        for role in &mut self.roles {
            if tokio::time::timeout(Duration::from_secs(20), role.child.wait())
                .await
                .is_err()
            {
                let _ = role.child.start_kill();
                let _ = role.child.wait().await;
            }
        }
        if let Some(nats) = &mut self.nats {
            terminate(nats).await;
            if tokio::time::timeout(Duration::from_secs(10), nats.wait())
                .await
                .is_err()
            {
                let _ = nats.start_kill();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_is_proxied_only_for_a_store_fault() {
        let scenario = |extra: &str| {
            crate::scenario::Scenario::parse(&format!(
                "name = \"t\"\n[stack]\nstore = \"postgres\"\n[[phase]]\nname = \"p\"\n\
                 duration = \"10s\"\nrate = 10\n{extra}"
            ))
            .expect("scenario")
        };
        // A proxy is a hop in every statement's round trip, run by the busy harness: only when
        // the run will cut the store through it.
        assert!(!store_needs_proxy(&scenario("")));
        assert!(!store_needs_proxy(&scenario(
            "[fault]\nkind = \"kill_nats\"\nat = \"1s\"\nrecovery_p99_ms = 1\n"
        )));
        assert!(store_needs_proxy(&scenario(
            "[fault]\nkind = \"store_down\"\nat = \"1s\"\nrecovery_p99_ms = 1\n"
        )));
    }

    #[test]
    fn overrides_merge_table_by_table() {
        let mut base: toml::Table =
            toml::from_str("[projector]\nmax_batch = 256\nconcurrency = 1\n[nats]\nurl = \"x\"\n")
                .expect("toml");
        let overrides: toml::Table =
            toml::from_str("[projector]\nmax_batch = 8\n[analytics.throttle]\ntick = \"200ms\"\n")
                .expect("toml");
        merge_toml(&mut base, &overrides);
        assert_eq!(base["projector"]["max_batch"].as_integer(), Some(8));
        assert_eq!(base["projector"]["concurrency"].as_integer(), Some(1));
        assert_eq!(
            base["analytics"]["throttle"]["tick"].as_str(),
            Some("200ms")
        );
        assert_eq!(base["nats"]["url"].as_str(), Some("x"));
    }

    #[test]
    fn stream_overrides_edit_a_copy_of_the_definitions() {
        let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../nats");
        let out = tempfile::tempdir().expect("temp dir");
        let overrides: toml::Table = toml::from_str(
            "[CRM_LANE_STANDARD]\nmax_bytes = 65536\n[CRM_INGEST]\nduplicate_window = 5000000000\n",
        )
        .expect("toml");
        write_definitions(&committed, &overrides, out.path()).expect("written");
        let read = |dir: &Path, name: &str| -> serde_json::Value {
            let path = dir.join("streams").join(format!("{name}.json"));
            serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json")
        };
        assert_eq!(read(out.path(), "CRM_LANE_STANDARD")["max_bytes"], 65536);
        assert_eq!(
            read(out.path(), "CRM_INGEST")["duplicate_window"],
            5_000_000_000u64
        );
        assert_eq!(
            read(out.path(), "CRM_LANE_STANDARD")["retention"],
            read(&committed, "CRM_LANE_STANDARD")["retention"],
            "fields not overridden are kept"
        );
        assert_eq!(
            read(&committed, "CRM_LANE_STANDARD")["max_bytes"],
            1_073_741_824u64,
            "the committed file is untouched"
        );
        let parsed = bus::Definitions::from_dir(out.path()).expect("the copy is valid");
        let streams = bus::Definitions::from_dir(&committed).expect("the committed definitions");
        assert_eq!(
            parsed.stream_names(),
            streams.stream_names(),
            "every stream is copied"
        );
        let unknown: toml::Table = toml::from_str("[CRM_NOPE]\nmax_bytes = 1\n").expect("toml");
        let err = write_definitions(&committed, &unknown, &out.path().join("x"))
            .expect_err("an unknown stream is refused");
        assert!(format!("{err:#}").contains("CRM_NOPE"), "{err:#}");
    }
}
