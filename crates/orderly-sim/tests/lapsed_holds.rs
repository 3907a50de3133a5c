//! Synchronous reservations (orders of high value, reserved before the
//! answer) are holds with a lifetime. Here the lifetime is one second, so bus
//! delays, broker outages and crashes make many of them lapse before the
//! order's `order.created` reaches inventory. Inventory then reserves the
//! same units at the same location again (the order was acknowledged with
//! them) instead of routing the line anew.
//!
//! Known gap, so the test is ignored (run it with `--run-ignored all`): when
//! the lapsed units were taken by other orders meanwhile, the line is still
//! routed anew and the ledger keeps a reservation no order will pick; the
//! `no_orphan_reservation` invariant reports it (seeds 1, 22 and 23 here).
//! Before the re-reservation, most lapses ended that way.

mod common;

use orderly_sim::SimConfig;

#[test]
#[ignore = "known gap: a lapsed synchronous reservation whose units were taken meanwhile (README, Crash safety)"]
fn synchronous_holds_that_lapse_before_their_order_break_no_invariant() {
    let config = SimConfig { steps: 120, hold_ttl_ms: Some(1_000), ..SimConfig::default() };
    let reports = common::run_seeds(&config, 1, 24);
    let broken: Vec<String> = reports.iter().filter(|r| !r.violations.is_empty()).map(common::describe).collect();
    assert!(broken.is_empty(), "violations with 1 s holds:\n{}", broken.join("\n"));
    let delivered: u64 = reports.iter().map(|r| r.orders_by_state.get("delivered").copied().unwrap_or(0)).sum();
    assert!(delivered > 50, "a real workload ran: {delivered} orders delivered");
}
