//! Starting roles: shared connections, admin endpoints, and shutdown on SIGTERM / Ctrl-C.

use crate::{config::Config, sched::OwnRuntime};
use anyhow::{Context, Result};
use bus::{Bus, CancellationToken, Definitions};
use futures::future::BoxFuture;
use std::{sync::Arc, time::Duration};
use store::{ContextCache, Store};
use telemetry::Readiness;

/// How often the projector prunes the idempotency ledgers of rows older than
/// `[store].ledger_retention`.
const LEDGER_PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Which roles run in this process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Roles {
    pub gateway: bool,
    pub router: bool,
    pub projector: bool,
    pub analytics: bool,
    pub notifier: bool,
}

impl Roles {
    /// Every role (`crm all`).
    pub const ALL: Roles = Roles {
        gateway: true,
        router: true,
        projector: true,
        analytics: true,
        notifier: true,
    };
    const NONE: Roles = Roles {
        gateway: false,
        router: false,
        projector: false,
        analytics: false,
        notifier: false,
    };
    /// One role alone (`crm gateway`, …).
    pub const GATEWAY: Roles = Roles {
        gateway: true,
        ..Self::NONE
    };
    pub const ROUTER: Roles = Roles {
        router: true,
        ..Self::NONE
    };
    pub const PROJECTOR: Roles = Roles {
        projector: true,
        ..Self::NONE
    };
    pub const ANALYTICS: Roles = Roles {
        analytics: true,
        ..Self::NONE
    };
    pub const NOTIFIER: Roles = Roles {
        notifier: true,
        ..Self::NONE
    };
}

/// The store's profiles and analytics as the gateway wants them.
struct StoreReads(Store);

impl gateway::ReadModel for StoreReads {
    fn profile(
        &self,
        tenant: &str,
        customer: &str,
    ) -> BoxFuture<'_, Result<Option<serde_json::Value>, String>> {
        let (tenant, customer) = (tenant.to_owned(), customer.to_owned());
        Box::pin(async move {
            let profile = self
                .0
                .profile(&tenant, &customer)
                .await
                .map_err(|e| e.to_string())?;
            profile
                .map(|p| serde_json::to_value(p).map_err(|e| e.to_string()))
                .transpose()
        })
    }

    fn analytics(
        &self,
        tenant: &str,
        query: gateway::AnalyticsQuery,
    ) -> BoxFuture<'_, Result<Option<serde_json::Value>, String>> {
        let tenant = tenant.to_owned();
        Box::pin(async move {
            let value = match query {
                gateway::AnalyticsQuery::Summary => self
                    .0
                    .analytics_summary(&tenant)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|summary| serde_json::to_value(summary).map_err(|e| e.to_string()))?,
                gateway::AnalyticsQuery::EventsPerMinute {
                    from_s,
                    to_s,
                    event_type,
                } => {
                    let minutes = self
                        .0
                        .analytics_events_per_minute(&tenant, from_s, to_s, event_type)
                        .await
                        .map_err(|e| e.to_string())?;
                    serde_json::json!({ "tenant_id": tenant, "minutes": minutes })
                }
            };
            Ok(Some(value))
        })
    }
}

/// The store's cached customer context as the router wants it.
struct CachedContext(ContextCache);

impl router::ContextLookup for CachedContext {
    fn lookup<'a>(
        &'a self,
        tenant: &'a str,
        customer: &'a str,
    ) -> BoxFuture<'a, Result<Option<routing::CustomerContext>, String>> {
        Box::pin(async move {
            let context = self.0.get(tenant, customer).await.map_err(|e| {
                metrics::counter!("crm_cache_requests_total", "cache" => "customer_context", "result" => "error")
                    .increment(1);
                e.to_string()
            })?;
            Ok(context.map(|c| routing::CustomerContext {
                tier: c.tier,
                lifetime_value: c
                    .lifetime_value
                    .into_iter()
                    .map(|v| (v.currency_code, v.minor_units))
                    .collect(),
            }))
        })
    }

    fn invalidate<'a>(&'a self, tenant: &'a str, customer: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.0.invalidate(tenant, customer))
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn termination() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Keep `crm_nats_connected` and readiness in step with the connection.
async fn watch_connection(bus: Bus, readiness: Readiness, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let up = bus.is_connected();
                readiness.set("nats", up);
                metrics::gauge!("crm_nats_connected").set(if up { 1.0 } else { 0.0 });
            }
        }
    }
}

/// Publish `crm_consumer_pending_messages` / `crm_consumer_ack_pending_messages` for every
/// durable consumer, every few seconds.
async fn watch_consumers(bus: Bus, shutdown: CancellationToken) {
    let Ok(definitions) = Definitions::embedded() else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                for consumer in &definitions.consumers {
                    // The lookup is a CONSUMER.INFO request: its answer is the fresh info.
                    let Ok(handle) = bus
                        .jetstream()
                        .get_consumer_from_stream::<bus::jetstream::consumer::pull::Config, _, _>(&consumer.durable, &consumer.stream)
                        .await
                    else {
                        continue;
                    };
                    let info = handle.cached_info();
                    let labels = [("stream", consumer.stream.clone()), ("consumer", consumer.durable.clone())];
                    metrics::gauge!("crm_consumer_pending_messages", &labels).set(info.num_pending as f64);
                    metrics::gauge!("crm_consumer_ack_pending_messages", &labels).set(info.num_ack_pending as f64);
                }
            }
        }
    }
}

/// The directory of a `sqlite://path?…` URL, so it can be created before connecting.
fn sqlite_dir(url: &str) -> Option<std::path::PathBuf> {
    let path = url.strip_prefix("sqlite://")?.split('?').next()?;
    let dir = std::path::Path::new(path).parent()?;
    (!dir.as_os_str().is_empty()).then(|| dir.to_path_buf())
}

/// A running set of roles.
#[derive(Debug)]
pub struct Running {
    /// Where the gateway listens, when it runs.
    pub gateway_addr: Option<std::net::SocketAddr>,
    pub admin_addr: std::net::SocketAddr,
    pub readiness: Readiness,
    shutdown: CancellationToken,
    tasks: tokio::task::JoinSet<Result<()>>,
    admin: tokio::task::JoinHandle<std::io::Result<()>>,
    /// Dropped last: their threads stop once the gateway and the priority workers have drained.
    gateway_runtime: Option<OwnRuntime>,
    priority_runtime: Option<OwnRuntime>,
}

/// Connect, provision, open the store and start `roles` in the background.
pub async fn start(config: &Config, roles: Roles, process_name: &str) -> Result<Running> {
    if roles.notifier {
        // A bad subscription stops the start with its path, before anything connects.
        config.notifier.validate()?;
    }
    let handle = telemetry::install_recorder().map_err(anyhow::Error::msg)?;
    let readiness = Readiness::default();
    readiness.set("nats", false);
    readiness.set("streams", false);
    // Not ready until every role is up: the admin endpoint answers before the gateway listens,
    // and a client that trusted /readyz then would find no gateway.
    readiness.set("roles", false);
    let shutdown = CancellationToken::new();

    let bus = Bus::connect(&config.nats.options(process_name)).await?;
    // Each role gets a connection of its own: one connection is one socket and one task doing
    // its I/O, and a busy gateway must not make the router's deliveries and acks queue behind its
    // publishes (nor the other way round).
    let several = [
        roles.gateway,
        roles.router,
        roles.projector,
        roles.analytics,
        roles.notifier,
    ]
    .into_iter()
    .filter(|running| *running)
    .count()
        > 1;
    let role_bus = |role: &'static str| {
        let (bus, options) = (
            bus.clone(),
            config.nats.options(&format!("{process_name}-{role}")),
        );
        async move {
            if several {
                Bus::connect(&options).await
            } else {
                Ok(bus)
            }
        }
    };
    readiness.set("nats", true);
    let definitions = Definitions::embedded()?;
    // Create what is missing and check the contract of what exists; an operator's settings
    // (sizes, replicas, ack waits) are theirs. Only `crm provision` changes an existing object.
    let report = bus.ensure(&definitions).await.context(
        "checking the streams and consumers (a role with least-privilege credentials may \
             not create them: run `crm provision` as the operator first)",
    )?;
    for change in report
        .changes
        .iter()
        .filter(|c| c.action != bus::Action::Unchanged)
    {
        tracing::info!(%change, "provisioned");
    }
    readiness.set("streams", true);

    let (admin_addr, admin) = telemetry::serve_admin(
        config.admin.listen,
        telemetry::admin_router(handle, readiness.clone(), {
            let (liveness, stall_after) = (bus.liveness().clone(), config.admin.stall_after);
            std::sync::Arc::new(move || liveness.stalled(std::time::Instant::now(), stall_after))
        }),
        shutdown.clone().cancelled_owned(),
    )
    .await
    .with_context(|| format!("binding the admin endpoint {}", config.admin.listen))?;
    tracing::info!(%admin_addr, "admin endpoints: /metrics /healthz /readyz");
    tokio::spawn(watch_connection(
        bus.clone(),
        readiness.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(watch_consumers(bus.clone(), shutdown.clone()));
    tokio::spawn(bus::watch_streams(
        bus.clone(),
        definitions.stream_names(),
        Duration::from_secs(5),
        shutdown.clone(),
    ));

    let store = if roles.gateway || roles.router || roles.projector || roles.analytics {
        if let Some(dir) = sqlite_dir(&config.store.url) {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Some(Store::connect_with(&config.store.options()).await?)
    } else {
        None
    };

    let mut tasks = tokio::task::JoinSet::new();
    if roles.gateway {
        audit_api_keys(&bus, &config.gateway.api_keys).await;
    }
    let mut gateway_addr = None;
    // Beside other roles, the gateway runs on a runtime (thread) of its own: a thousand busy HTTP
    // connections are a thousand tasks, and on one shared runtime they would leave the router,
    // one task among them, a sliver of the CPU while ingest outruns processing. As threads, the
    // operating system shares the cores between serving and processing.
    let gateway_runtime = if roles.gateway && several {
        Some(OwnRuntime::new("crm-gateway", 1).context("starting the gateway's runtime")?)
    } else {
        None
    };
    // The gateway's priority door and connection, the router's priority ingest and the
    // projector's critical lane run on a runtime of their own, at the default priority while the
    // main runtime's threads run bulk work lowered (see `crate::sched`): their tasks never wait
    // for a thread behind bulk tasks.
    let priority_runtime = if roles.router || roles.projector || roles.gateway {
        Some(OwnRuntime::new("crm-priority", 1).context("starting the priority runtime")?)
    } else {
        None
    };
    let priority_handle = priority_runtime
        .as_ref()
        .and_then(OwnRuntime::handle)
        .cloned()
        .unwrap_or_else(tokio::runtime::Handle::current);
    // One rule set for the gateway (content rules: an event's admission class) and the router
    // (its lane, with customer context); a reload reaches both.
    let rules = match &config.router.rules_file {
        Some(path) if path.exists() => {
            let rules = router::RulesHandle::load(path).map_err(anyhow::Error::msg)?;
            tokio::spawn(router::watch_rules(
                rules.clone(),
                path.clone(),
                Duration::from_secs(1),
                Some((bus.clone(), bus::control::instance_id(process_name))),
                shutdown.clone(),
            ));
            rules
        }
        Some(path) => anyhow::bail!("routing rules file {} not found", path.display()),
        None => router::RulesHandle::new(routing::Rules::default()),
    };
    if roles.gateway {
        let gateway_rules: gateway::RulesSource = {
            let rules = rules.clone();
            Arc::new(move || rules.current())
        };
        let reads: Option<Arc<dyn gateway::ReadModel>> = store
            .clone()
            .map(|s| Arc::new(StoreReads(s)) as Arc<dyn gateway::ReadModel>);
        let (gateway_config, stop) = (config.gateway.clone(), shutdown.clone().cancelled_owned());
        let connect = role_bus("gateway");
        let priority = priority_handle.clone();
        let serve = async move {
            // Connected here, so that the connection's I/O task runs where the gateway does.
            let bus = connect.await?;
            let serving =
                gateway::serve_placed(&gateway_config, bus, gateway_rules, reads, &priority, stop)
                    .await?;
            anyhow::Ok((serving.addr, serving.task))
        };
        let (addr, server) = match gateway_runtime.as_ref().and_then(OwnRuntime::handle) {
            Some(runtime) => runtime
                .spawn(serve)
                .await
                .context("starting the gateway")??,
            None => serve.await?,
        };
        gateway_addr = Some(addr);
        tasks.spawn(async move { server.await?.map_err(anyhow::Error::from) });
    }
    if roles.router {
        // The router owns CRM_INGEST's consumption, so it keeps the stream trimmed: processed
        // events beyond the replay window go, unprocessed ones never.
        config
            .retention
            .validate()
            .context("[retention] is invalid")?;
        tokio::spawn(bus::run_ingest_retention(
            bus.clone(),
            config.retention.clone(),
            shutdown.clone(),
        ));
        let context = store.clone().map(|s| {
            Arc::new(CachedContext(ContextCache::new(
                s,
                config.cache.max_customers,
                config.cache.ttl,
            ))) as Arc<dyn router::ContextLookup>
        });
        let (bus, router_config, shutdown) = (
            role_bus("router").await?,
            config.router.clone(),
            shutdown.clone(),
        );
        let priority = priority_handle.clone();
        tasks.spawn(async move {
            Ok(router::run_placed(bus, router_config, rules, context, &priority, shutdown).await?)
        });
    }
    if roles.projector {
        let store = store.clone().context("the projector needs a store")?;
        // Idempotency holds for as long as the ledgers keep a row; the projector prunes them.
        tokio::spawn(store::run_ledger_pruner(
            store.clone(),
            config.store.ledger_retention,
            LEDGER_PRUNE_EVERY,
            shutdown.clone(),
        ));
        let (bus, projector_config, shutdown) = (
            role_bus("projector").await?,
            config.projector.clone(),
            shutdown.clone(),
        );
        let priority = priority_handle.clone();
        tasks.spawn(async move {
            Ok(projector::run_placed(bus, store, projector_config, &priority, shutdown).await?)
        });
    }
    if roles.analytics {
        let store = store.clone().context("analytics needs a store")?;
        let (bus, analytics_config, shutdown) = (
            role_bus("analytics").await?,
            config.analytics.clone(),
            shutdown.clone(),
        );
        tasks.spawn(
            async move { Ok(analytics::run(bus, store, analytics_config, shutdown).await?) },
        );
    }
    if roles.notifier {
        let (bus, notifier_config, shutdown) = (
            role_bus("notifier").await?,
            config.notifier.clone(),
            shutdown.clone(),
        );
        tasks.spawn(async move { Ok(notifier::run(bus, notifier_config, shutdown).await?) });
    }
    readiness.set("roles", true);
    Ok(Running {
        gateway_addr,
        admin_addr,
        readiness,
        shutdown,
        tasks,
        admin,
        gateway_runtime,
        priority_runtime,
    })
}

impl Running {
    /// Run until `stop` resolves or a role fails; then stop taking work, finish what is in
    /// flight and return.
    pub async fn run_until(mut self, stop: impl std::future::Future<Output = ()>) -> Result<()> {
        let mut result = Ok(());
        tokio::select! {
            _ = stop => tracing::info!("shutting down: finishing in-flight work"),
            Some(done) = self.tasks.join_next() => {
                result = done.context("a role panicked").and_then(|r| r);
                if let Err(err) = &result {
                    tracing::error!(error = %format!("{err:#}"), "a role failed; stopping");
                }
            }
        }
        self.shutdown.cancel();
        while let Some(done) = self.tasks.join_next().await {
            if let Ok(Err(err)) = done {
                tracing::warn!(error = %format!("{err:#}"), "role stopped with an error");
            }
        }
        let _ = self.admin.await;
        drop(self.gateway_runtime.take());
        drop(self.priority_runtime.take());
        tracing::info!("stopped");
        result
    }
}

/// Run `roles` until SIGTERM / Ctrl-C.
pub async fn run(config: Config, roles: Roles, process_name: &str) -> Result<()> {
    start(&config, roles, process_name)
        .await?
        .run_until(termination())
        .await
}

/// Audit the gateway's API keys when they differ from the last recorded set: keys live in the
/// configuration, so a change shows at the first start after it. A key is recorded by its tenant
/// and the first 12 hex digits of its hash, never the key. A failure to record is logged; it does
/// not stop the gateway.
async fn audit_api_keys(bus: &bus::Bus, keys: &[gateway::ApiKey]) {
    let set = keys
        .iter()
        .map(|key| {
            serde_json::json!({
                "tenant": key.tenant,
                "sha256_prefix": key.sha256.get(..12).unwrap_or(&key.sha256),
            })
        })
        .collect();
    let actor = format!("gateway ({})", bus::audit::actor());
    match bus
        .audit_set_change(&actor, "api_keys", "[gateway] api_keys", set)
        .await
    {
        Ok(true) => tracing::info!("API keys changed since the last recorded set; audited"),
        Ok(false) => {}
        Err(err) => tracing::warn!(%err, "could not audit the API key set"),
    }
}
