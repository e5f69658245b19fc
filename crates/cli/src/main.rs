//! `crm`: runs the platform's roles and operates it (provisioning, publishing, dead letters).

use anyhow::{Context, Result};
use bus::{Bus, ConnectOptions, Definitions, PublishOptions};
use clap::{Args, Parser, Subcommand};
use events::EventType;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "crm",
    version,
    about = "crm-events: real-time CRM events on NATS JetStream"
)]
struct Cli {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct NatsArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        env = "CRM_NATS_URL",
        default_value = "nats://127.0.0.1:14222",
        global = true
    )]
    nats_url: String,
    /// NATS credentials file (.creds).
    #[arg(long, env = "CRM_NATS_CREDENTIALS", global = true)]
    nats_credentials: Option<PathBuf>,
    /// CA certificate to trust for TLS to NATS.
    #[arg(long, env = "CRM_NATS_TLS_CA", global = true)]
    nats_tls_ca: Option<PathBuf>,
    /// Client certificate for mutual TLS (with --nats-tls-key).
    #[arg(
        long,
        env = "CRM_NATS_TLS_CERT",
        global = true,
        requires = "nats_tls_key"
    )]
    nats_tls_cert: Option<PathBuf>,
    #[arg(
        long,
        env = "CRM_NATS_TLS_KEY",
        global = true,
        requires = "nats_tls_cert"
    )]
    nats_tls_key: Option<PathBuf>,
}

impl NatsArgs {
    fn options(&self, name: &str) -> ConnectOptions {
        let mut options = ConnectOptions::new(&self.nats_url).name(name);
        options.credentials_file = self.nats_credentials.clone();
        options.tls_ca_file = self.nats_tls_ca.clone();
        options.require_tls = self.nats_tls_ca.is_some() || self.nats_tls_cert.is_some();
        options.tls_client_cert = self.nats_tls_cert.clone().zip(self.nats_tls_key.clone());
        options
    }

    async fn connect(&self, name: &str) -> Result<Bus> {
        Ok(Bus::connect(&self.options(name)).await?)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update the streams and consumers (idempotent; refuses destructive changes).
    Provision {
        /// Read definitions from this directory instead of the ones built in.
        #[arg(long)]
        definitions: Option<PathBuf>,
    },
    /// Publish a sample event of a type straight to NATS ingest and print the ack.
    Publish {
        /// Event type, e.g. deal_won, payment_failed.
        #[arg(long, default_value = "contact_created", value_parser = parse_event_type)]
        r#type: EventType,
        #[arg(long, default_value = "demo")]
        tenant: String,
        #[arg(long, default_value = "customer-1")]
        customer: String,
    },
}

fn parse_event_type(name: &str) -> Result<EventType, String> {
    EventType::from_name(name).ok_or_else(|| {
        let names: Vec<_> = EventType::ALL.iter().map(|k| k.as_str()).collect();
        format!("unknown event type {name:?}; one of {}", names.join(", "))
    })
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CRM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Provision { definitions } => {
            let definitions = match definitions {
                Some(dir) => Definitions::from_dir(&dir)?,
                None => Definitions::embedded()?,
            };
            let bus = cli.nats.connect("crm-provision").await?;
            let report = bus.provision(&definitions).await?;
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
            let bus = cli.nats.connect("crm-publish").await?;
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
                "{{\"event_id\":\"{}\",\"subject\":\"{subject}\",\"stream\":\"{}\",\"stream_seq\":{},\"duplicate\":{}}}",
                event.event_id, published.stream, published.sequence, published.duplicate
            );
        }
    }
    Ok(())
}
