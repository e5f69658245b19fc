//! `crm-load`: run a load-test scenario against the platform and report per-lane latency, loss
//! and throughput beside raw JetStream and a synchronous baseline.

/// Many small, short-lived allocations per event: mimalloc handles them with less contention.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use clap::{Parser, Subcommand};
use crm_load::{
    chaos::MatrixOptions,
    run::{External, Options},
    scenario::{Scenario, Variant},
    stack::StackPaths,
};
use std::{path::PathBuf, process::ExitCode};

#[derive(Debug, Parser)]
#[command(
    name = "crm-load",
    version,
    about = "Load tests for crm-events: per-lane latency from the intended send time"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a scenario (starting the platform unless --target-url/--nats-url name a running one).
    Run {
        /// The scenario file, e.g. loadtest/scenarios/steady.toml.
        #[arg(long)]
        scenario: PathBuf,
        /// Where report.json, summary.md, report.html and the logs go
        /// (default loadtest/out/<scenario>-<UTC time>/).
        #[arg(long)]
        out: Option<PathBuf>,
        /// A running gateway (with --nats-url, --api-key, --tenant): nothing is started.
        #[arg(long, requires_all = ["nats_url", "api_key", "tenant"])]
        target_url: Option<String>,
        #[arg(long, requires = "target_url")]
        nats_url: Option<String>,
        /// The running gateway's priority door (`gateway.priority_listen`), if it has one:
        /// critical and high events go there.
        #[arg(long, requires = "target_url")]
        priority_url: Option<String>,
        /// API key of the running gateway.
        #[arg(long)]
        api_key: Option<String>,
        /// The tenant that key writes for.
        #[arg(long)]
        tenant: Option<String>,
        /// The crm binary to start.
        #[arg(long, default_value = "target/release/crm")]
        crm_bin: PathBuf,
        /// The nats-server binary to start.
        #[arg(
            long,
            env = "CRM_NATS_SERVER",
            default_value = ".tools/bin/nats-server"
        )]
        nats_server: PathBuf,
        /// The configuration the run's crm.toml starts from.
        #[arg(long, default_value = "crm.toml")]
        config: PathBuf,
        /// The stream and consumer definitions `[stack.streams]` edits a copy of.
        #[arg(long, default_value = "nats")]
        definitions: PathBuf,
        /// Run the scenario's `[short]` form.
        #[arg(long)]
        short: bool,
    },
    /// The fault matrix: every scenario in --dir on a platform of its own, one report per row
    /// and report.md with the matrix.
    Chaos {
        #[arg(long, default_value = "loadtest/scenarios/chaos")]
        dir: PathBuf,
        /// Each row's `[short]` form (CI).
        #[arg(long)]
        short: bool,
        /// Where report.md, matrix.json and each row's report go.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only rows whose name contains this.
        #[arg(long)]
        only: Option<String>,
        #[arg(long, default_value = "target/release/crm")]
        crm_bin: PathBuf,
        #[arg(
            long,
            env = "CRM_NATS_SERVER",
            default_value = ".tools/bin/nats-server"
        )]
        nats_server: PathBuf,
        #[arg(long, default_value = "crm.toml")]
        config: PathBuf,
        #[arg(long, default_value = "nats")]
        definitions: PathBuf,
        /// Only render report.md again from --out's matrix.json.
        #[arg(long, requires = "out")]
        render: bool,
    },
    /// What durability costs JetStream on this machine: raw publish, pull-consume and one
    /// producer's PubAck wait on one server (R1) and a 3-node loopback cluster (R3), each with
    /// the default lazy fsync and with `sync_interval: always`, in one run.
    Replication {
        /// Pipelined publishes (then pulls) per setup.
        #[arg(long, default_value_t = 50_000)]
        events: usize,
        /// Publishes one at a time, each after the previous ack, per setup.
        #[arg(long, default_value_t = 2_000)]
        sequential: usize,
        /// Write summary.md and report.json here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check that scenario files parse, and their `[short]` forms (unknown keys are refused with
    /// their name).
    Check { scenarios: Vec<PathBuf> },
    /// Render a run's summary.md and report.html again from its report.json (ratios and SLO
    /// verdicts recomputed; the SLOs from --scenario when given, else those the report holds).
    Render {
        dir: PathBuf,
        #[arg(long)]
        scenario: Option<PathBuf>,
    },
}

fn default_out(name: &str) -> PathBuf {
    let now = time::OffsetDateTime::now_utc();
    let stamp = format!(
        "{:04}{:02}{:02}-{:02}{:02}{:02}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    PathBuf::from("loadtest/out").join(format!("{name}-{stamp}"))
}

async fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Replication {
            events,
            sequential,
            out,
        } => {
            let measured = crm_load::replication::measure(events, sequential).await?;
            let table = crm_load::replication::render(&measured);
            print!("{table}");
            if let Some(dir) = out {
                std::fs::create_dir_all(&dir)?;
                let machine = format!(
                    "# crm-load replication\n\n{events} pipelined publishes then pulls, and \
                     {sequential} publishes one at a time, per setup; nats-server from \
                     CRM_NATS_SERVER or .tools, every node on this machine's loopback and disk, \
                     run {}.\n\n",
                    time::OffsetDateTime::now_utc()
                );
                std::fs::write(dir.join("summary.md"), format!("{machine}{table}"))?;
                std::fs::write(
                    dir.join("report.json"),
                    serde_json::to_string_pretty(&measured)?,
                )?;
            }
            Ok(true)
        }
        Command::Check { scenarios } => {
            for path in scenarios {
                let scenario = Scenario::load(&path)?;
                let short = match Scenario::load_variant(&path, Variant::Short) {
                    Ok(_) => ", short form ok",
                    Err(err) if format!("{err:#}").contains("no [short] form") => "",
                    Err(err) => return Err(err),
                };
                println!(
                    "{}: ok ({} phases{short})",
                    path.display(),
                    scenario.phases.len()
                );
            }
            Ok(true)
        }
        Command::Render { dir, scenario } => {
            let text = std::fs::read_to_string(dir.join("report.json"))?;
            let mut report: crm_load::report::Report = serde_json::from_str(&text)?;
            crm_load::run::finish_ratios(&mut report);
            let slo = match scenario {
                Some(path) => Scenario::load(&path)?.slo,
                None => report.slo.clone(),
            };
            report.evaluate(&slo);
            crm_load::run::write_outputs(&report, &dir)?;
            println!("{}", report.markdown());
            Ok(true)
        }
        Command::Run {
            scenario,
            out,
            target_url,
            nats_url,
            priority_url,
            api_key,
            tenant,
            crm_bin,
            nats_server,
            config,
            definitions,
            short,
        } => {
            let variant = if short { Variant::Short } else { Variant::Full };
            let scenario = Scenario::load_variant(&scenario, variant)?;
            let out_dir = out.unwrap_or_else(|| default_out(&scenario.name));
            let external = match (target_url, nats_url, api_key, tenant) {
                (Some(gateway_url), Some(nats_url), Some(api_key), Some(tenant)) => {
                    anyhow::ensure!(
                        scenario.fault.is_none(),
                        "a [fault] scenario needs the harness to start the platform"
                    );
                    Some(External {
                        gateway_url,
                        gateway_priority_url: priority_url,
                        nats_url,
                        api_key,
                        tenant,
                    })
                }
                _ => None,
            };
            let options = Options {
                scenario,
                out_dir: out_dir.clone(),
                paths: StackPaths {
                    crm: crm_bin,
                    nats_server,
                    base_config: config,
                    definitions,
                },
                external,
            };
            let report = crm_load::run::run(options).await?;
            println!("{}", report.markdown());
            eprintln!(
                "report: {0}/report.json, {0}/summary.md, {0}/report.html",
                out_dir.display()
            );
            if !report.passed {
                eprintln!("crm-load: FAILED (see the SLO table)");
            }
            Ok(report.passed)
        }
        Command::Chaos {
            dir,
            short,
            out,
            only,
            crm_bin,
            nats_server,
            config,
            definitions,
            render,
        } => {
            let variant = if short { Variant::Short } else { Variant::Full };
            let out =
                out.unwrap_or_else(|| default_out(if short { "chaos-short" } else { "chaos" }));
            if render {
                println!("{}", crm_load::chaos::rerender(&out, variant)?);
                return Ok(true);
            }
            let rows = crm_load::chaos::run_matrix(&MatrixOptions {
                dir,
                variant,
                out: out.clone(),
                only,
                paths: StackPaths {
                    crm: crm_bin,
                    nats_server,
                    base_config: config,
                    definitions,
                },
            })
            .await?;
            println!("{}", std::fs::read_to_string(out.join("report.md"))?);
            let failed: Vec<&str> = rows
                .iter()
                .filter(|r| !r.passed)
                .map(|r| r.name.as_str())
                .collect();
            if failed.is_empty() {
                eprintln!("chaos: every row passed ({})", out.display());
            } else {
                eprintln!("crm-load chaos: FAILED rows: {}", failed.join(", "));
            }
            Ok(failed.is_empty() && !rows.is_empty())
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tokio::select! {
        result = run(cli) => match result {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::from(2)
            }
        },
        _ = tokio::signal::ctrl_c() => {
            // Dropping the run kills every child process it started.
            eprintln!("interrupted: stopping the platform");
            ExitCode::from(130)
        }
    }
}
