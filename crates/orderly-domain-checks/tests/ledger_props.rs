//! Property tests of the inventory ledger: for any sequence of receipts,
//! reservations, cancels, picks, short picks, adjustments, cycle counts, holds
//! and backorders, nothing is oversold, stock is conserved and explained, the
//! event log rebuilds the live ledger, and backorders are filled oldest first.

use orderly_domain::ledger::{
    LedgerCommand, LedgerConfig, LedgerCore, LedgerError, LedgerEvent, LedgerPiece, SkuLedger,
};
use orderly_domain::{HoldId, LineId, LocationId, OrderId, Sku, Timestamp};
use proptest::prelude::*;

const LOCATIONS: [&str; 2] = ["WH-1", "WH-2"];
/// Line `i` is line `i % 2 + 1` of order `i / 2`.
const LINES: usize = 6;
const HOLDS: usize = 4;
const CASES: u32 = 256;
const OPS_MAX: usize = 80;

/// A command over small id pools, so that commands collide often.
#[derive(Debug, Clone)]
enum Op {
    Receive { loc: usize, qty: u32 },
    Reserve { line: usize, loc: usize, qty: u32, hint: u32 },
    Release { line: usize },
    Commit { line: usize, loc: usize, qty: u32, key: u8 },
    Short { line: usize, loc: usize, found: u32, key: u8 },
    Adjust { loc: usize, delta: i64 },
    CycleCount { loc: usize, counted: u64 },
    CreateHold { hold: usize, qty: u32, loc: Option<usize>, ttl_ms: i64, jitter_ms: i64 },
    CreateOrderHold { hold: usize, qty: u32, loc: usize },
    ConsumeHold { hold: usize, line: usize },
    ReleaseHold { hold: usize },
    Expire { advance_ms: i64 },
    Backorder { line: usize, qty: u32 },
}

fn op() -> impl Strategy<Value = Op> {
    let loc = 0..LOCATIONS.len();
    let line = 0..LINES;
    let hold = 0..HOLDS;
    prop_oneof![
        4 => (loc.clone(), 1u32..40).prop_map(|(loc, qty)| Op::Receive { loc, qty }),
        5 => (line.clone(), loc.clone(), 1u32..15, any::<u32>())
            .prop_map(|(line, loc, qty, hint)| Op::Reserve { line, loc, qty, hint }),
        1 => line.clone().prop_map(|line| Op::Release { line }),
        3 => (line.clone(), loc.clone(), 1u32..10, 0u8..3)
            .prop_map(|(line, loc, qty, key)| Op::Commit { line, loc, qty, key }),
        2 => (line.clone(), loc.clone(), 0u32..10, 0u8..3)
            .prop_map(|(line, loc, found, key)| Op::Short { line, loc, found, key }),
        2 => (loc.clone(), -30i64..30).prop_map(|(loc, delta)| Op::Adjust { loc, delta }),
        1 => (loc.clone(), 0u64..60).prop_map(|(loc, counted)| Op::CycleCount { loc, counted }),
        1 => (hold.clone(), 1u32..10, loc.clone()).prop_map(|(hold, qty, loc)| Op::CreateOrderHold { hold, qty, loc }),
        2 => (hold.clone(), 1u32..10, proptest::option::of(loc), 1i64..100, 0i64..20)
            .prop_map(|(hold, qty, loc, ttl_ms, jitter_ms)| Op::CreateHold { hold, qty, loc, ttl_ms, jitter_ms }),
        2 => (hold.clone(), line.clone()).prop_map(|(hold, line)| Op::ConsumeHold { hold, line }),
        1 => hold.prop_map(|hold| Op::ReleaseHold { hold }),
        2 => (0i64..60).prop_map(|advance_ms| Op::Expire { advance_ms }),
        2 => (line, 1u32..10).prop_map(|(line, qty)| Op::Backorder { line, qty }),
    ]
}

fn config() -> impl Strategy<Value = LedgerConfig> {
    (1u32..=4, 0u8..=20).prop_map(|(partitions, pct)| LedgerConfig::new(partitions, pct).expect("in range"))
}

fn location(i: usize) -> LocationId {
    LocationId::parse(LOCATIONS[i]).expect("valid")
}

fn order(line: usize) -> OrderId {
    OrderId::parse(format!("o{}", line / 2)).expect("valid")
}

fn line_id(line: usize) -> LineId {
    LineId::parse(format!("o{}:{}", line / 2, line % 2 + 1)).expect("valid")
}

fn hold_id(hold: usize) -> HoldId {
    HoldId::parse(format!("h{hold}")).expect("valid")
}

fn command(op: &Op, now: &mut i64) -> LedgerCommand {
    let at = Timestamp(*now);
    match *op {
        Op::Receive { loc, qty } => LedgerCommand::Receive { location: location(loc), qty },
        Op::Reserve { line, loc, qty, hint } => LedgerCommand::Reserve {
            order: order(line),
            line: line_id(line),
            qty,
            location: location(loc),
            partition_hint: hint,
        },
        Op::Release { line } => LedgerCommand::Release { line: line_id(line) },
        Op::Commit { line, loc, qty, key } => LedgerCommand::Commit {
            line: line_id(line),
            location: location(loc),
            qty,
            instruction_key: format!("{}#{key}", line_id(line)),
        },
        Op::Short { line, loc, found, key } => LedgerCommand::Short {
            line: line_id(line),
            location: location(loc),
            qty: u32::MAX,
            qty_found: found,
            instruction_key: format!("{}#{key}", line_id(line)),
            at,
        },
        Op::Adjust { loc, delta } => {
            LedgerCommand::Adjust { location: location(loc), delta, reason: "recount".into(), user: "ops".into(), at }
        }
        Op::CycleCount { loc, counted } => {
            LedgerCommand::CycleCount { location: location(loc), counted, user: "ops".into(), at }
        }
        Op::CreateHold { hold, qty, loc, ttl_ms, jitter_ms } => LedgerCommand::CreateHold {
            hold_id: hold_id(hold),
            qty,
            location: loc.map(location),
            now: at,
            ttl_ms,
            jitter_offset_ms: jitter_ms,
        },
        Op::CreateOrderHold { hold, qty, loc } => {
            LedgerCommand::CreateOrderHold { hold_id: hold_id(hold), qty, location: location(loc), now: at }
        }
        Op::ConsumeHold { hold, line } => {
            LedgerCommand::ConsumeHold { hold_id: hold_id(hold), order: order(line), line: line_id(line) }
        }
        Op::ReleaseHold { hold } => LedgerCommand::ReleaseHold { hold_id: hold_id(hold) },
        Op::Expire { advance_ms } => {
            *now += advance_ms;
            LedgerCommand::ExpireHolds { now: Timestamp(*now) }
        }
        Op::Backorder { line, qty } => {
            LedgerCommand::Backorder { order: order(line), line: line_id(line), qty, since: at }
        }
    }
}

/// What a property gets to look at while a sequence runs.
enum Seen<'a> {
    /// An event about to be applied to `ledger`.
    Before(&'a SkuLedger, &'a LedgerEvent),
    /// The ledger after one more event.
    After(&'a SkuLedger),
    /// A command was accepted and all its events applied.
    Accepted(&'a SkuLedger, &'a LedgerCommand, &'a [LedgerEvent]),
    /// A command was rejected; the ledger is as it was.
    Rejected(&'a SkuLedger, &'a LedgerCommand, &'a LedgerError),
}

/// Runs the ops, feeding every step to `observe`; returns the ledger and its log.
fn run(
    cfg: &LedgerConfig,
    ops: &[Op],
    mut observe: impl FnMut(Seen<'_>) -> Result<(), TestCaseError>,
) -> Result<(SkuLedger, Vec<LedgerEvent>), TestCaseError> {
    let mut ledger = SkuLedger::new(Sku::parse("SKU-HOT").expect("valid"));
    let mut log = Vec::new();
    let mut now = 0i64;
    for op in ops {
        let cmd = command(op, &mut now);
        match ledger.decide(&cmd, cfg) {
            Ok(events) => {
                for ev in &events {
                    observe(Seen::Before(&ledger, ev))?;
                    ledger.apply(ev);
                    observe(Seen::After(&ledger))?;
                }
                observe(Seen::Accepted(&ledger, &cmd, &events))?;
                log.extend(events);
            }
            Err(e) => {
                prop_assert!(e.is_rejected(), "{cmd:?} hit an impossible state: {e}");
                observe(Seen::Rejected(&ledger, &cmd, &e))?;
            }
        }
    }
    Ok((ledger, log))
}

fn sum_adjusted(log: &[LedgerEvent]) -> Result<i64, TestCaseError> {
    let mut total = 0i64;
    for ev in log {
        if let LedgerEvent::Adjusted { delta, parts, reason, user, .. } = ev {
            prop_assert!(!reason.trim().is_empty() && !user.trim().is_empty(), "unexplained adjustment {ev:?}");
            prop_assert_eq!(parts.iter().map(|p| p.delta).sum::<i64>(), *delta);
            total += delta;
        }
    }
    Ok(total)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// (1) No oversell: at every partition, after every event, reserved (plus
    /// safety) never exceeds on hand, so reserved + picked never exceeds what
    /// was received and adjusted.
    #[test]
    fn nothing_is_ever_oversold(cfg in config(), ops in proptest::collection::vec(op(), 1..OPS_MAX)) {
        run(&cfg, &ops, |seen| {
            if let Seen::After(ledger) = seen {
                ledger.check_invariants().map_err(TestCaseError::fail)?;
                for location in ledger.snapshot().locations {
                    for p in &location.partitions {
                        prop_assert!(p.reserved + p.safety <= p.on_hand, "{}/{}: {p:?}", location.location, p.partition);
                        let supplied = i128::from(p.received) + i128::from(p.adjusted);
                        prop_assert!(i128::from(p.reserved) + i128::from(p.committed) <= supplied);
                    }
                }
            }
            Ok(())
        })?;
    }

    /// (2) Conservation: on hand == received + adjusted − committed, and every
    /// unit that left otherwise than by a pick left through an adjustment with
    /// a reason and a user.
    #[test]
    fn stock_is_conserved_and_explained(cfg in config(), ops in proptest::collection::vec(op(), 1..OPS_MAX)) {
        let (ledger, log) = run(&cfg, &ops, |seen| {
            if let Seen::After(ledger) = seen {
                let t = ledger.totals();
                prop_assert_eq!(i128::from(t.on_hand), i128::from(t.received) + i128::from(t.adjusted) - i128::from(t.committed));
            }
            Ok(())
        })?;
        let t = ledger.totals();
        let received: u64 = log.iter().map(|e| match e { LedgerEvent::Received { qty, .. } => *qty, _ => 0 }).sum();
        let committed: u64 = log.iter().map(|e| match e { LedgerEvent::Committed { qty, .. } => *qty, _ => 0 }).sum();
        prop_assert_eq!(t.received, received);
        prop_assert_eq!(t.committed, committed);
        prop_assert_eq!(t.adjusted, sum_adjusted(&log)?);
    }

    /// (3) Replay: rebuilding from the event log (also after a JSON round trip)
    /// gives exactly the live ledger.
    #[test]
    fn the_event_log_rebuilds_the_live_ledger(cfg in config(), ops in proptest::collection::vec(op(), 1..OPS_MAX)) {
        let (ledger, log) = run(&cfg, &ops, |_| Ok(()))?;
        let rebuilt = SkuLedger::from_events(ledger.sku().clone(), &log);
        prop_assert_eq!(&rebuilt, &ledger);
        let json = serde_json::to_string(&log).expect("events serialize");
        let parsed: Vec<LedgerEvent> = serde_json::from_str(&json).expect("events parse");
        prop_assert_eq!(&SkuLedger::from_events(ledger.sku().clone(), &parsed), &ledger);
        prop_assert_eq!(ledger.version(), log.len() as u64);
    }

    /// (4) Backorders are filled strictly oldest first: a fill always goes to
    /// the head of the queue, and a receipt leaves either an empty queue or no
    /// available stock at that location.
    #[test]
    fn backorders_are_filled_oldest_first(cfg in config(), ops in proptest::collection::vec(op(), 1..OPS_MAX)) {
        run(&cfg, &ops, |seen| {
            match seen {
                Seen::Before(ledger, LedgerEvent::Reserved { line, from_backorder: true, .. }) => {
                    let head = ledger.backorders().next().map(|b| b.line);
                    prop_assert_eq!(head.as_ref(), Some(line), "a fill skipped the head of the queue");
                }
                Seen::Accepted(ledger, LedgerCommand::Receive { location, .. }, _) => {
                    prop_assert!(ledger.backorders().next().is_none() || ledger.available_at(location) == 0);
                }
                _ => {}
            }
            Ok(())
        })?;
    }

    /// (5) No effect twice: a repeated pick instruction or hold consumption
    /// decides nothing, and expiry leaves no due hold behind.
    #[test]
    fn duplicates_change_nothing_and_due_holds_expire(cfg in config(), ops in proptest::collection::vec(op(), 1..OPS_MAX)) {
        run(&cfg, &ops, |seen| {
            if let Seen::Accepted(ledger, cmd, events) = seen {
                match cmd {
                    LedgerCommand::Commit { .. } | LedgerCommand::Short { .. } | LedgerCommand::ConsumeHold { .. } => {
                        prop_assert_eq!(ledger.decide(cmd, &cfg), Ok(vec![]), "{:?} after {:?}", cmd, events);
                    }
                    LedgerCommand::ExpireHolds { now } => {
                        prop_assert!(ledger.next_expiry().is_none_or(|t| t > *now));
                    }
                    _ => {}
                }
            }
            Ok(())
        })?;
    }

    /// Partitions never cause a false "out of stock": a reservation is refused
    /// only when the whole location has less available than asked, whichever
    /// partition the hint points at.
    #[test]
    fn partitioning_never_causes_a_false_out_of_stock(cfg in config(), ops in proptest::collection::vec(op(), 1..OPS_MAX)) {
        run(&cfg, &ops, |seen| {
            if let Seen::Rejected(ledger, LedgerCommand::Reserve { qty, location, .. }, e) = seen {
                let available = ledger.available_at(location);
                prop_assert_eq!(e, &LedgerError::Insufficient { available });
                prop_assert!(available < u64::from(*qty));
            }
            Ok(())
        })?;
    }
}

/// Stores a ledger's changed pieces and core the way the engine does: a
/// piece that no longer exists is deleted.
fn store_changes(ledger: &mut SkuLedger, stored: &mut std::collections::BTreeMap<String, String>) -> String {
    for key in ledger.take_changes() {
        match ledger.piece(&key) {
            Some(piece) => {
                assert_eq!(piece.key(), key, "a piece reports the key it was asked for");
                stored.insert(key.encode(), serde_json::to_string(&piece).expect("pieces serialize"));
            }
            None => {
                stored.remove(&key.encode());
            }
        }
    }
    serde_json::to_string(&ledger.core()).expect("the core serializes")
}

fn assemble(core: &str, stored: &std::collections::BTreeMap<String, String>) -> Result<SkuLedger, String> {
    let core: LedgerCore = serde_json::from_str(core).map_err(|e| e.to_string())?;
    let pieces = stored.values().map(|doc| serde_json::from_str::<LedgerPiece>(doc).map_err(|e| e.to_string()));
    SkuLedger::assemble(core, pieces.collect::<Result<Vec<_>, _>>()?)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// (6) Incremental storage: writing only the pieces each batch of commands
    /// touched (and deleting those that are gone) always reassembles into the
    /// live ledger, whatever the batch boundaries.
    #[test]
    fn changed_pieces_alone_rebuild_the_live_ledger(
        cfg in config(),
        ops in proptest::collection::vec(op(), 1..OPS_MAX),
        batch in 1usize..6,
    ) {
        let mut ledger = SkuLedger::new(Sku::parse("SKU-HOT").expect("valid"));
        let mut stored = std::collections::BTreeMap::new();
        let mut now = 0i64;
        for chunk in ops.chunks(batch) {
            for op in chunk {
                let cmd = command(op, &mut now);
                if let Ok(events) = ledger.decide(&cmd, &cfg) {
                    for ev in &events {
                        ledger.apply(ev);
                    }
                }
            }
            let core = store_changes(&mut ledger, &mut stored);
            let rebuilt = assemble(&core, &stored).map_err(TestCaseError::fail)?;
            prop_assert_eq!(&rebuilt, &ledger);
            prop_assert_eq!(rebuilt.backorders().collect::<Vec<_>>(), ledger.backorders().collect::<Vec<_>>());
            prop_assert!(ledger.take_changes().is_empty());
        }
    }
}
