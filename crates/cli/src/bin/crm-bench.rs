//! `crm-bench`: router and projector throughput beside raw JetStream publish and pull-consume on
//! the same server, in the same run. `make bench` starts a throwaway nats-server for it (and a
//! throwaway PostgreSQL database when one is reachable). The projector runs once per store over
//! the same lane backlog: SQLite with `synchronous=FULL` (the default) and `NORMAL`, and
//! PostgreSQL when `--postgres-url` names an empty database.

/// Many small, short-lived allocations per event: mimalloc handles them with less contention.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use bus::{Bus, ConnectOptions};
use clap::Parser;
use cli::{
    config::Config,
    roles::{self, Roles},
};
use events::EventType;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(about = "Throughput of the router and projector against raw JetStream on one server")]
struct Args {
    #[arg(long, env = "CRM_NATS_URL", default_value = "nats://127.0.0.1:14333")]
    nats_url: String,
    /// Events per phase.
    #[arg(long, default_value_t = 50_000)]
    events: usize,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// An empty PostgreSQL database to run the projector against as well (its tables are
    /// created; the bench expects nothing in them).
    #[arg(long, env = "CRM_BENCH_POSTGRES_URL")]
    postgres_url: Option<String>,
}

fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !done().await? {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

async fn stream_messages(bus: &Bus, stream: &str) -> Result<u64> {
    Ok(bus
        .jetstream()
        .get_stream(stream)
        .await?
        .get_info()
        .await?
        .state
        .messages)
}

/// Start `roles` alone, time how long until `done` holds, stop them: `n` events over that time.
async fn time_role(
    config: &Config,
    roles: Roles,
    name: &str,
    n: usize,
    done: impl AsyncFnMut() -> Result<bool>,
) -> Result<f64> {
    let running = roles::start(config, roles, name).await?;
    let started = Instant::now();
    wait_for(name, done).await?;
    let rate = rate(n, started.elapsed());
    running.run_until(async {}).await?;
    Ok(rate)
}

/// Start the projector over the whole lane backlog again: its consumers are deleted and
/// provisioned anew, and a new consumer delivers from the first message (the notifier consumers,
/// which never run here, keep every lane message in the interest streams).
async fn rewind_projector(bus: &Bus) -> Result<()> {
    for lane in events::Lane::ALL {
        let stream = bus.jetstream().get_stream(lane.stream()).await?;
        // A consumer that is not there yet is what we want anyway.
        let _ = stream.delete_consumer("projector").await;
    }
    bus.provision(&bus::Definitions::embedded()?).await?;
    Ok(())
}

/// The projector alone over the lane backlog into a fresh store at `store`: events per second.
async fn time_projector(
    bus: &Bus,
    config: &Config,
    store: cli::config::StoreConfig,
    name: &str,
    n: usize,
) -> Result<f64> {
    rewind_projector(bus).await?;
    let mut config = config.clone();
    config.store = store;
    let store = store::Store::connect_with(&config.store.options()).await?;
    anyhow::ensure!(
        store.processed_count().await? == 0,
        "the {name} store is not empty"
    );
    time_role(
        &config,
        Roles {
            projector: true,
            ..Roles::default()
        },
        name,
        n,
        async || Ok(store.processed_count().await? as usize >= n),
    )
    .await
}

/// Messages stored in the three lane streams together.
async fn lane_total(bus: &Bus) -> Result<u64> {
    let mut total = 0;
    for lane in events::Lane::ALL {
        total += stream_messages(bus, lane.stream()).await?;
    }
    Ok(total)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let n = args.events;
    let bus = Bus::connect(&ConnectOptions::new(&args.nats_url).name("crm-bench")).await?;
    bus.provision(&bus::Definitions::embedded()?).await?;

    // The same mix the load harness uses: 10% critical, 10% high-value deals, the rest standard.
    let events: Vec<events::Event> = (0..n)
        .map(|i| {
            let kind = match i % 10 {
                0 => EventType::PaymentFailed,
                1 => EventType::DealWon,
                2 => EventType::ContactUpdated,
                _ => EventType::PageViewed,
            };
            events::sample::event(kind, "bench", &format!("customer-{}", i % 1000))
        })
        .collect();
    let encoded: Vec<(String, String, bytes::Bytes)> = events
        .iter()
        .map(|e| {
            let kind = EventType::of(e).unwrap_or(EventType::PageViewed);
            let subject = events::ingest_subject(&e.tenant_id, kind).unwrap_or_default();
            (subject, e.event_id.clone(), events::encode_proto(e).into())
        })
        .collect();

    // Raw baseline: a plain stream, same payloads, no pipeline.
    let payloads: Vec<bytes::Bytes> = encoded.iter().map(|(_, _, p)| p.clone()).collect();
    let raw = bus.raw_rates("BENCH_RAW", "bench.raw", &payloads).await?;
    let (raw_publish, raw_consume) = (raw.publish_per_s, raw.consume_per_s);

    // Ingest: the same events to CRM_INGEST (what the gateway does after validation).
    let ingest_before = stream_messages(&bus, "CRM_INGEST").await?;
    let started = Instant::now();
    bus.publish_pipelined(&encoded, bus::raw::PIPELINE_WINDOW)
        .await?;
    let ingest_publish = rate(n, started.elapsed());

    let db = tempfile::tempdir()?;
    let mut config = Config::default();
    config.nats.url = args.nats_url.clone();
    config.store.url = format!("sqlite://{}?mode=rwc", db.path().join("bench.db").display());
    config.admin.listen = "127.0.0.1:0".parse()?;

    // Router alone over the ingest backlog.
    let lanes_before = lane_total(&bus).await?;
    let router = time_role(
        &config,
        Roles {
            router: true,
            ..Roles::default()
        },
        "bench-router",
        n,
        async || Ok(lane_total(&bus).await? - lanes_before >= n as u64),
    )
    .await?;

    // Projector alone over the same lane backlog, once per store (batched transactions).
    let sqlite = |file: &str, sqlite_synchronous| cli::config::StoreConfig {
        url: format!("sqlite://{}?mode=rwc", db.path().join(file).display()),
        sqlite_synchronous,
        ..config.store.clone()
    };
    let projector_full = time_projector(
        &bus,
        &config,
        sqlite("full.db", store::SqliteSynchronous::Full),
        "bench-projector-sqlite-full",
        n,
    )
    .await?;
    let projector_normal = time_projector(
        &bus,
        &config,
        sqlite("normal.db", store::SqliteSynchronous::Normal),
        "bench-projector-sqlite-normal",
        n,
    )
    .await?;
    let projector_postgres = match &args.postgres_url {
        Some(url) => Some(
            time_projector(
                &bus,
                &config,
                cli::config::StoreConfig {
                    url: url.clone(),
                    ..config.store.clone()
                },
                "bench-projector-postgres",
                n,
            )
            .await?,
        ),
        None => None,
    };
    let projector = projector_full;

    let results = serde_json::json!({
        "events": n,
        "ingest_stream_before": ingest_before,
        "raw_publish_per_s": raw_publish.round(),
        "raw_consume_per_s": raw_consume.round(),
        "ingest_publish_per_s": ingest_publish.round(),
        "router_per_s": router.round(),
        "projector_sqlite_full_per_s": projector_full.round(),
        "projector_sqlite_normal_per_s": projector_normal.round(),
        "projector_postgres_per_s": projector_postgres.map(f64::round),
        "router_vs_raw_consume": (router / raw_consume * 100.0).round() / 100.0,
        "projector_vs_raw_consume": (projector / raw_consume * 100.0).round() / 100.0,
    });
    println!("| phase | events/s | ÷ raw consume |");
    println!("|---|---|---|");
    println!("| raw JetStream async publish | {raw_publish:.0} | |");
    println!("| raw JetStream pull-consume + ack | {raw_consume:.0} | 1.00 |");
    println!("| ingest publish (protobuf events) | {ingest_publish:.0} | |");
    println!(
        "| router (decode, validate, classify, lane publish, ack) | {router:.0} | {:.2} |",
        router / raw_consume
    );
    println!(
        "| projector (SQLite WAL, synchronous=FULL, batched) | {projector_full:.0} | {:.2} |",
        projector_full / raw_consume
    );
    println!(
        "| projector (SQLite WAL, synchronous=NORMAL, batched) | {projector_normal:.0} | {:.2} |",
        projector_normal / raw_consume
    );
    match projector_postgres {
        Some(rate) => println!(
            "| projector (PostgreSQL, batched) | {rate:.0} | {:.2} |",
            rate / raw_consume
        ),
        None => println!("| projector (PostgreSQL) | not run: no --postgres-url | |"),
    }
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    }
    Ok(())
}
