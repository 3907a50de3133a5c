//! CI's fixed set of seeds: every fault kind is injected many times, and no
//! invariant breaks. A failure prints the seed, the step, the invariant and
//! the trace; `orderly simulate --seed S --steps 120` replays it.

mod common;

use orderly_sim::{FaultKind, SimConfig};
use std::collections::BTreeMap;

/// Seeds CI runs (1..=SEEDS).
const SEEDS: u64 = 24;
/// Fault-phase steps per seed.
const STEPS: u64 = 120;
/// Each fault kind is injected at least this often over all seeds.
const INJECTIONS_MIN: u64 = 10;

#[test]
fn fixed_seeds_inject_every_fault_and_break_no_invariant() {
    let config = SimConfig { steps: STEPS, ..SimConfig::default() };
    let reports = common::run_seeds(&config, 1, SEEDS);
    let broken: Vec<String> = reports.iter().filter(|r| !r.violations.is_empty()).map(common::describe).collect();
    assert!(broken.is_empty(), "violations:\n{}", broken.join("\n"));
    let mut injected: BTreeMap<String, u64> = BTreeMap::new();
    for r in &reports {
        for (kind, n) in &r.faults_injected {
            *injected.entry(kind.clone()).or_insert(0) += n;
        }
    }
    for kind in FaultKind::ALL {
        let n = injected.get(kind.name()).copied().unwrap_or(0);
        assert!(n >= INJECTIONS_MIN, "{kind} injected {n} times, expected at least {INJECTIONS_MIN}: {injected:?}");
    }
    let acknowledged: u64 = reports.iter().map(|r| r.stats.get("orders_acknowledged").copied().unwrap_or(0)).sum();
    let delivered: u64 = reports.iter().map(|r| r.orders_by_state.get("delivered").copied().unwrap_or(0)).sum();
    assert!(acknowledged > 500 && delivered > 300, "a real workload ran: {acknowledged} orders, {delivered} delivered");
}

#[test]
fn without_faults_every_order_settles_too() {
    let config = SimConfig { steps: 60, faults: orderly_sim::FaultSet::none(), ..SimConfig::default() };
    for r in common::run_seeds(&config, 101, 2) {
        assert!(r.violations.is_empty(), "{}", common::describe(&r));
        assert!(r.faults_injected.values().all(|n| *n == 0), "{:?}", r.faults_injected);
    }
}
