//! The HTTP ingest gateway: authenticates producers, decodes and validates events, publishes them
//! to `crm.ingest.<tenant>.<type>` and answers 202 only after JetStream has stored them.
//!
//! Cross-cutting concerns are tower layers around the axum router (outermost first): metrics,
//! load shedding over a global concurrency limit, the body limit, and bearer-key auth on `/v1`.

mod admission;
mod auth;
mod config;
mod ingest;
mod observe;
mod problem;
mod reads;
mod state;
mod tls;

pub use admission::{
    ADMISSION_SUBJECT, AdmissionConfig, AdmissionReport, BulkController, Class, Congestion, Door,
    PipelineReading,
};
pub use config::{
    ApiKey, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_INFLIGHT, DEFAULT_PUBLISH_TIMEOUT, GatewayConfig,
    hash_key,
};
pub use ingest::MAX_BATCH_EVENTS;
pub use reads::{AnalyticsQuery, ReadModel};
pub use state::GatewayState;

use axum::{
    Extension, Router,
    error_handling::HandleErrorLayer,
    extract::DefaultBodyLimit,
    http::header::CONTENT_TYPE,
    middleware,
    routing::{get, post},
    serve::ListenerExt,
};
use bus::Bus;
use problem::Problem;
use std::{future::Future, net::SocketAddr, sync::Arc};
use tokio::{net::TcpListener, task::JoinHandle};
use tower::{ServiceBuilder, limit::GlobalConcurrencyLimitLayer, load_shed::LoadShedLayer};

/// Route templates; they double as the bounded `route` metric label.
pub mod routes {
    pub const EVENTS: &str = "/v1/events";
    pub const EVENTS_BATCH: &str = "/v1/events:batch";
    pub const CUSTOMER: &str = "/v1/customers/{id}";
    pub const ANALYTICS_SUMMARY: &str = "/v1/analytics/summary";
    pub const ANALYTICS_EVENTS_PER_MINUTE: &str = "/v1/analytics/events-per-minute";
    pub const OPENAPI: &str = "/openapi.json";

    /// Every route, each its own `route` label (anything else is `other`).
    pub const ALL: &[&str] = &[
        EVENTS,
        EVENTS_BATCH,
        CUSTOMER,
        ANALYTICS_SUMMARY,
        ANALYTICS_EVENTS_PER_MINUTE,
        OPENAPI,
    ];
}

/// The routing rules in force, read on every classification (so a reload applies at once).
pub type RulesSource = Arc<dyn Fn() -> Arc<routing::Rules> + Send + Sync>;

/// The built-in routing rules, for a gateway without a rules file.
pub fn default_rules() -> RulesSource {
    let rules = Arc::new(routing::Rules::default());
    Arc::new(move || rules.clone())
}

/// The OpenAPI 3.1 description of this API, served at `/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// Why the gateway could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("gateway.api_keys[{index}]: {reason}")]
    InvalidApiKey { index: usize, reason: String },
    #[error("gateway.{field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("binding the gateway listener on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving HTTP")]
    Serve(#[source] std::io::Error),
    #[error("a task of the gateway failed (panicked, or its runtime stopped)")]
    Runtime(#[source] tokio::task::JoinError),
    #[error("the gateway's {door} door stopped serving before shutdown")]
    DoorStopped { door: &'static str },
    #[error("connecting the priority path to NATS")]
    Bus(#[source] bus::BusError),
}

/// The gateway's routes with all of its layers (the main door).
pub fn router(state: GatewayState) -> Router {
    // Added before `route_layer` so that auth also guards these routes' 405 answers.
    let v1 = Router::new()
        .route(routes::EVENTS, post(ingest::single))
        .route(routes::EVENTS_BATCH, post(ingest::batch))
        .route(routes::CUSTOMER, get(reads::customer))
        .route(routes::ANALYTICS_SUMMARY, get(reads::analytics_summary))
        .route(
            routes::ANALYTICS_EVENTS_PER_MINUTE,
            get(reads::analytics_events_per_minute),
        )
        .method_not_allowed_fallback(problem::method_not_allowed)
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            admission::reads_budget,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    let app = Router::new().merge(v1).route(
        routes::OPENAPI,
        get(|| async { ([(CONTENT_TYPE, "application/json")], OPENAPI_JSON) }),
    );
    // One semaphore for every route (`ConcurrencyLimitLayer` would give each route its own),
    // sized for bulk and reads plus the class budgets: it guards memory, while admission by
    // class decides who waits (a critical event is never refused for bulk's sake).
    let limit = state.request_limit();
    with_layers(app, state, Door::Main, limit)
}

/// The priority door's routes: posting events only, critical and high ones (a bulk event is
/// answered 421), guarded by the class budgets alone.
pub fn priority_router(state: GatewayState) -> Router {
    let v1 = Router::new()
        .route(routes::EVENTS, post(ingest::single))
        .route(routes::EVENTS_BATCH, post(ingest::batch))
        .method_not_allowed_fallback(problem::method_not_allowed)
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    let limit = state.priority_request_limit();
    with_layers(v1, state, Door::Priority, limit)
}

/// The layers every door has (outermost first): which door the request came in by, metrics,
/// load shedding over `limit` requests, the body limit.
fn with_layers(app: Router<GatewayState>, state: GatewayState, door: Door, limit: usize) -> Router {
    let shedding = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(observe::shed))
        .layer(LoadShedLayer::new())
        .layer(GlobalConcurrencyLimitLayer::new(limit));
    app.method_not_allowed_fallback(problem::method_not_allowed)
        .fallback(|| async { Problem::not_found("no such route") })
        .layer(DefaultBodyLimit::max(state.max_body_bytes()))
        .layer(shedding)
        .layer(middleware::from_fn(observe::track))
        // Outermost, so that every layer (the metrics too) knows the door.
        .layer(Extension(door))
        .with_state(state)
}

/// A serving gateway: where its doors listen and the task that serves them.
#[derive(Debug)]
pub struct Serving {
    /// The main door (`gateway.listen`).
    pub addr: SocketAddr,
    /// The priority door (`gateway.priority_listen`), when configured.
    pub priority_addr: Option<SocketAddr>,
    /// Ends when both doors have drained after the shutdown signal.
    pub task: JoinHandle<Result<(), GatewayError>>,
}

/// [`serve_placed`] with the priority door and connection on the current runtime.
pub async fn serve(
    config: &GatewayConfig,
    bus: Bus,
    rules: RulesSource,
    reads: Option<Arc<dyn ReadModel>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Serving, GatewayError> {
    let here = tokio::runtime::Handle::current();
    serve_placed(config, bus, rules, reads, &here, shutdown).await
}

/// Bind `config.listen` (port 0 picks a free port) and serve until `shutdown` resolves, then
/// drain in-flight requests. Critical and high events get a NATS connection of their own, opened
/// on `priority` (a runtime whose thread bulk work does not use), and, with
/// `config.priority_listen`, a door of their own served there too. Runs the admission controller
/// (health reports in, [`AdmissionReport`]s out).
pub async fn serve_placed(
    config: &GatewayConfig,
    bus: Bus,
    rules: RulesSource,
    reads: Option<Arc<dyn ReadModel>>,
    priority: &tokio::runtime::Handle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Serving, GatewayError> {
    // Connected on `priority`, so that its PubAcks are read by a thread bulk requests keep busy
    // no more than the rest of the priority path.
    let priority_bus = {
        let bus = bus.clone();
        priority
            .spawn(async move { bus.connect_another("priority").await })
            .await
            .map_err(GatewayError::Runtime)?
            .map_err(GatewayError::Bus)?
    };
    let state = GatewayState::new(bus, priority_bus, rules, config, reads)?;
    let tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
        (None, None) => None,
        _ => {
            return Err(GatewayError::InvalidConfig {
                field: "tls_cert_file",
                reason: "tls_cert_file and tls_key_file go together".into(),
            });
        }
    };
    // Both doors are bound before anything is spawned: a start that fails leaves nothing running.
    let (listener, addr) = bind(config.listen).await?;
    let priority_listener = match config.priority_listen {
        None => None,
        Some(listen) => Some(
            priority
                .spawn(bind(listen))
                .await
                .map_err(GatewayError::Runtime)??,
        ),
    };
    let stop = bus::CancellationToken::new();
    let stop_control = bus::CancellationToken::new();
    let control = tokio::spawn(admission::run_control(state.clone(), stop_control.clone()));
    tracing::info!(%addr, "gateway listening");
    let mut main = match &tls {
        Some(acceptor) => tokio::spawn(serve_door(
            tls::TlsListener::new(listener, addr, acceptor.clone()),
            router(state.clone()),
            stop.clone(),
        )),
        None => tokio::spawn(serve_door(listener, router(state.clone()), stop.clone())),
    };
    let priority_addr = priority_listener.as_ref().map(|(_, addr)| *addr);
    let mut door = priority_listener.map(|(listener, addr)| {
        tracing::info!(%addr, "gateway priority door listening");
        let (app, stop) = (priority_router(state), stop.clone());
        match tls {
            // Made on the priority runtime: its accept loop and handshakes run there.
            Some(acceptor) => priority.spawn(async move {
                serve_door(tls::TlsListener::new(listener, addr, acceptor), app, stop).await
            }),
            None => priority.spawn(serve_door(listener, app, stop)),
        }
    });
    let task = tokio::spawn(async move {
        // Dropping or aborting this task stops both doors and the controller too.
        let _stop_doors = stop.clone().drop_guard();
        let _stop_control = stop_control.clone().drop_guard();
        let shutdown = std::pin::pin!(shutdown);
        // A door that ends before the shutdown signal (it panicked, or its runtime went away)
        // ends the gateway, so the process notices a failing role instead of half serving.
        let early = tokio::select! {
            () = shutdown => None,
            served = &mut main => Some((Door::Main, served)),
            served = async {
                match door.as_mut() {
                    Some(door) => door.await,
                    None => std::future::pending().await,
                }
            } => Some((Door::Priority, served)),
        };
        stop.cancel();
        let joined = |served: Result<std::io::Result<()>, tokio::task::JoinError>| {
            served
                .map_err(GatewayError::Runtime)?
                .map_err(GatewayError::Serve)
        };
        let served = match early {
            None => {
                let mut served = joined(main.await);
                if let Some(door) = door {
                    served = served.and(joined(door.await));
                }
                served
            }
            Some((stopped, served)) => {
                tracing::error!(
                    door = stopped.as_str(),
                    "a gateway door stopped before shutdown"
                );
                let other = if stopped == Door::Main {
                    match door {
                        Some(door) => joined(door.await),
                        None => Ok(()),
                    }
                } else {
                    joined(main.await)
                };
                joined(served)
                    .and(other)
                    .and(Err(GatewayError::DoorStopped {
                        door: stopped.as_str(),
                    }))
            }
        };
        stop_control.cancel();
        let _ = control.await;
        served
    });
    Ok(Serving {
        addr,
        priority_addr,
        task,
    })
}

/// Serve `app` on `listener` until `stop`, then drain.
async fn serve_door<L>(
    listener: L,
    app: axum::Router,
    stop: bus::CancellationToken,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

/// Bind `listen` on the current runtime, with `TCP_NODELAY` on every accepted connection.
async fn bind(
    listen: SocketAddr,
) -> Result<
    (
        impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = SocketAddr>,
        SocketAddr,
    ),
    GatewayError,
> {
    let bind_error = |source| GatewayError::Bind {
        addr: listen,
        source,
    };
    let listener = TcpListener::bind(listen).await.map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    // Small request/response pairs: Nagle plus delayed ACKs would add tens of milliseconds.
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "could not set TCP_NODELAY");
        }
    });
    Ok((listener, addr))
}
