//! The priority-inversion figure: how often an event of a lower class was committed (processed
//! by the projector) before an earlier-admitted (acked) event of a higher class, and how much
//! later the higher-class event was committed. "Priority holds" as a number, per run.
//!
//! For a pair of class sets (higher, lower), over the events that were both acked and committed:
//! an *inversion* is a (higher h, lower l) pair with `acked(l) > acked(h)` and
//! `committed(l) < committed(h)` (ties are not inversions: one ack answers a whole batch, one
//! notice settles a whole batch). A higher event is *overtaken* when it has at least one
//! inversion; its *delay* is `committed(h)` minus the earliest commit among the lower events
//! that overtook it. Sorting by ack time (latest first) and counting earlier commits in a Fenwick
//! tree makes it O(n log n), fine for millions of events.

use crate::{mix::Class, tracker::Run};
use serde::{Deserialize, Serialize};
use std::{fmt::Write as _, sync::atomic::Ordering::Relaxed};

/// One acked and committed event: its generated class, when its ack came back and when the
/// projector reported it, ns after the run's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completed {
    pub class: Class,
    pub acked_ns: u64,
    pub committed_ns: u64,
}

/// A pair of class sets whose order is measured.
#[derive(Debug, Clone, Copy)]
pub struct Pair {
    pub name: &'static str,
    pub higher: &'static [Class],
    pub lower: &'static [Class],
}

/// Critical against everything below it; high against bulk (standard and analytics-only, both
/// of which the platform treats as bulk).
pub const PAIRS: [Pair; 2] = [
    Pair {
        name: "critical vs lower",
        higher: &[Class::Critical],
        lower: &[Class::High, Class::Standard, Class::AnalyticsOnly],
    },
    Pair {
        name: "high vs standard",
        higher: &[Class::High],
        lower: &[Class::Standard, Class::AnalyticsOnly],
    },
];

/// The name of the pair the `max_critical_inversion_share` SLO reads.
pub const CRITICAL_PAIR: &str = PAIRS[0].name;

/// The figure for one pair.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InversionFigure {
    pub pair: String,
    /// Generated classes on each side, e.g. `critical` and `high+standard+analytics_only`.
    pub higher: String,
    pub lower: String,
    /// Acked and committed events on each side.
    pub higher_events: u64,
    pub lower_events: u64,
    /// (higher, lower) pairs where the lower event was acked later and committed earlier.
    pub inversions: u64,
    /// Higher events overtaken by at least one lower event acked after them.
    pub overtaken: u64,
    /// `overtaken ÷ higher_events` (0 when there are none).
    pub overtaken_share: f64,
    /// Over the overtaken higher events: how much later each was committed than the earliest
    /// committed lower event that overtook it.
    pub delay_p99_ms: f64,
    pub delay_max_ms: f64,
}

/// Counts of elements at positions ≤ i, with point increments; 1-based inside.
struct Fenwick {
    tree: Vec<u64>,
}

impl Fenwick {
    fn new(len: usize) -> Self {
        Self {
            tree: vec![0; len + 1],
        }
    }

    /// One more element at 0-based `position`.
    fn add(&mut self, position: usize) {
        let mut i = position + 1;
        while i < self.tree.len() {
            self.tree[i] += 1;
            i += i & i.wrapping_neg();
        }
    }

    /// Elements at 0-based positions `< end`.
    fn count_before(&self, end: usize) -> u64 {
        let mut i = end.min(self.tree.len() - 1);
        let mut sum = 0;
        while i > 0 {
            sum += self.tree[i];
            i -= i & i.wrapping_neg();
        }
        sum
    }
}

fn names(classes: &[Class]) -> String {
    classes
        .iter()
        .map(|c| c.as_str())
        .collect::<Vec<_>>()
        .join("+")
}

/// The figure for `pair` over `events` (any order; classes outside the pair are ignored).
pub fn figure(events: &[Completed], pair: &Pair) -> InversionFigure {
    // (acked, is_higher, committed), latest ack first; on equal acks the higher event comes
    // first, so a lower event acked at the same instant is not counted as acked after it.
    let mut items: Vec<(u64, bool, u64)> = events
        .iter()
        .filter_map(|e| {
            if pair.higher.contains(&e.class) {
                Some((e.acked_ns, true, e.committed_ns))
            } else if pair.lower.contains(&e.class) {
                Some((e.acked_ns, false, e.committed_ns))
            } else {
                None
            }
        })
        .collect();
    items.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
    let mut commits: Vec<u64> = items.iter().filter(|i| !i.1).map(|i| i.2).collect();
    commits.sort_unstable();
    commits.dedup();

    let mut seen_lower = Fenwick::new(commits.len());
    let mut earliest_lower = u64::MAX;
    let mut figure = InversionFigure {
        pair: pair.name.to_owned(),
        higher: names(pair.higher),
        lower: names(pair.lower),
        ..InversionFigure::default()
    };
    let mut delays = Vec::new();
    for &(_, higher, committed) in &items {
        if higher {
            figure.higher_events += 1;
            // Lower events acked after this one that were committed strictly before it.
            let before = seen_lower.count_before(commits.partition_point(|c| *c < committed));
            if before > 0 {
                figure.inversions += before;
                figure.overtaken += 1;
                // The earliest commit of all later-acked lower events is one of those (it is
                // before this commit, since at least one is).
                delays.push(committed - earliest_lower);
            }
        } else {
            figure.lower_events += 1;
            seen_lower.add(commits.partition_point(|c| *c < committed));
            earliest_lower = earliest_lower.min(committed);
        }
    }
    if figure.higher_events > 0 {
        figure.overtaken_share = figure.overtaken as f64 / figure.higher_events as f64;
    }
    delays.sort_unstable();
    let ms = |ns: u64| (ns as f64 / 1e4).round() / 100.0;
    if let Some(max) = delays.last() {
        // Nearest rank.
        let rank = ((delays.len() as f64 * 0.99).ceil() as usize).clamp(1, delays.len());
        figure.delay_p99_ms = ms(delays[rank - 1]);
        figure.delay_max_ms = ms(*max);
    }
    figure
}

/// Every acked and committed event of the run.
pub fn completed(run: &Run) -> Vec<Completed> {
    let total = run.next_index.load(Relaxed);
    (0..total)
        .filter_map(|index| {
            let view = run.slots.view(index)?;
            Some(Completed {
                class: view.class,
                acked_ns: view.acked_ns?,
                committed_ns: view.committed_ns?,
            })
        })
        .collect()
}

/// The run's figures, one per pair in [`PAIRS`].
pub fn of_run(run: &Run) -> Vec<InversionFigure> {
    let events = completed(run);
    PAIRS.iter().map(|pair| figure(&events, pair)).collect()
}

/// The inversion table of summary.md (nothing when the run has no figure).
pub fn markdown(figures: &[InversionFigure], md: &mut String) {
    if figures.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "\n## Priority inversion (a lower class committed before an earlier-acked higher class)\n"
    );
    let _ = writeln!(
        md,
        "| pair | higher / lower events | inversions | higher overtaken | share | delay p99 ms | delay max ms |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for f in figures {
        let _ = writeln!(
            md,
            "| {} ({} vs {}) | {} / {} | {} | {} | {:.2}% | {:.1} | {:.1} |",
            f.pair,
            f.higher,
            f.lower,
            f.higher_events,
            f.lower_events,
            f.inversions,
            f.overtaken,
            100.0 * f.overtaken_share,
            f.delay_p99_ms,
            f.delay_max_ms
        );
    }
    let _ = writeln!(
        md,
        "\nDelay: how much later the overtaken event was committed than the earliest-committed \
         lower-class event acked after it. Classes are as generated; acks and commits that share \
         an instant (one answer, one settled batch) are not inversions."
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    const MS: u64 = 1_000_000;

    fn event(class: Class, acked_ms: u64, committed_ms: u64) -> Completed {
        Completed {
            class,
            acked_ns: acked_ms * MS,
            committed_ns: committed_ms * MS,
        }
    }

    const CRITICAL: Pair = PAIRS[0];
    const HIGH: Pair = PAIRS[1];

    #[test]
    fn in_order_commits_have_no_inversion() {
        // Each event committed 5 ms after its ack, classes interleaved.
        let events: Vec<_> = (0..40)
            .map(|k| event(Class::ALL[k as usize % 4], k, k + 5))
            .collect();
        for pair in PAIRS {
            let f = figure(&events, &pair);
            assert_eq!((f.inversions, f.overtaken, f.overtaken_share), (0, 0, 0.0));
            assert_eq!((f.delay_p99_ms, f.delay_max_ms), (0.0, 0.0));
        }
        assert_eq!(figure(&events, &CRITICAL).higher_events, 10);
        assert_eq!(figure(&events, &CRITICAL).lower_events, 30);
        assert_eq!(
            figure(&[], &CRITICAL),
            InversionFigure {
                pair: "critical vs lower".into(),
                higher: "critical".into(),
                lower: "high+standard+analytics_only".into(),
                ..InversionFigure::default()
            }
        );
    }

    #[test]
    fn every_higher_event_overtaken_by_every_lower_one() {
        // Critical acked at 0..3 ms, committed at 100..103 ms; standard acked at 10..15 ms,
        // committed at 20..25 ms: every one of the 3 × 5 pairs is an inversion.
        let mut events: Vec<_> = (0..3).map(|k| event(Class::Critical, k, 100 + k)).collect();
        events.extend((0..5).map(|k| event(Class::Standard, 10 + k, 20 + k)));
        let f = figure(&events, &CRITICAL);
        assert_eq!((f.higher_events, f.lower_events), (3, 5));
        assert_eq!((f.inversions, f.overtaken), (15, 3));
        assert_eq!(f.overtaken_share, 1.0);
        // Delays: 100−20, 101−20, 102−20 ms.
        assert_eq!((f.delay_p99_ms, f.delay_max_ms), (82.0, 82.0));
        // High has no events here; the other pair is empty.
        assert_eq!(figure(&events, &HIGH).higher_events, 0);
    }

    #[test]
    fn a_hand_made_mix() {
        let events = [
            // c1: acked 10, committed 50. Overtaken by s2, a3 and h1 (acked after it, committed
            // before it); not by s1 (acked before it) nor s4 (committed after it).
            event(Class::Critical, 10, 50),
            event(Class::Standard, 5, 8),
            event(Class::Standard, 20, 30),
            event(Class::AnalyticsOnly, 25, 40),
            event(Class::Standard, 30, 60),
            // c2: acked 35, committed 70: overtaken by h1 only (s4 was acked before it).
            event(Class::Critical, 35, 70),
            event(Class::High, 40, 45),
            // c3 and a standard event acked at the same instant (one answer): not an inversion.
            event(Class::Critical, 80, 100),
            event(Class::Standard, 80, 90),
            // Committed at the same instant as c3 (one notice): not an inversion.
            event(Class::Standard, 85, 100),
        ];
        let f = figure(&events, &CRITICAL);
        assert_eq!((f.higher_events, f.lower_events), (3, 7));
        assert_eq!((f.inversions, f.overtaken), (4, 2));
        assert!((f.overtaken_share - 2.0 / 3.0).abs() < 1e-12);
        // c1: 50 − 30 = 20 ms (s2 is the earliest overtaker); c2: 70 − 45 = 25 ms.
        assert_eq!((f.delay_p99_ms, f.delay_max_ms), (25.0, 25.0));
        // High vs standard: h1 (acked 40, committed 45) is overtaken by nothing.
        let f = figure(&events, &HIGH);
        assert_eq!((f.higher_events, f.lower_events, f.inversions), (1, 6, 0));
    }

    #[test]
    fn the_report_shows_the_figures_and_the_slo_reads_the_critical_pair() {
        let events = [
            event(Class::Critical, 0, 50),
            event(Class::Critical, 1, 2),
            event(Class::Standard, 10, 20),
        ];
        let mut report = crate::report::Report {
            inversions: PAIRS.iter().map(|pair| figure(&events, pair)).collect(),
            ..crate::report::Report::default()
        };
        let md = report.markdown();
        assert!(
            md.contains(
                "| critical vs lower (critical vs high+standard+analytics_only) | 2 / 1 | 1 | 1 | 50.00% | 30.0 | 30.0 |"
            ),
            "{md}"
        );
        let slo = |share| crate::scenario::Slo {
            max_critical_inversion_share: Some(share),
            ..crate::scenario::Slo::default()
        };
        report.evaluate(&slo(0.5));
        assert!(report.passed, "{:?}", report.slos);
        report.evaluate(&slo(0.49));
        assert!(!report.passed);
        report.inversions.clear();
        report.evaluate(&slo(1.0));
        assert!(!report.passed, "not measured is not a pass");
    }

    /// The definition, literally: every pair.
    fn brute_force(events: &[Completed], pair: &Pair) -> (u64, u64, Vec<u64>) {
        let (mut inversions, mut overtaken, mut delays) = (0, 0, Vec::new());
        for h in events.iter().filter(|e| pair.higher.contains(&e.class)) {
            let overtakers: Vec<_> = events
                .iter()
                .filter(|l| {
                    pair.lower.contains(&l.class)
                        && l.acked_ns > h.acked_ns
                        && l.committed_ns < h.committed_ns
                })
                .collect();
            inversions += overtakers.len() as u64;
            if let Some(first) = overtakers.iter().map(|l| l.committed_ns).min() {
                overtaken += 1;
                delays.push(h.committed_ns - first);
            }
        }
        delays.sort_unstable();
        (inversions, overtaken, delays)
    }

    #[test]
    fn agrees_with_the_definition_on_random_runs() {
        let mut rng = SmallRng::seed_from_u64(11);
        for round in 0..200 {
            let n = rng.random_range(0..120);
            // Coarse times, so ties in acks and commits are common.
            let events: Vec<_> = (0..n)
                .map(|_| {
                    let acked = rng.random_range(0..50);
                    event(
                        Class::ALL[rng.random_range(0..4)],
                        acked,
                        acked + rng.random_range(0..30),
                    )
                })
                .collect();
            for pair in PAIRS {
                let f = figure(&events, &pair);
                let (inversions, overtaken, delays) = brute_force(&events, &pair);
                assert_eq!(
                    (f.inversions, f.overtaken),
                    (inversions, overtaken),
                    "{round}"
                );
                let max = delays.last().map_or(0.0, |d| *d as f64 / 1e6);
                assert_eq!(f.delay_max_ms, max, "{round}");
            }
        }
    }

    #[test]
    fn a_million_events() {
        // Bulk committed in ack order, critical 1 ms later than the bulk acked 0.5 ms after it:
        // each critical event is overtaken by exactly one bulk event.
        let mut events = Vec::with_capacity(1_000_000);
        for k in 0..500_000u64 {
            events.push(Completed {
                class: Class::Critical,
                acked_ns: 2 * k * MS,
                committed_ns: 2 * k * MS + 3 * MS / 2,
            });
            events.push(Completed {
                class: Class::Standard,
                acked_ns: 2 * k * MS + MS / 2,
                committed_ns: 2 * k * MS + MS,
            });
        }
        let f = figure(&events, &CRITICAL);
        assert_eq!((f.inversions, f.overtaken), (500_000, 500_000));
        assert_eq!((f.delay_p99_ms, f.delay_max_ms), (0.5, 0.5));
    }
}
