//! The fault matrix (`crm-load chaos`): every scenario in `loadtest/scenarios/chaos/`, in file
//! name order, each on a platform of its own, as written or in its `[short]` form. Each row's
//! full report lands in `<out>/<row>/`; `<out>/report.md` (and `matrix.json`) has one line per
//! row: the fault, then acked = processed + dead-lettered (by reason) + retries answered
//! `duplicate` + lost, the duplicate effects found in the store, the recovery, and the verdict
//! with the checks that failed.

use crate::{
    report::Report,
    run::{Options, run},
    scenario::{Scenario, Variant},
    stack::StackPaths,
};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
};

/// One row of the matrix.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// The scenario's name (its file name).
    pub name: String,
    /// What the row does (the scenario's description).
    pub fault: String,
    pub sent: u64,
    pub acked: u64,
    pub processed: u64,
    pub dead_lettered: BTreeMap<String, u64>,
    /// Retries answered `duplicate: true` (their original carries the effect).
    pub deduplicated: u64,
    pub lost: u64,
    /// `None`: the store could not be read.
    pub duplicate_effects: Option<u64>,
    pub missing_effects: Option<u64>,
    /// Seconds from the fault's end until the priority lanes' p99 is back under target.
    pub recovery_s: Option<f64>,
    /// How long the fault lasted (s).
    pub down_s: Option<f64>,
    /// Lane messages left after the drain.
    pub lane_messages: Option<u64>,
    pub passed: bool,
    /// The SLOs and checks that failed, or the error that stopped the row.
    pub failures: Vec<String>,
    /// Notes: the fault's marks (lane refusals, DLQ write failures, …).
    pub notes: Vec<String>,
}

impl Row {
    /// The row a finished run makes.
    pub fn of(name: &str, scenario: &Scenario, report: &Report) -> Self {
        let l = &report.loss;
        let lanes: Vec<u64> = report
            .streams
            .iter()
            .filter(|s| s.name.starts_with("CRM_LANE_"))
            .map(|s| s.messages)
            .collect();
        let mut notes: Vec<String> = report
            .fault_checks
            .iter()
            .map(|c| format!("{}: {}", c.what, c.measured))
            .collect();
        if l.errors > 0 {
            notes.push(format!("{} sends refused or failed (not acked)", l.errors));
        }
        if l.duplicates > 0 {
            notes.push(format!(
                "{} events reported processed again (redelivered)",
                l.duplicates
            ));
        }
        if l.found_in_store > 0 {
            notes.push(format!(
                "{} processed events found in the ledger (notice lost)",
                l.found_in_store
            ));
        }
        if !l.missing_ids.is_empty() {
            notes.push(format!("lost (first): {}", l.missing_ids.join(", ")));
        }
        Self {
            name: name.to_owned(),
            fault: scenario.description.trim().to_owned(),
            sent: l.sent,
            acked: l.acked,
            processed: l.acked_processed,
            dead_lettered: l.dead_letter_reasons.clone(),
            deduplicated: l.acked_deduplicated,
            lost: l.missing,
            duplicate_effects: report.effects.as_ref().map(|e| e.duplicate_effects),
            missing_effects: report.effects.as_ref().map(|e| e.missing_effects),
            recovery_s: report.fault.as_ref().and_then(|f| f.recovery_after_end_s),
            down_s: report
                .fault
                .as_ref()
                .filter(|f| f.kind != "restore_streams")
                .map(|f| ((f.restarted_at_s - f.killed_at_s) * 10.0).round() / 10.0),
            lane_messages: (!lanes.is_empty()).then(|| lanes.iter().sum()),
            passed: report.passed,
            failures: report
                .slos
                .iter()
                .filter(|v| !v.passed)
                .map(|v| format!("{}: {} (limit {})", v.name, v.measured, v.limit))
                .collect(),
            notes,
        }
    }

    /// A row whose run stopped on an error.
    pub fn failed(name: &str, fault: &str, error: &anyhow::Error) -> Self {
        Self {
            name: name.to_owned(),
            fault: fault.to_owned(),
            failures: vec![format!("error: {error:#}")],
            ..Self::default()
        }
    }
}

/// The matrix as Markdown.
pub fn markdown(rows: &[Row], variant: Variant, machine: &str) -> String {
    let mut md = String::new();
    let passed = rows.iter().filter(|r| r.passed).count();
    let _ = writeln!(
        md,
        "# Fault matrix{}\n",
        if variant == Variant::Short {
            " (short form)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "{machine}\n\n**{passed} of {} rows passed.** Each row: a fresh platform under load from crm-load, \
         one fault, then the drain and the loss accounting. acked = processed + dead-lettered + retries \
         answered `duplicate` + lost. Duplicate effects: the store's ledger and counters against one \
         effect per (tenant, idempotency key) processed. Recovery: from the fault's end until the \
         critical + high p99 per second is back under target (100 ms) for 3 s; \"not reached\": not while \
         the load lasted.\n",
        rows.len()
    );
    let _ = writeln!(
        md,
        "| row | fault | acked | processed | dead-lettered (reason) | retries answered duplicate | lost | duplicate effects | down s | recovery s | lanes after | result |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let dead: u64 = row.dead_lettered.values().sum();
        let reasons: Vec<String> = row
            .dead_lettered
            .iter()
            .map(|(reason, n)| format!("{n} {reason}"))
            .collect();
        let opt = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.1}"));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | **{}** | {} | {} | {} | {} | {} |",
            row.name,
            row.fault.replace('|', "/"),
            row.acked,
            row.processed,
            if reasons.is_empty() {
                "0".into()
            } else {
                format!("{dead} ({})", reasons.join(", "))
            },
            row.deduplicated,
            row.lost,
            row.duplicate_effects
                .map_or("not measured".into(), |d| d.to_string()),
            opt(row.down_s),
            match (row.down_s, row.recovery_s) {
                (_, Some(s)) => format!("{s:.1}"),
                (Some(_), None) => "not reached".into(),
                (None, None) => "—".into(),
            },
            row.lane_messages.map_or("—".into(), |n| n.to_string()),
            if row.passed { "pass" } else { "**FAIL**" }
        );
    }
    let _ = writeln!(md, "\n## Per row\n");
    for row in rows {
        let _ = writeln!(
            md,
            "- **{}** ({}): {}{}",
            row.name,
            if row.passed { "pass" } else { "FAIL" },
            if row.notes.is_empty() {
                "—".to_owned()
            } else {
                row.notes.join("; ")
            },
            if row.failures.is_empty() {
                String::new()
            } else {
                format!(". Failed: {}", row.failures.join("; "))
            }
        );
    }
    md
}

/// What to run.
#[derive(Debug, Clone)]
pub struct MatrixOptions {
    /// The directory of row scenarios (`loadtest/scenarios/chaos`).
    pub dir: PathBuf,
    pub variant: Variant,
    pub out: PathBuf,
    /// Only the rows whose name contains this.
    pub only: Option<String>,
    pub paths: StackPaths,
}

/// The row scenario files, in name order.
pub fn row_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Run every row; write `report.md` and `matrix.json` to `out` after each (a matrix stopped
/// halfway keeps what it measured).
pub async fn run_matrix(options: &MatrixOptions) -> Result<Vec<Row>> {
    std::fs::create_dir_all(&options.out)?;
    let machine = describe_machine(&options.paths);
    let mut rows = Vec::new();
    for file in row_files(&options.dir)? {
        let scenario = Scenario::load_variant(&file, options.variant)?;
        if options
            .only
            .as_deref()
            .is_some_and(|only| !scenario.name.contains(only))
        {
            continue;
        }
        let name = scenario.name.clone();
        eprintln!("\n=== chaos row {name}: {}", scenario.description.trim());
        let out_dir = options.out.join(&name);
        let result = run(Options {
            scenario: scenario.clone(),
            out_dir,
            paths: options.paths.clone(),
            external: None,
        })
        .await;
        let row = match result {
            Ok(report) => Row::of(&name, &scenario, &report),
            Err(err) => {
                eprintln!("chaos row {name}: error: {err:#}");
                Row::failed(&name, scenario.description.trim(), &err)
            }
        };
        eprintln!(
            "=== chaos row {name}: {} (acked {}, processed {}, dead-lettered {}, lost {})",
            if row.passed { "pass" } else { "FAIL" },
            row.acked,
            row.processed,
            row.dead_lettered.values().sum::<u64>(),
            row.lost
        );
        rows.push(row);
        std::fs::write(
            options.out.join("report.md"),
            markdown(&rows, options.variant, &machine),
        )?;
        std::fs::write(
            options.out.join("matrix.json"),
            serde_json::to_string_pretty(&rows)?,
        )?;
    }
    Ok(rows)
}

fn describe_machine(paths: &StackPaths) -> String {
    let m = crate::procs::Machine::describe(
        &crate::stack::nats_server_version(&paths.nats_server),
        "per row",
    );
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    format!(
        "Run {now}. Machine: {} × {}, {} GiB RAM, Linux {}; nats-server {}.",
        m.nproc, m.cpu_model, m.ram_gib, m.kernel, m.nats_server
    )
}

/// Read `matrix.json` back and render `report.md` again.
pub fn rerender(out: &Path, variant: Variant) -> Result<String> {
    let rows: Vec<Row> = serde_json::from_str(
        &std::fs::read_to_string(out.join("matrix.json")).context("reading matrix.json")?,
    )?;
    let old = std::fs::read_to_string(out.join("report.md")).unwrap_or_default();
    let machine = old
        .lines()
        .find(|l| l.starts_with("Run "))
        .unwrap_or("")
        .to_owned();
    let md = markdown(&rows, variant, &machine);
    std::fs::write(out.join("report.md"), &md)?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        effects::EffectsReport,
        evidence::FaultCheck,
        report::{FaultReport, StreamReport},
    };

    #[test]
    fn a_row_adds_up_and_names_what_failed() {
        let scenario = Scenario::parse(
            "name = \"lane-full\"\ndescription = \"CRM_LANE_STANDARD at 64 KiB\"\n\
             [[phase]]\nname = \"main\"\nduration = \"1s\"\nrate = 10\n",
        )
        .expect("scenario");
        let mut report = Report::default();
        report.loss.acked = 10;
        report.loss.acked_processed = 7;
        report.loss.acked_dead_lettered = 2;
        report.loss.missing = 1;
        report.loss.missing_ids = vec!["id-1".into()];
        report.loss.dead_letter_reasons = BTreeMap::from([("invalid_event".into(), 2)]);
        report.effects = Some(EffectsReport {
            duplicate_effects: 3,
            ..EffectsReport::default()
        });
        report.streams = vec![
            StreamReport {
                name: "CRM_LANE_STANDARD".into(),
                messages: 4,
                ..StreamReport::default()
            },
            StreamReport {
                name: "CRM_INGEST".into(),
                messages: 10,
                ..StreamReport::default()
            },
        ];
        report.fault = Some(FaultReport {
            kind: "kill_nats".into(),
            killed_at_s: 5.0,
            restarted_at_s: 10.5,
            recovery_after_end_s: Some(2.0),
            ..FaultReport::default()
        });
        report.fault_checks = vec![FaultCheck {
            what: "CRM_LANE_STANDARD refused the router".into(),
            measured: "12 lane refusals".into(),
            passed: true,
        }];
        report.evaluate(&crate::scenario::Slo {
            max_duplicate_effects: Some(0),
            lanes_empty: Some(true),
            ..crate::scenario::Slo::default()
        });
        let row = Row::of("lane-full", &scenario, &report);
        assert!(!row.passed);
        assert_eq!((row.acked, row.processed, row.lost), (10, 7, 1));
        assert_eq!(row.duplicate_effects, Some(3));
        assert_eq!(row.down_s, Some(5.5));
        assert_eq!(row.lane_messages, Some(4));
        for failure in ["no acked event missing", "duplicate effects", "lanes empty"] {
            assert!(
                row.failures.iter().any(|f| f.contains(failure)),
                "{failure}: {:?}",
                row.failures
            );
        }
        let md = markdown(&[row], Variant::Full, "Run x.");
        assert!(md.contains("**0 of 1 rows passed.**"), "{md}");
        assert!(
            md.contains("| lane-full | CRM_LANE_STANDARD at 64 KiB | 10 | 7 | 2 (2 invalid_event) | 0 | **1** | 3 | 5.5 | 2.0 | 4 | **FAIL** |"),
            "{md}"
        );
        assert!(md.contains("12 lane refusals"), "{md}");
    }
}
