//! `crm`: runs the platform's roles and operates it (provisioning, publishing, dead letters, replay).

/// Many small, short-lived allocations per event: mimalloc handles them with less contention.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result};
use bus::{AuditRecord, Bus, Definitions, PublishOptions, jetstream::consumer::DeliverPolicy};
use clap::{Parser, Subcommand};
use cli::{
    config::Config,
    roles::{self, Roles},
};
use events::EventType;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "crm",
    version,
    about = "crm-events: real-time CRM events on NATS JetStream"
)]
struct Cli {
    /// Configuration file (CRM_<SECTION>__<KEY> variables override it).
    #[arg(long, env = "CRM_CONFIG", default_value = "crm.toml", global = true)]
    config: PathBuf,
    /// NATS server URL(s); overrides [nats].url.
    #[arg(long, env = "CRM_NATS_URL", global = true)]
    nats_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every role in one process (the embedded default).
    All,
    /// HTTP ingest and profile reads.
    Gateway,
    /// CRM_INGEST → priority lanes.
    Router,
    /// Lanes → customer profiles in the store.
    Projector,
    /// CRM_INGEST → analytics aggregates, paced by the adaptive throttler.
    Analytics,
    /// Lanes → signed webhooks.
    Notifier,
    /// Create or update the streams and consumers (idempotent; refuses destructive changes).
    Provision {
        /// Read definitions from this directory instead of the ones built in.
        #[arg(long)]
        definitions: Option<PathBuf>,
        /// Copies of every stream: 3 (or 5) on a JetStream cluster, so that an acked event
        /// survives the loss of a node. Unset: what the definitions say (1).
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=5))]
        replicas: Option<u8>,
    },
    /// Publish a sample event straight to NATS ingest and print the ack.
    Publish {
        /// Event type, e.g. deal_won, payment_failed.
        #[arg(long, default_value = "contact_created", value_parser = parse_event_type)]
        r#type: EventType,
        #[arg(long, default_value = "demo")]
        tenant: String,
        #[arg(long, default_value = "customer-1")]
        customer: String,
    },
    /// Dead letters.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Re-drive events of a stream into ingest (effects stay exactly-once: events keep their ids).
    Replay {
        #[arg(long, default_value = "CRM_INGEST")]
        stream: String,
        /// First stream sequence to replay.
        #[arg(long, conflicts_with = "from_time")]
        from_seq: Option<u64>,
        /// RFC 3339 time to replay from.
        #[arg(long)]
        from_time: Option<String>,
        /// At most this many events.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Lanes (backlog, rate, p99), the throttle, deferred analytics and dead letters.
    Status {
        /// How long to listen for the roles' health reports and throttle decisions.
        #[arg(long, default_value = "2500ms", value_parser = humantime_duration)]
        listen: std::time::Duration,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Print the SHA-256 of an API key, for [gateway].api_keys.
    HashKey { key: String },
    /// Make an NKey per identity of nats/secure/accounts.conf (gateway, router, projector,
    /// notifier, analytics, operator, lane_reader, producer): `<name>.nk` seeds for the roles' `[nats]
    /// nkey_file`, and nkeys.env (`CRM_NKEY_<NAME>=U…`) for the server's environment.
    Nkeys {
        /// Where the seeds and nkeys.env go (created; existing keys are never replaced).
        #[arg(long)]
        out: PathBuf,
    },
    /// Operator actions and configuration changes: who, what, when, result (JSON lines, oldest
    /// first).
    Audit {
        /// Only this action (dlq_replay, dlq_purge, replay, provision, rules_reload).
        #[arg(long)]
        action: Option<String>,
        /// The newest this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Ask the role running with this configuration whether it is live (`/healthz` on
    /// [admin].listen) or, with --ready, ready (`/readyz`); exits 1 if not (container health
    /// checks).
    Health {
        #[arg(long)]
        ready: bool,
        #[arg(long, default_value = "2s", value_parser = humantime_duration)]
        timeout: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List dead letters (JSON lines).
    List {
        #[arg(long, default_value_t = 1)]
        from_seq: u64,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One dead letter with its payload (JSON if it decodes).
    Show { seq: u64 },
    /// Re-drive dead letters into ingest, as they were or with a fixed event.
    Replay {
        /// The dead letter to replay.
        #[arg(long, required_unless_present = "all")]
        seq: Option<u64>,
        /// Replay every dead letter.
        #[arg(long, conflicts_with_all = ["seq", "event"])]
        all: bool,
        /// A fixed event (proto3 JSON file) to send instead of the stored payload.
        #[arg(long, requires = "seq")]
        event: Option<PathBuf>,
    },
    /// Delete dead letters (all, or of one stage).
    Purge {
        #[arg(long)]
        stage: Option<String>,
    },
}

fn humantime_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime_serde::re::humantime::parse_duration(text).map_err(|err| err.to_string())
}

fn parse_event_type(name: &str) -> Result<EventType, String> {
    EventType::from_name(name).ok_or_else(|| {
        let names: Vec<_> = EventType::ALL.iter().map(|k| k.as_str()).collect();
        format!("unknown event type {name:?}; one of {}", names.join(", "))
    })
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The roles log their lifecycle at info; one-shot commands print their answer and only warn.
    let role = matches!(
        cli.command,
        Command::All
            | Command::Gateway
            | Command::Router
            | Command::Projector
            | Command::Analytics
            | Command::Notifier
    );
    // A role's spans are exported when OTEL_EXPORTER_OTLP_ENDPOINT is set; the guard flushes
    // them when main returns.
    let _traces = if role {
        let service = format!("crm-{}", role_name(&cli.command));
        Some(telemetry::init_tracing_as(&service, "info"))
    } else {
        telemetry::init_tracing_at("warn");
        None
    };
    let exit = |err: anyhow::Error| {
        eprintln!("error: {err:#}");
        std::process::ExitCode::FAILURE
    };
    let config = match load_config(&cli) {
        Ok(config) => config,
        Err(err) => return exit(err),
    };
    // A role that processes events runs its bulk work at a lower priority than its priority
    // path (see `cli::sched`); the gateway alone is all front door.
    let bulk_nice = if role && !matches!(cli.command, Command::Gateway) {
        config.runtime.bulk_nice
    } else {
        0
    };
    let runtime = match cli::sched::bulk_runtime(bulk_nice) {
        Ok(runtime) => runtime,
        Err(err) => return exit(anyhow::Error::new(err).context("starting the runtime")),
    };
    match runtime.block_on(run(cli, config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => exit(err),
    }
}

/// The role a command runs, for the service name of its spans.
fn role_name(command: &Command) -> &'static str {
    match command {
        Command::Gateway => "gateway",
        Command::Router => "router",
        Command::Projector => "projector",
        Command::Analytics => "analytics",
        Command::Notifier => "notifier",
        _ => "all",
    }
}

fn load_config(cli: &Cli) -> Result<Config> {
    let named = std::env::var_os("CRM_CONFIG").is_some()
        || cli.config.as_path() != std::path::Path::new("crm.toml");
    let mut config = Config::load(&cli.config, named)?;
    if let Some(url) = &cli.nats_url {
        config.nats.url.clone_from(url);
    }
    config.runtime.validate()?;
    Ok(config)
}

async fn run(cli: Cli, config: Config) -> Result<()> {
    let connect = |name: &str| {
        let options = config.nats.options(name);
        async move { Bus::connect(&options).await.map_err(anyhow::Error::from) }
    };
    match cli.command {
        Command::All => roles::run(config, Roles::ALL, "crm-all").await?,
        Command::Gateway => roles::run(config, Roles::GATEWAY, "crm-gateway").await?,
        Command::Router => roles::run(config, Roles::ROUTER, "crm-router").await?,
        Command::Projector => {
            roles::run(config, Roles::PROJECTOR, "crm-projector").await?;
        }
        Command::Analytics => {
            roles::run(config, Roles::ANALYTICS, "crm-analytics").await?;
        }
        Command::Notifier => {
            roles::run(config, Roles::NOTIFIER, "crm-notifier").await?;
        }
        Command::Provision {
            definitions,
            replicas,
        } => {
            let definitions = match definitions {
                Some(dir) => Definitions::from_dir(&dir)?,
                None => Definitions::embedded()?,
            };
            let definitions = match replicas {
                Some(replicas) => definitions.with_replicas(replicas),
                None => definitions,
            };
            let bus = connect("crm-provision").await?;
            let result = bus.provision(&definitions).await;
            let changes: Vec<String> = result.as_ref().map_or_else(
                |_| Vec::new(),
                |report| {
                    report
                        .changes
                        .iter()
                        .filter(|c| c.action != bus::Action::Unchanged)
                        .map(ToString::to_string)
                        .collect()
                },
            );
            let report = audited(
                &bus,
                AuditRecord::new(&bus::actor(), "provision", "streams and consumers")
                    .detail(serde_json::json!({ "changes": changes })),
                result,
            )
            .await?;
            print!("{report}");
            if report.is_noop() {
                println!("nothing to do: every stream and consumer is as defined");
            }
        }
        Command::Publish {
            r#type,
            tenant,
            customer,
        } => {
            let bus = connect("crm-publish").await?;
            let event = events::sample::event(r#type, &tenant, &customer);
            let subject = events::ingest_subject(&tenant, r#type)?;
            let published = bus
                .publish(
                    &subject,
                    events::encode_proto(&event).into(),
                    &PublishOptions::with_msg_id(event.event_id.clone()),
                )
                .await
                .with_context(|| format!("publishing a sample {type} event", type = r#type))?;
            println!(
                "{}",
                serde_json::json!({"event_id": event.event_id, "subject": subject, "stream": published.stream,
                    "stream_seq": published.sequence, "duplicate": published.duplicate})
            );
        }
        Command::Dlq { command } => dlq(connect("crm-dlq").await?, command).await?,
        Command::Replay {
            stream,
            from_seq,
            from_time,
            limit,
        } => {
            let start = match (from_seq, from_time) {
                (Some(seq), _) => DeliverPolicy::ByStartSequence {
                    start_sequence: seq,
                },
                (None, Some(text)) => DeliverPolicy::ByStartTime {
                    start_time: time::OffsetDateTime::parse(
                        &text,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .with_context(|| format!("--from-time {text:?} is not RFC 3339"))?,
                },
                (None, None) => DeliverPolicy::All,
            };
            let bus = connect("crm-replay").await?;
            let result = bus.replay_stream(&stream, start, limit).await;
            let record = AuditRecord::new(&bus::actor(), "replay", stream.clone()).detail(
                serde_json::json!({ "start": format!("{start:?}"), "limit": limit,
                    "replayed": result.as_ref().ok() }),
            );
            let count = audited(&bus, record, result).await?;
            println!("re-drove {count} events from {stream} into ingest");
        }
        Command::Status { listen, json } => {
            let status = cli::status::gather(&connect("crm-status").await?, listen).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                println!("{status}");
            }
        }
        Command::HashKey { key } => println!("{}", gateway::hash_key(&key)),
        Command::Nkeys { out } => {
            for (variable, public) in cli::nkeys::generate(&out)? {
                println!("{variable}={public}");
            }
            eprintln!(
                "seeds in {dir}/<identity>.nk (owner-only); the server's environment: {dir}/{env}",
                dir = out.display(),
                env = cli::nkeys::ENV_FILE
            );
        }
        Command::Audit { action, limit } => {
            let bus = connect("crm-audit").await?;
            for record in bus.audit_list(action.as_deref(), limit).await? {
                println!("{}", serde_json::to_string(&record)?);
            }
        }
        Command::Health { ready, timeout } => {
            let probe = if ready {
                cli::probe::Probe::Ready
            } else {
                cli::probe::Probe::Live
            };
            let body = cli::probe::check(config.admin.listen, probe, timeout)
                .await
                .map_err(anyhow::Error::msg)?;
            println!("{body}");
        }
    }
    Ok(())
}

/// Store the audit record of an action that produced `result` (its outcome included), then hand
/// `result` back. An action whose record cannot be stored fails, saying what was done.
async fn audited<T, E>(bus: &Bus, record: AuditRecord, result: Result<T, E>) -> Result<T>
where
    E: std::fmt::Display + Into<anyhow::Error>,
{
    let record = record.outcome(&result);
    if let Err(err) = bus.audit(&record).await {
        let done = match &result {
            Ok(_) => "done".to_owned(),
            Err(failed) => format!("failed ({failed})"),
        };
        anyhow::bail!(
            "{} {} was {done}, but its audit record could not be stored: {err}",
            record.action,
            record.target
        );
    }
    result.map_err(Into::into)
}

async fn dlq(bus: Bus, command: DlqCommand) -> Result<()> {
    match command {
        DlqCommand::List { from_seq, limit } => {
            for entry in bus.dlq_list(from_seq, limit).await? {
                println!("{}", serde_json::to_string(&entry)?);
            }
        }
        DlqCommand::Show { seq } => {
            let entry = bus.dlq_get(seq).await?;
            let encoding = entry
                .content_type
                .as_deref()
                .and_then(events::Encoding::from_content_type)
                .unwrap_or(events::Encoding::Protobuf);
            let payload = match events::decode(&entry.payload, encoding) {
                Ok(event) => serde_json::to_value(&event)?,
                Err(_) => {
                    serde_json::Value::String(String::from_utf8_lossy(&entry.payload).into_owned())
                }
            };
            let mut value = serde_json::to_value(&entry)?;
            value["payload"] = payload;
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        DlqCommand::Replay { seq, all, event } => {
            let seqs = if all {
                bus.dlq_list(1, usize::MAX)
                    .await?
                    .into_iter()
                    .map(|e| e.seq)
                    .collect()
            } else {
                seq.into_iter().collect::<Vec<_>>()
            };
            let replacement = match event {
                Some(path) => {
                    let text = std::fs::read(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    let fixed = events::decode(&text, events::Encoding::Json)?;
                    events::validate(&fixed)?;
                    let kind = EventType::of(&fixed).context("the fixed event has no payload")?;
                    Some((
                        events::ingest_subject(&fixed.tenant_id, kind)?,
                        events::encode_proto(&fixed).into(),
                    ))
                }
                None => None,
            };
            for seq in seqs {
                let result = bus.dlq_replay(seq, replacement.clone()).await;
                let record = AuditRecord::new(&bus::actor(), "dlq_replay", format!("CRM_DLQ seq {seq}"))
                    .detail(serde_json::json!({
                        "fixed_event": replacement.as_ref().map(|(subject, _)| subject),
                        "into": result.as_ref().ok().map(|p| format!("{} seq {}", p.stream, p.sequence)),
                        "duplicate": result.as_ref().ok().map(|p| p.duplicate),
                    }));
                let published = audited(&bus, record, result).await?;
                if published.duplicate {
                    println!(
                        "dead letter {seq} was already re-driven into {} seq {} within the \
                         duplicate window; kept it (replay it again later, or purge it)",
                        published.stream, published.sequence
                    );
                } else {
                    println!(
                        "dead letter {seq} re-driven into {} seq {}",
                        published.stream, published.sequence
                    );
                }
            }
        }
        DlqCommand::Purge { stage } => {
            let result = bus.dlq_purge(stage.as_deref()).await;
            let record = AuditRecord::new(
                &bus::actor(),
                "dlq_purge",
                format!("CRM_DLQ stage {}", stage.as_deref().unwrap_or("(all)")),
            )
            .detail(serde_json::json!({ "purged": result.as_ref().ok() }));
            let purged = audited(&bus, record, result).await?;
            println!("purged {purged} dead letters");
        }
    }
    Ok(())
}
