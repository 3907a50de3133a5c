//! Helpers shared by the simulator's tests: running a range of seeds on as
//! many threads as there are cores.

use orderly_sim::{SeedReport, SimConfig};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Runs seeds `first..first + n`, in parallel; reports in seed order.
pub fn run_seeds(config: &SimConfig, first: u64, n: u64) -> Vec<SeedReport> {
    let threads = std::thread::available_parallelism().map_or(1, |c| c.get()).min(n as usize).max(1);
    let next = AtomicU64::new(0);
    let done = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n {
                        return;
                    }
                    let report = orderly_sim::run_seed(config, first + i);
                    done.lock().expect("no test thread panics while holding it").push(report);
                }
            });
        }
    });
    let mut reports = done.into_inner().expect("no test thread panicked");
    reports.sort_by_key(|r| r.seed);
    reports
}

/// A readable account of a seed's violations.
pub fn describe(r: &SeedReport) -> String {
    r.violations
        .iter()
        .map(|v| format!("seed {} step {}: {}: {}\n  {}", v.seed, v.step, v.invariant, v.detail, v.trace.join("\n  ")))
        .collect::<Vec<_>>()
        .join("\n")
}
