//! The platform under test, started and stopped by the harness: a nats-server on a free port with
//! a temp store (and the scenario's `sync_interval`), `crm provision`, then `crm all` — or each
//! role as its own process — over a temp SQLite store, with API keys the harness hashes itself
//! and the gateway and admin endpoints on free ports. Logs land in the output directory. Every
//! child is killed if the harness stops early.

use crate::{
    mix::{api_key, tenant_id},
    scenario::{Processes, Scenario},
};
use anyhow::{Context, Result, bail};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::process::{Child, Command};

/// Where the binaries and the base configuration are.
#[derive(Debug, Clone)]
pub struct StackPaths {
    pub crm: PathBuf,
    pub nats_server: PathBuf,
    /// The committed crm.toml the run's configuration starts from.
    pub base_config: PathBuf,
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
    /// API key of tenant k, for k in 0..tenants.
    pub api_keys: Vec<String>,
    pub nats_version: String,
    pub pids: Pids,
    crm: PathBuf,
    config_path: PathBuf,
    log_dir: PathBuf,
    log_level: String,
    nats: Child,
    roles: Vec<RoleProcess>,
    _data: tempfile::TempDir,
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
        let (out, err) = log_file(log_dir, "nats-server")?;
        let nats = Command::new(&paths.nats_server)
            .args(["-a", "127.0.0.1", "-p", "-1", "-c"])
            .arg(&conf)
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", paths.nats_server.display()))?;
        let pid = nats.id().context("nats-server has no pid")?;
        let ports_file = ports_dir.join(format!("nats-server_{pid}.ports"));
        let deadline = Instant::now() + Duration::from_secs(15);
        let nats_url = loop {
            if let Ok(text) = std::fs::read_to_string(&ports_file)
                && let Ok(ports) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(url) = ports["nats"][0].as_str()
            {
                break url.to_owned();
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "nats-server did not report its port within 15 s (see nats-server.log)"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };

        // The run's crm.toml: the committed one, our addresses and keys, the scenario's overrides.
        let text = std::fs::read_to_string(&paths.base_config)
            .with_context(|| format!("reading {}", paths.base_config.display()))?;
        let mut config: toml::Table = toml::from_str(&text)?;
        let gateway_port = free_port()?;
        let tenants = scenario.mix.tenants;
        let api_keys: Vec<String> = (0..tenants).map(api_key).collect();
        table(&mut config, "nats")?.insert("url".into(), nats_url.clone().into());
        table(&mut config, "store")?.insert(
            "url".into(),
            format!("sqlite://{}?mode=rwc", data.path().join("crm.db").display()).into(),
        );
        table(&mut config, "admin")?.insert("listen".into(), "127.0.0.1:0".into());
        let gateway = table(&mut config, "gateway")?;
        gateway.insert("listen".into(), format!("127.0.0.1:{gateway_port}").into());
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
        let config_path = log_dir.join("crm.toml");
        std::fs::write(&config_path, toml::to_string(&config)?)?;

        let mut stack = Self {
            nats_url,
            gateway_url: format!("http://127.0.0.1:{gateway_port}"),
            api_keys,
            nats_version,
            pids: Arc::new(Mutex::new(vec![("nats-server".to_owned(), pid)])),
            crm: paths.crm.clone(),
            config_path,
            log_dir: log_dir.to_owned(),
            log_level: scenario.stack.log.clone(),
            nats,
            roles: Vec::new(),
            _data: data,
        };

        let status = crm_command(
            &stack.crm,
            &stack.config_path,
            &stack.log_level,
            &["provision".to_owned()],
        )
        .stdout(Stdio::null())
        .stderr(log_file(log_dir, "crm-provision")?.1)
        .status()
        .await?;
        anyhow::ensure!(
            status.success(),
            "crm provision failed (see crm-provision.log)"
        );

        let names: &[&str] = match scenario.stack.processes {
            Processes::All => &["all"],
            Processes::Roles => &["gateway", "router", "projector", "analytics"],
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
        Ok(stack)
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
        terminate(&self.nats).await;
        if tokio::time::timeout(Duration::from_secs(10), self.nats.wait())
            .await
            .is_err()
        {
            let _ = self.nats.start_kill();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
