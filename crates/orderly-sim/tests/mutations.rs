//! The simulator finds bugs: deliberately broken variants of the engine
//! (switched on by `Mutations`, never in production) are caught within a
//! bounded number of seeds, by the invariant that guards what they break.

mod common;

use orderly_sim::{Mutations, SeedReport, SimConfig};

/// Seeds a broken variant may survive before the test fails.
const SEEDS_MAX: u64 = 8;

fn first_caught(mutations: Mutations) -> Option<SeedReport> {
    let config = SimConfig { steps: 150, mutations, ..SimConfig::default() };
    common::run_seeds(&config, 1, SEEDS_MAX).into_iter().find(|r| !r.violations.is_empty())
}

#[test]
fn a_consumer_that_skips_the_inbox_check_is_caught() {
    let caught = first_caught(Mutations { skip_inbox_check: true, ..Mutations::default() });
    let report = caught.expect("a consumer applying redelivered events twice went unnoticed");
    let v = &report.violations[0];
    assert_eq!(v.invariant, "no_double_effect", "{}", common::describe(&report));
    assert!(!v.trace.is_empty(), "a violation comes with a trace");
}

#[test]
fn a_reservation_that_ignores_the_safety_buffer_is_caught() {
    let caught = first_caught(Mutations { reserve_ignores_safety: true, ..Mutations::default() });
    let report = caught.expect("reservations eating the safety buffer went unnoticed");
    let v = &report.violations[0];
    // Seen by the simulator's own oversell check, or by the ledger's guard
    // (reserved + safety <= on hand, asserted after every change), whose
    // panic the simulator reports with its seed, step and trace.
    let oversell = v.invariant == "no_oversell"
        || (v.invariant == "no_panic"
            && v.detail.contains("ledger invariant broken")
            && v.detail.contains("exceed on hand"));
    assert!(oversell, "{}", common::describe(&report));
    assert!(!v.trace.is_empty(), "a violation comes with a trace");
}

#[test]
fn without_a_mutation_the_same_seeds_are_clean() {
    let config = SimConfig { steps: 150, ..SimConfig::default() };
    for r in common::run_seeds(&config, 1, 2) {
        assert!(r.violations.is_empty(), "{}", common::describe(&r));
    }
}
