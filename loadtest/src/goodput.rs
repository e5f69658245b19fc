//! Goodput and shed per generated class. Per phase and class: the events acked *and* processed
//! by the projector, per second of the phase (events belong to the phase they were generated
//! in, wherever they completed), and the events shed: refused with `Retry-After` and never acked
//! after the retries, or held back by the bulk admission signal until their phase ended. A shed
//! event was never acked, so it is neither lost nor missing. Also the run's shed accounting.

use crate::{
    admission::LimitReason,
    mix::Class,
    report::{Loss, PhaseReport, Report},
    scenario::Scenario,
    tracker::Run,
};
use serde::{Deserialize, Serialize};
use std::{collections::BTreeMap, fmt::Write as _, sync::atomic::Ordering::Relaxed};

/// One class in one phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassGoodput {
    /// Events of the class generated in the phase.
    pub generated: u64,
    pub acked: u64,
    /// Acked and processed by the projector.
    pub processed: u64,
    /// `processed` ÷ the phase's duration.
    pub goodput_per_s: f64,
    /// Never acked: refused with `Retry-After` to the last attempt, or deferred past the phase.
    pub shed: u64,
}

impl ClassGoodput {
    fn add(&mut self, other: &Self) {
        self.generated += other.generated;
        self.acked += other.acked;
        self.processed += other.processed;
        self.shed += other.shed;
    }

    fn with_rate(mut self, seconds: f64) -> Self {
        self.goodput_per_s = if seconds > 0.0 {
            (self.processed as f64 / seconds * 10.0).round() / 10.0
        } else {
            0.0
        };
        self
    }
}

/// What the slots say, counted once over the run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// Per phase, per class (in [`Class::ALL`] order).
    pub phases: Vec<[ClassGoodput; 4]>,
    /// Shed without ever being sent (deferred by the admission signal past the phase).
    pub shed_unsent: u64,
    /// Refused at least once, then acked on a later attempt.
    pub acked_after_refusal: u64,
}

/// Count every generated event of `run` by phase and class.
pub fn tally(run: &Run, phases: usize) -> Tally {
    let mut tally = Tally {
        phases: vec![[ClassGoodput::default(); 4]; phases.max(1)],
        ..Tally::default()
    };
    let last = tally.phases.len() - 1;
    for index in 0..run.next_index.load(Relaxed) {
        let Some(view) = run.slots.view(index) else {
            continue;
        };
        let cell = &mut tally.phases[view.phase.min(last)][view.class as usize];
        cell.generated += 1;
        if view.acked() {
            cell.acked += 1;
            if view.projector_reports() > 0 {
                cell.processed += 1;
            }
            if view.flags & crate::tracker::REFUSED != 0 {
                tally.acked_after_refusal += 1;
            }
        }
        if view.shed() {
            cell.shed += 1;
            if !view.sent() {
                tally.shed_unsent += 1;
            }
        }
    }
    tally
}

fn by_class(cells: &[ClassGoodput; 4], seconds: f64) -> BTreeMap<String, ClassGoodput> {
    Class::ALL
        .iter()
        .map(|class| {
            (
                class.as_str().to_owned(),
                cells[*class as usize].with_rate(seconds),
            )
        })
        .collect()
}

fn set_phase(phase: &mut PhaseReport, cells: &[ClassGoodput; 4]) {
    phase.shed = cells.iter().map(|c| c.shed).sum();
    phase.goodput = by_class(cells, phase.duration_s);
}

/// Fill goodput and shed into `report`'s phases and totals (the phases `scenario` counts), and
/// the shed accounting into its loss.
pub fn fill(report: &mut Report, run: &Run, scenario: &Scenario) {
    let tally = tally(run, scenario.phases.len());
    let mut totals = [ClassGoodput::default(); 4];
    for (index, (phase, cells)) in report.phases.iter_mut().zip(&tally.phases).enumerate() {
        set_phase(phase, cells);
        if !scenario.phases[index].exclude_from_totals {
            for (total, cell) in totals.iter_mut().zip(cells) {
                total.add(cell);
            }
        }
    }
    set_phase(&mut report.totals, &totals);
    let loss: &mut Loss = &mut report.loss;
    loss.shed = tally.phases.iter().flatten().map(|c| c.shed).sum();
    loss.shed_unsent = tally.shed_unsent;
    loss.acked_after_refusal = tally.acked_after_refusal;
    loss.refusals = run.refusals.load(Relaxed);
    loss.retries = run.retries.load(Relaxed);
    loss.deferred = run.deferrals.load(Relaxed);
    loss.refusal_kinds = run
        .refusal_kinds
        .lock()
        .map(|kinds| kinds.clone())
        .unwrap_or_default();
}

/// The goodput table of summary.md (nothing when no phase has any).
pub fn markdown(report: &Report, md: &mut String) {
    let rows: Vec<&PhaseReport> = report
        .phases
        .iter()
        .chain(std::iter::once(&report.totals))
        .filter(|p| !p.goodput.is_empty())
        .collect();
    if rows.is_empty() {
        admission_markdown(report, md);
        return;
    }
    let _ = writeln!(
        md,
        "\n## Goodput by generated class (acked and processed events/s of the phase; shed)\n"
    );
    let _ = writeln!(
        md,
        "| phase | critical | high | standard | analytics_only |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    for phase in rows {
        let cells: Vec<String> = Class::ALL
            .iter()
            .map(|class| {
                phase.goodput.get(class.as_str()).map_or("—".into(), |g| {
                    format!("{:.1}/s, shed {}", g.goodput_per_s, g.shed)
                })
            })
            .collect();
        let _ = writeln!(md, "| {} | {} |", phase.name, cells.join(" | "));
    }
    let l = &report.loss;
    if l.refusals > 0 || l.deferred > 0 {
        let kinds: Vec<String> = l
            .refusal_kinds
            .iter()
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect();
        let _ = writeln!(
            md,
            "\nRefused with Retry-After {} times ({}); {} retries, {} events acked after a \
             refusal; {} bulk events deferred by the admission signal. Shed (never acked): {}, \
             of which {} were never sent.",
            l.refusals,
            if kinds.is_empty() {
                "—".into()
            } else {
                kinds.join(", ")
            },
            l.retries,
            l.acked_after_refusal,
            l.deferred,
            l.shed,
            l.shed_unsent
        );
    }
    admission_markdown(report, md);
}

/// How often the gateway limited bulk, how far, and why.
fn admission_markdown(report: &Report, md: &mut String) {
    let limited: Vec<_> = report.admission.iter().filter(|p| p.limited).collect();
    if limited.is_empty() {
        return;
    }
    let lowest = limited
        .iter()
        .filter_map(|p| p.bulk_rate)
        .fold(f64::INFINITY, f64::min);
    let mut why: Vec<(LimitReason, usize)> = Vec::new();
    for point in &limited {
        match why.iter_mut().find(|(reason, _)| *reason == point.reason) {
            Some((_, n)) => *n += 1,
            None => why.push((point.reason, 1)),
        }
    }
    why.sort_by_key(|&(reason, n)| (std::cmp::Reverse(n), reason.as_str()));
    let why: Vec<String> = why
        .iter()
        .map(|(reason, n)| format!("{} {n}", reason.as_str().replace('_', " ")))
        .collect();
    let _ = writeln!(
        md,
        "\nAdmission signal: bulk limited in {} of {} signals (lowest allowed bulk rate \
         {lowest:.0}/s; why: {}).",
        limited.len(),
        report.admission.len(),
        why.join(", ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::{ACKED, DEFERRED, ERROR, REFUSED, SENT};

    const SCENARIO: &str = r#"
name = "t"
[[phase]]
name = "warm"
duration = "1s"
rate = 10
exclude_from_totals = true
[[phase]]
name = "main"
duration = "2s"
rate = 10
"#;

    #[test]
    fn goodput_counts_acked_and_processed_and_shed_is_never_acked() {
        let scenario = Scenario::parse(SCENARIO).expect("scenario");
        let run = std::sync::Arc::new(Run::new(3, 10));
        let mut collector = crate::tracker::Collector::new(std::sync::Arc::clone(&run), 2);
        let mut processed = Vec::new();
        let mut add = |phase, class, flags, done: bool| {
            let index = run.next_index();
            run.slots.generate(index, index, class, phase);
            run.slots.mark(index, flags);
            if done {
                processed.push(run.event_id(index, index));
            }
        };
        // Warm-up: one critical acked and processed.
        add(0, Class::Critical, SENT | ACKED, true);
        // Main: critical acked+processed ×2, acked not processed ×1 (missing, not goodput).
        add(1, Class::Critical, SENT | ACKED, true);
        add(1, Class::Critical, SENT | ACKED, true);
        add(1, Class::Critical, SENT | ACKED, false);
        // Standard: refused then acked and processed; refused to the end (shed); refused then
        // failed (an error, not shed); deferred and never sent (shed, unsent).
        add(1, Class::Standard, SENT | REFUSED | ACKED, true);
        add(1, Class::Standard, SENT | REFUSED, false);
        add(1, Class::Standard, SENT | REFUSED | ERROR, false);
        add(1, Class::AnalyticsOnly, DEFERRED, false);
        collector.on_notice(&bus::control::ProcessedNotice {
            role: "projector".into(),
            lane: "standard".into(),
            at_ns: run.started_unix_ns + 1_000_000,
            ids: processed,
        });

        let tally = tally(&run, 2);
        assert_eq!(tally.phases[0][Class::Critical as usize].processed, 1);
        let main = &tally.phases[1];
        let critical = main[Class::Critical as usize];
        assert_eq!(
            (
                critical.generated,
                critical.acked,
                critical.processed,
                critical.shed
            ),
            (3, 3, 2, 0)
        );
        let standard = main[Class::Standard as usize];
        assert_eq!(
            (
                standard.generated,
                standard.acked,
                standard.processed,
                standard.shed
            ),
            (3, 1, 1, 1)
        );
        assert_eq!(main[Class::AnalyticsOnly as usize].shed, 1);
        assert_eq!((tally.shed_unsent, tally.acked_after_refusal), (1, 1));

        let mut report = Report {
            phases: vec![
                PhaseReport {
                    name: "warm".into(),
                    duration_s: 1.0,
                    ..PhaseReport::default()
                },
                PhaseReport {
                    name: "main".into(),
                    duration_s: 2.0,
                    ..PhaseReport::default()
                },
            ],
            ..Report::default()
        };
        fill(&mut report, &run, &scenario);
        assert_eq!(report.phases[1].shed, 2);
        assert_eq!(report.phases[1].goodput["critical"].goodput_per_s, 1.0);
        assert_eq!(report.phases[1].goodput["standard"].goodput_per_s, 0.5);
        // Totals leave the warm-up out.
        assert_eq!(report.totals.goodput["critical"].processed, 2);
        assert_eq!((report.loss.shed, report.loss.shed_unsent), (2, 1));
        let md = report.markdown();
        assert!(
            md.contains("| main | 1.0/s, shed 0 | 0.0/s, shed 0 | 0.5/s, shed 1 | 0.0/s, shed 1 |"),
            "{md}"
        );
    }

    #[test]
    fn the_admission_line_says_why_bulk_was_limited() {
        use crate::admission::{AdmissionPoint, LimitReason};
        let point = |limited, bulk_rate, reason| AdmissionPoint {
            limited,
            bulk_rate,
            reason,
            ..AdmissionPoint::default()
        };
        let report = Report {
            admission: vec![
                point(false, None, LimitReason::Healthy),
                point(true, Some(900.0), LimitReason::PipelineDelay),
                point(true, Some(400.0), LimitReason::PipelineDelay),
                point(true, Some(700.0), LimitReason::PublishDelay),
            ],
            ..Report::default()
        };
        let mut md = String::new();
        admission_markdown(&report, &mut md);
        assert!(
            md.contains(
                "bulk limited in 3 of 4 signals (lowest allowed bulk rate 400/s; why: \
                 pipeline delay 2, publish delay 1)"
            ),
            "{md}"
        );
    }
}
