//! What the run knows about each event, lock-free: a slot per event index (intended send time,
//! class, phase, sent/acked/error flags, how often each role reported it done), per-second
//! counters, and the completion collector that turns processed notices into per-lane latency
//! histograms, measured from each event's intended send time.

use crate::mix::{Class, parse_tracked_id};
use bus::control::ProcessedNotice;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::{
    collections::BTreeMap,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

/// Latencies are recorded in microseconds, 1 µs .. 1 h.
pub const MAX_LATENCY_US: u64 = 3_600_000_000;
/// The lanes of the platform, in priority order.
pub const LANES: [&str; 3] = ["critical", "high", "standard"];
/// The role whose notice makes an event "processed".
pub const PROJECTOR: &str = "projector";
pub const ANALYTICS: &str = "analytics";

/// A histogram of microseconds with `sigfig` significant digits.
pub fn histogram(sigfig: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, sigfig)
        .unwrap_or_else(|_| unreachable!("1 µs .. 1 h at 1–5 digits is a valid configuration"))
}

pub fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let us = u64::try_from(latency.as_micros())
        .unwrap_or(MAX_LATENCY_US)
        .clamp(1, MAX_LATENCY_US);
    // In bounds by the clamp.
    let _ = histogram.record(us);
}

/// Percentiles of a histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Percentiles {
    pub fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p90_ms: ms(histogram.value_at_quantile(0.90)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
            mean_ms: histogram.mean() / 1000.0,
        }
    }
}

const CHUNK_BITS: u32 = 16;
const CHUNK: usize = 1 << CHUNK_BITS;
const MAX_CHUNKS: usize = 1 << 14;

#[derive(Debug, Default)]
struct Slot {
    /// Intended send time, ns after the run's start, plus one (0: never generated).
    intended: AtomicU64,
    flags: AtomicU64,
    /// When the ack came back, ns after the run's start, plus one (0: not acked).
    acked: AtomicU64,
    /// When the projector first reported it, ns after the run's start, plus one.
    committed: AtomicU64,
}

const CLASS_MASK: u64 = 0b11;
const PHASE_SHIFT: u32 = 2;
const PHASE_MASK: u64 = 0x3f;
pub const SENT: u64 = 1 << 8;
pub const ACKED: u64 = 1 << 9;
pub const ERROR: u64 = 1 << 10;
pub const DEAD_LETTERED: u64 = 1 << 11;
/// The platform refused it at least once with `Retry-After` (503/429): shed unless a retry
/// was acked.
pub const REFUSED: u64 = 1 << 12;
/// Held back at least once by the bulk admission signal (NATS): shed unless later acked.
pub const DEFERRED: u64 = 1 << 13;
/// Generated invalid (`mix.invalid_share`): must be dead-lettered as `invalid_event`.
pub const INVALID: u64 = 1 << 14;
/// Generated for the refused customer (`mix.poison_share`): must be dead-lettered as
/// `store_rejected`.
pub const POISON: u64 = 1 << 15;
/// A client retry of an earlier event (same key, new id).
pub const RETRY: u64 = 1 << 16;
/// Its ack said `duplicate: true`: the stream already held its key, nothing new was stored.
pub const DEDUPLICATED: u64 = 1 << 17;
/// No projector notice reached the harness, but the store's ledger holds it.
pub const FOUND_IN_STORE: u64 = 1 << 18;
/// No analytics notice reached the harness, but the analytics ledger holds it.
pub const ANALYTICS_IN_STORE: u64 = 1 << 19;
/// Sent by the critical probe (a client of its own, see `crate::probe`).
pub const PROBE: u64 = 1 << 20;
const TENANT_SHIFT: u32 = 48;
const TENANT_MASK: u64 = 0xfff;
const PROJECTOR_ONE: u64 = 1 << 32;
const PROJECTOR_MASK: u64 = 0xff << 32;
const ANALYTICS_ONE: u64 = 1 << 40;
const ANALYTICS_MASK: u64 = 0xff << 40;

/// One slot per event index, in chunks allocated on first use (no lock, no rehash).
#[derive(Debug)]
pub struct Slots {
    chunks: Vec<OnceLock<Box<[Slot]>>>,
}

impl Default for Slots {
    fn default() -> Self {
        Self {
            chunks: (0..MAX_CHUNKS).map(|_| OnceLock::new()).collect(),
        }
    }
}

/// What the slots say about one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotView {
    pub intended_ns: u64,
    pub class: Class,
    pub phase: usize,
    pub flags: u64,
    /// When its ack came back (ns after the start).
    pub acked_ns: Option<u64>,
    /// When the projector first reported it (ns after the start).
    pub committed_ns: Option<u64>,
}

impl SlotView {
    pub fn acked(&self) -> bool {
        self.flags & ACKED != 0
    }
    pub fn projector_reports(&self) -> u64 {
        (self.flags & PROJECTOR_MASK) >> 32
    }
    pub fn analytics_reports(&self) -> u64 {
        (self.flags & ANALYTICS_MASK) >> 40
    }
    pub fn dead_lettered(&self) -> bool {
        self.flags & DEAD_LETTERED != 0
    }
    pub fn sent(&self) -> bool {
        self.flags & SENT != 0
    }
    /// Refused or held back, and never acked nor failed: the platform did not take it.
    pub fn shed(&self) -> bool {
        self.flags & (REFUSED | DEFERRED) != 0 && self.flags & (ACKED | ERROR) == 0
    }
    pub fn has(&self, flag: u64) -> bool {
        self.flags & flag != 0
    }
    /// Processed by the projector: its notice, or (when the notice was lost) its ledger row.
    pub fn processed(&self) -> bool {
        self.projector_reports() > 0 || self.has(FOUND_IN_STORE)
    }
    pub fn counted_by_analytics(&self) -> bool {
        self.analytics_reports() > 0 || self.has(ANALYTICS_IN_STORE)
    }
    /// The 0-based tenant number it was sent for.
    pub fn tenant(&self) -> u64 {
        (self.flags >> TENANT_SHIFT) & TENANT_MASK
    }
    /// The dead-letter reason it was generated to get, if any.
    pub fn doomed_reason(&self) -> Option<&'static str> {
        if self.has(INVALID) {
            Some(crate::mix::Doom::Invalid.reason())
        } else if self.has(POISON) {
            Some(crate::mix::Doom::Poison.reason())
        } else {
            None
        }
    }
}

/// The slot flags that record event `tenant`'s number.
pub fn tenant_flags(tenant: u64) -> u64 {
    (tenant & TENANT_MASK) << TENANT_SHIFT
}

impl Slots {
    fn slot(&self, index: u64) -> Option<&Slot> {
        let chunk = usize::try_from(index >> CHUNK_BITS).ok()?;
        let cell = self.chunks.get(chunk)?;
        let slots = cell.get_or_init(|| (0..CHUNK).map(|_| Slot::default()).collect());
        slots.get(index as usize & (CHUNK - 1))
    }

    fn existing(&self, index: u64) -> Option<&Slot> {
        let chunk = usize::try_from(index >> CHUNK_BITS).ok()?;
        self.chunks
            .get(chunk)?
            .get()?
            .get(index as usize & (CHUNK - 1))
    }

    /// Event `index` is meant to be sent `intended_ns` after the start, in `phase`.
    pub fn generate(&self, index: u64, intended_ns: u64, class: Class, phase: usize) {
        if let Some(slot) = self.slot(index) {
            slot.intended.store(intended_ns.saturating_add(1), Relaxed);
            slot.flags.fetch_or(
                (class as u64) | ((phase as u64 & PHASE_MASK) << PHASE_SHIFT),
                Relaxed,
            );
        }
    }

    pub fn mark(&self, index: u64, flag: u64) {
        self.mark_first(index, flag);
    }

    /// Set `flag`; whether it was not set before.
    pub fn mark_first(&self, index: u64, flag: u64) -> bool {
        self.existing(index)
            .is_some_and(|slot| slot.flags.fetch_or(flag, Relaxed) & flag == 0)
    }

    /// Event `index` was acked at `at_ns` (the first ack counts).
    pub fn mark_acked_at(&self, index: u64, at_ns: u64) {
        if let Some(slot) = self.existing(index) {
            slot.flags.fetch_or(ACKED, Relaxed);
            let _ = slot
                .acked
                .compare_exchange(0, at_ns.saturating_add(1), Relaxed, Relaxed);
        }
    }

    /// The projector first reported event `index` at `at_ns`.
    pub fn mark_committed_at(&self, index: u64, at_ns: u64) {
        if let Some(slot) = self.existing(index) {
            let _ = slot
                .committed
                .compare_exchange(0, at_ns.saturating_add(1), Relaxed, Relaxed);
        }
    }

    pub fn view(&self, index: u64) -> Option<SlotView> {
        let slot = self.existing(index)?;
        let intended = slot.intended.load(Relaxed);
        if intended == 0 {
            return None;
        }
        let flags = slot.flags.load(Relaxed);
        let time = |cell: &AtomicU64| cell.load(Relaxed).checked_sub(1);
        Some(SlotView {
            intended_ns: intended - 1,
            class: Class::from_index(flags & CLASS_MASK),
            phase: ((flags >> PHASE_SHIFT) & PHASE_MASK) as usize,
            flags,
            acked_ns: time(&slot.acked),
            committed_ns: time(&slot.committed),
        })
    }

    /// Count one more report of `role` for `index`; the view before it.
    fn report(&self, index: u64, analytics: bool) -> Option<SlotView> {
        let slot = self.existing(index)?;
        let before = self.view(index)?;
        let (one, mask) = if analytics {
            (ANALYTICS_ONE, ANALYTICS_MASK)
        } else {
            (PROJECTOR_ONE, PROJECTOR_MASK)
        };
        // Saturate rather than carry into the next field.
        if before.flags & mask != mask {
            slot.flags.fetch_add(one, Relaxed);
        }
        Some(before)
    }
}

/// Counters per second of the run (by intended time for sends and errors, by completion time
/// for acks).
#[derive(Debug)]
pub struct PerSecond {
    pub sent: Vec<AtomicU64>,
    pub acked: Vec<AtomicU64>,
    pub errors: Vec<AtomicU64>,
    /// Refusals with `Retry-After` (by answer time; every attempt counts).
    pub refused: Vec<AtomicU64>,
}

impl PerSecond {
    fn new(seconds: usize) -> Self {
        let zeros = || (0..seconds.max(1)).map(|_| AtomicU64::new(0)).collect();
        Self {
            sent: zeros(),
            acked: zeros(),
            errors: zeros(),
            refused: zeros(),
        }
    }

    pub fn add(series: &[AtomicU64], second: usize, n: u64) {
        if let Some(cell) = series.get(second.min(series.len().saturating_sub(1))) {
            cell.fetch_add(n, Relaxed);
        }
    }

    pub fn snapshot(series: &[AtomicU64]) -> Vec<u64> {
        series.iter().map(|c| c.load(Relaxed)).collect()
    }
}

/// Send errors by kind, with the first few (and their intended times) kept.
#[derive(Debug, Default, Clone, Serialize, serde::Deserialize)]
pub struct ErrorLog {
    pub by_kind: BTreeMap<String, u64>,
    /// (intended send time after the start in s, error)
    pub first: Vec<(f64, String)>,
}

/// One run's shared state: the clock, the slots, the counters. Shared by every sender task and
/// the collector through an `Arc`.
#[derive(Debug)]
pub struct Run {
    pub started: Instant,
    /// The same instant as Unix ns (notices carry Unix ns).
    pub started_unix_ns: u64,
    pub run_tag: u32,
    pub slots: Slots,
    pub next_index: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub errors: AtomicU64,
    pub processed: AtomicU64,
    pub analytics_done: AtomicU64,
    /// Answers that refused an event with `Retry-After` (every attempt counts).
    pub refusals: AtomicU64,
    /// Sends of an event after a refusal.
    pub retries: AtomicU64,
    /// Bulk events the admission signal held back (each counted once).
    pub deferrals: AtomicU64,
    /// Refusals by the problem type the platform gave (`overloaded`, `ingest-full`, …).
    pub refusal_kinds: Mutex<BTreeMap<String, u64>>,
    /// Acks that said `duplicate: true`.
    pub deduplicated: AtomicU64,
    /// Retry index → the index of the event it retries.
    pub retry_of: Mutex<BTreeMap<u64, u64>>,
    pub per_second: PerSecond,
    pub error_log: Mutex<ErrorLog>,
    /// p99 over the last second of every lane, µs (for the progress line).
    pub live_p99_us: AtomicU64,
}

pub fn unix_ns() -> u64 {
    u64::try_from(bus::control::unix_ns()).unwrap_or(u64::MAX)
}

impl Run {
    /// A run able to count `seconds` seconds of per-second series.
    pub fn new(run_tag: u32, seconds: usize) -> Self {
        Self {
            started: Instant::now(),
            started_unix_ns: unix_ns(),
            run_tag,
            slots: Slots::default(),
            next_index: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            analytics_done: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            deferrals: AtomicU64::new(0),
            refusal_kinds: Mutex::new(BTreeMap::new()),
            deduplicated: AtomicU64::new(0),
            retry_of: Mutex::new(BTreeMap::new()),
            per_second: PerSecond::new(seconds),
            error_log: Mutex::new(ErrorLog::default()),
            live_p99_us: AtomicU64::new(0),
        }
    }

    /// ns since the start.
    /// The id event `index` was sent with (its timestamp part is its intended time).
    pub fn event_id(&self, index: u64, intended_ns: u64) -> String {
        crate::mix::tracked_id(
            self.run_tag,
            index,
            (self.started_unix_ns + intended_ns) / 1_000_000,
        )
    }

    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn next_index(&self) -> u64 {
        self.next_index.fetch_add(1, Relaxed)
    }

    /// Event `index` goes out; a retry is counted as one, not as another event sent.
    pub fn mark_sent(&self, index: u64, intended_ns: u64) {
        if self.slots.mark_first(index, SENT) {
            self.sent.fetch_add(1, Relaxed);
            PerSecond::add(&self.per_second.sent, second_of(intended_ns), 1);
        } else {
            self.retries.fetch_add(1, Relaxed);
        }
    }

    /// Acked; `duplicate` when the answer said the stream already held the event's key.
    pub fn mark_acked(&self, index: u64, duplicate: bool) {
        let now = self.now_ns();
        if duplicate {
            self.slots.mark(index, DEDUPLICATED);
            self.deduplicated.fetch_add(1, Relaxed);
        }
        self.slots.mark_acked_at(index, now);
        self.acked.fetch_add(1, Relaxed);
        PerSecond::add(&self.per_second.acked, second_of(now), 1);
    }

    /// The platform refused event `index` with `Retry-After`, saying why (`kind`).
    pub fn mark_refused(&self, index: u64, kind: &str) {
        self.slots.mark(index, REFUSED);
        self.refusals.fetch_add(1, Relaxed);
        PerSecond::add(&self.per_second.refused, second_of(self.now_ns()), 1);
        let mut kinds = self.refusal_kinds.lock().unwrap_or_else(|e| e.into_inner());
        *kinds.entry(kind.to_owned()).or_default() += 1;
    }

    /// The admission signal held bulk event `index` back.
    pub fn mark_deferred(&self, index: u64) {
        if self.slots.mark_first(index, DEFERRED) {
            self.deferrals.fetch_add(1, Relaxed);
        }
    }

    pub fn mark_error(&self, index: u64, intended_ns: u64, kind: &str) {
        self.slots.mark(index, ERROR);
        self.errors.fetch_add(1, Relaxed);
        PerSecond::add(&self.per_second.errors, second_of(intended_ns), 1);
        let mut log = self.error_log.lock().unwrap_or_else(|e| e.into_inner());
        *log.by_kind.entry(kind.to_owned()).or_default() += 1;
        if log.first.len() < 20 {
            log.first.push((intended_ns as f64 / 1e9, kind.to_owned()));
        }
    }
}

pub fn second_of(ns: u64) -> usize {
    usize::try_from(ns / 1_000_000_000).unwrap_or(usize::MAX)
}

/// Latencies and counts of one second (by completion time).
#[derive(Debug)]
pub struct SecondStats {
    /// critical, high, standard (projector), then analytics.
    pub lanes: [Histogram<u64>; 4],
}

impl SecondStats {
    fn new() -> Self {
        Self {
            lanes: std::array::from_fn(|_| histogram(2)),
        }
    }
}

/// Turns processed notices into latencies and counts. Owned by one task: no locks.
#[derive(Debug)]
pub struct Collector {
    run: std::sync::Arc<Run>,
    /// Per phase: projector latency per lane (critical, high, standard).
    pub lanes: Vec<[Histogram<u64>; 3]>,
    /// Per phase: analytics latency.
    pub analytics: Vec<Histogram<u64>>,
    /// Per phase: projector latency of the critical probe's events (also in `lanes`).
    pub probe: Vec<Histogram<u64>>,
    /// Other roles (e.g. a notifier), per role and lane, whole run.
    pub others: BTreeMap<(String, String), Histogram<u64>>,
    pub seconds: Vec<SecondStats>,
    /// Projector reports of an event it had reported already.
    pub duplicates: u64,
    pub analytics_duplicates: u64,
    /// Ids that are not this run's (other producers on the same platform).
    pub foreign: u64,
    /// Events by generated class (rows) and the lane the projector reported (columns).
    pub routed: [[u64; 3]; 4],
    live: Histogram<u64>,
}

impl Collector {
    pub fn new(run: std::sync::Arc<Run>, phases: usize) -> Self {
        Self {
            run,
            lanes: (0..phases)
                .map(|_| std::array::from_fn(|_| histogram(3)))
                .collect(),
            analytics: (0..phases).map(|_| histogram(3)).collect(),
            probe: (0..phases).map(|_| histogram(3)).collect(),
            others: BTreeMap::new(),
            seconds: Vec::new(),
            duplicates: 0,
            analytics_duplicates: 0,
            foreign: 0,
            routed: [[0; 3]; 4],
            live: histogram(2),
        }
    }

    fn second(&mut self, second: usize) -> &mut SecondStats {
        // Bounded: notices come during the run and its drain.
        let second = second.min(24 * 3600);
        while self.seconds.len() <= second {
            self.seconds.push(SecondStats::new());
        }
        &mut self.seconds[second]
    }

    /// Account one notice.
    pub fn on_notice(&mut self, notice: &ProcessedNotice) {
        let run = std::sync::Arc::clone(&self.run);
        let completed_ns = notice.at_ns.saturating_sub(run.started_unix_ns);
        let second = second_of(completed_ns);
        let lane_index = LANES.iter().position(|lane| *lane == notice.lane);
        for id in &notice.ids {
            let Some(index) = parse_tracked_id(id, run.run_tag) else {
                self.foreign += 1;
                continue;
            };
            let latency = |view: &SlotView| {
                Duration::from_nanos(completed_ns.saturating_sub(view.intended_ns))
            };
            match notice.role.as_str() {
                PROJECTOR | ANALYTICS => {
                    let analytics = notice.role == ANALYTICS;
                    let Some(view) = run.slots.report(index, analytics) else {
                        self.foreign += 1;
                        continue;
                    };
                    let latency = latency(&view);
                    if analytics {
                        if view.analytics_reports() > 0 {
                            self.analytics_duplicates += 1;
                            continue;
                        }
                        run.analytics_done.fetch_add(1, Relaxed);
                        if let Some(histogram) = self.analytics.get_mut(view.phase) {
                            record(histogram, latency);
                        }
                        record(&mut self.second(second).lanes[3], latency);
                        continue;
                    }
                    if view.projector_reports() > 0 {
                        self.duplicates += 1;
                        continue;
                    }
                    run.processed.fetch_add(1, Relaxed);
                    run.slots.mark_committed_at(index, completed_ns);
                    if let Some(lane) = lane_index {
                        self.routed[view.class as usize][lane] += 1;
                        if let Some(phase) = self.lanes.get_mut(view.phase) {
                            record(&mut phase[lane], latency);
                        }
                        record(&mut self.second(second).lanes[lane], latency);
                    }
                    if view.has(PROBE)
                        && let Some(histogram) = self.probe.get_mut(view.phase)
                    {
                        record(histogram, latency);
                    }
                    record(&mut self.live, latency);
                }
                role => {
                    let Some(view) = run.slots.view(index) else {
                        self.foreign += 1;
                        continue;
                    };
                    let latency = latency(&view);
                    record(
                        self.others
                            .entry((role.to_owned(), notice.lane.clone()))
                            .or_insert_with(|| histogram(3)),
                        latency,
                    );
                }
            }
        }
    }

    /// Publish the last second's p99 for the progress line and start a new second.
    pub fn roll_live(&mut self) {
        let p99 = if self.live.is_empty() {
            0
        } else {
            self.live.value_at_quantile(0.99)
        };
        self.run.live_p99_us.store(p99, Relaxed);
        self.live.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mix::tracked_id;
    use std::sync::Arc;

    fn notice(role: &str, lane: &str, at_ns: u64, ids: Vec<String>) -> ProcessedNotice {
        ProcessedNotice {
            role: role.into(),
            lane: lane.into(),
            at_ns,
            ids,
        }
    }

    #[test]
    fn latency_is_from_the_intended_time_and_duplicates_are_counted() {
        let run = Arc::new(Run::new(5, 10));
        for index in 0..3 {
            run.slots
                .generate(index, index * 1_000_000_000, Class::Critical, 0);
        }
        let mut collector = Collector::new(Arc::clone(&run), 1);
        let t0 = run.started_unix_ns;
        // Event 0 due at 0 s, done at 1.5 s; event 1 due at 1 s, done at 1.5 s.
        collector.on_notice(&notice(
            "projector",
            "critical",
            t0 + 1_500_000_000,
            vec![tracked_id(5, 0, 1), tracked_id(5, 1, 1)],
        ));
        collector.on_notice(&notice(
            "projector",
            "critical",
            t0 + 1_600_000_000,
            vec![tracked_id(5, 1, 1), tracked_id(6, 1, 1)],
        ));
        let stats = Percentiles::of(&collector.lanes[0][0]);
        assert_eq!(stats.count, 2);
        assert!((stats.max_ms - 1500.0).abs() < 2.0, "{stats:?}");
        assert!((stats.p50_ms - 500.0).abs() < 1.0, "{stats:?}");
        assert_eq!(collector.duplicates, 1);
        assert_eq!(collector.foreign, 1);
        assert_eq!(run.processed.load(Relaxed), 2);
        assert_eq!(collector.routed[Class::Critical as usize][0], 2);
        assert_eq!(run.slots.view(1).map(|v| v.projector_reports()), Some(2));
        assert_eq!(run.slots.view(2).map(|v| v.projector_reports()), Some(0));
        assert_eq!(collector.seconds.len(), 2);
    }

    #[test]
    fn ack_and_commit_times_are_kept_and_a_retry_is_not_another_send() {
        let run = Arc::new(Run::new(8, 10));
        run.slots.generate(0, 0, Class::Standard, 0);
        assert_eq!(run.slots.view(0).map(|v| v.acked_ns), Some(None));
        run.mark_sent(0, 0);
        run.mark_refused(0, "overloaded");
        run.mark_sent(0, 0);
        run.mark_acked(0, false);
        assert_eq!(run.sent.load(Relaxed), 1);
        assert_eq!(run.retries.load(Relaxed), 1);
        assert_eq!(run.refusals.load(Relaxed), 1);
        let view = run.slots.view(0).expect("slot");
        assert!(
            view.acked() && !view.shed(),
            "acked after a refusal is not shed"
        );
        assert!(view.acked_ns.is_some());
        let mut collector = Collector::new(Arc::clone(&run), 1);
        for at in [7_000, 9_000] {
            collector.on_notice(&notice(
                "projector",
                "standard",
                run.started_unix_ns + at,
                vec![tracked_id(8, 0, 1)],
            ));
        }
        assert_eq!(
            run.slots.view(0).and_then(|v| v.committed_ns),
            Some(7_000),
            "the first report is the commit"
        );
        run.slots.generate(1, 0, Class::AnalyticsOnly, 0);
        run.mark_deferred(1);
        run.mark_deferred(1);
        assert_eq!(run.deferrals.load(Relaxed), 1);
        let view = run.slots.view(1).expect("slot");
        assert!(view.shed() && !view.sent());
    }

    #[test]
    fn slots_keep_class_phase_and_flags() {
        let slots = Slots::default();
        let far = (CHUNK as u64) * 3 + 17;
        slots.generate(far, 42, Class::AnalyticsOnly, 5);
        slots.mark(far, ACKED);
        let view = slots.view(far).expect("slot");
        assert_eq!(
            (view.intended_ns, view.class, view.phase, view.acked()),
            (42, Class::AnalyticsOnly, 5, true)
        );
        assert_eq!(slots.view(far + 1), None, "never generated");
        assert_eq!(slots.view(u64::MAX), None);
        for _ in 0..300 {
            slots.report(far, false);
        }
        assert_eq!(slots.view(far).map(|v| v.projector_reports()), Some(255));
        assert_eq!(slots.view(far).map(|v| v.analytics_reports()), Some(0));
    }
}
