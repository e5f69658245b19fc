//! CPU classes inside one process.
//!
//! A tokio runtime has no task priorities: a critical event's tasks wait for a thread in the
//! same queue as every bulk task, and under a burst that queue is hundreds of tasks long. So the
//! priority path gets threads of its own — the gateway (the front door), and the router's
//! priority ingest and the projector's critical lane on the priority runtime — and the bulk
//! runtime's threads run at a lower operating-system priority (`nice`, `[runtime] bulk_nice`).
//! When the cores are contended the kernel then runs the front door and the priority path first;
//! when they are not, nice changes nothing and bulk work uses every idle cycle. Lowering a
//! thread's priority needs no privilege (raising it would), which is why the bulk threads are
//! lowered rather than the priority ones raised.

use serde::{Deserialize, Serialize};

/// `[runtime]`: how the process's threads are shared out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// The `nice` of the bulk runtime's threads (router bulk, projector high/standard, analytics,
    /// notifier), 0–19; 0 leaves them level with the priority path. Applied by the roles that
    /// process events (`crm all`, `router`, `projector`, `analytics`, `notifier`), not by the
    /// gateway alone, whose every thread is the front door.
    pub bulk_nice: i32,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self { bulk_nice: 5 }
    }
}

impl RuntimeConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(0..=19).contains(&self.bulk_nice) {
            anyhow::bail!(
                "runtime.bulk_nice: must be 0 to 19 (a lower priority than the priority path), \
                 not {}",
                self.bulk_nice
            );
        }
        Ok(())
    }
}

/// Set the calling thread's `nice` (Linux; elsewhere a no-op that says so). Meant for a
/// runtime's `on_thread_start`.
pub fn set_current_thread_nice(nice: i32) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // On Linux, PRIO_PROCESS with a thread id sets that thread alone.
        rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice)
            .map_err(std::io::Error::from)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = nice;
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "per-thread priority is set on Linux only",
        ))
    }
}

/// The calling thread's `nice` (Linux).
#[cfg(target_os = "linux")]
pub fn current_thread_nice() -> std::io::Result<i32> {
    rustix::process::getpriority_process(Some(rustix::thread::gettid()))
        .map_err(std::io::Error::from)
}

/// A runtime of a role's own (the gateway's, the priority path's) beside the process's main
/// one, shut down without blocking so that it may be dropped from async code.
pub struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl std::fmt::Debug for OwnRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OwnRuntime")
    }
}

impl OwnRuntime {
    /// A runtime of `threads` threads named `name`, at the process's default priority.
    pub fn new(name: &str, threads: usize) -> std::io::Result<Self> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name(name)
            .enable_all()
            .build()
            .map(|runtime| Self(Some(runtime)))
    }

    pub fn handle(&self) -> Option<&tokio::runtime::Handle> {
        self.0.as_ref().map(tokio::runtime::Runtime::handle)
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// A multi-thread runtime for the bulk work of a process whose threads run at `nice` (0: the
/// default priority). A thread that cannot be lowered logs it once and runs on at the default.
pub fn bulk_runtime(nice: i32) -> std::io::Result<tokio::runtime::Runtime> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if nice > 0 {
        builder.on_thread_start(move || {
            if let Err(err) = set_current_thread_nice(nice) {
                WARNED.call_once(|| {
                    tracing::warn!(error = %err, nice, "could not lower the bulk threads' priority");
                });
            }
        });
    }
    builder.build()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_bulk_runtime_lowers_its_threads_and_leaves_others() {
        let before = current_thread_nice().expect("nice");
        assert!(before <= 16, "the test needs room below nice {before}");
        let runtime = bulk_runtime(before + 3).expect("runtime");
        let worker = runtime
            .block_on(async { tokio::spawn(async { current_thread_nice() }).await })
            .expect("join")
            .expect("nice");
        assert_eq!(worker, before + 3, "a bulk worker thread runs lowered");
        let blocking = runtime
            .block_on(async { tokio::task::spawn_blocking(current_thread_nice).await })
            .expect("join")
            .expect("nice");
        assert_eq!(blocking, before + 3, "so does its blocking pool");
        assert_eq!(
            current_thread_nice().expect("nice"),
            before,
            "the caller is unchanged"
        );

        let own = OwnRuntime::new("test-priority", 1).expect("runtime");
        let handle = own.handle().expect("handle").clone();
        let priority = runtime
            .block_on(async move { handle.spawn(async { current_thread_nice() }).await })
            .expect("join")
            .expect("nice");
        assert_eq!(
            priority, before,
            "a runtime of its own keeps the default priority"
        );
    }

    /// The `nice` of each of this process's threads whose name starts with `prefix`.
    fn nice_of_threads(prefix: &str) -> Vec<(String, i32)> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
            let entry = entry.expect("task");
            let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            let Ok(tid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if !name.starts_with(prefix) {
                continue;
            }
            let pid = rustix::process::Pid::from_raw(tid).expect("a thread id");
            if let Ok(nice) = rustix::process::getpriority_process(Some(pid)) {
                found.push((format!("{} {tid}", name.trim()), nice));
            }
        }
        found
    }

    #[test]
    fn the_stores_threads_keep_the_priority_of_the_thread_that_opened_it() {
        let before = current_thread_nice().expect("nice");
        assert!(before <= 16, "the test needs room below nice {before}");
        let sqlite = test_support::TempSqlite::new();
        let runtime = bulk_runtime(before + 3).expect("runtime");
        // As in `main`: the store is opened by the future the main thread blocks on, then used
        // by tasks on the bulk runtime's lowered threads, many at once (each needs a reader).
        let store = runtime.block_on(async {
            let store = store::Store::connect(&sqlite.url()).await.expect("store");
            for _ in 0..20 {
                let mut reads = tokio::task::JoinSet::new();
                for customer in 0..32 {
                    let store = store.clone();
                    reads.spawn(async move { store.profile("t", &format!("c{customer}")).await });
                }
                while let Some(read) = reads.join_next().await {
                    read.expect("join").expect("read");
                }
            }
            store
        });
        // While the store is open: its connections' threads end with it.
        let threads = nice_of_threads("sqlx-sqlite");
        runtime.block_on(async move { drop(store) });
        // The projection's writer and four readers run at the opener's priority (critical
        // commits go through that writer); analytics' writer and reader (its own file) are bulk
        // work and run at the bulk runtime's.
        let at = |nice: i32| threads.iter().filter(|(_, n)| *n == nice).count();
        assert_eq!(
            (at(before), at(before + 3), threads.len()),
            (5, 2, 7),
            "the projection's threads at nice {before}, analytics' at {}: {threads:?}",
            before + 3
        );
    }

    #[test]
    fn bulk_nice_is_checked() {
        assert!(RuntimeConfig::default().validate().is_ok());
        let err = RuntimeConfig { bulk_nice: 20 }
            .validate()
            .expect_err("20 is out of range");
        assert!(err.to_string().contains("runtime.bulk_nice"), "{err}");
        assert!(RuntimeConfig { bulk_nice: -1 }.validate().is_err());
    }
}
