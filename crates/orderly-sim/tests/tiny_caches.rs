//! The simulator's seeds with every service cache limited to two entries:
//! nearly every row is evicted after each batch and reloaded from the store,
//! through crashes, restarts and every other fault, and no invariant breaks.
//! A handler that trusts a row to still be cached (instead of loading it)
//! shows up here.
//!
//! One test in this binary: the cache limit is process-wide.

mod common;

use orderly_sim::SimConfig;

#[test]
fn seeds_with_tiny_caches_break_no_invariant() {
    orderly_engine::table::limit_cache_entries(2);
    let config = SimConfig { steps: 120, ..SimConfig::default() };
    let reports = common::run_seeds(&config, 1, 8);
    let broken: Vec<String> = reports.iter().filter(|r| !r.violations.is_empty()).map(common::describe).collect();
    assert!(broken.is_empty(), "violations with tiny caches:\n{}", broken.join("\n"));
    let delivered: u64 = reports.iter().map(|r| r.orders_by_state.get("delivered").copied().unwrap_or(0)).sum();
    assert!(delivered > 50, "a real workload ran: {delivered} orders delivered");
}
