//! One run of a scenario: start the platform (or use a running one), listen for processed notices
//! and throttle decisions before the first send, drive the phases, drain, account every event,
//! run the raw and synchronous baselines, and build the report.

use crate::{
    client_retry::{Retries, RetryReport},
    driver::{Driver, PhaseContext, PhaseSent, Target, run_phase},
    effects::{EffectsReport, StoreProbe},
    evidence::{self, FaultCheck},
    mix::{Class, Generator, parse_tracked_id, tenant_id, tenant_names},
    procs::{Machine, Sampler},
    report::{
        BaselineReport, FaultReport, Loss, OverloadReport, Paper, PhaseReport, Ratios, Report,
        Series, StreamReport, SyncReport, ThrottlePoint,
    },
    scenario::{DriverConfig, DriverKind, FaultKind, Load, Processes, Scenario, StoreKind},
    stack::{Pids, Stack, StackPaths, StopSignal},
    sync_baseline::SyncServer,
    tracker::{
        ANALYTICS, ANALYTICS_IN_STORE, Collector, DEAD_LETTERED, FOUND_IN_STORE, INVALID, LANES,
        Percentiles, RETRY, Run, histogram,
    },
};
use anyhow::{Context, Result};
use bus::{
    Bus, CancellationToken, ConnectOptions,
    control::{PROCESSED_SUBJECT_PREFIX, ProcessedNotice, THROTTLE_SUBJECT, ThrottleReport},
};
use futures::StreamExt;
use hdrhistogram::Histogram;
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

/// A platform the harness did not start.
#[derive(Debug, Clone)]
pub struct External {
    pub gateway_url: String,
    /// The gateway's priority door, if it has one: critical and high events go there.
    pub gateway_priority_url: Option<String>,
    pub nats_url: String,
    pub api_key: String,
    pub tenant: String,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub scenario: Scenario,
    pub out_dir: PathBuf,
    pub paths: StackPaths,
    pub external: Option<External>,
}

const DLQ_STREAM: &str = "CRM_DLQ";

/// Live progress on stderr: an indicatif line on a terminal, a plain line every 5 s otherwise.
fn spawn_progress(
    run: Arc<Run>,
    phase_name: Arc<Mutex<String>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        let plain = bar.is_hidden();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let (mut last_sent, mut last_processed, mut last_at) = (0u64, 0u64, Instant::now());
        let mut lines = 0u64;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let (sent, processed) = (run.sent.load(Relaxed), run.processed.load(Relaxed));
            let seconds = last_at.elapsed().as_secs_f64().max(1e-3);
            let message = format!(
                "{} | sent {sent} ({:.0}/s) acked {} processed {processed} ({:.0}/s) | p99 {:.1} ms | errors {} refused {}",
                phase_name.lock().map(|n| n.clone()).unwrap_or_default(),
                (sent - last_sent) as f64 / seconds,
                run.acked.load(Relaxed),
                (processed - last_processed) as f64 / seconds,
                run.live_p99_us.load(Relaxed) as f64 / 1000.0,
                run.errors.load(Relaxed),
                run.refusals.load(Relaxed),
            );
            (last_sent, last_processed, last_at) = (sent, processed, Instant::now());
            if plain {
                lines += 1;
                if lines.is_multiple_of(10) {
                    eprintln!("[{:>5.0}s] {message}", run.started.elapsed().as_secs_f64());
                }
            } else {
                bar.set_message(message);
                bar.tick();
            }
        }
        bar.finish_and_clear();
    })
}

/// Subscribe to processed notices (before returning, so nothing sent afterwards is missed) and
/// feed them to `collector` until `stop`; the task hands the collector back.
pub async fn spawn_collector(
    client: bus::async_nats::Client,
    mut collector: Collector,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<Collector>> {
    {
        let mut notices = client
            .subscribe(format!("{PROCESSED_SUBJECT_PREFIX}.>"))
            .await
            .context("subscribing to processed notices")?;
        client.flush().await?;
        Ok(tokio::spawn(async move {
            let mut live = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    biased;
                    message = notices.next() => match message {
                        Some(message) => {
                            if let Ok(notice) = serde_json::from_slice::<ProcessedNotice>(&message.payload) {
                                collector.on_notice(&notice);
                            }
                        }
                        None => break,
                    },
                    _ = live.tick() => collector.roll_live(),
                    _ = stop.cancelled() => break,
                }
            }
            collector
        }))
    }
}

async fn spawn_throttle_listener(
    client: bus::async_nats::Client,
    run: Arc<Run>,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<Vec<ThrottlePoint>>> {
    let mut reports = client.subscribe(THROTTLE_SUBJECT).await?;
    Ok(tokio::spawn(async move {
        let mut points = Vec::new();
        loop {
            tokio::select! {
                message = reports.next() => match message {
                    Some(message) => {
                        if let Ok(r) = serde_json::from_slice::<ThrottleReport>(&message.payload) {
                            let t_s = (r.at_ms as f64 * 1e6 - run.started_unix_ns as f64) / 1e9;
                            points.push(ThrottlePoint {
                                t_s: (t_s * 100.0).round() / 100.0,
                                level: r.level,
                                rate: r.rate,
                                reason: r.reason,
                                ingest_rate: r.ingest_rate,
                                capacity: r.capacity,
                                priority_p99_ms: r.priority_p99_ms,
                                deferred: r.deferred,
                                oldest_deferred_age_s: r.oldest_deferred_age_s,
                                consumer_paused: r.consumer_paused,
                            });
                        }
                    }
                    None => break,
                },
                _ = stop.cancelled() => break,
            }
        }
        points
    }))
}

fn spawn_sampler(
    pids: Pids,
    run: Arc<Run>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Sampler> {
    tokio::spawn(async move {
        let mut sampler = Sampler::new();
        let mut tick = tokio::time::interval(crate::procs::INTERVAL);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    let list = pids.lock().map(|p| p.clone()).unwrap_or_default();
                    sampler.sample(&list, run.started.elapsed().as_secs_f64());
                }
            }
        }
        sampler
    })
}

/// How many messages CRM_DLQ has stored so far (its last sequence).
async fn dlq_last_sequence(bus: &Bus) -> u64 {
    bus.stream_state(DLQ_STREAM)
        .await
        .map(|s| s.last_sequence)
        .unwrap_or(0)
}

fn merged(histograms: impl IntoIterator<Item = Histogram<u64>>) -> Histogram<u64> {
    let mut all = histogram(3);
    for h in histograms {
        let _ = all.add(&h);
    }
    all
}

/// Per-phase timing and what the senders measured.
struct PhaseRun {
    load: Load,
    sent: PhaseSent,
    /// The critical probe's sends and answers in this phase, when it ran.
    probe: Option<(u64, Histogram<u64>)>,
}

/// A scenario run from start to report. The report is also written to `options.out_dir`.
pub async fn run(options: Options) -> Result<Report> {
    let scenario = &options.scenario;
    std::fs::create_dir_all(&options.out_dir)?;
    let started_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();

    // The platform.
    let (stack, target_url, priority_url, nats_url, api_keys) = match &options.external {
        Some(external) => (
            None,
            external.gateway_url.clone(),
            external.gateway_priority_url.clone(),
            external.nats_url.clone(),
            vec![external.api_key.clone()],
        ),
        None => {
            eprintln!(
                "starting nats-server and crm ({}) …",
                match scenario.stack.processes {
                    Processes::All => "crm all",
                    Processes::Roles => "one process per role",
                }
            );
            let stack = Stack::start(scenario, &options.paths, &options.out_dir).await?;
            let (url, priority_url, nats, keys) = (
                stack.gateway_url.clone(),
                stack.gateway_priority_url.clone(),
                stack.nats_url.clone(),
                stack.api_keys.clone(),
            );
            (Some(stack), url, priority_url, nats, keys)
        }
    };
    let pids: Pids = stack
        .as_ref()
        .map_or_else(|| Arc::new(Mutex::new(Vec::new())), |s| Arc::clone(&s.pids));
    pids.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(("crm-load".into(), std::process::id()));
    let nats_version = stack
        .as_ref()
        .map_or_else(|| "external".to_owned(), |s| s.nats_version.clone());
    let machine = Machine::describe(&nats_version, &scenario.stack.sync_interval);
    let stack = Arc::new(tokio::sync::Mutex::new(stack));

    let result = drive(
        &options,
        Arc::clone(&stack),
        pids,
        Target::Http {
            base_url: target_url,
            priority_url,
            keys: api_keys,
        },
        &nats_url,
    )
    .await;
    // Stop the platform whatever happened.
    if let Some(stack) = stack.lock().await.take() {
        let _ = stack.stop().await;
    }
    let mut report = result?;
    report.started_at = started_at;
    report.machine = machine;

    // The synchronous baseline, on the machine the platform has left.
    if scenario.baselines.sync {
        eprintln!("synchronous baseline …");
        report.baselines.sync = Some(sync_baseline(scenario, report.phases.as_slice()).await?);
    }
    finish_ratios(&mut report);
    report.evaluate(&scenario.slo);
    write_outputs(&report, &options.out_dir)?;
    Ok(report)
}

/// `http`: where HTTP drivers (and an HTTP probe) send — the gateway, its priority door if it
/// has one, the API keys.
async fn drive(
    options: &Options,
    stack: Arc<tokio::sync::Mutex<Option<Stack>>>,
    pids: Pids,
    http: Target,
    nats_url: &str,
) -> Result<Report> {
    let scenario = &options.scenario;
    let bus = Bus::connect(&ConnectOptions::new(nats_url).name("crm-load"))
        .await
        .context("connecting to NATS")?;
    let run_tag = rand::random::<u32>() & 0x3f_ffff;
    let longest_retry = scenario
        .retries
        .iter()
        .map(|r| r.after)
        .max()
        .unwrap_or_default();
    let fault_end = scenario
        .fault
        .as_ref()
        .map_or(Duration::ZERO, |f| f.at + f.down_for);
    let seconds = (scenario.load_duration().max(fault_end) + longest_retry + scenario.drain_timeout)
        .as_secs() as usize
        + 120;
    let run = Arc::new(Run::new(run_tag, seconds));
    let stop = CancellationToken::new();

    // Listen before the first send.
    let collector = spawn_collector(
        bus.client().clone(),
        Collector::new(Arc::clone(&run), scenario.phases.len()),
        stop.clone(),
    )
    .await?;
    let throttle =
        spawn_throttle_listener(bus.client().clone(), Arc::clone(&run), stop.clone()).await?;
    let pacer = Arc::new(Mutex::new(crate::admission::BulkPacer::new()));
    let admission = crate::admission::spawn_listener(
        bus.client().clone(),
        Arc::clone(&run),
        Arc::clone(&pacer),
        stop.clone(),
    )
    .await
    .context("subscribing to the admission signal")?;
    let sampler = spawn_sampler(pids, Arc::clone(&run), stop.clone());
    let phase_name = Arc::new(Mutex::new(String::new()));
    let progress = spawn_progress(Arc::clone(&run), Arc::clone(&phase_name), stop.clone());
    let dlq_before = dlq_last_sequence(&bus).await;
    let endpoints = match stack.lock().await.as_ref() {
        Some(stack) => stack.admin_endpoints(),
        None => Vec::new(),
    };
    let evidence_task = evidence::spawn_poller(endpoints, stop.clone());

    let target = match scenario.driver.kind {
        DriverKind::Nats => Target::Nats(Box::new(bus.clone())),
        DriverKind::Http | DriverKind::HttpBatch => http.clone(),
    };
    let max_concurrency = scenario
        .phases
        .iter()
        .filter_map(|p| p.users)
        .max()
        .unwrap_or(0)
        .max(scenario.driver.connections);
    let driver = Arc::new(
        Driver::new(&scenario.driver, target, max_concurrency)?
            .with_pacer(pacer, &scenario.driver)
            .with_priority_connection()
            .await
            .context("connecting for the priority subjects")?,
    );
    let context = PhaseContext {
        run: Arc::clone(&run),
        driver: Arc::clone(&driver),
        mix: mix_for(options),
        tenant_names: match &options.external {
            Some(external) => vec![external.tenant.clone()],
            None => tenant_names(&scenario.mix),
        }
        .into(),
        seed: scenario.seed,
        events_per_send: driver.events_per_send(&scenario.driver),
        connections: scenario.driver.connections,
        retries: (!scenario.retries.is_empty()).then(|| Arc::new(Retries::new(&scenario.retries))),
    };
    let load_done = CancellationToken::new();
    let probe_phase = Arc::new(AtomicUsize::new(crate::probe::NO_PHASE));
    let probe = (scenario.critical_probe.rate > 0.0).then(|| {
        crate::probe::Probe::spawn(
            crate::probe::ProbeSetup {
                rate: scenario.critical_probe.rate,
                driver: scenario.driver.clone(),
                target: match context.driver.nats_bus() {
                    Some(bus) => crate::probe::ProbeTarget::Nats(Box::new(bus.clone())),
                    None => crate::probe::ProbeTarget::Http(http.clone()),
                },
                mix: context.mix.clone(),
                tenant_names: Arc::clone(&context.tenant_names),
                seed: scenario.seed,
                phases: scenario.phases.len(),
                phase: Arc::clone(&probe_phase),
            },
            Arc::clone(&run),
            load_done.clone(),
        )
    });
    let retry_task = context.retries.clone().map(|retries| {
        tokio::spawn(retries.run(Arc::clone(&run), Arc::clone(&driver), load_done.clone()))
    });

    // The fault, at its time from the start.
    let fault_task = scenario.fault.clone().map(|fault| {
        let (stack, run) = (Arc::clone(&stack), Arc::clone(&run));
        tokio::spawn(async move { inject(&fault, &stack, &run).await })
    });

    // The phases, back to back. Open phases keep their schedule even if an earlier phase ran
    // late (their events are then late, and measured so); closed phases start when they can.
    let mut phase_runs = Vec::new();
    let mut capacity = None;
    let mut cursor_ns = 0u64;
    for (index, phase) in scenario.phases.iter().enumerate() {
        let load = phase.load(capacity)?;
        let start_ns = match load {
            Load::Open { .. } => cursor_ns,
            Load::Closed { .. } => cursor_ns.max(run.now_ns()),
        };
        cursor_ns = start_ns + u64::try_from(phase.duration.as_nanos()).unwrap_or(u64::MAX);
        if let Ok(mut name) = phase_name.lock() {
            *name = format!("{} ({}/{})", phase.name, index + 1, scenario.phases.len());
        }
        let processed_before = run.processed.load(Relaxed);
        probe_phase.store(index, Relaxed);
        let sent = run_phase(&context, index, load, start_ns, phase.duration).await;
        probe_phase.store(crate::probe::NO_PHASE, Relaxed);
        if phase.measure_capacity {
            // Capacity = how fast the platform gets the probe's events through end to end: the
            // probe, then until its backlog is processed. (Completions during the probe alone
            // understate it when ingest starves the workers; its ack rate overstates it.)
            let deadline = Instant::now() + scenario.drain_timeout;
            while run.processed.load(Relaxed) < run.acked.load(Relaxed) && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let seconds = run.now_ns().saturating_sub(sent.start_ns) as f64 / 1e9;
            let processed = run.processed.load(Relaxed) - processed_before;
            let measured = processed as f64 / seconds.max(1e-3);
            eprintln!(
                "phase {}: capacity {measured:.0} events/s end to end ({processed} events through \
                 in {seconds:.1} s)",
                phase.name
            );
            capacity = Some(measured);
            // Later phases start after the backlog is gone.
            cursor_ns = cursor_ns.max(run.now_ns());
        }
        phase_runs.push(PhaseRun {
            load,
            sent,
            probe: None,
        });
    }
    let load_end_ns = run.now_ns();
    load_done.cancel();
    if let Some(probe) = probe {
        let measured = probe.finish().context("the critical probe")?;
        for ((phase_run, sent), ack) in phase_runs.iter_mut().zip(measured.sent).zip(measured.ack) {
            phase_run.probe = Some((sent, ack));
        }
    }
    if let Ok(mut name) = phase_name.lock() {
        *name = "draining".into();
    }

    // Drain: until every acked event is processed or dead-lettered and counted by analytics, or
    // (when a notice was lost, or a retry was answered `duplicate`) until every consumer of the
    // platform has nothing pending for a while — and never before the fault and the retries are
    // over.
    let drain_started = Instant::now();
    let mut drained = false;
    let mut quiet_since: Option<Instant> = None;
    while drain_started.elapsed() < scenario.drain_timeout {
        let busy = retry_task.as_ref().is_some_and(|t| !t.is_finished())
            || fault_task.as_ref().is_some_and(|t| !t.is_finished());
        if !busy {
            let acked = run.acked.load(Relaxed);
            let dead = dlq_last_sequence(&bus).await.saturating_sub(dlq_before);
            let processed = run.processed.load(Relaxed);
            let analytics = run.analytics_done.load(Relaxed);
            if processed + dead >= acked && analytics + dead >= acked {
                drained = true;
                break;
            }
            if quiescent(&bus).await {
                let since = *quiet_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= QUIET_FOR {
                    drained = true;
                    break;
                }
            } else {
                quiet_since = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Late notices (a batch settled while we looked) get a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let drain_s = drain_started.elapsed().as_secs_f64();
    let fault = match fault_task {
        Some(task) => Some(task.await.context("fault task")??),
        None => None,
    };
    if let Some(task) = retry_task {
        task.abort();
        let _ = task.await;
    }
    // Lanes hold an event until every consumer acked it (the notifier may trail the projector):
    // give the platform a moment to settle before the streams are read.
    if stack.lock().await.is_some() {
        let deadline = Instant::now() + SETTLE_FOR;
        while Instant::now() < deadline && !quiescent(&bus).await {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    stop.cancel();
    let collector = collector.await.context("collector task")?;
    let throttle = throttle.await.context("throttle listener")?;
    let admission = admission.await.context("admission listener")?;
    let processes = sampler.await.context("sampler")?.finish();
    let evidence = evidence_task.await.context("metrics poller")?;
    let stages = evidence.stages();
    let evidence = evidence.totals();
    let _ = progress.await;

    // Dead letters of this run, by event id and reason.
    let dlq_after = dlq_last_sequence(&bus).await;
    let mut dead_letters = DeadLetters::default();
    if dlq_after > dlq_before {
        for entry in bus
            .dlq_list(
                dlq_before + 1,
                usize::try_from(dlq_after - dlq_before).unwrap_or(0),
            )
            .await?
        {
            let encoding = entry
                .content_type
                .as_deref()
                .and_then(events::Encoding::from_content_type)
                .unwrap_or(events::Encoding::Protobuf);
            let index = events::decode(&entry.payload, encoding)
                .ok()
                .and_then(|event| parse_tracked_id(&event.event_id, run.run_tag));
            match index {
                Some(index) => {
                    run.slots.mark(index, DEAD_LETTERED);
                    *dead_letters
                        .by_reason
                        .entry(entry.reason.clone())
                        .or_default() += 1;
                    dead_letters.reasons.insert(index, entry.reason);
                }
                None => dead_letters.foreign += 1,
            }
        }
    }

    // The store: events whose notice was lost, and every tenant's effects.
    let (effects, high_water) = match stack.lock().await.as_ref() {
        Some(stack) => (
            Some(reconcile_with_store(stack.store.kind, &stack.store.direct_url, &run).await?),
            Some(stack.high_water),
        ),
        None => (None, None),
    };
    let mut streams = Vec::new();
    if let Ok(definitions) = bus::Definitions::embedded() {
        for name in definitions.stream_names() {
            if let Ok(usage) = bus.stream_usage(&name).await {
                streams.push(StreamReport {
                    name,
                    messages: usage.messages,
                    bytes: usage.bytes,
                    max_bytes: usage.max_bytes,
                });
            }
        }
    }
    let retries = context
        .retries
        .as_ref()
        .map(|r| r.report(&run))
        .unwrap_or_default();

    // Raw baseline on the same server.
    let raw = if scenario.baselines.raw_events > 0 {
        eprintln!(
            "raw JetStream baseline ({} events) …",
            scenario.baselines.raw_events
        );
        let mut generator = Generator::new(
            &scenario.mix,
            &tenant_names(&scenario.mix),
            run_tag ^ 1,
            scenario.seed,
        );
        let payloads: Vec<bytes::Bytes> = (0..scenario.baselines.raw_events as u64)
            .map(|i| events::encode_proto(&generator.next(i).event).into())
            .collect();
        Some(
            bus.raw_rates("CRM_LOAD_RAW", "crmload.raw", &payloads)
                .await?,
        )
    } else {
        None
    };

    let mut report = build_report(
        scenario,
        &run,
        &collector,
        &phase_runs,
        Accounting {
            dead_letters: &dead_letters,
            drain_s,
            drained,
            load_end_ns,
        },
    );
    report.effects = effects;
    report.ingest_high_water = high_water;
    report.streams = streams;
    report.fault_checks = fault_checks(
        scenario,
        &report,
        &evidence,
        &retries,
        &run,
        fault.is_some(),
    );
    report.retries = retries;
    report.evidence = evidence;
    report.stages = stages;
    report.throttle = throttle;
    report.admission = admission;
    report.processes = processes;
    report.baselines = BaselineReport { raw, sync: None };
    let store = match scenario.stack.store {
        StoreKind::Sqlite => "SQLite",
        StoreKind::Postgres => "PostgreSQL (through the harness's proxy)",
    };
    report.stack = match (&options.external, scenario.stack.processes) {
        (Some(e), _) => format!("external ({})", e.gateway_url),
        (None, Processes::All) => format!("crm all (one process), {store}"),
        (None, Processes::Roles) => format!("one process per role, {store}"),
    };
    report.overload = overload_report(scenario, &report, capacity);
    if let (Some(fault), Some((killed, restarted))) = (&scenario.fault, fault) {
        report.fault = Some(fault_report(fault, &report.series, killed, restarted));
    }
    Ok(report)
}

/// How long every consumer must have had nothing pending for the drain to end on quiet alone.
const QUIET_FOR: Duration = Duration::from_secs(2);
/// How long, after the drain, the harness waits for the platform to settle before reading the
/// streams.
const SETTLE_FOR: Duration = Duration::from_secs(30);

/// Every consumer of the platform's definitions has nothing pending and nothing unacked.
async fn quiescent(bus: &Bus) -> bool {
    let Ok(definitions) = bus::Definitions::embedded() else {
        return false;
    };
    for consumer in &definitions.consumers {
        match bus.consumer_info(&consumer.stream, &consumer.durable).await {
            Ok(info) if info.num_pending == 0 && info.num_ack_pending == 0 => {}
            _ => return false,
        }
    }
    true
}

/// Do the fault at its time; (when it began, when it ended) in seconds after the start.
async fn inject(
    fault: &crate::scenario::Fault,
    stack: &tokio::sync::Mutex<Option<Stack>>,
    run: &Run,
) -> Result<(f64, f64)> {
    tokio::time::sleep_until((run.started + fault.at).into()).await;
    let began = run.started.elapsed().as_secs_f64();
    let role = fault.role.clone().unwrap_or_default();
    {
        let mut guard = stack.lock().await;
        let stack = guard.as_mut().context("the platform is gone")?;
        match fault.kind {
            FaultKind::KillRole => stack.kill_role(&role).await?,
            FaultKind::RestartNats => stack.stop_nats(StopSignal::Term).await?,
            FaultKind::KillNats => stack.stop_nats(StopSignal::Kill).await?,
            FaultKind::StoreDown => stack.set_store_up(false)?,
            FaultKind::RestoreStreams => stack.provision(None).await?,
        }
    }
    eprintln!(
        "fault: {}{} at {began:.1} s",
        fault.kind.as_str(),
        if role.is_empty() {
            String::new()
        } else {
            format!(" {role}")
        }
    );
    if fault.kind != FaultKind::RestoreStreams {
        tokio::time::sleep(fault.down_for).await;
        let mut guard = stack.lock().await;
        let stack = guard.as_mut().context("the platform is gone")?;
        match fault.kind {
            FaultKind::KillRole => stack.restart_role(&role).await?,
            FaultKind::RestartNats | FaultKind::KillNats => stack.start_nats().await?,
            FaultKind::StoreDown => stack.set_store_up(true)?,
            FaultKind::RestoreStreams => {}
        }
    }
    let ended = run.started.elapsed().as_secs_f64();
    eprintln!("fault: over (ready again) at {ended:.1} s");
    Ok((began, ended))
}

/// This run's dead letters.
#[derive(Debug, Default)]
struct DeadLetters {
    /// Event index → reason.
    reasons: std::collections::HashMap<u64, String>,
    by_reason: BTreeMap<String, u64>,
    /// Dead letters that are not this run's events.
    foreign: u64,
}

/// Look up, in the store, the events the harness has no notice for (a notice is best effort),
/// mark those found, and compare every tenant's effects with what was processed.
async fn reconcile_with_store(kind: StoreKind, url: &str, run: &Run) -> Result<EffectsReport> {
    let probe = StoreProbe::connect(kind, url).await?;
    let total = run.next_index.load(Relaxed);
    let (mut projection, mut analytics) = (Vec::new(), Vec::new());
    for index in 0..total {
        let Some(view) = run.slots.view(index) else {
            continue;
        };
        if view.flags & crate::tracker::SENT == 0 || view.dead_lettered() {
            continue;
        }
        if view.projector_reports() == 0 {
            projection.push(index);
        }
        if view.analytics_reports() == 0 {
            analytics.push(index);
        }
    }
    for (indices, flag, in_analytics) in [
        (projection, FOUND_IN_STORE, false),
        (analytics, ANALYTICS_IN_STORE, true),
    ] {
        let ids: Vec<String> = indices
            .iter()
            .filter_map(|&i| run.slots.view(i).map(|v| run.event_id(i, v.intended_ns)))
            .collect();
        let found = probe.in_ledger(&ids, in_analytics).await?;
        for (index, id) in indices.iter().zip(&ids) {
            if found.contains(id) {
                run.slots.mark(*index, flag);
            }
        }
    }
    let mut expected: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for index in 0..total {
        let Some(view) = run.slots.view(index) else {
            continue;
        };
        if view.has(RETRY) {
            continue;
        }
        let entry = expected.entry(tenant_id(view.tenant())).or_default();
        entry.0 += u64::from(view.processed() && !view.dead_lettered());
        // Analytics acks an invalid event uncounted (the router dead-letters it).
        entry.1 += u64::from(view.counted_by_analytics() && !view.has(INVALID));
    }
    expected.retain(|_, (p, a)| *p + *a > 0);
    let store = probe.per_tenant().await?;
    probe.close().await;
    Ok(crate::effects::compare(&expected, &store))
}

/// The checks that the scenario's fault happened: each fault or stress leaves its own mark.
fn fault_checks(
    scenario: &Scenario,
    report: &Report,
    evidence: &BTreeMap<String, f64>,
    retries: &[RetryReport],
    run: &Run,
    fault_done: bool,
) -> Vec<FaultCheck> {
    let mut checks = Vec::new();
    let mut check = |what: &str, measured: String, passed: bool| {
        checks.push(FaultCheck {
            what: what.into(),
            measured,
            passed,
        })
    };
    for name in scenario.stack.streams.keys() {
        if name.starts_with("CRM_LANE_") {
            let n = evidence::total(evidence, "crm_router_lane_refusals_total");
            check(
                &format!("{name} refused the router"),
                format!("{n} lane refusals"),
                n > 0.0,
            );
        } else if name == "CRM_DLQ" {
            let n = evidence::total(evidence, "crm_dlq_write_failures_total");
            check(
                "CRM_DLQ refused dead letters",
                format!("{n} dead-letter write failures"),
                n > 0.0,
            );
        }
    }
    if let Some(fault) = &scenario.fault {
        check(
            &format!("{} done and undone", fault.kind.as_str()),
            if fault_done { "yes" } else { "no" }.into(),
            fault_done,
        );
        if fault.kind == FaultKind::StoreDown {
            let waited = evidence
                .get("projector crm_worker_waiting seconds")
                .or_else(|| evidence.get("all crm_worker_waiting seconds"))
                .copied()
                .unwrap_or(0.0);
            check(
                "the projector held its batch for the store",
                format!("{waited} s waiting"),
                waited > 0.0,
            );
        }
    }
    let l = &report.loss;
    for (share, reason) in [
        (scenario.mix.invalid_share, "invalid_event"),
        (scenario.mix.poison_share, "store_rejected"),
    ] {
        if share > 0.0 {
            let n = l.dead_letter_reasons.get(reason).copied().unwrap_or(0);
            check(
                &format!("events dead-lettered as {reason}"),
                n.to_string(),
                n > 0,
            );
        }
    }
    if scenario.mix.same_key_across_tenants {
        let tenants = scenario.mix.tenants.max(1);
        let total = run.next_index.load(Relaxed);
        let mut keys = 0u64;
        let mut applied_by_all = 0u64;
        for first in (0..total).step_by(tenants as usize) {
            if first + tenants > total {
                break;
            }
            keys += 1;
            let all = (first..first + tenants).all(|i| {
                run.slots
                    .view(i)
                    .is_some_and(|v| v.processed() && !v.has(RETRY))
            });
            applied_by_all += u64::from(all);
        }
        check(
            "idempotency keys processed for every tenant that used them",
            format!("{applied_by_all} of {keys} keys"),
            applied_by_all > 0,
        );
        check(
            "no ack answered duplicate",
            l.deduplicated.to_string(),
            l.deduplicated == 0,
        );
    }
    for r in retries {
        check(
            &format!(
                "retries {} {}",
                r.name,
                if r.within_window {
                    "answered duplicate (inside the window)"
                } else {
                    "stored again (after the window)"
                }
            ),
            format!(
                "{} acked: {} duplicate, {} stored",
                r.acked,
                r.deduplicated,
                r.acked - r.deduplicated
            ),
            r.as_expected(),
        );
    }
    checks
}

/// An external platform has one tenant, the one its key is for.
fn mix_for(options: &Options) -> crate::scenario::Mix {
    let mut mix = options.scenario.mix.clone();
    if options.external.is_some() {
        mix.tenants = 1;
    }
    mix
}

struct Accounting<'a> {
    dead_letters: &'a DeadLetters,
    drain_s: f64,
    drained: bool,
    load_end_ns: u64,
}

fn build_report(
    scenario: &Scenario,
    run: &Run,
    collector: &Collector,
    phase_runs: &[PhaseRun],
    accounting: Accounting,
) -> Report {
    // Per-event accounting.
    let total = run.next_index.load(Relaxed);
    let phases = scenario.phases.len();
    let mut per_phase = vec![(0u64, 0u64, 0u64, 0u64); phases];
    let dead_letters = accounting.dead_letters;
    let mut loss = Loss {
        dead_lettered: dead_letters.reasons.len() as u64,
        dead_letter_reasons: dead_letters.by_reason.clone(),
        unexpected_dead_letters: dead_letters.foreign,
        deduplicated: run.deduplicated.load(Relaxed),
        duplicates: collector.duplicates,
        analytics_duplicates: collector.analytics_duplicates,
        foreign: collector.foreign,
        drain_s: (accounting.drain_s * 10.0).round() / 10.0,
        drained: accounting.drained,
        ..Loss::default()
    };
    for index in 0..total {
        let Some(view) = run.slots.view(index) else {
            continue;
        };
        let counts = &mut per_phase[view.phase.min(phases - 1)];
        let sent = view.flags & crate::tracker::SENT != 0;
        let processed = view.processed();
        let dead = view.dead_lettered();
        let retry = view.has(RETRY);
        let doomed = view.doomed_reason();
        loss.sent += u64::from(sent);
        counts.0 += u64::from(sent);
        if dead {
            let reason = dead_letters.reasons.get(&index).map(String::as_str);
            if doomed.is_none() || reason != doomed {
                loss.unexpected_dead_letters += 1;
            }
        } else if doomed.is_some() && processed {
            loss.doomed_processed += 1;
        }
        if view.acked() {
            loss.acked += 1;
            counts.1 += 1;
            loss.doomed += u64::from(doomed.is_some());
            if processed {
                loss.acked_processed += 1;
            } else if dead {
                loss.acked_dead_lettered += 1;
            } else if retry && view.has(crate::tracker::DEDUPLICATED) {
                // A retry the stream recognised: its original carries the effect.
                loss.acked_deduplicated += 1;
            } else {
                loss.missing += 1;
                if loss.missing_ids.len() < 20 {
                    loss.missing_ids.push(run.event_id(index, view.intended_ns));
                }
            }
            let analytics_skips =
                dead || doomed.is_some() || view.has(crate::tracker::DEDUPLICATED);
            if !view.counted_by_analytics() && !analytics_skips {
                loss.analytics_missing += 1;
            }
        } else if processed {
            loss.processed_without_ack += 1;
        }
        if view.flags & crate::tracker::ERROR != 0 {
            loss.errors += 1;
            counts.2 += 1;
        }
        if processed {
            loss.processed += 1;
            counts.3 += 1;
            loss.found_in_store += u64::from(view.projector_reports() == 0);
        }
        if view.counted_by_analytics() {
            loss.analytics_counted += 1;
            loss.analytics_found_in_store += u64::from(view.analytics_reports() == 0);
        }
    }

    // Per-second series.
    let series = build_series(run, collector, accounting.load_end_ns);

    // Phases.
    let mut reports = Vec::new();
    for (index, (phase, phase_run)) in scenario.phases.iter().zip(phase_runs).enumerate() {
        let start_s = phase_run.sent.start_ns as f64 / 1e9;
        let end_s = (phase_run.sent.start_ns as f64 / 1e9) + phase.duration.as_secs_f64();
        let e2e: u64 = series
            .t_s
            .iter()
            .zip(&series.processed)
            .filter(|(t, _)| **t >= start_s.floor() && **t < end_s.ceil())
            .map(|(_, n)| *n)
            .sum();
        let window = (end_s.ceil() - start_s.floor()).max(1.0);
        let lanes = &collector.lanes[index];
        let mut e2e_latency = BTreeMap::new();
        for (lane, h) in LANES.iter().zip(lanes.iter()) {
            e2e_latency.insert((*lane).to_owned(), Percentiles::of(h));
        }
        e2e_latency.insert(
            "all".into(),
            Percentiles::of(&merged(lanes.iter().cloned())),
        );
        e2e_latency.insert(
            ANALYTICS.into(),
            Percentiles::of(&collector.analytics[index]),
        );
        let (sent, acked, errors, processed) = per_phase[index];
        let ack_all = merged(phase_run.sent.ack.iter().cloned());
        let (offered, offered_to, users, think) = match phase_run.load {
            Load::Open { rate, to_rate } => (Some(rate), Some(to_rate), None, None),
            Load::Closed { users, think } => {
                (None, None, Some(users), Some(think.as_secs_f64() * 1000.0))
            }
        };
        reports.push(PhaseReport {
            name: phase.name.clone(),
            model: if users.is_some() { "closed" } else { "open" }.into(),
            offered_per_s: offered.map(|r| r.round()),
            offered_to_per_s: offered_to.map(|r| r.round()),
            users,
            think_ms: think,
            start_s: (start_s * 10.0).round() / 10.0,
            duration_s: phase.duration.as_secs_f64(),
            excluded_from_totals: phase.exclude_from_totals,
            sent,
            acked,
            errors,
            processed,
            ack_per_s: acked as f64 / phase.duration.as_secs_f64(),
            e2e_per_s: e2e as f64 / window,
            ack_latency: Percentiles::of(&ack_all),
            ack_latency_by_class: Class::ALL
                .iter()
                .map(|class| {
                    let h = &phase_run.sent.ack[*class as usize];
                    (class.as_str().to_owned(), Percentiles::of(h))
                })
                .collect(),
            e2e_latency,
            probe: phase_run
                .probe
                .as_ref()
                .map(|(sent, ack)| crate::report::ProbeReport {
                    sent: *sent,
                    ack: Percentiles::of(ack),
                    e2e: Percentiles::of(&collector.probe[index]),
                }),
            ..PhaseReport::default()
        });
    }

    // Totals over the phases that count.
    let counted: Vec<usize> = (0..phases)
        .filter(|i| !scenario.phases[*i].exclude_from_totals)
        .collect();
    let mut totals = PhaseReport {
        name: "total".into(),
        ..PhaseReport::default()
    };
    let mut duration = 0.0;
    for lane in 0..LANES.len() + 1 {
        let h = if lane < LANES.len() {
            merged(counted.iter().map(|i| collector.lanes[*i][lane].clone()))
        } else {
            merged(
                counted
                    .iter()
                    .flat_map(|i| collector.lanes[*i].iter().cloned()),
            )
        };
        let name = LANES.get(lane).copied().unwrap_or("all");
        totals.e2e_latency.insert(name.into(), Percentiles::of(&h));
    }
    totals.e2e_latency.insert(
        ANALYTICS.into(),
        Percentiles::of(&merged(
            counted.iter().map(|i| collector.analytics[*i].clone()),
        )),
    );
    totals.ack_latency = Percentiles::of(&merged(
        counted
            .iter()
            .flat_map(|i| phase_runs[*i].sent.ack.iter().cloned()),
    ));
    if counted.iter().any(|i| phase_runs[*i].probe.is_some()) {
        totals.probe = Some(crate::report::ProbeReport {
            sent: counted
                .iter()
                .filter_map(|i| phase_runs[*i].probe.as_ref().map(|(sent, _)| *sent))
                .sum(),
            ack: Percentiles::of(&merged(
                counted
                    .iter()
                    .filter_map(|i| phase_runs[*i].probe.as_ref().map(|(_, ack)| ack.clone())),
            )),
            e2e: Percentiles::of(&merged(counted.iter().map(|i| collector.probe[*i].clone()))),
        });
    }
    for class in Class::ALL {
        totals.ack_latency_by_class.insert(
            class.as_str().to_owned(),
            Percentiles::of(&merged(
                counted
                    .iter()
                    .map(|i| phase_runs[*i].sent.ack[class as usize].clone()),
            )),
        );
    }
    let mut e2e_weighted = 0.0;
    for i in &counted {
        let r = &reports[*i];
        totals.sent += r.sent;
        totals.acked += r.acked;
        totals.errors += r.errors;
        totals.processed += r.processed;
        duration += r.duration_s;
        e2e_weighted += r.e2e_per_s * r.duration_s;
    }
    totals.duration_s = duration;
    totals.ack_per_s = totals.acked as f64 / duration.max(1e-9);
    totals.e2e_per_s = e2e_weighted / duration.max(1e-9);

    let mut routed = BTreeMap::new();
    for class in Class::ALL {
        let row: BTreeMap<String, u64> = LANES
            .iter()
            .zip(collector.routed[class as usize])
            .filter(|(_, n)| *n > 0)
            .map(|(lane, n)| ((*lane).to_owned(), n))
            .collect();
        routed.insert(class.as_str().to_owned(), row);
    }
    let other_roles = collector
        .others
        .iter()
        .map(|((role, lane), h)| (format!("{role}/{lane}"), Percentiles::of(h)))
        .collect();
    let errors = run
        .error_log
        .lock()
        .map(|log| log.clone())
        .unwrap_or_default();

    let mut report = Report {
        scenario: scenario.name.clone(),
        description: scenario.description.trim().to_owned(),
        driver: describe_driver(&scenario.driver),
        phases: reports,
        totals,
        loss,
        routed,
        series,
        paper: Paper::default(),
        errors,
        other_roles,
        inversions: crate::inversion::of_run(run),
        ..Report::default()
    };
    crate::goodput::fill(&mut report, run, scenario);
    report
}

fn describe_driver(driver: &DriverConfig) -> String {
    match driver.kind {
        DriverKind::Http => format!(
            "HTTP single ({:?}), keep-alive, {} connections in the open model",
            driver.encoding, driver.connections
        )
        .to_lowercase(),
        DriverKind::HttpBatch => format!(
            "HTTP batch of {}, keep-alive, {} connections in the open model",
            driver.batch_size, driver.connections
        ),
        DriverKind::Nats => format!(
            "NATS publish + PubAck (protobuf), {} in flight in the open model; {}; {}",
            driver.connections,
            if driver.priority_subjects {
                "critical and high to crm.priority.*"
            } else {
                "everything to crm.ingest.*"
            },
            if driver.bulk_pacing {
                "bulk paced to crm.control.admission"
            } else {
                "bulk not paced"
            }
        ),
    }
}

fn build_series(run: &Run, collector: &Collector, load_end_ns: u64) -> Series {
    use crate::tracker::PerSecond;
    let sent = PerSecond::snapshot(&run.per_second.sent);
    let acked = PerSecond::snapshot(&run.per_second.acked);
    let errors = PerSecond::snapshot(&run.per_second.errors);
    let refused = PerSecond::snapshot(&run.per_second.refused);
    let last_activity = |v: &[u64]| v.iter().rposition(|n| *n > 0).map_or(0, |i| i + 1);
    let len = [
        last_activity(&sent),
        last_activity(&acked),
        collector.seconds.len(),
        crate::tracker::second_of(load_end_ns) + 1,
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    let pick = |v: &[u64]| (0..len).map(|i| v.get(i).copied().unwrap_or(0)).collect();
    let mut series = Series {
        t_s: (0..len).map(|i| i as f64).collect(),
        sent: pick(&sent),
        acked: pick(&acked),
        errors: pick(&errors),
        shed: pick(&refused),
        ..Series::default()
    };
    let names = ["critical", "high", "standard", "analytics"];
    let ms = |h: &Histogram<u64>, q: f64| {
        (!h.is_empty()).then(|| (h.value_at_quantile(q) as f64 / 10.0).round() / 100.0)
    };
    for name in names {
        series.p50_ms.insert(name.into(), Vec::with_capacity(len));
        series.p99_ms.insert(name.into(), Vec::with_capacity(len));
    }
    for second in 0..len {
        let stats = collector.seconds.get(second);
        let mut processed = 0;
        for (k, name) in names.iter().enumerate() {
            let h = stats.map(|s| &s.lanes[k]);
            if k < 3 {
                processed += h.map_or(0, |h| h.len());
            } else {
                series.analytics.push(h.map_or(0, |h| h.len()));
            }
            let (p50, p99) = h.map_or((None, None), |h| (ms(h, 0.5), ms(h, 0.99)));
            if let Some(v) = series.p50_ms.get_mut(*name) {
                v.push(p50);
            }
            if let Some(v) = series.p99_ms.get_mut(*name) {
                v.push(p99);
            }
        }
        series.processed.push(processed);
        let priority = stats.map(|s| {
            let mut h = s.lanes[0].clone();
            let _ = h.add(&s.lanes[1]);
            h
        });
        series
            .priority_p99_ms
            .push(priority.and_then(|h| ms(&h, 0.99)));
    }
    series
}

fn overload_report(
    scenario: &Scenario,
    report: &Report,
    capacity: Option<f64>,
) -> Option<OverloadReport> {
    let idle = scenario.phases.iter().position(|p| p.idle_reference);
    let overload = scenario.phases.iter().position(|p| p.overload)?;
    let critical = |i: usize| {
        report.phases[i]
            .e2e_latency
            .get("critical")
            .map_or(0.0, |p| p.p99_ms)
    };
    let idle_p99 = idle.map_or(0.0, critical);
    let overload_p99 = critical(overload);
    let phase = &report.phases[overload];
    let (from, to) = (phase.start_s, phase.start_s + phase.duration_s);
    let during: Vec<&ThrottlePoint> = report
        .throttle
        .iter()
        .filter(|p| p.t_s >= from && p.t_s <= to + 30.0)
        .collect();
    Some(OverloadReport {
        capacity_per_s: capacity.map(f64::round),
        offered_per_s: phase.offered_per_s,
        idle_critical_p99_ms: idle_p99,
        overload_critical_p99_ms: overload_p99,
        critical_p99_ratio: (idle_p99 > 0.0).then(|| overload_p99 / idle_p99),
        max_deferred: during.iter().map(|p| p.deferred).max().unwrap_or(0),
        min_throttle_level: during.iter().map(|p| p.level).min(),
        seconds_paused: during.iter().filter(|p| p.consumer_paused).count() as u64,
    })
}

/// Recovery: the first second after the restart from which the priority p99 is under target for
/// three seconds running (or to the end of the data).
pub fn recovery_after(
    priority_p99_ms: &[Option<f64>],
    killed_s: f64,
    restarted_s: f64,
    target_ms: f64,
) -> Option<f64> {
    let from = restarted_s.floor() as usize;
    (from..priority_p99_ms.len()).find_map(|second| {
        let window: Vec<_> = priority_p99_ms[second..]
            .iter()
            .take(3)
            .filter_map(|p| *p)
            .collect();
        let good = priority_p99_ms[second].is_some_and(|p| p <= target_ms)
            && window.iter().all(|p| *p <= target_ms);
        good.then(|| (second as f64 + 1.0 - killed_s).max(0.0))
    })
}

fn fault_report(
    fault: &crate::scenario::Fault,
    series: &Series,
    killed: f64,
    restarted: f64,
) -> FaultReport {
    let round = |s: f64| (s * 10.0).round() / 10.0;
    FaultReport {
        kind: fault.kind.as_str().to_owned(),
        role: fault.role.clone().unwrap_or_else(|| match fault.kind {
            FaultKind::RestartNats | FaultKind::KillNats => "nats-server".into(),
            FaultKind::StoreDown => "store".into(),
            FaultKind::RestoreStreams | FaultKind::KillRole => "streams".into(),
        }),
        recovery_after_end_s: recovery_after(
            &series.priority_p99_ms,
            restarted,
            restarted,
            fault.recovery_p99_ms,
        )
        .map(round),
        killed_at_s: (killed * 10.0).round() / 10.0,
        restarted_at_s: (restarted * 10.0).round() / 10.0,
        recovery_target_ms: fault.recovery_p99_ms,
        recovery_s: recovery_after(
            &series.priority_p99_ms,
            killed,
            restarted,
            fault.recovery_p99_ms,
        )
        .map(|s| (s * 10.0).round() / 10.0),
        worst_priority_p99_ms: series
            .priority_p99_ms
            .iter()
            .filter_map(|p| *p)
            .fold(0.0, f64::max),
    }
}

/// The synchronous baseline: the same driver model against the in-harness synchronous server.
async fn sync_baseline(scenario: &Scenario, phases: &[PhaseReport]) -> Result<SyncReport> {
    let server = SyncServer::start().await?;
    let duration = scenario.baselines.sync_duration;
    // The main load's shape (its first counted phase), or a closed model of `sync_users`.
    let load = match scenario.baselines.sync_users {
        Some(users) => Load::Closed {
            users,
            think: Duration::ZERO,
        },
        None => {
            let main = scenario
                .phases
                .iter()
                .zip(phases)
                .find(|(p, _)| !p.exclude_from_totals)
                .or_else(|| scenario.phases.iter().zip(phases).next())
                .context("no phase")?;
            match (main.1.users, main.1.offered_per_s) {
                (Some(users), _) => Load::Closed {
                    users,
                    think: main.0.think_time,
                },
                (None, Some(rate)) => Load::Open {
                    rate,
                    to_rate: rate,
                },
                _ => anyhow::bail!("the main phase has no load to copy"),
            }
        }
    };
    let config = DriverConfig {
        kind: DriverKind::Http,
        ..scenario.driver.clone()
    };
    let concurrency = match load {
        Load::Closed { users, .. } => users,
        Load::Open { .. } => config.connections,
    };
    let driver = Arc::new(Driver::new(
        &config,
        Target::Http {
            base_url: server.base_url.clone(),
            priority_url: None,
            keys: vec!["sync".into()],
        },
        concurrency,
    )?);
    let run = Arc::new(Run::new(
        rand::random::<u32>() & 0x3f_ffff,
        duration.as_secs() as usize + 60,
    ));
    let context = PhaseContext {
        run: Arc::clone(&run),
        driver,
        mix: scenario.mix.clone(),
        tenant_names: tenant_names(&scenario.mix).into(),
        seed: scenario.seed ^ 0x5eed,
        events_per_send: 1,
        connections: config.connections,
        retries: None,
    };
    let sent = run_phase(&context, 0, load, 0, duration).await;
    let elapsed = (sent.end_ns - sent.start_ns) as f64 / 1e9;
    let ok = run.acked.load(Relaxed);
    let by_class = Class::ALL
        .iter()
        .map(|c| {
            (
                c.as_str().to_owned(),
                Percentiles::of(&sent.ack[*c as usize]),
            )
        })
        .collect();
    drop(server);
    Ok(SyncReport {
        load: match load {
            Load::Closed { users, think } => format!(
                "closed, {users} users, think {} ms, HTTP single",
                think.as_millis()
            ),
            Load::Open { rate, .. } => format!("open {rate:.0}/s, HTTP single"),
        },
        duration_s: (elapsed * 10.0).round() / 10.0,
        sent: run.sent.load(Relaxed),
        ok,
        errors: run.errors.load(Relaxed),
        // Set by finish_ratios: answers over the time it took to get them.
        throughput_per_s: 0.0,
        latency: Percentiles::of(&merged(sent.ack.iter().cloned())),
        by_class,
    })
}

pub fn finish_ratios(report: &mut Report) {
    // The best counted phase (warm-ups and probes only when nothing else counts).
    let counted = report.phases.iter().filter(|p| !p.excluded_from_totals);
    let best = counted
        .max_by(|a, b| a.e2e_per_s.total_cmp(&b.e2e_per_s))
        .or_else(|| {
            report
                .phases
                .iter()
                .max_by(|a, b| a.e2e_per_s.total_cmp(&b.e2e_per_s))
        });
    let mut ratios = Ratios::default();
    // Sustained: every event processed, over the time from the first send to the last completion.
    let last = report
        .series
        .processed
        .iter()
        .rposition(|n| *n > 0)
        .map_or(0.0, |i| i as f64 + 1.0);
    if last > 0.0 {
        ratios.sustained_e2e_per_s = (report.loss.processed as f64 / last).round();
        ratios.sustained_window_s = last;
    }
    if let Some(best) = best {
        ratios.ours_e2e_per_s = best.e2e_per_s.round();
        ratios.ours_phase = best.name.clone();
        // Kept up with an open model's offered rate, and that rate is what the ratios use.
        ratios.offered_limited = best
            .offered_per_s
            .is_some_and(|offered| best.e2e_per_s >= 0.9 * offered)
            && best.e2e_per_s >= ratios.sustained_e2e_per_s;
        if let Some(all) = best.e2e_latency.get("all") {
            ratios.ours_p50_ms = all.p50_ms;
            ratios.ours_p99_ms = all.p99_ms;
            ratios.ours_mean_ms = (all.mean_ms * 10.0).round() / 10.0;
        }
    }
    let round = |v: f64| (v * 1000.0).round() / 1000.0;
    // The ratios take the better of the two: the best phase's in-load rate, or the sustained one.
    let ours = ratios.ours_e2e_per_s.max(ratios.sustained_e2e_per_s);
    if let Some(raw) = &report.baselines.raw {
        ratios.ours_vs_raw_publish = Some(round(ours / raw.publish_per_s));
        ratios.ours_vs_raw_hop = Some(round(ours / raw.publish_then_consume_per_s));
    }
    if let Some(sync) = &mut report.baselines.sync {
        // Answers over the time it took to get them (the last answers come after the load's
        // nominal end: an open model below the server's pace would otherwise read as its pace).
        sync.throughput_per_s = (sync.ok as f64 / sync.duration_s.max(1e-3)).round();
    }
    if let Some(sync) = &report.baselines.sync {
        ratios.ours_vs_sync =
            (sync.throughput_per_s > 0.0).then(|| round(ours / sync.throughput_per_s));
        ratios.sync_p50_ms = Some(sync.latency.p50_ms);
        ratios.sync_p99_ms = Some(sync.latency.p99_ms);
        ratios.sync_mean_ms = Some((sync.latency.mean_ms * 10.0).round() / 10.0);
    }
    report.ratios = ratios;
}

pub fn write_outputs(report: &Report, dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    std::fs::write(dir.join("summary.md"), report.markdown())?;
    std::fs::write(dir.join("report.html"), crate::html::render(report))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{mix::Class, tracker::ACKED};

    #[test]
    fn every_event_is_accounted_for_and_acked_but_missing_fails() {
        let scenario = Scenario::parse(
            "name = \"t\"\n[[phase]]\nname = \"main\"\nduration = \"1s\"\nrate = 4\n",
        )
        .expect("scenario");
        let run = Arc::new(Run::new(9, 10));
        let mut collector = Collector::new(Arc::clone(&run), 1);
        for index in 0..4 {
            run.next_index();
            run.slots
                .generate(index, index * 250_000_000, Class::Critical, 0);
            run.mark_sent(index, index * 250_000_000);
        }
        // 0: acked, processed twice; 1: acked, never processed; 2: refused but stored and
        // processed; 3: acked and dead-lettered.
        run.slots.mark(0, ACKED | crate::tracker::PROBE);
        run.slots.mark(1, ACKED);
        run.mark_error(2, 500_000_000, "http 503");
        run.slots.mark(3, ACKED);
        run.slots.mark(3, crate::tracker::DEAD_LETTERED);
        let done = |index: u64| run.event_id(index, index * 250_000_000);
        let at = run.started_unix_ns + 900_000_000;
        for ids in [vec![done(0), done(2)], vec![done(0)]] {
            collector.on_notice(&bus::control::ProcessedNotice {
                role: "projector".into(),
                lane: "critical".into(),
                at_ns: at,
                ids,
            });
        }
        let phase_runs = [PhaseRun {
            load: Load::Open {
                rate: 4.0,
                to_rate: 4.0,
            },
            sent: crate::driver::PhaseSent {
                ack: std::array::from_fn(|_| histogram(3)),
                start_ns: 0,
                end_ns: 1_000_000_000,
            },
            probe: Some((1, {
                let mut ack = histogram(3);
                crate::tracker::record(&mut ack, Duration::from_millis(3));
                ack
            })),
        }];
        let dead_letters = DeadLetters {
            reasons: [(3, "max_deliveries".to_owned())].into(),
            by_reason: [("max_deliveries".to_owned(), 1)].into(),
            foreign: 0,
        };
        let mut report = build_report(
            &scenario,
            &run,
            &collector,
            &phase_runs,
            Accounting {
                dead_letters: &dead_letters,
                drain_s: 1.0,
                drained: false,
                load_end_ns: 1_000_000_000,
            },
        );
        let loss = &report.loss;
        assert_eq!(
            (loss.sent, loss.acked, loss.errors, loss.processed),
            (4, 3, 1, 2)
        );
        assert_eq!((loss.duplicates, loss.dead_lettered), (1, 1));
        assert_eq!(loss.missing, 1);
        assert_eq!(loss.missing_ids, vec![done(1)]);
        assert_eq!(
            (
                loss.acked_processed,
                loss.acked_dead_lettered,
                loss.acked_deduplicated
            ),
            (1, 1, 0),
            "acked = processed + dead-lettered + deduplicated retries + missing"
        );
        assert_eq!(
            loss.unexpected_dead_letters, 1,
            "a dead letter of an event not meant to fail"
        );
        assert_eq!(loss.processed_without_ack, 1);
        assert_eq!(report.phases[0].e2e_latency["critical"].count, 2);
        let probe = report.totals.probe.clone().expect("the probe ran");
        assert_eq!(
            (probe.sent, probe.ack.count, probe.e2e.count),
            (1, 1, 1),
            "the probe's event, once (its second report is a duplicate), apart from the rest"
        );
        assert!((probe.e2e.p99_ms - 900.0).abs() < 5.0, "{probe:?}");
        let mut slo = scenario.slo.clone();
        slo.probe_critical_p99_ms = Some(25.0);
        report.evaluate(&slo);
        assert!(!report.passed, "an acked event went missing");
        let probe_verdict = report
            .slos
            .iter()
            .find(|v| v.name.contains("probe"))
            .expect("the probe's SLO");
        assert!(!probe_verdict.passed, "900 ms is over 25 ms");
        assert!(report.markdown().contains("## Critical probe"));
    }

    #[test]
    fn recovery_is_the_first_steady_second_after_the_restart() {
        let s = |v: &[f64]| {
            v.iter()
                .map(|x| (*x >= 0.0).then_some(*x))
                .collect::<Vec<_>>()
        };
        // Killed at 2.5 s, restarted at 5.2 s; backlog drains with high p99 until second 7.
        let p99 = s(&[5.0, 5.0, 5.0, -1.0, -1.0, 900.0, 400.0, 20.0, 8.0, 9.0]);
        assert_eq!(recovery_after(&p99, 2.5, 5.2, 25.0), Some(8.0 - 2.5));
        // A single good second followed by a bad one does not count.
        let p99 = s(&[5.0, 900.0, 10.0, 300.0, 10.0, 10.0, 10.0]);
        assert_eq!(recovery_after(&p99, 0.5, 1.0, 25.0), Some(5.0 - 0.5));
        assert_eq!(recovery_after(&s(&[900.0, 900.0]), 0.0, 0.0, 25.0), None);
    }
}
