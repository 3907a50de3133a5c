//! Synchronous reservations (orders of high value, reserved before the
//! answer) are holds with no lifetime of their own: the order, acknowledged
//! with those units, may reach inventory long after (bus delays, broker
//! outages, crashes, clock jumps). Once `inventory.hold_ttl` has passed,
//! inventory asks the orders service whether the order exists
//! (`hold.unclaimed`); only an order that was never created is voided and
//! its hold released (`order.voided`), and its creation is refused from then
//! on. Here the lifetime is one second, so the question is asked often.
//!
//! Before this protocol the hold lapsed at its TTL; when other orders took
//! the units meanwhile, inventory routed the line anew and the ledger kept a
//! reservation no order would pick (`no_orphan_reservation` failed seeds 1,
//! 22 and 23 of this test).

mod common;

use orderly_sim::SimConfig;

#[test]
fn synchronous_reservations_outliving_the_hold_ttl_break_no_invariant() {
    let config = SimConfig { steps: 120, hold_ttl_ms: Some(1_000), ..SimConfig::default() };
    let reports = common::run_seeds(&config, 1, 24);
    let broken: Vec<String> = reports.iter().filter(|r| !r.violations.is_empty()).map(common::describe).collect();
    assert!(broken.is_empty(), "violations with 1 s holds:\n{}", broken.join("\n"));
    let total = |k: &str| reports.iter().map(|r| r.stats.get(k).copied().unwrap_or(0)).sum::<u64>();
    let delivered: u64 = reports.iter().map(|r| r.orders_by_state.get("delivered").copied().unwrap_or(0)).sum();
    assert!(delivered > 50, "a real workload ran: {delivered} orders delivered");
    assert!(
        total("holds_unclaimed") > 20,
        "inventory asked about unclaimed reservations: {}",
        total("holds_unclaimed")
    );
    assert_eq!(total("lapsed_reservations"), 0, "no synchronous reservation lapsed");
    eprintln!(
        "24 seeds: {delivered} delivered, {} questions asked, {} orders voided",
        total("holds_unclaimed"),
        total("orders_voided")
    );
}
