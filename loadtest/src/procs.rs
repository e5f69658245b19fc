//! CPU% and RSS of the processes under test, sampled from /proc every second; and a description
//! of the machine for the report.

use serde::Serialize;
use std::{collections::BTreeMap, time::Duration};

/// utime + stime (clock ticks) from a `/proc/<pid>/stat` line. The command name is in
/// parentheses and may hold spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state(3) ppid(4) … utime is field 14, stime 15 (1-based over the line).
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS in bytes from a `/proc/<pid>/status` text.
pub fn parse_status_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux when it cannot be asked).
pub fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// One process's samples.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct ProcessSeries {
    pub name: String,
    /// Seconds after the run's start.
    pub t_s: Vec<f64>,
    /// CPU over the last interval, % of one core.
    pub cpu_percent: Vec<f64>,
    pub rss_mib: Vec<f64>,
    pub cpu_mean: f64,
    pub cpu_max: f64,
    pub rss_mean_mib: f64,
    pub rss_max_mib: f64,
}

impl ProcessSeries {
    pub fn summarize(&mut self) {
        let mean = |v: &[f64]| {
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        self.cpu_mean = mean(&self.cpu_percent);
        self.cpu_max = max(&self.cpu_percent);
        self.rss_mean_mib = mean(&self.rss_mib);
        self.rss_max_mib = max(&self.rss_mib);
    }
}

/// Samples a changing set of processes (a restarted role keeps its name, with a new pid).
#[derive(Debug)]
pub struct Sampler {
    ticks_per_s: f64,
    last: BTreeMap<(String, u32), (u64, std::time::Instant)>,
    pub series: BTreeMap<String, ProcessSeries>,
}

impl Default for Sampler {
    fn default() -> Self {
        Self::new()
    }
}

impl Sampler {
    pub fn new() -> Self {
        Self {
            ticks_per_s: clock_ticks() as f64,
            last: BTreeMap::new(),
            series: BTreeMap::new(),
        }
    }

    /// Read every process in `pids` once; `t_s` is the time after the run's start.
    pub fn sample(&mut self, pids: &[(String, u32)], t_s: f64) {
        let now = std::time::Instant::now();
        for (name, pid) in pids {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some(ticks) = parse_stat_cpu_ticks(&stat) else {
                continue;
            };
            let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| parse_status_rss_bytes(&s))
                .unwrap_or(0);
            let key = (name.clone(), *pid);
            if let Some((before, at)) = self.last.get(&key) {
                let seconds = now.duration_since(*at).as_secs_f64().max(1e-3);
                let cpu = (ticks.saturating_sub(*before)) as f64 / self.ticks_per_s / seconds;
                let series = self
                    .series
                    .entry(name.clone())
                    .or_insert_with(|| ProcessSeries {
                        name: name.clone(),
                        ..ProcessSeries::default()
                    });
                series.t_s.push((t_s * 10.0).round() / 10.0);
                series.cpu_percent.push((cpu * 1000.0).round() / 10.0);
                series
                    .rss_mib
                    .push((rss as f64 / 1048576.0 * 10.0).round() / 10.0);
            }
            self.last.insert(key, (ticks, now));
        }
    }

    pub fn finish(mut self) -> Vec<ProcessSeries> {
        self.series.values_mut().for_each(ProcessSeries::summarize);
        self.series.into_values().collect()
    }
}

/// The machine the run ran on.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub ram_gib: f64,
    pub kernel: String,
    pub nats_server: String,
    pub sync_interval: String,
}

impl Machine {
    pub fn describe(nats_server: &str, sync_interval: &str) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let ram_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map(|kb| (kb / 1048576.0 * 10.0).round() / 10.0)
            .unwrap_or_default();
        Self {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            ram_gib,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            nats_server: nats_server.to_owned(),
            sync_interval: sync_interval.to_owned(),
        }
    }
}

/// The sampling interval.
pub const INTERVAL: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_lines_with_awkward_names() {
        let line = "4242 (crm (all) x) S 1 4242 4242 0 -1 4194560 2103 0 0 0 1234 567 0 0 20 0 9 0 \
                    8828 1208832000 7710 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat_cpu_ticks(line), Some(1234 + 567));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn parses_this_process() {
        let pid = std::process::id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        assert!(parse_stat_cpu_ticks(&stat).is_some(), "{stat}");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let rss = parse_status_rss_bytes(&status).expect("VmRSS");
        assert!(rss > 1 << 20, "{rss}");
        let mut sampler = Sampler::new();
        let me = vec![("me".to_owned(), pid)];
        sampler.sample(&me, 0.0);
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(200) {
            std::hint::black_box(0u64.wrapping_add(1));
        }
        sampler.sample(&me, 0.2);
        let series = sampler.finish();
        assert_eq!(series.len(), 1);
        assert_eq!(series[0].cpu_percent.len(), 1);
        assert!(series[0].cpu_percent[0] > 10.0, "{:?}", series[0]);
        assert!(series[0].rss_max_mib > 1.0);
        let machine = Machine::describe("2.12.8", "default");
        assert!(machine.nproc >= 1 && machine.ram_gib > 0.0, "{machine:?}");
    }
}
